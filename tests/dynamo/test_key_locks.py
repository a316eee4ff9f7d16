"""Per-key mutual exclusion of the replica (dynamo/node.py `KeyLocks`)."""
import asyncio

import pytest

from dynamo.node import KeyLocks

pytestmark = pytest.mark.timeout(30)


async def test_one_holder_per_key_in_arrival_order_and_no_entry_left():
    locks = KeyLocks()
    order, inside = [], set()

    async def worker(i, key):
        async with locks.hold(key):
            assert key not in inside
            inside.add(key)
            order.append(i)
            await asyncio.sleep(0.001)
            inside.discard(key)

    await asyncio.gather(*(worker(i, b"k") for i in range(10)), *(worker(100 + i, b"other") for i in range(3)))
    assert [i for i in order if i < 100] == list(range(10))
    assert len(locks) == 0


async def test_a_cancelled_waiter_neither_holds_nor_blocks_the_key():
    locks = KeyLocks()
    await locks.acquire(b"k")
    waiting = asyncio.ensure_future(locks.acquire(b"k"))
    behind = asyncio.ensure_future(locks.acquire(b"k"))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    locks.release(b"k")
    await asyncio.wait_for(behind, 1)  # the key went to the next live waiter
    assert waiting.cancelled()
    locks.release(b"k")
    assert len(locks) == 0


async def test_a_waiter_cancelled_just_after_its_turn_came_passes_the_key_on():
    locks = KeyLocks()
    await locks.acquire(b"k")
    first = asyncio.ensure_future(locks.acquire(b"k"))
    second = asyncio.ensure_future(locks.acquire(b"k"))
    await asyncio.sleep(0)
    locks.release(b"k")  # first's turn: handed over, but first has not run yet
    first.cancel()
    await asyncio.wait_for(second, 1)
    locks.release(b"k")
    assert len(locks) == 0
