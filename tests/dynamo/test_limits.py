"""Limits a user or operator notices: the sibling cap, bounded read repair, the hint cap,
clock growth under many coordinators, and membership changes moving data."""
import asyncio
import dataclasses

import pytest

from api.service import Member, Unavailable
from dynamo.coordinator import CoordinatorLimits
from dynamo.hints import HintPolicy
from dynamo.node import ReplicaLimits
from dynamo.service import DynamoService
from dynamo.vclock import PrunePolicy

from .cluster import FAST, free_ports
from .test_service import wait_for

pytestmark = pytest.mark.timeout(60)


async def test_too_many_siblings_is_refused_until_resolved(cluster):
    c = await cluster(3, options=dataclasses.replace(FAST, replica=ReplicaLimits(max_siblings=3)))
    for i in range(3):
        await c["n1"].put(b"k", b"blind-%d" % i)
    with pytest.raises(Unavailable) as err:
        await c["n2"].put(b"k", b"one too many")
    assert err.value.code == "too_many_siblings"
    read = await c["n1"].get(b"k")
    assert len(read.siblings) == 3
    await c["n2"].put(b"k", b"resolved", context=read.context)
    assert (await c["n3"].get(b"k")).siblings == [b"resolved"]


async def test_read_repair_is_skipped_not_queued_when_the_cap_is_reached(cluster):
    options = dataclasses.replace(FAST, coordinator=CoordinatorLimits(peer_timeout_s=0.5, read_repair_wait_s=0.2, max_read_repairs=0))
    c = await cluster(3, options=options)
    key = b"k"
    await c["n1"].put(key, b"v", w=3)
    # make one replica stale by writing behind its back
    primaries = c["n1"].preflist(key)["preference_list"]
    local = c[primaries[0]].replica
    newer = await local.coordinate(key, b"v2", local.fetch(key).clock, hint_for=None, now=1e9)
    await c[primaries[1]].replica.store(key, newer, hint_for=None, now=1e9)
    await c["n1"].get(key, r=3)
    await asyncio.sleep(0.5)
    assert c["n1"].metrics()["ap_read_repairs_skipped_total"] >= 1
    assert c[primaries[2]].local_get(key).siblings == [b"v"]  # nothing repaired


async def test_a_full_hint_log_refuses_hinted_writes(cluster):
    c = await cluster(5, options=dataclasses.replace(FAST, hints=HintPolicy(max_hints=1)))
    await c.kill("n4")
    await c.kill("n5")
    outcomes = []
    for i in range(30):
        try:
            await c["n1"].put(b"k%d" % i, b"v", w=3, timeout=2.0)
            outcomes.append("ok")
        except Unavailable:
            outcomes.append("unavailable")
    assert "ok" in outcomes and "unavailable" in outcomes
    for node_id in ("n1", "n2", "n3"):
        c[node_id].replica.hints._check()
        assert c[node_id].metrics()["ap_hints_pending"] <= 1
    assert sum(c[n].metrics()["ap_hints_refused_total"] for n in ("n1", "n2", "n3")) > 0


async def test_pruned_clocks_stay_bounded_and_only_add_false_siblings(cluster):
    """Aggressive pruning (young 0 s) with a fresh actor per write, as after many handoffs:
    each clock keeps at most `big` entries beyond its siblings' own actors (and the
    replica's), and pruning costs false siblings, never the latest write."""
    policy = PrunePolicy(small=4, big=6, young_s=0.0, old_s=3600)
    c = await cluster(3, options=dataclasses.replace(FAST, prune=policy))
    key = b"k"
    context = None
    for i in range(20):
        node = c["n%d" % (i % 3 + 1)]
        node.replica.new_epoch()
        context = await node.put(key, b"v%d" % i, context=context)
    for node_id in c.nodes:
        obj = c[node_id].replica.fetch(key)
        sibling_actors = {s.dot.actor for s in obj.siblings}
        assert len(set(obj.clock.actors()) - sibling_actors) <= policy.big + 1
    read = await c["n1"].get(key, r=3)
    assert b"v19" in read.siblings and set(read.siblings) <= {b"v%d" % i for i in range(20)}


async def test_adding_a_member_moves_keys_to_it(cluster):
    c = await cluster(4, engine="memory")
    for i in range(60):
        await c["n1"].put(b"m%d" % i, b"v%d" % i)
    # start n5 knowing all five; then tell the others through n1
    port = free_ports(1)[0]
    member = Member("n5", "http://127.0.0.1:5", f"127.0.0.1:{port}")
    config = dataclasses.replace(c.node_config("n1"), node_id="n5", members=c.members + (member,))
    n5 = DynamoService(config, options=c.options)
    await n5.start()
    c.nodes["n5"] = n5
    result = await c["n1"].add_member(member)
    assert result["not_told"] == [] and "n5" in result["members"]
    owned = [b"m%d" % i for i in range(60) if "n5" in n5.preflist(b"m%d" % i)["preference_list"]]
    assert owned
    await wait_for(lambda: all(n5.local_get(k).siblings for k in owned), timeout=10)
    for i in range(60):
        assert (await c["n2"].get(b"m%d" % i)).siblings == [b"v%d" % i]
    # nodes dropped what they no longer replicate
    await wait_for(
        lambda: all(
            not c[n].local_get(b"m%d" % i).siblings
            for n in ("n1", "n2", "n3", "n4")
            for i in range(60)
            if n not in n5.preflist(b"m%d" % i)["preference_list"]
        ),
        timeout=10,
    )
