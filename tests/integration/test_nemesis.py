"""The nemesis and its proxies: each fault really happens, and is undone.

First the proxies alone, against a small echo server (forwarding, cut, refuse, delay,
heal, counters), and the fault planner; then real clusters: a partition of {n1} from
{n2, n3} makes the minority refuse (cp) or see its peers down (ap) while the majority
serves, and after the heal the cut-off node catches up; kill and pause show in the
process and its health.
"""
from __future__ import annotations

import random
import socket
import socketserver
import threading
import time

import pytest

from clusters.nemesis import FaultNotShown, Nemesis, ProxiedCluster, http_call, plan
from clusters.proxy import LinkProxies, all_links, partition_links
from tests.integration.conftest import require_service


# --- proxies against an echo server ------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture
def echo_proxies():
    servers = []
    addresses = {}
    for node in ("a", "b", "c"):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        addresses[node] = f"127.0.0.1:{server.server_address[1]}"
    proxies = LinkProxies(["a", "b", "c"], addresses).start()
    yield proxies
    proxies.close()
    for server in servers:
        server.shutdown()
        server.server_close()


def _connect(proxies, source, target) -> socket.socket:
    host, port = proxies.route(source, target).split(":")
    return socket.create_connection((host, int(port)), timeout=3)


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"x")
        return sock.recv(10) == b""
    except OSError:
        return True


def test_links_forward_both_ways_and_count_bytes(echo_proxies):
    proxies = echo_proxies
    proxies._check()
    assert sorted(proxies.links) == all_links(["a", "b", "c"])
    with _connect(proxies, "a", "b") as sock:
        assert _echo(sock, b"hello" * 1000) == b"hello" * 1000
    stats = proxies.stats()[("a", "b")]
    assert stats.accepted == 1 and stats.bytes_forward == 5000 and stats.bytes_backward == 5000
    assert proxies.stats()[("b", "a")].accepted == 0


def test_a_cut_closes_open_connections_and_refuses_new_ones_until_healed(echo_proxies):
    proxies = echo_proxies
    open_one = _connect(proxies, "a", "b")
    assert _echo(open_one, b"ping") == b"ping"
    untouched = _connect(proxies, "b", "c")
    proxies.cut(partition_links([["a"], ["b", "c"]]))
    assert proxies.cut_links() == {("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")}
    assert _closed_by_peer(open_one)
    for _ in range(3):
        with _connect(proxies, "a", "b") as refused:
            assert _closed_by_peer(refused)
    stats = proxies.stats()[("a", "b")]
    assert stats.severed >= 1 and stats.refused == 3
    assert _echo(untouched, b"still here") == b"still here"  # b-c is in the same group
    proxies.heal()
    with _connect(proxies, "a", "b") as again:
        assert _echo(again, b"back") == b"back"
    proxies._check()
    open_one.close()
    untouched.close()


def test_a_delay_holds_traffic_and_heal_removes_it(echo_proxies):
    proxies = echo_proxies
    with _connect(proxies, "a", "c") as sock:
        started = time.monotonic()
        _echo(sock, b"fast")
        fast = time.monotonic() - started
        held_before = proxies.stats()[("a", "c")].held
        proxies.delay([("a", "c")], 300)
        started = time.monotonic()
        assert _echo(sock, b"slow") == b"slow"
        slow = time.monotonic() - started
        shown, details = proxies.delay_evidence([("a", "c")])
        assert shown and details["held_chunks"] > held_before
        proxies.heal()
        started = time.monotonic()
        _echo(sock, b"fast")
        healed = time.monotonic() - started
    assert slow >= 0.3 > fast and healed < 0.3
    with pytest.raises(ValueError, match="delay_ms"):
        proxies.delay([("a", "c")], 10**9)


def test_bad_links_and_groups_are_refused_clearly(echo_proxies):
    with pytest.raises(ValueError, match="no link a->z"):
        echo_proxies.cut([("a", "z")])
    assert echo_proxies.cut_links() == set()
    with pytest.raises(ValueError, match="two groups"):
        partition_links([["a", "b"], ["b", "c"]])


# --- the planner ---------------------------------------------------------------------------------


def test_plans_are_seeded_bounded_and_leave_a_majority():
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    schedule = plan(["partition", "kill", "pause", "delay"], 120, nodes, random.Random(3))
    assert schedule == plan(["partition", "kill", "pause", "delay"], 120, nodes, random.Random(3))
    assert schedule != plan(["partition", "kill", "pause", "delay"], 120, nodes, random.Random(4))
    assert {f.kind for f in schedule} == {"partition", "kill", "pause", "delay"}
    end = 0.0
    for fault in schedule:
        assert fault.at >= end, "faults overlap"
        end = fault.at + fault.duration
        if fault.kind == "partition":
            small, large = (t.split(",") for t in fault.targets)
            assert len(small) < len(large) and set(small) | set(large) == set(nodes)
    assert end <= 118
    with pytest.raises(ValueError, match="faults must be"):
        plan(["flood"], 10, nodes, random.Random(0))
    with pytest.raises(ValueError, match="3 nodes"):
        plan(["kill"], 10, ["n1", "n2"], random.Random(0))


# --- real clusters -------------------------------------------------------------------------------


