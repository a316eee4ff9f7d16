"""Histories of key-value operations: one operation per JSON line, and a recorder for them.

A history is what concurrent clients saw: for every operation, when it was invoked, when
its answer came back, and what the answer was. It is the input of the checkers in this
package, and the file a failing test leaves behind for a person to read. One line per
operation, in invocation order:

    {"id": 0, "client": 1, "op": "write", "key": "k1", "value": "c1-0", "invoke": 12.051,
     "complete": 12.058, "outcome": "ok", "result": {"revision": 7}}
    {"id": 1, "client": 2, "op": "read", "key": "k1", "value": "c1-0", "invoke": 12.053,
     "complete": 12.060, "outcome": "ok", "result": {"mod_revision": 7, "revision": 7}}
    {"id": 2, "client": 1, "op": "cas", "key": "k1", "value": "c1-1", "expected": "c1-0",
     "invoke": 12.061, "complete": 13.070, "outcome": "unknown", "result": {"status": 504}}

Fields:

- `op`: `read`, `write`, `cas` or `delete`, on a register per key.
- `value`: for `read`, the value it returned (`null`: the key was absent); for `write` and
  `cas`, the value written; `null` for `delete`.
- `expected`: `cas` only: the value the key had to hold (`null`: absent) for the write to
  happen. (Over HTTP a cas compares `mod_revision`; because every write of a workload
  writes a unique value, "mod_revision was r" and "the value was the one written at r"
  are the same statement.)
- `invoke`, `complete`: monotonic seconds from one clock. `complete` is `null` for an
  operation that never returned.
- `outcome`: `ok` (it happened, and `value`/`result` say what it saw), `fail` (it
  certainly did not happen: a 503, a refused connection) or `unknown` (it may or may not
  have happened, at any moment after `invoke`: a 504, a client timeout).
- `result`: what else the server said, for people and for the revision checks. The
  register model reads: `succeeded: false` on an `ok` cas (the compare did not hold, a
  412: the write did not happen, but the cas saw a different value); `deleted: 0|1` on an
  `ok` delete (whether the key was there); `mod_revision` on such a failed cas, which
  pins the value it saw when some write's `revision` (or a read's `mod_revision`) names
  it. `revision` (of a write; the store's, for a read) and a read's `mod_revision` feed
  `revisions.py`. Other fields (`status`, `node`, `error`) are for people.

Values and keys are strings: workloads write ASCII values so that a read names the write
it saw.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

OPERATIONS = ("read", "write", "cas", "delete")
OUTCOMES = ("ok", "fail", "unknown")

# A recorder refuses to grow past this many operations: a runaway workload fills a
# history with millions of lines that no checker can search anyway.
DEFAULT_MAX_OPS = 1_000_000


class HistoryFormatError(ValueError):
    """A history line or operation that does not follow the format; `line` is 1-based (0: not from a file)."""

    def __init__(self, message: str, line: int = 0):
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message)


class HistoryFull(RuntimeError):
    """The recorder already holds `max_ops` operations; the workload should stop."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a history; see the module docstring for the meaning of each field."""

    id: int
    client: int | str
    op: str
    key: str
    value: str | None = None
    expected: str | None = None
    invoke: float = 0.0
    complete: float | None = None
    outcome: str = "ok"
    result: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise HistoryFormatError(f"operation {self.id}: {problem}")

    @property
    def succeeded(self) -> bool:
        """False only for an `ok` cas whose compare did not hold (a 412)."""
        return not (self.result and self.result.get("succeeded") is False)

    def to_json(self) -> str:
        """One line of JSON, fields in a fixed order, optional fields left out when empty."""
        record: dict[str, Any] = {"id": self.id, "client": self.client, "op": self.op, "key": self.key}
        record["value"] = self.value
        if self.op == "cas":
            record["expected"] = self.expected
        record["invoke"] = self.invoke
        record["complete"] = self.complete
        record["outcome"] = self.outcome
        if self.result:
            record["result"] = self.result
        return json.dumps(record, separators=(", ", ": "))

    @classmethod
    def from_json(cls, text: str, line: int = 0) -> "Op":
        """Parse one line; `HistoryFormatError` naming the line and the field otherwise."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise HistoryFormatError(f"not JSON: {error}", line) from None
        if not isinstance(record, dict):
            raise HistoryFormatError("not a JSON object", line)
        unknown = set(record) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise HistoryFormatError(f"unknown fields {sorted(unknown)}", line)
        for required in ("id", "client", "op", "key", "invoke", "outcome"):
            if required not in record:
                raise HistoryFormatError(f"missing field {required!r}", line)
        try:
            return cls(**record)
        except HistoryFormatError as error:
            raise HistoryFormatError(str(error), line) from None
        except TypeError as error:
            raise HistoryFormatError(str(error), line) from None

    def describe(self) -> str:
        """A short human form: `#12 c3 cas k1 'a'->'b' [4.120, 4.180] ok`."""
        if self.op == "read":
            what = f"read -> {self.value!r}"
        elif self.op == "write":
            what = f"write {self.value!r}"
        elif self.op == "cas":
            what = f"cas {self.expected!r}->{self.value!r}"
            if not self.succeeded:
                what += " (compare failed)"
        else:
            what = "delete"
            if self.result and "deleted" in self.result:
                what += f" (deleted {self.result['deleted']})"
        end = "..." if self.complete is None else f"{self.complete:.3f}"
        return f"#{self.id} client {self.client} {self.key} {what} [{self.invoke:.3f}, {end}] {self.outcome}"


def _problem(op: Op) -> str | None:
    """What is wrong with an operation, or None. Kept apart so `Op` stays a plain record."""
    if not isinstance(op.id, int) or isinstance(op.id, bool) or op.id < 0:
        return f"id must be a non-negative integer, not {op.id!r}"
    if op.op not in OPERATIONS:
        return f"op must be one of {OPERATIONS}, not {op.op!r}"
    if op.outcome not in OUTCOMES:
        return f"outcome must be one of {OUTCOMES}, not {op.outcome!r}"
    if not isinstance(op.key, str) or not op.key:
        return f"key must be a non-empty string, not {op.key!r}"
    for name in ("value", "expected"):
        field = getattr(op, name)
        if field is not None and not isinstance(field, str):
            return f"{name} must be a string or null, not {field!r}"
    if op.op in ("write", "cas") and op.value is None:
        return f"a {op.op} needs the value it writes"
    if op.op == "delete" and op.value is not None:
        return "a delete has no value"
    if op.op != "cas" and op.expected is not None:
        return "only a cas has an expected value"
    if not _is_time(op.invoke):
        return f"invoke must be a number of seconds, not {op.invoke!r}"
    if op.complete is not None:
        if not _is_time(op.complete):
            return f"complete must be a number of seconds or null, not {op.complete!r}"
        if op.complete < op.invoke:
            return f"completes ({op.complete}) before it was invoked ({op.invoke})"
    elif op.outcome != "unknown":
        return f"an {op.outcome} operation must have completed"
    if op.result is not None and not isinstance(op.result, dict):
        return f"result must be an object, not {op.result!r}"
    return None


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def save(ops: Iterable[Op], path: str | os.PathLike) -> str:
    """Write `ops` one per line to `path` (atomically: a reader never sees half a file)."""
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        for op in ops:
            file.write(op.to_json())
            file.write("\n")
    os.replace(temporary, path)
    return path


def load(path: str | os.PathLike) -> list[Op]:
    """Read a history written by `save` (blank lines are skipped)."""
    with open(path, encoding="utf-8") as file:
        return list(parse_lines(file))


def parse_lines(lines: Iterable[str]) -> Iterator[Op]:
    """Parse JSON lines; ids must be unique. `HistoryFormatError` names the bad line."""
    seen: set[int] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        op = Op.from_json(text, number)
        if op.id in seen:
            raise HistoryFormatError(f"duplicate id {op.id}", number)
        seen.add(op.id)
        yield op


class Pending:
    """An invoked operation that has not completed yet; complete it through its recorder."""

    __slots__ = ("id", "client", "op", "key", "value", "expected", "invoke", "done")

    def __init__(self, id: int, client: int | str, op: str, key: str, value: str | None, expected: str | None, invoke: float):
        self.id = id
        self.client = client
        self.op = op
        self.key = key
        self.value = value
        self.expected = expected
        self.invoke = invoke
        self.done = False


class HistoryRecorder:
    """Records operations from many threads or asyncio tasks at once.

    Invoke before sending a request, complete after its answer (or after giving up):

        >>> recorder = HistoryRecorder()
        >>> pending = recorder.invoke(client=1, op="write", key="k", value="v1")
        >>> op = recorder.complete(pending, "ok", result={"revision": 2})
        >>> [o.outcome for o in recorder.history()]
        ['ok']

    The clock (`time.monotonic` by default) is read inside the lock, so invocation times
    are in id order. Operations still pending when `history()` is called come out as
    `unknown` with no completion: they may have happened. At most `max_ops` operations are
    recorded; one more raises `HistoryFull`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_ops: int = DEFAULT_MAX_OPS):
        if max_ops < 1:
            raise ValueError("max_ops must be at least 1")
        self._clock = clock
        self._max_ops = max_ops
        self._lock = threading.Lock()
        self._completed: dict[int, Op] = {}
        self._pending: dict[int, Pending] = {}
        self._next_id = 0

    def __len__(self) -> int:
        with self._lock:
            return self._next_id

    def invoke(self, client: int | str, op: str, key: str, value: str | None = None, expected: str | None = None) -> Pending:
        """Note that `client` is about to send `op`; returns the handle to complete it with."""
        if op not in OPERATIONS:
            raise HistoryFormatError(f"op must be one of {OPERATIONS}, not {op!r}")
        with self._lock:
            if self._next_id >= self._max_ops:
                raise HistoryFull(f"the history already holds {self._max_ops} operations")
            pending = Pending(self._next_id, client, op, key, value, expected, self._clock())
            self._pending[pending.id] = pending
            self._next_id += 1
            return pending

    def complete(self, pending: Pending, outcome: str, value: str | None = None, result: dict[str, Any] | None = None) -> Op:
        """Record the answer. `value` is what a read returned (ignored for other ops).

        An `unknown` outcome still records when the client gave up, for people to read;
        the checkers treat it as "may take effect at any later time".
        """
        with self._lock:
            if pending.done or pending.id not in self._pending:
                raise ValueError(f"operation {pending.id} was already completed")
            now = self._clock()
            op = Op(
                id=pending.id,
                client=pending.client,
                op=pending.op,
                key=pending.key,
                value=value if pending.op == "read" else pending.value,
                expected=pending.expected,
                invoke=pending.invoke,
                complete=now,
                outcome=outcome,
                result=dict(result) if result else None,
            )
            pending.done = True
            del self._pending[pending.id]
            self._completed[op.id] = op
            return op

    def history(self) -> list[Op]:
        """Every operation in id (= invocation) order; pending ones as `unknown`."""
        with self._lock:
            ops = dict(self._completed)
            for pending in self._pending.values():
                ops[pending.id] = Op(
                    id=pending.id, client=pending.client, op=pending.op, key=pending.key,
                    value=pending.value if pending.op != "read" else None, expected=pending.expected,
                    invoke=pending.invoke, complete=None, outcome="unknown",
                )
        return [ops[index] for index in sorted(ops)]

    def _check(self) -> None:
        """Invariants: ids are dense, each id is pending or completed (not both), times ordered."""
        with self._lock:
            assert not (set(self._completed) & set(self._pending))
            assert set(self._completed) | set(self._pending) == set(range(self._next_id))
            for op in self._completed.values():
                assert op.complete is not None and op.complete >= op.invoke
