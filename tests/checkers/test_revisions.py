"""Global revision checks: each catches a history that per-key linearizability accepts."""
from __future__ import annotations

from clusters.checkers.history import Op
from clusters.checkers.linearizability import LINEARIZABLE, check
from clusters.checkers.revisions import (
    check_realtime_order,
    check_revisions,
    check_unique_write_revisions,
    check_value_revisions,
)


def write(id, key, value, invoke, complete, revision):
    return Op(id, id, "write", key, value, invoke=invoke, complete=complete, result={"revision": revision})


def read(id, key, value, invoke, complete, revision, mod_revision):
    return Op(id, id, "read", key, value, invoke=invoke, complete=complete, result={"revision": revision, "mod_revision": mod_revision})


def test_a_clean_history_has_no_problems():
    ops = [
        write(0, "x", "a", 0, 1, 2),
        write(1, "y", "b", 2, 3, 3),
        read(2, "x", "a", 4, 5, 3, 2),
        read(3, "y", "b", 4.5, 6, 3, 3),
        write(4, "x", "c", 5.5, 7, 4),
    ]
    assert check_revisions(ops) == []


def test_two_writes_with_one_revision_are_reported():
    ops = [write(0, "x", "a", 0, 1, 2), write(1, "y", "b", 0, 1, 2)]
    assert check(ops).result == LINEARIZABLE
    (problem,) = check_unique_write_revisions(ops)
    assert "revision 2 was given to two writes" in problem


def test_one_value_seen_at_two_mod_revisions_is_reported():
    ops = [write(0, "x", "a", 0, 1, 2), read(1, "x", "a", 2, 3, 5, 4)]
    assert check(ops).result == LINEARIZABLE
    (problem,) = check_value_revisions(ops)
    assert "mod_revision 2" in problem and "but 4" in problem


def test_a_read_on_another_key_that_sees_an_older_store_is_reported():
    # Per key this is fine (x was never written); the store revision went from 7 back to 5.
    ops = [write(0, "y", "b", 0, 1, 7), Op(1, 1, "read", "x", None, invoke=2, complete=3, result={"revision": 5})]
    assert check(ops).result == LINEARIZABLE
    (problem,) = check_realtime_order(ops)
    assert "went backwards" in problem and "#1" in problem


def test_a_write_after_a_read_must_get_a_greater_revision():
    ops = [Op(0, 0, "read", "x", None, invoke=0, complete=1, result={"revision": 7}), write(1, "y", "b", 2, 3, 7)]
    assert len(check_realtime_order(ops)) == 1
    concurrent = [Op(0, 0, "read", "x", None, invoke=0, complete=3, result={"revision": 7}), write(1, "y", "b", 2, 3, 7)]
    assert check_realtime_order(concurrent) == []


def test_failed_and_unknown_operations_are_ignored():
    ops = [
        write(0, "x", "a", 0, 1, 9),
        Op(1, 1, "write", "x", "b", invoke=2, complete=3, outcome="fail", result={"revision": 3}),
        Op(2, 2, "write", "x", "c", invoke=2, complete=None, outcome="unknown"),
    ]
    assert check_revisions(ops) == []
