"""A 3-node cp cluster in this process, on 127.0.0.1 with free ports."""
from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

from api.service import InvalidRequest, OutcomeUnknown, PreconditionFailed, Unavailable

from consensus import snapshot as snapshot_file
from consensus.service import create_service

from .cluster import Cluster, make_configs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(make_configs(str(tmp_path), sync="always"))
    await c.start()
    await c.wait_leader()
    yield c
    await c.stop()


async def test_writes_through_a_follower_read_back_from_every_node(cluster):
    leader = await cluster.wait_leader()
    follower = cluster.follower(leader)
    result = await follower.put(b"config/a", b"1")
    assert result.created
    for service in cluster.running():
        kv, revision = await service.get(b"config/a")
        assert kv.value == b"1" and kv.mod_revision == result.revision and revision >= result.revision
    # Each follower write is visible to a linearizable read on any other node at once.
    others = [s for s in cluster.running() if s is not follower]
    for i in range(20):
        written = await follower.put(b"config/a", b"%d" % i)
        kv, _ = await others[i % len(others)].get(b"config/a")
        assert kv.value == b"%d" % i and kv.mod_revision == written.revision


async def test_compare_and_swap_and_prev_across_nodes(cluster):
    a, b, c = cluster.running()
    created = await a.put(b"lock", b"owner-a", if_mod_revision=0)
    with pytest.raises(PreconditionFailed) as failed:
        await b.put(b"lock", b"owner-b", if_mod_revision=0)
    assert failed.value.details["mod_revision"] == created.revision
    swapped = await c.put(b"lock", b"owner-c", if_mod_revision=created.revision, prev=True)
    assert swapped.prev.value == b"owner-a"
    deleted = await b.delete(b"lock", prev=True)
    assert deleted.deleted == 1 and deleted.prev[0].value == b"owner-c"
    kv, _ = await a.get(b"lock", revision=swapped.revision)
    assert kv.value == b"owner-c", "history stays readable after the delete"


async def test_a_retried_request_id_applies_once_on_any_node(cluster):
    a, b, _ = cluster.running()
    first = await a.put(b"counter", b"1", request_id="client-7:1")
    again = await b.put(b"counter", b"1", request_id="client-7:1")
    assert again.revision == first.revision
    kv, revision = await a.get(b"counter")
    assert kv.version == 1 and revision == first.revision


async def test_prefix_delete_and_range_on_a_follower(cluster):
    leader = await cluster.wait_leader()
    follower = cluster.follower(leader)
    for i in range(10):
        await follower.put(b"jobs/%02d" % i, b"x")
    await follower.put(b"other", b"y")
    page = await follower.range(b"jobs/", b"jobs0", limit=4)
    assert [kv.key for kv in page.items] == [b"jobs/00", b"jobs/01", b"jobs/02", b"jobs/03"]
    assert page.more and page.count == 10
    deleted = await follower.delete(b"jobs/", b"jobs0")
    assert deleted.deleted == 10
    everything = await cluster.services[leader].range(b"\x00", b"\x00")
    assert [kv.key for kv in everything.items] == [b"other"]


async def test_a_bad_command_in_the_log_does_not_wedge_the_cluster(cluster):
    a = cluster.running()[0]
    result = await a._submit({"v": 1, "op": "no-such-op"}, 5.0, retry_unknown=False)
    assert result["error"] == "invalid_command"
    result = await a._submit({"v": 1, "op": "put", "key": b"k", "value": "not bytes"}, 5.0, retry_unknown=False)
    assert result["error"] == "invalid_value"
    assert (await a.put(b"still", b"works")).revision > 1
    with pytest.raises(InvalidRequest):
        await a.put(b"", b"empty key is refused before the log")


