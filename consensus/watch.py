"""Watches and lease timers of the cp service: the apply path -> asyncio watchers.

The state machine calls `WatchHub.on_apply(revision, events, lease_changes)` on
pysyncobj's tick thread after every command that changed keys or leases. The hub keeps
them in one bounded list and crosses to the event loop with one `call_soon_threadsafe`
per burst (never one per event per watcher); on the loop it hands each watcher the events
in its range.

A watcher first replays history from the engine (the state machine's event and history
rows: they survive restarts and leader changes, so a client reconnecting anywhere with
`start_revision = last seen + 1` misses nothing), then follows live events. It registers
before it reads history, and drops every live event at or below the last revision it
delivered, so the hand-over has no gap and no duplicate.

    hub = WatchHub(loop, state_machine)
    state_machine.listener = hub.on_apply
    async for batch in hub.watch(b"a/", b"a0", start_revision=7, prev=False, progress_interval=10):
        ...

Bounds: the hub's pending list (`max_pending_revisions`: past it the pending events are
dropped and every watcher re-reads them from the engine); each watcher's queue
(`queue_batches`, and `queue_events` since one batch may hold a range delete or a lease
revoke of 10,000 keys: a live watcher that falls that far behind gets a final canceled
batch and is dropped; during replay it just re-reads from the engine); replay reads at
most `replay_batch_events` events at a time. Watchers without `prev` share one copy of a
revision's events stripped of their previous values, made once, not one per watcher.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import AsyncIterator, Callable

from api.service import Compacted, WatchBatch, WatchEvent


@dataclasses.dataclass(frozen=True)
class WatchLimits:
    queue_batches: int = 1024
    queue_events: int = 100_000  # events queued for one watcher, in all its batches
    replay_batch_events: int = 1000
    max_pending_revisions: int = 100_000
    max_watchers: int = 10_000


def in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


class _Watcher:
    def __init__(self, start: bytes, end: bytes | None, prev: bool, capacity: int, event_capacity: int):
        self.start = start
        self.end = end
        self.prev = prev
        self.capacity = capacity
        self.event_capacity = event_capacity
        self.queue: collections.deque[WatchBatch] = collections.deque()
        self.queued_events = 0
        self.wakeup = asyncio.Event()
        self.replaying = True  # reading history from the engine; live batches may be dropped
        self.behind = False  # live batches were dropped: re-read from the engine
        self.overflowed = False
        self.stopping = False

    def offer(self, revision: int, events: list[WatchEvent], stripped: list[WatchEvent]) -> None:
        """Queue what of one revision's events this watcher covers; `stripped` are the same
        events without previous values, for a watcher that did not ask for them."""
        if self.overflowed:
            # Its queue was dropped: anything queued now would follow a gap, and a client
            # resuming from the last revision it saw would skip what was dropped. It gets
            # its cancel next, and nothing after.
            return
        mine = [e for e in (events if self.prev else stripped) if in_range(e.kv.key, self.start, self.end)]
        if not mine:
            return
        full = len(self.queue) >= self.capacity or (self.queue and self.queued_events + len(mine) > self.event_capacity)
        if full:
            self.clear()
            if self.replaying:
                self.behind = True
            else:
                self.overflowed = True
        else:
            self.queue.append(WatchBatch(revision=revision, events=mine))
            self.queued_events += len(mine)
        self.wakeup.set()

    def clear(self) -> None:
        self.queue.clear()
        self.queued_events = 0

    def take(self) -> WatchBatch:
        batch = self.queue.popleft()
        self.queued_events -= len(batch.events)
        return batch


class WatchHub:
    def __init__(self, loop: asyncio.AbstractEventLoop, state_machine, limits: WatchLimits | None = None,
                 on_leases: Callable[[list], None] | None = None):  # fmt: skip
        self.loop = loop
        self.sm = state_machine
        self.limits = limits or WatchLimits()
        self.on_leases = on_leases
        self.revision = state_machine.revision  # the newest revision handed to watchers
        self.watchers: set[_Watcher] = set()
        self._lock = threading.Lock()
        self._pending: list[tuple[int, list, list]] = []
        self._dropped = False
        self._scheduled = False
        self.wakeups = 0
        self.events_delivered = 0
        self.canceled_slow = 0
        self.closed = False

    # tick thread
    def on_apply(self, revision: int, events: list, lease_changes: list) -> None:
        if not self.watchers and not lease_changes:
            # Nobody to tell (a watcher registering now reads this revision from the engine,
            # which already holds it); just keep the progress revision moving.
            events = []
        with self._lock:
            if len(self._pending) >= self.limits.max_pending_revisions:
                self._pending = [(r, [], l) for r, _, l in self._pending if l]
                self._dropped = True
            self._pending.append((revision, events, lease_changes))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed: shutting down
            pass

    # loop thread
    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, False
            self._scheduled = False
        self.wakeups += 1
        if any(kind == "installed" for _, _, notices in pending for kind, *_ in notices):
            dropped = True  # a snapshot replaced the store: no events came for what it holds
        if dropped:
            for watcher in self.watchers:
                watcher.clear()
                watcher.behind = True
                watcher.wakeup.set()
        leases = []
        for revision, events, lease_changes in pending:
            if events:
                stripped = events
                if any(e.prev is not None for e in events) and any(not w.prev for w in self.watchers):
                    stripped = [WatchEvent(e.type, e.kv, None) for e in events]
                for watcher in self.watchers:
                    watcher.offer(revision, events, stripped)
            if lease_changes:
                leases.extend(lease_changes)
            self.revision = max(self.revision, revision)
        if leases and self.on_leases is not None:
            self.on_leases(leases)

    def close(self) -> None:
        self.closed = True
        for watcher in self.watchers:
            watcher.stopping = True
            watcher.wakeup.set()

    def watch(self, start: bytes, end: bytes | None, *, start_revision: int | None, prev: bool,
              progress_interval: float) -> AsyncIterator[WatchBatch]:  # fmt: skip
        """See CPExtras.watch. Raises Compacted at the first step when history is gone."""
        if start_revision is not None and start_revision < self.sm.compact_revision:
            raise Compacted(
                f"revision {start_revision} was compacted; the oldest watchable revision is {self.sm.compact_revision}",
                compact_revision=self.sm.compact_revision,
            )
        if len(self.watchers) >= self.limits.max_watchers:
            from api.service import Unavailable

            raise Unavailable(f"this node serves {self.limits.max_watchers} watches already", reason="too_many_watches")
        watcher = _Watcher(start, end, prev, self.limits.queue_batches, self.limits.queue_events)
        # Pinned now; the watcher registers when first iterated (an iterator never started
        # holds nothing), still before its first history read: nothing falls in between.
        next_revision = start_revision if start_revision else self.sm.revision + 1
        return self._run(watcher, next_revision, progress_interval)

    async def _run(self, watcher: _Watcher, next_revision: int, progress_interval: float) -> AsyncIterator[WatchBatch]:
        limits = self.limits
        loop = asyncio.get_running_loop()
        self.watchers.add(watcher)
        try:
            while True:
                if watcher.stopping or self.closed:
                    yield WatchBatch(revision=self.revision, events=[], canceled=True, reason="node stopping")
                    return
                if watcher.replaying or watcher.behind:
                    watcher.behind = False
                    try:
                        found, last, complete = await loop.run_in_executor(
                            None, self.sm.events, watcher.start, watcher.end, next_revision, limits.replay_batch_events
                        )
                    except Compacted as exc:
                        yield WatchBatch(revision=self.revision, events=[], canceled=True,
                                         reason=f"history compacted: {exc.message}",
                                         compact_revision=self.sm.compact_revision)  # fmt: skip
                        return
                    events = []
                    for _, evs in found:
                        events.extend(e if watcher.prev else WatchEvent(e.type, e.kv, None) for e in evs)
                    caught_up = complete
                    next_revision = max(next_revision, last + 1)
                    if events:
                        self.events_delivered += len(events)
                        yield WatchBatch(revision=found[-1][0], events=events)
                    if caught_up and not watcher.behind:
                        watcher.replaying = False
                    continue
                if watcher.queue:
                    batch = watcher.take()
                    if batch.revision < next_revision:
                        continue  # already replayed from the engine
                    next_revision = batch.revision + 1
                    self.events_delivered += len(batch.events)
                    yield batch
                    continue
                if watcher.overflowed:
                    self.canceled_slow += 1
                    yield WatchBatch(revision=self.revision, events=[], canceled=True,
                                     reason=f"watcher fell more than {watcher.capacity} batches or "
                                            f"{watcher.event_capacity} events behind")  # fmt: skip
                    return
                watcher.wakeup.clear()
                try:
                    await asyncio.wait_for(watcher.wakeup.wait(), progress_interval)
                except asyncio.TimeoutError:
                    if not watcher.queue and not watcher.behind:
                        # Only revisions the hub handed out: a later event can't be older.
                        revision = max(self.revision, next_revision - 1)
                        yield WatchBatch(revision=revision, events=[])
        finally:
            self.watchers.discard(watcher)
