"""The cp mode on real processes, under the faults a server meets: crashes, freezes, restarts.

Each test starts its own 3-node cluster on free ports (the `cp_cluster` fixture, with
`--sync always`, the default a user gets), does what a user would, hurts the cluster with
the launcher (SIGKILL, SIGSTOP, SIGTERM), and checks what a user would notice:

- the leader is SIGKILLed under write load: a new leader serves within 3 s, no
  acknowledged write is lost on any node, and the killed node catches up after restart;
- two of three nodes are down or frozen: the survivor refuses writes and linearizable
  reads with 503/504 within the request's timeout, but still serves serializable reads;
- six clients increment one counter 15 times each with compare-and-swap: it ends at 90;
- every node is stopped (or killed) and restarted: every key keeps its value and revisions;
- every node is SIGKILLed at once under write load: no acknowledged write is lost;
- a write retried with its request_id (another node, after a full crash) applies once.

Measured figures are printed (`-s` shows them). Variants marked `slow` add the same
faults on other engines and timings.
"""
from __future__ import annotations

import random
import threading
import time
import urllib.parse
import uuid

import pytest

from clusters.workload import (
    NodeClient,
    RequestFailed,
    RequestLost,
    Response,
    value_of,
    wait_for_write,
)

REQUEST_TIMEOUT_MS = 1000
# A refusal must come within the request's timeout plus this much (scheduling on 2 busy cores).
ANSWER_SLACK_SECONDS = 0.5
FAILOVER_LIMIT_SECONDS = 3.0
CATCH_UP_LIMIT_SECONDS = 20.0


def read_prefix(client: NodeClient, url: str, prefix: str, **params) -> dict[str, dict]:
    """Every key under `prefix` as {key: item}, following `more` pages (bounded)."""
    found: dict[str, dict] = {}
    start_after = None
    for _ in range(1000):
        query = {"prefix": prefix, "limit": 500, "timeout_ms": 5000, **params}
        if start_after is not None:
            query["start_after"] = start_after
        response = client.request(url, "GET", "/v1/kv?" + urllib.parse.urlencode(query))
        assert response.status == 200, f"GET prefix {prefix} at {url}: {response.status} {response.body}"
        items = response.body["items"]
        for item in items:
            found[item["key"]] = item
        if not response.body.get("more") or not items:
            return found
        start_after = items[-1]["key"]
    raise AssertionError("more than 1000 pages")


def missing_writes(acknowledged: dict[str, str], found: dict[str, dict]) -> list[str]:
    return [
        f"{key}={value!r} (found {value_of(found.get(key))!r})"
        for key, value in sorted(acknowledged.items())
        if value_of(found.get(key)) != value
    ]


# --- leader crash under load ------------------------------------------------------------------


class Writers:
    """Threads writing unique keys through random serving nodes; remembers what was acknowledged."""

    def __init__(self, cluster, count: int = 4, prefix: str = "acked/"):
        self.cluster = cluster
        self.prefix = prefix
        self.acknowledged: dict[str, str] = {}
        self.acknowledged_at: list[float] = []
        self.statuses: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(count)]

    def __enter__(self) -> "Writers":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        assert not any(t.is_alive() for t in self._threads), "writer threads did not stop"

    def _write(self, number: int) -> None:
        client = NodeClient(timeout=REQUEST_TIMEOUT_MS / 1000 + 2)
        rng = random.Random(number)
        sequence = 0
        while not self._stop.is_set() and sequence < 100_000:
            serving = [n for n, handle in self.cluster.nodes.items() if handle.serving]
            if not serving:
                time.sleep(0.05)
                continue
            key, value = f"{self.prefix}{number}-{sequence}", f"v{number}-{sequence}"
            sequence += 1
            url = self.cluster.url(rng.choice(serving))
            try:
                response = client.put(url, key, value, timeout_ms=REQUEST_TIMEOUT_MS, request_id=uuid.uuid4().hex)
                status = str(response.status)
            except RequestFailed:
                status = "refused"
            except RequestLost:
                status = "lost"
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == "200":
                    self.acknowledged[key] = value
                    self.acknowledged_at.append(time.monotonic())
        client.close()


