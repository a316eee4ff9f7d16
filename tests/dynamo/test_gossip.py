"""Gossip state (dynamo/gossip.py): merges commute, views converge in a few rounds,
silence makes a member suspect then down, and a wrongly suspected member refutes."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from dynamo.gossip import GossipPolicy, GossipState, Heard, merge_heard

heard = st.builds(Heard, st.integers(0, 3), st.integers(0, 5), st.booleans())


def members(ids):
    return [{"id": n, "client_url": f"http://{n}", "peer_address": f"{n}:1"} for n in ids]


@given(heard, heard, heard)
def test_merging_heard_entries_is_a_semilattice(a, b, c):
    assert merge_heard(a, b) == merge_heard(b, a)
    assert merge_heard(merge_heard(a, b), c) == merge_heard(a, merge_heard(b, c))
    assert merge_heard(a, a) == a


def cluster(size, seed, policy=GossipPolicy()):
    ids = [f"n{i}" for i in range(size)]
    return {n: GossipState(n, members(ids), now=0.0, incarnation=1, policy=policy) for n in ids}, random.Random(seed)


def round_(states, rng, now, down=()):
    for node, state in states.items():
        if node in down:
            continue
        state.tick(now)
        state.mark_suspects(now)
        for peer in state.pick_peers(rng):
            if peer in down or peer not in states:  # "new" is named but not running
                continue
            states[peer].merge(state.digest(), now)  # push
            state.merge(states[peer].digest(), now)  # pull


@settings(max_examples=20, deadline=None)
@given(size=st.integers(3, 20), seed=st.integers(0, 10_000))
def test_a_membership_change_at_one_node_reaches_all_in_a_few_rounds(size, seed):
    states, rng = cluster(size, seed)
    ids = sorted(states)
    states[ids[0]].change_members(members(ids + ["new"]), now=0.0)
    rounds = 0
    while not all("new" in s.members for s in states.values()):
        rounds += 1
        round_(states, rng, now=rounds * 0.5)
        assert rounds <= 12, "views did not converge"
    for s in states.values():
        s._check()
        assert s.ring_version == 1


def test_a_silent_member_becomes_suspect_then_down_and_comes_back_alive():
    states, rng = cluster(5, 1)
    now = 0.0
    for _ in range(4):
        now += 0.5
        round_(states, rng, now)
    assert {s.status("n4", now) for s in states.values()} == {"alive"}
    statuses = []
    for _ in range(20):  # n4 paused for 10 s
        now += 0.5
        round_(states, rng, now, down={"n4"})
        statuses.append(states["n0"].status("n4", now))
    assert "suspect" in statuses and statuses[-1] == "down"
    before = states["n4"].incarnation
    for _ in range(6):
        now += 0.5
        round_(states, rng, now)
    assert {s.status("n4", now) for n, s in states.items() if n != "n4"} == {"alive"}
    assert states["n4"].incarnation > before and states["n4"].refutations >= 1


def test_a_wrong_suspicion_is_refuted_by_a_new_incarnation():
    states, rng = cluster(3, 2)
    a, b = states["n0"], states["n1"]
    b.heard["n0"] = Heard(a.incarnation, 0, True)  # b wrongly suspects a
    assert b.status("n0", 0.1) == "suspect"
    a.merge(b.digest(), now=0.2)
    assert a.incarnation == 2 and a.refutations == 1
    a.tick(0.3)
    b.merge(a.digest(), now=0.3)
    assert b.status("n0", 0.3) == "alive"


def test_the_cluster_file_never_overrides_and_bad_digests_change_nothing():
    states, _ = cluster(3, 3)
    a = states["n0"]
    other = GossipState("x", members(["x", "y"]), now=0.0, incarnation=1)
    assert a.merge(other.digest(), now=1.0) is False and set(a.members) == {"n0", "n1", "n2"}
    before = a.digest()
    with pytest.raises((KeyError, ValueError, TypeError)):
        a.merge({"ring": {"version": 9, "members": [{"id": "z"}]}, "nodes": {}}, now=1.0)
    assert a.digest() == before
    with pytest.raises(ValueError):
        GossipPolicy(suspect_after_s=5, down_after_s=2)


def test_rebalanced_versions_spread_by_max_and_a_departed_member_keeps_its_entry():
    a = GossipState("n1", members(["n1", "n2", "n3"]), now=0.0, incarnation=1)
    b = GossipState("n2", members(["n1", "n2", "n3"]), now=0.0, incarnation=1)
    c = GossipState("n3", members(["n1", "n2", "n3"]), now=0.0, incarnation=1)
    a.change_members(members(["n1", "n2"]), now=1.0)  # n3 removed: version 1
    b.merge(a.digest(), now=1.0)
    c.merge(a.digest(), now=1.0)  # n3 hears it was removed
    assert a.waiting_for(["n1", "n2", "n3"]) == ["n1", "n2", "n3"]
    c.set_rebalanced(1)  # the leaving node sent everything away
    a.set_rebalanced(1)
    b.merge(c.digest(), now=2.0)  # n3 is no member any more, yet its progress counts
    b.merge(a.digest(), now=2.0)
    assert b.waiting_for(["n1", "n2", "n3"]) == ["n2"]
    b.set_rebalanced(1)
    assert b.waiting_for(["n1", "n2", "n3"]) == []
    a.merge({**b.digest(), "rebalanced": {"n2": 0, "n3": 0}}, now=3.0)  # an old report never lowers it
    a.merge(b.digest(), now=3.0)
    assert a.waiting_for(["n1", "n2", "n3"]) == []
    for g in (a, b, c):
        g._check()
    with pytest.raises(ValueError):
        a.merge({**b.digest(), "rebalanced": ["n2"]}, now=4.0)
