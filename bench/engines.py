"""Engine benchmark: the same workloads through capkv's engines and, side by side on the
same machine, reference stores: LevelDB (`plyvel`) and RocksDB (`rocksdict`) when they are
importable, and `bitcask-sketch` (always).

    python -m bench.engines                         # memory,hash,lsm; n=1,000,000
    python -m bench.engines --engines lsm --n 200000
    python -m bench.engines --engines hash --reference bitcask-sketch
    python -m bench.engines --quick                 # smoke run: n=20,000, 1 s sync phases

One JSON line per (engine, workload) on stdout, as each finishes:

    {"engine": "lsm", "workload": "fill", "ops": 1000000, "seconds": 41.2, "ops_per_s": 24271,
     "p50_us": 35.1, "p99_us": 120.4, "n": 1000000, "sync": "never", "ratio_vs_leveldb": 0.11}

Workloads, in order, on one directory per engine (16-byte random keys, 100-byte random,
incompressible values, one operation per call, no batching):

- `fill`: n puts of distinct random keys, sync="never".
- `read_hit` / `read_miss`: random gets of keys that are / are not there.
- `scan100`: scans of 100 keys from a random existing key.
- `overwrite`: n puts over random existing keys.
- `compact`: the engine's own flush/compact/merge (full compaction for the references),
  then `space`: `disk_bytes / live_bytes` (live = distinct keys * 116 bytes).
- `reopen`: close, then open again (seconds for each; a few reads check the data).
- `sync_write_1t` / `sync_write_8t`: a fresh directory with sync="always" (fsync before
  every acknowledgement), 1 and 8 writer threads, for `--sync-seconds` each.

`ratio_vs_leveldb` / `ratio_vs_rocksdb` on capkv's lines compare with the reference's line
for the same workload: for throughput lines it is capkv ops/s over the reference's (above
1 means capkv is faster); for `space` it is capkv's amplification over the reference's, and
for `compact` and `reopen` capkv's seconds over the reference's (above 1 means capkv is
worse). Latencies are per call, measured with perf_counter_ns around each call.
This is a measurement, never a timed test.

`bitcask-sketch` (`BitcaskSketchStore`) calibrates the machine: the least a Bitcask in
Python can do. A dict keydir of `(offset, size)`, records of fields | key | value | crc32
appended to a bytearray written out every 64 KiB, gets that slice the value out of an mmap
of the file. No CRC check on read, no lock, no hint files, no merge, no durability
options, a keydir that is lost at close; so it runs fill, read_hit, read_miss and overwrite
only. Issue #2's absolute hash goals (fill and read-random >= 500,000 ops/s) came from such
a sketch at a fast moment of this machine (800,000 puts/s, 640,000 gets/s), and the same
sketch has measured 420,000 to 610,000 puts/s here minutes apart since: absolute figures
follow the machine's load, CPU frequency and neighbours. The ratio to the sketch, measured
minutes apart in the same run, is the machine-independent figure: the goals are
`ratio_vs_bitcask_sketch` >= 0.625 for `fill` (500k / 800k) and >= 0.78 for `read_hit`
(500k / 640k).
"""
from __future__ import annotations

import argparse
import array
import json
import mmap
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from itertools import cycle, islice
from zlib import crc32

KEY_BYTES = 16
VALUE_BYTES = 100
CAPKV_ENGINES = ("memory", "hash", "lsm")
REFERENCES = ("leveldb", "rocksdb", "bitcask-sketch")


# ------------------------------------------------------------------------ adapters


