"""Tests of what only the `lsm` engine has: flushes, SSTables, Bloom filters, the manifest,
compaction, WAL recovery. The shared suites beside this file test the Engine protocol.

Small options (a memtable of a few KiB, tiny blocks) make a few thousand keys span many
tables and levels, so every test here runs in about a second.
"""
from __future__ import annotations

import gc
import os
import random
import shutil
import struct
import threading

import pytest

from engines import CorruptionError, EngineError, InvalidArgument
from engines.lsm import LSMEngine
from engines.lsm import manifest as manifest_module
from engines.lsm import short_scan as short_scan_module
from engines.lsm.short_scan import SHORT_SCAN_LIMIT
from engines.lsm.bloom import BloomFilter, key_hash
from engines.lsm.sstable import FOOTER_SIZE, TOMBSTONE, Table, decode_block, encode_block
from engines.lsm.wal import HEADER_SIZE as WAL_HEADER_SIZE
from engines.lsm.wal import encode_put, replay

SMALL = dict(
    sync="never",
    memtable_bytes=8 * 1024,
    block_bytes=512,
    level1_max_bytes=32 * 1024,
    target_file_bytes=16 * 1024,
    l0_compaction_trigger=2,
)


def files(path, suffix):
    return sorted(name for name in os.listdir(path) if name.endswith(suffix))


def disk_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "lsm")


def random_key(rng):
    return b"key-%08d" % rng.randrange(10**8)


# ----------------------------------------------------------------------- flush and compaction


def test_flush_writes_a_table_and_empties_the_wal(path):
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    for i in range(100):
        engine.put(b"k%03d" % i, b"v%03d" % i)
    assert files(path, ".sst") == []
    engine.flush()
    assert len(files(path, ".sst")) == 1
    stats = engine.stats()
    assert stats["tables_per_level"][0] == 1 and stats["memtable_entries"] == 0
    # only the new, empty log is left
    (wal,) = files(path, ".wal")
    assert os.path.getsize(os.path.join(path, wal)) == WAL_HEADER_SIZE
    assert [engine.get(b"k%03d" % i) for i in range(100)] == [b"v%03d" % i for i in range(100)]
    engine._check()
    engine.close()


@pytest.mark.parametrize("process", [False, True], ids=["threads", "worker-process"])
def test_compaction_keeps_every_key_and_drops_shadowed_versions_and_tombstones(path, process):
    rng = random.Random(7)
    engine = LSMEngine(path, **SMALL, background_process=process, background_compaction=False)
    model = {}
    keys = [b"key-%05d" % i for i in range(1500)]
    # five generations of every key, then delete a third of them
    for generation in range(5):
        for key in keys:
            value = b"%d-" % generation + rng.randbytes(40)
            engine.put(key, value)
            model[key] = value
        engine.flush()
    for key in keys[::3]:
        engine.delete(key)
        del model[key]
    engine.flush()
    engine._check()
    before = engine.stats()
    assert before["table_entries"] >= 5 * len(keys)  # every version is still on disk
    disk_before = disk_bytes(path)

    engine.compact()
    engine._check()
    after = engine.stats()
    assert after["table_entries"] == len(model), "shadowed versions or tombstones survived a full compaction"
    assert after["table_tombstones"] == 0
    used_levels = [level for level, count in enumerate(after["tables_per_level"]) if count]
    assert len(used_levels) == 1 and used_levels[0] >= 1, "a full compaction leaves one sorted run"
    live = sum(len(k) + len(v) for k, v in model.items())
    assert disk_bytes(path) < disk_before / 4
    assert disk_bytes(path) < live * 1.5
    assert dict(engine.scan()) == model
    assert all(engine.get(key) == model.get(key) for key in keys)
    engine.close()
    engine = LSMEngine(path, **SMALL, background_process=process)
    assert dict(engine.scan()) == model
    engine.close()


@pytest.mark.parametrize("process", [False, True], ids=["threads", "worker-process"])
def test_background_compaction_bounds_level_zero_and_keeps_levels_sorted(path, process):
    rng = random.Random(3)
    engine = LSMEngine(path, **SMALL, background_process=process)
    model = {}
    for i in range(6000):
        key = random_key(rng)
        value = rng.randbytes(rng.randrange(60))
        engine.put(key, value)
        model[key] = value
    engine.flush()
    assert engine.wait_idle(timeout=60), "background compaction never caught up"
    stats = engine.stats()
    assert stats["compactions"] > 0
    assert stats["tables_per_level"][0] < SMALL["l0_compaction_trigger"]
    assert sum(stats["tables_per_level"][2:]) > 0, "nothing reached level 2 with a 32 KiB level 1"
    engine._check()  # asserts that levels >= 1 do not overlap
    assert list(engine.scan()) == sorted(model.items())
    engine.close()


