"""Watches, leases, txns and compaction on a 3-node cp cluster in this process."""
from __future__ import annotations

import asyncio

import pytest

from api.service import Compacted, Compare, InvalidRequest, NotFound, PreconditionFailed, TxnOp, WatchBatch

from .cluster import Cluster, make_configs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(make_configs(str(tmp_path), sync="never"))
    await c.start()
    await c.wait_leader()
    yield c
    await c.stop()


async def drain(iterator, until, timeout: float = 15.0) -> list[WatchBatch]:
    batches = []

    async def run():
        async for batch in iterator:
            batches.append(batch)
            if until(batches):
                return

    await asyncio.wait_for(run(), timeout)
    return batches


def events_of(batches):
    return [(e.type, e.kv.key, e.kv.mod_revision) for b in batches for e in b.events]


async def test_watch_replays_then_follows_and_resumes_on_another_node_after_a_leader_change(cluster):
    leader = await cluster.wait_leader()
    writer = cluster.follower(leader)
    first = await writer.put(b"w/0", b"0")
    for i in range(1, 5):
        await writer.put(b"w/%d" % i, b"%d" % i)
    watcher_node = cluster.services[leader]
    watch = watcher_node.watch(b"w/", b"w0", start_revision=first.revision, prev=True, progress_interval=0.2)
    batches = await drain(watch, lambda bs: len(events_of(bs)) >= 5)
    await watch.aclose()
    seen = events_of(batches)
    assert [k for _, k, _ in seen] == [b"w/%d" % i for i in range(5)]
    last_seen = seen[-1][2]
    # the leader goes away; writes continue; a new watch elsewhere from last + 1 misses nothing
    await cluster.stop(leader)
    new_leader = await cluster.wait_leader(timeout=20)
    other = cluster.services[new_leader]
    writes = [await other.put(b"w/%d" % i, b"again", prev=True) for i in range(3)]
    deleted = await other.delete(b"w/", b"w0")
    resumed = other.watch(b"w/", b"w0", start_revision=last_seen + 1, prev=True)
    batches = await drain(resumed, lambda bs: len(events_of(bs)) >= 3 + deleted.deleted)
    await resumed.aclose()
    got = events_of(batches)
    assert got[:3] == [("put", b"w/%d" % i, w.revision) for i, w in enumerate(writes)]
    assert {k for t, k, r in got[3:] if t == "delete" and r == deleted.revision} == {b"w/%d" % i for i in range(5)}
    assert batches[0].events[0].prev.value == b"0", "prev values on request"


async def test_live_watch_sees_each_revision_once_on_every_node_and_progress_when_idle(cluster):
    watches = {s.node_id: s.watch(b"live", progress_interval=0.3) for s in cluster.running()}
    tasks = {n: asyncio.ensure_future(drain(w, lambda bs: len(events_of(bs)) >= 3)) for n, w in watches.items()}
    await asyncio.sleep(0.2)
    service = cluster.running()[0]
    revisions = [(await service.put(b"live", b"%d" % i)).revision for i in range(3)]
    for node_id, task in tasks.items():
        assert [r for _, _, r in events_of(await task)] == revisions, node_id
    idle = cluster.running()[1].watch(b"quiet", progress_interval=0.2)
    batch = await asyncio.wait_for(idle.__anext__(), 5)
    assert batch.events == [] and not batch.canceled and batch.revision >= revisions[-1]
    await idle.aclose()
    for w in watches.values():
        await w.aclose()


async def test_slow_watcher_is_canceled_not_buffered_forever(cluster):
    service = cluster.running()[0]
    service._hub.limits = type(service._hub.limits)(queue_batches=4)
    watch = service.watch(b"slow")
    first = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.1)
    for i in range(12):
        await service.put(b"slow", b"%d" % i)
    batches = [await asyncio.wait_for(first, 5)]
    while not batches[-1].canceled:
        batches.append(await asyncio.wait_for(watch.__anext__(), 5))
    assert "behind" in batches[-1].reason
    await watch.aclose()
    assert not service._hub.watchers, "the watch is freed"


