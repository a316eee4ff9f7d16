"""Short scans (a `limit` of at most SHORT_SCAN_LIMIT): answered in one go, not streamed.

A scan of 100 keys through the chunked merge (merge.py) pays for generators, cursors and
a merge step per chunk of every source: ~1 us per key returned. Here, instead, each source
(a memtable, or a sorted run of tables: one level-0 table, or a whole level >= 1) hands
over one slice of candidates from the start key, as pieces (keys[i:j] of a block's keys,
cut out of the mapping with one struct.unpack by `Table.take_forward`, or of a memtable's
sorted keys), its values left where they are for now. Each source gives about its share
of the `limit`, at least MIN_CANDIDATES, and a table run the rest of the block it stops
in. The share is by density, entries per unit of key space, measured where the scan
starts: over DENSITY_WINDOW keys of a memtable, over DENSITY_BLOCKS blocks of a table
from its index (`_table_density`). A level's density is far from even: it is dense where
the last compaction into it landed, sparse or empty (a gap between its tables) where the
level above holds the keys; a whole-level average once sent 9 % of the scans of a
freshly filled store into a second round. Then one merge:

    bound     = the smallest last candidate among sources that have more beyond it:
                every entry at or below it, of every source, is in hand
    values    = of the candidates up to the bound only (`Table.block_values`, memtable
                lookups)
    merged    = the (key, value) pairs up to the bound, sorted by key in one timsort (it
                merges the sources' sorted runs) when no key is in two sources (a set
                tells); otherwise a dict updated from the oldest source to the newest, so
                newer values win, then sorted. C-level work, no per-key Python
    result    = merged without tombstones (looked for only when a source holds any),
                at most `limit`

    memtable [b, d=TOMBSTONE] (all of it)  table [a, b, c, d, e, f ...] (first 5 of many)
    bound = e: {a, b: mem, c, d: TOMBSTONE, e} -> a, b(new), c, e

If tombstones or an unlucky spread leave the result short, another round starts just
after the bound, asking each source for its share of what is missing (a few keys,
usually), times a growth that doubles every round, until the limit is reached or every
source is exhausted. Reverse scans mirror this from the end of the range (the bound is
the largest first candidate). Every round reads the one version the scan started with, so
the result is consistent with it; the active memtable may add keys between rounds, which
a scan may or may not see (the Engine contract).

Where the time goes (16-byte keys, 100-byte values, 1,000,000 keys in a memtable, one
level-0 table and two levels; a 100-key scan of about 7 blocks and 115 kept candidates,
warm; py-spy): the merge about half (its sort of the pairs and the set that looks for
keys in two sources a quarter of the whole; value cuts and memtable lookups), the takes
(block key cuts) a fifth, the density estimates and the rest of the setup a fifth. A
block's first read by a table adds its checksum check and shape, about as much again as
the rest of that block's handling (zlib.crc32 of 4 KiB is most of it). The first scan
after a burst of writes also sorts the memtable's new keys (60,000: about 60 ms).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import chain, compress, repeat
from operator import is_not, itemgetter

from .sstable import TAKE_END, TAKE_MORE, TOMBSTONE, key_number

# Longer scans stream through merge.py: one go would hold the whole result in memory.
SHORT_SCAN_LIMIT = 1024
# Fewest candidates asked of any source in a first round: with fewer, the bound (the
# least far-reaching source) falls short of the limit too often, costing a second round.
MIN_CANDIDATES = 16
# Where the scan starts, a memtable's density is measured over this many keys, a table's
# over this many blocks (about 130 entries of 4 KiB blocks of 116-byte entries).
DENSITY_WINDOW = 32
DENSITY_BLOCKS = 4
# Candidates asked of a source, in percent of its share of `limit`. With densities measured
# where the scan starts no margin is needed: a table run's rest of a block is one, and a
# second round asks for the few keys missing only (125 % kept 35 % more candidates for
# 6 % fewer second rounds, and cost more than those rounds).
SHARE_PERCENT = 100

_key_of = itemgetter(0)
_value_of = itemgetter(1)


def short_scan(memtables, runs, run_entries, start, end, reverse: bool, limit: int) -> list:
    """At most `limit` (key, value) pairs of [start, end), in scan order, tombstones out.

    `memtables` and `runs` are newest first; `runs` are (tables, their smallest keys, their
    largest keys, tombstones) of non-overlapping tables sorted by key; `run_entries` their
    entry counts."""
    assert 0 < limit <= SHORT_SCAN_LIMIT
    # The round's start (forward) or end (reverse), and whether it is itself included.
    edge, inclusive = (start, True) if not reverse else (end, False)
    # Each source's share: its entries per unit of key space where the scan starts, measured
    # there (over DENSITY_WINDOW keys of a memtable, DENSITY_BLOCKS blocks of a table): a
    # level is dense where the last compaction into it landed and sparse elsewhere, and
    # levels may split the key space between them (then one level holds all of a short
    # range). A source of at most `limit` entries is taken whole; a few keys close together
    # would otherwise count as dense and squeeze the others' shares.
    densities = []
    wholes = []
    gaps = []  # (source, key space between the edge and its first key) of runs in a gap
    sorted_memtables = []  # (sorted keys, values by key) of each memtable holding any
    for memtable in memtables:
        keys = memtable.sorted_keys()
        # An empty memtable (the active one, just after a flush or an open) is no source:
        # a key it takes meanwhile is a concurrent write, which a scan may or may not see.
        if not keys:
            continue
        # Where the first round starts in it (the first key at or after `start`, forward;
        # the first at or after `end`, reverse: the keys before it are the candidates).
        position = (0 if not reverse else len(keys)) if edge is None else bisect_left(keys, edge)
        sorted_memtables.append((keys, memtable.data, position))
        if len(keys) <= limit:
            wholes.append(len(keys))
            densities.append(0.0)
            continue
        wholes.append(0)
        if not reverse:
            lo, hi = position, min(position + DENSITY_WINDOW, len(keys))
        else:
            lo, hi = max(position - DENSITY_WINDOW, 0), position
        densities.append(key_density(keys[lo], keys[hi - 1], hi - lo) if hi - lo > 1 else 0.0)
    run_starts = []  # (table, block) where each run's first take starts, when known
    for (tables, smallest, largest, _), entries in zip(runs, run_entries):
        if entries <= limit:
            wholes.append(entries)
            densities.append(0.0)
            run_starts.append(None)
            continue
        wholes.append(0)
        # The table the scan starts in or goes on into; none when the run lies wholly past
        # the edge.
        if edge is None:
            t = len(tables) - 1 if reverse else 0
        elif not reverse:
            t = bisect_left(largest, edge)
            if t == len(tables):
                densities.append(0.0)
                run_starts.append(None)
                continue
        else:
            t = bisect_left(smallest, edge) - 1
            if t < 0:
                densities.append(0.0)
                run_starts.append(None)
                continue
        density, gap, block = _table_density(tables[t], edge, reverse)
        run_starts.append((t, block))
        if gap:
            gaps.append((len(densities), gap))
        densities.append(density)
    if gaps:
        # A run whose keys begin `gap` away from the edge holds none of a range shorter than
        # that: it keeps the part of its share that lies past the gap, of the range that
        # all the densities suggest (`reach`: the key space holding `limit` entries).
        reach = limit / (sum(densities) or 1.0)
        for k, gap in gaps:
            densities[k] *= max(0.0, 1.0 - gap / reach)
    total = sum(densities) or 1.0
    share = limit * SHARE_PERCENT / (100 * total)  # candidates per unit of density
    counts = [max(MIN_CANDIDATES, whole, int(share * density) + 1) for density, whole in zip(densities, wholes)]
    growth = 1
    n_memtables = len(sorted_memtables)
    # Tables count their tombstones and memtables their deletes: most scans need no filter.
    runs_tombstones = any(run[3] for run in runs)
    items: list = []
    first_round = True
    while True:
        taken = []  # (pieces, more) per source, newest first
        if not reverse:
            for (keys, data, position), count in zip(sorted_memtables, counts):
                if not first_round:
                    position = bisect_right(keys, edge)
                taken.append(_memtable_forward(keys, data, position, end, count))
            for (tables, _, largest, _), count, start_at in zip(runs, counts[n_memtables:], run_starts):
                taken.append(_run_forward(tables, largest, edge, inclusive, end, count, start_at))
        else:
            for (keys, data, position), count in zip(sorted_memtables, counts):
                if not first_round:
                    position = bisect_left(keys, edge)
                taken.append(_memtable_backward(keys, data, position, start, count))
            for (tables, smallest, _, _), count, start_at in zip(runs, counts[n_memtables:], run_starts):
                taken.append(_run_backward(tables, smallest, edge, inclusive, start, count, start_at))
        pairs, bound = _merge(taken, reverse, runs_tombstones, memtables)
        if items:
            items += pairs[:limit - len(items)]
        else:
            items = pairs if len(pairs) <= limit else pairs[:limit]
        if len(items) == limit or bound is None:
            return items
        edge, inclusive, first_round = bound, False, False
        run_starts = [None] * len(runs)
        # The next round asks for the shares of what is missing (often a few keys), times
        # a growth that doubles every round (runs of tombstones need more candidates).
        share = (limit - len(items)) * growth * SHARE_PERCENT / (100 * total)
        counts = [max(MIN_CANDIDATES, whole, int(share * density) + 1) for density, whole in zip(densities, wholes)]
        growth *= 2


def _table_density(table, edge, reverse: bool) -> tuple[float, int, int]:
    """(entries per unit of key space over DENSITY_BLOCKS blocks of `table` from `edge` on
    (forward) or down (reverse), from the index alone (blocks hold about equal counts); the
    gap between `edge` and the table's first key (last key, reverse) when `edge` lies
    outside the table, else 0, in `key_number` units; the block a first round's take starts
    in, as `Table.take_forward` (`take_backward`) would find it).

        edge in a gap of its level:  edge ...gap... [table: b0 b1 b2 b3 ...]"""
    last_keys = table.last_keys
    numbers = table.key_numbers()  # numbers[b] is block b - 1's last key; [0] the smallest
    blocks = len(last_keys)
    gap = 0
    if not reverse:
        if edge is None or edge < table.smallest:
            b = 0
            if edge is not None:
                gap = numbers[0] - key_number(edge)
        else:
            b = bisect_left(last_keys, edge)
        c = min(b + DENSITY_BLOCKS, blocks)
    else:
        if edge is None or edge > table.largest:
            c = blocks
            if edge is not None:
                gap = key_number(edge) - numbers[c]
        else:
            c = min(bisect_left(last_keys, edge) + 1, blocks)
        b = max(c - DENSITY_BLOCKS, 0)
    return (c - b) * table.entries / (blocks * (numbers[c] - numbers[b] + 1)), gap, b if not reverse else c - 1


def key_density(smallest: bytes, largest: bytes, entries: int) -> float:
    """Entries per unit of key space between two keys (`key_number`: keys read as numbers
    from their first 8 bytes, 0 to 2^64): how thickly a source covers the range it spans."""
    return entries / (key_number(largest) - key_number(smallest) + 1)


# A source's candidates are pieces (owner, block, keys, i, j): keys[i:j] of a sorted
# sequence `keys` (a block's tuple or a memtable's sorted key list, never to be mutated),
# in key order across the pieces. A table's piece has the table as owner and its block
# number; a memtable's has the memtable's dict as owner and block None. Values are fetched
# by the merge, for the candidates it keeps only (`_values`).


def _merge(taken: list, reverse: bool, runs_tombstones: bool, memtables) -> tuple[list, bytes | None]:
    """(key, value) pairs up to the bound from every source, newest value per key, in scan
    order, tombstones out; and the bound (None when every source was taken whole).
    `runs_tombstones`: whether a table holds any; `memtables` tell whether they do."""
    bound = None
    if not reverse:
        for pieces, more in taken:
            if more and pieces:
                keys, j = pieces[-1][2], pieces[-1][4]
                if bound is None or keys[j - 1] < bound:
                    bound = keys[j - 1]
    else:
        for pieces, more in taken:
            if more and pieces:
                keys, i = pieces[0][2], pieces[0][3]
                if bound is None or keys[i] > bound:
                    bound = keys[i]
    key_parts = []
    value_parts = []
    for pieces, _ in reversed(taken):  # oldest first: newer values overwrite
        if not pieces:
            continue
        if bound is not None:
            # Cut at the bound, unless every candidate is on the near side of it.
            piece = pieces[-1] if not reverse else pieces[0]
            if (piece[2][piece[4] - 1] > bound) if not reverse else (piece[2][piece[3]] < bound):
                pieces = _up_to(pieces, bound, reverse)
        for owner, block, keys, i, j in pieces:
            key_parts.append(keys[i:j] if i or j != len(keys) else keys)
            if block is None:  # a memtable's dict: its values now, for the keys kept
                value_parts.append(list(map(owner.__getitem__, key_parts[-1])))
            else:
                value_parts.append(owner.block_values(block, i, j))
    if len(key_parts) == 1:
        pairs = list(zip(key_parts[0], value_parts[0]))
    elif len(set(chain.from_iterable(key_parts))) == sum(map(len, key_parts)):
        # No key in two sources (the usual case): sort the pairs themselves, one C-level
        # timsort merging the sources' sorted runs.
        pairs = sorted(chain.from_iterable(map(zip, key_parts, value_parts)), key=_key_of)
    else:
        merged: dict = {}
        for keys, values in zip(key_parts, value_parts):
            merged.update(zip(keys, values))
        keys = sorted(merged)
        pairs = list(zip(keys, map(merged.__getitem__, keys)))
    # Read after the values: a memtable counts a tombstone before it stores it, so one
    # fetched above (maybe just put, by a concurrent delete) is counted here.
    if runs_tombstones or any(m.deletes for m in memtables):
        pairs = list(compress(pairs, map(is_not, map(_value_of, pairs), repeat(TOMBSTONE))))
    if reverse:
        pairs.reverse()
    return pairs, bound


def _up_to(pieces: list, bound: bytes, reverse: bool) -> list:
    """The pieces cut to the keys at or below `bound` (forward), at or above it (reverse)."""
    if not reverse:
        kept = []
        for owner, block, keys, i, j in pieces:
            if keys[j - 1] <= bound:
                kept.append((owner, block, keys, i, j))
                continue
            j = bisect_right(keys, bound, i, j)
            if j > i:
                kept.append((owner, block, keys, i, j))
            break
        return kept
    kept = []
    for owner, block, keys, i, j in reversed(pieces):
        if keys[i] >= bound:
            kept.append((owner, block, keys, i, j))
            continue
        i = bisect_left(keys, bound, i, j)
        if j > i:
            kept.append((owner, block, keys, i, j))
        break
    kept.reverse()
    return kept


# Each taker returns (pieces, more): the source's candidates in key order, and whether the
# source may hold entries beyond them in scan direction.


def _memtable_forward(keys: list, data: dict, lo: int, end, count: int) -> tuple:
    """From keys[lo] on."""
    hi = lo + count
    more = hi < len(keys)
    if not more:
        hi = len(keys)
    if end is not None and lo < hi and keys[hi - 1] >= end:
        hi = bisect_left(keys, end, lo, hi)
        more = False
    return ([(data, None, keys, lo, hi)] if lo < hi else []), more


def _memtable_backward(keys: list, data: dict, hi: int, start, count: int) -> tuple:
    """Down from keys[hi - 1]."""
    lo = hi - count if hi > count else 0
    more = lo > 0
    if start is not None and lo < hi and keys[lo] < start:
        lo = bisect_left(keys, start, lo, hi)
        more = False
    return ([(data, None, keys, lo, hi)] if lo < hi else []), more


def _run_forward(tables, largest, after, inclusive: bool, end, count: int, start_at=None) -> tuple:
    """At least `count` candidates (when there are) from `after`: whole blocks but the first.
    `start_at`: (table, block) where they start, when the caller found it already."""
    block = None
    if start_at is not None:
        t, block = start_at
    elif after is None:
        t = 0
    else:
        t = bisect_left(largest, after) if inclusive else bisect_right(largest, after)
    pieces: list = []
    need = count
    while t < len(tables):
        need, found = tables[t].take_forward(after, inclusive, end, need, pieces, block)
        block = None
        if found == TAKE_END:
            return pieces, False
        t += 1
        if need <= 0:
            return pieces, found == TAKE_MORE or t < len(tables)
        after = None
    return pieces, False


def _run_backward(tables, smallest, before, inclusive: bool, start, count: int, start_at=None) -> tuple:
    """At least `count` candidates (when there are) up to `before`: whole blocks but the
    first. `start_at`: (table, block) where they start, when the caller found it already."""
    block = None
    if start_at is not None:
        t, block = start_at
    elif before is None:
        t = len(tables) - 1
    else:
        t = (bisect_right(smallest, before) if inclusive else bisect_left(smallest, before)) - 1
    pieces: list = []  # collected from the high end down; reversed at the end
    need = count
    more = False
    while t >= 0:
        need, found = tables[t].take_backward(before, inclusive, start, need, pieces, block)
        block = None
        if found == TAKE_END:
            break
        t -= 1
        if need <= 0:
            more = found == TAKE_MORE or t >= 0
            break
        before = None
    pieces.reverse()
    return pieces, more
