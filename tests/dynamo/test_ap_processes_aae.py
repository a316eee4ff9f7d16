"""Anti-entropy and failure detection on real processes: `capkv serve --mode ap` nodes
started by clusters.launcher.LocalCluster, driven over HTTP, paused with SIGSTOP.

A replica's own copy is read with the peer `fetch` call on its peer port (nothing else
reads the keys, so no read repair can have put them there)."""
import asyncio

import aiohttp
import pytest

from clusters.launcher import LocalCluster
from clusters.spec import resolve_secret, write_cluster_file
from dynamo import versions
from dynamo.transport import HttpTransport, b64, unb64

pytestmark = pytest.mark.timeout(180)

KEYS = 500


def _start(tmp_path, name, size, extra_args=(), env=None):
    path = tmp_path / f"{name}.toml"
    write_cluster_file(path, size, name=name)
    cluster = LocalCluster(path, mode="ap", data_dir=tmp_path / name, engine="lsm", sync="never",
                           extra_args=extra_args, env=env or {})
    cluster.start(timeout=60)
    return cluster


async def _held(cluster, node_id, keys):
    """How many of `keys` node_id's own replica holds with the expected value."""
    secret = resolve_secret(cluster.spec, cluster.data_dir)
    transport = HttpTransport({node_id: cluster.nodes[node_id].peer_address}, secret)
    try:
        held = 0
        for start in range(0, len(keys), 50):
            chunk = keys[start : start + 50]
            replies = await asyncio.gather(*(transport.call(node_id, "fetch", {"key": b64(k.encode())}, 5.0) for k, _ in chunk))
            for (key, value), reply in zip(chunk, replies):
                raw = reply["object"]
                if raw is not None and versions.decode_object(unb64(raw)).live_values == [value]:
                    held += 1
        return held
    finally:
        await transport.close()


