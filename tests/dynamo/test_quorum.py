"""Quorum accounting as tables: who is asked, when a request can answer."""
import pytest

from dynamo.quorum import ReadTally, Target, WriteTally, next_fallback, plan_targets
from dynamo.vclock import VClock
from dynamo.versions import new_write

P, F = ["a", "b", "c"], ["d", "e"]


@pytest.mark.parametrize(
    "up, sloppy, expected",
    [
        ({"a", "b", "c", "d", "e"}, True, [("a", None), ("b", None), ("c", None)]),
        ({"a", "c", "d", "e"}, True, [("a", None), ("c", None), ("d", "b")]),
        ({"c", "e"}, True, [("c", None), ("e", "a")]),
        ({"a", "c", "d", "e"}, False, [("a", None), ("c", None)]),
        (set(), True, []),
        ({"d", "e"}, True, [("d", "a"), ("e", "b")]),
    ],
)
def test_plan_targets(up, sloppy, expected):
    assert plan_targets(P, F, up=up, sloppy=sloppy) == [Target(n, h) for n, h in expected]


def test_next_fallback_skips_used_and_down():
    assert next_fallback(F, used={"d"}, up={"d", "e"}) == "e"
    assert next_fallback(F, used={"d"}, up={"d"}) is None


@pytest.mark.parametrize(
    "w, planned, events, done, ok",
    [
        (2, 3, "a+ b+", True, True),
        (2, 3, "a+ b-", False, False),
        (2, 3, "a+ b- c-", True, False),
        (2, 3, "a- b- ", True, False),
        (3, 3, "a+ b+", False, False),
        (1, 3, "a+", True, True),
        (2, 2, "a+ b- R d+", True, True),  # R: a fallback replaced b
        (2, 3, "a+ a+", False, False),  # a duplicate ack counts once
        (2, 1, "a+", True, False),  # too few targets: fails at once
    ],
)
def test_write_tally(w, planned, events, done, ok):
    tally = WriteTally(w, planned)
    for event in events.split():
        if event == "R":
            tally.add_replacement()
        elif event.endswith("+"):
            tally.ack(event[:-1])
        else:
            tally.fail(event[:-1])
    assert (tally.done, tally.ok) == (done, ok)


def test_read_tally_reconciles_and_names_stale_replicas():
    v1 = new_write(None, VClock(), b"v1", "n1.x", 1.0)
    v2 = new_write(v1, v1.clock, b"v2", "n1.x", 2.0)
    tally = ReadTally(r=2, planned=3)
    tally.reply("a", v2)
    assert not tally.done
    tally.reply("b", v1)
    assert tally.done and tally.ok
    tally.reply("c", None)
    assert tally.reconciled().live_values == [b"v2"]
    assert tally.repairs() == ["b", "c"]
    assert tally.repairs(exclude={"c"}) == ["b"]


def test_read_tally_fails_when_r_cannot_be_reached():
    tally = ReadTally(r=2, planned=2)
    tally.reply("a", None)
    tally.fail("b")
    assert tally.done and not tally.ok


def test_a_handover_read_waits_for_every_replica_not_just_r():
    """During a ring change the old owner's copy must not lose the race to two empty new
    owners: with wait_all the read is done only when every asked replica answered."""
    from dynamo.quorum import ReadTally
    from dynamo.vclock import VClock
    from dynamo.versions import new_write

    tally = ReadTally(2, 3, wait_all=True)
    tally.reply("new1", None)
    tally.reply("new2", None)
    assert tally.ok and not tally.done  # R met, but the old owner has not answered yet
    tally.reply("old", new_write(None, VClock(), b"v", "old.1", 1.0))
    assert tally.done and tally.reconciled().live_values == [b"v"]
    quick = ReadTally(2, 3)
    quick.reply("new1", None)
    quick.reply("new2", None)
    assert quick.done and quick.reconciled() is None  # what wait_all prevents


def test_read_tally_decodes_equal_copies_once_and_repairs_only_the_stale_one():
    from dynamo.versions import encode_object

    v1 = new_write(None, VClock(), b"v1", "n1.x", 1.0)
    v2 = new_write(v1, v1.clock, b"v2", "n1.x", 2.0)
    tally = ReadTally(r=2, planned=3)
    tally.reply_encoded("a", encode_object(v2))
    tally.reply_encoded("b", encode_object(v2))
    assert tally.done and tally.replies["a"] is tally.replies["b"]  # one decode for equal bytes
    assert tally.reconciled().live_values == [b"v2"] and tally.repairs() == []
    tally.reply_encoded("c", encode_object(v1))
    assert tally.repairs() == ["c"]  # reconciled again after the new reply
    tally.reply_encoded("d", None)
    assert tally.repairs() == ["c", "d"]
