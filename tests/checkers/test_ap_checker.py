"""The ap checker against small histories whose verdict a person can work out by hand."""
from __future__ import annotations

import itertools

from clusters.checkers import ap_checker
from clusters.checkers.history import Op

_ids = itertools.count()


def read(client, key, siblings, at, outcome="ok"):
    return Op(next(_ids), client, "read", key, siblings[0] if siblings else None, invoke=at, complete=at + 0.5,
              outcome=outcome, result={"siblings": list(siblings)} if outcome == "ok" else None)  # fmt: skip


def write(client, key, value, at, outcome="ok", context_of=None):
    return Op(next(_ids), client, "write", key, value, invoke=at, complete=at + 0.5 if outcome != "unknown" else None,
              outcome=outcome, result={"read": context_of.id} if context_of is not None else None)  # fmt: skip


def scenario():
    """c1: read [] -> write a; c2: blind write b; c1: read [a, b] -> write c (resolves both)."""
    r1 = read(1, "k", [], 0)
    a = write(1, "k", "a", 1, context_of=r1)
    b = write(2, "k", "b", 1.2)
    r2 = read(1, "k", ["a", "b"], 2)
    c = write(1, "k", "c", 3, context_of=r2)
    return [r1, a, b, r2, c]


def test_a_resolved_history_is_valid():
    verdict = ap_checker.check(scenario(), {"k": ["c"]}, {"k": {"n1": ["c"], "n2": ["c"], "n3": ["c"]}})
    assert verdict.valid, str(verdict)
    assert (verdict.acknowledged_writes, verdict.max_siblings_read, verdict.max_siblings_final) == (3, 2, 1)


def test_a_replaced_sibling_that_comes_back_is_a_resurrection():
    verdict = ap_checker.check(scenario(), {"k": ["a", "c"]})
    assert not verdict.valid
    assert verdict.resurrected == 1 and verdict.lost == 0
    assert "'a'" in verdict.resurrected_examples[0]


def test_losing_the_last_write_loses_what_it_replaced_too():
    # 'b' survived, but 'c' (and 'a', replaced only by 'c') are gone.
    verdict = ap_checker.check(scenario(), {"k": ["b"]})
    assert verdict.lost == 2 and not verdict.valid


def test_concurrent_writes_must_both_survive_as_siblings():
    ops = [write(1, "k", "x", 0), write(2, "k", "y", 0.1)]
    assert ap_checker.check(ops, {"k": ["x", "y"]}).valid
    only_one = ap_checker.check(ops, {"k": ["y"]})
    assert only_one.lost == 1 and not only_one.valid


def test_lww_counts_lost_writes_without_failing():
    ops = [write(1, "k", "x", 0), write(2, "k", "y", 0.1)]
    verdict = ap_checker.check(ops, {"k": ["y"]}, lww=True)
    assert verdict.valid and verdict.lost == 1
    assert "lww" in str(verdict)


def test_failed_and_unknown_writes_may_vanish_or_appear():
    ops = [write(1, "k", "x", 0, outcome="fail"), write(2, "k", "y", 0.1, outcome="unknown"), write(3, "k", "z", 0.2)]
    assert ap_checker.check(ops, {"k": ["z"]}).valid
    assert ap_checker.check(ops, {"k": ["x", "y", "z"]}).valid


def test_a_replacement_that_failed_does_not_excuse_a_loss():
    r = read(1, "k", ["x"], 1)
    ops = [write(1, "k", "x", 0), r, write(1, "k", "y", 2, outcome="fail", context_of=r)]
    assert ap_checker.check(ops, {"k": ["y"]}).valid  # y was applied after all: it replaced x
    assert ap_checker.check(ops, {"k": []}).lost == 1  # neither x nor y: x is lost


def test_values_never_written_are_phantoms():
    ops = [write(1, "k", "x", 0), read(2, "k", ["ghost"], 1)]
    verdict = ap_checker.check(ops, {"k": ["x", "boo"]})
    assert verdict.phantoms == 2 and not verdict.valid
    assert ap_checker.check(ops[:1] + [read(2, "k", ["old"], 1)], {"k": ["x"]}, initial={"k": ["old"]}).valid


def test_replicas_that_disagree_are_divergent():
    ops = [write(1, "k", "x", 0)]
    verdict = ap_checker.check(ops, {"k": ["x"]}, {"k": {"n1": ["x"], "n2": None, "n3": ["x"]}})
    assert verdict.divergent == 1 and not verdict.valid
    assert "n2=None" in verdict.divergent_examples[0]


def test_a_written_key_without_a_final_read_is_reported():
    verdict = ap_checker.check([write(1, "k", "x", 0)], {})
    assert verdict.missing_final == ["k"] and not verdict.valid


def test_context_of_a_read_on_another_key_replaces_nothing():
    r = read(1, "other", ["x"], 1)
    ops = [write(1, "k", "x", 0), write(1, "other", "x", 0.5), r, write(1, "k", "y", 2, context_of=r)]
    verdict = ap_checker.check(ops, {"k": ["y"], "other": ["x"]})
    assert verdict.lost == 1  # 'x' on k was never seen by y's context