class CapkvStore:
    """capkv engine through `engines.open_engine`."""

    def __init__(self, kind: str, path: str | None, sync: str) -> None:
        from engines import open_engine

        self.kind = kind
        self.path = path
        self.sync_mode = sync
        self.persistent = kind != "memory"
        self.scannable = True
        self.durable = True
        self.engine = open_engine(kind, path, sync=sync)

    def put(self, key: bytes, value: bytes) -> None:
        self.engine.put(key, value)

    def get(self, key: bytes):
        return self.engine.get(key)

    def put_fn(self):
        return self.engine.put

    def get_fn(self):
        return self.engine.get

    def scan(self, start: bytes, count: int) -> int:
        return sum(1 for _ in self.engine.scan(start, limit=count))

    def compact(self) -> None:
        for name in ("flush", "compact", "merge"):
            method = getattr(self.engine, name, None)
            if callable(method):
                method()
        for name in ("wait_idle", "wait_for_compactions", "wait_background"):
            method = getattr(self.engine, name, None)
            if callable(method):
                method()
                break

    def close(self) -> None:
        self.engine.close()

    def reopen(self) -> None:
        from engines import open_engine

        self.engine = open_engine(self.kind, self.path, sync=self.sync_mode)

    def stats(self) -> dict:
        return self.engine.stats()


class LevelDBStore:
    def __init__(self, path: str, sync: str) -> None:
        import plyvel

        self._plyvel = plyvel
        self.path = path
        self.persistent = True
        self.scannable = True
        self.durable = True
        self.sync = sync == "always"
        self.db = plyvel.DB(path, create_if_missing=True)

    def put(self, key, value):
        self.db.put(key, value, sync=self.sync)

    def get(self, key):
        return self.db.get(key)

    def put_fn(self):
        return self.put if self.sync else self.db.put

    def get_fn(self):
        return self.db.get

    def scan(self, start, count):
        it = self.db.iterator(start=start)
        try:
            return sum(1 for _ in islice(it, count))
        finally:
            it.close()

    def compact(self):
        self.db.compact_range()

    def close(self):
        self.db.close()

    def reopen(self):
        self.db = self._plyvel.DB(self.path, create_if_missing=True)

    def stats(self) -> dict:
        return {}


class RocksDBStore:
    def __init__(self, path: str, sync: str) -> None:
        import rocksdict

        self._rocksdict = rocksdict
        self.path = path
        self.persistent = True
        self.scannable = True
        self.durable = True
        self.write_options = rocksdict.WriteOptions()
        self.write_options.sync = sync == "always"
        self._open()

    def _open(self):
        options = self._rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        self.db = self._rocksdict.Rdict(self.path, options=options)
        self.db.set_write_options(self.write_options)

    def put(self, key, value):
        self.db.put(key, value)

    def get(self, key):
        return self.db.get(key)

    def put_fn(self):
        return self.db.put

    def get_fn(self):
        return self.db.get

    def scan(self, start, count):
        it = self.db.iter()
        it.seek(start)
        seen = 0
        while seen < count and it.valid():
            it.key()
            it.value()
            seen += 1
            it.next()
        del it
        return seen

    def compact(self):
        self.db.compact_range(None, None)

    def close(self):
        self.db.close()

    def reopen(self):
        self._open()

    def stats(self) -> dict:
        return {}


_SKETCH_FIELDS = struct.Struct("<BII").pack  # kind, key length, value length
_SKETCH_CRC = struct.Struct("<I").pack
_SKETCH_BUFFER_BYTES = 1 << 16


