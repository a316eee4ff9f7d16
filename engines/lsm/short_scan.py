"""Short scans (a `limit` of at most SHORT_SCAN_LIMIT): answered in one go, not streamed.

A scan of 100 keys through the chunked merge (merge.py) pays for generators, cursors and
a merge step per chunk of every source: ~1 us per key returned. Here, instead, each source
(a memtable, or a sorted run of tables: one level-0 table, or a whole level >= 1) hands
over one slice of candidates from the start key: a table run, the keys of the blocks it
covers (`Table.block_keys`, one struct.unpack a block), its values left where they are for
now. Each source gives about its share of the `limit` (by its density, entries per unit
of key space, where the scan starts), at least MIN_CANDIDATES, and a table run the rest
of the block it stops in. Then one merge:

    bound     = the smallest last candidate among sources that have more beyond it:
                every entry at or below it, of every source, is in hand
    values    = of the candidates up to the bound only (`Table.block_values`)
    merged    = the (key, value) pairs up to the bound, sorted by key in one timsort (it
                merges the sources' sorted runs) when no key is in two sources (a set
                tells); otherwise a dict updated from the oldest source to the newest, so
                newer values win, then sorted. C-level work, no per-key Python
    result    = merged without tombstones (looked for only when a source holds any),
                at most `limit`

    memtable [b, d=TOMBSTONE] (all of it)  table [a, b, c, d, e, f ...] (first 5 of many)
    bound = e: {a, b: mem, c, d: TOMBSTONE, e} -> a, b(new), c, e

If tombstones or an unlucky spread leave the result short, another round starts just
after the bound, with twice the candidates per source, until the limit is reached or
every source is exhausted. Reverse scans mirror this from the end of the range (the bound
is the largest first candidate). Every round reads the one version the scan started
with, so the result is consistent with it; the active memtable may add keys between
rounds, which a scan may or may not see (the Engine contract).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import chain, compress, repeat
from operator import is_not, itemgetter

from .sstable import TOMBSTONE

# Longer scans stream through merge.py: one go would hold the whole result in memory.
SHORT_SCAN_LIMIT = 1024
# Fewest candidates asked of any source in a first round: with fewer, the bound (the
# least far-reaching source) falls short of the limit too often, costing a second round.
MIN_CANDIDATES = 16
# Candidates asked of a source, in percent of its share of `limit`: a margin for keys that
# are not spread alike over the sources, so that one round usually suffices.
SHARE_PERCENT = 125

_key_of = itemgetter(0)
_value_of = itemgetter(1)


def short_scan(memtables, runs, run_entries, start, end, reverse: bool, limit: int) -> list:
    """At most `limit` (key, value) pairs of [start, end), in scan order, tombstones out.

    `memtables` and `runs` are newest first; `runs` are (tables, smallest keys, largest
    keys, tombstones, key_density) of non-overlapping tables sorted by key; `run_entries`
    their entry counts."""
    assert 0 < limit <= SHORT_SCAN_LIMIT
    # An empty memtable (the active one, just after a flush or an open) is no source: a key
    # it takes meanwhile is a concurrent write, which a scan may or may not see.
    if not all(map(len, memtables)):
        memtables = [memtable for memtable in memtables if len(memtable)]
    # The round's start (forward) or end (reverse), and whether it is itself included.
    edge, inclusive = (start, True) if not reverse else (end, False)
    # Each source's share: its entries per unit of key space where the scan starts (levels
    # may split the key space between them: then one level holds all of a short range).
    # A source of at most `limit` entries is taken whole; a few keys close together would
    # otherwise count as dense and squeeze the others' shares.
    densities = []
    wholes = []
    for memtable in memtables:
        keys = memtable.sorted_keys()
        small = len(keys) <= limit
        wholes.append(len(keys) if small else 0)
        covers = not small and (edge is None or keys[0] <= edge <= keys[-1])
        densities.append(key_density(keys[0], keys[-1], len(keys)) if covers else 0.0)
    for (_, smallest, largest, _, density), entries in zip(runs, run_entries):
        small = entries <= limit
        wholes.append(entries if small else 0)
        covers = edge is None or smallest[0] <= edge <= largest[-1]
        densities.append(density if covers and not small else 0.0)
    total = sum(densities) or 1.0
    share = limit * SHARE_PERCENT / (100 * total)
    counts = [max(MIN_CANDIDATES, whole, int(share * density) + 1) for density, whole in zip(densities, wholes)]
    n_memtables = len(memtables)
    # Tables count their tombstones and memtables their deletes: most scans need no filter.
    runs_tombstones = any(run[3] for run in runs)
    items: list = []
    while True:
        taken = []  # (keys, values, more) per source, newest first
        if not reverse:
            for memtable, count in zip(memtables, counts):
                taken.append(_memtable_forward(memtable, edge, inclusive, end, count))
            for (tables, _, largest, _, _), count in zip(runs, counts[n_memtables:]):
                taken.append(_run_forward(tables, largest, edge, inclusive, end, count))
        else:
            for memtable, count in zip(memtables, counts):
                taken.append(_memtable_backward(memtable, edge, inclusive, start, count))
            for (tables, smallest, _, _, _), count in zip(runs, counts[n_memtables:]):
                taken.append(_run_backward(tables, smallest, edge, inclusive, start, count))
        # Read after the takes: a memtable counts a tombstone before it stores it, so one
        # that a take saw is counted here.
        maybe_tombstones = runs_tombstones or any(m.deletes for m in memtables)
        pairs, bound = _merge(taken, reverse, maybe_tombstones)
        items += pairs[:limit - len(items)]
        if len(items) == limit or bound is None:
            return items
        edge, inclusive = bound, False
        counts = [count * 2 for count in counts]


def key_density(smallest: bytes, largest: bytes, entries: int) -> float:
    """Entries per unit of key space between two keys, keys read as numbers from their
    first 8 bytes (0 to 2^64): how thickly a source covers the range it spans."""
    low = int.from_bytes(smallest[:8].ljust(8, b"\0"), "big")
    high = int.from_bytes(largest[:8].ljust(8, b"\0"), "big")
    return entries / (high - low + 1)


def _merge(taken: list, reverse: bool, maybe_tombstones: bool) -> tuple[list, bytes | None]:
    """(key, value) pairs up to the bound from every source, newest value per key, in scan
    order, tombstones out; and the bound (None when every source was taken whole)."""
    bound = None
    if not reverse:
        for keys, _, more in taken:
            if more and (bound is None or keys[-1] < bound):
                bound = keys[-1]
    else:
        for keys, _, more in taken:
            if more and (bound is None or keys[0] > bound):
                bound = keys[0]
    parts = []
    count = 0
    for keys, values, _ in reversed(taken):  # oldest first: newer values overwrite
        if not keys:
            continue
        low, high = 0, len(keys)
        if bound is not None:
            if not reverse:
                if keys[-1] > bound:
                    high = bisect_right(keys, bound)
            elif keys[0] < bound:
                low = bisect_left(keys, bound)
            if low == high:
                continue
            if high - low < len(keys):
                keys = keys[low:high]
        # A table run's values are read now, for the entries kept only (`_Segments`).
        values = values.fetch(low, high) if type(values) is _Segments else values[low:high]
        parts.append((keys, values))
        count += len(keys)
    if len(parts) == 1:
        pairs = list(zip(*parts[0]))
    elif len(set(chain.from_iterable([keys for keys, _ in parts]))) == count:
        # No key in two sources (the usual case): sort the pairs themselves, one C-level
        # timsort merging the sources' sorted runs.
        pairs = sorted(chain.from_iterable([zip(keys, values) for keys, values in parts]), key=_key_of)
    else:
        merged: dict = {}
        for keys, values in parts:
            merged.update(zip(keys, values))
        keys = sorted(merged)
        pairs = list(zip(keys, map(merged.__getitem__, keys)))
    if maybe_tombstones:
        pairs = list(compress(pairs, map(is_not, map(_value_of, pairs), repeat(TOMBSTONE))))
    if reverse:
        pairs.reverse()
    return pairs, bound


# Each taker returns (keys, values, more): keys an ascending sequence (a list, or a block's
# tuple, never to be mutated); values a list for a memtable, `_Segments` for a table run
# (fetched by the merge for the keys it keeps); and whether the source may hold entries
# beyond them in scan direction.


def _memtable_forward(memtable, after, inclusive: bool, end, count: int) -> tuple:
    keys = memtable.sorted_keys()
    if after is None:
        lo = 0
    else:
        lo = bisect_left(keys, after) if inclusive else bisect_right(keys, after)
    hi = lo + count
    part = keys[lo:hi]
    if part and end is not None and part[-1] >= end:
        part = part[:bisect_left(part, end)]
        more = False
    else:
        more = hi < len(keys)
    return part, list(map(memtable.data.__getitem__, part)), more


def _memtable_backward(memtable, before, inclusive: bool, start, count: int) -> tuple:
    keys = memtable.sorted_keys()
    if before is None:
        hi = len(keys)
    else:
        hi = bisect_right(keys, before) if inclusive else bisect_left(keys, before)
    lo = hi - count if hi > count else 0
    part = keys[lo:hi]
    if part and start is not None and part[0] < start:
        part = part[bisect_left(part, start):]
        more = False
    else:
        more = lo > 0
    return part, list(map(memtable.data.__getitem__, part)), more


class _Segments:
    """Where a table run's candidates lie: (table, block, start, stop) per block, in key
    order. The merge fetches the values of the candidates it keeps (those up to the
    bound), so values past the bound are never cut out of a block."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list = []

    def fetch(self, low: int, high: int):
        """The values of candidates [low, high) (positions in the run's joined keys)."""
        pieces = []
        position = 0
        for table, block, start, stop in self.parts:
            size = stop - start
            if position + size > low and position < high:
                first = start + max(0, low - position)
                last = start + min(size, high - position)
                pieces.append(table.block_values(block, first, last))
            position += size
            if position >= high:
                break
        return _joined(pieces)


