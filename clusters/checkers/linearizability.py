"""Is a key-value history linearizable? A bounded Wing-Gong search, key by key.

A history is linearizable when every operation can be given one instant between its
invocation and its completion such that, taken in the order of those instants, the
operations are a legal sequential run of the register (Herlihy & Wing 1990). Keys are
independent registers, and linearizability is compositional (a history is linearizable
iff each per-object sub-history is), so each key is checked alone: the search is
exponential in the concurrency of one key, not of the whole store.

The search is Wing & Gong's (1993) depth-first search over the entries (invocations and
completions) in time order, with Lowe's (2017) memoisation of (set of operations already
linearized, register state), the structure Knossos' `wgl` and Porcupine use:

- At an invocation, try to linearize that operation now: if the register allows it and
  the (set, state) pair is new, take it off the list and start again from the front.
- At a completion of an operation not yet linearized, this path is dead: undo the last
  choice and try the next candidate after it.

Outcomes follow Knossos: a `fail` operation did not happen and is left out; an `unknown`
one may have taken effect at any instant after its invocation, or never: its completion is
+infinity and it need not be linearized at all. An `unknown` read tells nothing and is left
out. Example, one key:

    client 1: |--- write 'a' ---|            |--- read -> 'b' ---|
    client 2:        |------ write 'b' (unknown: timed out) ...

is linearizable (write a, write b, read b); with `read -> 'a'` it is too (write b never
happened, or happened before write a); with `read -> 'c'` it is not, and the explanation
names the read and the values the register could hold when it completed.

Timeouts are what make such searches blow up (each may or may not have happened, at any
later instant), so four reductions, each argued where it is made, keep them in check:
an unknown write whose value someone saw must have happened before the first sighting
(`_deadlines`); unknown writes nobody could see are left out, or placed only right before
an operation that needs "anything else" (`_relevant`, `_interchangeable`); optional
operations with the same effect are placed in invocation order (`_interchangeable`);
and an unknown cas stops counting once its expected value is gone for good (`_mortal`).

The search is bounded: after `max_states` memoised states on one key it gives up with
`unknown` instead of running for hours. Measured (2 cores): real 5-minute runs under
faults (15-30k operations on 3 keys) are accepted in a few seconds with ~1 state per
operation; one stale read planted in them is found in 1-60 s, or the search gives up at
the default bound on the longest; a failing search costs roughly (history length before
the violation) x 2^(concurrent operations) states.

    python -m clusters.checkers.linearizability history.jsonl [--max-states N]
"""
from __future__ import annotations

import dataclasses
import math
from hashlib import blake2b
from typing import Iterable, Sequence

from .history import Op

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not_linearizable"
UNKNOWN = "unknown"

# Each memoised state costs about 150 bytes (a digest of the set of operations placed, and
# the register's value) and 10-30 microseconds: 1M states is ~150 MB and under a minute.
DEFAULT_MAX_STATES = 1_000_000
# How much of the search's deepest point an explanation shows.
EXPLAIN_LINEARIZED_TAIL = 6
EXPLAIN_STATES = 8
EXPLAIN_CONCURRENT = 10


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Where the search got stuck, in the terms of the history.

    `op` could not be linearized: no order of the operations before it that the history
    allows leaves the register in a state that `op` can see. `states` are the register
    values (None: absent) the search could reach just before `op` completed; `linearized`
    are the last operations of the longest legal order found; `concurrent` are the other
    operations that overlapped `op` in real time.
    """

    key: str
    op: Op
    reason: str
    states: tuple[str | None, ...] = ()
    linearized: tuple[Op, ...] = ()
    concurrent: tuple[Op, ...] = ()

    def __str__(self) -> str:
        lines = [f"key {self.key!r}: {self.reason}", f"  cannot linearize: {self.op.describe()}"]
        if self.states:
            lines.append("  the longest legal orders found leave it holding: " + ", ".join(repr(s) for s in self.states))
        if self.linearized:
            lines.append("  longest legal order found ends with:")
            lines.extend(f"    {op.describe()}" for op in self.linearized)
        if self.concurrent:
            lines.append("  operations overlapping it:")
            lines.extend(f"    {op.describe()}" for op in self.concurrent)
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class KeyVerdict:
    key: str
    result: str  # LINEARIZABLE | NOT_LINEARIZABLE | UNKNOWN
    operations: int  # operations the search had to place (after leaving out fails)
    states: int  # memoised states explored
    explanation: Explanation | None = None
    reason: str = ""  # why UNKNOWN


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verdict on a whole history: not linearizable if any key is not, else unknown if
    any key's search gave up, else linearizable."""

    result: str
    keys: dict[str, KeyVerdict]

    @property
    def valid(self) -> bool | None:
        """True, False, or None when the search gave up."""
        return {LINEARIZABLE: True, NOT_LINEARIZABLE: False}.get(self.result)

    @property
    def explanations(self) -> list[Explanation]:
        return [v.explanation for v in self.keys.values() if v.explanation is not None]

    def __str__(self) -> str:
        operations = sum(v.operations for v in self.keys.values())
        states = sum(v.states for v in self.keys.values())
        lines = [f"{self.result}: {len(self.keys)} keys, {operations} operations, {states} states explored"]
        for verdict in self.keys.values():
            if verdict.result == UNKNOWN:
                lines.append(f"key {verdict.key!r}: gave up: {verdict.reason}")
        lines.extend(str(e) for e in self.explanations)
        return "\n".join(lines)


