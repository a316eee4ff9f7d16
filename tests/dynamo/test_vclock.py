"""Vector clocks: order, merge, pruning, and the opaque context codec."""
import pytest
from hypothesis import given, strategies as st

from dynamo.vclock import PrunePolicy, VClock, compare, decode_context, encode_context

actors = st.sampled_from(["n1.a", "n2.b", "n3.c", "n4.d"])
clocks = st.dictionaries(actors, st.integers(1, 5)).map(VClock.of)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ({}, {}, "equal"),
        ({"x": 1}, {}, "after"),
        ({}, {"x": 1}, "before"),
        ({"x": 2, "y": 1}, {"x": 1, "y": 1}, "after"),
        ({"x": 1}, {"y": 1}, "concurrent"),
        ({"x": 2, "y": 1}, {"x": 1, "y": 2}, "concurrent"),
        ({"x": 3}, {"x": 3}, "equal"),
    ],
)
def test_compare_table(a, b, expected):
    assert compare(VClock.of(a), VClock.of(b)) == expected


@given(clocks, clocks, clocks)
def test_merge_is_the_least_upper_bound(a, b, c):
    m = a.merge(b)
    assert m.descends(a) and m.descends(b)
    assert m == b.merge(a) and a.merge(b, c) == a.merge(b).merge(c) and m.merge(m) == m
    if c.descends(a) and c.descends(b):
        assert c.descends(m)


@given(clocks, actors)
def test_increment_moves_strictly_forward(clock, actor):
    after = clock.increment(actor, now=1.0)
    assert compare(after, clock) == "after" and after.get(actor) == clock.get(actor) + 1


@given(clocks)
def test_context_roundtrip(clock):
    text = encode_context(clock)
    assert decode_context(text) == clock
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize("bad", ["!!!", "AA", "Ag", "AQEA", encode_context(VClock.of({"x": 1})) + "AA", "x" * 70000])
def test_bad_context_is_refused(bad):
    with pytest.raises(ValueError):
        decode_context(bad)


def test_empty_context_is_the_empty_clock():
    assert decode_context(None) == VClock() == decode_context("")
    assert decode_context(encode_context(VClock())) == VClock()


def test_prune_by_size_drops_oldest_and_keeps_named_actors():
    policy = PrunePolicy(small=3, big=4, young_s=10, old_s=1000)
    clock = VClock({f"a{i}": (1, float(i)) for i in range(8)})
    pruned = clock.prune(now=100.0, policy=policy, keep={"a0"})
    assert len(pruned) == 4  # over big: oldest dropped until big; then not old enough
    assert "a0" in pruned.actors() and "a7" in pruned.actors()
    assert [a for a in pruned.actors()] == ["a0", "a5", "a6", "a7"]


def test_prune_by_age_and_young_entries_are_kept():
    policy = PrunePolicy(small=2, big=10, young_s=20, old_s=100)
    clock = VClock({"old1": (1, 0.0), "old2": (1, 1.0), "mid": (1, 150.0), "new": (1, 195.0)})
    assert clock.prune(now=200.0, policy=policy).actors() == ["mid", "new"]
    # everything young: nothing goes even over `small`
    assert len(clock.prune(now=10.0, policy=policy)) == 4


def test_short_clock_is_never_pruned():
    clock = VClock({"a": (1, 0.0)})
    assert clock.prune(now=1e9, policy=PrunePolicy()) is clock
