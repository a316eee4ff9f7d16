"""The linearizability checker on histories whose answer is known by construction.

Hand-written histories name the classic anomalies; hypothesis builds histories from a
sequential run with random real-time overlap (always linearizable), corrupts them in ways
that are always illegal, and compares the search with brute force on small random ones.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusters.checkers.history import Op
from clusters.checkers.linearizability import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    UNKNOWN,
    check,
    step,
)


def history(*rows: tuple) -> list[Op]:
    """Rows: (client, op, value, invoke, complete[, outcome[, expected[, result]]]) on key "k".
    `expected` is only given for a cas; complete None means it never returned."""
    ops = []
    for index, row in enumerate(rows):
        client, op, value, invoke, complete, *rest = row
        outcome = rest[0] if rest else "ok"
        expected = rest[1] if len(rest) > 1 else None
        result = rest[2] if len(rest) > 2 else None
        ops.append(Op(index, client, op, "k", value, expected, invoke, complete, outcome, result))
    return ops


def verdict_of(ops: list[Op], **options) -> str:
    return check(ops, **options).result


# --- known linearizable ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ops",
    [
        ("sequential write then read", history((1, "write", "a", 0, 1), (2, "read", "a", 2, 3))),
        ("read of absent key", history((1, "read", None, 0, 1), (1, "write", "a", 2, 3))),
        (
            "a read overlapping a write may see the old value",
            history((1, "write", "a", 0, 1), (1, "write", "b", 2, 5), (2, "read", "a", 3, 4)),
        ),
        (
            "a read overlapping a write may see the new value",
            history((1, "write", "a", 0, 1), (1, "write", "b", 2, 5), (2, "read", "b", 3, 4)),
        ),
        (
            "overlapping writes may take effect in either order",
            history((1, "write", "a", 0, 4), (2, "write", "b", 1, 3), (3, "read", "a", 5, 6)),
        ),
        (
            "a write that timed out may take effect long after",
            history(
                (1, "write", "a", 0, 1),
                (2, "write", "b", 2, 3, "unknown"),
                (3, "read", "a", 10, 11),
                (3, "read", "b", 20, 21),
            ),
        ),
        (
            "a write that timed out may never take effect",
            history((1, "write", "a", 0, 1), (2, "write", "b", 2, None, "unknown"), (3, "read", "a", 10, 11)),
        ),
        (
            "a failed write did not happen",
            history((1, "write", "a", 0, 1), (2, "write", "b", 2, 3, "fail"), (3, "read", "a", 4, 5)),
        ),
        (
            "cas chain",
            history(
                (1, "cas", "a", 0, 1, "ok", None),
                (2, "cas", "b", 2, 3, "ok", "a"),
                (1, "cas", "c", 4, 5, "ok", "a", {"succeeded": False}),
                (3, "read", "b", 6, 7),
            ),
        ),
        (
            "two concurrent cas from one value: one wins, the other sees the winner",
            history(
                (1, "write", "a", 0, 1),
                (2, "cas", "b", 2, 5, "ok", "a"),
                (3, "cas", "c", 3, 4, "ok", "a", {"succeeded": False}),
            ),
        ),
        (
            "delete then absent",
            history(
                (1, "write", "a", 0, 1),
                (2, "delete", None, 2, 3, "ok", None, {"deleted": 1}),
                (1, "read", None, 4, 5),
                (2, "delete", None, 6, 7, "ok", None, {"deleted": 0}),
            ),
        ),
        (
            "operations touching in time count as concurrent",
            history((1, "write", "a", 0, 1), (2, "write", "b", 1, 2), (3, "read", "a", 2, 3)),
        ),
    ],
)
def test_linearizable_histories_are_accepted(name, ops):
    verdict = check(ops)
    assert verdict.result == LINEARIZABLE, f"{name}:\n{verdict}"
    assert verdict.valid is True and verdict.explanations == []


# --- known wrong ------------------------------------------------------------------------------


def test_stale_read_after_a_completed_write_is_rejected_and_explained():
    ops = history((1, "write", "a", 0, 1), (1, "write", "b", 2, 3), (2, "read", "a", 4, 5))
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE and verdict.valid is False
    (explanation,) = verdict.explanations
    assert explanation.key == "k"
    assert explanation.op.id == 2
    assert explanation.states == ("b",)
    assert [op.id for op in explanation.linearized] == [0, 1]
    assert "read returned 'a'" in str(verdict)


def test_lost_write_is_rejected():
    ops = history((1, "write", "a", 0, 1), (2, "read", None, 2, 3))
    assert verdict_of(ops) == NOT_LINEARIZABLE


def test_lost_write_behind_a_later_acknowledged_one_is_rejected():
    ops = history(
        (1, "write", "a", 0, 1), (2, "write", "b", 0.5, 1.5), (3, "read", "b", 2, 3), (3, "read", "a", 4, 5)
    )
    assert verdict_of(ops) == NOT_LINEARIZABLE


def test_cas_succeeding_twice_from_the_same_value_is_rejected():
    ops = history(
        (1, "write", "a", 0, 1),
        (2, "cas", "b", 2, 5, "ok", "a"),
        (3, "cas", "c", 3, 6, "ok", "a"),
    )
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE
    assert verdict.explanations[0].op.op == "cas"


def test_cas_that_says_the_compare_failed_while_it_held_is_rejected():
    ops = history((1, "write", "a", 0, 1), (2, "cas", "b", 2, 3, "ok", "a", {"succeeded": False}))
    assert verdict_of(ops) == NOT_LINEARIZABLE


def test_read_of_a_value_never_written_is_rejected_without_a_search():
    ops = history((1, "write", "a", 0, 1), (2, "read", "zzz", 2, 3))
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE
    assert verdict.keys["k"].states == 0
    assert "no operation wrote" in verdict.explanations[0].reason


def test_read_of_a_write_that_failed_names_the_write():
    ops = history((1, "write", "a", 0, 1), (2, "write", "b", 2, 3, "fail"), (3, "read", "b", 4, 5))
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE
    assert "failed" in verdict.explanations[0].reason and "#1" in verdict.explanations[0].reason


def test_two_readers_that_see_two_writes_in_opposite_orders_are_rejected():
    ops = history(
        (1, "write", "a", 0, 10),
        (2, "write", "b", 0, 10),
        (3, "read", "a", 1, 2),
        (4, "read", "b", 3, 4),
        (3, "read", "a", 5, 6),
    )
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE
    assert verdict.keys["k"].states > 0  # found by the search, not the pre-check


def test_delete_that_claims_to_delete_an_absent_key_is_rejected():
    ops = history((1, "delete", None, 0, 1, "ok", None, {"deleted": 1}))
    assert verdict_of(ops) == NOT_LINEARIZABLE


def test_a_read_before_the_write_it_saw_was_invoked_is_rejected():
    ops = history((1, "read", "a", 0, 1), (2, "write", "a", 2, 3))
    assert verdict_of(ops) == NOT_LINEARIZABLE


def test_keys_are_independent_registers():
    ops = [
        Op(0, 1, "write", "x", "a", invoke=0, complete=1),
        Op(1, 1, "write", "y", "b", invoke=2, complete=3),
        Op(2, 2, "read", "x", "a", invoke=4, complete=5),
        Op(3, 2, "read", "y", "b", invoke=4, complete=5),
    ]
    verdict = check(ops)
    assert verdict.result == LINEARIZABLE and set(verdict.keys) == {"x", "y"}
    bad = ops + [Op(4, 3, "read", "y", None, invoke=6, complete=7)]
    verdict = check(bad)
    assert verdict.result == NOT_LINEARIZABLE
    assert [e.key for e in verdict.explanations] == ["y"]
    assert verdict.keys["x"].result == LINEARIZABLE


def test_initial_values_are_honoured():
    ops = [Op(0, 1, "read", "k", "seed", invoke=0, complete=1)]
    assert check(ops, initial={"k": "seed"}).result == LINEARIZABLE
    assert check(ops).result == NOT_LINEARIZABLE


def test_the_search_gives_up_with_unknown_when_over_its_bound():
    # Twelve overlapping writes and a read of the first: many orders to try.
    rows = [(n, "write", f"v{n}", 0, 10) for n in range(12)] + [(99, "read", "v0", 11, 12), (99, "read", "v1", 13, 14)]
    ops = history(*rows) + [Op(100, 98, "read", "k", "v0", invoke=15, complete=16)]
    assert check(ops, max_states=50).result == UNKNOWN
    assert "gave up" in str(check(ops, max_states=50))
    assert check(ops).result == NOT_LINEARIZABLE


def test_step_is_the_register():
    read = Op(0, 1, "read", "k", "a", invoke=0, complete=1)
    assert step("a", read) == (True, "a") and step("b", read)[0] is False
    cas = Op(1, 1, "cas", "k", "b", "a", invoke=0, complete=1)
    assert step("a", cas) == (True, "b") and step(None, cas)[0] is False
    unknown_cas = Op(2, 1, "cas", "k", "b", "a", invoke=0, complete=None, outcome="unknown")
    assert step("a", unknown_cas) == (True, "b")


# --- generated ------------------------------------------------------------------------------


@st.composite
def sequential_runs(draw, max_ops: int = 20):
    """A sequential run of the register, each operation at instant i, then stretched into
    an interval around i (so operations overlap at random). Returns (ops, log) where `log`
    records which operations took effect."""
    count = draw(st.integers(1, max_ops))
    spread = draw(st.floats(0.0, 4.0))
    state: str | None = None
    written: list[str | None] = [None]
    ops: list[Op] = []
    for instant in range(count):
        kind = draw(st.sampled_from(["read", "read", "write", "cas", "delete", "failed write", "unknown write lost"]))
        invoke = instant - draw(st.floats(0.0, spread)) if spread else float(instant)
        complete = instant + draw(st.floats(0.0, spread)) if spread else float(instant)
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "unknown"]))
        end = None if outcome == "unknown" and draw(st.booleans()) else complete
        index = len(ops)
        value = f"v{index}"
        client = index % 5
        if kind == "read":
            ops.append(Op(index, client, "read", "k", state if outcome == "ok" else None, None, invoke, end, outcome))
        elif kind == "write":
            ops.append(Op(index, client, "write", "k", value, None, invoke, end, outcome, {"revision": index}))
            state = value
            written.append(value)
        elif kind == "cas":
            expected = state if draw(st.booleans()) else draw(st.sampled_from(written))
            if expected == state:
                ops.append(Op(index, client, "cas", "k", value, expected, invoke, end, outcome))
                state = value
                written.append(value)
            elif outcome == "ok":
                ops.append(Op(index, client, "cas", "k", value, expected, invoke, end, "ok", {"succeeded": False}))
            else:
                ops.append(Op(index, client, "cas", "k", value, expected, invoke, complete, "fail", {"status": 412}))
        elif kind == "delete":
            result = {"deleted": int(state is not None)} if outcome == "ok" else None
            ops.append(Op(index, client, "delete", "k", None, None, invoke, end, outcome, result))
            state = None
        elif kind == "failed write":
            ops.append(Op(index, client, "write", "k", value, None, invoke, complete, "fail", {"status": 503}))
        else:  # a write that timed out and never took effect: nobody can read its value
            ops.append(Op(index, client, "write", "k", value, None, invoke, end, "unknown"))
    return ops


generated = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@generated
@given(sequential_runs())
def test_histories_of_a_sequential_run_with_overlap_are_always_accepted(ops):
    verdict = check(ops)
    assert verdict.result == LINEARIZABLE, "\n".join([str(verdict)] + [op.to_json() for op in ops])


@generated
@given(sequential_runs(), st.data())
def test_a_read_of_a_value_never_written_is_always_rejected(ops, data):
    reads = [op for op in ops if op.op == "read" and op.outcome == "ok"]
    if not reads:
        return
    target = data.draw(st.sampled_from(reads))
    corrupted = [op if op is not target else Op(**{**op.__dict__, "value": "never-written"}) for op in ops]
    verdict = check(corrupted)
    assert verdict.result == NOT_LINEARIZABLE
    assert verdict.explanations[0].op.id == target.id


@generated
@given(sequential_runs(), st.data())
def test_a_read_of_a_write_invoked_after_it_returned_is_always_rejected(ops, data):
    """The search (not the pre-check) must find this: the value was written, just later."""
    pairs = [
        (read, write)
        for read in ops
        if read.op == "read" and read.outcome == "ok"
        for write in ops
        if write.op in ("write", "cas") and write.outcome != "fail" and write.invoke > read.complete
    ]
    if not pairs:
        return
    read, write = data.draw(st.sampled_from(pairs))
    corrupted = [op if op is not read else Op(**{**op.__dict__, "value": write.value}) for op in ops]
    assert check(corrupted).result == NOT_LINEARIZABLE


# --- against brute force on small random histories ---------------------------------------------


def brute_force(ops: list[Op], initial: str | None = None) -> bool:
    """Try every subset of the indeterminate operations and every order of the rest."""
    kept = [op for op in ops if op.outcome != "fail" and not (op.op == "read" and op.outcome != "ok")]
    certain = [op for op in kept if op.outcome == "ok"]
    maybe = [op for op in kept if op.outcome == "unknown"]
    for size in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, size):
            placed = certain + list(chosen)
            for order in itertools.permutations(placed):
                if _legal(order, initial):
                    return True
    return False


def _legal(order: tuple[Op, ...], initial: str | None) -> bool:
    state = initial
    for position, op in enumerate(order):
        # Real time: nothing placed after `op` may have completed before `op` was invoked.
        if any(later.outcome == "ok" and later.complete < op.invoke for later in order[position + 1:]):
            return False
        allowed, state = step(state, op)
        if not allowed:
            return False
    return True


@st.composite
def random_histories(draw, unique: bool = False):
    """Up to 6 operations at random times with random results. With `unique`, every write
    writes its own value, as workloads do (which lets the checker pin down when an
    indeterminate write must have happened)."""
    count = draw(st.integers(1, 6))
    ops = []
    pool = [f"w{index}" for index in range(count)] if unique else ["a", "b", "c"]
    seen = pool if unique else pool[:2]
    for index in range(count):
        kind = draw(st.sampled_from(["read", "write", "cas", "delete"]))
        invoke = draw(st.integers(0, 8))
        complete = invoke + draw(st.integers(0, 4))
        outcome = draw(st.sampled_from(["ok", "ok", "unknown", "fail"]))
        value = draw(st.sampled_from([None] + seen)) if kind == "read" else None
        if kind in ("write", "cas"):
            value = pool[index] if unique else draw(st.sampled_from(pool))
        expected = draw(st.sampled_from([None] + seen)) if kind == "cas" else None
        result = None
        if kind == "cas" and outcome == "ok" and draw(st.booleans()):
            result = {"succeeded": False}
        if kind == "delete" and outcome == "ok" and draw(st.booleans()):
            result = {"deleted": draw(st.integers(0, 1))}
        end = None if outcome == "unknown" and draw(st.booleans()) else float(complete)
        ops.append(Op(index, index, kind, "k", value, expected, float(invoke), end, outcome, result))
    return ops


@settings(max_examples=400, deadline=None)
@given(st.booleans().flatmap(lambda unique: random_histories(unique)))
def test_the_search_agrees_with_brute_force(ops):
    expected = LINEARIZABLE if brute_force(ops) else NOT_LINEARIZABLE
    assert check(ops).result == expected, "\n".join(op.to_json() for op in ops)


@settings(max_examples=100, deadline=None)
@given(random_histories())
def test_the_entry_list_is_whole_again_after_a_search(ops):
    from clusters.checkers.linearizability import _Search, _deadlines, _relevant

    placed = _relevant(ops)
    search = _Search("k", placed, _deadlines(placed, None), None, 10_000)
    search._check()
    verdict = search.run()
    search._check()
    if verdict.result == NOT_LINEARIZABLE:  # every choice was undone
        entries = []
        entry = search.next[search.head]
        while entry != search.tail:
            entries.append(entry)
            entry = search.next[entry]
        assert len(entries) == 2 * len(placed)


def test_command_line_prints_the_verdict(tmp_path, capsys):
    from clusters.checkers.history import save
    from clusters.checkers.linearizability import main

    good = save(history((1, "write", "a", 0, 1), (2, "read", "a", 2, 3)), tmp_path / "good.jsonl")
    bad = save(history((1, "write", "a", 0, 1), (2, "read", None, 2, 3)), tmp_path / "bad.jsonl")
    assert main([str(good)]) == 0
    assert main([str(bad)]) == 1
    assert "not_linearizable" in capsys.readouterr().out


def long_history(count: int, unknown: float, seed: int, clients: int = 6) -> list[Op]:
    """A workload-like history on one key: sequential clients, overlapping in time, read /
    write / cas (some failing their compare), a fraction of the writes timing out (half of
    those took effect), as the real workload records them."""
    rng = __import__("random").Random(seed)
    state: str | None = None
    ops: list[Op] = []
    free = [0.0] * clients
    now = 0.0
    for index in range(count):
        client = rng.randrange(clients)
        invoke = max(free[client], now - rng.random() * 0.01)
        now = max(now, invoke) + rng.random() * 0.002  # the instant it takes effect
        complete = now + rng.random() * 0.01
        free[client] = complete
        kind = rng.choice(["read", "read", "write", "cas", "cas"])
        value = f"v{index}"
        timed_out = kind != "read" and rng.random() < unknown
        outcome = "unknown" if timed_out else "ok"
        applies = not timed_out or rng.random() < 0.5
        if kind == "read":
            ops.append(Op(index, client, "read", "k", state, None, invoke, complete, "ok"))
        elif kind == "write":
            ops.append(Op(index, client, "write", "k", value, None, invoke, complete, outcome))
            state = value if applies else state
        elif rng.random() < 0.7:  # a cas from the current value
            ops.append(Op(index, client, "cas", "k", value, state, invoke, complete, outcome))
            state = value if applies else state
        else:  # a cas from a stale value: its compare fails
            stale = ops[rng.randrange(len(ops))].value if ops else "nothing"
            if stale == state:
                stale = "nothing"
            ops.append(Op(index, client, "cas", "k", value, stale, invoke, complete, "ok", {"succeeded": False}))
    return ops


@pytest.mark.parametrize(
    "seed, count",
    [(1, 1200), pytest.param(2, 3000, marks=pytest.mark.slow), pytest.param(3, 3000, marks=pytest.mark.slow)],
)
def test_long_histories_with_many_timeouts_are_decided_both_ways(seed, count):
    """What a real run looks like to the checker (thousands of operations, dozens of
    timeouts): it must say yes, and say no to each single stale read, not give up."""
    ops = long_history(count, unknown=0.03, seed=seed)
    assert sum(op.outcome == "unknown" for op in ops) > count // 100
    assert check(ops).result == LINEARIZABLE
    rng = __import__("random").Random(seed)
    reads = [op for op in ops if op.op == "read" and op.value is not None]
    judged = 0
    for read in rng.sample(reads, 6):
        older = [op for op in ops if op.op in ("write", "cas") and op.outcome == "ok" and op.succeeded
                 and op.complete < read.invoke - 0.5]
        if not older:
            continue
        stale = Op(**{**read.__dict__, "value": older[-1].value})
        verdict = check([stale if op.id == read.id else op for op in ops])
        assert verdict.result == NOT_LINEARIZABLE, str(verdict)
        assert verdict.explanations[0].op.id == read.id
        judged += 1
    assert judged >= 3


def test_a_failed_compare_is_checked_against_the_revision_it_reports():
    # The 412 says the key was at mod_revision 3 (the write of 'a') although 'b'
    # (revision 4) had been acknowledged before the cas began: a stale compare.
    ops = [
        Op(0, 1, "write", "k", "a", invoke=0, complete=1, result={"revision": 3}),
        Op(1, 1, "write", "k", "b", invoke=2, complete=3, result={"revision": 4}),
        Op(2, 2, "cas", "k", "c", "z", invoke=4, complete=5, result={"succeeded": False, "mod_revision": 3}),
    ]
    verdict = check(ops)
    assert verdict.result == NOT_LINEARIZABLE
    assert verdict.explanations[0].op.op == "cas" and "mod_revision" in verdict.explanations[0].reason
    fresh = ops[:2] + [Op(2, 2, "cas", "k", "c", "z", invoke=4, complete=5, result={"succeeded": False, "mod_revision": 4})]
    assert check(fresh).result == LINEARIZABLE
    # A revision no write of the history names: only "not the expected value" is known.
    unnamed = ops[:2] + [Op(2, 2, "cas", "k", "c", "z", invoke=4, complete=5, result={"succeeded": False, "mod_revision": 99})]
    assert check(unnamed).result == LINEARIZABLE