async def test_concurrent_reads_share_barriers(cluster):
    leader = await cluster.wait_leader()
    follower = cluster.follower(leader)
    await follower.put(b"hot", b"1")
    before = follower.metrics()["read_barriers_total"]
    results = await asyncio.gather(*(follower.get(b"hot") for _ in range(200)))
    assert all(kv.value == b"1" for kv, _ in results)
    used = follower.metrics()["read_barriers_total"] - before
    assert 1 <= used < 50, f"200 concurrent reads used {used} barriers"


async def test_cluster_status_names_the_leader(cluster):
    leader = await cluster.wait_leader()
    # A leader needs a majority only: the last link may still be connecting.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        statuses = [await s.status() for s in cluster.running()]
        if all(m["reachable"] for status in statuses for m in status["members"]):
            break
        assert loop.time() < deadline, "some member stayed unreachable"
        await asyncio.sleep(0.05)
    for service in cluster.running():
        status = await service.status()
        assert status["mode"] == "cp" and status["node"] == service.node_id and status["leader"] == leader
        roles = {m["id"]: m["role"] for m in status["members"]}
        assert roles[leader] == "leader" and list(roles.values()).count("leader") == 1
        assert all(m["reachable"] for m in status["members"])
        assert service.health() == (True, "ok")
        assert service.metrics()["raft_has_leader"] == 1.0


async def test_a_survivor_of_two_stopped_nodes_answers_within_the_timeout(cluster):
    leader = await cluster.wait_leader()
    survivor = cluster.services[leader]  # the hardest case: it believes it leads
    await survivor.put(b"k", b"before")
    for node_id in list(cluster.services):
        if node_id != leader:
            await cluster.stop(node_id)
    for attempt in range(2):  # the first while it still believes it leads, the second after
        started = time.monotonic()
        with pytest.raises((Unavailable, OutcomeUnknown)):
            await survivor.put(b"k", b"after", timeout=1.0)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await survivor.get(b"k", timeout=1.0)
        assert time.monotonic() - started < 1.5
    kv, _ = await survivor.get(b"k", consistency="serializable")
    assert kv.value == b"before"
    healthy, reason = survivor.health()
    assert not healthy and reason


async def test_a_follower_cut_off_from_the_rest_answers_503(tmp_path):
    c = Cluster(make_configs(str(tmp_path), sync="never"))
    await c.start()
    leader = await c.wait_leader()
    follower = c.follower(leader)
    await follower.put(b"k", b"v")
    for node_id in list(c.services):
        if node_id != follower.node_id:
            await c.stop(node_id)
    try:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await follower.put(b"k", b"w", timeout=1.0)
        with pytest.raises(Unavailable):
            await follower.get(b"k", timeout=1.0)
        assert time.monotonic() - started < 2.5
        assert (await follower.get(b"k", consistency="serializable"))[0].value == b"v"
    finally:
        await c.stop()


async def _write_some(service, prefix: bytes, n: int) -> list:
    return [await service.put(prefix + b"%03d" % i, b"value-%d" % i) for i in range(n)]


@pytest.mark.parametrize("engine", ["memory", "lsm", "hash"])
async def test_a_full_restart_keeps_every_write_and_revision(tmp_path, engine):
    configs = make_configs(str(tmp_path), sync="always", engine=engine)
    c = Cluster(configs)
    await c.start()
    leader = await c.wait_leader()
    results = await _write_some(c.follower(leader), b"k", 30)
    await c.services[leader].delete(b"k005")
    revision = (await c.services[leader].status())["revision"]
    await c.stop()

    c = Cluster(configs)
    await c.start()
    try:
        await c.wait_leader()
        for service in c.running():
            kv, seen = await service.get(b"k010")
            assert kv.mod_revision == results[10].revision and seen == revision
            assert (await service.get(b"k005"))[0] is None
            assert (await service.get(b"k005", revision=results[5].revision))[0].value == b"value-5"
        assert (await c.running()[0].put(b"new", b"x")).revision == revision + 1
        if engine != "memory":
            # A persistent engine already held the writes: replay skipped them, not re-applied.
            assert all(s.metrics()["store_skipped_commands_total"] > 0 for s in c.running())
    finally:
        await c.stop()


