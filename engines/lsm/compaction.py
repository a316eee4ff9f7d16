"""Leveled compaction: which tables to merge next (pure), and the merge itself.

The shape is LevelDB's (O'Neil et al. 1996, "The Log-Structured Merge-Tree"; LevelDB's
doc/impl.md): level 0 holds flushed memtables, which may overlap; every level L >= 1 is
one sorted run of non-overlapping tables, at most `level1_max_bytes * multiplier^(L-1)`
bytes. When level 0 has `l0_compaction_trigger` tables, all of them are merged with the
level-1 tables they overlap; when a level L >= 1 is over its size, one of its tables
(round robin over the key space) is merged with the level L+1 tables it overlaps.

    L0: [a..z] [c..q]        L0: []
    L1: [a..f] [g..m] [n..z]  ->  L1: [a..h] [i..p] [q..z]   (every version but the newest dropped)

A merge keeps the newest version of each key. It drops a tombstone when no level below
the output holds the key's range: nothing older can resurface, so the delete has done
its work.

Amplification (n = bytes of live data, f = multiplier = 10 by default):
  - write: each byte is written to the log, flushed to level 0, then rewritten once per
    level it descends through, and each time it joins about f bytes of the next level, so
    about 2 + f/2 * levels in the worst steady state (LevelDB measures 10-20 on random
    writes; ours is lower while the tree has few levels). `stats()["write_amplification"]`
    reports the measured figure.
  - space: the last level holds about f/(f+1) of all data, so at most about 1 + 1/f = 1.1
    times the live data, plus up to level 0 and the memtables of not yet merged overwrites;
    `compact()` merges everything into the last level: space amplification 1.0.
  - read: a get checks the memtables, every level-0 table (at most `l0_stop_writes`) and
    one table per deeper level, skipping most by Bloom filter.

`pick_compaction` takes the level lists and returns a plan; it does no I/O.
"""
from __future__ import annotations

import dataclasses
from itertools import repeat
from operator import is_

from .merge import merge_chunks, table_chunks
from .sstable import TOMBSTONE

MAX_LEVELS = 7
# Entries a compaction merges per step: amortises the Python work of a step.
COMPACTION_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class CompactionPlan:
    """Merge `inputs` (newest first) into `output_level`; `move` if one table only changes level."""

    level: int
    output_level: int
    inputs: tuple
    drop_tombstones: bool
    move: bool = False
    reason: str = ""


def level_max_bytes(level: int, level1_max_bytes: int, multiplier: int) -> int:
    return level1_max_bytes * multiplier ** (level - 1)


def overlapping(tables, smallest: bytes, largest: bytes) -> list:
    """The tables whose key range meets [smallest, largest]."""
    return [t for t in tables if not (t.largest < smallest or t.smallest > largest)]


def key_range(tables) -> tuple[bytes, bytes]:
    return min(t.smallest for t in tables), max(t.largest for t in tables)


def is_bottom(levels, output_level: int, smallest: bytes, largest: bytes) -> bool:
    """True when no level below `output_level` holds a key in [smallest, largest]."""
    return not any(overlapping(levels[deeper], smallest, largest) for deeper in range(output_level + 1, len(levels)))


def pick_compaction(
    levels,
    *,
    l0_compaction_trigger: int,
    level1_max_bytes: int,
    multiplier: int,
    pointers: dict,
) -> CompactionPlan | None:
    """The most urgent compaction, or None when every level is within its budget.

    `levels[0]` is newest first; deeper levels are sorted by key. `pointers[level]` is the
    largest key of the table last compacted out of that level (round robin).

        >>> pick_compaction([[], []], l0_compaction_trigger=4, level1_max_bytes=10, multiplier=10,
        ...                 pointers={}) is None
        True
    """
    best_level, best_score = -1, 1.0
    if levels[0]:
        score = len(levels[0]) / l0_compaction_trigger
        if score >= best_score:
            best_level, best_score = 0, score
    for level in range(1, len(levels) - 1):
        size = sum(t.size for t in levels[level])
        score = size / level_max_bytes(level, level1_max_bytes, multiplier)
        if score > best_score:
            best_level, best_score = level, score
    if best_level < 0:
        return None
    if best_level == 0:
        chosen = list(levels[0])
    else:
        tables = levels[best_level]
        pointer = pointers.get(best_level)
        chosen = [next((t for t in tables if pointer is None or t.smallest > pointer), tables[0])]
    return plan_for(levels, best_level, chosen, reason=f"level {best_level} score {best_score:.2f}")