async def test_txn_is_atomic_at_one_revision_and_refuses_duplicate_keys(cluster):
    a, b, _ = cluster.running()
    await a.put(b"acct/x", b"100")
    await a.put(b"acct/y", b"0")
    x, _ = await b.get(b"acct/x")
    result = await b.txn(
        [Compare(b"acct/x", "mod_revision", "==", x.mod_revision)],
        [TxnOp("put", b"acct/x", b"90"), TxnOp("put", b"acct/y", b"10"), TxnOp("get", b"acct/", end=b"acct0")],
        [],
    )
    assert result.succeeded and result.responses[0].revision == result.responses[1].revision == result.revision
    assert [kv.value for kv in result.responses[2].items] == [b"90", b"10"]
    stale = await a.txn([Compare(b"acct/x", "mod_revision", "==", x.mod_revision)], [TxnOp("put", b"acct/x", b"0")],
                        [TxnOp("get", b"acct/x")])  # fmt: skip
    assert not stale.succeeded and stale.responses[0].items[0].value == b"90"
    with pytest.raises(InvalidRequest) as bad:
        await a.txn([], [TxnOp("put", b"k", b"1"), TxnOp("put", b"k", b"2")], [])
    assert bad.value.code == "invalid_txn"


async def test_lease_expiry_deletes_keys_on_every_node_at_one_revision(cluster):
    a, b, c = cluster.running()
    lease = await b.lease_grant(1)
    with pytest.raises(PreconditionFailed) as exists:
        await c.lease_grant(5, lease_id=lease.id)
    assert exists.value.code == "lease_exists"
    for i in range(3):
        await c.put(b"lease/%d" % i, b"v", lease=lease.id)
    info = await a.lease_info(lease.id, keys=True)
    assert info.granted_ttl == 1 and info.keys == [b"lease/0", b"lease/1", b"lease/2"]
    start = (await a.get(b"lease/2"))[0].mod_revision + 1
    watches = [s.watch(b"lease/", b"lease0", start_revision=start) for s in cluster.running()]
    results = await asyncio.gather(*(drain(w, lambda bs: len(events_of(bs)) >= 3, 20) for w in watches))
    per_node = [events_of(bs) for bs in results]
    revisions = {r for events in per_node for _, _, r in events}
    assert len(revisions) == 1 and all(len(e) == 3 and {t for t, _, _ in e} == {"delete"} for e in per_node)
    with pytest.raises(NotFound):
        await a.lease_info(lease.id)
    for w in watches:
        await w.aclose()


async def test_keepalive_holds_a_lease_across_a_leader_change(cluster):
    leader = await cluster.wait_leader()
    client = cluster.follower(leader)
    lease = await client.lease_grant(2)
    await client.put(b"held", b"1", lease=lease.id)
    await cluster.stop(leader)
    loop = asyncio.get_running_loop()
    until = loop.time() + 5
    while loop.time() < until:
        try:
            await client.lease_keepalive(lease.id, timeout=2)
        except Exception:  # noqa: BLE001 - during the election
            pass
        kv, _ = await client.get(b"held", consistency="serializable")
        assert kv is not None, "the lease expired early across the leader change"
        await asyncio.sleep(0.4)
    assert (await client.lease_info(lease.id)).ttl > 0
    await asyncio.sleep(2 + 2.5)  # ttl + the new leader's grace
    kv, _ = await client.get(b"held")
    assert kv is None, "without keepalives it expires"


async def test_compaction_on_every_node(cluster):
    a, b, c = cluster.running()
    revisions = [(await a.put(b"c", b"%d" % i)).revision for i in range(5)]
    with pytest.raises(InvalidRequest) as future:
        await b.compact(revisions[-1] + 100)
    assert "future" in future.value.message
    assert await b.compact(revisions[2]) >= revisions[-1]
    with pytest.raises(Compacted):
        await c.compact(revisions[1])
    for service in cluster.running():
        await service.get(b"c")  # linearizable: this node applied the compaction
        with pytest.raises(Compacted) as gone:
            await service.get(b"c", revision=revisions[0])
        assert gone.value.details["compact_revision"] == revisions[2]
        assert (await service.get(b"c", revision=revisions[3]))[0].value == b"3"
        with pytest.raises(Compacted):
            service.watch(b"c", start_revision=revisions[1])