@pytest.mark.parametrize("engine", ["memory", "lsm"])
async def test_restart_after_a_snapshot_and_catch_up_of_an_empty_node(tmp_path, engine):
    configs = make_configs(str(tmp_path), sync="always", engine=engine)
    c = Cluster(configs)
    await c.start()
    leader = await c.wait_leader()
    await _write_some(c.services[leader], b"a", 40)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # A write is acknowledged once the leader applied it; followers learn its commit a
    # moment later. Snapshot only once every node holds all 40.
    while not all(s.state_machine.revision >= 41 for s in c.running()):
        assert loop.time() < deadline, "followers did not apply the writes"
        await asyncio.sleep(0.02)
    for service in c.running():
        service.force_snapshot()
    while not all(s.metrics()["raft_snapshots_written"] >= 1 for s in c.running()):
        assert loop.time() < deadline, "snapshots were not written"
        await asyncio.sleep(0.05)
    for cfg in configs:  # every dump is a whole, valid snapshot (not pysyncobj's tmp file)
        header = snapshot_file.verify(os.path.join(cfg.data_dir, "raft", "snapshot"))
        assert header["revision"] >= 41
    await _write_some(c.services[leader], b"b", 10)  # after the snapshot: in the log only
    revision = (await c.services[leader].status())["revision"]

    # A follower loses its whole data directory and comes back: it gets the snapshot.
    lost = c.follower(leader).node_id
    await c.stop(lost)
    shutil.rmtree(next(cfg.data_dir for cfg in configs if cfg.node_id == lost))
    await c.start(lost)
    restored = c.services[lost]
    deadline = loop.time() + 15
    while restored.state_machine.revision < revision:
        assert loop.time() < deadline, f"the emptied node stayed at revision {restored.state_machine.revision}"
        await asyncio.sleep(0.05)
    assert restored.metrics()["raft_snapshots_installed"] == 1
    kv, _ = await restored.get(b"a007", consistency="serializable")
    assert kv.value == b"value-7"
    assert (await restored.get(b"b009", consistency="serializable"))[0].value == b"value-9"

    # Every node restarts from its own snapshot + journal (memory engine: rebuilt from them).
    await c.stop()
    c = Cluster(configs)
    await c.start()
    try:
        await c.wait_leader()
        for service in c.running():
            kv, seen = await service.get(b"a039")
            assert kv.value == b"value-39" and seen == revision
            assert (await service.get(b"b000"))[0].value == b"value-0"
    finally:
        await c.stop()


async def test_a_taken_peer_port_is_a_clear_error(tmp_path):
    import socket

    config = make_configs(str(tmp_path))[0]
    host, port = config.self_member.peer_address.rsplit(":", 1)
    blocker = socket.socket()
    blocker.bind((host, int(port)))
    blocker.listen(1)
    try:
        service = create_service(config)
        with pytest.raises(OSError, match="peer port"):
            await service.start()
    finally:
        blocker.close()


async def test_the_raft_port_needs_the_password_and_binds_only_its_address(tmp_path):
    import dataclasses
    import socket

    configs = make_configs(str(tmp_path), sync="never")
    intruder = dataclasses.replace(configs[2], secret="wrong")
    c = Cluster([configs[0], configs[1], intruder])
    await c.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await c.services["n1"].status())["leader"] not in ("n1", "n2"):
            assert loop.time() < deadline, "n1 and n2 should elect a leader between them"
            await asyncio.sleep(0.05)
        await c.services["n1"].put(b"k", b"v")
        status = await c.services["n3"].status()
        assert not any(m["reachable"] for m in status["members"] if m["id"] != "n3")
        assert (await c.services["n3"].get(b"k", consistency="serializable"))[0] is None
        # Bound to 127.0.0.1 only: another loopback address is refused.
        port = int(configs[0].self_member.peer_address.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=1).close()
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        await c.stop()
