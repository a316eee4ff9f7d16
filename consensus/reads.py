"""Linearizable reads through coalesced read barriers.

pysyncobj offers no ReadIndex and a deposed leader keeps believing it leads for up to
`leaderFallbackTimeout` (research/pysyncobj.md §3), so a read is made linearizable by a
barrier: a no-op command through the log. When this node has applied it, it has applied
every write that completed before the barrier was proposed, so a local read then returns
the latest value (or something newer).

A barrier only covers reads that arrived before it was proposed. Many concurrent reads
share one: the first read proposes a barrier; reads that arrive while it is in flight
wait for the *next* one, proposed as soon as the current one finishes. However many reads
arrive, at most one barrier is in flight and one is queued:

    t0  read A arrives          -> barrier B1 proposed; A waits on B1
    t1  reads C, D arrive       -> B1 may predate them: they wait on B2 (not yet proposed)
    t2  B1 applied              -> A served; B2 proposed for C and D
    t3  read E arrives          -> waits on B3
    t4  B2 applied              -> C, D served; B3 proposed for E

`propose()` is any coroutine function that returns once a fresh no-op is applied locally
(or raises); the service passes one through Raft, the tests a fake log.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class ReadBarrier:
    def __init__(self, propose: Callable[[], Awaitable[Any]]) -> None:
        self._propose = propose
        self._in_flight: asyncio.Future | None = None
        self._next: asyncio.Future | None = None
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
        if self._in_flight is None:
            future = self._start(asyncio.get_running_loop().create_future())
        else:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            future = self._next
        return await asyncio.shield(future)

    def _start(self, future: asyncio.Future) -> asyncio.Future:
        self._in_flight = future
        self.barriers += 1
        task = asyncio.ensure_future(self._run(future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(self, future: asyncio.Future) -> None:
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
            self._in_flight = None
            waiting, self._next = self._next, None
            if waiting is not None and not waiting.cancelled() and not self._closed:
                self._start(waiting)

    def _check(self) -> None:
        """A queued barrier exists only behind one in flight; finished ones are not kept."""
        if self._next is not None:
            assert self._in_flight is not None or self._closed, "a queued barrier with none in flight"
        if self._in_flight is not None and not self._closed:
            assert not self._in_flight.done() or self._tasks, "a finished barrier still marked in flight"

    def pending(self) -> int:
        return (self._in_flight is not None) + (self._next is not None)

    async def close(self, error: BaseException | None = None) -> None:
        """Stop proposing; readers still waiting get `error` (or are cancelled)."""
        self._closed = True
        for future in (self._in_flight, self._next):
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
