"""WatchHub over a real state machine, without Raft: the apply path drives it directly."""
from __future__ import annotations

import asyncio

import pytest

from consensus.state_machine import KVStateMachine, make_put
from consensus.watch import WatchHub, WatchLimits
from engines import open_engine

from .test_state_machine import Log

pytestmark = pytest.mark.timeout(30)


async def take(iterator, count: int) -> list:
    events = []
    async for batch in iterator:
        assert not batch.canceled, batch.reason
        events += [(e.type, e.kv.key, e.kv.mod_revision) for e in batch.events]
        if len(events) >= count:
            return events
    return events


async def test_a_snapshot_install_makes_live_watchers_reread_from_the_engine():
    leader = KVStateMachine(open_engine("memory"))
    leader_log = Log(leader)
    follower = KVStateMachine(open_engine("memory"))
    hub = WatchHub(asyncio.get_running_loop(), follower)
    follower.listener = hub.on_apply
    watch = hub.watch(b"k", b"l", start_revision=None, prev=False, progress_interval=5)
    task = asyncio.ensure_future(take(watch, 5))
    await asyncio.sleep(0.05)
    for i in range(5):
        leader_log(make_put(b"k%d" % i, b"v"))
    source = leader.capture_snapshot()
    rows = list(source.rows())
    source.done()
    # the follower was too far behind: it gets the whole store, not the commands
    follower.install_snapshot(leader_log.index, leader.revision, leader.compact_revision, iter(rows))
    events = await asyncio.wait_for(task, 5)
    assert events == [("put", b"k%d" % i, i + 2) for i in range(5)]
    await watch.aclose()


async def test_pending_overflow_drops_events_and_watchers_catch_up_from_history():
    sm = KVStateMachine(open_engine("memory"))
    log = Log(sm)
    hub = WatchHub(asyncio.get_running_loop(), sm, WatchLimits(max_pending_revisions=3))
    sm.listener = hub.on_apply
    watch = hub.watch(b"a", b"b", start_revision=None, prev=True, progress_interval=5)
    task = asyncio.ensure_future(take(watch, 20))
    await asyncio.sleep(0.05)
    for i in range(20):  # no loop turn in between: the hub's pending list overflows
        log(make_put(b"a%02d" % i, b"%d" % i))
    assert len(hub._pending) <= 3 + 1
    events = await asyncio.wait_for(task, 5)
    assert [r for _, _, r in events] == list(range(2, 22)), "every revision once, in order"
    await watch.aclose()
    assert not hub.watchers


async def test_a_watcher_behind_by_more_events_than_its_bound_is_canceled_even_in_few_batches():
    """A range delete is one batch of up to 10,000 events: a watcher that does not read
    is bounded by the events it holds, not only by its batch count."""
    from consensus.state_machine import make_delete

    sm = KVStateMachine(open_engine("memory"))
    log = Log(sm)
    hub = WatchHub(asyncio.get_running_loop(), sm, WatchLimits(queue_batches=100, queue_events=50))
    sm.listener = hub.on_apply
    for i in range(40):
        log(make_put(b"a%02d" % i, b"v"))
    slow = hub.watch(b"a", b"b", start_revision=None, prev=False, progress_interval=5)
    reader = hub.watch(b"a", b"b", start_revision=None, prev=True, progress_interval=5)
    first = asyncio.ensure_future(slow.__anext__())  # registers; takes one batch, then no more
    got = asyncio.ensure_future(take(reader, 100))
    await asyncio.sleep(0.05)
    log(make_delete(b"a", b"b"))  # 40 events in one batch: within the bound
    await asyncio.sleep(0.01)
    for i in range(60):  # one batch each: the slow watcher passes 50 queued events
        log(make_put(b"a%02d" % (i % 40), b"w"))
        await asyncio.sleep(0.001)  # the reading watcher keeps up
    batch = await asyncio.wait_for(first, 5)
    assert len(batch.events) == 40 and all(e.prev is None for e in batch.events), "stripped of prev"
    batch = await asyncio.wait_for(slow.__anext__(), 5)
    assert batch.canceled and "50 events" in batch.reason
    delivered = await asyncio.wait_for(got, 5)
    assert len(delivered) == 100  # the other watcher, reading, missed nothing
    await slow.aclose()
    await reader.aclose()
