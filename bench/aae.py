"""Anti-entropy cost: `python -m bench.aae [--keys 1000000] [--divergence 0.01] [--depths 3,4,5]`.

Prints JSON. Two in-process replicas (dynamo `Replica` over memory engines) hold `--keys`
keys; replica "b" is behind on `--divergence` of them (half missing, half holding an older
version). For each tree depth (16-way, so depth 3 = 4096 segments, 5 = 1M as Riak), it
measures:

* `rebuild_s`: building b's tree from its engine (what a restart costs);
* `aae`: the level-by-level Merkle exchange plus repair, through the real peer handlers
  (`AntiEntropy.exchange`), with every message JSON-encoded as on the wire: wall time,
  messages, bytes both ways, hashes compared, keys repaired; afterwards both trees agree;
* `full_comparison`: the naive way on fresh copies: b sends every key with its version
  hash (pages of 1000), a compares them all and repairs the same keys the same way.

Numbers are measured, never asserted; the run is deterministic in what it compares, not
in its timings.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time

from dynamo import versions
from dynamo.antientropy import AntiEntropy, AntiEntropyOptions, TreeSet
from dynamo.merkle import diff_entries, entry_hash, version_digest
from dynamo.node import Replica, data_key
from dynamo.ring import Ring
from dynamo.transport import b64, unb64
from dynamo.vclock import VClock
from dynamo.versions import Dot, Sibling, VersionedObject
from engines.memory import MemoryEngine

ACTOR = "a.0000000000000001"


def _object(counter: int, value: bytes) -> bytes:
    obj = VersionedObject(VClock({ACTOR: (counter, 1.7e9)}), (Sibling(Dot(ACTOR, counter), value, 1.7e9),))
    return versions.encode_object(obj)


def load(keys: int, divergence: float, seed: int):
    """Two engines: a holds every key at version 2; b misses or lags on `divergence` of them."""
    rng = random.Random(seed)
    a, b = MemoryEngine(), MemoryEngine()
    behind = set(rng.sample(range(keys), int(keys * divergence)))
    batch_a, batch_b = [], []
    for i in range(keys):
        key = b"key-%08d" % i
        batch_a.append(("put", data_key(key), _object(2, b"value-%d" % i)))
        if i in behind:
            if i % 2:
                batch_b.append(("put", data_key(key), _object(1, b"old-%d" % i)))
        else:
            batch_b.append(("put", data_key(key), _object(2, b"value-%d" % i)))
        if len(batch_a) >= 50_000:
            a.write(batch_a)
            batch_a = []
        if len(batch_b) >= 50_000:
            b.write(batch_b)
            batch_b = []
    a.write(batch_a)
    b.write(batch_b)
    return a, b, len(behind)


class Wire:
    """Counts what a JSON peer message costs, both ways."""

    def __init__(self) -> None:
        self.messages = self.bytes_out = self.bytes_in = 0

    def account(self, payload: dict, reply: dict) -> dict:
        out, back = json.dumps(payload, separators=(",", ":")), json.dumps(reply, separators=(",", ":"))
        self.messages += 1
        self.bytes_out += len(out)
        self.bytes_in += len(back)
        return json.loads(back)


def _node(name: str, engine, depth: int, ring: Ring, wire: Wire, peers: dict):
    replica = Replica(name, engine, rng=random.Random(1))
    trees = TreeSet(name, 2, depth=depth)
    started = time.perf_counter()
    trees.rebuild(ring, replica.items())
    rebuild_s = time.perf_counter() - started
    replica.on_change = trees.update
    options = AntiEntropyOptions(repair_rate_per_s=1e12, repair_batch=1000, max_keys_per_exchange=10**8,
                                 max_segments_per_request=4096, depth=depth)

    async def call(node, method, payload, deadline):
        reply = await peers[node].handle(method, json.loads(json.dumps(payload)))
        return wire.account(payload, reply)

    aae = AntiEntropy(name, replica=replica, trees=trees, call=call, is_alive=lambda _: True,
                      wall_clock=lambda: 1.7e9, rng=random.Random(2), options=options, metrics={})
    return replica, trees, aae, rebuild_s


async def run_aae(keys: int, divergence: float, depth: int, seed: int) -> dict:
    a_engine, b_engine, behind = load(keys, divergence, seed)
    ring = Ring(["a", "b"], 16)
    wire = Wire()
    peers: dict = {}
    _, a_trees, a_aae, _ = _node("a", a_engine, depth, ring, wire, peers)
    b_replica, b_trees, b_aae, rebuild_s = _node("b", b_engine, depth, ring, wire, peers)
    peers.update(a=a_aae, b=b_aae)
    (tid,) = a_trees.trees
    started = time.perf_counter()
    repaired = await a_aae.exchange(tid, "b")
    took = time.perf_counter() - started
    same = a_trees.trees[tid].root == b_trees.trees[tid].root
    return {
        "depth": depth,
        "segments": 16**depth,
        "rebuild_s": round(rebuild_s, 2),
        "keys_behind": behind,
        "aae": {"seconds": round(took, 3), "messages": wire.messages, "bytes_sent": wire.bytes_out,
                "bytes_received": wire.bytes_in, "bytes_total": wire.bytes_out + wire.bytes_in,
                "segments_differing": a_aae.metrics.get("aae_segments_differing", 0),
                "keys_repaired": repaired, "trees_agree_after": same},
    }


async def run_full(keys: int, divergence: float, seed: int) -> dict:
    """Key-by-key: b pages every (key, version hash) to a; a diffs and repairs."""
    a_engine, b_engine, behind = load(keys, divergence, seed)
    wire = Wire()
    a = Replica("a", a_engine, rng=random.Random(1))
    b = Replica("b", b_engine, rng=random.Random(1))
    started = time.perf_counter()
    remote: dict[bytes, int] = {}
    listing = [[b64(key), entry_hash(key, version_digest(obj))] for key, obj in b.items()]
    for start in range(0, len(listing), 1000):  # as paged peer calls of 1000 keys
        chunk = listing[start : start + 1000]
        reply = wire.account({"start_after": chunk[0][0]}, {"entries": chunk})
        remote.update((unb64(k), int(h)) for k, h in reply["entries"])
    local = {key: entry_hash(key, version_digest(obj)) for key, obj in a.items()}
    differing = diff_entries(local, remote)
    repaired = 0
    for start in range(0, len(differing), 1000):
        chunk = differing[start : start + 1000]
        objects = {k: b.fetch(k) for k in chunk}
        wire.account({"keys": [b64(k) for k in chunk]},
                     {"objects": [None if o is None else b64(versions.encode_object(o)) for o in objects.values()]})
        send = []
        for key in chunk:
            merged = versions.merge(a.fetch(key), objects[key])
            if not merged.same_as(objects[key]):
                send.append([b64(key), b64(versions.encode_object(merged))])
                await b.store(key, merged, hint_for=None, now=1.7e9)
            repaired += 1
        wire.account({"items": send}, {"ok": True})
    took = time.perf_counter() - started
    return {"seconds": round(took, 3), "messages": wire.messages, "bytes_sent": wire.bytes_out,
            "bytes_received": wire.bytes_in, "bytes_total": wire.bytes_out + wire.bytes_in,
            "keys_compared": len(set(local) | set(remote)), "keys_repaired": repaired, "keys_behind": behind}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--divergence", type=float, default=0.01)
    parser.add_argument("--depths", default="3,4,5", help="16-way tree depths to try (3: 4096 segments)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args(argv)
    out = {"bench": "aae", "keys": args.keys, "divergence": args.divergence, "runs": []}
    for depth in (int(d) for d in args.depths.split(",")):
        out["runs"].append(asyncio.run(run_aae(args.keys, args.divergence, depth, args.seed)))
    if not args.skip_full:
        out["full_comparison"] = asyncio.run(run_full(args.keys, args.divergence, args.seed))
    out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