async def test_membership_grow_to_four_and_remove_the_leader_under_writes(tmp_path):
    import dataclasses

    four = make_configs(str(tmp_path), 4)
    three = [dataclasses.replace(c, members=c.members[:3]) for c in four[:3]]
    cluster = Cluster(three)
    await cluster.start()
    try:
        await cluster.wait_leader()
        acknowledged: dict[bytes, bytes] = {}
        stop = asyncio.Event()

        async def write():
            i = 0
            while not stop.is_set():
                for service in cluster.running():
                    try:
                        await service.put(b"m/%d" % i, b"%d" % i, timeout=2)
                        acknowledged[b"m/%d" % i] = b"%d" % i
                    except Exception:  # noqa: BLE001 - only acknowledged writes count
                        pass
                    i += 1
                await asyncio.sleep(0.01)

        writer = asyncio.ensure_future(write())
        admin = cluster.running()[0]
        new = four[3]
        result = await admin.add_member(new.self_member)
        assert result["members"] == ["n1", "n2", "n3", "n4"]
        with pytest.raises(InvalidRequest):
            await admin.add_member(new.self_member)
        cluster.configs.append(new)
        cluster.services["n4"] = None
        await cluster.start("n4")
        await asyncio.sleep(1.0)
        status = await cluster.services["n4"].status()
        assert len(status["members"]) == 4
        leader = await cluster.wait_leader()
        other = next(s for s in cluster.running() if s.node_id != leader)
        removed = await other.remove_member(leader)
        assert leader not in removed["members"] and len(removed["members"]) == 3
        await cluster.stop(leader)
        await cluster.wait_leader(timeout=20)
        await asyncio.sleep(0.5)
        stop.set()
        await writer
        survivor = cluster.running()[0]
        found = {kv.key: kv.value for kv in (await survivor.range(b"m/", b"m0")).items}
        assert len(acknowledged) > 20
        assert all(found.get(k) == v for k, v in acknowledged.items()), "an acknowledged write was lost"
        with pytest.raises(NotFound):
            await survivor.remove_member(leader)
    finally:
        await cluster.stop()


async def test_a_retried_txn_gets_its_first_answer_or_a_410_once_the_answer_is_cut(tmp_path):
    """A client retrying a txn with the same request id (after a timeout, say) gets the
    first attempt's responses; when those were too large for the bounded retry cache, it
    gets 410 `responses_unavailable` naming the revision it was applied at, and nothing is
    applied twice."""
    from consensus.service import create_service
    from consensus.state_machine import StateMachineLimits

    (config,) = make_configs(str(tmp_path), 1, sync="never")
    service = create_service(config, state_machine_limits=StateMachineLimits(max_request_result_bytes=2048))
    await service.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                await service.put(b"small", b"s")
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await service.put(b"big", b"x" * 4096)
        ops = [TxnOp("put", b"counter", b"1"), TxnOp("get", b"small")]
        first = await service.txn([], ops, [], request_id="retry-small")
        again = await service.txn([], ops, [], request_id="retry-small")
        assert again.revision == first.revision and again.responses == first.responses
        assert first.responses[1].items[0].value == b"s"

        big_ops = [TxnOp("put", b"counter", b"2"), TxnOp("get", b"big")]
        applied = await service.txn([], big_ops, [], request_id="retry-big")
        with pytest.raises(Compacted) as refused:
            await service.txn([], big_ops, [], request_id="retry-big")
        assert refused.value.code == "responses_unavailable"
        assert refused.value.details["revision"] == applied.revision
        kv, _ = await service.get(b"counter")
        assert kv.mod_revision == applied.revision and kv.value == b"2"  # applied once
    finally:
        await service.stop()