def test_leader_crash_under_write_load_loses_no_acknowledged_write(cp_cluster):
    cluster = cp_cluster(sync="always")
    wait_for_write(cluster)
    client = NodeClient(timeout=10)
    with Writers(cluster) as writers:
        time.sleep(2.0)
        old_leader = cluster.leader()
        survivors = [n for n in cluster.nodes if n != old_leader]
        killed_at = time.monotonic()
        cluster.kill(old_leader)
        serving_node, failover = wait_for_write(cluster, timeout=15, nodes=survivors, key="probe/after-kill")
        new_leader = cluster.leader(timeout=10)
        time.sleep(2.0)
    acknowledged = dict(writers.acknowledged)
    after_kill = sum(1 for at in writers.acknowledged_at if at > killed_at)
    print(f"\nleader {old_leader} killed; a write succeeded through {serving_node} after {failover:.2f} s; "
          f"new leader {new_leader}; {len(acknowledged)} writes acknowledged ({after_kill} after the kill); "
          f"answers: {writers.statuses}")
    assert new_leader != old_leader
    assert failover < FAILOVER_LIMIT_SECONDS, f"no write succeeded for {failover:.2f} s after the leader died"
    assert after_kill > 0, f"no write was acknowledged after the kill: {writers.statuses}"

    for node in survivors:
        found = read_prefix(client, cluster.url(node), "acked/")
        lost = missing_writes(acknowledged, found)
        assert not lost, f"{len(lost)} acknowledged writes missing on {node}: {lost[:10]}"

    cluster.restart(old_leader, wait=True, timeout=30)
    restarted_url = cluster.url(old_leader)
    deadline = time.monotonic() + CATCH_UP_LIMIT_SECONDS
    while True:
        found = read_prefix(client, restarted_url, "acked/", consistency="serializable")
        lost = missing_writes(acknowledged, found)
        if not lost:
            break
        assert time.monotonic() < deadline, (
            f"{old_leader} restarted but still misses {len(lost)} acknowledged writes after "
            f"{CATCH_UP_LIMIT_SECONDS} s: {lost[:10]}\n{cluster.log_tail(old_leader)}"
        )
        time.sleep(0.2)
    print(f"{old_leader} caught up {CATCH_UP_LIMIT_SECONDS - (deadline - time.monotonic()):.2f} s after its restart")
    assert not missing_writes(acknowledged, read_prefix(client, restarted_url, "acked/"))
    client.close()


# --- a minority refuses, quickly --------------------------------------------------------------


def timed(call) -> tuple[Response | str, float]:
    started = time.monotonic()
    try:
        answer: Response | str = call()
    except (RequestFailed, RequestLost) as error:
        answer = f"no answer: {error}"
    return answer, time.monotonic() - started


@pytest.mark.parametrize(
    "survivor_role, how",
    [("leader", "pause"), ("follower", "kill"), pytest.param("follower", "pause", marks=pytest.mark.slow)],
)
def test_a_node_without_quorum_refuses_within_the_timeout_but_serves_serializable_reads(cp_cluster, survivor_role, how):
    cluster = cp_cluster(sync="always")
    wait_for_write(cluster)
    client = NodeClient(timeout=10)
    leader = cluster.leader()
    survivor = leader if survivor_role == "leader" else next(n for n in sorted(cluster.nodes) if n != leader)
    others = [n for n in cluster.nodes if n != survivor]
    url = cluster.url(survivor)
    assert client.put(url, "minority/k", "before", timeout_ms=5000).status == 200
    # The survivor applies it before losing its peers (a follower may lag a moment).
    deadline = time.monotonic() + 5
    while value_of(client.get(url, "minority/k", consistency="serializable").body) != "before":
        assert time.monotonic() < deadline, "the survivor never applied the write"
        time.sleep(0.05)

    for node in others:
        (cluster.pause if how == "pause" else cluster.kill)(node)
    attempted: dict[str, int] = {}
    measured: list[str] = []
    try:
        for round_number, settle in enumerate((0.0, 3.0)):
            time.sleep(settle)
            value = f"during-{round_number}"
            probes = {
                "put": lambda: client.put(url, "minority/k", value, timeout_ms=REQUEST_TIMEOUT_MS, request_id=uuid.uuid4().hex),
                "get": lambda: client.get(url, "minority/k", timeout_ms=REQUEST_TIMEOUT_MS),
                "cas": lambda: client.put(url, "minority/k", value + "-cas", timeout_ms=REQUEST_TIMEOUT_MS, if_mod_revision=1),
                "delete": lambda: client.delete(url, "minority/other", timeout_ms=REQUEST_TIMEOUT_MS),
            }
            for name, probe in probes.items():
                answer, elapsed = timed(probe)
                status = answer.status if isinstance(answer, Response) else answer
                measured.append(f"{name} after {settle:.0f}s: {status} in {elapsed:.2f}s")
                assert isinstance(answer, Response) and answer.status in (503, 504), (
                    f"{name} on {survivor} without quorum answered {answer}"
                )
                assert elapsed < REQUEST_TIMEOUT_MS / 1000 + ANSWER_SLACK_SECONDS, (
                    f"{name} on {survivor} without quorum took {elapsed:.2f} s with timeout_ms={REQUEST_TIMEOUT_MS}"
                )
                if name in ("put", "cas"):
                    attempted[value if name == "put" else value + "-cas"] = answer.status
            answer, elapsed = timed(lambda: client.get(url, "minority/k", consistency="serializable", timeout_ms=REQUEST_TIMEOUT_MS))
            measured.append(f"serializable get after {settle:.0f}s: {getattr(answer, 'status', answer)} in {elapsed:.2f}s")
            assert isinstance(answer, Response) and answer.status == 200, f"serializable read without quorum: {answer}"
            assert value_of(answer.body) == "before"
    finally:
        for node in others:
            if how == "pause":
                cluster.resume(node)
            else:
                cluster.restart(node, wait=False)
    print(f"\n{survivor} ({survivor_role}) alone, others {'paused' if how == 'pause' else 'killed'}: " + "; ".join(measured))

    healed_through, waited = wait_for_write(cluster, timeout=30, key="probe/healed")
    print(f"the cluster took writes again {waited:.2f} s after the others came back")
    final = client.get(url, "minority/k", timeout_ms=5000)
    assert final.status == 200
    # A 503 promised "not applied"; a 504 allows either.
    allowed = {"before"} | {v for v, status in attempted.items() if status == 504}
    assert value_of(final.body) in allowed, f"{value_of(final.body)!r} after {attempted}"
    client.close()


