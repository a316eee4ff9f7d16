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
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

MAX_PENDING_BATCHES = 4096


def _batch_bytes(batch: Sequence[tuple]) -> int:
    return sum(len(key) + (len(value) if value is not None else 0) for _, key, value in batch)


class CommitQueue:
    def __init__(self, engine, *, max_pending: int = MAX_PENDING_BATCHES):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.engine = engine
        options = getattr(engine, "options", None)
        self.max_group_ops = getattr(options, "max_batch_ops", 100_000)
        self.max_group_bytes = getattr(options, "max_batch_bytes", 64 * 1024 * 1024)
        self._slots = asyncio.Semaphore(max_pending)
        self._waiting: collections.deque[tuple[list, int, asyncio.Future]] = collections.deque()
        self._running = False
        self._executor: ThreadPoolExecutor | None = None
        self.groups = 0  # engine writes made (a group of one or more batches each)
        self.batches = 0  # batches written

    async def write(self, batch: Sequence[tuple]) -> None:
        """Write `batch` atomically; returns once the engine write holding it returned."""
        batch = list(batch)
        if not batch:
            return
        async with self._slots:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self._waiting.append((batch, _batch_bytes(batch), done))
            if not self._running:
                self._start_group(loop)
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                # The write may still land. The caller holds the key's lock: keep it until
                # the write is in, so the next read-modify-write of the key sees it.
                if not done.done():
                    await asyncio.wait([done])
                raise

    def _take_group(self) -> list[tuple[list, int, asyncio.Future]]:
        group, ops, size = [], 0, 0
        while self._waiting:
            batch, nbytes, done = self._waiting[0]
            if group and (ops + len(batch) > self.max_group_ops or size + nbytes > self.max_group_bytes):
                break
            group.append(self._waiting.popleft())
            ops += len(batch)
            size += nbytes
        return group

    def _start_group(self, loop: asyncio.AbstractEventLoop) -> None:
        group = self._take_group()
        if not group:
            self._running = False
            return
        self._running = True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capkv-ap-commit")
        # submit + call_soon_threadsafe from the worker: run_in_executor would add an
        # asyncio future chained to the concurrent one, per group, on the loop's thread.
        try:
            self._executor.submit(self._commit_and_report, loop, group)
        except RuntimeError as exc:  # interpreter shutting down: fail these writes, stop
            self._running = False
            for _, _, done in group:
                if not done.done():
                    done.set_exception(exc)

    def _commit_and_report(self, loop: asyncio.AbstractEventLoop, group) -> None:
        """In the worker thread: write the group, hand the outcome to the loop."""
        try:
            results = self._commit([batch for batch, _, _ in group])
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

    def _finished(self, loop, group, results: list) -> None:
        self.groups += 1
        self.batches += len(group)
        for (_, _, done), error in zip(group, results):
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        self._start_group(loop)

    def close(self) -> None:
        """Stop the worker thread once the writes already handed to it are done."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
