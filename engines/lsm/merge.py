"""The k-way merge under scans and compaction, done a chunk at a time.

Each source is a sorted run (a memtable, one level-0 table, or a whole level >= 1, whose
tables do not overlap) that hands out its entries in chunks: (keys, values) lists in key
order, about a block each. Sources are listed newest first; for a key held by several,
the newest source's value wins, so older versions are shadowed.

A merge step takes, from every source, the entries up to the smallest "last key of the
current chunk" among them (the bound): every entry at or below the bound is then in hand,
from all sources, so the step can merge them completely. Merging is a dict update from
the oldest source to the newest (newer values overwrite) and one `sorted()`, all C-level
work, instead of a heap operation per entry in Python. When only one source has entries
below the bound, its slice passes through untouched.

    sources (newest first):  memtable [b, d=TOMBSTONE]    table [a, b, c, d]
    step 1 bound = d:  {a: t, b: mem, c: t, d: TOMBSTONE}  -> a, b(new), c, d(TOMBSTONE)

Reverse merges mirror this: chunks are consumed from their high end, the bound is the
largest first key, and the output is in descending order.

Tombstones are passed through: a scan skips them, a compaction keeps or drops them.
Scans with a small limit do not come here: short_scan.py answers them in one merge.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import chain
from typing import Iterator

# Entries taken from a memtable per chunk: large enough to amortise the step, small
# enough that a scan with a small limit does not copy much.
MEMTABLE_CHUNK = 256


def memtable_chunks(memtable, start, end, reverse: bool, chunk: int = MEMTABLE_CHUNK) -> Iterator[tuple[list, list]]:
    """Chunks of a memtable's entries in [start, end). Values are read when the chunk is
    cut, so a write that lands meanwhile may or may not be seen (the Engine contract)."""
    keys = memtable.sorted_keys()
    lo = 0 if start is None else bisect_left(keys, start)
    hi = len(keys) if end is None else bisect_left(keys, end)
    lookup = memtable.data.__getitem__
    if not reverse:
        while lo < hi:
            part = keys[lo:min(hi, lo + chunk)]
            lo += len(part)
            yield part, list(map(lookup, part))
    else:
        while lo < hi:
            part = keys[max(lo, hi - chunk):hi]
            hi -= len(part)
            yield part, list(map(lookup, part))


def table_chunks(tables, start, end, reverse: bool, chunk: int = 1, use_cache: bool = True) -> Iterator[tuple[list, list]]:
    """Chunks of at least `chunk` entries (whole blocks, concatenated; the last chunk may be
    shorter) from `tables` (sorted by key, not overlapping), restricted to [start, end)."""
    blocks = _table_blocks(tables, start, end, reverse, use_cache)
    if chunk <= 1:
        yield from blocks
        return
    keys_parts: list = []
    values_parts: list = []
    held = 0
    for keys, values in blocks:
        keys_parts.append(keys)
        values_parts.append(values)
        held += len(keys)
        if held >= chunk:
            yield _joined(keys_parts, values_parts, reverse)
            keys_parts, values_parts, held = [], [], 0
    if keys_parts:
        yield _joined(keys_parts, values_parts, reverse)


def _joined(keys_parts: list, values_parts: list, reverse: bool) -> tuple[list, list]:
    if len(keys_parts) == 1:
        return keys_parts[0], values_parts[0]
    if reverse:  # blocks came from the high end down; a chunk is always in ascending order
        keys_parts.reverse()
        values_parts.reverse()
    return list(chain.from_iterable(keys_parts)), list(chain.from_iterable(values_parts))


def _table_blocks(tables, start, end, reverse: bool, use_cache: bool) -> Iterator[tuple[list, list]]:
    """One chunk per block, in scan order; each chunk's lists ascending."""
    if not reverse:
        first = 0
        if start is not None:
            while first < len(tables) and tables[first].largest < start:
                first += 1
        for t_index in range(first, len(tables)):
            table = tables[t_index]
            if end is not None and table.smallest >= end:
                return
            block = 0 if start is None or t_index != first else table.block_for(start)
            for b in range(block, table.block_count):
                keys, values = table.block(b, use_cache)
                lo = 0 if start is None or keys[0] >= start else bisect_left(keys, start)
                hi = len(keys)
                if end is not None and keys[-1] >= end:
                    hi = bisect_left(keys, end, lo)
                    if lo < hi:
                        yield keys[lo:hi], values[lo:hi]
                    return
                if lo < hi:
                    yield (keys, values) if lo == 0 else (keys[lo:], values[lo:])
    else:
        last = len(tables) - 1
        if end is not None:
            while last >= 0 and tables[last].smallest >= end:
                last -= 1
        for t_index in range(last, -1, -1):
            table = tables[t_index]
            if start is not None and table.largest < start:
                return
            block = table.block_count - 1
            if end is not None and t_index == last:
                block = min(block, table.block_for(end))
            for b in range(block, -1, -1):
                keys, values = table.block(b, use_cache)
                hi = len(keys) if end is None or keys[-1] < end else bisect_left(keys, end)
                lo = 0
                if start is not None and keys[0] < start:
                    lo = bisect_left(keys, start, 0, hi)
                    if lo < hi:
                        yield keys[lo:hi], values[lo:hi]
                    return
                if lo < hi:
                    yield (keys, values) if hi == len(keys) else (keys[:hi], values[:hi])


