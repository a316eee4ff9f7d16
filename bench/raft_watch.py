"""`python -m bench.raft_watch`: watchers on a prefix while puts go in.

Three cp nodes in this process (memory engine, sync=never, no HTTP: the service layer
only), `--watchers` watches spread over the nodes on one prefix, a writer doing `--puts`
puts at up to `--rate` per second from `--writers` concurrent tasks. Prints JSON: events
delivered per second (all watchers together) and the delay from a put's acknowledgement to
its event at each watcher (p50/p99; negative when the event arrived before the ack).

    python -m bench.raft_watch --watchers 100 --puts 1000 --rate 1000

Measured, never asserted: the machine is shared (see DESIGN.md "Figures").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from bench._inproc import Cluster, make_configs


async def run(watchers: int, puts: int, rate: float, writers: int) -> dict:
    with tempfile.TemporaryDirectory() as base:
        cluster = Cluster(make_configs(base, 3, sync="never"))
        await cluster.start()
        try:
            await cluster.wait_leader()
            nodes = cluster.running()
            acked: dict[int, float] = {}
            delays: list[float] = []
            delivered = [0]
            iterators = [nodes[i % len(nodes)].watch(b"bench/", b"bench0", progress_interval=60) for i in range(watchers)]

            finished: list[float] = []

            async def consume(iterator):
                mine = 0
                async for batch in iterator:
                    now = time.perf_counter()
                    for event in batch.events:
                        mine += 1
                        ack = acked.get(event.kv.mod_revision)
                        if ack is not None:
                            delays.append(now - ack)
                    if mine >= puts or batch.canceled:
                        break
                delivered[0] += mine
                finished.append(time.perf_counter())

            consumers = [asyncio.ensure_future(consume(it)) for it in iterators]
            await asyncio.sleep(0.5)
            started = time.perf_counter()
            counter = iter(range(puts))

            async def write(service):
                for i in counter:
                    due = started + i / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    result = await service.put(b"bench/%06d" % i, b"x" * 100)
                    acked[result.revision] = time.perf_counter()

            leader = cluster.services[await cluster.wait_leader()]
            await asyncio.gather(*(write(leader) for _ in range(writers)))
            written = time.perf_counter()
            await asyncio.wait(consumers, timeout=60)
            elapsed = (max(finished) if finished else time.perf_counter()) - started
            canceled = sum(1 for c in consumers if not c.done())
            for c in consumers:
                c.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            delays.sort()

            def pct(p):
                return round(delays[min(len(delays) - 1, int(p * len(delays)))] * 1000, 2) if delays else None

            return {
                "watchers": watchers,
                "puts": puts,
                "target_rate": rate,
                "put_rate": round(puts / (written - started), 1),
                "events_delivered": delivered[0],
                "events_per_s": round(delivered[0] / elapsed, 1),
                "delay_ms_p50": pct(0.5),
                "delay_ms_p99": pct(0.99),
                "hub_wakeups": sum(n._hub.wakeups for n in nodes),
                "watchers_unfinished": canceled,
                "watchers_canceled_slow": sum(n._hub.canceled_slow for n in nodes),
            }
        finally:
            await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--puts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--writers", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.watchers, args.puts, args.rate, args.writers)), indent=2))


if __name__ == "__main__":
    main()
