"""Write latency and throughput of the cp service, in-process (no HTTP). Prints JSON.

    python -m bench.raft --sync always --layout processes
    python -m bench.raft --sync never --layout threads --writers 64

`--layout threads` runs all three nodes in this process (they share one GIL);
`--layout processes` runs the measured node here and the two others as subprocesses, as a
real deployment would. The client talks to the node here, which is made the leader when
`--via leader` (by restarting elections until it wins) or left as is otherwise.
Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from api.service import Member, NodeConfig

from consensus.raft_node import RaftOptions
from consensus.service import create_service
from clusters.spec import free_ports as _free_ports

# To steer which node wins the first election: the node here campaigns first (leader) or
# last (follower); elections only, the rest of the tuning stays the default.
_EAGER = RaftOptions(election_timeout_min_s=0.2, election_timeout_max_s=0.25, heartbeat_s=0.05)
_RELUCTANT = RaftOptions(election_timeout_min_s=2.0, election_timeout_max_s=2.5)


def _configs(base: str, sync: str, engine: str) -> list[NodeConfig]:
    ports = _free_ports(6)
    members = tuple(Member(f"n{i + 1}", f"http://127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}") for i in range(3))
    return [
        NodeConfig(node_id=m.id, members=members, secret="bench", data_dir=os.path.join(base, m.id), engine=engine, sync=sync)
        for m in members
    ]


def _config_to_json(config: NodeConfig) -> str:
    d = dataclasses.asdict(config)
    return json.dumps(d)


def _config_from_json(text: str) -> NodeConfig:
    d = json.loads(text)
    d["members"] = tuple(Member(**m) for m in d["members"])
    d["peer_routes"] = tuple(tuple(r) for r in d["peer_routes"])
    return NodeConfig(**d)


async def _serve(config: NodeConfig) -> None:
    service = create_service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await service.stop()


_WARM_UP = 50  # puts before the measured ones


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def _measure(service, *, sequential: int, writers: int, per_writer: int, value: bytes) -> dict:
    # warm up
    for i in range(_WARM_UP):
        await service.put(b"warm/%d" % i, value)
    latencies = []
    started = time.perf_counter()
    for i in range(sequential):
        t = time.perf_counter()
        await service.put(b"seq/%d" % (i % 1000), value)
        latencies.append((time.perf_counter() - t) * 1000)
    seq_seconds = time.perf_counter() - started
    concurrent_latencies: list[float] = []

    async def writer(w: int) -> None:
        for i in range(per_writer):
            t = time.perf_counter()
            await service.put(b"c/%d/%d" % (w, i % 100), value)
            concurrent_latencies.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    seconds = time.perf_counter() - started
    return {
        "sequential": {
            "ops": sequential,
            "ops_per_s": round(sequential / seq_seconds, 1),
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(_percentile(latencies, 99), 3),
        },
        "concurrent": {
            "writers": writers,
            "ops": writers * per_writer,
            "ops_per_s": round(writers * per_writer / seconds, 1),
            "p50_ms": round(statistics.median(concurrent_latencies), 3),
            "p99_ms": round(_percentile(concurrent_latencies, 99), 3),
        },
    }


async def _run(args) -> dict:
    base = tempfile.mkdtemp(prefix="capkv-cp-bench-")
    configs = _configs(base, args.sync, args.engine)
    here = configs[0]
    children = []
    services = []
    try:
        if args.layout == "processes":
            for config in configs[1:]:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bench.raft", "--serve", _config_to_json(config)],
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    )
                )
            options = {"leader": _EAGER, "follower": _RELUCTANT}.get(args.via)
            service = create_service(here, raft_options=options)
            await service.start()
            services.append(service)
        else:
            for config in configs:
                s = create_service(config)
                await s.start()
                services.append(s)
            service = services[0]
        deadline = time.monotonic() + 20
        while (await service.status())["leader"] is None or not service.health()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("no leader")
            await asyncio.sleep(0.05)
        status = await service.status()
        if args.layout == "threads" and args.via in ("leader", "follower"):
            service = next(s for s in services if (s.node_id == status["leader"]) == (args.via == "leader"))
            status = await service.status()
        cpu_started = time.process_time()
        result = await _measure(
            service, sequential=args.sequential, writers=args.writers, per_writer=args.per_writer, value=b"x" * args.value_bytes
        )
        # CPU of this process (the measured node and the load generator) per write.
        cpu_here = time.process_time() - cpu_started
        metrics = service.metrics()
        return {
            "benchmark": "cp_service_put",
            "layout": args.layout,
            "sync": args.sync,
            "engine": args.engine,
            "value_bytes": args.value_bytes,
            "client_node_role": "leader" if status["leader"] == service.node_id else "follower",
            **result,
            "journal_syncs": metrics.get("raft_journal_syncs", 0),
            "journal_sync_seconds": round(metrics.get("raft_journal_sync_seconds", 0), 3),
            "append_entries_trimmed": metrics.get("raft_append_entries_trimmed", 0),
            "append_entries_coalesced": metrics.get("raft_append_entries_coalesced", 0),
            "cpu_us_per_op_here": round(cpu_here / (_WARM_UP + args.sequential + args.writers * args.per_writer) * 1e6, 1),
            "truncation_warnings": metrics.get("raft_truncated_applied_entries_warnings", 0),
        }
    finally:
        for s in services:
            await s.stop()
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="always", choices=["always", "batch", "never"])
    parser.add_argument("--engine", default="memory")
    parser.add_argument("--layout", default="processes", choices=["processes", "threads"])
    parser.add_argument("--via", default="any", choices=["any", "leader", "follower"])
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--per-writer", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(_config_from_json(args.serve)))
        return
    print(json.dumps(asyncio.run(_run(args)), indent=2))


if __name__ == "__main__":
    main()
