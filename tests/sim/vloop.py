"""An asyncio event loop on a virtual clock: when nothing is ready, time jumps straight to
the next timer instead of waiting, so a simulated minute of timeouts, probes and handoff
runs in milliseconds, and the same program gives the same schedule every time.

    loop = VirtualLoop(); loop.run_until_complete(asyncio.sleep(60)); loop.time() -> 60.0

Only for code that does no real I/O (the simulator's network is in memory): a callback
from another thread would be picked up late, and nothing here ever blocks.
"""
from __future__ import annotations

import asyncio
import selectors


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: "VirtualLoop | None" = None

    def select(self, timeout=None):
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing is scheduled and nothing can wake the loop")
        if timeout > 0:
            self.loop._now += timeout
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        selector = _JumpingSelector()
        super().__init__(selector=selector)
        selector.loop = self

    def time(self) -> float:
        return self._now


def run(coro, start: float = 0.0):
    """Run `coro` to completion on a fresh virtual loop; returns its result."""
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
