"""The ap mode on real processes: five `capkv serve --mode ap` nodes started by
clusters.launcher.LocalCluster on free loopback ports, driven over the HTTP API.

Replica-local reads (does n4 itself hold the key?) go to a node's peer port with the
cluster secret: `fetch` on the peer API reads that node's own replica, nothing else.
"""
import asyncio
import base64

import aiohttp
import pytest

from clusters.launcher import LocalCluster
from clusters.spec import resolve_secret, write_cluster_file
from dynamo import versions
from dynamo.transport import HttpTransport, b64

pytestmark = pytest.mark.timeout(180)


def _start(tmp_path, name, extra_args=()):
    path = tmp_path / f"{name}.toml"
    write_cluster_file(path, 5, name=name)
    cluster = LocalCluster(path, mode="ap", data_dir=tmp_path / name, engine="lsm", sync="never", extra_args=extra_args)
    cluster.start(timeout=60)
    return cluster


@pytest.fixture(scope="module")
def ap5(tmp_path_factory):
    cluster = _start(tmp_path_factory.mktemp("ap5"), "ap5")
    yield cluster
    cluster.stop()


class Client:
    def __init__(self, cluster):
        self.cluster = cluster
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def get(self, node, key, **params):
        async with self.session.get(f"{self.cluster.url(node)}/v1/kv/{key}", params=params) as r:
            return r.status, await r.json()

    async def put(self, node, key, value: bytes, context=None, **params):
        headers = {"X-Capkv-Context": context} if context else {}
        async with self.session.put(f"{self.cluster.url(node)}/v1/kv/{key}", data=value, headers=headers, params=params) as r:
            return r.status, await r.json()

    async def delete(self, node, key, context=None, **params):
        headers = {"X-Capkv-Context": context} if context else {}
        async with self.session.delete(f"{self.cluster.url(node)}/v1/kv/{key}", headers=headers, params=params) as r:
            return r.status, await r.json()

    async def json(self, node, path):
        async with self.session.get(f"{self.cluster.url(node)}{path}") as r:
            return await r.json()

    async def close(self):
        await self.session.close()


@pytest.fixture
async def client(ap5):
    c = Client(ap5)
    yield c
    await c.close()


def context_of(body):
    """A read's context: top level on 200, inside the error object on 404."""
    return body["context"] if "context" in body else body["error"]["context"]


async def hints_pending(client, nodes):
    return sum([(await client.json(n, "/v1/cluster"))["hints_pending"] for n in nodes])


def values(body):
    return sorted(s["value"] for s in body.get("siblings", []))


NODES = ["n1", "n2", "n3", "n4", "n5"]


async def test_put_and_get_through_every_node(client):
    for i, node in enumerate(NODES):
        status, _ = await client.put(node, f"every/{i}", b"v%d" % i)
        assert status == 200
    for node in NODES:
        for i in range(5):
            status, body = await client.get(node, f"every/{i}")
            assert status == 200 and body["value"] == f"v{i}"


async def test_two_blind_writes_are_siblings_and_the_merged_context_leaves_one(client):
    await client.put("n1", "sib", b"left")
    await client.put("n5", "sib", b"right")
    status, body = await client.get("n3", "sib")
    assert values(body) == ["left", "right"] and "value" not in body
    await client.put("n2", "sib", b"both", context=body["context"])
    for node in NODES:
        status, body = await client.get(node, "sib")
        assert body["value"] == "both" and len(body["siblings"]) == 1


async def test_seven_clients_twelve_rounds_never_more_than_seven_siblings(client):
    most = 0

    async def worker(i):
        nonlocal most
        node = NODES[i % 5]
        for round_ in range(12):
            status, body = await client.get(node, "contended")
            most = max(most, len(body.get("siblings", [])))
            status, _ = await client.put(node, "contended", b"w%d-%d" % (i, round_), context=context_of(body))
            assert status == 200

    await asyncio.gather(*(worker(i) for i in range(7)))
    status, body = await client.get("n1", "contended", r=3)
    most = max(most, len(body["siblings"]))
    assert 1 <= most <= 7 and len(body["siblings"]) <= 7


async def test_delete_then_causal_recreate_and_delete_racing_a_write(client):
    await client.put("n1", "del", b"v1")
    _, body = await client.get("n2", "del")
    status, _ = await client.delete("n2", "del", context=body["context"])
    assert status == 200
    status, gone = await client.get("n3", "del")
    assert status == 404 and gone["error"]["context"]
    await client.put("n3", "del", b"v2", context=gone["error"]["context"])
    _, body = await client.get("n4", "del", r=3)
    assert body["value"] == "v2" and len(body["siblings"]) == 1
    # a delete and a write from the same read race: the write survives as the only value
    await asyncio.gather(client.delete("n1", "del", context=body["context"]), client.put("n5", "del", b"v3", context=body["context"]))
    _, after = await client.get("n2", "del", r=3)
    assert values(after) == ["v3"]


async def _local(cluster, node_id, key: bytes):
    """What `node_id`'s own replica holds for `key`, asked on its peer port."""
    secret = resolve_secret(cluster.spec, cluster.data_dir)
    transport = HttpTransport({node_id: cluster.nodes[node_id].peer_address}, secret)
    try:
        reply = await transport.call(node_id, "fetch", {"key": b64(key)}, 5.0)
    finally:
        await transport.close()
    raw = reply["object"]
    return None if raw is None else versions.decode_object(base64.b64decode(raw))


