"""A real 3-node cp cluster through the launcher and the HTTP API (API.md's cp rows).

Skips until `consensus.service.create_service` exists.
"""
from __future__ import annotations

import pytest

from api.client import Client, InvalidRequest, KeyNotFound, PreconditionFailed, ValueTooLarge


@pytest.fixture
def cluster(cp_cluster):
    return cp_cluster(nodes=3, engine="lsm", sync="always")


def followers(cluster) -> list[str]:
    leader = cluster.leader()
    return [n for n in cluster.nodes if n != leader]


def one_node(cluster, node_id: str) -> Client:
    """A client pinned to one node (no failover), so we know who answered."""
    return Client([cluster.url(node_id)], max_attempts=1)


def test_write_through_a_follower_reads_back_linearizably_everywhere(cluster):
    follower = followers(cluster)[0]
    written = one_node(cluster, follower).put("config/db", b"postgres://one")
    assert written["created"] is True and written["revision"] > 1
    for node_id in cluster.nodes:
        entry = one_node(cluster, node_id).get("config/db")
        assert entry is not None, node_id
        assert entry.value == b"postgres://one"
        assert entry.mod_revision == written["revision"] == entry.create_revision
        assert entry.revision >= written["revision"]

    # a second write through the other follower; every node sees it at once (linearizable)
    other = followers(cluster)[1]
    second = one_node(cluster, other).put("config/db", b"postgres://two")
    assert second["revision"] == written["revision"] + 1
    for node_id in cluster.nodes:
        entry = one_node(cluster, node_id).get("config/db")
        assert entry.value == b"postgres://two" and entry.version == 2


def test_compare_and_swap_across_nodes(cluster):
    ids = list(cluster.nodes)
    created = one_node(cluster, ids[0]).put("lock", b"a", if_mod_revision=0)
    with pytest.raises(PreconditionFailed) as excinfo:
        one_node(cluster, ids[1]).put("lock", b"b", if_mod_revision=0)
    assert excinfo.value.details["mod_revision"] == created["revision"]
    swapped = one_node(cluster, ids[2]).put("lock", b"c", if_mod_revision=created["revision"])
    assert swapped["revision"] > created["revision"]
    assert one_node(cluster, ids[1]).get("lock").value == b"c"


def test_range_prefix_delete_and_past_revisions(cluster):
    client = Client(cluster.urls)
    revisions = [client.put(f"svc/{i}", f"addr-{i}")["revision"] for i in range(5)]
    client.put("svd", "outside")
    page = client.range("svc/", limit=2)
    assert [e.key for e in page["items"]] == [b"svc/0", b"svc/1"] and page["more"] is True
    rest = client.range("svc/", start_after="svc/1")
    assert [e.key for e in rest["items"]] == [b"svc/2", b"svc/3", b"svc/4"]
    # the store as of the third put
    old = client.range("svc/", revision=revisions[2])
    assert [e.key for e in old["items"]] == [b"svc/0", b"svc/1", b"svc/2"]
    deleted = client.delete("svc/", prefix=True)
    assert deleted["deleted"] == 5
    for node_id in cluster.nodes:
        assert one_node(cluster, node_id).range("svc/")["items"] == []
        assert one_node(cluster, node_id).get("svd").value == b"outside"


def test_bad_input_gets_documented_errors_and_stores_nothing(cluster):
    client = Client(cluster.urls)
    before = client.range("")["revision"]
    with pytest.raises(ValueTooLarge):
        client.put("big", b"x" * (1024 * 1024 + 1))
    with pytest.raises(InvalidRequest) as excinfo:
        client.put("k" * 4097, b"v")
    assert excinfo.value.code == "invalid_key"
    with pytest.raises(InvalidRequest) as excinfo:
        client.request("PUT", "/v1/kv/%FF", body=b"v", write=True)
    assert excinfo.value.code == "invalid_key"
    with pytest.raises(InvalidRequest) as excinfo:
        client.request("PUT", "/v1/kv/k", query={"if_mod_revision": "-3"}, body=b"v", write=True)
    assert excinfo.value.code == "invalid_if_mod_revision"
    with pytest.raises(InvalidRequest) as excinfo:
        client.request("GET", "/v1/kv/k", query={"consistency": "eventual"})
    assert excinfo.value.code == "invalid_consistency"
    after = client.range("")
    assert after["revision"] == before and after["items"] == []
    with pytest.raises(KeyNotFound):
        client.request("GET", "/v1/kv/big")


def test_cluster_status_names_a_leader_every_node_agrees_on(cluster):
    leader = cluster.leader()
    for node_id in cluster.nodes:
        status = one_node(cluster, node_id).cluster()
        assert status["mode"] == "cp" and status["node"] == node_id and status["leader"] == leader
        assert sorted(m["id"] for m in status["members"]) == sorted(cluster.nodes)
        assert {"term", "commit_index", "applied_index", "revision"} <= set(status)


def test_full_restart_keeps_data_and_revisions(cluster):
    client = Client(cluster.urls)
    written = {f"keep/{i}": client.put(f"keep/{i}", f"value-{i}")["revision"] for i in range(10)}
    client.delete("keep/3")
    revision_before = client.range("")["revision"]
    cluster.stop()
    cluster.start(timeout=60)
    client = Client(cluster.urls)
    for node_id in cluster.nodes:
        page = one_node(cluster, node_id).range("keep/")
        assert page["revision"] == revision_before
        assert {e.key.decode(): e.mod_revision for e in page["items"]} == {
            k: r for k, r in written.items() if k != "keep/3"
        }
    # and the counter goes on from where it was
    assert client.put("keep/after", "x")["revision"] == revision_before + 1