def _run_forward(tables, largest, after, inclusive: bool, end, count: int) -> tuple:
    """At least `count` entries (when there are) from `after`: whole blocks but the first."""
    if after is None:
        t = 0
    else:
        t = bisect_left(largest, after) if inclusive else bisect_right(largest, after)
    key_parts = []
    segments = _Segments()
    need = count
    more = False
    while t < len(tables) and need > 0:
        table = tables[t]
        last_keys = table.last_keys
        if after is None or after < table.smallest:
            b = 0
        else:
            b = bisect_left(last_keys, after) if inclusive else bisect_right(last_keys, after)
        while b < len(last_keys):
            keys = table.block_keys(b)
            if after is None:
                i = 0
            else:
                i = bisect_left(keys, after) if inclusive else bisect_right(keys, after)
                after = None
            if end is not None and keys[-1] >= end:
                j = bisect_left(keys, end, i)
                if j > i:
                    key_parts.append(keys[i:j])
                    segments.parts.append((table, b, i, j))
                    need -= j - i
                # Past the range: nothing more here, whether or not `count` was reached.
                return _joined(key_parts), segments, False
            if i < len(keys):
                key_parts.append(keys[i:] if i else keys)
                segments.parts.append((table, b, i, len(keys)))
                need -= len(keys) - i
            b += 1
            if need <= 0:
                more = b < len(last_keys) or t + 1 < len(tables)
                break
        after = None
        t += 1
    return _joined(key_parts), segments, more


