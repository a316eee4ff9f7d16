"""Anti-entropy between in-process nodes (real authenticated HTTP peer traffic): replicas
that missed writes get them with nobody reading, and the trees stay true to the data."""
import asyncio
import dataclasses

import pytest

from api.service import Member
from dynamo import versions
from dynamo.antientropy import AntiEntropyOptions, TreeSet
from dynamo.merkle import entry_hash, version_digest
from dynamo.service import APOptions, create_service
from dynamo.vclock import VClock

from .cluster import FAST

pytestmark = pytest.mark.timeout(60)

QUICK_AAE = dataclasses.replace(FAST, anti_entropy=AntiEntropyOptions(interval_s=0.2))
NO_AAE = dataclasses.replace(FAST, anti_entropy=AntiEntropyOptions(enabled=False))


async def wait_for(predicate, timeout=15.0, interval=0.1):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def check_trees(node):
    """Every tree holds exactly the entries of the keys this node stores and replicates."""
    node.trees._check()
    expected = {}
    ring = node._ring
    for key, obj in node.replica.items():
        if node.node_id in ring.preference_list(key, node.config.replicas):
            expected[key] = entry_hash(key, version_digest(obj))
    held = {}
    for tree in node.trees.trees.values():
        held.update(tree.all_entries())
    assert held == expected


async def test_a_replica_that_missed_writes_gets_them_without_any_read(cluster):
    c = await cluster(3, options=QUICK_AAE, hinted_handoff=False)
    # Writes that reached n1 and n2 only, as if n3 had been paused: minted on n1, merged on n2.
    written = {}
    for i in range(200):
        key = b"missed/%d" % i
        obj = await c["n1"].replica.coordinate(key, b"v%d" % i, VClock(), hint_for=None, now=1.0)
        await c["n2"].replica.store(key, obj, hint_for=None, now=1.0)
        written[key] = b"v%d" % i
    reads_before = c["n3"].metrics()["ap_get_requests_total"]
    assert await wait_for(lambda: all(c["n3"].replica.fetch(k) is not None for k in written))
    assert all(c["n3"].replica.fetch(k).live_values == [v] for k, v in written.items())
    assert sum(c[n].metrics()["ap_aae_keys_repaired_total"] for n in ("n1", "n2", "n3")) >= len(written)
    assert c["n3"].metrics()["ap_get_requests_total"] == reads_before == 0
    # then the trees agree, and a pass finds nothing more to do
    for node in c.nodes.values():
        check_trees(node)
    roots = {node.node_id: {t: tree.root for t, tree in node.trees.trees.items()} for node in c.nodes.values()}
    assert roots["n1"] == roots["n2"] == roots["n3"]
    statuses = [(await node.status())["anti_entropy"] for node in c.nodes.values()]
    assert all(s["enabled"] for s in statuses) and sum(s["exchanges"] for s in statuses) > 0
    assert await wait_for(lambda: all(node.aae.last_full_pass is not None for node in c.nodes.values()))


async def test_a_sibling_on_one_side_and_a_newer_write_on_the_other_merge_both_ways(cluster):
    c = await cluster(3, options=QUICK_AAE, hinted_handoff=False)
    base = await c["n1"].replica.coordinate(b"k", b"base", VClock(), hint_for=None, now=1.0)
    for n in ("n2", "n3"):
        await c[n].replica.store(b"k", base, hint_for=None, now=1.0)
    # n1 overwrites with the context (supersedes "base"); n3 writes concurrently (sibling)
    await c["n1"].replica.coordinate(b"k", b"newer", base.clock, hint_for=None, now=2.0)
    await c["n3"].replica.coordinate(b"k", b"concurrent", VClock(), hint_for=None, now=2.0)

    def converged():
        objs = [c[n].replica.fetch(b"k") for n in ("n1", "n2", "n3")]
        return all(o.same_as(objs[0]) for o in objs) and sorted(objs[0].live_values) == [b"concurrent", b"newer"]

    assert await wait_for(converged)


async def test_no_exchange_without_anti_entropy_leaves_the_replica_behind(cluster):
    """The control: the same missed writes stay missing when anti-entropy is off."""
    c = await cluster(3, options=NO_AAE, hinted_handoff=False)
    obj = await c["n1"].replica.coordinate(b"lonely", b"v", VClock(), hint_for=None, now=1.0)
    await c["n2"].replica.store(b"lonely", obj, hint_for=None, now=1.0)
    await asyncio.sleep(1.0)
    assert c["n3"].replica.fetch(b"lonely") is None
    assert (await c["n1"].status())["anti_entropy"]["enabled"] is False


async def test_trees_follow_writes_deletes_and_ring_changes(cluster):
    c = await cluster(4, options=NO_AAE)
    for i in range(60):
        await c[f"n{i % 4 + 1}"].put(b"t/%d" % i, b"x")
    for i in range(0, 60, 3):
        read = await c["n1"].get(b"t/%d" % i)
        await c["n2"].delete(b"t/%d" % i, context=read.context)
    await asyncio.sleep(0.3)  # background sends
    for node in c.nodes.values():
        check_trees(node)
    await c["n1"].remove_member("n4")
    stay = [c[n] for n in ("n1", "n2", "n3")]
    assert await wait_for(lambda: all(len(n.members) == 3 for n in stay))
    await asyncio.sleep(1.0)  # rebalancing drops unowned copies
    for node in stay:
        check_trees(node)
        assert node.trees.trees and all("n4" not in tid for tid in node.trees.trees)


def test_tree_set_rebuild_keeps_only_the_replica_sets_of_its_node():
    from dynamo.ring import Ring

    ring = Ring(["a", "b", "c", "d"], vnodes=8)
    trees = TreeSet("a", 2)
    obj = versions.new_write(None, VClock(), b"v", "a.1", 1.0)
    items = [(b"k%d" % i, obj) for i in range(200)]
    trees.rebuild(ring, items)
    trees._check()
    mine = [k for k, _ in items if "a" in ring.preference_list(k, 2)]
    assert trees.keys == len(mine) and 0 < len(mine) < 200
    assert all("a" in tid.split(",") for tid in trees.trees)


def test_the_interval_comes_from_the_environment(monkeypatch, tmp_path):
    from api.service import NodeConfig

    config = NodeConfig(node_id="n1", members=(Member("n1", "http://127.0.0.1:1", "127.0.0.1:2"),), secret="s", data_dir=str(tmp_path))
    monkeypatch.setenv("CAPKV_AAE_INTERVAL_S", "0.5")
    assert create_service(config).options.anti_entropy.interval_s == 0.5
    monkeypatch.setenv("CAPKV_AAE_INTERVAL_S", "off")
    assert create_service(config).options.anti_entropy.enabled is False
    monkeypatch.setenv("CAPKV_AAE_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="CAPKV_AAE_INTERVAL_S"):
        create_service(config)
    monkeypatch.delenv("CAPKV_AAE_INTERVAL_S")
    assert create_service(config).options.anti_entropy == APOptions().anti_entropy
