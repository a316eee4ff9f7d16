"""Group commit of replica writes (dynamo/commit.py)."""
import asyncio
import random
import threading

import pytest

from dynamo.commit import CommitQueue
from dynamo.node import Replica
from dynamo.vclock import VClock
from engines import open_engine

pytestmark = pytest.mark.timeout(60)


class SlowEngine:
    """Records each engine write; every write takes `delay` s (an fsync) in its thread."""

    def __init__(self, delay=0.02, refuse=b"bad"):
        self.delay, self.refuse = delay, refuse
        self.writes = []
        self.data = {}
        self.threads = set()

    def write(self, batch):
        self.threads.add(threading.get_ident())
        if any(key == self.refuse for _, key, _ in batch):
            raise ValueError("refused key")
        threading.Event().wait(self.delay)
        self.writes.append(list(batch))
        for op, key, value in batch:
            if op == "put":
                self.data[key] = value
            else:
                self.data.pop(key, None)


async def test_concurrent_writes_share_engine_writes_and_return_only_after_theirs():
    engine = SlowEngine()
    queue = CommitQueue(engine)
    done = []

    async def writer(i):
        await queue.write([("put", b"k%d" % i, b"v%d" % i)])
        assert engine.data[b"k%d" % i] == b"v%d" % i  # in the engine when acknowledged
        done.append(i)

    await asyncio.gather(*(writer(i) for i in range(100)))
    assert sorted(done) == list(range(100))
    assert queue.batches == 100
    assert len(engine.writes) == queue.groups <= 10  # ~ one group per "fsync", not 100
    assert threading.get_ident() not in engine.threads  # off the event loop


async def test_order_is_kept_within_and_across_groups():
    engine = SlowEngine(delay=0.005)
    queue = CommitQueue(engine)
    await asyncio.gather(*(queue.write([("put", b"k", b"%d" % i)]) for i in range(50)))
    flat = [value for group in engine.writes for _, _, value in group]
    assert flat == [b"%d" % i for i in range(50)] and engine.data[b"k"] == b"49"


async def test_a_refused_batch_fails_alone():
    engine = SlowEngine(delay=0.01)
    queue = CommitQueue(engine)
    results = await asyncio.gather(
        *(queue.write([("put", b"bad" if i == 5 else b"k%d" % i, b"v")]) for i in range(20)), return_exceptions=True
    )
    assert isinstance(results[5], ValueError)
    assert all(r is None for i, r in enumerate(results) if i != 5)
    assert set(engine.data) == {b"k%d" % i for i in range(20) if i != 5}


async def test_group_size_is_bounded_by_the_engine_batch_limit():
    engine = SlowEngine(delay=0.01)
    queue = CommitQueue(engine)
    queue.max_group_ops = 8
    await asyncio.gather(*(queue.write([("put", b"k%d" % i, b"v"), ("put", b"j%d" % i, b"v")]) for i in range(40)))
    assert max(len(w) for w in engine.writes) <= 8
    assert len(engine.data) == 80


async def test_pending_batches_are_bounded():
    engine = SlowEngine(delay=0.01)
    queue = CommitQueue(engine, max_pending=3)
    most = 0

    async def writer(i):
        nonlocal most
        most = max(most, len(queue._waiting))
        await queue.write([("put", b"k%d" % i, b"v")])

    await asyncio.gather(*(writer(i) for i in range(30)))
    assert most <= 3 and len(engine.data) == 30


class DelayedEngine:
    """A memory engine whose batch writes land only after a pause (a slow fsync)."""

    def __init__(self, delay):
        self.inner, self.delay = open_engine("memory"), delay

    def write(self, batch):
        threading.Event().wait(self.delay)
        self.inner.write(batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_cancelled_writer_keeps_its_key_lock_until_the_write_is_in():
    # A later read-modify-write of the key must see an earlier write that did land.
    engine = DelayedEngine(0.2)
    replica = Replica("n1", engine, rng=random.Random(1), offload=True)
    try:
        first = asyncio.ensure_future(replica.coordinate(b"k", b"a", VClock(), hint_for=None, now=1.0))
        while not replica._commits._running:  # its batch is with the worker thread now
            await asyncio.sleep(0)
        first.cancel()
        second = await replica.coordinate(b"k", b"b", VClock(), hint_for=None, now=2.0)
        with pytest.raises(asyncio.CancelledError):
            await first
        # "a" landed (it was being written when cancelled): "b", minted without a
        # context, must sit beside it, not silently replace it.
        assert sorted(second.live_values) == [b"a", b"b"]
        assert replica.fetch(b"k").same_as(second)
    finally:
        engine.close()


async def test_a_replica_on_a_real_engine_shares_fsyncs(tmp_path):
    engine = open_engine("lsm", str(tmp_path), sync="always")
    replica = Replica("n1", engine, rng=random.Random(1), offload=True)
    try:
        await asyncio.gather(
            *(replica.coordinate(b"k%d" % i, b"v", VClock(), hint_for=None, now=1.0) for i in range(64))
        )
        assert replica._commits.batches == 64 and replica._commits.groups < 64
        assert all(replica.fetch(b"k%d" % i).live_values == [b"v"] for i in range(64))
    finally:
        engine.close()


async def test_queued_writers_beyond_the_pending_cap_survive_cancellation():
    # A writer cancelled while it waits for a slot gives up its place, not someone else's.
    engine = SlowEngine(delay=0.02)
    queue = CommitQueue(engine, max_pending=2)
    writers = [asyncio.ensure_future(queue.write([("put", b"k%d" % i, b"v")])) for i in range(8)]
    await asyncio.sleep(0)
    writers[3].cancel()
    writers[5].cancel()
    results = await asyncio.gather(*writers, return_exceptions=True)
    cancelled = [i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)]
    assert cancelled == [3, 5]
    assert sorted(engine.data) == sorted(b"k%d" % i for i in range(8) if i not in (3, 5))
    assert queue._pending == 0 and not queue._slot_waiters
    queue.close()


async def test_close_stops_the_worker_thread_after_its_group():
    engine = SlowEngine(delay=0.01)
    queue = CommitQueue(engine)
    await queue.write([("put", b"a", b"1")])
    worker = queue._worker
    assert worker is not None and worker.is_alive()
    queue.close()
    assert not worker.is_alive()
    await queue.write([("put", b"b", b"2")])  # a later write starts a new worker
    assert engine.data[b"b"] == b"2"
    queue.close()
