"""Active anti-entropy: replicas compare Merkle trees and repair what differs, so data
converges even when nobody reads it (Dynamo §4.7; Riak's AAE, `riak_kv_exchange_fsm`).

Each node keeps one `MerkleTree` per *replica set* it belongs to: the sorted nodes of a
preference list, e.g. "n1,n2,n4". Every key lives in exactly one replica set (its
preference list on the current ring), so two nodes compare, for each set that holds them
both, trees over exactly the same keys. `TreeSet` keeps them up to date: the replica calls
`update(key, object)` after every engine write of a key (client write, merge, handoff,
delete of an unowned copy); `rebuild()` re-reads the engine at start and after a ring change.

An exchange (this node -> one peer, one tree), all over the peer API:

    aae_roots    {trees}                 -> {roots}         # every shared tree in one message
    aae_hashes   {tree, level, indices}  -> {hashes}        # level by level, DiffWalk
    aae_segments {tree, segments}        -> {entries: [[key, entry hash], ...]}
    fetch_many   {keys}                  -> {objects: [object | null, ...]}
    store_many   {items: [[key, object], ...]} -> {ok}

Keys whose entries differ are repaired through the normal merge: fetch the peer's
objects, merge each into the local replica (`Replica.store`), send the merged object back
when the peer's copy was not already the same. Both sides end with merge(local, remote),
so an exchange is idempotent and safe to run from both ends at once.

Bounds: `max_concurrent_exchanges` exchanges at a time, at most `repair_rate_per_s` keys
repaired per second, `repair_batch` keys per message and `max_keys_per_exchange` keys per
exchange (the rest waits for the next pass), `max_segments_per_request` segments per ask.
A *full pass* is every (tree, peer) pair of this node exchanged once without a failure;
its wall-clock time is `last_full_pass`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Awaitable, Callable

from . import versions
from .merkle import DEFAULT_BRANCHING, DEFAULT_DEPTH, DiffWalk, MerkleTree, diff_entries, entry_hash, version_digest
from .ring import Ring, key_hash
from .transport import PeerUnreachable, RemoteError, b64, unb64

INTERVAL_ENV = "CAPKV_AAE_INTERVAL_S"


@dataclasses.dataclass(frozen=True)
class AntiEntropyOptions:
    enabled: bool = True
    # A pass over every (tree, peer) pair starts this often. An unchanged tree costs one
    # small message per pair (the roots match), so a short period is cheap.
    interval_s: float = 5.0
    max_concurrent_exchanges: int = 2  # Riak's anti_entropy_concurrency default
    repair_rate_per_s: float = 2000.0  # keys repaired per second, so repair cannot starve clients
    repair_batch: int = 128  # keys per fetch_many / store_many message
    max_keys_per_exchange: int = 20_000  # the rest is found again by the next exchange
    max_segments_per_request: int = 256  # segments listed per aae_segments ask
    branching: int = DEFAULT_BRANCHING
    depth: int = DEFAULT_DEPTH

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.repair_rate_per_s <= 0:
            raise ValueError("interval_s and repair_rate_per_s must be positive")
        for name in ("max_concurrent_exchanges", "repair_batch", "max_keys_per_exchange", "max_segments_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def tree_id(nodes) -> str:
    return ",".join(sorted(nodes))


class TreeSet:
    """The trees of the replica sets `node_id` belongs to, on one ring."""

    def __init__(self, node_id: str, n: int, *, branching: int = DEFAULT_BRANCHING, depth: int = DEFAULT_DEPTH):
        self.node_id, self.n = node_id, n
        self.branching, self.depth = branching, depth
        self.trees: dict[str, MerkleTree] = {}
        self.ring: Ring | None = None
        # preference list -> its tree id, for `update` (bounded by the ring's replica sets)
        self._tree_of: dict[tuple[str, ...], str] = {}
        self.rebuilds = 0
        # (tree id, peer) -> wall time at which this node's last *complete* comparison of
        # that tree with that peer started (roots equal, or an exchange that repaired every
        # differing key). Tombstone reaping needs one since the tombstone was written.
        self.synced: dict[tuple[str, str], float] = {}

    def _new_tree(self) -> MerkleTree:
        return MerkleTree(branching=self.branching, depth=self.depth)

    def rebuild(self, ring: Ring, items) -> None:
        """Start over from `items` ((key, object) pairs: the engine's content) on `ring`."""
        self.ring = ring
        self.synced = {}
        self._tree_of = {}
        self.trees = {
            tree_id(nodes): self._new_tree() for nodes in ring.replica_sets(self.n) if self.node_id in nodes
        }
        for key, obj in items:
            self.update(key, obj)
        self.rebuilds += 1

    def update(self, key: bytes, obj) -> None:
        """The key now holds `obj` locally (None: no local copy)."""
        ring = self.ring
        if ring is None:
            return
        hashed = key_hash(key)
        preference = ring.preference_of_hash(hashed, self.n)
        tid = self._tree_of.get(preference)  # (every write comes here: no sort and join each time)
        if tid is None:
            tid = self._tree_of[preference] = tree_id(preference)
        if self.node_id not in preference:
            return  # a hinted copy: its owners' trees cover it
        tree = self.trees.get(tid)
        if tree is None:
            tree = self.trees[tid] = self._new_tree()
        tree.set(key, 0 if obj is None else entry_hash(key, version_digest(obj)), hashed)

    def synced_at(self, key: bytes, peer: str) -> float | None:
        """When the last complete comparison with `peer` of the tree holding `key` started."""
        if self.ring is None:
            return None
        return self.synced.get((tree_id(self.ring.preference_list(key, self.n)), peer))

    def pairs(self) -> list[tuple[str, str]]:
        """(tree id, peer) for every tree and every other node of its replica set."""
        return [(tid, peer) for tid in sorted(self.trees) for peer in tid.split(",") if peer != self.node_id]

    @property
    def keys(self) -> int:
        return sum(t.keys for t in self.trees.values())

    def _check(self) -> None:
        for tid, tree in self.trees.items():
            assert self.node_id in tid.split(","), tid
            tree._check()


Call = Callable[[str, str, dict, float], Awaitable[dict]]


class AntiEntropy:
    """The driver: serves the aae peer calls and runs exchanges on a timer."""

    def __init__(
        self,
        node_id: str,
        *,
        replica,
        trees: TreeSet,
        call: Call,
        is_alive: Callable[[str], bool],
        wall_clock: Callable[[], float],
        rng: random.Random,
        options: AntiEntropyOptions,
        metrics: dict,
        peer_timeout_s: float = 1.0,
    ):
        self.node_id = node_id
        self.replica = replica
        self.trees = trees
        self._call = call
        self.is_alive = is_alive
        self.wall_clock = wall_clock
        self.rng = rng
        self.options = options
        self.metrics = metrics
        self.peer_timeout_s = peer_timeout_s
        self.last_full_pass: float | None = None
        self.last_pass: float | None = None
        self.running = 0

    def _count(self, name: str, by: float = 1) -> None:
        self.metrics[name] = self.metrics.get(name, 0) + by

    async def call(self, node: str, method: str, payload: dict) -> dict:
        deadline = asyncio.get_running_loop().time() + self.peer_timeout_s * 2
        return await self._call(node, method, payload, deadline)

    # --- the serving side ----------------------------------------------------------------
    def _tree(self, payload: dict) -> MerkleTree:
        tree = self.trees.trees.get(str(payload["tree"]))
        if tree is None:
            raise RemoteError("unknown_tree", f"{self.node_id} keeps no tree for {payload['tree']!r} (ring views differ?)")
        return tree

    async def handle(self, method: str, payload: dict) -> dict:
        if method == "aae_roots":
            ids = payload["trees"]
            if not isinstance(ids, list) or len(ids) > 4 * 1024:
                raise ValueError("trees must be a list of at most 4096 tree ids")
            trees = self.trees.trees
            return {"roots": [trees[str(t)].root if str(t) in trees else None for t in ids]}
        if method == "aae_hashes":
            indices = payload["indices"]
            if not isinstance(indices, list) or len(indices) > 4 * 1024:
                raise ValueError("indices must be a list of at most 4096 node numbers")
            return {"hashes": self._tree(payload).hashes(int(payload["level"]), [int(i) for i in indices])}
        if method == "aae_segments":
            segments = payload["segments"]
            if not isinstance(segments, list) or len(segments) > self.options.max_segments_per_request:
                raise ValueError(f"segments must be a list of at most {self.options.max_segments_per_request}")
            tree = self._tree(payload)
            entries = tree.entries(int(s) for s in segments if 0 <= int(s) < tree.leaf_count)
            return {"entries": [[b64(k), h] for k, h in entries.items()]}
        if method == "fetch_many":
            keys = payload["keys"]
            if not isinstance(keys, list) or len(keys) > self.options.repair_batch:
                raise ValueError(f"keys must be a list of at most {self.options.repair_batch}")
            objects = [self.replica.fetch(unb64(k)) for k in keys]
            return {"objects": [None if o is None else b64(versions.encode_object(o)) for o in objects]}
        if method == "store_many":
            items = payload["items"]
            if not isinstance(items, list) or len(items) > self.options.repair_batch:
                raise ValueError(f"items must be a list of at most {self.options.repair_batch}")
            decoded = [(unb64(k), versions.decode_object(unb64(o))) for k, o in items]  # all or nothing
            now = self.wall_clock()
            for key, obj in decoded:
                await self.replica.store(key, obj, hint_for=None, now=now)
            return {"ok": True}
        raise RemoteError("unknown_method", f"no peer method {method!r}")

    # --- the exchanging side ---------------------------------------------------------------
    async def exchange(self, tid: str, peer: str) -> int:
        """Compare one tree with `peer` and repair the keys that differ; returns how many.
        Raises PeerUnreachable / RemoteError when the peer fails."""
        tree = self.trees.trees.get(tid)
        if tree is None:
            return 0
        started = self.wall_clock()
        trees = self.trees.trees
        self.running += 1
        try:
            walk = DiffWalk(tree)
            while (ask := walk.request()) is not None:
                level, indices = ask
                reply = await self.call(peer, "aae_hashes", {"tree": tid, "level": level, "indices": indices})
                walk.receive([int(h) for h in reply["hashes"]])
            self._count("aae_exchanges")
            if not walk.segments:
                self._synced(trees, tid, peer, started)
                return 0
            self._count("aae_segments_differing", len(walk.segments))
            keys: list[bytes] = []
            step = self.options.max_segments_per_request
            for start in range(0, len(walk.segments), step):
                chunk = walk.segments[start : start + step]
                reply = await self.call(peer, "aae_segments", {"tree": tid, "segments": chunk})
                remote = {unb64(k): int(h) for k, h in reply["entries"]}
                keys += diff_entries(tree.entries(chunk), remote)
                if len(keys) >= self.options.max_keys_per_exchange:
                    keys = keys[: self.options.max_keys_per_exchange]
                    complete = False
                    break
            else:
                complete = True
            repaired = await self._repair(peer, keys)
            if complete:
                self._synced(trees, tid, peer, started)
            return repaired
        finally:
            self.running -= 1

    def _synced(self, trees: dict, tid: str, peer: str, started: float) -> None:
        # Only if no ring change (rebuild) replaced the trees meanwhile.
        if self.trees.trees is trees:
            self.trees.synced[(tid, peer)] = started

    async def _repair(self, peer: str, keys: list[bytes]) -> int:
        repaired = 0
        batch = self.options.repair_batch
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            reply = await self.call(peer, "fetch_many", {"keys": [b64(k) for k in chunk]})
            send = []
            now = self.wall_clock()
            fixed = 0
            for key, raw in zip(chunk, reply["objects"]):
                theirs = None if raw is None else versions.decode_object(unb64(raw))
                mine = self.replica.fetch(key)
                merged = mine if theirs is None else await self.replica.store(key, theirs, hint_for=None, now=now)
                if merged is None:
                    continue
                changed_here = not merged.same_as(mine)
                if not merged.same_as(theirs):
                    send.append([b64(key), b64(versions.encode_object(merged))])
                fixed += changed_here or not merged.same_as(theirs)
            if send:
                await self.call(peer, "store_many", {"items": send})
            repaired += fixed
            self._count("aae_keys_repaired", fixed)
            await asyncio.sleep(len(chunk) / self.options.repair_rate_per_s)
        return repaired

    async def run_pass(self) -> bool:
        """One comparison of every (tree, peer) pair whose peer is alive: the roots of all
        trees shared with a peer in one message, then an exchange of each tree whose root
        differs. True when every pair was compared."""
        by_peer: dict[str, list[str]] = {}
        for tid, peer in self.trees.pairs():
            by_peer.setdefault(peer, []).append(tid)
        peers = sorted(by_peer)
        self.rng.shuffle(peers)
        limit = asyncio.Semaphore(self.options.max_concurrent_exchanges)
        complete = True

        async def one(peer: str) -> None:
            nonlocal complete
            if not self.is_alive(peer):
                complete = False
                return
            async with limit:
                try:
                    ids = by_peer[peer]
                    started, trees = self.wall_clock(), self.trees.trees
                    reply = await self.call(peer, "aae_roots", {"trees": ids})
                    self._count("aae_root_comparisons", len(ids))
                    for tid, root in zip(ids, reply["roots"]):
                        tree = self.trees.trees.get(tid)
                        if root is None:
                            complete = False  # the peer's ring differs from ours, for now
                        elif tree is not None and tree.root != int(root):
                            await self.exchange(tid, peer)
                        elif tree is not None:
                            self._synced(trees, tid, peer, started)
                except (PeerUnreachable, RemoteError, KeyError, TypeError, ValueError):
                    complete = False
                    self._count("aae_exchanges_failed")

        await asyncio.gather(*(one(peer) for peer in peers))
        self.last_pass = self.wall_clock()
        if complete:
            self.last_full_pass = self.last_pass
        return complete

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval_s * self.rng.uniform(0.8, 1.2))
            await self.run_pass()

    def status(self) -> dict:
        return {
            "enabled": self.options.enabled,
            "interval_s": self.options.interval_s,
            "trees": len(self.trees.trees),
            "keys": self.trees.keys,
            "exchanges": int(self.metrics.get("aae_exchanges", 0)),
            "trees_compared": int(self.metrics.get("aae_root_comparisons", 0)),
            "exchanges_failed": int(self.metrics.get("aae_exchanges_failed", 0)),
            "keys_repaired": int(self.metrics.get("aae_keys_repaired", 0)),
            "last_full_pass": self.last_full_pass,
            "running": self.running,
        }


__all__ = ["AntiEntropy", "AntiEntropyOptions", "TreeSet", "tree_id", "INTERVAL_ENV"]