class _Cursor:
    """A source's current chunk and the window [lo, hi) of it not yet consumed."""

    __slots__ = ("chunks", "keys", "values", "lo", "hi")

    def __init__(self, chunks) -> None:
        self.chunks = chunks
        self.keys = self.values = None
        self.lo = self.hi = 0

    def refill(self) -> bool:
        """Load the next non-empty chunk; False when the source is exhausted."""
        for keys, values in self.chunks:
            if keys:
                self.keys, self.values = keys, values
                self.lo, self.hi = 0, len(keys)
                return True
        return False


def merge_chunks(sources: list, reverse: bool = False) -> Iterator[tuple[list, list]]:
    """Merge chunk iterators (newest source first) into (keys, values) chunks in scan order
    (ascending, or descending if `reverse`), each key once, with its newest value."""
    cursors = []
    for chunks in sources:
        cursor = _Cursor(iter(chunks))
        if cursor.refill():
            cursors.append(cursor)
    while cursors:
        if len(cursors) == 1:
            only = cursors[0]
            while True:
                if not reverse:
                    yield only.keys[only.lo:only.hi], only.values[only.lo:only.hi]
                else:  # chunks may be a cached block's tuples: reversed copies
                    yield only.keys[only.lo:only.hi][::-1], only.values[only.lo:only.hi][::-1]
                if not only.refill():
                    return
        if not reverse:
            bound = min(c.keys[c.hi - 1] for c in cursors)
        else:
            bound = max(c.keys[c.lo] for c in cursors)
        taken = []
        # Oldest first, so that newer values overwrite older ones in the dict below.
        for cursor in reversed(cursors):
            if not reverse:
                cut = bisect_right(cursor.keys, bound, cursor.lo, cursor.hi)
                if cut > cursor.lo:
                    taken.append((cursor.keys[cursor.lo:cut], cursor.values[cursor.lo:cut]))
                    cursor.lo = cut
            else:
                cut = bisect_left(cursor.keys, bound, cursor.lo, cursor.hi)
                if cut < cursor.hi:
                    taken.append((cursor.keys[cut:cursor.hi], cursor.values[cut:cursor.hi]))
                    cursor.hi = cut
        if len(taken) == 1:
            keys, values = taken[0]
        else:
            merged: dict = {}
            for keys, values in taken:
                merged.update(zip(keys, values))
            keys = sorted(merged)
            values = list(map(merged.__getitem__, keys))
        if reverse:
            keys = keys[::-1]
            values = values[::-1]
        yield keys, values
        cursors = [c for c in cursors if c.lo < c.hi or c.refill()]