# --- the register ---------------------------------------------------------------------------


def step(state: str | None, op: Op) -> tuple[bool, str | None]:
    """The sequential register: can `op` happen when the key holds `state`, and what then?

        >>> step("a", read("a"))   -> (True, "a")      step("a", read("b")) -> (False, ...)
        >>> step("a", cas("a"->"b")) -> (True, "b")    a failed cas needs state != expected
        >>> step(None, delete with deleted=1) -> (False, ...)

    `state` None means absent. Pure: the search calls it millions of times.
    """
    kind = op.op
    if kind == "read":
        return op.value == state, state
    if kind == "write":
        return True, op.value
    if kind == "cas":
        if op.outcome == "ok" and not op.succeeded:
            return state != op.expected, state
        if state == op.expected:
            return True, op.value
        return False, state
    # delete
    if op.outcome == "ok" and op.result and "deleted" in op.result:
        deleted = op.result["deleted"]
        if bool(deleted) != (state is not None):
            return False, state
    return True, None


def _relevant(ops: Sequence[Op]) -> list[Op]:
    """The operations the search must place: no fails, no unknown reads, and no unknown
    write nobody could ever observe.

    That last one: an unknown write (or cas) whose value no read returned and no cas
    expected. Leaving it out is always allowed (it may never have happened), and it never
    helps: any order that places it stays legal without it, because nothing between it
    and the next write could have depended on its value ... unless some operation only
    needs the value to be *different* from something (a cas whose compare failed, a
    delete that deleted something). Keys with such operations keep every unknown
    write. Dropping them matters: each one otherwise doubles the states the search can visit.
    """
    kept = [op for op in ops if op.outcome != "fail" and not (op.op == "read" and op.outcome != "ok")]
    if any(_needs_difference(op) for op in kept):
        return kept
    observed = {op.value for op in kept if op.op == "read"} | {op.expected for op in kept if op.op == "cas"}
    return [op for op in kept if not (op.outcome == "unknown" and op.op in ("write", "cas") and op.value not in observed)]


# --- the search -------------------------------------------------------------------------------


def check_key(
    key: str, ops: Sequence[Op], initial: str | None = None, max_states: int = DEFAULT_MAX_STATES
) -> KeyVerdict:
    """Check the operations of one key (all of `ops` must be on `key`)."""
    for op in ops:
        if op.key != key:
            raise ValueError(f"operation {op.id} is on key {op.key!r}, not {key!r}")
    originals = {op.id: op for op in ops}
    placed = _relevant(_pin_failed_compares(ops))
    missing = _read_of_unwritten(key, placed, initial, ops)
    if missing is not None:
        return KeyVerdict(key, NOT_LINEARIZABLE, len(placed), 0, dataclasses.replace(missing, op=originals[missing.op.id]))
    search = _Search(key, placed, _deadlines(placed, initial), initial, max_states)
    search.originals = originals
    return search.run()