def plan_for(levels, level: int, chosen: list, reason: str = "") -> CompactionPlan:
    """Merge `chosen` (tables of `level`) with what they overlap one level down."""
    output_level = level + 1
    smallest, largest = key_range(chosen)
    below = overlapping(levels[output_level], smallest, largest)
    inputs = tuple(chosen) + tuple(below)
    smallest, largest = key_range(inputs)
    bottom = is_bottom(levels, output_level, smallest, largest)
    move = len(chosen) == 1 and not below and not (bottom and chosen[0].tombstones)
    return CompactionPlan(level, output_level, inputs, bottom, move, reason)


def full_plan(levels) -> CompactionPlan | None:
    """Everything into one sorted run at the deepest level in use (at least 1): `compact()`."""
    inputs = tuple(t for level in levels for t in level)
    if not inputs:
        return None
    output_level = max(1, max(i for i, level in enumerate(levels) if level))
    if len(inputs) == 1 and output_level >= 1 and not inputs[0].tombstones and not levels[0]:
        return None  # already one clean sorted run
    return CompactionPlan(-1, output_level, inputs, True, False, "full compaction")


def merge_runs(runs, *, drop_tombstones: bool, target_file_bytes: int, write_output, should_stop=None) -> dict:
    """Merge sorted runs of tables (newest run first) and write the result in tables of
    about `target_file_bytes` through `write_output(keys, values)`.

    Keeps the newest version of every key, drops tombstones if `drop_tombstones`.
    `should_stop()` is asked between steps; True abandons the merge ("stopped" in the result).
    Returns {"outputs": [what write_output returned], "entries_out", "tombstones_dropped", "stopped"}.
    Runs in the engine process or in the worker process (worker.py) alike.
    """
    sources = [table_chunks(run, None, None, False, COMPACTION_CHUNK, False) for run in runs]
    outputs = []
    pending_keys: list = []
    pending_values: list = []
    pending_bytes = 0
    entries_out = tombstones_dropped = 0
    for keys, values in merge_chunks(sources):
        if should_stop is not None and should_stop():
            return {"outputs": outputs, "entries_out": entries_out, "tombstones_dropped": tombstones_dropped,
                    "stopped": True}
        if drop_tombstones and any(map(is_, values, repeat(TOMBSTONE))):
            kept = [(k, v) for k, v in zip(keys, values) if v is not TOMBSTONE]
            tombstones_dropped += len(keys) - len(kept)
            keys = [k for k, _ in kept]
            values = [v for _, v in kept]
        pending_keys += keys
        pending_values += values
        pending_bytes += sum(map(len, keys)) + sum(map(len, values))
        if pending_bytes >= target_file_bytes:
            outputs.append(write_output(pending_keys, pending_values))
            entries_out += len(pending_keys)
            pending_keys, pending_values, pending_bytes = [], [], 0
    if pending_keys:
        outputs.append(write_output(pending_keys, pending_values))
        entries_out += len(pending_keys)
    return {"outputs": outputs, "entries_out": entries_out, "tombstones_dropped": tombstones_dropped,
            "stopped": False}


def plan_runs(plan: CompactionPlan, level_of: dict) -> list[list]:
    """The plan's inputs as sorted runs, newest first: each level-0 table alone (newest
    first), then the tables of each deeper level together, in key order."""
    by_level: dict[int, list] = {}
    for table in plan.inputs:
        by_level.setdefault(level_of[table.number], []).append(table)
    runs = []
    for level in sorted(by_level):
        tables = by_level[level]
        if level == 0:
            runs += [[t] for t in sorted(tables, key=lambda t: -t.number)]
        else:
            runs.append(sorted(tables, key=lambda t: t.smallest))
    return runs
