"""Merkle trees over key-hash segments, kept up to date as writes land (Dynamo §4.7;
the layout follows Riak's `hashtree.erl`: fixed segments of the key-hash space, so a tree
never has to be re-shaped, and leaves hash the *version* (clock and dots), not the value).

A tree covers the keys of one replica set (the nodes of a preference list). Its leaves
are `branching ** depth` segments of the 32-bit ring hash of a key; a segment's hash is
the XOR of its keys' entry hashes, and an inner node's hash is the XOR of its children.
XOR makes every update O(depth): storing a key changes its leaf and each ancestor by
`old_entry ^ new_entry`, with nothing recomputed; a key is held at most once, so two
entries never cancel out (barring a 64-bit collision).

    >>> a, b = MerkleTree(branching=4, depth=2), MerkleTree(branching=4, depth=2)
    >>> for k in (b"x", b"y", b"z"):
    ...     a.set(k, entry_hash(k, b"v1")); b.set(k, entry_hash(k, b"v1"))
    >>> a.root == b.root
    True
    >>> b.set(b"y", entry_hash(b"y", b"v2")); a.root == b.root
    False
    >>> walk = DiffWalk(a)
    >>> while (ask := walk.request()) is not None:
    ...     walk.receive(b.hashes(*ask))
    >>> diff_entries(a.entries(walk.segments), b.entries(walk.segments))
    [b'y']

`DiffWalk` is the level-by-level comparison as a pure state machine: it asks for the
remote hashes of a bounded list of nodes of one level, compares them with its own tree,
and descends only under those that differ; what is left are the differing segments,
whose (key, entry) lists the two sides then compare. The asyncio driver
(`dynamo/antientropy.py`) carries its requests over the network; the benchmark and the
tests feed it a second tree directly.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

from .ring import key_hash

# A 16-way tree of depth 3: 4096 segments, a 16-hash first step and at most 4096 hashes
# per level. Riak uses 1M segments for large vnodes; `MerkleTree(depth=5)` gives that.
DEFAULT_BRANCHING = 16
DEFAULT_DEPTH = 3
# One DiffWalk request names at most this many nodes (bounds each message).
MAX_NODES_PER_REQUEST = 1024
MASK64 = (1 << 64) - 1


def entry_hash(key: bytes, version: bytes) -> int:
    """64-bit hash of one (key, version digest) pair; never 0 (0 means "absent")."""
    h = int.from_bytes(hashlib.blake2b(len(key).to_bytes(4, "big") + key + version, digest_size=8).digest(), "big")
    return h or 1


def version_digest(obj) -> bytes:
    """What identifies a stored version: its clock's counters and its siblings' dots.
    Timestamps are left out (replicas that agree on history may hold different times)."""
    if obj is None:
        return b""
    entries = obj.clock._entries
    parts = [f"{a}:{entries[a][0]}" for a in sorted(entries)]
    parts.append("|")
    parts += [f"{s.dot.actor}:{s.dot.counter}" for s in sorted(obj.siblings, key=lambda s: s.dot)]
    return ";".join(parts).encode()


class MerkleTree:
    """The hash tree of one replica set's keys. Not thread-safe: one event loop owns it."""

    def __init__(self, *, branching: int = DEFAULT_BRANCHING, depth: int = DEFAULT_DEPTH):
        if branching < 2 or depth < 1 or branching**depth > 1 << 24:
            raise ValueError(f"branching must be >= 2, depth >= 1 and branching**depth <= 2**24, not {branching}, {depth}")
        self.branching = branching
        self.depth = depth
        self.leaf_count = branching**depth
        # levels[0] = [root], levels[depth] = the segments
        self.levels: list[list[int]] = [[0] * branching**level for level in range(depth + 1)]
        self._segments: dict[int, dict[bytes, int]] = {}  # segment -> key -> entry hash
        self.keys = 0

    @property
    def root(self) -> int:
        return self.levels[0][0]

    def segment_of(self, key: bytes, hashed: int | None = None) -> int:
        return ((key_hash(key) if hashed is None else hashed) * self.leaf_count) >> 32

    def get(self, key: bytes) -> int:
        segment = self._segments.get(self.segment_of(key))
        return 0 if segment is None else segment.get(key, 0)

    def set(self, key: bytes, entry: int, hashed: int | None = None) -> None:
        """Make `entry` the key's hash (0 removes the key). O(depth)."""
        seg = self.segment_of(key, hashed)
        bucket = self._segments.get(seg)
        old = 0 if bucket is None else bucket.get(key, 0)
        if old == entry:
            return
        if entry:
            if bucket is None:
                bucket = self._segments[seg] = {}
            bucket[key] = entry
            self.keys += old == 0
        else:
            del bucket[key]
            self.keys -= 1
            if not bucket:
                del self._segments[seg]
        delta = old ^ entry
        index = seg
        for level in range(self.depth, -1, -1):
            self.levels[level][index] ^= delta
            index //= self.branching

    def remove(self, key: bytes) -> None:
        self.set(key, 0)

    def hashes(self, level: int, indices: Iterable[int]) -> list[int]:
        """The hashes of nodes `indices` of `level` (0 = root); ValueError when out of range."""
        if not 0 <= level <= self.depth:
            raise ValueError(f"level must be in 0..{self.depth}, not {level}")
        row = self.levels[level]
        out = []
        for index in indices:
            if not 0 <= index < len(row):
                raise ValueError(f"node {index} is not on level {level}")
            out.append(row[index])
        return out

    def entries(self, segments: Iterable[int]) -> dict[bytes, int]:
        """key -> entry hash of every key in `segments`."""
        out: dict[bytes, int] = {}
        for seg in segments:
            out.update(self._segments.get(seg, {}))
        return out

    def all_entries(self) -> dict[bytes, int]:
        return self.entries(list(self._segments))

    def same_shape(self, other: "MerkleTree") -> bool:
        return (self.branching, self.depth) == (other.branching, other.depth)

    def _check(self) -> None:
        """Every inner hash is the XOR of its children; leaves are the XOR of their keys."""
        leaves = self.levels[self.depth]
        expected = [0] * self.leaf_count
        count = 0
        for seg, bucket in self._segments.items():
            assert bucket, f"empty segment {seg} kept"
            for key, entry in bucket.items():
                assert entry != 0 and self.segment_of(key) == seg, (key, seg)
                expected[seg] ^= entry
                count += 1
        assert leaves == expected, "leaf hashes drifted from their keys"
        assert count == self.keys, "key count drifted"
        for level in range(self.depth - 1, -1, -1):
            below = self.levels[level + 1]
            for index, value in enumerate(self.levels[level]):
                acc = 0
                for child in below[index * self.branching : (index + 1) * self.branching]:
                    acc ^= child
                assert value == acc, f"inner node {level}/{index} drifted"