def test_tombstone_is_kept_while_an_older_version_sits_below(path):
    """A delete merged into level 1 must keep hiding the value still in level 2."""
    from engines.lsm.compaction import plan_for

    engine = LSMEngine(path, **SMALL, background_compaction=False)
    engine.put(b"victim", b"old")
    for i in range(300):
        engine.put(b"pad-%04d" % i, b"x" * 40)
    engine.compact()  # everything in level 1
    levels = engine._version.levels
    engine._run_compaction(plan_for(levels, 1, list(levels[1])))  # level 1 -> level 2
    assert engine.stats()["tables_per_level"][1:3] == [0, len(levels[1])]
    engine.delete(b"victim")
    engine.flush()
    levels = engine._version.levels
    plan = plan_for(levels, 0, list(levels[0]))  # level 0 -> level 1, above the old value
    assert plan.output_level == 1 and not plan.drop_tombstones
    engine._run_compaction(plan)
    assert engine.stats()["tables_per_level"][:2] == [0, 1]
    assert engine.stats()["table_tombstones"] == 1, "the tombstone was dropped with an older value below"
    assert engine.get(b"victim") is None
    assert b"victim" not in dict(engine.scan())
    engine._check()
    engine.compact()  # now one run at the bottom: the tombstone and the old value both go
    assert engine.get(b"victim") is None
    assert engine.stats()["table_tombstones"] == 0
    assert engine.stats()["table_entries"] == 300
    engine._check()
    engine.close()


# ----------------------------------------------------------------------- Bloom filters


def test_bloom_filter_false_positive_rate_at_10_bits_per_key():
    rng = random.Random(11)
    members = [rng.randbytes(16) for _ in range(100_000)]
    bloom = BloomFilter.build(members, bits_per_key=10)
    assert bloom.num_hashes == 7
    assert all(bloom.may_contain(key_hash(key)) for key in members), "a Bloom filter must have no false negatives"
    strangers = [b"other-" + rng.randbytes(16) for _ in range(100_000)]
    false_positives = sum(bloom.may_contain(key_hash(key)) for key in strangers)
    assert false_positives / len(strangers) <= 0.01


def test_bloom_filter_keeps_its_own_number_of_hashes():
    members = [b"m%d" % i for i in range(1000)]
    for bits in (4, 10, 20):
        encoded = BloomFilter.build(members, bits_per_key=bits).encode()
        decoded = BloomFilter.decode(encoded)
        assert decoded.num_hashes == {4: 3, 10: 7, 20: 14}[bits]
        assert all(decoded.may_contain(key_hash(m)) for m in members)


def test_tables_written_with_other_bloom_bits_read_back(path):
    engine = LSMEngine(path, **SMALL, bloom_bits_per_key=3, background_compaction=False)
    for i in range(500):
        engine.put(b"k%04d" % i, b"v")
    engine.flush()
    engine.close()
    engine = LSMEngine(path, **SMALL, bloom_bits_per_key=16)
    assert all(engine.get(b"k%04d" % i) == b"v" for i in range(500))
    engine.close()


def test_get_of_absent_keys_skips_tables_by_bloom_filter(path, monkeypatch):
    engine = LSMEngine(path, **SMALL, background_compaction=False, block_cache_bytes=1 << 20)
    for i in range(2000):
        engine.put(b"present-%05d" % i, b"v" * 20)
    engine.flush()
    # Count the tables looked into (the get probes their filters inline, then calls
    # find): a table whose filter says "no" is never looked into.
    lookups = []
    find = Table.find
    monkeypatch.setattr(Table, "find", lambda table, key: lookups.append(key) or find(table, key))
    for i in range(2000):
        assert engine.get(b"present-%05d" % i) == b"v" * 20
    assert len(lookups) >= 2000
    lookups.clear()
    for i in range(2000):
        assert engine.get(b"absent-%05d" % i) is None
    assert len(lookups) <= 2000 * len(files(path, ".sst")) * 0.02
    engine.close()


# ----------------------------------------------------------------------- scans under change


