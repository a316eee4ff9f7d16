"""The Engine protocol that every storage engine implements, its options and its errors.

An engine maps bytes keys to bytes values, ordered by key. It knows nothing above it: the
`cp` and `ap` modes store their own encodings (revisions, vector clocks) in the values.

    >>> e = open_engine("memory")
    >>> e.put(b"a", b"1"); e.write([("put", b"b", b"2"), ("delete", b"a", None)])
    >>> list(e.scan())
    [(b'b', b'2')]

Threads: every method may be called from several threads at once. A `scan()` iterator
sees each key at most once, in key order, and every key that was present and unchanged for
the whole iteration; keys written during it may or may not appear (a snapshot is allowed,
not required).

Ownership: returned `bytes` are immutable and belong to the caller. Batches passed to
`write()` are read before it returns and not kept.

Errors: a bad argument from the caller raises `InvalidArgument` (a `ValueError`) or
`TypeError`, and nothing is changed. Damaged files raise `CorruptionError` naming the
file, never return bad data. Calls after `close()` raise `EngineClosed`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

SyncMode = Literal["always", "batch", "never"]
SYNC_MODES: tuple[str, ...] = ("always", "batch", "never")

BatchOp = tuple[str, bytes, "bytes | None"]


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""


class InvalidArgument(EngineError, ValueError):
    """The caller passed a key, value, batch or option the engine refuses; nothing changed."""


class EngineClosed(EngineError):
    """The engine was closed; open it again to use it."""


class CorruptionError(EngineError):
    """A checksum, magic or length in a file did not hold: the file is damaged.

    `path` names the file and `offset` the byte where the damage was found (or -1).
    """

    def __init__(self, path: str | os.PathLike, offset: int, reason: str):
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: corrupt at byte {offset}: {reason}")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Options every engine takes. Each limit says why it exists."""

    # "always": durable when the call returns (concurrent writers share one fsync);
    # "batch": fsynced at least every `sync_interval_ms`; "never": left to the OS.
    sync: str = "always"
    sync_interval_ms: float = 5.0
    # A key is an index entry held in memory by the hash engine and in every SSTable
    # index block: keep it small (etcd allows 1.5 MiB requests; our API caps keys at 4 KiB).
    max_key_bytes: int = 4096
    # Values are read whole into memory; the HTTP API caps them at 1 MiB by default,
    # the engine allows some room above that for the modes' own metadata.
    max_value_bytes: int = 16 * 1024 * 1024
    # An atomic batch is written as one log record and held in memory while applied.
    max_batch_ops: int = 100_000
    max_batch_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise InvalidArgument(f"sync must be one of {', '.join(SYNC_MODES)}, not {self.sync!r}")
        for name in ("sync_interval_ms", "max_key_bytes", "max_value_bytes", "max_batch_ops", "max_batch_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive, not {getattr(self, name)!r}")


