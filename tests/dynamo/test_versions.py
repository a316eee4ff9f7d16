"""Sibling reconciliation with dots: the table of the module docstring, then properties."""
import random

from hypothesis import given, settings, strategies as st

from dynamo.vclock import PrunePolicy, VClock
from dynamo.versions import decode_object, encode_object, merge, new_write


def test_blind_writes_become_siblings_and_a_context_write_resolves_them():
    a = new_write(None, VClock(), b"a", "n1.x", 1.0)
    b = new_write(None, VClock(), b"b", "n2.y", 2.0)
    both = merge(a, b)
    assert both.live_values == [b"a", b"b"]
    c = new_write(both, both.clock, b"c", "n1.x", 3.0)
    assert c.live_values == [b"c"]
    # the stale replica b merging back cannot revive "b"
    assert merge(c, b).live_values == [b"c"] and merge(b, c).live_values == [b"c"]


def test_delete_then_causal_recreate_leaves_no_tombstone():
    v1 = new_write(None, VClock(), b"v1", "n1.x", 1.0)
    dead = new_write(v1, v1.clock, None, "n1.x", 2.0)
    assert dead.is_deleted and dead.live_values == []
    again = new_write(dead, dead.clock, b"v2", "n2.y", 3.0)
    assert again.live_values == [b"v2"] and len(again.siblings) == 1


def test_delete_racing_a_write_keeps_the_write():
    v1 = new_write(None, VClock(), b"v1", "n1.x", 1.0)
    dead = new_write(v1, v1.clock, None, "n1.x", 2.0)
    racing = new_write(v1, v1.clock, b"v2", "n2.y", 2.0)
    merged = merge(dead, racing)
    assert merged.live_values == [b"v2"]
    assert sum(s.is_tombstone for s in merged.siblings) == 1


def test_lww_keeps_one_sibling_by_timestamp():
    a = new_write(None, VClock(), b"a", "n1.x", 5.0, lww=True)
    b = new_write(None, VClock(), b"b", "n2.y", 4.0, lww=True)
    assert merge(a, b, lww=True).live_values == [b"a"] == merge(b, a, lww=True).live_values


def test_write_without_context_at_same_replica_is_a_sibling():
    obj = new_write(None, VClock(), b"a", "n1.x", 1.0)
    obj = new_write(obj, VClock(), b"b", "n1.x", 2.0)
    assert obj.live_values == [b"a", b"b"]
    obj._check()


def test_prune_never_drops_a_live_siblings_actor():
    policy = PrunePolicy(small=2, big=2, young_s=0, old_s=1)
    obj = None
    for i in range(10):
        obj = new_write(obj, VClock() if i == 9 else (obj.clock if obj else VClock()), b"v%d" % i, f"a{i}", float(i), prune=policy)
        obj._check()
    assert len(obj.clock) <= 3


# --- properties: random histories of writers and replicas ---------------------------------

ops = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans(), st.booleans()), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 2**32))
def test_merge_is_a_semilattice_and_siblings_stay_bounded(script, seed):
    """Three replicas, three writers doing read-modify-write with the context of their last
    read (or blind). Checks: merge commutative/associative/idempotent; no write acked by a
    replica is lost unless a context covered it; siblings <= writers + 1."""
    rng = random.Random(seed)
    replicas = [None, None, None]
    contexts = [VClock(), VClock(), VClock()]
    superseded: set[bytes] = set()
    seen_by = [set(), set(), set()]
    written = []
    for step, (writer, replica, use_context, sync) in enumerate(script):
        value = b"w%d" % step
        context = contexts[writer] if use_context else VClock()
        if use_context:
            superseded |= seen_by[writer]
        obj = new_write(replicas[replica], context, value, f"r{replica}.e", float(step))
        obj._check()
        replicas[replica] = obj
        written.append(value)
        if sync:
            other = rng.randrange(3)
            replicas[other] = merge(replicas[other], obj)
        # the writer reads its replica
        if replicas[replica] is not None:
            contexts[writer] = replicas[replica].clock
            seen_by[writer] = set(replicas[replica].live_values)
    a, b, c = replicas
    assert merge(a, b) == merge(b, a) or merge(a, b).same_as(merge(b, a))
    left, right = merge(merge(a, b), c), merge(a, merge(b, c))
    assert left.same_as(right)
    assert left.same_as(merge(left, left))
    final = set(left.live_values)
    assert final <= set(written)
    assert set(written) - superseded <= final, "a write nobody saw was lost"
    assert len(left.siblings) <= len(script)


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=20)), max_size=10))
def test_object_codec_roundtrip(values):
    obj = None
    for i, (tomb, value) in enumerate(values):
        obj = new_write(obj, VClock(), None if tomb else value, f"a{i % 3}.é", i + 0.5)
    if obj is None:
        return
    back = decode_object(encode_object(obj))
    assert back.same_as(obj) and back.siblings == obj.siblings


async def test_pruning_never_lets_a_replica_reuse_a_dot():
    """A replica whose own sibling was superseded elsewhere must keep its clock entry when
    it prunes, or its next write would get the same dot and be taken as already seen."""
    from engines import open_engine
    from dynamo.node import Replica

    policy = PrunePolicy(small=1, big=1, young_s=0, old_s=0)
    a = Replica("A", open_engine("memory"), prune=policy)
    b = Replica("B", open_engine("memory"))  # B keeps every entry
    first = await a.coordinate(b"k", b"a1", VClock(), hint_for=None, now=1.0)
    await b.store(b"k", first, hint_for=None, now=1.0)
    superseding = await b.coordinate(b"k", b"b1", first.clock, hint_for=None, now=2.0)
    await a.store(b"k", superseding, hint_for=None, now=3.0)
    second = await a.coordinate(b"k", b"a2", VClock(), hint_for=None, now=4.0)
    assert all(s.dot != first.siblings[0].dot for s in second.siblings if s.value == b"a2")
    assert b"a2" in merge(b.fetch(b"k"), second).live_values


def test_object_codec_writes_the_documented_bytes():
    # b"DV" 0x01, 2 actors (len, utf-8, counter, float64) in sorted order, 2 siblings
    # (actor index, counter, float64 timestamp, flag, value length, value); a counter of
    # 300 takes two varint bytes (0xAC 0x02).
    from dynamo.versions import Dot, Sibling, VersionedObject
    import struct

    obj = VersionedObject(
        VClock({"b.2": (300, 2.5), "a.1": (1, 1.5)}),
        (Sibling(Dot("a.1", 1), b"x", 1.25), Sibling(Dot("b.2", 300), None, 2.5)),
    )
    f64 = lambda v: struct.pack(">d", v)  # noqa: E731
    expected = (
        b"DV\x01" + b"\x02"
        + b"\x03a.1" + b"\x01" + f64(1.5)
        + b"\x03b.2" + b"\xac\x02" + f64(2.5)
        + b"\x02"
        + b"\x00" + b"\x01" + f64(1.25) + b"\x01" + b"\x01x"
        + b"\x01" + b"\xac\x02" + f64(2.5) + b"\x00"
    )  # fmt: skip
    assert encode_object(obj) == expected
    back = decode_object(expected)
    assert back.clock.items() == obj.clock.items() and back.siblings == obj.siblings


def test_a_malformed_object_is_a_value_error():
    import pytest

    raw = encode_object(new_write(None, VClock(), b"value", "n1.x", 1.0))
    for broken in (raw[:-1], raw[: len(raw) // 2], raw[:4], raw + b"\x00", b"XX" + raw[2:]):
        with pytest.raises(ValueError):
            decode_object(broken)