@pytest.mark.parametrize("process", [False, True], ids=["threads", "worker-process"])
def test_scans_across_memtable_and_tables_during_writes_and_compaction(path, process):
    """Keys that no writer touches must appear in every scan, in order, exactly once."""
    engine = LSMEngine(path, **SMALL, background_process=process)
    stable = {b"stable-%05d" % i: b"s%05d" % i for i in range(0, 3000, 3)}
    for key, value in stable.items():
        engine.put(key, value)
    engine.flush()
    errors = []
    writers_done = threading.Event()

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(1200):
            key = b"stable-%05d" % (rng.randrange(1000) * 3 + 1 + seed % 2)  # never a stable key
            if rng.random() < 0.3:
                engine.delete(key)
            else:
                engine.put(key, rng.randbytes(rng.randrange(80)))

    def scanner(reverse):
        try:
            while not writers_done.is_set():
                seen = [item for item in engine.scan(b"stable-", b"stable.", reverse=reverse)]
                keys = [k for k, _ in seen]
                assert keys == sorted(keys, reverse=reverse), "scan out of order"
                assert len(keys) == len(set(keys)), "scan returned a key twice"
                got = {k: v for k, v in seen if k in stable}
                assert got == stable, f"scan lost or changed {len(set(stable) - set(got))} untouched keys"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    ordered = sorted(stable)

    def short_scanner(reverse):
        """Short scans (short_scan.py): from a stable key, the next `limit` keys, with
        every stable key they pass over and no tombstone."""
        rng = random.Random(7 + reverse)
        try:
            while not writers_done.is_set():
                i = rng.randrange(len(ordered))
                limit = rng.choice([1, 5, 30, 200])
                if not reverse:
                    seen = list(engine.scan(ordered[i], b"stable.", limit=limit))
                else:
                    seen = list(engine.scan(b"stable-", ordered[i] + b"\x00", reverse=True, limit=limit))
                keys = [k for k, _ in seen]
                assert keys == sorted(keys, reverse=reverse) and len(keys) == len(set(keys))
                assert keys[0] == ordered[i] and len(keys) <= limit
                assert not any(v is TOMBSTONE for _, v in seen), "a short scan returned a tombstone"
                if len(keys) == limit:
                    low, high = min(keys), max(keys)
                else:  # the range ran out: every stable key from the start on came back
                    low, high = (ordered[i], ordered[-1]) if not reverse else (ordered[0], ordered[i])
                passed = {k: stable[k] for k in ordered if low <= k <= high}
                assert {k: v for k, v in seen if k in stable} == passed, "a short scan skipped a stable key"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    scanners = [threading.Thread(target=scanner, args=(r,)) for r in (False, True)]
    scanners += [threading.Thread(target=short_scanner, args=(r,)) for r in (False, True)]
    for thread in writers + scanners:
        thread.start()
    try:
        for _ in range(3):
            engine.compact()  # full compaction while scans run
    finally:
        for thread in writers:
            thread.join()
        writers_done.set()
        for thread in scanners:
            thread.join()
    assert not errors, errors[0]
    stats = engine.stats()
    assert stats["flushes"] >= 3 and stats["compactions"] >= 3
    engine._check()
    engine.close()


def test_an_open_scan_keeps_its_tables_until_it_is_dropped(path):
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    model = {b"k%04d" % i: b"v%04d" % i for i in range(1000)}
    for key, value in model.items():
        engine.put(key, value)
    engine.flush()
    engine.put(b"k0000", b"newer")
    engine.flush()
    old_tables = set(files(path, ".sst"))
    assert len(old_tables) >= 2
    scan = engine.scan()
    first = next(scan)
    engine.compact()
    # the scan's tables are no longer in the manifest but still on disk: it holds them
    assert old_tables <= set(files(path, ".sst"))
    rest = list(scan)
    assert [first] + rest == sorted({**model, b"k0000": b"newer"}.items())
    del scan, first, rest
    gc.collect()
    assert not old_tables & set(files(path, ".sst")), "replaced tables were not deleted after the scan ended"
    engine._check()
    engine.close()