class BitcaskSketchStore:
    """The calibration reference (module docstring): a Bitcask with nothing but the
    essentials, so its figures say how fast this machine is at this moment.

    put: a record `kind | key_len | value_len | key | value | crc32` appended to a buffer
    that is written to the file at 64 KiB; keydir[key] = (offset, size). get: one dict
    lookup and one slice of the value from an mmap of the file (written and mapped again
    when a get asks past the map, i.e. once after a fill). No CRC check on read, no lock,
    no hints or merge, no fsync; the keydir is gone at close."""

    persistent = False  # no compact, space or reopen lines: its keydir is not kept
    scannable = False   # a hash has no key order
    durable = False     # no sync="always": nothing to fsync for

    def __init__(self, path: str, sync: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.file = open(os.path.join(path, "sketch.data"), "wb+")  # buffered: writes whole
        self.keydir: dict[bytes, tuple[int, int]] = {}
        self.buffer = bytearray()
        self.size = 0      # bytes appended: written + buffered
        self.mm: mmap.mmap | None = None
        self.mapped = 0

    def put(self, key: bytes, value: bytes) -> None:
        body = _SKETCH_FIELDS(1, len(key), len(value)) + key + value
        crc = _SKETCH_CRC(crc32(body))
        offset = self.size
        size = len(body) + 4
        self.keydir[key] = (offset, size)
        self.size = offset + size
        buffer = self.buffer
        buffer += body
        buffer += crc
        if len(buffer) >= _SKETCH_BUFFER_BYTES:
            self.file.write(buffer)
            buffer.clear()

    def get(self, key: bytes):
        entry = self.keydir.get(key)
        if entry is None:
            return None
        offset, size = entry
        end = offset + size
        if end > self.mapped:
            self._map()
        return self.mm[offset + 9 + len(key):end - 4]

    def _map(self) -> None:
        self.file.write(self.buffer)
        self.buffer.clear()
        self.file.flush()
        if self.mm is not None:
            self.mm.close()
        self.mm = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.mapped = len(self.mm)

    def put_fn(self):
        return self.put

    def get_fn(self):
        return self.get

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.file.close()

    def stats(self) -> dict:
        return {}


def available_references() -> list[str]:
    out = []
    for name, module in (("leveldb", "plyvel"), ("rocksdb", "rocksdict")):
        try:
            __import__(module)
            out.append(name)
        except ImportError:
            pass
    out.append("bitcask-sketch")  # pure Python: always there
    return out


def open_store(engine: str, path: str, sync: str):
    if engine in CAPKV_ENGINES:
        return CapkvStore(engine, None if engine == "memory" else path, sync)
    if engine == "leveldb":
        return LevelDBStore(path, sync)
    if engine == "rocksdb":
        return RocksDBStore(path, sync)
    if engine == "bitcask-sketch":
        return BitcaskSketchStore(path, sync)
    raise ValueError(f"unknown engine {engine!r}")


# ------------------------------------------------------------------------ measuring


def percentile_us(latencies_ns, fraction: float) -> float:
    """The `fraction` percentile of sorted latencies, in microseconds (nearest rank)."""
    if not latencies_ns:
        return 0.0
    index = min(len(latencies_ns) - 1, max(0, int(round(fraction * len(latencies_ns))) - 1))
    return round(latencies_ns[index] / 1000.0, 2)


def result(engine: str, workload: str, ops: int, seconds: float, latencies_ns=None, **extra) -> dict:
    line = {
        "engine": engine,
        "workload": workload,
        "ops": ops,
        "seconds": round(seconds, 4),
        "ops_per_s": round(ops / seconds, 1) if seconds > 0 else None,
    }
    if latencies_ns is not None:
        ordered = sorted(latencies_ns)
        line["p50_us"] = percentile_us(ordered, 0.50)
        line["p99_us"] = percentile_us(ordered, 0.99)
    line.update(extra)
    return line


def directory_bytes(path: str) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Values:
    """100-byte random values sliced from one random buffer: cheap to make, incompressible.

    `pool` holds 65,536 of them, made before any timed loop and cycled through by the put
    loops, so a timed put costs the store's call and nothing of the harness's making."""

    POOL = 1 << 16

    def __init__(self, rng: random.Random, size: int = VALUE_BYTES) -> None:
        self._buffer = rng.randbytes(1 << 20)
        self._rng = rng
        self._size = size
        self.pool = [self.next() for _ in range(self.POOL)]

    def next(self) -> bytes:
        offset = self._rng.randrange(len(self._buffer) - self._size)
        return self._buffer[offset : offset + self._size]


# The timed loops call the store's own bound method (a capkv engine's `put`, plyvel's
# `DB.put`) with nothing between the two clock reads but that call. A generic loop (a
# lambda per call, a value made per call, an adapter method) cost about 0.9 us per
# operation here, as much as a whole hash-engine get: it measured the harness.


def timed_puts(put, keys, values: Values) -> tuple[float, array.array]:
    latencies = array.array("q")
    record = latencies.append
    clock = time.perf_counter_ns
    start = clock()
    for key, value in zip(keys, cycle(values.pool)):
        t0 = clock()
        put(key, value)
        record(clock() - t0)
    return (clock() - start) / 1e9, latencies


def timed_gets(get, keys) -> tuple[float, array.array, int]:
    """(seconds, latencies, how many keys were found)."""
    latencies = array.array("q")
    record = latencies.append
    clock = time.perf_counter_ns
    missing = 0
    start = clock()
    for key in keys:
        t0 = clock()
        value = get(key)
        record(clock() - t0)
        if value is None:
            missing += 1
    return (clock() - start) / 1e9, latencies, len(keys) - missing


def timed_loop(items, call) -> tuple[float, array.array]:
    latencies = array.array("q")
    clock = time.perf_counter_ns
    start = clock()
    for item in items:
        t0 = clock()
        call(item)
        latencies.append(clock() - t0)
    return (clock() - start) / 1e9, latencies


# ------------------------------------------------------------------------ workloads


def run_engine(engine: str, args, base_dir: str, emit) -> None:
    rng = random.Random(args.seed)
    values = Values(rng)
    path = os.path.join(base_dir, f"{engine}-main")
    n = args.n
    keys = list({rng.randbytes(KEY_BYTES) for _ in range(n)})
    rng.shuffle(keys)
    common = {"n": n, "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES}

    store = open_store(engine, path, "never")
    try:
        seconds, lat = timed_puts(store.put_fn(), keys, values)
        emit(result(engine, "fill", len(keys), seconds, lat, sync="never", **common))

        reads = min(args.reads, len(keys))
        hits = [keys[rng.randrange(len(keys))] for _ in range(reads)]
        seconds, lat, found = timed_gets(store.get_fn(), hits)
        if found != reads:
            raise AssertionError(f"{engine}: read_hit found {found} of {reads} keys")
        emit(result(engine, "read_hit", reads, seconds, lat, **common))

        key_set = set(keys)
        misses = []
        while len(misses) < reads:
            key = rng.randbytes(KEY_BYTES)
            if key not in key_set:
                misses.append(key)
        seconds, lat, found = timed_gets(store.get_fn(), misses)
        if found:
            raise AssertionError(f"{engine}: read_miss found {found} keys never written")
        del key_set
        emit(result(engine, "read_miss", reads, seconds, lat, **common))

        if store.scannable:
            scans = max(1, min(args.scans, len(keys) // 100 or 1))
            starts = [keys[rng.randrange(len(keys))] for _ in range(scans)]
            scanned = [0]

            def scan(start):
                scanned[0] += store.scan(start, 100)

            seconds, lat = timed_loop(starts, scan)
            emit(result(engine, "scan100", scans, seconds, lat, keys_scanned=scanned[0],
                        keys_per_s=round(scanned[0] / seconds, 1) if seconds else None, **common))

        overwrites = [keys[rng.randrange(len(keys))] for _ in range(n)]
        seconds, lat = timed_puts(store.put_fn(), overwrites, values)
        emit(result(engine, "overwrite", len(overwrites), seconds, lat, sync="never", **common))
        del overwrites

        if store.persistent:
            before = directory_bytes(path)
            t0 = time.perf_counter()
            store.compact()
            seconds = time.perf_counter() - t0
            emit(result(engine, "compact", 1, seconds, None, disk_bytes_before=before, **common))
            disk = directory_bytes(path)
            live = len(keys) * (KEY_BYTES + VALUE_BYTES)
            emit(
                {
                    "engine": engine,
                    "workload": "space",
                    "ops": None,
                    "seconds": None,
                    "ops_per_s": None,
                    "disk_bytes": disk,
                    "live_bytes": live,
                    "space_amplification": round(disk / live, 3),
                    **common,
                }
            )

            t0 = time.perf_counter()
            store.close()
            close_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.reopen()
            open_seconds = time.perf_counter() - t0
            for key in keys[:: max(1, len(keys) // 100)]:
                if store.get(key) is None:
                    raise AssertionError(f"{engine}: key lost across close and reopen")
            emit(
                result(engine, "reopen", 1, close_seconds + open_seconds, None, close_seconds=round(close_seconds, 4),
                       open_seconds=round(open_seconds, 4), **common)
            )
        if hasattr(store, "stats"):
            stats = store.stats()
        else:
            stats = {}
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    if stats and args.show_stats:
        emit({"engine": engine, "workload": "stats", "stats": _jsonable(stats)})

    if not store.durable:
        return
    for threads in (1, 8):
        emit(sync_writes(engine, os.path.join(base_dir, f"{engine}-sync{threads}"), threads, args.sync_seconds, args.seed))


def sync_writes(engine: str, path: str, threads: int, duration_s: float, seed: int) -> dict:
    """Acknowledged writes per second with sync="always", `threads` writers, for `duration_s`."""
    store = open_store(engine, path, "always")
    stop = threading.Event()
    per_thread: list[array.array] = [array.array("q") for _ in range(threads)]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        values = Values(rng)
        clock = time.perf_counter_ns
        latencies = per_thread[index]
        try:
            while not stop.is_set():
                key = rng.randbytes(KEY_BYTES)
                t0 = clock()
                store.put(key, values.next())
                latencies.append(clock() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(duration_s)
    stop.set()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    try:
        store.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if errors:
        raise errors[0]
    latencies = array.array("q")
    for part in per_thread:
        latencies.extend(part)
    return result(engine, f"sync_write_{threads}t", len(latencies), seconds, latencies, sync="always", threads=threads)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


# ------------------------------------------------------------------------ ratios


_LOWER_IS_BETTER = {"compact": "seconds", "reopen": "seconds", "space": "space_amplification"}


def add_ratios(line: dict, references: dict[tuple[str, str], dict]) -> dict:
    for ref in REFERENCES:
        other = references.get((ref, line["workload"]))
        if other is None:
            continue
        field = _LOWER_IS_BETTER.get(line["workload"], "ops_per_s")
        mine, theirs = line.get(field), other.get(field)
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
            line[f"ratio_vs_{ref.replace('-', '_')}"] = round(mine / theirs, 4)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capkv engine benchmark (JSON lines on stdout)")
    parser.add_argument("--engines", default=",".join(CAPKV_ENGINES), help="capkv engines, comma-separated")
    parser.add_argument("--n", type=int, default=1_000_000, help="keys to fill and overwrites to do")
    parser.add_argument("--reads", type=int, default=200_000, help="random gets per read workload (at most n)")
    parser.add_argument("--scans", type=int, default=10_000, help="100-key scans (at most n/100)")
    parser.add_argument("--sync-seconds", type=float, default=3.0, help="duration of each sync='always' phase")
    parser.add_argument("--quick", action="store_true", help="smoke run: n=20,000, 1 s sync phases")
    parser.add_argument("--reference", default=None,
                        help="reference stores to run too, comma-separated (default: bitcask-sketch, and "
                             "leveldb,rocksdb when importable)")
    parser.add_argument("--no-reference", action="store_true", help="run capkv engines only")
    parser.add_argument("--dir", default=None, help="where to put data (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--show-stats", action="store_true", help="also print each engine's stats() after the run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 20_000)
        args.sync_seconds = min(args.sync_seconds, 1.0)
    if args.n <= 0 or args.reads <= 0 or args.scans <= 0 or args.sync_seconds <= 0:
        parser.error("--n, --reads, --scans and --sync-seconds must be positive")

    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in CAPKV_ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}: choose from {', '.join(CAPKV_ENGINES)}")
    if args.no_reference:
        references = []
    elif args.reference is not None:
        references = [r for r in args.reference.split(",") if r]
        bad = [r for r in references if r not in REFERENCES]
        if bad:
            parser.error(f"unknown reference(s) {', '.join(bad)}: choose from {', '.join(REFERENCES)}")
        missing = [r for r in references if r not in available_references()]
        if missing:
            parser.error(f"reference(s) not importable: {', '.join(missing)} (pip install plyvel rocksdict)")
    else:
        references = available_references()

    reference_lines: dict[tuple[str, str], dict] = {}

    def emit(line: dict) -> None:
        if line.get("engine") in REFERENCES:
            reference_lines[(line["engine"], line["workload"])] = line
        else:
            add_ratios(line, reference_lines)
        print(json.dumps(line), flush=True)

    base_dir = args.dir or tempfile.mkdtemp(prefix="capkv-bench-")
    os.makedirs(base_dir, exist_ok=True)
    try:
        for engine in references + engines:
            run_engine(engine, args, base_dir, emit)
    finally:
        if args.dir is None:
            shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