def _run_backward(tables, smallest, before, inclusive: bool, start, count: int) -> tuple:
    """At least `count` entries (when there are) up to `before`: whole blocks but the first."""
    if before is None:
        t = len(tables) - 1
    else:
        t = (bisect_right(smallest, before) if inclusive else bisect_left(smallest, before)) - 1
    key_parts = []  # collected from the high end down; reversed at the end
    segments = _Segments()
    need = count
    more = False
    while t >= 0 and need > 0:
        table = tables[t]
        last_keys = table.last_keys
        if before is None or before > table.largest:
            b = len(last_keys) - 1
        else:
            b = bisect_right(last_keys, before) if inclusive else bisect_left(last_keys, before)
            if b == len(last_keys):
                b -= 1
        while b >= 0:
            keys = table.block_keys(b)
            if before is None:
                j = len(keys)
            else:
                j = bisect_right(keys, before) if inclusive else bisect_left(keys, before)
                before = None
            if start is not None and keys[0] < start:
                i = bisect_left(keys, start, 0, j)
                if j > i:
                    key_parts.append(keys[i:j])
                    segments.parts.append((table, b, i, j))
                key_parts.reverse()
                segments.parts.reverse()
                return _joined(key_parts), segments, False
            if j:
                key_parts.append(keys[:j] if j < len(keys) else keys)
                segments.parts.append((table, b, 0, j))
                need -= j
            b -= 1
            if need <= 0:
                more = b >= 0 or t > 0
                break
        before = None
        t -= 1
    key_parts.reverse()
    segments.parts.reverse()
    return _joined(key_parts), segments, more


def _joined(parts: list) -> list:
    if len(parts) == 1:
        return parts[0]
    return list(chain.from_iterable(parts))
