"""The `lsm` engine: a log-structured merge tree (O'Neil et al. 1996), shaped like LevelDB.

    put/delete/write --> WAL (append, CRC per record) --> memtable (dict, bounded by bytes)
                                                             | full: frozen, new WAL + memtable
                                                             v
                                  flush thread: immutable memtable --> level-0 SSTable
                                                             v
                        compaction thread: level L --> level L+1 (compaction.py)

    get:  memtable -> immutable memtables (newest first) -> level-0 tables (newest first)
          -> one table per deeper level; every table is skipped when its Bloom filter says no.
    scan: with a limit up to 1024 (a page), one slice of candidates from each of those and
          one sort (short_scan.py); longer scans, a chunked k-way merge (merge.py).

    >>> e = LSMEngine(tmp, memtable_bytes=1 << 20)
    >>> e.put(b"k", b"v"); e.flush(); e.compact(); e.get(b"k")
    b'v'

Concurrency. The current store is one immutable `_Version` (active memtable, immutable
memtables, levels of tables), replaced whole. Readers take the current version with one
attribute read and no lock; the tables it names stay open for as long as they hold it
(a table's file is unlinked when the last `Table` object referring to it is collected).
Writers serialise on `_lock` for the WAL append and the memtable store. Flush and
compaction do all their work (merging, writing, fsyncing the table and the manifest)
holding no lock that a reader or writer takes; they hold `_lock` only to swap in the new
version, which is a tuple assignment. Writers wait only when they outrun the background
threads: `max_immutable_memtables` memtables waiting to be flushed, or `l0_stop_writes`
level-0 tables waiting to be compacted (a bound on memory and on read cost).

Where the CPU work goes: a flush or compaction is seconds of pure-Python work (merging,
encoding blocks, building Bloom filters). In a thread it would hold the GIL against every
get and put (up to the 5 ms switch interval at a time: 12 ms p99 scans were measured).
So by default (`background_process=None`: when memtable_bytes >= 1 MiB) the flush and
compaction threads hand that work to two child processes (worker.py) and just wait for
the answer; tiny stores (tests) keep it in the threads.

Durability: sync="always" makes each write wait for an fsync of the WAL that it shares
with every concurrent writer (GroupCommit); "batch" fsyncs every `sync_interval_ms`;
"never" leaves it to the OS (the WAL is buffered in the process up to
`wal_buffer_bytes`, so a killed process loses at most that tail). Recovery replays the
WALs the manifest still needs; a torn tail is cut, logged and counted in `stats()`.

Files in the directory: `MANIFEST`, `NNNNNN.wal`, `NNNNNN.sst` (see engines/FORMATS.md); an open engine
holds an flock on the directory, so a second engine cannot open it.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import logging
from itertools import chain, compress, islice, repeat
from operator import is_not
import os
import struct
import threading
import time
import zlib
from bisect import bisect_left
from typing import Iterator, Sequence

from mmh3 import hash64 as _hash64  # the Bloom filters' hash (bloom.key_hash), inlined in get()

from ..base import (
    CorruptionError,
    EngineClosed,
    EngineError,
    EngineOptions,
    GroupCommit,
    InvalidArgument,
    PeriodicSyncer,
    check_batch,
    check_key,
    check_scan_args,
    check_value,
)
from . import manifest
from .compaction import MAX_LEVELS, CompactionPlan, full_plan, merge_runs, pick_compaction, plan_runs
from .memtable import Memtable
from .merge import memtable_chunks, merge_chunks, table_chunks
from .short_scan import SHORT_SCAN_LIMIT, short_scan
from .worker import WORKER_SUFFIX, WorkerClient, WorkerDied
from .sstable import TOMBSTONE, BlockCache, Table, write_table
from .wal import OP_DELETE, OP_PUT, WalWriter, encode_batch, replay

_pack_op = struct.Struct("<BII").pack  # the WAL's op header (wal.py), inlined in put()
_pack_record = struct.Struct("<II").pack  # the WAL's record header
_crc32 = zlib.crc32

log = logging.getLogger("capkv.engines.lsm")

_BASE_FIELDS = {f.name for f in dataclasses.fields(EngineOptions)}


@dataclasses.dataclass(frozen=True)
class LSMOptions:
    """The lsm engine's own options. Each bound says what it protects."""

    # A memtable is frozen and flushed when its keys and values reach this many bytes:
    # bounds memory (about 2.5x this in Python objects) and the WAL replayed on open.
    memtable_bytes: int = 8 * 1024 * 1024
    # Frozen memtables waiting for the flush thread; writers wait beyond this (memory bound).
    max_immutable_memtables: int = 2
    # Data block target size: a get reads and checksums one block.
    block_bytes: int = 4096
    bloom_bits_per_key: int = 10
    # Decoded data blocks kept in memory, counted by encoded size (in Python objects they take
    # about 1.8x that). Only blocks whose keys differ in length go through it: blocks of
    # keys of one length are read in place from the tables' mmaps (the OS page cache) by
    # gets and scans alike (engines/FORMATS.md). Compaction reads bypass it.
    block_cache_bytes: int = 64 * 1024 * 1024
    # Level 0 is merged into level 1 at this many tables; writers wait at l0_stop_writes
    # (every level-0 table costs every get a Bloom probe).
    l0_compaction_trigger: int = 4
    l0_stop_writes: int = 16
    level1_max_bytes: int = 32 * 1024 * 1024
    level_multiplier: int = 10
    # Compaction cuts its output into tables of about this size.
    target_file_bytes: int = 8 * 1024 * 1024
    # False: compaction runs only when compact() is called (tests, bulk loads).
    background_compaction: bool = True
    # In-process WAL buffer; sync="never" loses at most this much on a process kill.
    wal_buffer_bytes: int = 64 * 1024
    # Run flushes and compactions in two child processes (worker.py) instead of threads
    # of this one, where their CPU work would hold the GIL against gets and puts.
    # None: only when memtable_bytes >= 1 MiB (tiny stores are not worth two processes).
    background_process: bool | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "background_process":
                if value is not None and not isinstance(value, bool):
                    raise InvalidArgument(f"{field.name} must be True, False or None, not {value!r}")
            elif field.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise InvalidArgument(f"{field.name} must be True or False, not {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"{field.name} must be a positive integer, not {value!r}")
        if self.l0_stop_writes < self.l0_compaction_trigger:
            raise InvalidArgument("l0_stop_writes must be at least l0_compaction_trigger")
        if self.level_multiplier < 2:
            raise InvalidArgument("level_multiplier must be at least 2")


class _Version:
    """One consistent view of the store; never mutated once published."""

    __slots__ = ("mem", "imms", "levels", "deep", "runs", "run_entries", "scan_runs")

    def __init__(self, mem: Memtable, imms: tuple, levels: tuple) -> None:
        self.mem = mem
        self.imms = imms  # newest first
        self.levels = levels  # levels[0] newest first; deeper levels sorted by key
        # For gets: (tables, their largest keys) of each non-empty level >= 1.
        self.deep = tuple((tables, [t.largest for t in tables]) for tables in levels[1:] if tables)
        # For scans: the sorted runs of tables (each level-0 table, each deeper level), and
        # how many entries each holds.
        self.runs = [(t,) for t in levels[0]] + [tables for tables, _ in self.deep]
        self.run_entries = [sum(t.entries for t in run) for run in self.runs]
        # For short scans: each run with its tables' smallest and largest keys, and its
        # tombstones.
        self.scan_runs = [(run, [t.smallest for t in run], [t.largest for t in run], sum(t.tombstones for t in run))
                          for run in self.runs]


class _Cancelled(Exception):
    pass


def _file_name(number: int, suffix: str) -> str:
    return f"{number:06d}.{suffix}"


class LSMEngine:
    """See the module docstring. `path` is a directory, created if missing."""

    def __init__(self, path, **options) -> None:
        base = {k: v for k, v in options.items() if k in _BASE_FIELDS}
        own_names = {f.name for f in dataclasses.fields(LSMOptions)}
        unknown = sorted(set(options) - _BASE_FIELDS - own_names)
        if unknown:
            raise InvalidArgument(f"lsm engine: unknown option(s) {', '.join(unknown)}")
        self.options = EngineOptions(**base)
        self.lsm_options = LSMOptions(**{k: v for k, v in options.items() if k in own_names})
        self.path = os.fspath(path)
        self._closed = True  # until open succeeds
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = self._lock_directory()
        try:
            self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ------------------------------------------------------------------ opening

    def _lock_directory(self) -> int:
        # flock on the directory itself: no lock file to leave behind or to damage.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise EngineError(f"{self.path} is in use by another open lsm engine (its directory is locked)") from None
            raise
        return fd

    def _open(self) -> None:
        opts = self.lsm_options
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # writers waiting for flush/compaction
        self._fsync_lock = threading.Lock()
        self._manifest_lock = threading.Lock()  # serialises version edits (flush, compaction)
        self._compaction_lock = threading.Lock()  # one compaction at a time
        self._work = threading.Condition(threading.Lock())  # wakes the background threads
        self._closing = False
        self._background_error: BaseException | None = None
        self._cache = BlockCache(opts.block_cache_bytes)
        self._pointers: dict[int, bytes] = {}
        self._counters = dict(
            wal_bytes=0, flushes=0, flush_bytes=0,
            compactions=0, trivial_moves=0, compaction_bytes_read=0, compaction_bytes_written=0,
            tombstones_dropped=0, versions_dropped=0, write_stalls=0, write_stall_seconds=0.0,
            wal_torn_tails=0, wal_torn_bytes=0, wal_records_recovered=0, worker_failures=0,
        )
        self.torn_tails: list[dict] = []
        # Counted by every write, so plain attributes rather than dict entries.
        self._puts = self._deletes = self._batches = self._user_bytes = 0

        body = manifest.read(self.path)
        names = os.listdir(self.path)
        numbered: dict[str, list[int]] = {"wal": [], "sst": []}
        for name in names:
            stem, _, suffix = name.partition(".")
            if suffix in numbered and stem.isdigit():
                numbered[suffix].append(int(stem))
            elif name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))
        if body is None:
            if numbered["wal"] or numbered["sst"]:
                raise CorruptionError(os.path.join(self.path, manifest.MANIFEST_NAME), -1,
                                      "manifest is missing but log or table files exist")
            body = {"next_file": 1, "log_number": 0, "tables": []}
            manifest.write(self.path, body)
        levels: list[list[Table]] = [[] for _ in range(MAX_LEVELS)]
        live = set()
        for entry in body["tables"]:
            number, level = entry["file"], entry["level"]
            table_path = os.path.join(self.path, _file_name(number, "sst"))
            if level >= MAX_LEVELS:
                raise CorruptionError(os.path.join(self.path, manifest.MANIFEST_NAME), -1,
                                      f"table {number} at level {level}")
            table = Table(table_path, number, self._cache)
            if (table.size, table.entries, table.smallest.hex(), table.largest.hex()) != (
                entry["size"], entry["entries"], entry["smallest"], entry["largest"]
            ):
                raise CorruptionError(table_path, -1, "table does not match its manifest entry")
            levels[level].append(table)
            live.add(number)
        levels[0].sort(key=lambda t: -t.number)
        for level in levels[1:]:
            level.sort(key=lambda t: t.smallest)
        for number in numbered["sst"]:
            if number not in live:  # left by a flush or compaction that crashed before its manifest
                os.unlink(os.path.join(self.path, _file_name(number, "sst")))
        wal_numbers = []
        for number in sorted(numbered["wal"]):
            if number < body["log_number"]:
                os.unlink(os.path.join(self.path, _file_name(number, "wal")))
            else:
                wal_numbers.append(number)
        top = max(numbered["wal"] + numbered["sst"] + [0])
        self._numbers = itertools.count(max(body["next_file"], top + 1))

        memtable = self._recover(wal_numbers)
        self._wal_position = 0
        self._wal = self._new_wal()
        memtable.wal_numbers.append(self._wal.number)
        if self.options.sync != "never":
            manifest.sync_directory(self.path)
        self._version = _Version(memtable, (), tuple(tuple(level) for level in levels))
        self._group = GroupCommit(self._sync_wal)
        self._sync_always = self.options.sync == "always"
        self._syncer = (
            PeriodicSyncer(self._sync_wal, self.options.sync_interval_ms, name="capkv-lsm-syncer")
            if self.options.sync == "batch" else None
        )
        self._max_key = self.options.max_key_bytes
        self._max_value = self.options.max_value_bytes
        self._memtable_bytes = opts.memtable_bytes
        self._use_process = (opts.background_process if opts.background_process is not None
                             else opts.memtable_bytes >= 1024 * 1024)
        self._flush_worker = WorkerClient("capkv-lsm-flush-worker")
        self._compaction_worker = WorkerClient("capkv-lsm-compaction-worker")
        self._closed = False
        self._threads = [
            threading.Thread(target=self._flush_loop, name="capkv-lsm-flush", daemon=True),
            threading.Thread(target=self._compaction_loop, name="capkv-lsm-compaction", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if memtable.bytes >= self._memtable_bytes:
            with self._lock:
                self._freeze_locked()

    def _recover(self, wal_numbers: list[int]) -> Memtable:
        """Replay the logs the manifest still needs, oldest first, into one memtable.

        Only the newest log may end in a torn tail, which is cut (see `wal.replay`); damage
        anywhere else raises `CorruptionError`, so recovery never skips a write in the middle
        of the history: it yields all of it, or a prefix missing the torn last record.
        """
        memtable = Memtable()
        for number in wal_numbers:
            wal_path = os.path.join(self.path, _file_name(number, "wal"))
            memtable.wal_numbers.append(number)
            result = replay(wal_path, newest=number == wal_numbers[-1])
            for ops in result.batches:
                for kind, key, value in ops:
                    memtable.put(key, TOMBSTONE if kind == OP_DELETE else value)
            self._counters["wal_records_recovered"] += len(result.batches)
            if result.torn_bytes:
                self._counters["wal_torn_tails"] += 1
                self._counters["wal_torn_bytes"] += result.torn_bytes
                self.torn_tails.append({"path": wal_path, "offset": result.good_bytes,
                                        "bytes": result.torn_bytes, "reason": result.torn_reason})
                log.warning("%s: cut %d bytes of torn tail at byte %d (%s)", wal_path, result.torn_bytes,
                            result.good_bytes, result.torn_reason)
        return memtable

    def _new_wal(self) -> WalWriter:
        number = next(self._numbers)
        return WalWriter(os.path.join(self.path, _file_name(number, "wal")), number,
                         buffer_bytes=self.lsm_options.wal_buffer_bytes)

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        if type(key) is not bytes or not key or len(key) > self._max_key:
            key = check_key(key, self.options)
        if self._closed:
            raise EngineClosed("lsm engine is closed")
        version = self._version
        value = version.mem.data.get(key)
        if value is None:
            for memtable in version.imms:
                value = memtable.data.get(key)
                if value is not None:
                    break
            else:
                value = self._get_from_tables(version, key)
        return None if value is TOMBSTONE else value

    def _get_from_tables(self, version: _Version, key: bytes):
        """The newest value (maybe TOMBSTONE) of `key` in the version's tables, or None.

        The hot path of a random read, kept flat: the key is hashed once, and each candidate
        table's Bloom filter (bloom.py) is probed inline with that hash, since a method call
        per table would cost as much as the probe. Positions are (h1 + i * h2) mod m, as
        `BloomFilter.may_contain` computes them; `table.find` runs only when all pass."""
        h1, h2 = _hash64(key, 0, True, False)
        h1 >>= 34
        h2 >>= 34
        for table in version.levels[0]:
            bits = table.bloom_bits
            m = table.bloom_num_bits
            p = h1 % m
            if not bits[p >> 3] >> (p & 7) & 1:
                continue
            for _ in table.bloom_more_steps:
                p = (p + h2) % m
                if not bits[p >> 3] >> (p & 7) & 1:
                    break
            else:
                value = table.find(key)
                if value is not None:
                    return value
        for tables, largest in version.deep:
            i = bisect_left(largest, key)
            if i == len(tables):
                continue
            table = tables[i]
            if key < table.smallest:
                continue
            # The same probe as above.
            bits = table.bloom_bits
            m = table.bloom_num_bits
            p = h1 % m
            if not bits[p >> 3] >> (p & 7) & 1:
                continue
            for _ in table.bloom_more_steps:
                p = (p + h2) % m
                if not bits[p >> 3] >> (p & 7) & 1:
                    break
            else:
                value = table.find(key)
                if value is not None:
                    return value
        return None

    def scan(self, start=None, end=None, *, reverse=False, limit=None) -> Iterator[tuple[bytes, bytes]]:
        # The common call, a page of bytes keys, skips the general checks (which it passes).
        if not (type(limit) is int and limit >= 0 and (start is None or type(start) is bytes)
                and (end is None or type(end) is bytes)):
            check_scan_args(start, end, limit)
            start = None if start is None else bytes(start)
            end = None if end is None else bytes(end)
        if self._closed:
            raise EngineClosed("lsm engine is closed")
        if limit is not None and 0 < limit <= SHORT_SCAN_LIMIT:
            if start is not None and end is not None and start >= end:
                return iter(())
            # Short scans (the common case: a page of results) in one go, not streamed.
            version = self._version
            return iter(short_scan((version.mem,) + version.imms, version.scan_runs, version.run_entries,
                                   start, end, bool(reverse), limit))
        # The items of each chunk are handed out by C (chain), not by resuming a generator.
        return chain.from_iterable(self._scan_chunks(self._version, start, end, bool(reverse), limit))

    def _scan_chunks(self, version: _Version, start, end, reverse, limit):
        """Lists of (key, value) in scan order. Holds `version` (so its tables stay open)
        for as long as the iterator lives."""
        if limit == 0 or (start is not None and end is not None and start >= end):
            return
        # Each source's chunks hold about its share of the entries a short scan needs
        # (sources are sampled uniformly, roughly): one merge step then usually serves it,
        # without merging N times more entries than it returns.
        memtables = (version.mem,) + version.imms
        runs = version.runs
        sizes = [len(m) for m in memtables] + version.run_entries
        total = sum(sizes) or 1
        wanted = 256 if limit is None else min(limit + 1, 1024)
        chunks = [max(16, wanted * size * 5 // (4 * total)) for size in sizes]
        sources = [memtable_chunks(m, start, end, reverse, c) for m, c in zip(memtables, chunks)]
        sources += [table_chunks(run, start, end, reverse, c) for run, c in zip(runs, chunks[len(memtables):])]
        remaining = limit
        for keys, values in merge_chunks(sources, reverse):
            if self._closed:
                raise EngineClosed("lsm engine was closed during a scan")
            # Deleted keys out, at C speed: identity with the TOMBSTONE singleton.
            live = compress(zip(keys, values), map(is_not, values, repeat(TOMBSTONE)))
            items = list(live if remaining is None else islice(live, remaining))
            yield items
            if remaining is not None:
                remaining -= len(items)
                if remaining == 0:
                    return

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, value: bytes) -> None:
        # The hot path, kept flat: checks equivalent to check_key/check_value (which run,
        # and raise, for anything unusual), the WAL record built outside the lock.
        if (type(key) is not bytes or type(value) is not bytes or not key or len(key) > self._max_key
                or len(value) > self._max_value):
            key = check_key(key, self.options)
            value = check_value(value, self.options)
        payload = _pack_op(OP_PUT, len(key), len(value)) + key + value
        record = _pack_record(_crc32(payload), len(payload)) + payload
        with self._lock:
            if self._closed or self._background_error is not None:
                self._refuse_write()
            self._wal.append(record)
            memtable = self._version.mem
            # Memtable.put, inlined (a method call is a tenth of a put's cost); the value
            # is bytes, never TOMBSTONE, so its delete count does not change.
            data = memtable.data
            old = data.get(key)
            if old is None:
                memtable._arrivals.append(key)
                memtable.bytes += len(key) + len(value)
            else:
                memtable.bytes += len(value) - len(old)
            data[key] = value
            self._puts += 1
            self._user_bytes += len(key) + len(value)
            self._wal_position += len(record)
            position = self._wal_position
            if memtable.bytes >= self._memtable_bytes:
                self._freeze_locked()
        if self._sync_always:
            self._group.written(position)
            self._group.wait_durable(position)
        elif self._syncer is not None:
            self._syncer.mark_dirty()

    def _refuse_write(self):
        if self._closed:
            raise EngineClosed("lsm engine is closed")
        self._raise_background_error()

    def delete(self, key: bytes) -> None:
        self.write([("delete", key, None)])

    def write(self, batch: Sequence) -> None:
        ops = check_batch(batch, self.options)
        if not ops:
            return
        record = encode_batch(ops)
        with self._lock:
            if self._closed or self._background_error is not None:
                self._refuse_write()
            self._wal.append(record)
            memtable = self._version.mem
            for op, key, value in ops:
                if op == "put":
                    memtable.put(key, value)
                    self._puts += 1
                    self._user_bytes += len(key) + len(value)
                else:
                    memtable.put(key, TOMBSTONE)
                    self._deletes += 1
                    self._user_bytes += len(key)
            self._batches += 1
            self._wal_position += len(record)
            position = self._wal_position
            if memtable.bytes >= self._memtable_bytes:
                self._freeze_locked()
        self._after_write(position)

    def _after_write(self, position: int) -> None:
        if self._sync_always:
            self._group.written(position)
            self._group.wait_durable(position)
        elif self._syncer is not None:
            self._syncer.mark_dirty()

    def _raise_background_error(self):
        raise EngineError(f"lsm engine at {self.path} stopped writing after a background error: "
                          f"{self._background_error!r}") from self._background_error

    def _sync_wal(self, target: int | None = None) -> None:
        """GroupCommit's and PeriodicSyncer's sync_fn: the WAL up to now, to disk.

        The buffer moves to the OS under `_lock` (a memcpy); the fsync runs under
        `_fsync_lock` only, so writers keep appending meanwhile. A WAL rotated away in
        between was fsynced by the rotation (see `_freeze_locked`)."""
        with self._lock:
            wal = self._wal
            wal.flush_buffer()
        with self._fsync_lock:
            wal.fsync()

    def _freeze_locked(self) -> None:
        """Called with `_lock` held when the active memtable is full: hand it to the flush
        thread and start a new memtable and WAL. Waits (releasing `_lock`) while the
        background threads are too far behind."""
        opts = self.lsm_options
        waited_from = None
        while self._version.mem.bytes >= self._memtable_bytes and not self._closed:
            version = self._version
            behind = len(version.imms) >= opts.max_immutable_memtables or (
                opts.background_compaction and len(version.levels[0]) >= opts.l0_stop_writes)
            if not behind:
                old = self._wal
                with self._fsync_lock:
                    old.close(sync=self.options.sync != "never")
                self._wal = self._new_wal()
                memtable = Memtable((self._wal.number,))
                self._version = _Version(memtable, (version.mem,) + version.imms, version.levels)
                self._wake_background()
                break
            if self._background_error is not None:
                break
            if waited_from is None:
                waited_from = time.monotonic()
                self._counters["write_stalls"] += 1
            self._room.wait(timeout=1.0)
        if waited_from is not None:
            self._counters["write_stall_seconds"] += time.monotonic() - waited_from

    def _wake_background(self) -> None:
        with self._work:
            self._work.notify_all()

    def sync(self) -> None:
        if self._closed:
            raise EngineClosed("lsm engine is closed")
        if self._sync_always:
            self._group.sync_all()
        else:
            self._sync_wal()

    # ------------------------------------------------------------------ flush

    def flush(self) -> None:
        """Freeze the active memtable (if it holds anything) and wait until every frozen
        memtable is an SSTable. For tests and before a backup; writes continue meanwhile."""
        if self._closed:
            raise EngineClosed("lsm engine is closed")
        with self._lock:
            version = self._version
            # Wait for these memtables only: writers may freeze newer ones meanwhile.
            waiting_for = list(version.imms)
            if len(version.mem):
                while len(self._version.imms) >= self.lsm_options.max_immutable_memtables and not self._closed:
                    if self._background_error is not None:
                        self._raise_background_error()
                    self._room.wait(timeout=1.0)
                version = self._version
                old = self._wal
                with self._fsync_lock:
                    old.close(sync=self.options.sync != "never")
                self._wal = self._new_wal()
                self._version = _Version(Memtable((self._wal.number,)), (version.mem,) + version.imms,
                                         version.levels)
                waiting_for.append(version.mem)
                self._wake_background()
            while not self._closed and any(m in self._version.imms for m in waiting_for):
                if self._background_error is not None:
                    self._raise_background_error()
                self._room.wait(timeout=1.0)

    def _flush_loop(self) -> None:
        while True:
            with self._work:
                while not self._version.imms and not self._closing:
                    self._work.wait()
            if self._closing:
                return
            try:
                self._flush_one(self._version.imms[-1])
            except BaseException as exc:  # noqa: BLE001 - recorded and raised to writers
                self._fail(exc)
                return

    def _flush_one(self, memtable: Memtable) -> None:
        """Oldest immutable memtable -> level-0 table -> manifest -> swap -> delete its WALs."""
        table = None
        if len(memtable):
            number = next(self._numbers)
            table_path = os.path.join(self.path, _file_name(number, "sst"))
            opts = self.lsm_options
            written = False
            if self._use_process:
                written = self._flush_in_worker(memtable, table_path)
            if not written:
                keys, values = memtable.sorted_items()
                write_table(table_path, keys, values, block_bytes=opts.block_bytes,
                            bloom_bits_per_key=opts.bloom_bits_per_key)
            table = Table(table_path, number, self._cache)
        with self._manifest_lock:
            levels = list(self._version.levels)
            if table is not None:
                levels[0] = (table,) + levels[0]
            self._write_manifest(levels, exclude=memtable)
            # The manifest no longer needs these logs (its log_number is past them).
            for number in memtable.wal_numbers:
                try:
                    os.unlink(os.path.join(self.path, _file_name(number, "wal")))
                except FileNotFoundError:
                    pass
            with self._lock:
                current = self._version
                self._version = _Version(current.mem, tuple(m for m in current.imms if m is not memtable),
                                         tuple(levels))
                self._room.notify_all()
            self._counters["flushes"] += 1
            self._counters["flush_bytes"] += table.size if table else 0
        self._wake_background()

    def _flush_in_worker(self, memtable: Memtable, table_path: str) -> bool:
        """Have the flush worker write the frozen memtable's table; True when it is in
        place at `table_path`, False when the worker is unavailable (the caller writes it).

        The memtable's dict goes over unsorted (one C-level pickle); the worker sorts it,
        so this process spends no GIL time on sorting or on building key and value lists."""
        opts = self.lsm_options
        worker_path = table_path + WORKER_SUFFIX
        try:
            self._flush_worker.call("flush_memtable", path=worker_path, entries=memtable.data,
                                    block_bytes=opts.block_bytes, bloom_bits_per_key=opts.bloom_bits_per_key)
            os.replace(worker_path, table_path)
            return True
        except (WorkerDied, OSError) as exc:
            if self._closing:
                raise
            self._worker_unavailable(exc)
            return False

    def _write_manifest(self, levels, exclude: Memtable | None = None) -> None:
        """Called under `_manifest_lock` with the levels about to be published."""
        with self._lock:
            version = self._version
            memtables = [m for m in (version.mem,) + version.imms if m is not exclude]
        log_number = min(n for m in memtables for n in m.wal_numbers)
        body = {
            "next_file": next(self._numbers),
            "log_number": log_number,
            "tables": [
                {"file": t.number, "level": level, "size": t.size, "entries": t.entries,
                 "tombstones": t.tombstones, "smallest": t.smallest.hex(), "largest": t.largest.hex()}
                for level, tables in enumerate(levels) for t in tables
            ],
        }
        manifest.write(self.path, body)

    def _fail(self, exc: BaseException) -> None:
        if self._closing:
            return
        log.error("lsm engine at %s: background work failed: %r", self.path, exc)
        self._background_error = exc
        with self._lock:
            self._room.notify_all()

    # ------------------------------------------------------------------ compaction

    def compact(self) -> None:
        """Flush, then merge every table into one sorted run at the deepest level in use:
        drops every shadowed version and every tombstone (space amplification 1.0)."""
        self.flush()
        with self._compaction_lock:
            if self._closed:
                raise EngineClosed("lsm engine is closed")
            plan = full_plan(self._version.levels)
            if plan is not None:
                try:
                    self._run_compaction(plan)
                except _Cancelled:
                    raise EngineClosed("lsm engine was closed during compact()") from None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no frozen memtable waits for its flush and no compaction is due or
        running (tests and benchmarks, to measure a settled tree). False on timeout."""
        opts = self.lsm_options
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._closed:
                raise EngineClosed("lsm engine is closed")
            if self._background_error is not None:
                self._raise_background_error()
            version = self._version
            due = opts.background_compaction and pick_compaction(
                version.levels, l0_compaction_trigger=opts.l0_compaction_trigger,
                level1_max_bytes=opts.level1_max_bytes, multiplier=opts.level_multiplier,
                pointers=dict(self._pointers)) is not None
            if not version.imms and not due and not self._compaction_lock.locked():
                return True
            time.sleep(0.01)
        return False

    def _compaction_loop(self) -> None:
        opts = self.lsm_options
        while not self._closing:
            plan = None
            if opts.background_compaction and self._background_error is None:
                with self._compaction_lock:
                    plan = pick_compaction(
                        self._version.levels, l0_compaction_trigger=opts.l0_compaction_trigger,
                        level1_max_bytes=opts.level1_max_bytes, multiplier=opts.level_multiplier,
                        pointers=self._pointers)
                    if plan is not None:
                        try:
                            self._run_compaction(plan)
                        except _Cancelled:
                            return
                        except BaseException as exc:  # noqa: BLE001 - recorded and raised to writers
                            self._fail(exc)
                            return
            if plan is None:
                with self._work:
                    if not self._closing:
                        self._work.wait(timeout=1.0)

    def _run_compaction(self, plan: CompactionPlan) -> None:
        """Merge the plan's inputs into new tables of its output level, then swap them in.

        Readers and writers are not blocked: the merge reads immutable tables; only the
        final version swap takes `_lock`."""
        opts = self.lsm_options
        outputs: list[Table] = []
        if plan.level >= 0:
            self._pointers[plan.level] = max(t.largest for t in plan.inputs if t in self._version.levels[plan.level])
        if not plan.move:
            level_of = {t.number: i for i, tables in enumerate(self._version.levels) for t in tables}
            runs = plan_runs(plan, level_of)
            result = None
            if self._use_process:
                try:
                    outputs, result = self._merge_in_worker(plan, runs)
                except (WorkerDied, OSError) as exc:
                    self._worker_unavailable(exc)
            if result is None:
                result = merge_runs(runs, drop_tombstones=plan.drop_tombstones,
                                    target_file_bytes=opts.target_file_bytes, write_output=self._write_output,
                                    should_stop=lambda: self._closing)
                outputs = result["outputs"]
                if result["stopped"]:
                    for table in outputs:
                        table.mark_obsolete()
                    raise _Cancelled()
            entries_in = sum(t.entries for t in plan.inputs)
            self._counters["tombstones_dropped"] += result["tombstones_dropped"]
            self._counters["versions_dropped"] += entries_in - result["entries_out"] - result["tombstones_dropped"]
            self._counters["compaction_bytes_read"] += sum(t.size for t in plan.inputs)
            self._counters["compaction_bytes_written"] += sum(t.size for t in outputs)
        removed = {t.number for t in plan.inputs}
        with self._manifest_lock:
            levels = [tuple(t for t in tables if t.number not in removed) for tables in self._version.levels]
            landing = outputs if not plan.move else list(plan.inputs)
            levels[plan.output_level] = tuple(sorted(levels[plan.output_level] + tuple(landing),
                                                     key=lambda t: t.smallest))
            self._write_manifest(levels)
            with self._lock:
                current = self._version
                self._version = _Version(current.mem, current.imms, tuple(levels))
                self._room.notify_all()
        if plan.move:
            self._counters["trivial_moves"] += 1
        else:
            self._counters["compactions"] += 1
            for table in plan.inputs:
                table.mark_obsolete()

    def _worker_unavailable(self, exc: BaseException) -> None:
        """A worker process could not start or died: do the work in this process from now on."""
        log.warning("lsm engine at %s: background worker process failed (%r); flushing and compacting "
                    "in threads instead", self.path, exc)
        self._use_process = False
        self._counters["worker_failures"] += 1

    def _merge_in_worker(self, plan: CompactionPlan, runs: list) -> tuple[list, dict]:
        """merge_runs in the compaction worker; its outputs renamed into place and opened."""
        opts = self.lsm_options
        # Numbers for every table the merge may write: each but the last holds at least
        # target_file_bytes of keys and values, which the inputs' sizes bound.
        count = sum(t.size for t in plan.inputs) // opts.target_file_bytes + 2
        names = [os.path.join(self.path, _file_name(next(self._numbers), "sst")) for _ in range(count)]
        try:
            result = self._compaction_worker.call(
                "compact", runs=[[t.path for t in run] for run in runs],
                output_paths=[name + WORKER_SUFFIX for name in names], drop_tombstones=plan.drop_tombstones,
                block_bytes=opts.block_bytes, bloom_bits_per_key=opts.bloom_bits_per_key,
                target_file_bytes=opts.target_file_bytes)
        except BaseException:
            for name in names:
                for leftover in (name + WORKER_SUFFIX, name + WORKER_SUFFIX + ".tmp"):
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass
            if self._closing:
                raise _Cancelled() from None
            raise
        outputs = []
        for worker_path, _meta in result["outputs"]:
            table_path = worker_path[: -len(WORKER_SUFFIX)]
            os.replace(worker_path, table_path)
            number = int(os.path.basename(table_path).partition(".")[0])
            outputs.append(Table(table_path, number, self._cache))
        return outputs, result

    def _write_output(self, keys: list, values: list) -> Table:
        number = next(self._numbers)
        table_path = os.path.join(self.path, _file_name(number, "sst"))
        opts = self.lsm_options
        write_table(table_path, keys, values, block_bytes=opts.block_bytes, bloom_bits_per_key=opts.bloom_bits_per_key)
        return Table(table_path, number, self._cache)

    # ------------------------------------------------------------------ closing, stats, checks

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        if self._syncer is not None:
            self._syncer.stop()
        self._closing = True
        self._wake_background()
        # A merge in a worker is abandoned (its outputs are .tmp files, deleted on open);
        # a flush is too: its WAL is still there and is replayed on open.
        self._compaction_worker.kill()
        self._flush_worker.kill()
        for thread in self._threads:
            thread.join()
        self._compaction_worker.close()
        self._flush_worker.close()
        with self._lock, self._fsync_lock:
            self._wal.close(sync=self.options.sync != "never")
        if self._sync_always:
            self._group.reset(self._wal_position)
        os.close(self._lock_fd)
        # Let go of the tables (their files close once no scan still holds them).
        self._version = _Version(Memtable(), (), tuple(() for _ in range(MAX_LEVELS)))
        self._cache = BlockCache(self._cache.capacity_bytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        version = self._version
        memtables = (version.mem,) + version.imms
        tables = [t for level in version.levels for t in level]
        disk_bytes = 0
        try:
            for name in os.listdir(self.path):
                try:
                    disk_bytes += os.stat(os.path.join(self.path, name)).st_size
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
        counters = dict(self._counters)
        counters.update(puts=self._puts, deletes=self._deletes, batches=self._batches, user_bytes=self._user_bytes)
        counters["wal_bytes"] = self._wal_position
        written = counters["wal_bytes"] + counters["flush_bytes"] + counters["compaction_bytes_written"]
        return {
            "engine": "lsm",
            "closed": self._closed,
            "sync": self.options.sync,
            "memtable_bytes": version.mem.bytes,
            "memtable_entries": len(version.mem),
            "immutable_memtables": len(version.imms),
            "memtable_total_bytes": sum(m.bytes for m in memtables),
            "tables_per_level": [len(level) for level in version.levels],
            "bytes_per_level": [sum(t.size for t in level) for level in version.levels],
            "table_entries": sum(t.entries for t in tables),
            "table_tombstones": sum(t.tombstones for t in tables),
            "table_bytes": sum(t.size for t in tables),
            "disk_bytes": disk_bytes,
            "write_amplification": round(written / counters["user_bytes"], 3) if counters["user_bytes"] else 0.0,
            "fsyncs": self._group.fsyncs,
            "block_cache_misses": self._cache.misses,
            "background_error": repr(self._background_error) if self._background_error else None,
            "background_process": self._use_process,
            **counters,
        }

    def _check(self) -> None:
        """Assert the invariants: memtable accounting, table key order, level shape, and
        that the manifest on disk names exactly the tables in use, which exist."""
        with self._manifest_lock:
            with self._lock:
                version = self._version
                for memtable in (version.mem,) + version.imms:
                    memtable._check()
            levels = version.levels
            assert len(levels) == MAX_LEVELS
            numbers = [t.number for t in levels[0]]
            assert numbers == sorted(numbers, reverse=True), "level 0 must be newest first"
            for level, tables in enumerate(levels):
                for table in tables:
                    assert table.smallest <= table.largest
                    table._check()
                if level >= 1:
                    for left, right in zip(tables, tables[1:]):
                        assert left.largest < right.smallest, f"level {level} overlaps: {left} {right}"
            body = manifest.read(self.path)
            on_disk = {(t["file"], t["level"]) for t in body["tables"]}
            in_use = {(t.number, level) for level, tables in enumerate(levels) for t in tables}
            assert on_disk == in_use, f"manifest {sorted(on_disk)} != tables in use {sorted(in_use)}"
            for level, tables in enumerate(levels):
                for table in tables:
                    assert os.path.getsize(table.path) == table.size, f"{table.path} changed size"
            wal_needed = {n for m in (version.mem,) + version.imms for n in m.wal_numbers}
            assert body["log_number"] <= min(wal_needed)
            for number in wal_needed:
                assert os.path.exists(os.path.join(self.path, _file_name(number, "wal"))), f"WAL {number} missing"
        self._cache._check()