# --- a compare-and-swap counter ---------------------------------------------------------------


def increment(client: NodeClient, urls: list[str], first: int, key: str, limit_seconds: float) -> dict[str, int]:
    """Add one to the counter at `key` with read + CAS, as a careful client does:
    412 -> read again; 503 / refused -> another node; 504 / lost -> send the same request
    again (same request_id) until it has a definite answer."""
    tally = {"attempts": 0, "conflicts": 0, "unknown": 0}
    deadline = time.monotonic() + limit_seconds
    node = first
    while True:
        assert time.monotonic() < deadline, f"no increment of {key} in {limit_seconds} s: {tally}"
        url = urls[node % len(urls)]
        try:
            current = client.get(url, key, timeout_ms=REQUEST_TIMEOUT_MS)
        except (RequestFailed, RequestLost):
            node += 1
            continue
        if current.status == 404:
            value, mod_revision = 0, 0
        elif current.status == 200:
            value, mod_revision = int(value_of(current.body)), current.body["mod_revision"]
        else:
            node += 1
            time.sleep(0.05)
            continue
        request_id = uuid.uuid4().hex
        while True:  # the same write until its outcome is known
            assert time.monotonic() < deadline, f"no increment of {key} in {limit_seconds} s: {tally}"
            tally["attempts"] += 1
            try:
                answer = client.put(
                    urls[node % len(urls)], key, str(value + 1),
                    timeout_ms=REQUEST_TIMEOUT_MS, if_mod_revision=mod_revision, request_id=request_id,
                )
                status = answer.status
            except RequestFailed:
                status = 503
            except RequestLost:
                status = 504
            if status == 200:
                return tally
            if status == 412:
                tally["conflicts"] += 1
                break
            if status == 503:
                node += 1
                time.sleep(0.02)
                continue
            assert status == 504, f"unexpected answer to a cas: {status} {answer.body}"
            tally["unknown"] += 1
            node += 1