def test_scan_with_limit_and_reverse_over_many_tables(path):
    rng = random.Random(5)
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    model = {}
    for round_ in range(6):
        for _ in range(400):
            key = b"%04d" % rng.randrange(3000)
            if rng.random() < 0.2:
                engine.delete(key)
                model.pop(key, None)
            else:
                model[key] = b"r%d" % round_
                engine.put(key, model[key])
        if round_ % 2:
            engine.flush()
    ordered = sorted(model.items())
    for _ in range(50):
        lo, hi = sorted(b"%04d" % rng.randrange(3000) for _ in range(2))
        limit = rng.choice([None, 1, 7, 100])
        want = [kv for kv in ordered if lo <= kv[0] < hi]
        assert list(engine.scan(lo, hi, limit=limit)) == want[:limit]
        assert list(engine.scan(lo, hi, reverse=True, limit=limit)) == want[::-1][:limit]
    engine.close()


def test_short_scans_match_a_model_over_levels_tombstones_and_rounds(path, monkeypatch):
    """Short scans (a limit up to SHORT_SCAN_LIMIT: short_scan.py) against a dict, over a
    memtable, level-0 tables and deeper levels, with runs of deletes that force more than
    one merge round; longer and unlimited scans (merge.py) agree with them."""
    rng = random.Random(11)
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    model = {}
    for round_ in range(5):
        for _ in range(600):
            key = b"%05d" % rng.randrange(4000)
            model[key] = b"r%d-%s" % (round_, key)
            engine.put(key, model[key])
        # A run of deletes: the tables below still hold these keys.
        low = rng.randrange(3500)
        for i in range(low, low + 300):
            key = b"%05d" % i
            engine.delete(key)
            model.pop(key, None)
        engine.flush()
        if round_ == 2:
            engine.compact()  # levels >= 1 below the later level-0 tables
    engine.put(b"00000", b"memtable")  # and the memtable on top
    model[b"00000"] = b"memtable"
    assert engine.stats()["tables_per_level"][0] >= 2
    rounds = []
    merge = short_scan_module._merge
    monkeypatch.setattr(short_scan_module, "_merge", lambda *args: rounds.append(1) or merge(*args))
    ordered = sorted(model.items())
    scans = 0
    for _ in range(300):
        lo, hi = sorted(b"%05d" % rng.randrange(4100) for _ in range(2))
        start, end = rng.choice([(lo, hi), (lo, None), (None, hi), (None, None)])
        limit = rng.choice([1, 2, 10, 100, SHORT_SCAN_LIMIT, SHORT_SCAN_LIMIT + 1, None])
        want = [kv for kv in ordered if (start is None or start <= kv[0]) and (end is None or kv[0] < end)]
        assert list(engine.scan(start, end, limit=limit)) == want[:limit]
        assert list(engine.scan(start, end, reverse=True, limit=limit)) == want[::-1][:limit]
        scans += 2 * (limit is not None and limit <= SHORT_SCAN_LIMIT)
    assert len(rounds) > scans, "no short scan needed a second round: the test lost its deletes"
    engine._check()
    engine.close()


def test_a_short_scan_in_a_gap_of_a_level_needs_one_round(tmp_path, monkeypatch):
    """Shares follow the density where a scan starts, not a level's average: a level
    whose two tables leave a gap (the level above holds those keys) gets no share of a
    scan that starts well inside the gap, so the one round holds every key. With the
    average (the gapped level holds more keys in all), the level holding the range got
    too few candidates and a second round followed. Forward and reverse."""
    from engines.lsm.sstable import BlockCache, write_table

    cache = BlockCache(1 << 20)

    def table(number, keys):
        table_path = str(tmp_path / ("%06d.sst" % number))
        write_table(table_path, keys, [b"v" * 100] * len(keys), block_bytes=4096, bloom_bits_per_key=10)
        return Table(table_path, number, cache)

    def key(i):  # 8-byte big-endian: the key space is even (decimal digits' is not)
        return (i << 20).to_bytes(8, "big")

    low = [key(i) for i in range(0, 3000)]
    middle = [key(i) for i in range(3000, 5000)]
    high = [key(i) for i in range(5000, 8000)]
    gapped = (table(1, low), table(2, high))  # a level of two tables; the gap is [3000, 5000)
    dense = (table(3, middle),)  # the level above, newer: one table over the gap
    runs = [(tables, [t.smallest for t in tables], [t.largest for t in tables], 0) for tables in (dense, gapped)]
    entries = [sum(t.entries for t in tables) for tables, *_ in runs]
    everything = low + middle + high
    rounds = []
    merge = short_scan_module._merge
    monkeypatch.setattr(short_scan_module, "_merge", lambda *args: rounds.append(1) or merge(*args))
    for first in (3000, 3500, 4000):
        rounds.clear()
        got = short_scan_module.short_scan([], runs, entries, key(first), None, False, 100)
        assert [key for key, _ in got] == everything[first:first + 100]
        assert len(rounds) == 1, f"forward from {first}: {len(rounds)} rounds"
    for last in (5000, 4500, 4000):
        rounds.clear()
        got = short_scan_module.short_scan([], runs, entries, None, key(last), True, 100)
        assert [key for key, _ in got] == everything[last - 100:last][::-1]
        assert len(rounds) == 1, f"reverse from {last}: {len(rounds)} rounds"


