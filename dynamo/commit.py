"""Group commit of a replica's engine writes: many concurrent puts share one fsync.

With `sync="always"` every engine write returns only once it is durable, i.e. after an
fsync of a few ms. Run on the event loop, each write would stall the node for its fsync;
run one thread per write (`asyncio.to_thread`), the default pool's few threads each pay
a write and wait on the engine's group commit, so a node with 64 writers in flight still
queued most of them behind the pool. Here the writes waiting at one moment are joined
into *one* engine batch (one log record, one fsync) on a single worker thread; while it
runs, the next group gathers. Every writer is answered only after the group holding its
batch returned from `engine.write`, so "acknowledged" still means "durable".

Joining batches keeps each one atomic (the group is atomic, a stronger promise) and keeps
their order (ops are applied in queue order, so a later write of a key wins as it would
one by one). A group that the engine refuses (e.g. a batch over an engine limit) is
retried batch by batch, so one bad batch fails only its own writer.

Bounds: at most `max_pending` batches wait (further writers wait for a slot), and a
group holds at most the engine's `max_batch_ops` / `max_batch_bytes` (a single larger
batch goes alone and meets the engine's own check).

    queue = CommitQueue(engine)
    await queue.write([("put", b"d:k", b"...")])   # durable (per the engine's sync) now
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Sequence

MAX_PENDING_BATCHES = 4096


def _batch_bytes(batch: Sequence[tuple]) -> int:
    return sum(len(key) + (len(value) if value is not None else 0) for _, key, value in batch)


class _Batch:
    """One writer's batch waiting for (or in) a group; compared by identity."""

    __slots__ = ("ops", "nbytes", "done")

    def __init__(self, ops: list, nbytes: int, done: asyncio.Future):
        self.ops, self.nbytes, self.done = ops, nbytes, done


class CommitQueue:
    def __init__(self, engine, *, max_pending: int = MAX_PENDING_BATCHES):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.engine = engine
        options = getattr(engine, "options", None)
        self.max_group_ops = getattr(options, "max_batch_ops", 100_000)
        self.max_group_bytes = getattr(options, "max_batch_bytes", 64 * 1024 * 1024)
        self.max_pending = max_pending
        self._pending = 0  # batches written or waiting to be (at most max_pending)
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._running = False
        self._group_done: asyncio.Future | None = None  # set when the group now with the worker returns
        # One worker thread per queue, fed groups through a SimpleQueue (a C queue: the
        # hand-over costs a put here and a wake-up there; a ThreadPoolExecutor's submit,
        # with its locks, Condition-based future and idle-thread check, cost more CPU
        # than the group's engine write). Daemon, so a queue never closed does not keep
        # the process alive; `close()` ends it.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self.groups = 0  # engine writes made (a group of one or more batches each)
        self.batches = 0  # batches written

    async def write(self, batch: Sequence[tuple]) -> None:
        """Write `batch` atomically; returns once the engine write holding it returned."""
        batch = list(batch)
        if not batch:
            return
        if self._pending >= self.max_pending or self._slot_waiters:
            await self._wait_for_slot()
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            entry = _Batch(batch, _batch_bytes(batch), loop.create_future())
            self._waiting.append(entry)
            if not self._running:
                self._start_group(loop)
            try:
                await entry.done
            except asyncio.CancelledError:
                try:
                    self._waiting.remove(entry)  # not with the worker yet: it will never land
                except ValueError:
                    # The write may still land. The caller holds the key's lock: keep it
                    # until the write is in, so the next read-modify-write of the key sees it.
                    group_done = self._group_done
                    if group_done is not None and not group_done.done():
                        await asyncio.wait([group_done])
                raise
        finally:
            self._pending -= 1
            self._wake_next()

    async def _wait_for_slot(self) -> None:
        """Wait (first come, first served) until fewer than max_pending batches are pending."""
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():  # woken, then cancelled: pass the slot on
                self._wake_next()
            raise
        # Woken for one freed slot; but writers that never waited may have taken it meanwhile.
        while self._pending >= self.max_pending:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.appendleft(waiter)
            await waiter

    def _wake_next(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take_group(self) -> list[_Batch]:
        group, ops, size = [], 0, 0
        while self._waiting:
            entry = self._waiting[0]
            if group and (ops + len(entry.ops) > self.max_group_ops or size + entry.nbytes > self.max_group_bytes):
                break
            group.append(self._waiting.popleft())
            ops += len(entry.ops)
            size += entry.nbytes
        return group

    def _start_group(self, loop: asyncio.AbstractEventLoop) -> None:
        group = self._take_group()
        if not group:
            self._running = False
            self._group_done = None
            return
        self._running = True
        self._group_done = loop.create_future()
        try:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="capkv-ap-commit", daemon=True)
                self._worker.start()
        except RuntimeError as exc:  # interpreter shutting down: fail these writes, stop
            self._worker = None
            self._finished(loop, group, [exc] * len(group))
            return
        self._inbox.put((loop, group))

    def _work(self) -> None:
        """The worker thread: write each group handed over, until `close()`."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            loop, group = item
            self._commit_and_report(loop, group)

    def _commit_and_report(self, loop: asyncio.AbstractEventLoop, group: list[_Batch]) -> None:
        """In the worker thread: write the group, hand the outcome to the loop."""
        try:
            results = self._commit([entry.ops for entry in group])
        except BaseException as exc:  # never leave the writers waiting
            results = [exc] * len(group)
        try:
            loop.call_soon_threadsafe(self._finished, loop, group, results)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _commit(self, batches: list[list]) -> list[BaseException | None]:
        """In the worker thread: one engine write for the group, else one per batch."""
        if len(batches) == 1:
            try:
                self.engine.write(batches[0])
                return [None]
            except Exception as exc:  # handed to its writer
                return [exc]
        try:
            self.engine.write([op for batch in batches for op in batch])
            return [None] * len(batches)
        except Exception:
            # Find out whose batch it was: each batch alone (puts and deletes are
            # idempotent, so re-applying ones that did reach the log is harmless).
            results: list[BaseException | None] = []
            for batch in batches:
                try:
                    self.engine.write(batch)
                    results.append(None)
                except Exception as exc:
                    results.append(exc)
            return results

    def _finished(self, loop, group: list[_Batch], results: list) -> None:
        self.groups += 1
        self.batches += len(group)
        for entry, error in zip(group, results):
            if entry.done.done():
                continue
            if error is None:
                entry.done.set_result(None)
            else:
                entry.done.set_exception(error)
        if self._group_done is not None and not self._group_done.done():
            self._group_done.set_result(None)
        self._start_group(loop)

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the worker thread once the groups already handed to it are written, waiting
        up to `wait_s` for that (so the engine is not closed under a running write)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._inbox.put(None)
            if worker is not threading.current_thread():
                worker.join(wait_s)
