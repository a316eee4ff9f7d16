"""Linearizable reads through coalesced read barriers.

pysyncobj offers no ReadIndex and a deposed leader keeps believing it leads for up to
`leaderFallbackTimeout` (research/pysyncobj.md §3), so a read is made linearizable by a
barrier: a no-op command through the log. When this node has applied it, it has applied
every write that completed before the barrier was proposed, so a local read then returns
the latest value (or something newer).

A barrier only covers reads that arrived before it was proposed. Many concurrent reads
share one: a read joins the barrier that is *open* (started but not yet proposed: its task
proposes when it first runs, after every read that joined it arrived), else starts one if
fewer than `max_in_flight` are in flight, else waits for the *next* one, proposed as soon
as one in flight finishes. With `max_in_flight=1`:

    t0  read A arrives          -> barrier B1 opened; A waits on B1
    t0' read B arrives          -> B1 not proposed yet: B waits on B1 too
    t0" B1 proposed
    t1  reads C, D arrive       -> B1 may predate them: they wait on B2 (not yet proposed)
    t2  B1 applied              -> A, B served; B2 proposed for C and D
    t3  read E arrives          -> waits on B3
    t4  B2 applied              -> C, D served; B3 proposed for E

With more in flight (the service uses 4), C and D get a barrier of their own at t1
instead of waiting for B1 to finish: a read then waits about one barrier round trip
instead of up to two. That pays when the round trip is mostly waiting (journal syncs),
and costs one more log entry per round.

`propose()` is any coroutine function that returns once a fresh no-op is applied locally
(or raises); the service passes one through Raft, the tests a fake log.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class ReadBarrier:
    def __init__(self, propose: Callable[[], Awaitable[Any]], max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._propose = propose
        self.max_in_flight = max_in_flight
        self._open: asyncio.Future | None = None  # started, not yet proposed: joinable
        self._running: set[asyncio.Future] = set()  # started and not finished (open included)
        self._next: asyncio.Future | None = None  # queued behind a full pipeline
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.barriers = 0  # proposed so far
        self.reads = 0  # reads served by them

    async def wait(self) -> Any:
        """Return once a barrier proposed after this call has been applied locally.

        Returns what `propose()` returned; raises what it raised. Cancelling the caller
        (e.g. its timeout) does not cancel the barrier other readers share.
        """
        self.reads += 1
        if self._open is not None:
            future = self._open
        elif self._next is not None:
            future = self._next
        elif len(self._running) < self.max_in_flight:
            future = self._start(asyncio.get_running_loop().create_future())
        else:
            future = self._next = asyncio.get_running_loop().create_future()
        return await asyncio.shield(future)

    def _start(self, future: asyncio.Future) -> asyncio.Future:
        self._open = future
        self._running.add(future)
        self.barriers += 1
        task = asyncio.ensure_future(self._run(future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(self, future: asyncio.Future) -> None:
        # From here on the barrier may be proposed at any moment: later reads must not
        # join it. Every reader that joined arrived before this point, so before the proposal.
        if self._open is future:
            self._open = None
        try:
            result = await self._propose()
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every reader of this barrier
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: readers may all have timed out
        else:
            if not future.done():
                future.set_result(result)
        finally:
            self._running.discard(future)
            waiting = self._next
            if waiting is not None and len(self._running) < self.max_in_flight:
                self._next = None
                if not waiting.cancelled() and not self._closed:
                    self._start(waiting)

    def _check(self) -> None:
        """A queued barrier exists only behind a full pipeline; finished ones are not kept."""
        if self._next is not None:
            assert len(self._running) >= self.max_in_flight or self._closed, "a queued barrier behind a free slot"
        if self._open is not None:
            assert self._open in self._running, "an open barrier that is not running"
        if not self._closed:
            for future in self._running:
                assert not future.done() or self._tasks, "a finished barrier still marked in flight"

    def pending(self) -> int:
        return len(self._running) + (self._next is not None)

    async def close(self, error: BaseException | None = None) -> None:
        """Stop proposing; readers still waiting get `error` (or are cancelled)."""
        self._closed = True
        for future in (*self._running, self._next):
            if future is not None and not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
                    future.exception()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