def test_a_delete_racing_a_short_scan_is_never_returned_as_a_value(path, monkeypatch):
    """A short scan fetches a memtable's values after it has chosen the keys it keeps; a
    delete landing in between leaves a tombstone there, which the scan must drop (the
    memtable counts the delete before it stores it), never hand out as a value."""
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    for i in range(50):
        engine.put(b"k%03d" % i, b"v%03d" % i)
    merge = short_scan_module._merge

    def racing(*args):
        engine.delete(b"k010")  # between the takes and the merge's value fetch
        return merge(*args)

    monkeypatch.setattr(short_scan_module, "_merge", racing)
    got = list(engine.scan(b"k000", limit=100))
    assert [key for key, _ in got] == [b"k%03d" % i for i in range(50) if i != 10]
    assert all(value is not TOMBSTONE for _, value in got)
    engine.close()


# ----------------------------------------------------------------------- recovery


@pytest.mark.parametrize("process", [False, True], ids=["threads", "worker-process"])
def test_reopen_keeps_everything_in_tables_and_logs(path, process):
    rng = random.Random(9)
    engine = LSMEngine(path, **SMALL, background_process=process)
    model = {}
    for i in range(4000):
        key = random_key(rng)
        if model and rng.random() < 0.1:
            key = rng.choice(list(model))
            engine.delete(key)
            model.pop(key)
            continue
        model[key] = rng.randbytes(rng.randrange(100))
        engine.put(key, model[key])
    engine.write([("put", b"batch-a", b"1"), ("put", b"batch-b", b"2"), ("delete", b"batch-a", None)])
    model[b"batch-b"] = b"2"
    engine.close()
    assert files(path, ".wal"), "the test needs writes that are only in a log"
    engine = LSMEngine(path, **SMALL, background_process=process)
    engine._check()
    assert list(engine.scan()) == sorted(model.items())
    assert engine.stats()["wal_torn_tails"] == 0
    engine.close()


