"""Faults on a local cluster: crash and restart, freeze and thaw, and real partitions.

Jepsen calls the thing that hurts a cluster during a test its nemesis. This one drives a
`ProxiedCluster` (a `LocalCluster` whose peer traffic runs through per-link TCP proxies,
`clusters/proxy.py`) and offers:

| fault | how | undone by |
|---|---|---|
| `kill` | SIGKILL one node (a crash: no flush, no goodbye) | `restart` (same data dir) |
| `pause` | SIGSTOP one node (a GC pause, a hung VM): sockets stay open | `resume` (SIGCONT) |
| `partition` | cut the proxy links between groups, both directions | `heal` |
| `delay` | hold peer traffic on some links for `delay_ms` (proxies only) | `heal` |

Two networks can carry the peer traffic (`create_cluster(network, ...)`):

- `proxy` (`ProxiedCluster`, anywhere): per-link TCP proxies on loopback; a cut closes
  connections and refuses new ones, so nodes see resets and refusals.
- `netns` (`NamespacedCluster`, root only): every node in its own network namespace with
  its own address behind a router namespace; a cut is a blackhole rule in the router, so
  packets vanish and nodes see timeouts, as behind a dead switch.

Clients keep reaching every node: only peer traffic (Raft's port in cp, the peer RPC in
ap) goes through the proxies.

Every fault is recorded as a `FaultEvent` with the evidence that it happened (proxy
counters after a cut, the process's exit status after a kill, a health probe that times
out after a pause, the minority refusing after a partition), so a green verdict means the
cluster was really hurt:

    with ProxiedCluster.create(tmp, nodes=3, mode="cp") as cluster:
        nemesis = Nemesis(cluster)
        nemesis.partition([["n1"], ["n2", "n3"]])
        nemesis.prove_partition()          # n1 refuses linearizable reads; links show refusals
        nemesis.heal()
        print(nemesis.events)              # [FaultEvent(at=..., fault='partition', ...), ...]

`plan(...)` is the pure part: a seeded schedule of faults for a run of `duration` seconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

from .launcher import LocalCluster
from .proxy import Link, LinkProxies, LinkStats, partition_links
from .spec import NodeSpec, load_spec, render_spec, write_cluster_file

FAULT_KINDS = ("partition", "kill", "pause", "delay")
# A fault lasts between these many seconds before it is undone (scaled down for short runs).
MIN_FAULT_SECONDS = 2.0
MAX_FAULT_SECONDS = 6.0
# Quiet time between two faults: the cluster shows it can recover, not only survive.
MIN_QUIET_SECONDS = 1.0
MAX_QUIET_SECONDS = 3.0
# A plan never holds more faults than this (a bound on a schedule built from user input).
MAX_PLANNED_FAULTS = 10_000
# Delays injected by the `delay` fault, in ms.
DELAY_CHOICES_MS = (50, 200, 500)
# How long the nemesis waits for a fault's evidence.
EVIDENCE_TIMEOUT_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 1.5


class FaultNotShown(AssertionError):
    """A fault was injected but the cluster shows no sign of it (the test would prove nothing)."""


# --- the pure part: planning ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedFault:
    """One fault of a schedule: start `at` seconds into the run, undo after `duration`.

    `targets` are node ids (kill, pause) or groups joined by '|' (partition: "n1|n2,n3")
    or links "a>b" (delay).
    """

    at: float
    kind: str
    targets: tuple[str, ...]
    duration: float
    delay_ms: float = 0.0


def plan(kinds: Sequence[str], duration: float, nodes: Sequence[str], rng: random.Random,
         *, settle: float = 2.0) -> list[PlannedFault]:  # fmt: skip
    """A schedule of faults, one at a time, for a run of `duration` seconds.

    Faults start after `settle` seconds and are all undone `settle` seconds before the end,
    so the run finishes on a healed cluster. At most one node is down or frozen at once and
    every partition leaves a majority, so the cp promise "the majority keeps serving" is
    testable. Same arguments, same plan:

        >>> p = plan(["kill", "partition"], 30, ["n1", "n2", "n3"], random.Random(7))
        >>> p == plan(["kill", "partition"], 30, ["n1", "n2", "n3"], random.Random(7))
        True
        >>> all(f.at + f.duration <= 28 for f in p)
        True
    """
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"faults must be some of {', '.join(FAULT_KINDS)}, not {list(kinds)}")
    if len(nodes) < 3 and any(k in ("partition", "kill", "pause") for k in kinds):
        raise ValueError("a fault schedule needs at least 3 nodes so that a majority survives")
    if duration <= 0:
        raise ValueError(f"duration must be positive, not {duration}")
    # Short runs get short faults, so a 30 s run still sees several.
    scale = min(1.0, max(0.3, duration / 60.0))
    low, high = MIN_FAULT_SECONDS * scale, MAX_FAULT_SECONDS * scale
    quiet_low, quiet_high = MIN_QUIET_SECONDS * scale, MAX_QUIET_SECONDS * scale
    end = duration - settle
    now = settle
    faults: list[PlannedFault] = []
    minority = (len(nodes) - 1) // 2
    while len(faults) < MAX_PLANNED_FAULTS:
        length = rng.uniform(low, high)
        if now + length > end:
            break
        kind = rng.choice(list(kinds))
        if kind in ("kill", "pause"):
            targets: tuple[str, ...] = (rng.choice(list(nodes)),)
            faults.append(PlannedFault(round(now, 3), kind, targets, round(length, 3)))
        elif kind == "partition":
            shuffled = list(nodes)
            rng.shuffle(shuffled)
            size = rng.randint(1, max(1, minority))
            small, large = sorted(shuffled[:size]), sorted(shuffled[size:])
            faults.append(PlannedFault(round(now, 3), kind, (",".join(small), ",".join(large)), round(length, 3)))
        else:
            a, b = rng.sample(list(nodes), 2)
            faults.append(PlannedFault(round(now, 3), kind, (f"{a}>{b}", f"{b}>{a}"), round(length, 3),
                                       delay_ms=float(rng.choice(DELAY_CHOICES_MS))))  # fmt: skip
        now += length + rng.uniform(quiet_low, quiet_high)
    return faults


# --- a cluster with proxies -------------------------------------------------------------------


class ProxiedCluster(LocalCluster):
    """A LocalCluster whose nodes dial each other through `LinkProxies`.

    The proxies start before the nodes (their ports go into each node's
    `--peer-route ID=HOST:PORT` flags) and stop after them. Everything else is
    LocalCluster's: kill, pause, restart and friends work as before.

        cluster = ProxiedCluster.create(tmp_path, nodes=3, mode="ap")   # started
        cluster.proxies.cut(partition_links([["n1"], ["n2", "n3"]]))
        cluster.stop()                                                  # nodes, then proxies
    """

    def __init__(self, cluster_file, mode: str = "cp", *args, node_args: dict[str, Sequence[str]] | None = None,
                 **kwargs) -> None:  # fmt: skip
        spec = load_spec(cluster_file)
        self.proxies = LinkProxies(spec.node_ids, {n.id: n.peer_address for n in spec.nodes}).start()
        self.network = self.proxies
        merged: dict[str, list[str]] = {n: list((node_args or {}).get(n, ())) for n in spec.node_ids}
        for node_id in spec.node_ids:
            for target, address in sorted(self.proxies.routes_for(node_id).items()):
                merged[node_id] += ["--peer-route", f"{target}={address}"]
        try:
            super().__init__(cluster_file, mode, *args, node_args=merged, **kwargs)
        except BaseException:
            self.proxies.close()
            raise

    @classmethod
    def create(cls, base_dir: str | Path | None = None, nodes: int = 3, mode: str = "cp", *, start: bool = True,
               name: str = "proxied", timeout: float = 60.0, **kwargs) -> "ProxiedCluster":  # fmt: skip
        """Write a cluster file on free ports under `base_dir` (a new temp dir by default)
        and return the cluster, started unless `start=False`."""
        base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="capkv-"))
        base.mkdir(parents=True, exist_ok=True)
        cluster_file = base / "cluster.toml"
        write_cluster_file(cluster_file, nodes, name=name)
        kwargs.setdefault("data_dir", base / "data")
        kwargs.setdefault("log_dir", base / "logs")
        cluster = cls(cluster_file, mode, **kwargs)
        if start:
            cluster.start(timeout=timeout)
        return cluster

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.proxies.close()


# --- a cluster in network namespaces (root only) --------------------------------------------


class NamespaceError(RuntimeError):
    """Network namespaces are not available here (not root, no `ip`, or a command failed)."""


def namespaces_available() -> str | None:
    """None when this process can build namespace clusters, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


