"""The real etcd gateway client, etcd3gw (the OpenStack client), against a real 3-node
capkv cp cluster: every call a user of etcd3gw makes, through followers as well as the
leader (any node answers; followers forward).

One cluster serves the whole module (starting one costs seconds on two shared cores).
The tests that need the cp service's CPExtras (txn, leases, watch) skip until
`consensus.service` implements them, and turn on by themselves when it does.
"""
from __future__ import annotations

import threading
import uuid

import pytest

from clusters.launcher import LocalCluster
from clusters.spec import write_cluster_file
from tests.integration.conftest import require_service

etcd3gw = pytest.importorskip("etcd3gw")


def cp_service_offers(*methods: str) -> bool:
    """True when consensus.service's service class has every CPExtras method named."""
    try:
        from consensus import service as module
    except ImportError:
        return False
    cls = getattr(module, "ConsensusService", None)
    return cls is not None and all(callable(getattr(cls, m, None)) for m in methods)


needs_txn = pytest.mark.skipif(not cp_service_offers("txn"), reason="consensus.service has no txn yet (CPExtras)")
needs_leases = pytest.mark.skipif(not cp_service_offers("lease_grant", "lease_revoke", "lease_keepalive", "lease_info"),
                                  reason="consensus.service has no leases yet (CPExtras)")  # fmt: skip
needs_watch = pytest.mark.skipif(not cp_service_offers("watch"), reason="consensus.service has no watch yet (CPExtras)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_service("cp")
    base = tmp_path_factory.mktemp("etcd3gw-cluster")
    write_cluster_file(base / "cluster.toml", 3, name="etcd3gw-test")
    cluster = LocalCluster(base / "cluster.toml", mode="cp", data_dir=base / "data", engine="lsm", sync="never",
                           log_dir=base / "logs")  # fmt: skip
    try:
        cluster.start(timeout=60)
        yield cluster
    finally:
        cluster.stop()


def client_of(cluster, node_id: str):
    host_port = cluster.url(node_id).split("//", 1)[1]
    host, port = host_port.rsplit(":", 1)
    return etcd3gw.client(host=host, port=int(port), timeout=10)


@pytest.fixture
def clients(cluster):
    """An etcd3gw client per node, the leader's first."""
    leader = cluster.leader()
    order = [leader] + [n for n in cluster.nodes if n != leader]
    return [client_of(cluster, n) for n in order]


@pytest.fixture
def prefix() -> str:
    return f"etcd3gw-{uuid.uuid4().hex[:8]}/"


def test_get_put_delete_prefix_all_through_every_node(clients, prefix):
    leader, follower, other = clients
    assert follower.put(prefix + "a", "1") is True
    assert other.put(prefix + "b", "2") is True
    for c in clients:  # linearizable reads: every node sees both writes at once
        assert c.get(prefix + "a") == [b"1"] and c.get(prefix + "b") == [b"2"]
    assert leader.get(prefix + "missing") == []
    value, meta = follower.get(prefix + "a", metadata=True)[0]
    assert value == b"1" and meta["key"] == (prefix + "a").encode() and meta["version"] == "1"
    assert [v for v, _ in other.get_prefix(prefix, sort_order="descend", sort_target="mod")] == [b"2", b"1"]
    assert follower.get(prefix, range_end=prefix[:-1] + "0", limit=1, keys_only=True, serializable=True) == [b""]
    everything = {m["key"] for _, m in leader.get_all()}
    assert {(prefix + "a").encode(), (prefix + "b").encode()} <= everything
    assert follower.delete(prefix + "a") is True and follower.delete(prefix + "a") is False
    assert other.delete_prefix(prefix) is True
    assert all(c.get_prefix(prefix) == [] for c in clients)


def test_status_and_members(cluster, clients):
    leader_id = cluster.leader()
    statuses = [c.status() for c in clients]
    leader_numbers = {s["leader"] for s in statuses}
    assert len(leader_numbers) == 1  # every node names the same leader
    assert statuses[0]["header"]["member_id"] == statuses[0]["leader"]  # clients[0] is the leader
    assert all(s["version"].startswith("3.4") for s in statuses)
    members = clients[1].members()
    assert sorted(m["name"] for m in members) == sorted(cluster.nodes)
    assert {m["clientURLs"][0] for m in members} == set(cluster.urls)
    assert any(m["ID"] == statuses[0]["leader"] and m["name"] == leader_id for m in members)


@needs_txn
def test_create_replace_and_transaction(clients, prefix):
    leader, follower, other = clients
    assert follower.create(prefix + "c", "3") is True
    assert other.create(prefix + "c", "3") is False
    assert leader.replace(prefix + "c", "3", "4") is True
    assert follower.replace(prefix + "c", "3", "5") is False
    assert other.get(prefix + "c") == [b"4"]
    import base64

    key = base64.b64encode((prefix + "t").encode()).decode()
    result = follower.transaction({
        "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": 0}],
        "success": [{"request_put": {"key": key, "value": base64.b64encode(b"v").decode()}},
                    {"request_range": {"key": key}}],
        "failure": [],
    })  # fmt: skip
    assert result["succeeded"] is True
    assert result["responses"][1]["response_range"]["kvs"][0]["value"] == base64.b64encode(b"v").decode()


@needs_leases
def test_lease_grant_refresh_ttl_keys_revoke(clients, prefix):
    leader, follower, other = clients
    lease = follower.lease(ttl=30)
    assert other.put(prefix + "l", "x", lease=lease) is True
    assert 25 <= lease.ttl() <= 30
    assert lease.keys() == [(prefix + "l").encode()]
    assert lease.refresh() == 30
    assert lease.revoke() is True
    assert all(c.get(prefix + "l") == [] for c in clients)
    assert lease.refresh() == -1


@needs_txn
@needs_leases
def test_lock_acquire_contention_release(clients, prefix):
    leader, follower, other = clients
    name = prefix.strip("/")
    first = follower.lock(name, ttl=30)
    second = other.lock(name, ttl=30)
    assert first.acquire() is True and first.is_acquired()
    assert second.acquire() is False and not second.is_acquired()
    assert first.refresh() == 30
    # contention: two threads race for a free lock; exactly one wins
    assert first.release() is True
    racers = [leader.lock(name, ttl=30), follower.lock(name, ttl=30)]
    wins = []
    threads = [threading.Thread(target=lambda l=l: wins.append(l.acquire())) for l in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(wins) == [False, True]
    holder = next(l for l in racers if l.is_acquired())
    assert holder.release() is True
    assert second.acquire() is True and second.release() is True


@needs_watch
def test_watch_and_watch_prefix_with_cancel(clients, prefix):
    leader, follower, other = clients
    # from the next revision: the events replay even if the watch registers after the puts
    start = int(follower.status()["header"]["revision"]) + 1
    events, cancel = follower.watch(prefix + "w", prev_kv=True, start_revision=start)
    other.put(prefix + "w", "w1")
    leader.delete(prefix + "w")
    got = [next(events), next(events)]
    assert got[0]["kv"]["key"] == (prefix + "w").encode() and got[0]["kv"]["value"] == b"w1"
    assert got[1]["type"] == "DELETE"
    cancel()
    events, cancel = other.watch_prefix(prefix + "p/", start_revision=int(other.status()["header"]["revision"]) + 1)
    follower.put(prefix + "p/1", "a")
    follower.put(prefix + "q", "outside")
    leader.put(prefix + "p/2", "b")
    assert [next(events)["kv"]["key"], next(events)["kv"]["key"]] == [(prefix + "p/1").encode(), (prefix + "p/2").encode()]
    cancel()