async def test_two_of_five_killed_writes_succeed_and_hints_reach_them_when_back(ap5, client):
    down = ["n4", "n5"]
    for node in down:
        await asyncio.to_thread(ap5.kill, node)
    written = {}
    for i in range(30):
        key = f"hinted/{i}"
        status, body = await client.put(NODES[i % 3], key, b"h%d" % i, w=2)
        assert status == 200, body
        written[key] = b"h%d" % i
    assert await hints_pending(client, ("n1", "n2", "n3")) > 0
    for node in down:
        await asyncio.to_thread(ap5.restart, node)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await hints_pending(client, NODES) and loop.time() < deadline:
        await asyncio.sleep(0.2)
    assert await hints_pending(client, NODES) == 0
    owned = 0
    for key, value in written.items():
        preference = (await client.json("n1", f"/v1/cluster/preflist/{key}"))["preference_list"]
        for node in down:
            if node in preference:
                owned += 1
                obj = await _local(ap5, node, key.encode())
                assert obj is not None and obj.live_values == [value], (node, key)
    assert owned >= 5


def test_lww_cluster_never_returns_siblings(tmp_path):
    cluster = _start(tmp_path, "lww5", extra_args=("--conflicts", "lww"))
    try:
        async def scenario():
            c = Client(cluster)
            try:
                await asyncio.gather(*(c.put(node, "lww", node.encode()) for node in NODES))
                for node in NODES:
                    _, body = await c.get(node, "lww", r=3)
                    assert len(body["siblings"]) == 1 and "value" in body
                status = await c.json("n1", "/v1/cluster")
                assert status["mode"] == "ap"
            finally:
                await c.close()

        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_a_node_joins_through_a_running_node_and_receives_its_keys(tmp_path):
    """n1..n4 run from a 4-node cluster file; n5 starts from a 5-node file with
    `--join <n1's URL>`: n1 adds it and tells the others, and keys move to it."""
    from clusters.spec import free_ports

    secret = "join-test-secret"
    four = write_cluster_file(tmp_path / "four.toml", 4, name="four", secret=secret)
    ports = [(int(n.client_url.rsplit(":", 1)[1]), int(n.peer_address.rsplit(":", 1)[1])) for n in four.nodes]
    client_port, peer_port = free_ports(2)
    write_cluster_file(tmp_path / "five.toml", 5, name="five", secret=secret, ports=ports + [(client_port, peer_port)])
    data = tmp_path / "data"
    old = LocalCluster(tmp_path / "four.toml", mode="ap", data_dir=data, engine="lsm", sync="never")
    new = LocalCluster(tmp_path / "five.toml", mode="ap", data_dir=data, engine="lsm", sync="never",
                       node_args={"n5": ("--join", four.nodes[0].client_url)})
    old.start(timeout=60)
    try:
        async def scenario():
            c = Client(old)
            try:
                for i in range(40):
                    status, _ = await c.put(NODES[i % 4], f"join/{i}", b"j%d" % i)
                    assert status == 200
                await asyncio.to_thread(new.restart, "n5")
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while len((await c.json("n1", "/v1/cluster"))["members"]) < 5 and loop.time() < deadline:
                    await asyncio.sleep(0.2)
                assert [m["id"] for m in (await c.json("n3", "/v1/cluster"))["members"]] == NODES
                owned = []
                for i in range(40):
                    preference = (await c.json("n2", f"/v1/cluster/preflist/join/{i}"))["preference_list"]
                    if "n5" in preference:
                        owned.append(i)
                assert owned
                while loop.time() < deadline:
                    held = [await _local(new, "n5", f"join/{i}".encode()) for i in owned]
                    if all(obj is not None for obj in held):
                        break
                    await asyncio.sleep(0.2)
                assert all(obj is not None and obj.live_values == [b"j%d" % i] for obj, i in zip(held, owned))
                for i in range(40):
                    status, body = await c.get(NODES[i % 4], f"join/{i}")
                    assert body["value"] == f"j{i}"
            finally:
                await c.close()

        asyncio.run(scenario())
    finally:
        new.stop()
        old.stop()


async def test_a_paused_primary_costs_one_peer_timeout_then_fallbacks_take_over(ap5, client):
    key = "paused/key"
    preference = (await client.json("n1", f"/v1/cluster/preflist/{key}"))["preference_list"]
    victim = preference[0]
    coordinator = next(n for n in NODES if n not in preference)
    await asyncio.to_thread(ap5.pause, victim)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(5):
            status, body = await client.put(coordinator, key, b"p%d" % i, w=2, timeout_ms=4000)
            assert status == 200, body
        assert loop.time() - started < 8  # the first write waits out the peer timeout, the rest skip the node
        status, body = await client.get(coordinator, key)
        assert status == 200 and "p4" in values(body)
    finally:
        await asyncio.to_thread(ap5.resume, victim)
    deadline = loop.time() + 20
    while loop.time() < deadline:
        obj = await _local(ap5, victim, key.encode())
        if obj is not None and "p4" in [v.decode() for v in obj.live_values]:
            break
        await asyncio.sleep(0.2)
    assert obj is not None and b"p4" in obj.live_values
