"""Watch fan-out: W watchers on one prefix while a writer puts at a fixed rate.

    python -m bench.watch                            # capkv cp local cluster, 100 watchers, 1000 puts/s, 10 s
    python -m bench.watch --systems capkv,etcd       # and a local 3-member etcd 3.4 (its /v3/watch gateway)
    python -m bench.watch --endpoints http://127.0.0.1:2379 --single-node
    python -m bench.watch --service-factory tests.api.fakes:create_cp_extras_service --single-node

The writer is open loop: it starts a put every 1/rate seconds (at most `--in-flight`
outstanding, so an overloaded server slows it rather than growing a backlog) on keys
`<prefix><n>`, and notes when each put was acknowledged. Every watcher streams the prefix
(`GET /v1/watch?prefix=` for capkv, `POST /v3/watch` for etcd) and, for each event, the
delay from that put's acknowledgement to the event's arrival (negative when the event came
first). Watchers spread over the nodes round-robin (`--single-node`: all on the first).
One JSON line per system:

    {"system": "capkv", "watchers": 100, "puts_per_s": 998.1, "events_per_s": 99810.0,
     "delay_p50_ms": 3.1, "delay_p99_ms": 21.0, "missed": 0, "duplicated": 0, ...}

`missed` counts (watcher, put) pairs whose event never came within the drain time after
the last put; `duplicated` events that came twice. Measured, never asserted; the load
generator shares the machine's cores with the servers, so read it beside the etcd line.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sys
import tempfile
import time

import aiohttp

from bench.cluster import free_ports, percentile, start_etcd, stop_procs, write_cluster_file

# Delays kept for the percentiles; beyond it, a uniform sample (bounded memory).
MAX_DELAY_SAMPLES = 2_000_000


class Stats:
    def __init__(self, watchers: int):
        self.acked: dict[int, float] = {}  # put number -> when acknowledged
        self.sent = 0
        self.errors = 0
        self.seen: list[set[int]] = [set() for _ in range(watchers)]
        self.duplicated = 0
        self.delays: list[float] = []
        self.pending: list[tuple[int, float]] = []  # (put number, arrival) seen before its ack
        self.events = 0
        self.reconnects = 0  # streams the server ended (watcher too slow), resumed from last + 1

    def event(self, watcher: int, number: int, arrived: float) -> None:
        self.events += 1
        if number in self.seen[watcher]:
            self.duplicated += 1
            return
        self.seen[watcher].add(number)
        acked = self.acked.get(number)
        if acked is None:
            self.pending.append((number, arrived))
        elif len(self.delays) < MAX_DELAY_SAMPLES:
            self.delays.append(arrived - acked)

    def settle(self) -> None:
        for number, arrived in self.pending:
            if number in self.acked:
                self.delays.append(arrived - self.acked[number])
        self.pending.clear()


def number_of(key: bytes, prefix: bytes) -> int | None:
    tail = key[len(prefix):]
    return int(tail) if tail.isdigit() else None


async def capkv_watcher(session, url: str, prefix: str, index: int, stats: Stats, ready: asyncio.Event, stop: asyncio.Event):
    """Streams the prefix; when the server ends the stream (this watcher fell too far
    behind, a node stopping) it resumes from the last revision seen + 1, as api.client
    does, and counts the reconnect."""
    raw_prefix = prefix.encode()
    start_revision = None
    while not stop.is_set():
        params = {"prefix": prefix}
        if start_revision is not None:
            params["start_revision"] = str(start_revision)
        async with session.get(f"{url}/v1/watch", params=params, timeout=aiohttp.ClientTimeout(total=None)) as r:
            if r.status != 200:
                raise RuntimeError(f"watch on {url}: HTTP {r.status} {await r.text()}")
            ready.set()
            while not stop.is_set():
                line = await r.content.readline()
                if not line:
                    break
                event = json.loads(line)
                kind = event.get("type")
                if kind in ("put", "delete"):
                    start_revision = event["mod_revision"] + 1
                    number = number_of(event["key"].encode(), raw_prefix)
                    if number is not None:
                        stats.event(index, number, time.perf_counter())
                elif kind == "progress" and start_revision is None:
                    start_revision = event["revision"] + 1
                elif kind == "canceled":
                    break
        stats.reconnects += 1


async def etcd_watcher(session, url: str, prefix: str, index: int, stats: Stats, ready: asyncio.Event, stop: asyncio.Event):
    raw_prefix = prefix.encode()
    end = raw_prefix[:-1] + bytes([raw_prefix[-1] + 1])
    body = {"create_request": {"key": base64.b64encode(raw_prefix).decode(), "range_end": base64.b64encode(end).decode()}}
    async with session.post(f"{url}/v3/watch", json=body, timeout=aiohttp.ClientTimeout(total=None)) as r:
        if r.status != 200:
            raise RuntimeError(f"watch on {url}: HTTP {r.status} {await r.text()}")
        ready.set()
        while not stop.is_set():
            line = await r.content.readline()
            if not line:
                return
            result = json.loads(line).get("result", {})
            for event in result.get("events", []):
                number = number_of(base64.b64decode(event["kv"]["key"]), raw_prefix)
                if number is not None:
                    stats.event(index, number, time.perf_counter())


async def capkv_put(session, url: str, key: str, value: bytes) -> bool:
    async with session.put(f"{url}/v1/kv/{key}", data=value) as r:
        await r.read()
        return r.status == 200


async def etcd_put(session, url: str, key: str, value: bytes) -> bool:
    body = {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}
    async with session.post(f"{url}/v3/kv/put", json=body) as r:
        await r.read()
        return r.status == 200


async def run(system: str, urls: list[str], args) -> dict:
    prefix = f"bench-watch/{int(time.time() * 1000)}/"
    stats = Stats(args.watchers)
    stop = asyncio.Event()
    watcher = capkv_watcher if system.startswith("capkv") else etcd_watcher
    put = capkv_put if system.startswith("capkv") else etcd_put
    watch_urls = urls[:1] if args.single_node else urls
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        readies = [asyncio.Event() for _ in range(args.watchers)]
        tasks = [asyncio.create_task(watcher(session, watch_urls[i % len(watch_urls)], prefix, i, stats, readies[i], stop))
                 for i in range(args.watchers)]  # fmt: skip
        deadline = time.perf_counter() + 60
        while not all(r.is_set() for r in readies):
            failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
            if failed is not None or time.perf_counter() > deadline:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise RuntimeError(str(failed.exception()) if failed is not None else "the watches did not open within 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)

        in_flight = asyncio.Semaphore(args.in_flight)
        value = b"v" * args.value_bytes
        writes: set[asyncio.Task] = set()

        async def one(number: int) -> None:
            try:
                url = urls[0] if args.single_node else urls[number % len(urls)]
                if await put(session, url, f"{prefix}{number}", value):
                    stats.acked[number] = time.perf_counter()
                else:
                    stats.errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                stats.errors += 1
            finally:
                in_flight.release()

        started = time.perf_counter()
        interval = 1.0 / args.rate
        number = 0
        while time.perf_counter() - started < args.seconds:
            due = started + number * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await in_flight.acquire()
            task = asyncio.create_task(one(number))
            writes.add(task)
            task.add_done_callback(writes.discard)
            number += 1
        if writes:
            await asyncio.gather(*writes)
        write_seconds = time.perf_counter() - started
        # drain: wait until every watcher saw every acknowledged put, or the drain time ends
        deadline = time.perf_counter() + args.drain
        while time.perf_counter() < deadline:
            if all(len(seen) >= len(stats.acked) for seen in stats.seen):
                break
            await asyncio.sleep(0.05)
        total_seconds = time.perf_counter() - started
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stats.settle()
    delays = sorted(stats.delays)
    acked = set(stats.acked)
    missed = sum(len(acked - seen) for seen in stats.seen)
    return {
        "system": system,
        "watchers": args.watchers,
        "nodes_watched": len(watch_urls),
        "target_puts_per_s": args.rate,
        "puts_acked": len(acked),
        "put_errors": stats.errors,
        "puts_per_s": round(len(acked) / write_seconds, 1),
        "events_delivered": stats.events,
        "events_per_s": round(stats.events / total_seconds, 1),
        "delay_p50_ms": round(percentile(delays, 0.50) * 1000, 2),
        "delay_p99_ms": round(percentile(delays, 0.99) * 1000, 2),
        "delay_max_ms": round(delays[-1] * 1000, 2) if delays else None,
        "missed": missed,
        "duplicated": stats.duplicated,
        "reconnects": stats.reconnects,
        "seconds": args.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="puts per second the writer aims at")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for late events after the last put")
    parser.add_argument("--in-flight", type=int, default=64, help="most puts outstanding at once")
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--systems", default="capkv", help="comma-separated: capkv, etcd")
    parser.add_argument("--endpoints", default=None, help="a running capkv cluster's client URLs (comma-separated)")
    parser.add_argument("--single-node", action="store_true", help="every watcher and put on the first node")
    parser.add_argument("--engine", default="memory")
    parser.add_argument("--sync", default="never")
    parser.add_argument("--service-factory", default=None, help=argparse.SUPPRESS)  # benchmarking the HTTP layer on a fake
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    workdir = tempfile.mkdtemp(prefix="capkv-bench-watch-")
    try:
        for system in systems:
            if system == "capkv":
                if args.endpoints:
                    urls = [u.strip().rstrip("/") for u in args.endpoints.split(",")]
                    result = asyncio.run(run("capkv", urls, args))
                else:
                    from clusters.launcher import LocalCluster

                    cluster_file = os.path.join(workdir, "cluster.toml")
                    write_cluster_file(cluster_file, free_ports(6))
                    extra = ("--service-factory", args.service_factory) if args.service_factory else ()
                    cluster = LocalCluster(cluster_file, mode="cp", data_dir=os.path.join(workdir, "capkv"),
                                           engine=args.engine, sync=args.sync, extra_args=extra,
                                           log_dir=os.path.join(workdir, "logs"))  # fmt: skip
                    cluster.start(timeout=60)
                    try:
                        result = asyncio.run(run("capkv" if not args.service_factory else "capkv-http-over-fake",
                                                 cluster.urls, args))  # fmt: skip
                    finally:
                        cluster.stop()
            elif system == "etcd":
                if not shutil.which("etcd"):
                    print(json.dumps({"system": "etcd", "error": "etcd not installed (apt-get install etcd-server)"}))
                    continue
                procs, urls = start_etcd(os.path.join(workdir))
                try:
                    result = asyncio.run(run("etcd", urls, args))
                finally:
                    stop_procs(procs)
            else:
                parser.error(f"unknown system {system!r}")
            print(json.dumps(result), flush=True)
    except RuntimeError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
