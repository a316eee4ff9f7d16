"""Tombstone reaping: the pure decisions (dynamo/tombstones.py), the replica's guarded
delete, and a 3-node in-process cluster that reaps with a short grace."""
import asyncio
import dataclasses
import random

import pytest

from dynamo.antientropy import AntiEntropyOptions
from dynamo.hints import HintPolicy
from dynamo.node import Replica
from dynamo.service import APOptions, with_tombstone_grace
from dynamo.tombstones import (
    ABSENT, DIFFERS, SAME, ReapPolicy, TombstoneIndex, confirmed, may_propose, replica_answer, tombstone_time,
)
from dynamo.vclock import VClock
from dynamo.versions import new_write
from engines import open_engine

from .cluster import FAST, InProcessCluster


def _tombstone(at=1.0, actor="n1.a"):
    live = new_write(None, VClock(), b"v", actor, at - 0.5)
    return new_write(live, live.clock, None, actor, at)


def test_tombstone_time_only_for_all_tombstone_objects():
    tomb = _tombstone(at=7.0)
    assert tombstone_time(tomb) == 7.0
    assert tombstone_time(None) is None
    live = new_write(None, VClock(), b"v", "n1.a", 3.0)
    assert tombstone_time(live) is None
    # a concurrent write beside a tombstone keeps the key alive
    both = new_write(tomb, VClock(), b"w", "n2.b", 8.0)
    assert tombstone_time(both) is None


def test_index_returns_due_keys_and_rotates_what_it_looked_at():
    index = TombstoneIndex()
    index.update(b"young", 95.0)
    index.update(b"old", 10.0)
    index.update(b"live", 5.0)
    index.update(b"live", None)
    assert len(index) == 2
    assert index.due(now=100.0, grace_s=50.0, limit=1) == []  # looked at "young" only ...
    assert index.due(now=100.0, grace_s=50.0, limit=1) == [b"old"]  # ... which went to the back
    assert index.due(now=200.0, grace_s=50.0, limit=10) == [b"young", b"old"]


def test_may_propose_needs_grace_first_primary_alive_peers_and_an_exchange_since():
    args = dict(now=100.0, grace_s=10.0, primaries=["n1", "n2", "n3"], self_id="n1", alive=lambda n: True,
                synced_at=lambda p: 60.0)
    assert may_propose(50.0, **args)
    assert not may_propose(95.0, **args)  # within the grace period
    assert not may_propose(50.0, **{**args, "self_id": "n2"})  # not the first primary
    assert not may_propose(50.0, **{**args, "alive": lambda n: n != "n3"})
    assert not may_propose(50.0, **{**args, "synced_at": lambda p: None})
    assert not may_propose(50.0, **{**args, "synced_at": lambda p: 40.0 if p == "n3" else 60.0})  # before the delete


def test_replica_answers():
    tomb = _tombstone()
    assert replica_answer(tomb, tomb, hinted=False, ok_ring=True) == SAME
    assert replica_answer(None, tomb, hinted=False, ok_ring=True) == ABSENT
    assert replica_answer(tomb, tomb, hinted=True, ok_ring=True) == DIFFERS
    assert replica_answer(tomb, tomb, hinted=False, ok_ring=False) == DIFFERS
    recreated = new_write(tomb, tomb.clock, b"again", "n1.a", 2.0)
    assert replica_answer(recreated, tomb, hinted=False, ok_ring=True) == DIFFERS
    assert confirmed([SAME, ABSENT]) and not confirmed([SAME, DIFFERS])


def test_grace_must_exceed_the_hint_age_limit_plus_the_expiry_period():
    with pytest.raises(ValueError, match="grace"):
        APOptions(tombstones=ReapPolicy(grace_s=3600.0), hints=HintPolicy(max_age_s=3600.0))
    options = with_tombstone_grace(APOptions(), 2.0)
    assert options.tombstones.grace_s == 2.0 and options.hints.max_age_s == 1.0 and options.hint_expiry_interval_s == 0.5
    assert with_tombstone_grace(APOptions(), 30 * 24 * 3600.0).hints == APOptions().hints
    with pytest.raises(ValueError):
        with_tombstone_grace(APOptions(), 0)


def test_reap_if_unchanged_deletes_only_the_same_tombstone_and_takes_an_epoch():
    async def scenario():
        replica = Replica("n1", open_engine("memory"), rng=random.Random(1))
        live = await replica.coordinate(b"k", b"v", VClock(), hint_for=None, now=1.0)
        tomb = await replica.coordinate(b"k", None, live.clock, hint_for=None, now=2.0)
        # a write that landed after the check: not the proposed tombstone any more
        again = await replica.coordinate(b"k", b"again", tomb.clock, hint_for=None, now=3.0)
        assert not await replica.reap_if_unchanged(b"k", tomb)
        assert replica.fetch(b"k").live_values == [b"again"]
        gone = await replica.coordinate(b"k", None, again.clock, hint_for=None, now=4.0)
        actor = replica.actor
        assert await replica.reap_if_unchanged(b"k", gone)
        assert replica.fetch(b"k") is None and replica.actor != actor  # fresh epoch: no dot reuse
        # a re-create after the reap gets a dot the old tombstone never saw
        new = await replica.coordinate(b"k", b"new", VClock(), hint_for=None, now=5.0)
        assert not gone.clock.covers(new.siblings[0].dot.actor, new.siblings[0].dot.counter)

    asyncio.run(scenario())


REAP_FAST = dataclasses.replace(
    with_tombstone_grace(FAST, 1.0),
    anti_entropy=AntiEntropyOptions(interval_s=0.3),
    tombstones=dataclasses.replace(with_tombstone_grace(FAST, 1.0).tombstones, interval_s=0.3),
)


@pytest.mark.timeout(60)
def test_three_nodes_reap_every_tombstone_and_keep_a_key_recreated_during_the_grace():
    async def scenario():
        cluster = InProcessCluster(3, options=REAP_FAST, replicas=3, read_quorum=2, write_quorum=2)
        await cluster.start()
        try:
            n1 = cluster["n1"]
            for i in range(30):
                ctx = await n1.put(b"k%d" % i, b"v")
                await n1.delete(b"k%d" % i, context=ctx)
            ctx = await n1.put(b"back", b"v1")
            ctx = await n1.delete(b"back", context=ctx)
            await n1.put(b"back", b"v2", context=ctx)  # re-created within the grace
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while loop.time() < deadline:
                held = [(await cluster[n].status())["tombstones"]["held"] for n in ("n1", "n2", "n3")]
                if held == [0, 0, 0]:
                    break
                await asyncio.sleep(0.2)
            assert held == [0, 0, 0]
            reaped = [(await cluster[n].status())["tombstones"]["reaped"] for n in ("n1", "n2", "n3")]
            # every key at least once (an exchange racing a reap may copy a tombstone back)
            assert all(count >= 30 for count in reaped), reaped
            assert cluster["n2"].metrics()["ap_tombstones_reaped_total"] == reaped[1]
            for name in ("n1", "n2", "n3"):
                node = cluster[name]
                assert all(node.replica.fetch(b"k%d" % i) is None for i in range(30))
                assert (await node.get(b"k3")).siblings == []
                assert node.local_get(b"back").siblings == [b"v2"]
                node.replica._check()
            # a key re-created after its reap reads back
            await n1.put(b"k0", b"reborn")
            assert (await cluster["n3"].get(b"k0", r=3)).siblings == [b"reborn"]
        finally:
            await cluster.stop()

    asyncio.run(scenario())