class NamespaceNetwork:
    """Each node in its own network namespace behind one router namespace, so nodes have
    their own addresses and a partition is real packet loss.

        root ns (clients) 10.S.0.2 --- 10.S.0.1 [router ns, forwarding] 10.S.i.1 --- 10.S.i.2 node i

    A cut link (a, b) is a policy rule in the router, `from <a> to <b> blackhole`: packets
    from a to b vanish on the way (the sender sees timeouts, not refusals), while clients
    in the root namespace still reach every node. Everything is created under a random tag
    and removed by `close()`; the only trace in the root namespace is one veth and its
    route, both deleted with it. Delays need `tc netem`, which this kernel may lack: not
    offered here (use the proxies).
    """

    def __init__(self, nodes: Sequence[str], tag: str | None = None):
        reason = namespaces_available()
        if reason:
            raise NamespaceError(reason)
        self.nodes = list(nodes)
        if len(self.nodes) > 200:
            raise ValueError("at most 200 nodes in a namespace network")
        self.tag = tag or f"{random.randrange(16**4):04x}"
        self.subnet = self._free_subnet()
        self.router = f"ck{self.tag}-rt"
        self.namespaces = {node: f"ck{self.tag}-{index}" for index, node in enumerate(self.nodes, start=1)}
        self.addresses = {node: f"10.{self.subnet}.{index}.2" for index, node in enumerate(self.nodes, start=1)}
        self.host_address = f"10.{self.subnet}.0.2"
        self._host_link = f"ck{self.tag}h"
        self._cut: set[Link] = set()
        self._created: list[str] = []

    def _free_subnet(self) -> int:
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=10).stdout
        used = {int(second) for second in re.findall(r"\b10\.(\d+)\.", routes)}
        for candidate in random.sample(range(100, 250), 150):
            if candidate not in used:
                return candidate
        raise NamespaceError("no free 10.x.0.0/16 subnet for the namespaces")

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if check and result.returncode != 0:
            raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result

    def start(self) -> "NamespaceNetwork":
        try:
            self._ip("netns", "add", self.router)
            self._created.append(self.router)
            subprocess.run(["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                           check=True, capture_output=True, timeout=10)  # fmt: skip
            self._ip("-n", self.router, "link", "set", "lo", "up")
            for index, node in enumerate(self.nodes, start=1):
                ns, inner, outer = self.namespaces[node], f"ck{self.tag}n{index}", f"ck{self.tag}r{index}"
                self._ip("netns", "add", ns)
                self._created.append(ns)
                self._ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                self._ip("link", "set", inner, "netns", ns)
                self._ip("link", "set", outer, "netns", self.router)
                self._ip("-n", ns, "addr", "add", f"{self.addresses[node]}/24", "dev", inner)
                self._ip("-n", ns, "link", "set", inner, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "route", "add", "default", "via", f"10.{self.subnet}.{index}.1")
                self._ip("-n", self.router, "addr", "add", f"10.{self.subnet}.{index}.1/24", "dev", outer)
                self._ip("-n", self.router, "link", "set", outer, "up")
            router_side = f"ck{self.tag}r0"
            self._ip("link", "add", self._host_link, "type", "veth", "peer", "name", router_side)
            self._ip("link", "set", router_side, "netns", self.router)
            self._ip("addr", "add", f"{self.host_address}/24", "dev", self._host_link)
            self._ip("link", "set", self._host_link, "up")
            self._ip("-n", self.router, "addr", "add", f"10.{self.subnet}.0.1/24", "dev", router_side)
            self._ip("-n", self.router, "link", "set", router_side, "up")
            self._ip("route", "add", f"10.{self.subnet}.0.0/16", "via", f"10.{self.subnet}.0.1")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the namespaces (their veths go with them) and the root veth; idempotent."""
        self._ip("link", "del", self._host_link, check=False)
        for ns in reversed(self._created):
            self._ip("netns", "del", ns, check=False)
        self._created.clear()

    def exec_prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node]]

    def cut(self, links: Iterable[Link]) -> None:
        for a, b in links:
            if (a, b) not in self._cut:
                self._ip("-n", self.router, "rule", "add", "from", self.addresses[a], "to", self.addresses[b], "blackhole")
                self._cut.add((a, b))

    def heal(self, links: Iterable[Link] | None = None) -> None:
        for a, b in list(self._cut if links is None else links):
            if (a, b) in self._cut:
                self._ip("-n", self.router, "rule", "del", "from", self.addresses[a], "to", self.addresses[b],
                         "blackhole", check=False)  # fmt: skip
                self._cut.discard((a, b))

    def delay(self, links: Iterable[Link], delay_ms: float) -> None:
        raise ValueError("delays are offered by the proxies only (--network proxy): tc netem may be missing here")

    def stats(self) -> dict[Link, LinkStats]:
        return {(a, b): LinkStats(cut=(a, b) in self._cut) for a in self.nodes for b in self.nodes if a != b}

    def evidence(self, links: Iterable[Link], baseline=None, port: int | None = None) -> tuple[bool, dict]:
        """Try one TCP connect across a cut link from inside the source's namespace; shown
        when it times out (the packets vanished) rather than connecting."""
        links = sorted(links)
        if not links or port is None:
            return False, {"probe": "nothing to probe"}
        a, b = links[0]
        script = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)\n"
                  " print('connected')\nexcept socket.timeout:\n print('timed out')\nexcept OSError as e:\n print(e)")
        result = subprocess.run([*self.exec_prefix(a), sys.executable, "-c", script, self.addresses[b], str(port)],
                                capture_output=True, text=True, timeout=15)  # fmt: skip
        said = (result.stdout.strip() or result.stderr.strip())[:200]
        return said == "timed out", {"probe": f"{a} -> {b}:{port}: {said}"}

    def _check(self) -> None:
        assert all(a in self.addresses and b in self.addresses and a != b for a, b in self._cut)
        assert len(set(self.addresses.values())) == len(self.addresses)


class NamespacedCluster(LocalCluster):
    """A LocalCluster whose nodes each run in their own network namespace (root only).

        cluster = NamespacedCluster.create(tmp_path, nodes=3, mode="cp")
        Nemesis(cluster).partition([["n1"], ["n2", "n3"]])   # real packet loss
    """

    def __init__(self, cluster_file, network: NamespaceNetwork, mode: str = "cp", *args, **kwargs) -> None:
        self.network = network
        super().__init__(cluster_file, mode, *args, **kwargs)

    @classmethod
    def create(cls, base_dir: str | Path | None = None, nodes: int = 3, mode: str = "cp", *, start: bool = True,
               name: str = "netns", timeout: float = 60.0, client_port: int = 2379, peer_port: int = 2380,
               **kwargs) -> "NamespacedCluster":  # fmt: skip
        base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="capkv-"))
        base.mkdir(parents=True, exist_ok=True)
        ids = [f"n{i + 1}" for i in range(nodes)]
        network = NamespaceNetwork(ids).start()
        try:
            cluster_file = base / "cluster.toml"
            specs = [NodeSpec(n, f"http://{network.addresses[n]}:{client_port}", f"{network.addresses[n]}:{peer_port}")
                     for n in ids]  # fmt: skip
            cluster_file.write_text(render_spec(name, specs), encoding="utf-8")
            kwargs.setdefault("data_dir", base / "data")
            kwargs.setdefault("log_dir", base / "logs")
            cluster = cls(cluster_file, network, mode, **kwargs)
        except BaseException:
            network.close()
            raise
        if start:
            cluster.start(timeout=timeout)
        return cluster

    def command(self, node_id: str) -> list[str]:
        return self.network.exec_prefix(node_id) + super().command(node_id)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.network.close()


NETWORKS = ("proxy", "netns")


def create_cluster(network: str, base_dir: str | Path | None = None, nodes: int = 3, mode: str = "cp",
                   **kwargs) -> LocalCluster:  # fmt: skip
    """A started cluster whose peer links a Nemesis can cut: `proxy` (per-link TCP proxies on
    loopback, anywhere) or `netns` (a namespace per node, real packet loss; root only)."""
    if network == "proxy":
        return ProxiedCluster.create(base_dir, nodes=nodes, mode=mode, **kwargs)
    if network == "netns":
        return NamespacedCluster.create(base_dir, nodes=nodes, mode=mode, **kwargs)
    raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")


# --- evidence ---------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultEvent:
    """One thing the nemesis did, when (monotonic seconds), and what showed it happened."""

    at: float
    fault: str  # partition | heal | kill | restart | pause | resume | delay
    targets: tuple[str, ...]
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    shown: bool | None = None  # None: no evidence was asked for

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


def http_call(url: str, method: str = "GET", body: bytes | None = None, timeout: float = PROBE_TIMEOUT_SECONDS) -> tuple[int, dict | str]:
    """(status, parsed JSON or text); (0, reason) when nothing answered in time."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(1 << 20)
    except (OSError, ValueError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


class Nemesis:
    """Inject faults into a ProxiedCluster and show that each one took. Thread-safe.

    Every method records a FaultEvent in `events`. The `prove_*` methods wait (bounded) for
    evidence and raise FaultNotShown when there is none.
    """

    def __init__(self, cluster: ProxiedCluster, clock=time.monotonic):
        self.cluster = cluster
        self.clock = clock
        self.events: list[FaultEvent] = []
        self._lock = threading.RLock()
        self._groups: list[list[str]] | None = None
        self._baseline: dict = {}
        self._delayed: list[Link] = []
        self._delay_baseline: dict = {}

    # --- faults -------------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[str]]) -> FaultEvent:
        """Cut every link between nodes of different groups (both directions)."""
        groups = [sorted(g) for g in groups]
        for node in (n for g in groups for n in g):
            self.cluster._node(node)  # unknown id: a clear error before anything changes
        links = partition_links(groups)
        with self._lock:
            self._baseline = self.cluster.network.stats()
            self.cluster.network.cut(links)
            self._groups = groups
            return self._record("partition", tuple(",".join(g) for g in groups), {"links_cut": len(links)})

    def delay(self, links: Iterable[Link], delay_ms: float) -> FaultEvent:
        links = list(links)
        with self._lock:
            self._delay_baseline = self.cluster.network.stats()
            self.cluster.network.delay(links, delay_ms)
            self._delayed = links
        return self._record("delay", tuple(f"{a}>{b}" for a, b in links), {"delay_ms": delay_ms})

    def prove_delay(self, timeout: float = EVIDENCE_TIMEOUT_SECONDS) -> FaultEvent:
        """Wait until peer traffic on the delayed links was really held back (the proxies
        count each chunk a delay held). Raft heartbeats and ap gossip cross most links every
        fraction of a second, so a delay that took shows within a second or two; a link that
        carried nothing at all is recorded as idle (shown None), not as a failure."""
        with self._lock:
            links, baseline = self._delayed, self._delay_baseline
        if not links:
            raise ValueError("no delay is in force")
        targets = tuple(f"{a}>{b}" for a, b in links)
        deadline = self.clock() + timeout
        while True:
            shown, details = self.cluster.network.delay_evidence(links, baseline)
            if shown:
                return self._record("evidence", targets, details, shown=True)
            if self.clock() >= deadline:
                if details["bytes"] == 0:
                    # Nothing crossed these links (two Raft followers do not talk): the delay
                    # is in force but had nothing to act on. Not a failure, and not a fault shown.
                    return self._record("evidence", targets, {**details, "idle": True}, shown=None)
                self._record("evidence", targets, details, shown=False)
                raise FaultNotShown(f"delay on {links} not shown after {timeout}s: {details}")
            time.sleep(0.2)

    def heal(self) -> FaultEvent:
        """Undo every cut and delay."""
        with self._lock:
            self.cluster.network.heal()
            self._groups = None
            self._delayed = []
            return self._record("heal", (), {})

    def kill(self, node: str) -> FaultEvent:
        self.cluster.kill(node)
        code = self.cluster.nodes[node].process.returncode
        return self._record("kill", (node,), {"exit_code": code}, shown=code == -9)

    def restart(self, node: str, timeout: float = 60.0) -> FaultEvent:
        started = self.clock()
        self.cluster.restart(node, timeout=timeout)
        return self._record("restart", (node,), {"healthy_after_s": round(self.clock() - started, 3)})

    def pause(self, node: str) -> FaultEvent:
        self.cluster.pause(node)
        status, detail = http_call(self.cluster.url(node) + "/healthz", timeout=0.5)
        return self._record("pause", (node,), {"healthz": status or detail}, shown=status == 0)

    def resume(self, node: str) -> FaultEvent:
        self.cluster.resume(node)
        return self._record("resume", (node,), {})

    def heal_all(self, timeout: float = 60.0) -> None:
        """Leave the cluster whole: heal links, resume paused and restart dead nodes."""
        self.heal()
        for node_id, handle in self.cluster.nodes.items():
            if handle.paused:
                self.resume(node_id)
        for node_id, handle in self.cluster.nodes.items():
            if not handle.running:
                self.restart(node_id, timeout=timeout)

    # --- evidence ----------------------------------------------------------------------------

    def prove_partition(self, timeout: float = EVIDENCE_TIMEOUT_SECONDS) -> FaultEvent:
        """Wait until the current partition shows, both in the network and in the service:

        - network: proxies: some connection across the cut was refused or severed since
          the cut (the nodes tried); namespaces: a TCP connect from a cut-off node to a
          peer across the cut times out (packets are really lost);
        - cp: every node outside the largest group refuses a linearizable read (503/504);
        - ap: every node outside the largest group reports the nodes across the cut as
          not alive in `GET /v1/cluster` (reads through it are sent first, so its failure
          detector has something to notice).
        """
        with self._lock:
            groups = self._groups
        if not groups:
            raise ValueError("no partition is in force")
        links = partition_links(groups)
        largest = max(groups, key=len)
        minority = [n for g in groups if g is not largest for n in g if self.cluster.nodes[n].serving]
        deadline = self.clock() + timeout
        evidence: dict[str, Any] = {}
        while True:
            cut_shown, details = self._network_evidence(links)
            evidence.update(details)
            refusals = {node: self._refuses(node, groups) for node in minority}
            evidence["minority"] = refusals
            shown = cut_shown and all(r is True for r in refusals.values())
            if shown or self.clock() >= deadline:
                event = self._record("evidence", tuple(minority), evidence, shown=shown)
                if not shown:
                    raise FaultNotShown(f"partition {groups} not shown after {timeout}s: {evidence}")
                return event
            time.sleep(0.2)

    def _network_evidence(self, links: set[Link]) -> tuple[bool, dict]:
        network = self.cluster.network
        if isinstance(network, NamespaceNetwork):
            a, b = sorted(links)[0]
            return network.evidence([(a, b)], port=self.cluster.spec.node(b).peer_port)
        return network.evidence(links, self._baseline)

    def _refuses(self, node: str, groups: list[list[str]]) -> bool | str:
        """True when `node` shows it is cut off; otherwise what it said."""
        url = self.cluster.url(node)
        if self.cluster.mode == "cp":
            status, body = http_call(url + "/v1/kv/nemesis%2Fprobe?timeout_ms=500", timeout=3.0)
            if status in (503, 504):
                return True
            return f"linearizable read answered {status}"
        own = next(g for g in groups if node in g)
        others = {n for g in groups for n in g if n not in own}
        # Traffic for the failure detector. Long enough for a peer call to time out: with
        # real packet loss (namespaces) nothing is refused, a call just never answers.
        http_call(url + "/v1/kv/nemesis%2Fprobe?timeout_ms=2500", timeout=5.0)
        status, body = http_call(url + "/v1/cluster")
        if status != 200 or not isinstance(body, dict):
            return f"/v1/cluster answered {status}"
        seen = {m["id"]: m.get("status") for m in body.get("members", [])}
        alive = sorted(n for n in others if seen.get(n) == "alive")
        return True if not alive else f"still sees {', '.join(alive)} alive"

    def prove_majority_serves(self, timeout: float = EVIDENCE_TIMEOUT_SECONDS) -> FaultEvent:
        """cp: a write through a node of the largest group succeeds during the partition."""
        with self._lock:
            groups = self._groups
        largest = max(groups, key=len) if groups else list(self.cluster.nodes)
        candidates = [n for n in largest if self.cluster.nodes[n].serving]
        deadline = self.clock() + timeout
        last: dict[str, Any] = {}
        while True:
            for node in candidates:
                status, body = http_call(self.cluster.url(node) + "/v1/kv/nemesis%2Fmajority?timeout_ms=1000",
                                     "PUT", str(self.clock()).encode(), timeout=3.0)  # fmt: skip
                last[node] = status
                if status == 200:
                    return self._record("evidence", (node,), {"majority_write": 200,
                                                              "waited_s": round(timeout - (deadline - self.clock()), 3)},
                                        shown=True)  # fmt: skip
            if self.clock() >= deadline:
                self._record("evidence", tuple(candidates), {"majority_write": last}, shown=False)
                raise FaultNotShown(f"no write through the majority {candidates} within {timeout}s: {last}")
            time.sleep(0.2)

    def link_stats(self) -> dict[Link, LinkStats]:
        return self.cluster.network.stats()

    # --- schedules ---------------------------------------------------------------------------

    def run(self, schedule: Sequence[PlannedFault], started: float, stop: threading.Event | None = None,
            prove: bool = True) -> None:  # fmt: skip
        """Carry out `schedule` (times relative to `started`, a `clock()` reading), each
        fault undone after its duration; stops early when `stop` is set. With `prove`,
        every partition is checked with `prove_partition` and every delay with `prove_delay` (a failure is recorded in the
        event, not raised, so the run goes on and the verdict reports it)."""
        stop = stop or threading.Event()
        for fault in schedule:
            if stop.wait(max(0.0, started + fault.at - self.clock())):
                break
            try:
                self.inject(fault, prove=prove)
                stop.wait(max(0.0, started + fault.at + fault.duration - self.clock()))
                self.undo(fault)
            except Exception as error:  # noqa: BLE001 - recorded; the run's verdict fails on it
                self._record("error", fault.targets, {"fault": fault.kind, "error": f"{type(error).__name__}: {error}"},
                             shown=False)  # fmt: skip

    def inject(self, fault: PlannedFault, prove: bool = True) -> None:
        if fault.kind == "kill":
            self.kill(fault.targets[0])
        elif fault.kind == "pause":
            self.pause(fault.targets[0])
        elif fault.kind == "partition":
            self.partition([t.split(",") for t in fault.targets])
            if prove:
                limit = min(EVIDENCE_TIMEOUT_SECONDS, max(3.0, fault.duration))
                try:
                    self.prove_partition(timeout=limit)
                    if self.cluster.mode == "cp":
                        # The cp promise under a partition: the majority side keeps serving.
                        self.prove_majority_serves(timeout=EVIDENCE_TIMEOUT_SECONDS)
                except FaultNotShown:
                    pass  # recorded as an event with shown=False
        elif fault.kind == "delay":
            self.delay([tuple(t.split(">")) for t in fault.targets], fault.delay_ms)
            if prove:
                try:
                    self.prove_delay(timeout=min(EVIDENCE_TIMEOUT_SECONDS, max(3.0, fault.duration)))
                except FaultNotShown:
                    pass  # recorded as an event with shown=False

    def undo(self, fault: PlannedFault) -> None:
        if fault.kind == "kill":
            self.restart(fault.targets[0])
        elif fault.kind == "pause":
            self.resume(fault.targets[0])
        else:
            self.heal()

    def _check(self) -> None:
        """Invariants: events in time order; a partition in force names every node once."""
        with self._lock:
            times = [e.at for e in self.events]
            assert times == sorted(times), "events out of order"
            if self._groups is not None:
                named = [n for g in self._groups for n in g]
                assert len(named) == len(set(named)) and set(named) <= set(self.cluster.nodes)

    # --- reports ------------------------------------------------------------------------------

    def faults_injected(self) -> int:
        return sum(1 for e in self.events if e.fault in ("partition", "kill", "pause", "delay"))

    def unshown(self) -> list[FaultEvent]:
        """Faults whose evidence failed: a run with any of these proved less than it claims."""
        return [e for e in self.events if e.shown is False]

    def save(self, path: str | Path) -> str:
        with open(path, "w", encoding="utf-8") as f:
            for event in self.events:
                f.write(event.to_json() + "\n")
        return str(path)

    def _record(self, fault: str, targets: tuple[str, ...], evidence: dict[str, Any], shown: bool | None = None) -> FaultEvent:
        event = FaultEvent(round(self.clock(), 3), fault, targets, evidence, shown)
        with self._lock:
            self.events.append(event)
        return event


__all__ = [
    "FAULT_KINDS", "NETWORKS", "FaultEvent", "FaultNotShown", "NamespaceError", "NamespaceNetwork", "NamespacedCluster",
    "Nemesis", "PlannedFault", "ProxiedCluster", "create_cluster", "namespaces_available", "plan",
]