def test_a_paused_replica_gets_500_missed_writes_from_anti_entropy_alone(tmp_path):
    cluster = _start(tmp_path, "aae3", 3, extra_args=("--hinted-handoff", "off"), env={"CAPKV_AAE_INTERVAL_S": "1"})

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async def put(node, key, value):
                async with http.put(f"{cluster.url(node)}/v1/kv/{key}", data=value, params={"w": "2"}) as r:
                    return r.status

            async def status(node):
                async with http.get(f"{cluster.url(node)}/v1/cluster") as r:
                    return await r.json()

            await asyncio.to_thread(cluster.pause, "n3")
            try:
                # Until n1 and n2 stop sending to n3, a write's request may wait in n3's
                # socket and land after SIGCONT: write elsewhere until both see it gone.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                i = 0
                while loop.time() < deadline:
                    seen = [next(m["status"] for m in (await status(n))["members"] if m["id"] == "n3") for n in ("n1", "n2")]
                    if "alive" not in seen:
                        break
                    i += 1
                    await asyncio.gather(put("n1", f"warmup/{i}", b"w"), put("n2", f"warmup/{i}", b"w"))
                assert "alive" not in seen
                written = [(f"aae/{i}", b"value-%d" % i) for i in range(KEYS)]
                for start in range(0, KEYS, 25):
                    codes = await asyncio.gather(*(put(("n1", "n2")[i % 2], k, v) for i, (k, v) in enumerate(written[start : start + 25])))
                    assert set(codes) == {200}, codes
            finally:
                await asyncio.to_thread(cluster.resume, "n3")
            loop = asyncio.get_running_loop()
            resumed = loop.time()
            held = 0
            while loop.time() - resumed < 60:
                held = await _held(cluster, "n3", written)
                if held == KEYS:
                    break
                await asyncio.sleep(1.0)
            took = loop.time() - resumed
            print(f"\nn3 held {held}/{KEYS} missed writes {took:.1f} s after SIGCONT")
            assert held == KEYS
            aae = [(await status(n))["anti_entropy"] for n in ("n1", "n2", "n3")]
            assert sum(a["keys_repaired"] for a in aae) >= KEYS and all(a["enabled"] for a in aae)
            for node in ("n1", "n2", "n3"):
                async with http.get(f"{cluster.url(node)}/metrics") as r:
                    text = await r.text()
                assert "capkv_ap_aae_keys_repaired_total" in text and "capkv_ap_aae_last_full_pass_timestamp_seconds" in text
            # nothing read those keys: no client GET reached any node
            for node in ("n1", "n2", "n3"):
                async with http.get(f"{cluster.url(node)}/metrics") as r:
                    text = await r.text()
                line = next(l for l in text.splitlines() if l.startswith("capkv_ap_get_requests_total"))
                assert float(line.split()[-1]) == 0

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_gossip_sees_a_paused_node_and_its_return_and_spreads_a_new_member(tmp_path):
    cluster = _start(tmp_path, "gossip3", 3)

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def view(node):
                async with http.get(f"{cluster.url(node)}/v1/cluster") as r:
                    body = await r.json()
                return {m["id"]: m["status"] for m in body["members"]}

            async def until(predicate, limit_s):
                loop = asyncio.get_running_loop()
                started = loop.time()
                while loop.time() - started < limit_s:
                    if await predicate():
                        return loop.time() - started
                    await asyncio.sleep(0.2)
                return None

            async def others_see(status_ok):
                return all([status_ok((await view(n))["n2"]) for n in ("n1", "n3")])

            # No client traffic at all: only gossip (and its failed calls) can tell.
            await asyncio.to_thread(cluster.pause, "n2")
            try:
                seen_gone = await until(lambda: others_see(lambda s: s in ("suspect", "down")), 10)
            finally:
                await asyncio.to_thread(cluster.resume, "n2")
            seen_back = await until(lambda: others_see(lambda s: s == "alive"), 10)
            print(f"\npaused n2 seen suspect/down after {seen_gone} s; alive again {seen_back} s after SIGCONT")
            assert seen_gone is not None and seen_back is not None

            # A member added through n1 while n3 is down: n3 restarts from its cluster file
            # (which does not name n9), so only gossip can tell it.
            await asyncio.to_thread(cluster.kill, "n3")
            async with http.post(f"{cluster.url('n1')}/v1/cluster/members",
                                 json={"id": "n9", "client_url": "http://127.0.0.1:9", "peer_address": "127.0.0.1:9"}) as r:
                body = await r.json()
                assert r.status == 200 and "n3" in body["not_told"], body
            await asyncio.to_thread(cluster.restart, "n3")

            async def all_know():
                return all(["n9" in await view(n) for n in ("n1", "n2", "n3")])

            known = await until(all_know, 5)
            print(f"n9 known to all {known} s after n3 restarted")
            assert known is not None

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