@runtime_checkable
class Engine(Protocol):
    """What `consensus/` and `dynamo/` store through. See the module docstring."""

    options: EngineOptions

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def write(self, batch: Sequence[BatchOp]) -> None:
        """Apply `("put", key, value)` and `("delete", key, None)` ops atomically, in order.

        After a crash the batch is there whole or not at all.
        """

    def scan(
        self,
        start: bytes | None = None,
        end: bytes | None = None,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(key, value)` for `start <= key < end` in key order (descending if reverse)."""

    def sync(self) -> None:
        """Make every write that returned so far durable."""

    def close(self) -> None: ...

    def stats(self) -> dict: ...

    def _check(self) -> None:
        """Assert the engine's internal invariants (tests call it after every step)."""


def check_key(key: object, options: EngineOptions) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if not key:
        raise InvalidArgument("key must not be empty")
    if len(key) > options.max_key_bytes:
        raise InvalidArgument(f"key is {len(key)} bytes; the limit is {options.max_key_bytes} (max_key_bytes)")
    return key


def check_value(value: object, options: EngineOptions) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > options.max_value_bytes:
        raise InvalidArgument(
            f"value is {len(value)} bytes; the limit is {options.max_value_bytes} (max_value_bytes)"
        )
    return value


def check_batch(batch: Iterable[BatchOp], options: EngineOptions) -> list[tuple[str, bytes, bytes | None]]:
    """Validate a whole batch before any of it is applied; returns it normalised."""
    if isinstance(batch, (bytes, str)) or not isinstance(batch, Iterable):
        raise TypeError("batch must be a list of (op, key, value) tuples")
    out: list[tuple[str, bytes, bytes | None]] = []
    size = 0
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InvalidArgument(f"batch item {len(out)} must be (op, key, value), not {item!r:.80}")
        op, key, value = item
        key = check_key(key, options)
        if op == "put":
            value = check_value(value, options)
            size += len(key) + len(value)
        elif op == "delete":
            if value is not None:
                raise InvalidArgument(f"batch item {len(out)}: a delete carries None as its value")
            size += len(key)
        else:
            raise InvalidArgument(f"batch item {len(out)}: op must be 'put' or 'delete', not {op!r:.40}")
        out.append((op, key, value))
        if len(out) > options.max_batch_ops:
            raise InvalidArgument(f"batch has more than {options.max_batch_ops} ops (max_batch_ops)")
        if size > options.max_batch_bytes:
            raise InvalidArgument(f"batch is over {options.max_batch_bytes} bytes (max_batch_bytes)")
    return out


def check_scan_args(start, end, limit) -> None:
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and not isinstance(bound, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be bytes or None, not {type(bound).__name__}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InvalidArgument(f"limit must be a non-negative int or None, not {limit!r}")


class GroupCommit:
    """Shares one fsync among the writers that wait for durability at the same time.

    A writer appends under the engine's write lock, notes the log position it reached,
    releases the lock and calls `wait_durable(position)`. The first waiter becomes the
    syncer: it calls `sync_fn(target)` outside any lock and wakes every waiter that the
    position made durable covers. Writers that arrive during that fsync are covered by the
    next one, so N concurrent writers pay about two fsyncs, not N.

        t1: write(a) -> pos 10; wait_durable(10) -> becomes syncer, fsync covers pos 10
        t2: write(b) -> pos 20; wait_durable(20) -> waits; t1 done; becomes syncer, fsync 20
        t3: write(c) -> pos 30 (during t2's fsync) -> covered only by the next fsync

    `sync_fn(target)` must make bytes up to `target` durable (flush buffers, then fsync);
    the caller keeps it safe to run while writers append. It may return the position it
    actually made durable: an engine that flushes its whole append buffer covers writers
    that appended after `target` was taken too, and those return without an fsync of
    their own (with 8 writers nearly all of them share each fsync, not about half).
    Returning None (or less than `target`) means `target`.
    """

    def __init__(self, sync_fn) -> None:
        self._sync_fn = sync_fn
        self._cond = threading.Condition(threading.Lock())
        self._written = 0
        self._durable = 0
        self._syncing = False
        self.fsyncs = 0

    @property
    def durable_position(self) -> int:
        return self._durable

    def written(self, position: int) -> None:
        with self._cond:
            if position > self._written:
                self._written = position

    def reset(self, position: int = 0) -> None:
        """Start counting again, for a new log file (everything before is durable)."""
        with self._cond:
            self._written = self._durable = position

    def wait_durable(self, position: int) -> None:
        """Return once `position` is durable. Notes it as written too (so a writer need
        not call `written()` first), then waits for, or runs, the fsync that covers it."""
        with self._cond:
            if position > self._written:
                self._written = position
            while self._durable < position:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._written
                self._cond.release()
                try:
                    covered = self._sync_fn(target)
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self.fsyncs += 1
                if covered is None or covered < target:
                    covered = target
                if covered > self._durable:
                    self._durable = covered
                if covered > self._written:
                    self._written = covered

    def sync_all(self) -> None:
        self.wait_durable(self._written)


class PeriodicSyncer:
    """For `sync="batch"`: a daemon thread that calls `sync_fn()` every `interval_ms`
    while there are unsynced writes (`mark_dirty()`), and once more on `stop()`."""

    def __init__(self, sync_fn, interval_ms: float, name: str = "capkv-syncer") -> None:
        self._sync_fn = sync_fn
        self._interval = interval_ms / 1000.0
        self._dirty = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def mark_dirty(self) -> None:
        self._dirty = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._dirty:
                self._dirty = False
                try:
                    self._sync_fn()
                except (OSError, ValueError):
                    # The file was closed under us (engine closing); stop() syncs last.
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