def test_torn_wal_tail_is_cut_reported_and_counted(path):
    engine = LSMEngine(path, sync="always")
    for i in range(20):
        engine.put(b"k%02d" % i, b"v%02d" % i)
    engine.close()
    (wal,) = files(path, ".wal")
    wal_path = os.path.join(path, wal)
    size = os.path.getsize(wal_path)
    last_record = len(encode_put(b"k19", b"v19"))
    os.truncate(wal_path, size - last_record // 2)

    engine = LSMEngine(path, sync="always")
    stats = engine.stats()
    assert stats["wal_torn_tails"] == 1
    assert stats["wal_torn_bytes"] == last_record - last_record // 2
    assert engine.torn_tails[0]["path"] == wal_path
    assert engine.get(b"k19") is None
    assert [engine.get(b"k%02d" % i) for i in range(19)] == [b"v%02d" % i for i in range(19)]
    engine.put(b"after", b"ok")
    engine.close()
    engine = LSMEngine(path)
    assert engine.stats()["wal_torn_tails"] == 0, "the cut tail was reported again"
    assert engine.get(b"after") == b"ok" and engine.get(b"k18") == b"v18"
    engine.close()


def test_damage_before_the_last_record_is_corruption_not_a_tail(path):
    """Only the newest log's last record can be torn by a crash. A bad record in an older
    log, or one followed by good records, is damage: cutting there would silently drop
    acknowledged writes from the middle of the history."""
    from engines.lsm.wal import WalWriter

    engine = LSMEngine(path, **SMALL)
    engine.close()
    for name in files(path, ".wal"):
        os.unlink(os.path.join(path, name))
    older = WalWriter(os.path.join(path, "000100.wal"), 100)
    older.append(encode_put(b"a", b"1"))
    older.append(encode_put(b"b", b"2"))
    older.close(sync=True)
    newer = WalWriter(os.path.join(path, "000101.wal"), 101)
    for i in range(3):
        newer.append(encode_put(b"c%d" % i, b"3" * 50))
    newer.close(sync=True)
    pristine = path + "-pristine"
    shutil.copytree(path, pristine)

    os.truncate(older.path, os.path.getsize(older.path) - 1)  # older log torn
    with pytest.raises(CorruptionError) as caught:
        LSMEngine(path, **SMALL)
    assert caught.value.path == older.path

    shutil.rmtree(path)
    shutil.copytree(pristine, path)
    with open(newer.path, "r+b") as f:  # first record of the newest log damaged
        f.seek(WAL_HEADER_SIZE + 20)
        f.write(b"X")
    with pytest.raises(CorruptionError, match="valid record follows") as caught:
        LSMEngine(path, **SMALL)
    assert caught.value.path == newer.path

    shutil.rmtree(path)
    shutil.copytree(pristine, path)
    with open(newer.path, "r+b") as f:  # last record of the newest log damaged: a tail
        f.seek(os.path.getsize(newer.path) - 5)
        f.write(b"X")
    engine = LSMEngine(path, **SMALL)
    assert [engine.get(b"c%d" % i) for i in range(3)] == [b"3" * 50, b"3" * 50, None]
    assert engine.get(b"a") == b"1" and engine.stats()["wal_torn_tails"] == 1
    engine.close()


def test_a_torn_batch_is_dropped_whole(path):
    engine = LSMEngine(path, sync="always")
    engine.put(b"b", b"old")
    engine.write([("put", b"a", b"1"), ("delete", b"b", None), ("put", b"c", b"3" * 100)])
    engine.close()
    (wal,) = files(path, ".wal")
    os.truncate(os.path.join(path, wal), os.path.getsize(os.path.join(path, wal)) - 50)
    engine = LSMEngine(path)
    assert (engine.get(b"a"), engine.get(b"b"), engine.get(b"c")) == (None, b"old", None)
    engine.close()


def test_manifest_replaced_atomically_leaves_no_temp_file(path):
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    for i in range(500):
        engine.put(b"k%04d" % i, b"v" * 30)
    engine.compact()
    engine.close()
    assert "MANIFEST" in os.listdir(path)
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    body = manifest_module.read(path)
    assert {"%06d.sst" % t["file"] for t in body["tables"]} == set(files(path, ".sst"))


# ----------------------------------------------------------------------- corruption


def _engine_with_one_table(path):
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    for i in range(300):
        engine.put(b"k%04d" % i, b"value-%04d" % i)
    engine.flush()
    engine.close()
    (table,) = files(path, ".sst")
    return os.path.join(path, table)


def test_flipped_byte_in_a_data_block_raises_corruption_naming_the_table(path):
    table = _engine_with_one_table(path)
    with open(table, "r+b") as f:
        f.seek(100)  # inside the first data block
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))
    engine = LSMEngine(path, **SMALL)  # opening reads the index, footer and filter only
    with pytest.raises(CorruptionError) as caught:
        for i in range(300):
            engine.get(b"k%04d" % i)
    assert caught.value.path == table
    assert os.path.basename(table) in str(caught.value)
    with pytest.raises(CorruptionError):
        list(engine.scan())
    engine.close()


@pytest.mark.parametrize("where", ["footer", "index", "bloom"])
def test_damaged_table_metadata_refuses_to_open(path, where):
    table = _engine_with_one_table(path)
    size = os.path.getsize(table)
    with open(table, "rb") as f:
        f.seek(size - FOOTER_SIZE)
        index_offset, _, bloom_offset, _ = struct.unpack("<QIQI", f.read(24))
    position = {"footer": size - 10, "index": index_offset + 5, "bloom": bloom_offset + 20}[where]
    with open(table, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x80]))
    with pytest.raises(CorruptionError) as caught:
        LSMEngine(path, **SMALL)
    assert caught.value.path == table


def test_damaged_manifest_refuses_to_open_naming_it(path):
    _engine_with_one_table(path)
    manifest_path = os.path.join(path, "MANIFEST")
    with open(manifest_path, "r+b") as f:
        f.seek(30)
        byte = f.read(1)
        f.seek(30)
        f.write(bytes([byte[0] ^ 0x04]))
    with pytest.raises(CorruptionError) as caught:
        LSMEngine(path, **SMALL)
    assert caught.value.path == manifest_path