@pytest.mark.parametrize("fault", ["none", "leader killed", pytest.param("leader paused", marks=pytest.mark.slow)])
def test_compare_and_swap_counter_counts_every_increment_once(cp_cluster, fault):
    clients, increments, key = 6, 15, "counter"
    cluster = cp_cluster(sync="always")
    wait_for_write(cluster)
    urls = cluster.urls
    tallies: list[dict[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(number: int) -> None:
        client = NodeClient(timeout=REQUEST_TIMEOUT_MS / 1000 + 2)
        try:
            for _ in range(increments):
                tally = increment(client, urls, number, key, limit_seconds=60)
                with lock:
                    tallies.append(tally)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    if fault == "leader killed":
        time.sleep(0.5)
        victim = cluster.leader()
        cluster.kill(victim)
        time.sleep(1.0)
        cluster.restart(victim, wait=False)
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    elapsed = time.monotonic() - started
    cluster.wait_healthy(timeout=30)  # a restarted victim may still be starting
    final = NodeClient(timeout=10).get(cluster.url(cluster.leader()), key, timeout_ms=5000)
    total = {name: sum(t[name] for t in tallies) for name in ("attempts", "conflicts", "unknown")}
    print(f"\ncounter ({fault}): {final.body} after {elapsed:.2f} s; {total}")
    assert final.status == 200
    assert value_of(final.body) == str(clients * increments)
    assert final.body["version"] == clients * increments


# --- a full restart ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_full_restart_keeps_every_key_and_revision(cp_cluster, how):
    cluster = cp_cluster(sync="always")
    wait_for_write(cluster)
    client = NodeClient(timeout=10)
    url = cluster.url(cluster.leader())
    for number in range(30):
        assert client.put(url, f"restart/k{number}", f"v{number}", timeout_ms=5000).status == 200
    for number in range(5):
        assert client.put(url, f"restart/k{number}", f"w{number}", timeout_ms=5000).status == 200
    assert client.delete(url, "restart/k5", timeout_ms=5000).body["deleted"] == 1
    before = read_prefix(client, url, "restart/")
    revision_before = client.cluster(url).body["revision"]
    assert len(before) == 29 and "restart/k5" not in before

    for node in list(cluster.nodes):
        if how == "stop":
            cluster.stop_node(node)
        else:
            cluster.kill(node)
    for node in list(cluster.nodes):
        cluster.restart(node, wait=False)
    cluster.wait_healthy(timeout=60)
    cluster.leader(timeout=30)

    fields = ("value", "create_revision", "mod_revision", "version")
    for node in cluster.nodes:
        after = read_prefix(client, cluster.url(node), "restart/")
        assert {k: [i.get(f) for f in fields] for k, i in after.items()} == {
            k: [i.get(f) for f in fields] for k, i in before.items()
        }, f"{node} after a full {how}"
    assert client.cluster(url).body["revision"] == revision_before
    answer = client.put(url, "restart/new", "x", timeout_ms=5000)
    assert answer.status == 200 and answer.body["revision"] == revision_before + 1
    client.close()


@pytest.mark.parametrize("engine", ["lsm", pytest.param("hash", marks=pytest.mark.slow)])
def test_killing_every_node_at_once_under_write_load_loses_no_acknowledged_write(cp_cluster, engine):
    """A power-cut-like crash of the whole cluster (SIGKILL to all three in one go) while
    writes are in flight: whatever was acknowledged must be there after the restart."""
    cluster = cp_cluster(sync="always", engine=engine)
    wait_for_write(cluster)
    client = NodeClient(timeout=10)
    with Writers(cluster, prefix="crash/") as writers:
        time.sleep(2.0)
        for node in list(cluster.nodes):
            cluster.kill(node)
    acknowledged = dict(writers.acknowledged)  # every writer has stopped: nothing more comes
    assert len(acknowledged) > 20, f"too few writes to judge: {writers.statuses}"
    for node in list(cluster.nodes):
        cluster.restart(node, wait=False)
    cluster.wait_healthy(timeout=60)
    cluster.leader(timeout=30)
    print(f"\n{len(acknowledged)} writes acknowledged before every node was killed; answers {writers.statuses}")
    for node in cluster.nodes:
        lost = missing_writes(acknowledged, read_prefix(client, cluster.url(node), "crash/"))
        assert not lost, f"{len(lost)} acknowledged writes missing on {node} after the crash: {lost[:10]}"
    client.close()


def test_a_retried_write_applies_once_through_any_node_and_across_a_full_crash(cp_cluster):
    """What a client does after a 504: send the same write again, with the same request_id,
    maybe to another node, maybe after the whole cluster crashed. It must not apply twice:
    the retry answers with the first write's result, and a later write stays on top."""
    cluster = cp_cluster(sync="always")
    wait_for_write(cluster)
    client = NodeClient(timeout=10)
    first, second, third = cluster.urls
    original = client.put(first, "retry/k", "v1", request_id="write-a", timeout_ms=5000)
    assert original.status == 200
    assert client.put(second, "retry/k", "v2", request_id="write-b", timeout_ms=5000).status == 200
    retried = client.put(third, "retry/k", "v1", request_id="write-a", timeout_ms=5000)
    assert (retried.status, retried.body["revision"]) == (200, original.body["revision"])
    assert value_of(client.get(first, "retry/k").body) == "v2"
    cas = [client.put(url, "retry/c", "1", if_mod_revision=0, request_id="cas-a", timeout_ms=5000) for url in (first, second)]
    assert [a.status for a in cas] == [200, 200] and cas[0].body == cas[1].body

    for node in list(cluster.nodes):
        cluster.kill(node)
    for node in list(cluster.nodes):
        cluster.restart(node, wait=False)
    cluster.wait_healthy(timeout=60)
    cluster.leader(timeout=30)
    client.close()
    client = NodeClient(timeout=10)
    retried = client.put(second, "retry/k", "v1", request_id="write-a", timeout_ms=5000)
    assert (retried.status, retried.body.get("revision")) == (200, original.body["revision"]), retried
    final = client.get(third, "retry/k")
    assert (value_of(final.body), final.body["version"]) == ("v2", 2)
    client.close()
