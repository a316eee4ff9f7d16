"""The memtable: the newest writes, in memory, until they are flushed to an SSTable.

A plain dict takes the writes (a put is one dict store, about 20x cheaper than a
SortedDict insert); the key order that scans and flushes need is built lazily. Every new
key is also appended to `_arrivals`; `sorted_keys()` merges the arrivals it has not seen
yet into a sorted list and hands out that list, which it never mutates afterwards, so a
scan keeps a stable snapshot of the key order while writers go on.

    >>> m = Memtable()
    >>> m.put(b"b", b"2"); m.put(b"a", b"1"); m.put(b"b", TOMBSTONE)
    >>> m.sorted_keys(), m.get(b"b") is TOMBSTONE
    ([b'a', b'b'], True)

A delete is a put of `TOMBSTONE`: it must hide older versions in the SSTables below.
`bytes` counts the keys and values held (what a flush will write, give or take headers);
the engine freezes the memtable when it reaches `memtable_bytes`.

Threads: `put` is called under the engine's write lock, so there is one writer at a time;
`get` and `sorted_keys` may run concurrently with it (dict reads and list appends are
atomic under the GIL; `sorted_keys` has its own lock for the merge).
"""
from __future__ import annotations

import threading

from .sstable import TOMBSTONE

_MISSING = object()


class Memtable:
    __slots__ = ("data", "bytes", "deletes", "wal_numbers", "_arrivals", "_sorted", "_merged", "_lock")

    def __init__(self, wal_numbers: tuple[int, ...] = ()) -> None:
        self.data: dict[bytes, bytes] = {}
        self.bytes = 0
        # Tombstones put so far: a scan of a memtable without any need not look for them.
        self.deletes = 0
        # The logs whose records this memtable holds: deleted once it is flushed.
        self.wal_numbers = list(wal_numbers)
        self._arrivals: list[bytes] = []
        self._sorted: list[bytes] = []
        self._merged = 0
        self._lock = threading.Lock()

    def put(self, key: bytes, value: bytes) -> None:
        if value is TOMBSTONE:
            self.deletes += 1
        data = self.data
        old = data.get(key, _MISSING)
        if old is _MISSING:
            self._arrivals.append(key)
            self.bytes += len(key) + len(value)
        else:
            self.bytes += len(value) - len(old)
        data[key] = value

    def get(self, key: bytes):
        """The value, TOMBSTONE for a delete, or None when this memtable has no word on key."""
        return self.data.get(key)

    def __len__(self) -> int:
        return len(self.data)

    def sorted_keys(self) -> list[bytes]:
        """Every key put so far (at least up to the call), sorted; the caller must not mutate it.

        Costs O(new keys * log) plus a linear merge when keys arrived since the last call.
        """
        # No arrivals since the last merge (a frozen memtable, or a read-mostly one): no
        # lock. `_sorted` is replaced before `_merged` is advanced, so a list read here
        # holds at least the first `_merged` arrivals.
        if len(self._arrivals) == self._merged:
            return self._sorted
        with self._lock:
            arrived = len(self._arrivals)
            if arrived != self._merged:
                fresh = self._arrivals[self._merged:arrived]
                fresh.sort()
                # Two sorted runs: timsort merges them in linear time.
                self._sorted = sorted(self._sorted + fresh) if self._sorted else fresh
                self._merged = arrived
            return self._sorted

    def sorted_items(self) -> tuple[list[bytes], list[bytes]]:
        """(keys, values) in key order, for a flush (the memtable is frozen by then)."""
        keys = self.sorted_keys()
        return keys, list(map(self.data.__getitem__, keys))

    def _check(self) -> None:
        with self._lock:
            assert len(self._arrivals) == len(self.data), "a key arrived twice or went missing"
            assert set(self._arrivals) == self.data.keys()
            assert self._sorted == sorted(self._arrivals[: self._merged]), "sorted key cache is stale"
            assert self.bytes == sum(len(k) + len(v) for k, v in self.data.items()), "memtable bytes drifted"
            tombstones = sum(value is TOMBSTONE for value in self.data.values())
            assert self.deletes >= tombstones, f"{tombstones} tombstones but {self.deletes} deletes counted"