def _pin_failed_compares(ops: Sequence[Op]) -> list[Op]:
    """A cas whose compare failed (412) reports the key's `mod_revision` at the compare
    (in `result`). When that revision names a write of the history (its acknowledged
    `revision`, or the `mod_revision` a read saw with its value), or is 0 (absent), the cas
    saw that value: it is checked as a read of it, which says more than "anything but the
    expected value" and narrows the search. Other failed compares stay as they are.
    """
    value_at: dict[int, str] = {}
    for op in ops:
        if op.outcome != "ok" or not op.result:
            continue
        if op.op == "write" or (op.op == "cas" and op.succeeded):
            revision = op.result.get("revision")
        elif op.op == "read" and op.value is not None:
            revision = op.result.get("mod_revision")
        else:
            continue
        if isinstance(revision, int) and not isinstance(revision, bool):
            value_at.setdefault(revision, op.value)
    pinned = []
    for op in ops:
        revision = op.result.get("mod_revision") if op.result else None
        if op.op == "cas" and op.outcome == "ok" and not op.succeeded and isinstance(revision, int):
            if revision == 0 or revision in value_at:
                seen = None if revision == 0 else value_at[revision]
                if seen != op.expected:  # else the server contradicts itself: keep the plain compare
                    pinned.append(dataclasses.replace(op, op="read", value=seen, expected=None))
                    continue
        pinned.append(op)
    return pinned


def check(
    ops: Iterable[Op], initial: dict[str, str | None] | None = None, max_states: int = DEFAULT_MAX_STATES
) -> Verdict:
    """Check a whole history, key by key. `initial` maps keys to their value before the
    history (absent by default). `max_states` bounds each key's search.

        >>> verdict = check(history.load("run.jsonl"))
        >>> verdict.valid, str(verdict)
    """
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    initial = initial or {}
    keys = {key: check_key(key, key_ops, initial.get(key), max_states) for key, key_ops in sorted(by_key.items())}
    results = {v.result for v in keys.values()}
    if NOT_LINEARIZABLE in results:
        result = NOT_LINEARIZABLE
    elif UNKNOWN in results:
        result = UNKNOWN
    else:
        result = LINEARIZABLE
    return Verdict(result, keys)


def _deadlines(ops: Sequence[Op], initial: str | None) -> list[float]:
    """The instant by which each operation must have taken effect, if it did at all.

    An `ok` operation: its completion. An `unknown` write (or cas) whose value some
    operation saw (a read that returned it, a successful cas that expected it) did happen,
    since values are unique, and before the first of those saw it: it becomes a determinate
    operation due by that completion. Any other `unknown`: +infinity (optional). A value
    written by more than one operation (or held initially) names no single write and
    gets no deadline.
    Without this each indeterminate write doubles the states the search can visit for the
    rest of the history.
    """
    first_seen: dict[str, float] = {}
    for op in ops:
        if op.outcome != "ok":
            continue
        if op.op == "read":
            seen = op.value
        elif op.op == "cas" and op.succeeded:
            seen = op.expected
        else:
            continue
        if seen is not None and (seen not in first_seen or op.complete < first_seen[seen]):
            first_seen[seen] = op.complete
    writers: dict[str, int] = {}
    for op in ops:
        if op.op in ("write", "cas"):
            writers[op.value] = writers.get(op.value, 0) + 1
    deadlines = []
    for op in ops:
        if op.outcome == "ok":
            deadlines.append(op.complete)
        elif op.op in ("write", "cas") and op.value in first_seen and writers[op.value] == 1 and op.value != initial:
            deadlines.append(first_seen[op.value])
        else:
            deadlines.append(math.inf)
    return deadlines


def _read_of_unwritten(key: str, ops: Sequence[Op], initial: str | None, everything: Sequence[Op]) -> Explanation | None:
    """A read (or successful cas) that saw a value no operation that may have happened
    wrote: the plainest violation, reported without a search (which would otherwise
    exhaust every order first). A write that *failed* (a 503: "definitely not applied")
    but whose value was read is named in the reason: the server lied about the failure."""
    written = {op.value for op in ops if op.op in ("write", "cas")}
    written.add(initial)
    if any(op.op == "delete" for op in ops):
        written.add(None)
    for op in ops:
        if op.op == "read":
            seen, what = op.value, "read"
        elif op.op == "cas" and op.outcome == "ok" and op.succeeded:
            seen, what = op.expected, "a successful cas expected"
        else:
            continue
        if seen not in written:
            failed = [o for o in everything if o.outcome == "fail" and o.op in ("write", "cas") and o.value == seen]
            reason = f"{what} {seen!r}, a value no operation wrote"
            if failed:
                reason = f"{what} {seen!r}, written only by an operation that failed: {failed[0].describe()}"
            return Explanation(key, op, reason, concurrent=_overlapping(op, ops))
    return None