# About 20-30 s; in the default run so that joins and leaves are covered on real processes.
def test_a_fourth_node_joins_and_then_leaves_under_continuous_writes(tmp_path):
    """n1..n3 run from a 3-node file; n4 starts from a 4-node file with --join. Writers
    never stop; afterwards every acknowledged write reads back, and the copies streamed
    to n4 are close to the ideal (the keys whose preference list now names n4). Then n4
    leaves (DELETE through n1) under the same writes, and again nothing acknowledged is lost."""
    from clusters.spec import free_ports
    from dynamo.ring import Ring

    secret = "join-leave-secret"
    three = write_cluster_file(tmp_path / "three.toml", 3, name="three", secret=secret)
    ports = [(int(n.client_url.rsplit(":", 1)[1]), int(n.peer_address.rsplit(":", 1)[1])) for n in three.nodes]
    write_cluster_file(tmp_path / "four.toml", 4, name="four", secret=secret, ports=ports + [tuple(free_ports(2))])
    data = tmp_path / "data"
    env = {"CAPKV_AAE_INTERVAL_S": "2"}
    old = LocalCluster(tmp_path / "three.toml", mode="ap", data_dir=data, engine="lsm", sync="never", env=env)
    new = LocalCluster(tmp_path / "four.toml", mode="ap", data_dir=data, engine="lsm", sync="never", env=env,
                       node_args={"n4": ("--join", three.nodes[0].client_url)})
    old.start(timeout=60)
    nodes3 = ["n1", "n2", "n3"]

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            acked: dict[str, bytes] = {}
            stop = asyncio.Event()

            async def writer(w):
                i = 0
                while not stop.is_set():
                    key, value = f"jl/{w}/{i}", b"v-%d-%d" % (w, i)
                    try:
                        async with http.put(f"{old.url(nodes3[i % 3])}/v1/kv/{key}", data=value) as r:
                            if r.status == 200:
                                acked[key] = value
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                    i += 1

            async def metric(cluster, node, name):
                async with http.get(f"{cluster.url(node)}/metrics") as r:
                    text = await r.text()
                return float(next(l for l in text.splitlines() if l.startswith("capkv_" + name + " ")).split()[-1])

            async def members(cluster, node):
                async with http.get(f"{cluster.url(node)}/v1/cluster") as r:
                    return sorted(m["id"] for m in (await r.json())["members"])

            async def settle(expected):
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while loop.time() < deadline:
                    views = [await members(old, n) for n in nodes3]
                    busy = sum([await metric(old, n, "ap_rebalancing") for n in nodes3])
                    if all(v == expected for v in views) and not busy:
                        return True
                    await asyncio.sleep(0.3)
                return False

            async def check_all_readable():
                missing = []
                for key, value in list(acked.items()):
                    async with http.get(f"{old.url(nodes3[hash(key) % 3])}/v1/kv/{key}") as r:
                        body = await r.json()
                    if r.status != 200 or value.decode() not in [s.get("value") for s in body["siblings"]]:
                        missing.append(key)
                return missing

            writers = [asyncio.ensure_future(writer(w)) for w in range(4)]
            await asyncio.sleep(1.5)
            before_join = dict(acked)
            await asyncio.to_thread(new.restart, "n4")
            while len(await members(old, "n3")) < 4:  # the ring change reached the last old node
                await asyncio.sleep(0.1)
            at_change = dict(acked)
            assert await settle(["n1", "n2", "n3", "n4"])
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*writers)
            assert await settle(["n1", "n2", "n3", "n4"])
            missing = await check_all_readable()
            assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes unreadable after the join: {missing[:5]}"
            ring4 = Ring(["n1", "n2", "n3", "n4"], 150)
            ideal = sum(1 for k in before_join if "n4" in ring4.preference_list(k.encode(), 3))
            moved = sum([await metric(old, n, "ap_rebalance_keys_sent_total") for n in nodes3])
            ideal_all = sum(1 for k in acked if "n4" in ring4.preference_list(k.encode(), 3))
            ideal_change = sum(1 for k in at_change if "n4" in ring4.preference_list(k.encode(), 3))
            print(f"\njoin: {len(acked)} acked writes, {len(before_join)} before the join; copies streamed to n4 "
                  f"{moved:.0f}; n4 replicates {ideal} of the keys written before the join and {ideal_all} of all "
                  f"(ideal share {ideal_all / len(acked):.2f} of keys, 3/4 with N=3 on 4 nodes); "
                  f"moved/ideal_all {moved / max(ideal_all, 1):.2f}; n4 replicates {ideal_change} of the "
                  f"{len(at_change)} keys acked when every old node knew of it: moved/that {moved / max(ideal_change, 1):.2f}")
            assert ideal > 0 and moved <= 1.5 * ideal_all

            # the leave, under writes again
            stop.clear()
            writers = [asyncio.ensure_future(writer(w)) for w in range(4)]
            await asyncio.sleep(1.0)
            async with http.delete(f"{old.url('n1')}/v1/cluster/members/n4") as r:
                assert r.status == 200, await r.text()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*writers)
            assert await settle(["n1", "n2", "n3"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while loop.time() < deadline and (missing := await check_all_readable()):
                await asyncio.sleep(1.0)
            assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes unreadable after the leave: {missing[:5]}"
            print(f"leave: all {len(acked)} acknowledged writes readable")

    try:
        asyncio.run(scenario())
    finally:
        new.stop()
        old.stop()