def test_missing_manifest_with_data_files_is_corruption_not_an_empty_store(path):
    _engine_with_one_table(path)
    os.unlink(os.path.join(path, "MANIFEST"))
    with pytest.raises(CorruptionError, match="MANIFEST"):
        LSMEngine(path, **SMALL)


def test_missing_table_file_is_corruption(path):
    table = _engine_with_one_table(path)
    os.unlink(table)
    with pytest.raises(CorruptionError) as caught:
        LSMEngine(path, **SMALL)
    assert caught.value.path == table


# ----------------------------------------------------------------------- options, locking, checks


def test_unknown_option_is_named(path):
    with pytest.raises(InvalidArgument, match="memtable_megabytes"):
        LSMEngine(path, memtable_megabytes=4)
    with pytest.raises(InvalidArgument, match="block_bytes"):
        LSMEngine(path, block_bytes=0)
    with pytest.raises(InvalidArgument, match="sync"):
        LSMEngine(path, sync="sometimes")


def test_a_directory_opens_once_at_a_time(path):
    engine = LSMEngine(path, **SMALL)
    with pytest.raises(EngineError, match="in use"):
        LSMEngine(path, **SMALL)
    engine.close()
    LSMEngine(path, **SMALL).close()


def test_check_catches_broken_invariants(path):
    engine = LSMEngine(path, **SMALL, background_compaction=False)
    for i in range(200):
        engine.put(b"k%03d" % i, b"v")
    engine._check()
    engine._version.mem.bytes += 1
    with pytest.raises(AssertionError, match="bytes"):
        engine._check()
    engine._version.mem.bytes -= 1
    engine.flush()
    os.unlink(os.path.join(path, "MANIFEST"))
    manifest_module.write(path, {"next_file": 99, "log_number": 0, "tables": []})
    with pytest.raises(AssertionError, match="manifest"):
        engine._check()
    engine.close()


def test_block_codec_tells_tombstones_from_empty_values():
    keys, values = decode_block(encode_block([b"a", b"b", b"c"], [b"", TOMBSTONE, b"x"]))
    assert keys == (b"a", b"b", b"c")
    assert values == (b"", b"", b"x")
    assert values[0] is not TOMBSTONE and values[1] is TOMBSTONE


@pytest.mark.parametrize("keys, values", [
    ([b"k%03d" % i for i in range(40)], [b"v" * 100] * 40),  # even keys and values: one unpack each
    ([b"a", b"bcd"], [b"12", b"34"]),  # lengths 1 and 3 average 2: not even
    ([b"ab", b"cd", b"ef"], [b"x", b"", b"yyy"]),
    ([b"ab", b"cd"], [TOMBSTONE, b"zz"]),
])
def test_block_codec_round_trips_even_and_uneven_pieces(keys, values):
    got_keys, got_values = decode_block(encode_block(keys, values))
    assert list(got_keys) == keys and list(got_values) == values
    assert [v is TOMBSTONE for v in got_values] == [v is TOMBSTONE for v in values]


@pytest.mark.parametrize("shape", ["even keys, even values", "even keys, uneven values",
                                   "uneven keys, even values", "uneven keys, uneven values"])
def test_table_reads_in_place_agree_with_decoded_blocks(tmp_path, shape):
    """find() searches a block of one-length keys where it lies in the mapping, and short
    scans cut keys and values out of it: every key, every substring of the key area (a
    match straddling two keys must not count) and every slice must agree with decoding."""
    from engines.lsm.sstable import BlockCache, write_table

    rng = random.Random(shape)
    even_keys, even_values = shape.startswith("even"), shape.endswith(", even values")
    keys = sorted({bytes(rng.choice(b"ab") for _ in range(4 if even_keys else rng.randrange(1, 7)))
                   for _ in range(300)})
    # A delete stores no value bytes, so only uneven values can hold deletes (and empties).
    values = [b"%05d" % i if even_values else TOMBSTONE if i % 7 == 3 else b"v" * rng.randrange(0, 9)
              for i in range(len(keys))]
    table_path = str(tmp_path / "000001.sst")
    write_table(table_path, keys, values, block_bytes=64, bloom_bits_per_key=10)
    table = Table(table_path, 1, BlockCache(1 << 20))
    expected = dict(zip(keys, values))
    probes = set(keys)
    for index in range(table.block_count):
        block_keys, _ = table.block(index)
        area = b"".join(block_keys)
        probes.update(area[i:i + width] for width in (2, 4, 6) for i in range(len(area)))
    for key in sorted(probes):
        got = table.find(key)
        want = expected.get(key)
        assert got == want and (got is TOMBSTONE) == (want is TOMBSTONE), key
    for index in range(table.block_count):
        block_keys, block_values = table.block(index)
        assert table.block_keys(index) == block_keys
        for start in range(len(block_keys) + 1):
            for stop in range(start, len(block_keys) + 1):
                got = table.block_values(index, start, stop)
                assert list(got) == list(block_values[start:stop])
                assert [v is TOMBSTONE for v in got] == [v is TOMBSTONE for v in block_values[start:stop]]
    table._check()