def _overlapping(target: Op, ops: Sequence[Op]) -> tuple[Op, ...]:
    end = math.inf if target.complete is None else target.complete
    found = [
        op for op in ops
        if op.id != target.id and op.invoke <= end and (op.complete is None or op.complete >= target.invoke)
    ]
    return tuple(found[:EXPLAIN_CONCURRENT])


class _Unread:
    """The register's state after a write whose value nobody read or compared against."""

    def __init__(self, fresh: bool):
        self.fresh = fresh

    def __repr__(self) -> str:
        return "<a value nobody read>"


# Just written: only an operation that needs the key to hold "anything else" may come next.
UNREAD_FRESH = _Unread(fresh=True)
UNREAD = _Unread(fresh=False)


def _needs_difference(op: Op) -> bool:
    """Operations that only ask the key to hold something other than a given value."""
    if op.outcome != "ok":
        return False
    if op.op == "cas":
        return not op.succeeded
    return op.op == "delete" and bool(op.result and op.result.get("deleted"))


def _interchangeable(ops: Sequence[Op], deadlines: Sequence[float], initial: str | None) -> tuple[list[int], list[bool]]:
    """Which optional operations write a value nobody saw, and which may go in invocation order only.

    Unread: an unknown write or cas (that may never have happened) whose value no read
    returned and no cas compared against. Placing one is only ever needed right before
    an operation that needs the key to hold "anything else" (a cas whose compare failed,
    a delete that deleted something): anywhere else, taking it out of a legal order leaves
    a legal order, since nothing can read its value. So the search gives it the state
    `UNREAD_FRESH`, from which only such an operation may follow.

    Interchangeable: optional operations with the same effect may be placed in invocation
    order only: any legal order that places some of them can place, instead, the ones
    invoked earliest (the i-th earliest was invoked no later than the i-th placed one, and
    none of them has a deadline). Two classes qualify: unknown deletes, and unread writes.
    Without these, every timeout multiplies the states the search can visit for the rest
    of the history, and a history with a hundred timeouts is out of reach.

    Returns, per operation, the index of the operation before it in its class (-1: none,
    or not in a class) and whether it is unread.
    """
    observed = {op.value for op in ops if op.op == "read"} | {op.expected for op in ops if op.op == "cas"} | {initial}
    before = [-1] * len(ops)
    unread = [False] * len(ops)
    classes: dict[str, list[int]] = {"delete": [], "unread": []}
    for index, op in enumerate(ops):
        if op.outcome != "unknown" or deadlines[index] != math.inf:
            continue
        if op.op == "delete":
            classes["delete"].append(index)
        elif op.op in ("write", "cas") and op.value not in observed:
            unread[index] = True
            if op.op == "write":
                classes["unread"].append(index)
    for members in classes.values():
        members.sort(key=lambda index: (ops[index].invoke, index))
        for earlier, later in zip(members, members[1:]):
            before[later] = earlier
    return before, unread


def _mortal(ops: Sequence[Op], deadlines: Sequence[float], initial: str | None) -> list[tuple[int, int, str]]:
    """Optional cas operations that can stop mattering: (cas, writer of its expected value, that value).

    An unknown cas that may never have happened can only take effect while the key holds
    its expected value. When that value was written by one operation only (and is not the
    initial one), then once that write is placed and the key holds something else, the cas
    can never take effect again: whether it did earlier no longer changes anything to
    come. The memo then counts it as placed either way, so two search paths that differ
    only in it meet again instead of doubling the states for the rest of the history.
    """
    writers: dict[str | None, list[int]] = {}
    for index, op in enumerate(ops):
        if op.op in ("write", "cas"):
            writers.setdefault(op.value, []).append(index)
    mortal = []
    for index, op in enumerate(ops):
        if op.op != "cas" or op.outcome != "unknown" or deadlines[index] != math.inf:
            continue
        if op.expected is None or op.expected == initial or len(writers.get(op.expected, ())) != 1:
            continue
        mortal.append((index, writers[op.expected][0], op.expected))
    return mortal


