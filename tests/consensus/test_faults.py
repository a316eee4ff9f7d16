"""Slow fault runs: leader changes under concurrent compare-and-swap load (in-process)."""
from __future__ import annotations

import asyncio
import random

import pytest

from api.service import OutcomeUnknown, PreconditionFailed, Unavailable

from .cluster import Cluster, make_configs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _increment(service_for, key: bytes, writer: int, n: int, acked: list) -> None:
    """CAS-increment `key` n times. An ambiguous outcome is retried as the very same write
    (same request id, value and compare) until it answers; only then is the key re-read."""
    attempt = 0
    for i in range(n):
        while True:
            attempt += 1
            request_id = f"w{writer}-{i}-{attempt}"
            try:
                kv, _ = await service_for().get(key, timeout=2.0)
            except (Unavailable, OutcomeUnknown):
                await asyncio.sleep(0.05)
                continue
            value = b"%d" % ((int(kv.value) if kv else 0) + 1)
            mod = kv.mod_revision if kv else 0
            outcome = None
            while outcome is None:
                try:
                    await service_for().put(key, value, if_mod_revision=mod, request_id=request_id, timeout=2.0)
                    outcome = "applied"
                except PreconditionFailed:
                    outcome = "lost the race"
                except Unavailable:
                    outcome = "not applied"
                except OutcomeUnknown:
                    await asyncio.sleep(0.05)  # the same write again: applies at most once
            if outcome == "applied":
                acked.append(request_id)
                break


@pytest.mark.parametrize("sync", ["always", "never"])
async def test_no_acknowledged_increment_is_lost_or_doubled_across_leader_changes(tmp_path, sync):
    cluster = Cluster(make_configs(str(tmp_path), sync=sync))
    await cluster.start()
    try:
        await cluster.wait_leader()
        rng = random.Random(7)

        def any_running():
            return rng.choice(cluster.running())

        acked: list[str] = []
        writers = [asyncio.ensure_future(_increment(any_running, b"counter", w, 40, acked)) for w in range(8)]
        for _ in range(3):
            await asyncio.sleep(1.0)
            leader = await cluster.wait_leader(20)
            await cluster.stop(leader)
            await asyncio.sleep(1.0)
            await cluster.start(leader)
        await asyncio.wait_for(asyncio.gather(*writers), 240)
        await cluster.wait_leader(20)
        for service in cluster.running():
            kv, _ = await service.get(b"counter")
            assert int(kv.value) == len(acked) == 8 * 40
            assert kv.version == len(acked)
    finally:
        await cluster.stop()


async def test_a_large_snapshot_does_not_stall_writes_or_elections(tmp_path):
    cluster = Cluster(make_configs(str(tmp_path), sync="always"))
    await cluster.start()
    try:
        leader_id = await cluster.wait_leader()
        leader = cluster.services[leader_id]
        value = b"v" * 200
        batch = 200
        for start in range(0, 30_000, batch):
            await asyncio.gather(*(leader.put(b"big/%06d" % i, value) for i in range(start, start + batch)))
        changes_before = sum(s.metrics()["raft_leader_changes_total"] for s in cluster.running())
        for service in cluster.running():
            service.force_snapshot()
        latencies = []
        loop = asyncio.get_running_loop()
        while not all(s.metrics()["raft_snapshots_written"] >= 1 for s in cluster.running()):
            started = loop.time()
            await leader.put(b"during", b"x", timeout=5.0)
            latencies.append(loop.time() - started)
            assert len(latencies) < 20_000, "the snapshots never finished"
        seconds = max(s.metrics()["raft_snapshot_last_seconds"] for s in cluster.running())
        print(f"\nsnapshot of 30000 keys: {seconds:.2f} s; {len(latencies)} writes meanwhile, "
              f"max latency {max(latencies) * 1000:.1f} ms")
        # Three nodes share this process's GIL here, so only a gross stall is caught.
        assert max(latencies) < 1.0, "a write waited over a second: the snapshot stalled the tick thread"
        assert sum(s.metrics()["raft_leader_changes_total"] for s in cluster.running()) == changes_before
    finally:
        await cluster.stop()
