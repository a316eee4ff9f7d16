"""Merkle trees over key-hash segments: incremental updates and the level-by-level diff
find exactly the keys whose versions differ (dynamo/merkle.py)."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from dynamo.merkle import DiffWalk, MerkleTree, diff_entries, differing_keys, entry_hash

keys = st.binary(min_size=1, max_size=12)
versions_ = st.sampled_from([b"v1", b"v2", b"v3"])
ops = st.lists(st.tuples(keys, st.one_of(st.none(), versions_)), max_size=60)
shapes = st.sampled_from([(2, 1), (4, 2), (16, 3), (3, 4)])


def apply(tree, items, model):
    for key, version in items:
        if version is None:
            tree.remove(key)
            model.pop(key, None)
        else:
            tree.set(key, entry_hash(key, version))
            model[key] = entry_hash(key, version)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, common=ops, only_a=ops, only_b=ops)
def test_the_diff_finds_exactly_the_keys_that_differ(shape, common, only_a, only_b):
    branching, depth = shape
    a, b = MerkleTree(branching=branching, depth=depth), MerkleTree(branching=branching, depth=depth)
    model_a, model_b = {}, {}
    apply(a, common, model_a)
    apply(b, common, model_b)
    apply(a, only_a, model_a)
    apply(b, only_b, model_b)
    a._check()
    b._check()
    expected = sorted(k for k in set(model_a) | set(model_b) if model_a.get(k) != model_b.get(k))
    assert differing_keys(a, b) == expected
    assert differing_keys(b, a) == expected
    assert (a.root == b.root) == (not expected)
    assert a.all_entries() == model_a


@settings(max_examples=100, deadline=None)
@given(shape=shapes, history=ops)
def test_incremental_updates_equal_a_tree_built_from_the_final_state(shape, history):
    branching, depth = shape
    incremental = MerkleTree(branching=branching, depth=depth)
    model = {}
    apply(incremental, history, model)
    rebuilt = MerkleTree(branching=branching, depth=depth)
    for key, entry in sorted(model.items()):
        rebuilt.set(key, entry)
    assert incremental.levels == rebuilt.levels and incremental.keys == len(model)


def test_a_small_divergence_costs_few_hashes_and_names_only_its_segments():
    a, b = MerkleTree(), MerkleTree()
    rng = random.Random(5)
    for i in range(20_000):
        key = b"key-%d" % i
        a.set(key, entry_hash(key, b"v"))
        b.set(key, entry_hash(key, b"v"))
    changed = sorted(rng.sample([b"key-%d" % i for i in range(20_000)], 10))
    for key in changed:
        b.set(key, entry_hash(key, b"w"))
    walk = DiffWalk(a)
    while (ask := walk.request()) is not None:
        walk.receive(b.hashes(*ask))
    assert diff_entries(a.entries(walk.segments), b.entries(walk.segments)) == changed
    assert len(walk.segments) <= 10
    assert walk.hashes_exchanged <= 1 + 16 + 10 * 16 + 10 * 16  # far below 20,000 keys


def test_requests_are_bounded_and_answers_must_match_them():
    a, b = MerkleTree(branching=16, depth=3), MerkleTree(branching=16, depth=3)
    for i in range(5000):
        a.set(b"k%d" % i, entry_hash(b"k%d" % i, b"v"))  # b is empty: everything differs
    walk = DiffWalk(a, max_nodes=100)
    sizes = []
    while (ask := walk.request()) is not None:
        sizes.append(len(ask[1]))
        walk.receive(b.hashes(*ask))
    assert max(sizes) <= 100 and len(walk.segments) == len({a.segment_of(b"k%d" % i) for i in range(5000)})
    walk = DiffWalk(a)
    walk.request()
    with pytest.raises(ValueError):
        walk.receive([1, 2])
    with pytest.raises(ValueError):
        a.hashes(4, [0])
    with pytest.raises(ValueError):
        a.hashes(1, [16])
    with pytest.raises(ValueError):
        MerkleTree(branching=1)