class _Search:
    """One key's search. Entries live in a doubly linked list over arrays ("dancing
    links") so that taking an operation out and putting it back are O(1)."""

    def __init__(self, key: str, ops: Sequence[Op], deadlines: Sequence[float], initial: str | None, max_states: int):
        self.key = key
        self.ops = list(ops)
        self.initial = initial
        self.max_states = max_states
        n = len(self.ops)
        # Entry 0 is the head, 2n + 1 the tail; calls sort before returns at equal times
        # (operations that touch in time count as concurrent: the permissive reading).
        events = []
        for index, op in enumerate(self.ops):
            events.append((op.invoke, 0, index))
            events.append((deadlines[index], 1, index))
        events.sort()
        size = 2 * n + 2
        self.head, self.tail = 0, size - 1
        self.next = list(range(1, size)) + [-1]
        self.prev = [-1] + list(range(0, size - 1))
        self.is_call = [False] * size
        self.op_of = [-1] * size
        self.infinite = [False] * size
        self.match = [-1] * size
        call_entry = [0] * n
        return_entry = [0] * n
        for position, (time, kind, index) in enumerate(events, start=1):
            self.op_of[position] = index
            if kind == 0:
                self.is_call[position] = True
                call_entry[index] = position
            else:
                self.infinite[position] = time == math.inf
                return_entry[index] = position
        for index in range(n):
            self.match[call_entry[index]] = return_entry[index]
        self.before, self.unread = _interchangeable(self.ops, deadlines, initial)
        self.mortal = _mortal(self.ops, deadlines, initial)
        self.originals: dict[int, Op] = {}  # operations as recorded, by id, for explanations
        # The deepest dead end seen, for the explanation.
        self.best_depth = -1
        self.best_op = -1
        self.best_states: list[str | None] = []
        self.best_tail: list[int] = []

    def _lift(self, entry: int) -> None:
        nxt, prv = self.next, self.prev
        nxt[prv[entry]] = nxt[entry]
        prv[nxt[entry]] = prv[entry]
        match = self.match[entry]
        nxt[prv[match]] = nxt[match]
        prv[nxt[match]] = prv[match]

    def _unlift(self, entry: int) -> None:
        nxt, prv = self.next, self.prev
        match = self.match[entry]
        nxt[prv[match]] = match
        prv[nxt[match]] = match
        nxt[prv[entry]] = entry
        prv[nxt[entry]] = entry

    def _check(self) -> None:
        """Invariants of the entry list: links agree both ways, calls come before their
        returns, and an entry is listed iff its partner is."""
        seen: list[int] = []
        entry = self.head
        while entry != self.tail:
            following = self.next[entry]
            assert self.prev[following] == entry, f"entry {following} does not point back to {entry}"
            entry = following
            if entry != self.tail:
                seen.append(entry)
        calls = {self.op_of[e] for e in seen if self.is_call[e]}
        returns = {self.op_of[e] for e in seen if not self.is_call[e]}
        assert calls == returns, f"operations listed by one entry only: {sorted(calls ^ returns)}"
        assert len(seen) == 2 * len(calls)

    def run(self) -> KeyVerdict:
        ops, nxt, is_call, op_of = self.ops, self.next, self.is_call, self.op_of
        before, unread = self.before, self.unread
        needs_difference = [_needs_difference(op) for op in ops]
        bits = [1 << index for index in range(len(ops))]
        mortal = [(bits[c], bits[w], expected) for c, w, expected in self.mortal]
        width = (len(ops) + 7) // 8
        # Memo keys hold a 128-bit digest of the set, not the set: a few dozen bytes per
        # state instead of one bit per operation (a collision, which would prune a path
        # wrongly, has odds around 2^-128 per pair of states).
        cache: set[tuple[bytes, object]] = set()
        stack: list[tuple[int, str | None]] = []  # (call entry linearized, state before it)
        linearized = 0
        state = self.initial
        entry = nxt[self.head]
        while entry != self.tail:
            if is_call[entry]:
                index = op_of[entry]
                prior = before[index]
                if prior >= 0 and not linearized & bits[prior]:
                    entry = nxt[entry]  # its class is placed in invocation order
                    continue
                if state is UNREAD_FRESH and not needs_difference[index]:
                    entry = nxt[entry]
                    continue
                allowed, new_state = step(state, ops[index])
                if unread[index]:
                    new_state = UNREAD_FRESH
                elif new_state is UNREAD_FRESH:
                    new_state = UNREAD
                if allowed:
                    new_linearized = linearized | bits[index]
                    remembered = new_linearized
                    for cas_bit, writer_bit, expected in mortal:
                        if remembered & writer_bit and new_state != expected:
                            remembered |= cas_bit
                    candidate = (blake2b(remembered.to_bytes(width, "little"), digest_size=16).digest(), new_state)
                    if candidate not in cache:
                        if len(cache) >= self.max_states:
                            return KeyVerdict(
                                self.key, UNKNOWN, len(ops), len(cache),
                                reason=f"gave up after {self.max_states} states (raise max_states or shorten the history)",
                            )
                        cache.add(candidate)
                        stack.append((entry, state))
                        linearized, state = new_linearized, new_state
                        self._lift(entry)
                        entry = nxt[self.head]
                        continue
                entry = nxt[entry]
                continue
            if self.infinite[entry]:
                # Only indeterminate operations are left: they may never have happened.
                return KeyVerdict(self.key, LINEARIZABLE, len(ops), len(cache))
            self._note_dead_end(entry, state, stack)
            if not stack:
                return KeyVerdict(self.key, NOT_LINEARIZABLE, len(ops), len(cache), self._explain())
            entry, state = stack.pop()
            linearized ^= bits[op_of[entry]]
            self._unlift(entry)
            entry = nxt[entry]
        return KeyVerdict(self.key, LINEARIZABLE, len(ops), len(cache))

    def _note_dead_end(self, entry: int, state: str | None, stack: list[tuple[int, str | None]]) -> None:
        depth = len(stack)
        index = self.op_of[entry]
        if depth > self.best_depth:
            self.best_depth = depth
            self.best_op = index
            self.best_states = [state]
            self.best_tail = [self.op_of[e] for e, _ in stack[-EXPLAIN_LINEARIZED_TAIL:]]
        elif depth == self.best_depth and index == self.best_op:
            if state not in self.best_states and len(self.best_states) < EXPLAIN_STATES:
                self.best_states.append(state)

    def _explain(self) -> Explanation:
        op = self.originals.get(self.ops[self.best_op].id, self.ops[self.best_op])
        states = tuple(self.best_states)
        if op.op == "read":
            reason = f"a read returned {op.value!r} where the longest legal orders found leave it holding " + ", ".join(repr(s) for s in states)
        elif op.op == "cas" and self.ops[self.best_op].op == "read":
            seen = self.ops[self.best_op].value
            reason = (f"a cas whose compare failed saw {seen!r} (its mod_revision) where the longest legal "
                      "orders found leave it holding " + ", ".join(repr(s) for s in states))
        elif op.op == "cas":
            verb = "saw a value other than" if not op.succeeded else "succeeded on"
            reason = f"a cas {verb} {op.expected!r} where the longest legal orders found leave it holding " + ", ".join(repr(s) for s in states)
        else:
            reason = f"a {op.op} could not take effect before it completed"
        return Explanation(
            key=self.key,
            op=op,
            reason=reason,
            states=states,
            linearized=tuple(self.originals.get(self.ops[i].id, self.ops[i]) for i in self.best_tail),
            concurrent=tuple(self.originals.get(o.id, o) for o in _overlapping(op, self.ops)),
        )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clusters.checkers.linearizability HISTORY.jsonl [--max-states N]`: print the
    verdict (and the revision checks); exit status 0 linearizable, 1 not, 2 gave up."""
    import argparse

    from .history import load
    from .revisions import check_revisions

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("history")
    parser.add_argument("--max-states", type=int, default=DEFAULT_MAX_STATES)
    args = parser.parse_args(argv)
    ops = load(args.history)
    verdict = check(ops, max_states=args.max_states)
    print(verdict)
    problems = check_revisions(ops)
    for problem in problems:
        print(f"revisions: {problem}")
    if verdict.result == NOT_LINEARIZABLE or problems:
        return 1
    return 0 if verdict.result == LINEARIZABLE else 2


if __name__ == "__main__":
    raise SystemExit(main())