@pytest.fixture
def proxied(tmp_path):
    made = []

    def make(mode: str, **kwargs) -> ProxiedCluster:
        require_service(mode)
        cluster = ProxiedCluster.create(tmp_path / f"{mode}-{len(made)}", nodes=3, mode=mode, engine="memory",
                                        sync="never", **kwargs)  # fmt: skip
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def _kv(cluster, node, key, method="GET", body=None, **params):
    query = "&".join(f"{k}={v}" for k, v in {"timeout_ms": 1000, **params}.items())
    return http_call(f"{cluster.url(node)}/v1/kv/{key}?{query}", method, body, timeout=4)


def test_cp_partition_isolates_the_minority_and_the_majority_serves(proxied):
    cluster = proxied("cp")
    assert _kv(cluster, "n2", "k", "PUT", b"before")[0] == 200
    # A write is acknowledged once a majority has it: wait until n1 has applied it too, so
    # that what n1 serves during the cut is known.
    deadline = time.monotonic() + 10
    while _kv(cluster, "n1", "k", consistency="serializable")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    nemesis = Nemesis(cluster)
    nemesis.partition([["n1"], ["n2", "n3"]])
    shown = nemesis.prove_partition()
    nemesis._check()
    assert shown.shown and shown.evidence["cut_link_refusals"] > 0
    nemesis.prove_majority_serves()
    status, _ = _kv(cluster, "n2", "k", "PUT", b"during")
    assert status == 200
    assert _kv(cluster, "n1", "k")[0] in (503, 504)  # linearizable read refused on the minority
    stale = _kv(cluster, "n1", "k", consistency="serializable")
    assert stale[0] == 200 and stale[1]["value"] == "before"  # n1 really missed the write
    nemesis.heal()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body = _kv(cluster, "n1", "k", consistency="serializable")
        if status == 200 and body["value"] == "during":
            break
        time.sleep(0.2)
    assert (status, body["value"]) == (200, "during"), "n1 did not catch up after the heal"
    assert [e.fault for e in nemesis.events if e.fault != "evidence"] == ["partition", "heal"]
    assert not nemesis.unshown()


def test_ap_partition_shows_in_the_failure_detector_and_heals(proxied):
    cluster = proxied("ap")
    nemesis = Nemesis(cluster)
    nemesis.partition([["n1"], ["n2", "n3"]])
    nemesis.prove_partition()
    members = {m["id"]: m["status"] for m in cluster.status("n1")["members"]}
    assert members["n1"] == "alive" and members["n2"] != "alive" and members["n3"] != "alive"
    # The minority cannot gather W=2 (three nodes, no spare to stand in); the majority can.
    assert _kv(cluster, "n1", "k", "PUT", b"x")[0] == 503
    assert _kv(cluster, "n2", "k", "PUT", b"y")[0] == 200
    nemesis.heal()
    cluster.wait_healthy(timeout=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(m["status"] == "alive" for m in cluster.status("n1")["members"]):
            break
        time.sleep(0.2)
    assert all(m["status"] == "alive" for m in cluster.status("n1")["members"])


def test_a_partition_that_did_not_take_is_reported(proxied):
    cluster = proxied("ap")
    nemesis = Nemesis(cluster)
    nemesis.partition([["n1"], ["n2", "n3"]])
    cluster.proxies.heal()  # behind the nemesis' back: the cut is gone
    with pytest.raises(FaultNotShown):
        nemesis.prove_partition(timeout=2)
    assert nemesis.unshown() and nemesis.unshown()[0].fault == "evidence"


def test_kill_and_pause_show_and_are_undone(proxied):
    cluster = proxied("cp")
    nemesis = Nemesis(cluster)
    killed = nemesis.kill("n3")
    assert killed.shown and killed.evidence["exit_code"] == -9
    assert http_call(cluster.url("n3") + "/healthz")[0] == 0
    nemesis.restart("n3")
    assert http_call(cluster.url("n3") + "/healthz")[0] == 200
    paused = nemesis.pause("n2")
    assert paused.shown
    nemesis.resume("n2")
    cluster.wait_healthy(timeout=20)
    assert nemesis.faults_injected() == 2 and not nemesis.unshown()


# --- network namespaces (root only) ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["cp", "ap"])
def test_a_namespace_partition_is_real_packet_loss(tmp_path, mode):
    from clusters.nemesis import NamespacedCluster, namespaces_available

    reason = namespaces_available()
    if reason:
        pytest.skip(reason)
    require_service(mode)
    cluster = NamespacedCluster.create(tmp_path, nodes=3, mode=mode, engine="memory", sync="never")
    try:
        assert len({cluster.spec.node(n).peer_host for n in cluster.nodes}) == 3  # an address per node
        nemesis = Nemesis(cluster)
        nemesis.partition([["n1"], ["n2", "n3"]])
        shown = nemesis.prove_partition(timeout=15)
        assert "timed out" in shown.evidence["probe"]  # dropped, not refused
        # Clients in the root namespace still reach the cut-off node.
        assert http_call(cluster.url("n1") + "/v1/cluster")[0] == 200
        if mode == "cp":
            nemesis.prove_majority_serves()
        nemesis.heal()
        cluster.wait_healthy(timeout=30)
        assert not nemesis.unshown()
    finally:
        cluster.stop()
    import subprocess

    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"ck{cluster.network.tag}" not in names, "namespaces left behind"
