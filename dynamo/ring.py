"""The consistent-hash ring (Dynamo §4.2-4.3, partitioning Strategy 1: random tokens).

Every node places `vnodes` tokens on [0, 2^32): token i of node "n1" is
`mmh3.hash("n1-vnode-i", unsigned)`. A key hashes to `mmh3.hash(key, unsigned)`; its
*preference list* is the first N distinct physical nodes met walking clockwise from the
first token >= that hash (wrapping around), and its *fallbacks* are the other nodes in
the order the same walk meets them. Equal tokens are ordered by node id, so every node
computes the same lists from the same member list, with no coordination.

    >>> ring = Ring(["n1", "n2", "n3", "n4", "n5"], vnodes=150)
    >>> pl = ring.preference_list(b"user/42", 3); len(set(pl))
    3
    >>> ring.fallbacks(b"user/42", 3) == [n for n in ring.walk(ring.key_hash(b"user/42")) if n not in pl]
    True

Ownership: token t owns the arc (previous token, t]; a node's *ownership* is the share of
the ring its arcs cover (the share of keys for which it is the first replica).
"""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator

import mmh3

RING_SIZE = 2**32
DEFAULT_VNODES = 150


def key_hash(key: bytes) -> int:
    return mmh3.hash(key, signed=False)


def token(node: str, index: int) -> int:
    return mmh3.hash(f"{node}-vnode-{index}", signed=False)


class Ring:
    """An immutable ring over a set of node ids (build a new one when membership changes)."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES):
        nodes = sorted(set(nodes))
        if not nodes:
            raise ValueError("a ring needs at least one node")
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, not {vnodes}")
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.vnodes = vnodes
        entries = sorted((token(node, i), node) for node in nodes for i in range(vnodes))
        self._tokens = [t for t, _ in entries]
        self._owners = [n for _, n in entries]
        # Walk order from each token, computed when first needed: every request asks for a
        # preference list, and a walk over 150 tokens per node is a Python loop. At most
        # one entry per token (the ring is immutable).
        self._walks: dict[int, tuple[str, ...]] = {}

    key_hash = staticmethod(key_hash)

    def __len__(self) -> int:
        return len(self.nodes)

    def walk(self, position: int) -> Iterator[str]:
        """Distinct nodes clockwise from the first token >= `position`, each once."""
        start = bisect.bisect_left(self._tokens, position)
        seen: set[str] = set()
        count = len(self._tokens)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.nodes):
                    return

    def _walk_from(self, position: int) -> tuple[str, ...]:
        """`tuple(self.walk(position))`, cached per token."""
        start = bisect.bisect_left(self._tokens, position)
        if start == len(self._tokens):
            start = 0
        walk = self._walks.get(start)
        if walk is None:
            walk = self._walks[start] = tuple(self.walk(self._tokens[start]))
        return walk

    def preference_of_hash(self, hashed: int, n: int) -> tuple[str, ...]:
        """The preference list of a key whose `key_hash` is `hashed` (a shared tuple)."""
        return self._walk_from(hashed)[:n]

    def preference_list(self, key: bytes, n: int) -> list[str]:
        """The first `n` distinct nodes for `key` (all nodes if fewer than n)."""
        return list(self._walk_from(key_hash(key))[:n])

    def fallbacks(self, key: bytes, n: int) -> list[str]:
        """The nodes after the preference list, in the order they would stand in."""
        return list(self._walk_from(key_hash(key))[n:])

    def placement(self, key: bytes, n: int) -> tuple[list[str], list[str]]:
        """`(preference_list(key, n), fallbacks(key, n))`, hashing the key once."""
        walk = self._walk_from(key_hash(key))
        return list(walk[:n]), list(walk[n:])

    def ownership(self) -> dict[str, float]:
        """Each node's share of [0, 2^32) as first replica; the shares sum to 1."""
        share = dict.fromkeys(self.nodes, 0)
        count = len(self._tokens)
        for i, t in enumerate(self._tokens):
            previous = self._tokens[i - 1] if i else self._tokens[-1] - RING_SIZE
            share[self._owners[i]] += t - previous
        return {node: arc / RING_SIZE for node, arc in share.items()}

    def replica_ownership(self, n: int) -> dict[str, float]:
        """Each node's share of key space among the `n` replicas (sums to min(n, nodes))."""
        share = dict.fromkeys(self.nodes, 0)
        for i, t in enumerate(self._tokens):
            previous = self._tokens[i - 1] if i else self._tokens[-1] - RING_SIZE
            arc = t - previous
            placed = 0
            for node in self.walk(t):
                share[node] += arc
                placed += 1
                if placed == n:
                    break
        return {node: arc / RING_SIZE for node, arc in share.items()}

    def arcs(self) -> Iterator[tuple[int, int]]:
        """(start exclusive, end inclusive) of every arc; the first one wraps (start < 0)."""
        for i, t in enumerate(self._tokens):
            yield (self._tokens[i - 1] if i else self._tokens[-1] - RING_SIZE), t

    def replica_sets(self, n: int) -> set[tuple[str, ...]]:
        """The distinct preference lists of all arcs (cached): a coverage read is complete
        when at least one node of each answered."""
        cache = self.__dict__.setdefault("_replica_sets", {})
        if n not in cache:
            sets = set()
            for t in set(self._tokens):
                walk = self.walk(t)
                sets.add(tuple(next(walk) for _ in range(min(n, len(self.nodes)))))
            cache[n] = sets
        return cache[n]

    def tokens_of(self, node: str) -> list[int]:
        return [t for t, owner in zip(self._tokens, self._owners) if owner == node]

    def _check(self) -> None:
        assert len(self._tokens) == len(self.nodes) * self.vnodes
        pairs = list(zip(self._tokens, self._owners))
        assert pairs == sorted(pairs), "tokens out of order"
        assert all(0 <= t < RING_SIZE for t in self._tokens)
        assert set(self._owners) == set(self.nodes)