class DiffWalk:
    """Finds the segments where a local tree and a remote one differ, level by level.

    `request()` gives `(level, indices)` to ask the remote side for (None when done);
    `receive(hashes)` takes the answer, in the same order. `segments` then holds the
    differing segments, in order. Each request names at most `max_nodes` nodes.
    """

    def __init__(self, local: MerkleTree, *, max_nodes: int = MAX_NODES_PER_REQUEST):
        if max_nodes < 1:
            raise ValueError("max_nodes must be positive")
        self.local = local
        self.max_nodes = max_nodes
        self.level = 0
        self._todo: list[int] = [0]  # nodes of `level` still to compare
        self._next: list[int] = []  # differing nodes of `level`, to descend under
        self._asked: list[int] | None = None
        self.segments: list[int] = []
        self.requests = 0
        self.hashes_exchanged = 0

    def request(self) -> tuple[int, list[int]] | None:
        assert self._asked is None, "receive() the previous answer first"
        while not self._todo:
            if self.level == self.local.depth or not self._next:
                if self.level == self.local.depth:
                    self.segments = sorted(self._next)
                    self._next = []
                return None
            b = self.local.branching
            self._todo = [child for parent in self._next for child in range(parent * b, (parent + 1) * b)]
            self._next = []
            self.level += 1
        self._asked, self._todo = self._todo[: self.max_nodes], self._todo[self.max_nodes :]
        self.requests += 1
        return self.level, list(self._asked)

    def receive(self, remote: list[int]) -> None:
        asked, self._asked = self._asked, None
        if asked is None or len(remote) != len(asked):
            raise ValueError(f"expected {0 if asked is None else len(asked)} hashes, got {len(remote)}")
        self.hashes_exchanged += len(asked)
        mine = self.local.hashes(self.level, asked)
        self._next += [index for index, a, b in zip(asked, mine, remote) if a != b]


def diff_entries(local: Mapping[bytes, int], remote: Mapping[bytes, int]) -> list[bytes]:
    """Keys held by one side only or with different entry hashes, sorted."""
    return sorted(k for k in set(local) | set(remote) if local.get(k, 0) != remote.get(k, 0))


def differing_keys(a: MerkleTree, b: MerkleTree) -> list[bytes]:
    """The whole comparison of two in-memory trees (tests, benchmark)."""
    walk = DiffWalk(a)
    while (ask := walk.request()) is not None:
        walk.receive(b.hashes(*ask))
    return diff_entries(a.entries(walk.segments), b.entries(walk.segments))


__all__ = ["MerkleTree", "DiffWalk", "entry_hash", "version_digest", "diff_entries", "differing_keys"]
