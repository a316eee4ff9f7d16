"""Global checks on etcd-style revisions that a per-key linearizability search cannot see.

The linearizability search checks each key alone; the store promises more: one global
revision counter, incremented once per write, that moves forward in real time. These
checks read the `revision` and `mod_revision` fields a workload keeps in `result`:

- unique revisions: no two writes that took effect (on any keys) got the same revision.
  Two leaders applying different entries at one index would show here first.
- one revision per value: every read that returned value v saw the same `mod_revision`,
  and it is the revision the write of v was acknowledged with. (Values are unique per
  write, so v names one write.)
- real-time order: if operation A completed before B was invoked, B's revision is at
  least A's, and greater when B is a write. A read that returns revision 10 after a write
  was acknowledged at 12 was served from a stale replica, whatever key it read.

Each check returns a list of problems as sentences (empty: fine), bounded by `limit`.

    >>> problems = check_revisions(history.load("run.jsonl"))
    >>> assert not problems, "\\n".join(problems)
"""
from __future__ import annotations

from typing import Iterable, Sequence

from .history import Op

DEFAULT_LIMIT = 20


def _revision(op: Op, field: str = "revision") -> int | None:
    if op.outcome != "ok" or not op.result:
        return None
    value = op.result.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _wrote(op: Op) -> bool:
    """Did this ok operation create a new revision?"""
    if op.op in ("write",):
        return True
    if op.op == "cas":
        return op.succeeded
    if op.op == "delete":
        return bool(op.result and op.result.get("deleted"))
    return False


def check_unique_write_revisions(ops: Sequence[Op], limit: int = DEFAULT_LIMIT) -> list[str]:
    problems: list[str] = []
    by_revision: dict[int, Op] = {}
    for op in ops:
        revision = _revision(op)
        if revision is None or not _wrote(op):
            continue
        other = by_revision.setdefault(revision, op)
        if other is not op and len(problems) < limit:
            problems.append(f"revision {revision} was given to two writes: {other.describe()} and {op.describe()}")
    return problems


def check_value_revisions(ops: Sequence[Op], limit: int = DEFAULT_LIMIT) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[str, str], tuple[int, Op]] = {}
    for op in ops:
        if op.op in ("write", "cas") and _wrote(op):
            revision = _revision(op)
        elif op.op == "read" and op.value is not None:
            revision = _revision(op, "mod_revision")
        else:
            continue
        if revision is None:
            continue
        first = seen.setdefault((op.key, op.value), (revision, op))
        if first[0] != revision and len(problems) < limit:
            problems.append(
                f"value {op.value!r} of {op.key!r} has mod_revision {first[0]} in {first[1].describe()} "
                f"but {revision} in {op.describe()}"
            )
    return problems


def check_realtime_order(ops: Sequence[Op], limit: int = DEFAULT_LIMIT) -> list[str]:
    """A sweep in invocation order, holding the greatest revision among operations that
    had completed before each invocation (O(n log n))."""
    timed = [op for op in ops if _revision(op) is not None and op.complete is not None]
    by_complete = sorted(timed, key=lambda op: op.complete)
    problems: list[str] = []
    done = 0
    greatest: Op | None = None
    for op in sorted(timed, key=lambda op: op.invoke):
        while done < len(by_complete) and by_complete[done].complete < op.invoke:
            finished = by_complete[done]
            if greatest is None or _revision(finished) > _revision(greatest):
                greatest = finished
            done += 1
        if greatest is None:
            continue
        revision, floor = _revision(op), _revision(greatest)
        if revision < floor or (revision == floor and _wrote(op)):
            if len(problems) < limit:
                problems.append(
                    f"revision went backwards: {op.describe()} got revision {revision}, but "
                    f"{greatest.describe()} had completed before with revision {floor}"
                )
    return problems


def check_revisions(ops: Iterable[Op], limit: int = DEFAULT_LIMIT) -> list[str]:
    """Every check above, problems first from the most specific."""
    ops = list(ops)
    return (
        check_unique_write_revisions(ops, limit)
        + check_value_revisions(ops, limit)
        + check_realtime_order(ops, limit)
    )[:limit]
