"""Closed-loop HTTP load against a local capkv cluster and, side by side, a local etcd 3.4.

    python -m bench.cluster --mode cp            # capkv cp local-3 vs 3-member etcd
    python -m bench.cluster --mode ap --seconds 5
    python -m bench.cluster --mode cp --systems capkv  # capkv alone

Each workload runs `clients` coroutines for `seconds`; every coroutine sends one request,
waits for its answer, and sends the next (closed loop), to the nodes round-robin by client.
Keys are drawn uniformly from `keys` keys; values are `value_bytes` random bytes. Gets run
after a fill that wrote every key once, so they hit. One JSON line per (system, workload,
clients), then one line of capkv/etcd ratios per workload. Speed is measured here, never
asserted in a test.

Both systems run on this machine's cores together with the load generator, so only the
ratio from one run means much. etcd comes from Debian's `etcd-server` package (3.4); it
fsyncs every commit, so compare it with capkv's `--sync always` (the default).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp

from clusters.spec import free_ports


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


@dataclass
class Result:
    system: str
    workload: str
    clients: int
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    cpu_seconds: float | None = None  # utime + stime of the system's processes, if known

    def as_json(self) -> dict:
        lat = sorted(self.latencies_ms)
        line = {
            "system": self.system,
            "workload": self.workload,
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "ops": self.ok,
            "errors": self.errors,
            "ops_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(lat, 0.50), 2),
            "p99_ms": round(percentile(lat, 0.99), 2),
        }
        if self.cpu_seconds is not None and self.ok:
            # CPU spent by all the system's processes per successful op: unlike ops/s it
            # hardly changes when other work shares the machine.
            line["cpu_us_per_op"] = round(self.cpu_seconds / self.ok * 1e6, 1)
        return line


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU seconds (user + system) of `pids` and all their descendants, from /proc (Linux),
    or None when unreadable.

    A capkv node's lsm engine flushes and compacts in worker processes of its own: their
    CPU is the node's too. A descendant alive at both readings is counted by its own
    utime + stime; one that exited and was reaped meanwhile by its parent's cutime + cstime.
    """
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, list[str]] = {}
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    pass  # exited while we looked
        children: dict[int, list[int]] = {}
        for pid, fields in stats.items():
            children.setdefault(int(fields[1]), []).append(pid)  # ppid (field 4)
        total = 0
        todo = [pid for pid in pids if pid in stats]
        if len(todo) != len(pids):
            return None
        while todo:
            pid = todo.pop()
            fields = stats[pid]
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)
            todo.extend(children.get(pid, ()))
    except (OSError, IndexError, ValueError):
        return None
    return total / ticks


# --- the two systems' request shapes --------------------------------------------------------


class CapkvTarget:
    name = "capkv"

    def __init__(self, urls: list[str], mode: str, pids: list[int] | None = None):
        self.urls = urls
        self.mode = mode
        self.pids = pids or []

    def put(self, session, node: int, key: str, value: bytes):
        return session.put(f"{self.urls[node]}/v1/kv/{key}", data=value)

    def get(self, session, node: int, key: str, serializable: bool):
        params = {"consistency": "serializable"} if serializable and self.mode == "cp" else None
        return session.get(f"{self.urls[node]}/v1/kv/{key}", params=params)


class EtcdTarget:
    name = "etcd"

    def __init__(self, urls: list[str], pids: list[int] | None = None):
        self.urls = urls
        self.pids = pids or []

    @staticmethod
    def _b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def put(self, session, node: int, key: str, value: bytes):
        body = {"key": self._b64(key.encode()), "value": self._b64(value)}
        return session.post(f"{self.urls[node]}/v3/kv/put", json=body)

    def get(self, session, node: int, key: str, serializable: bool):
        body = {"key": self._b64(key.encode())}
        if serializable:
            body["serializable"] = True
        return session.post(f"{self.urls[node]}/v3/kv/range", json=body)


async def run_load(target, workload: str, clients: int, seconds: float, keys: int, value_bytes: int) -> Result:
    result = Result(target.name, workload, clients, seconds)
    rng = random.Random(7)
    value = rng.randbytes(value_bytes)
    nodes = len(target.urls)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def client(index: int) -> None:
            local = random.Random(index)
            node = index % nodes
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    return
                key = f"bench/{local.randrange(keys):06d}"
                if workload == "put":
                    request = target.put(session, node, key, value)
                else:
                    request = target.get(session, node, key, workload == "get-serializable")
                try:
                    async with request as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if ok:
                    result.ok += 1
                    result.latencies_ms.append((time.perf_counter() - now) * 1000)
                else:
                    result.errors += 1

        cpu_before = cpu_seconds(target.pids) if target.pids else None
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        result.seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(target.pids) if target.pids else None
        if cpu_before is not None and cpu_after is not None:
            result.cpu_seconds = cpu_after - cpu_before
    return result


