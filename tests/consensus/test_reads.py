"""Read barriers coalesce, and a read only trusts a barrier proposed after it arrived."""
from __future__ import annotations

import asyncio

import pytest

from consensus.reads import ReadBarrier


class FakeLog:
    """A log whose barriers commit when the test says so. `applied` is the state a read sees."""

    def __init__(self):
        self.proposed: list[asyncio.Future] = []
        self.applied = 0  # writes applied locally
        self.committed = 0  # writes committed by the cluster (visible to other clients)

    async def propose(self):
        future = asyncio.get_running_loop().create_future()
        # A barrier orders after every write committed when it is proposed.
        self.proposed.append(future)
        covers = self.committed
        await future
        self.applied = max(self.applied, covers)
        return covers

    def commit_next(self, fail: Exception | None = None):
        future = next(f for f in self.proposed if not f.done())
        if fail:
            future.set_exception(fail)
        else:
            future.set_result(None)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_barrier_serves_every_read_waiting_for_it():
    log = FakeLog()
    barrier = ReadBarrier(log.propose)
    first = asyncio.ensure_future(barrier.wait())
    await settle()
    assert len(log.proposed) == 1
    # Reads that arrive while B1 is in flight must not use it: they queue for B2.
    later = [asyncio.ensure_future(barrier.wait()) for _ in range(50)]
    await settle()
    assert len(log.proposed) == 1, "B2 waits until B1 finishes"
    barrier._check()
    log.commit_next()
    await settle()
    barrier._check()
    assert first.done() and not any(r.done() for r in later)
    assert len(log.proposed) == 2, "B2 proposed once B1 finished"
    log.commit_next()
    await settle()
    assert all(r.done() for r in later)
    barrier._check()
    assert barrier.barriers == 2 and barrier.reads == 51 and barrier.pending() == 0


async def test_a_read_sees_writes_that_completed_before_it_arrived():
    log = FakeLog()
    barrier = ReadBarrier(log.propose)
    early = asyncio.ensure_future(barrier.wait())
    await settle()
    log.committed = 1  # a write completes after B1 was proposed
    reader = asyncio.ensure_future(barrier.wait())  # ...and before this read arrived
    await settle()
    log.commit_next()
    await settle()
    assert early.result() == 0
    assert not reader.done(), "B1 predates the write; the read must wait for B2"
    log.commit_next()
    await settle()
    assert reader.result() == 1 and log.applied == 1


async def test_a_failed_barrier_fails_its_readers_only():
    log = FakeLog()
    barrier = ReadBarrier(log.propose)
    first = asyncio.ensure_future(barrier.wait())
    await settle()
    second = asyncio.ensure_future(barrier.wait())
    await settle()
    log.commit_next(fail=RuntimeError("no leader"))
    await settle()
    with pytest.raises(RuntimeError):
        first.result()
    log.commit_next()
    await settle()
    assert second.done() and second.exception() is None


async def test_a_reader_that_gives_up_does_not_cancel_the_shared_barrier():
    log = FakeLog()
    barrier = ReadBarrier(log.propose)
    impatient = asyncio.ensure_future(asyncio.wait_for(barrier.wait(), 0.01))
    await settle()
    patient = asyncio.ensure_future(barrier.wait())
    await asyncio.sleep(0.05)
    assert impatient.done() and isinstance(impatient.exception(), asyncio.TimeoutError)
    log.commit_next()
    await settle()
    # `patient` arrived while B1 was in flight (proposed by `impatient`), so it needs B2.
    log.commit_next()
    await settle()
    assert patient.done() and patient.exception() is None
    await barrier.close()


async def test_concurrent_reads_cost_at_most_two_barriers_per_round():
    proposals = 0

    async def propose():
        nonlocal proposals
        proposals += 1
        await asyncio.sleep(0.01)

    barrier = ReadBarrier(propose)
    await asyncio.gather(*(barrier.wait() for _ in range(1000)))
    # All arrive before the first barrier's task runs, so they all join it.
    assert proposals == 1


async def test_reads_join_a_barrier_until_it_is_proposed_and_never_after():
    log = FakeLog()
    barrier = ReadBarrier(log.propose)
    a = asyncio.ensure_future(barrier.wait())
    b = asyncio.ensure_future(barrier.wait())  # same loop turn: B1 is not proposed yet
    await settle()
    c = asyncio.ensure_future(barrier.wait())  # B1 proposed: c needs B2
    await settle()
    assert len(log.proposed) == 1
    log.commit_next()
    await settle()
    assert a.done() and b.done() and not c.done()
    log.commit_next()
    await settle()
    assert c.done() and barrier.barriers == 2


async def test_a_pipeline_of_barriers_gives_a_late_read_its_own():
    log = FakeLog()
    barrier = ReadBarrier(log.propose, max_in_flight=2)
    early = asyncio.ensure_future(barrier.wait())
    await settle()
    log.committed = 1  # a write completes after B1 was proposed, before `late` arrives
    late = asyncio.ensure_future(barrier.wait())
    await settle()
    assert len(log.proposed) == 2, "B2 proposed without waiting for B1"
    latest = [asyncio.ensure_future(barrier.wait()) for _ in range(10)]
    await settle()
    assert len(log.proposed) == 2 and barrier.pending() == 3, "pipeline full: the rest queue for B3"
    barrier._check()
    log.commit_next()  # B1
    await settle()
    assert early.result() == 0 and not late.done()
    assert len(log.proposed) == 3, "B3 proposed once a slot freed"
    log.commit_next()  # B2: proposed after the write completed
    await settle()
    assert late.result() == 1 and not any(r.done() for r in latest)
    log.commit_next()
    await settle()
    assert all(r.done() for r in latest)
    barrier._check()
    assert barrier.pending() == 0 and barrier.barriers == 3
