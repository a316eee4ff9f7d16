"""Ring balance and churn: `python -m bench.ring [--vnodes 150] [--keys 50000] [--n 3]`.

Prints JSON. For each cluster size S in 3, 5, 10, 30, 100:

* `ownership_max_over_mean`: the largest node's share of the ring as first replica,
  divided by the mean share 1/S (1.0 is perfect balance; Dynamo calls a node "out of
  balance" beyond 1.15);
* `replica_ownership_max_over_mean`: the same for the share of keys a node holds as any
  of the N replicas;
* `join`: adding node S+1, the share of sampled keys whose first replica moves
  (`primary_moved`, ideal 1/(S+1)), whose preference list changes at all
  (`replica_set_changed`), and the share of replica copies that must move
  (`copies_moved`, ideal 1/(S+1)).

Keys are `key-<i>` for i < --keys; tokens are mmh3 of "<node>-vnode-<i>" (dynamo/ring.py),
so the numbers are the same on every run.
"""
from __future__ import annotations

import argparse
import json
import time

from dynamo.ring import Ring

SIZES = (3, 5, 10, 30, 100)


def measure(size: int, vnodes: int, keys: int, n: int) -> dict:
    before = Ring([f"n{i}" for i in range(1, size + 1)], vnodes)
    after = Ring([f"n{i}" for i in range(1, size + 2)], vnodes)
    shares = before.ownership()
    replica = before.replica_ownership(n)
    mean = 1 / size
    replica_mean = min(n, size) / size
    primary_moved = changed = copies = 0
    for i in range(keys):
        key = b"key-%d" % i
        old, new = before.preference_list(key, n), after.preference_list(key, n)
        primary_moved += old[0] != new[0]
        changed += old != new and set(old) != set(new)
        copies += len(set(new) - set(old))
    return {
        "nodes": size,
        "ownership_max_over_mean": round(max(shares.values()) / mean, 4),
        "ownership_min_over_mean": round(min(shares.values()) / mean, 4),
        "replica_ownership_max_over_mean": round(max(replica.values()) / replica_mean, 4),
        "join": {
            "to_nodes": size + 1,
            "primary_moved": round(primary_moved / keys, 4),
            "replica_set_changed": round(changed / keys, 4),
            "copies_moved": round(copies / (keys * min(n, size + 1)), 4),
            "ideal": round(1 / (size + 1), 4),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vnodes", type=int, default=150)
    parser.add_argument("--keys", type=int, default=50_000, help="keys sampled for the join movement")
    parser.add_argument("--n", type=int, default=3, help="replicas per key")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = [measure(size, args.vnodes, args.keys, args.n) for size in SIZES]
    print(json.dumps({"bench": "ring", "vnodes": args.vnodes, "n": args.n, "keys": args.keys, "results": results,
                      "seconds": round(time.perf_counter() - started, 2)}, indent=2))


if __name__ == "__main__":
    main()