async def fill(target, keys: int, value_bytes: int, clients: int = 32) -> None:
    """Write every key once so that later gets hit."""
    value = random.Random(1).randbytes(value_bytes)
    queue = list(range(keys))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker(index: int) -> None:
            while queue:
                key = f"bench/{queue.pop():06d}"
                for _attempt in range(5):
                    try:
                        async with target.put(session, index % len(target.urls), key, value) as response:
                            await response.read()
                            if response.status == 200:
                                break
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        await asyncio.sleep(0.1)

        await asyncio.gather(*(worker(i) for i in range(clients)))


WORKLOADS = ("put", "get-linearizable", "get-serializable")


async def run_all(target, args) -> list[dict]:
    lines = []
    await fill(target, args.keys, args.value_bytes)
    for clients in args.clients:
        for workload in args.workloads:
            if workload == "get-serializable" and isinstance(target, CapkvTarget) and target.mode == "ap":
                continue  # ap reads have R, not consistency levels
            result = await run_load(target, workload, clients, args.seconds, args.keys, args.value_bytes)
            line = result.as_json()
            if isinstance(target, CapkvTarget) and target.mode == "ap" and workload == "get-linearizable":
                # An ap read waits for R replies; it is compared with etcd's linearizable get.
                line["workload"] = "get-quorum"
                line["compare_with"] = workload
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


# --- starting the systems ---------------------------------------------------------------------


def write_cluster_file(path: str, ports: list[int]) -> None:
    with open(path, "w") as f:
        f.write('[cluster]\nname = "bench"\n')
        for i in range(3):
            f.write(
                f'\n[[nodes]]\nid = "n{i + 1}"\nclient_url = "http://127.0.0.1:{ports[2 * i]}"\n'
                f'peer_address = "127.0.0.1:{ports[2 * i + 1]}"\n'
            )


def start_etcd(workdir: str) -> tuple[list[subprocess.Popen], list[str]]:
    ports = free_ports(6)
    names = ["e1", "e2", "e3"]
    initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
    procs, urls = [], []
    for i, name in enumerate(names):
        client, peer = ports[2 * i], ports[2 * i + 1]
        cmd = [
            shutil.which("etcd"),
            "--name", name,
            "--data-dir", os.path.join(workdir, name),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "capkv-bench",
        ]
        log = open(os.path.join(workdir, f"{name}.log"), "wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{client}")
    deadline = time.time() + 30
    import urllib.request

    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urls[0] + "/health", timeout=1) as response:
                if json.loads(response.read()).get("health") == "true":
                    return procs, urls
        except OSError:
            pass
        time.sleep(0.3)
    stop_procs(procs)
    raise RuntimeError(f"etcd did not become healthy; logs in {workdir}")


def stop_procs(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cp", "ap"), default="cp")
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 1], help="concurrent clients per run")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--engine", default="lsm")
    parser.add_argument("--sync", default="always")
    parser.add_argument("--systems", default="capkv,etcd", help="comma-separated: capkv, etcd")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or not set(args.workloads) <= set(WORKLOADS):
        parser.error(f"--workloads takes a subset of {', '.join(WORKLOADS)}, not {','.join(args.workloads)!r}")

    systems = {name.strip() for name in args.systems.split(",") if name.strip()}
    if not systems <= {"capkv", "etcd"}:
        parser.error(f"--systems takes capkv and/or etcd, not {args.systems!r}")
    if "etcd" in systems and not shutil.which("etcd"):
        print(json.dumps({"note": "etcd not installed (apt-get install etcd-server): capkv measured alone"}))
        systems.discard("etcd")

    workdir = tempfile.mkdtemp(prefix="capkv-bench-")
    results: dict[str, list[dict]] = {}
    try:
        if "capkv" in systems:
            from clusters.launcher import LocalCluster

            cluster_file = os.path.join(workdir, "cluster.toml")
            write_cluster_file(cluster_file, free_ports(6))
            cluster = LocalCluster(
                cluster_file,
                mode=args.mode,
                data_dir=os.path.join(workdir, "capkv"),
                engine=args.engine,
                sync=args.sync,
                log_dir=os.path.join(workdir, "logs"),
            )
            cluster.start(timeout=60)
            try:
                pids = [n.pid for n in cluster.nodes.values() if n.pid is not None]
                results["capkv"] = asyncio.run(run_all(CapkvTarget(cluster.urls, args.mode, pids), args))
            finally:
                cluster.stop()
        if "etcd" in systems:
            procs, urls = start_etcd(workdir)
            try:
                results["etcd"] = asyncio.run(run_all(EtcdTarget(urls, [p.pid for p in procs]), args))
            finally:
                stop_procs(procs)
        if "capkv" not in results or "etcd" not in results:
            return 0
        etcd_by = {(r["workload"], r["clients"]): r for r in results["etcd"]}
        for mine in results["capkv"]:
            theirs = etcd_by.get((mine.get("compare_with", mine["workload"]), mine["clients"]))
            if not theirs or not theirs["ops_per_s"]:
                continue
            print(json.dumps({
                "ratio": f"capkv-{args.mode}/etcd",
                "workload": mine["workload"],
                "clients": mine["clients"],
                "ops_per_s": round(mine["ops_per_s"] / theirs["ops_per_s"], 2),
                "p99": round(mine["p99_ms"] / theirs["p99_ms"], 2) if theirs["p99_ms"] else None,
            }), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