def test_a_damaged_block_is_refused_by_gets_and_scans_alike(path):
    """Gets read blocks in place and check each block's checksum on its first read; a
    scan reading the same block after a get refused it must refuse it too."""
    table = _engine_with_one_table(path)
    with open(table, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))
    engine = LSMEngine(path, **SMALL)
    try:
        refused = 0
        for i in range(300):
            try:
                engine.get(b"k%04d" % i)
            except CorruptionError:
                refused += 1
        assert refused  # every get in the damaged block, each time
        with pytest.raises(CorruptionError):
            list(engine.scan(limit=100))
        with pytest.raises(CorruptionError):
            list(engine.scan())
    finally:
        engine.close()


def test_sync_always_shares_fsyncs_between_threads(path):
    engine = LSMEngine(path, sync="always")
    start = threading.Barrier(8)

    def write(t):
        start.wait()
        for i in range(50):
            engine.put(b"t%d-%03d" % (t, i), b"v")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.stats()["fsyncs"] < 400, "every write paid its own fsync"
    engine.close()
    engine = LSMEngine(path)
    assert sum(1 for _ in engine.scan()) == 400
    engine.close()


def test_wal_replay_cuts_garbage_after_the_last_record(tmp_path):
    from engines.lsm.wal import WalWriter

    wal_path = str(tmp_path / "000001.wal")
    writer = WalWriter(wal_path, 1)
    writer.append(encode_put(b"a", b"1"))
    writer.close(sync=False)
    good = os.path.getsize(wal_path)
    with open(wal_path, "ab") as f:
        f.write(bytes(64))
    result = replay(wal_path)
    assert [op for batch in result.batches for op in batch] == [(0, b"a", b"1")]
    assert result.torn_bytes == 64 and os.path.getsize(wal_path) == good


def test_background_error_stops_writes_with_a_clear_error(path, monkeypatch):
    engine = LSMEngine(path, **SMALL, background_process=False)  # the failure is patched in-process
    import engines.lsm.engine as engine_module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_module, "write_table", broken)
    with pytest.raises(EngineError, match="No space left"):
        for i in range(10_000):
            engine.put(b"k%05d" % i, b"v" * 50)
    assert "No space left" in engine.stats()["background_error"]
    engine.close()
    monkeypatch.undo()
    engine = LSMEngine(path, **SMALL, background_process=False)  # the logs still hold every write
    assert engine.get(b"k00000") == b"v" * 50
    engine.close()
    shutil.rmtree(path)


def test_a_worker_process_that_cannot_start_falls_back_to_threads(path, monkeypatch):
    from engines.lsm.worker import WorkerClient

    def no_processes(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(WorkerClient, "_start", no_processes)
    engine = LSMEngine(path, **SMALL, background_process=True)
    model = {b"k%05d" % i: b"v" * (i % 70) for i in range(3000)}
    for key, value in model.items():
        engine.put(key, value)
    engine.compact()
    stats = engine.stats()
    assert stats["worker_failures"] >= 1 and stats["background_process"] is False
    assert stats["background_error"] is None and stats["compactions"] >= 1
    assert dict(engine.scan()) == model
    engine._check()
    engine.close()


def test_worker_processes_end_with_the_engine(path):
    engine = LSMEngine(path, **SMALL, background_process=True)
    for i in range(2000):
        engine.put(b"k%05d" % i, b"v" * 40)
    engine.compact()
    workers = [engine._flush_worker._process, engine._compaction_worker._process]
    assert all(w is not None and w.poll() is None for w in workers), "compaction did not use the workers"
    engine.close()
    assert all(w.poll() is not None for w in workers), "a worker process outlived close()"
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
