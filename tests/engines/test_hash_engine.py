"""Tests specific to the `hash` engine (Bitcask-style): rotation, merge, hint files,
torn tails, corruption naming the damaged file, reopen. The shared suites in this
directory cover the Engine protocol itself."""
from __future__ import annotations

import gc
import os
import random
import shutil
import struct
import threading
import time
import zlib

import pytest

from engines import CorruptionError, EngineClosed, EngineError, InvalidArgument
from engines.hash import HashEngine
from engines.hash import engine as hash_engine
from engines.hash import format as fmt

from .conftest import directory_bytes, model_scan

SMALL = {"max_file_bytes": 4096, "sync": "never"}


def data_files(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".data"))


def hint_files(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".hint"))


def flip(path: str, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x41]))


@pytest.fixture
def engines_opened():
    opened = []
    yield opened
    for engine in opened:
        try:
            engine.close()
        except Exception:
            pass


@pytest.fixture
def open_hash(tmp_path, engines_opened):
    path = str(tmp_path / "hash")

    def opener(directory: str = path, **options) -> HashEngine:
        merged = dict(SMALL)
        merged.update(options)
        engine = HashEngine(directory, **merged)
        engines_opened.append(engine)
        return engine

    opener.path = path
    return opener


def record_location(engine: HashEngine, key: bytes) -> tuple[int, int, int]:
    """(file id, offset, size) of the key's record, from its packed keydir entry."""
    return fmt.unpack_entry(engine._keydir[key])


def crash_copy(engine_path: str, target: str) -> str:
    """The directory as kill -9 would leave it: copied while the engine is open."""
    shutil.copytree(engine_path, target)
    return target


# --------------------------------------------------------------------------- format


def test_record_layout_matches_format_md():
    record = fmt.encode_record(fmt.KIND_PUT, b"k", b"v")
    assert record[:9] == b"\x01" + struct.pack("<II", 1, 1)
    assert record[9:11] == b"kv"
    assert record[11:] == struct.pack("<I", zlib.crc32(record[:11]))
    assert zlib.crc32(record) == fmt.RESIDUE
    assert fmt.decode_record(record) == (fmt.KIND_PUT, b"k", b"v")
    damaged = bytearray(record)
    damaged[10] ^= 1
    assert fmt.decode_record(bytes(damaged)) is None


def test_files_start_with_magic_and_version(open_hash):
    engine = open_hash()
    for i in range(200):
        engine.put(b"k%03d" % i, b"v" * 50)
    engine.close()
    for name in data_files(open_hash.path) + hint_files(open_hash.path):
        with open(os.path.join(open_hash.path, name), "rb") as f:
            magic, version, file_id = fmt.FILE_HEADER.unpack(f.read(fmt.HEADER_SIZE))
        assert magic == (fmt.DATA_MAGIC if name.endswith(".data") else fmt.HINT_MAGIC)
        assert version == fmt.FORMAT_VERSION
        assert file_id == int(name.split(".")[0], 16)


# ------------------------------------------------------------------------- rotation


def test_rotation_keeps_files_under_the_limit(open_hash):
    engine = open_hash()
    model = {}
    for i in range(300):
        model[b"key-%04d" % i] = os.urandom(60)
        engine.put(b"key-%04d" % i, model[b"key-%04d" % i])
    stats = engine.stats()
    assert stats["rotations"] >= 5
    assert stats["data_files"] == len(data_files(open_hash.path)) >= 6
    for name in data_files(open_hash.path):
        assert os.path.getsize(os.path.join(open_hash.path, name)) <= 4096
    assert all(engine.get(k) == v for k, v in model.items())
    engine._check()


def test_record_larger_than_the_file_limit_gets_a_file_of_its_own(open_hash):
    engine = open_hash()
    engine.put(b"small", b"s")
    big = os.urandom(10_000)
    engine.put(b"big", big)
    engine.put(b"after", b"a")
    assert engine.get(b"big") == big
    engine.close()
    engine = open_hash()
    assert engine.get(b"big") == big and engine.get(b"small") == b"s" and engine.get(b"after") == b"a"
    engine._check()


# ---------------------------------------------------------------------------- merge


def test_merge_reclaims_dead_space_and_keeps_every_live_key(open_hash):
    rng = random.Random(7)
    engine = open_hash(auto_merge=False)
    model = {}
    keys = [b"key-%03d" % i for i in range(100)]
    for round_ in range(8):
        for key in keys:
            model[key] = rng.randbytes(rng.randint(10, 80))
            engine.put(key, model[key])
        for key in rng.sample(keys, 10):
            model.pop(key, None)
            engine.delete(key)
    engine.sync()
    # Hint files of rotated files are written in the background (a .hint.tmp, then a
    # rename): let that finish so the directory holds still while it is measured.
    engine.wait_idle()
    before = directory_bytes(open_hash.path)
    dead_before = engine.stats()["dead_bytes"]
    result = engine.merge()
    engine._check()
    after = directory_bytes(open_hash.path)
    assert dead_before > 0 and result["bytes_reclaimed"] > 0
    assert after < before / 2, (before, after)
    # only the active file (written during the merge: nothing) can hold dead bytes now
    assert engine.stats()["dead_bytes"] == 0
    assert list(engine.scan()) == model_scan(model)
    engine.close()
    engine = open_hash()
    assert list(engine.scan()) == model_scan(model)
    engine._check()


def test_merge_drops_tombstones_without_bringing_values_back(open_hash):
    engine = open_hash(auto_merge=False)
    engine.put(b"doomed", b"old value")
    for i in range(100):  # push the value into an older file
        engine.put(b"filler-%03d" % i, b"x" * 40)
    engine.delete(b"doomed")
    engine.merge()
    assert engine.get(b"doomed") is None
    engine.close()
    engine = open_hash()
    assert engine.get(b"doomed") is None
    assert b"doomed" not in dict(engine.scan())


def test_merge_while_threads_write_and_scan(open_hash):
    """Writers change their own keys, scanners check order and the keys nobody changes,
    and merges run back to back; at the end every writer's last word is there."""
    engine = open_hash(auto_merge=False, max_file_bytes=16384)
    stable = {b"stable-%03d" % i: b"s%d" % i for i in range(150)}
    for key, value in stable.items():
        engine.put(key, value)
    models = [dict() for _ in range(3)]
    errors: list[BaseException] = []
    writers_done = threading.Event()
    merges = [0]

    def writer(index):
        rng = random.Random(index)
        keys = [b"w%d-%03d" % (index, i) for i in range(80)]
        try:
            step = 0
            # at least 1500 steps, and on until three merges ran during them (bounded in
            # time, not steps: on a loaded machine 30,000 steps once passed before 3 merges)
            deadline = time.monotonic() + 60
            while (step < 1500 or merges[0] < 3) and time.monotonic() < deadline:
                step += 1
                if step % 100 == 0:
                    time.sleep(0.002)  # let the merger have the GIL now and then
                key = rng.choice(keys)
                if rng.random() < 0.8:
                    value = rng.randbytes(rng.randint(1, 60))
                    engine.put(key, value)
                    models[index][key] = value
                else:
                    engine.delete(key)
                    models[index].pop(key, None)
                if step % 50 == 0:
                    assert engine.get(key) == models[index].get(key)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def scanner():
        try:
            while not writers_done.is_set():
                items = list(engine.scan())
                keys = [k for k, _ in items]
                assert keys == sorted(set(keys))
                got = {k: v for k, v in items if k.startswith(b"stable-")}
                assert got == stable, "a key nobody changed went missing or changed during a merge"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def merger():
        try:
            while not writers_done.is_set():
                engine.merge()
                merges[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    others = [threading.Thread(target=scanner), threading.Thread(target=merger)]
    for t in threads + others:
        t.start()
    for t in threads:
        t.join(timeout=120)
    writers_done.set()
    for t in others:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert merges[0] >= 3
    expected = dict(stable)
    for model in models:
        expected.update(model)
    engine._check()
    assert list(engine.scan()) == model_scan(expected)
    engine.close()
    engine = open_hash()
    assert list(engine.scan()) == model_scan(expected)
    engine._check()


def test_merge_starts_by_itself_past_the_dead_space_thresholds(open_hash):
    engine = open_hash(merge_min_dead_bytes=8192, merge_dead_ratio=0.5)
    for round_ in range(20):
        for i in range(50):
            engine.put(b"key-%02d" % i, b"round %d " % round_ + b"x" * 40)
    deadline = time.monotonic() + 10
    while engine.stats()["merges"] == 0 and time.monotonic() < deadline:
        engine.put(b"key-00", b"nudge")
        time.sleep(0.01)
    assert engine.stats()["merges"] >= 1
    engine.wait_idle()
    assert engine.get(b"key-00") == b"nudge"
    assert engine.get(b"key-49") == b"round 19 " + b"x" * 40
    engine._check()


# ----------------------------------------------------------------------- hint files


def test_restart_reads_hint_files_not_data_files(open_hash):
    engine = open_hash()
    model = {b"k%04d" % i: b"v%d" % i for i in range(400)}
    engine.write([("put", k, v) for k, v in list(model.items())[:100]])
    for key, value in list(model.items())[100:]:
        engine.put(key, value)
    engine.delete(b"k0001")
    del model[b"k0001"]
    engine.close()
    files = data_files(open_hash.path)
    assert hint_files(open_hash.path) == [n.replace(".data", ".hint") for n in files]

    engine = open_hash()
    stats = engine.stats()
    assert stats["hint_files_loaded"] == len(files) and stats["data_files_scanned"] == 0
    assert stats["records_scanned_at_open"] == 0
    assert list(engine.scan()) == model_scan(model)
    engine.close()

    # Without hint files the data files are scanned, and the hints written again.
    for name in hint_files(open_hash.path):
        os.unlink(os.path.join(open_hash.path, name))
    engine = open_hash()
    stats = engine.stats()
    assert stats["hint_files_loaded"] == 0 and stats["data_files_scanned"] == len(files)
    assert stats["records_scanned_at_open"] >= 401
    assert list(engine.scan()) == model_scan(model)
    engine.close()
    assert len(hint_files(open_hash.path)) == len(files)


def test_tombstone_in_a_later_file_survives_restart_through_hints(open_hash):
    engine = open_hash()
    engine.put(b"gone", b"1")
    engine.close()
    engine = open_hash()
    engine.delete(b"gone")
    engine.close()
    engine = open_hash()
    assert engine.stats()["hint_files_loaded"] == 2
    assert engine.get(b"gone") is None


# ------------------------------------------------------------------------ torn tails


def test_torn_tail_is_cut_reported_and_counted(open_hash, tmp_path):
    engine = open_hash(sync="always", max_file_bytes=1 << 20)
    for i in range(20):
        engine.put(b"k%02d" % i, b"value %d" % i)
    active = os.path.join(open_hash.path, data_files(open_hash.path)[-1])
    before = os.path.getsize(active)
    engine.put(b"last", b"L" * 100)
    after = os.path.getsize(active)
    crashed = crash_copy(open_hash.path, str(tmp_path / "crashed"))
    torn_file = os.path.join(crashed, os.path.basename(active))
    os.truncate(torn_file, before + 50)  # half of the last record

    engine = open_hash(crashed, sync="always", max_file_bytes=1 << 20)
    stats = engine.stats()
    assert stats["torn_tails"] == 1
    assert stats["bytes_cut_at_open"] == 50
    assert os.path.getsize(torn_file) == before  # cut on disk, not just skipped
    assert engine.get(b"last") is None
    assert dict(engine.scan()) == {b"k%02d" % i: b"value %d" % i for i in range(20)}
    engine._check()
    assert after - before == 13 + 4 + 100


def test_torn_batch_is_dropped_whole(open_hash, tmp_path):
    engine = open_hash(sync="always", max_file_bytes=1 << 20)
    engine.put(b"before", b"b")
    active = os.path.join(open_hash.path, data_files(open_hash.path)[-1])
    start = os.path.getsize(active)
    engine.write([("put", b"batch-%d" % i, b"v" * 30) for i in range(5)] + [("delete", b"before", None)])
    end = os.path.getsize(active)
    crashed = crash_copy(open_hash.path, str(tmp_path / "crashed"))
    # keep the frame header and the first three ops whole: only the batch CRC is missing
    os.truncate(os.path.join(crashed, os.path.basename(active)), end - 40)
    engine = open_hash(crashed, sync="always")
    assert engine.stats()["torn_tails"] == 1
    assert dict(engine.scan()) == {b"before": b"b"}
    assert end - 40 > start + 9 + 3 * (13 + 7 + 30)


def test_damage_inside_an_unhinted_data_file_refuses_to_open(open_hash, tmp_path):
    """A crash leaves the active file without a hint; a flipped byte in its first record
    is followed by valid records, so it is damage, not a torn tail: never cut silently."""
    engine = open_hash(sync="always", max_file_bytes=1 << 20)
    for i in range(30):
        engine.put(b"k%02d" % i, b"value %d" % i)
    active = data_files(open_hash.path)[-1]
    crashed = crash_copy(open_hash.path, str(tmp_path / "crashed"))
    flip(os.path.join(crashed, active), fmt.HEADER_SIZE + 11)
    with pytest.raises(CorruptionError) as info:
        open_hash(crashed)
    assert os.path.basename(info.value.path) == active


# ------------------------------------------------------------------------ corruption


def test_flipped_byte_in_an_older_data_file_is_caught_at_get(open_hash):
    engine = open_hash()
    for i in range(200):
        engine.put(b"k%03d" % i, b"value-%03d" % i + b"." * 30)
    location = record_location(engine, b"k005")
    engine.close()
    damaged = os.path.join(open_hash.path, fmt.data_file_name(location[0]))
    flip(damaged, location[1] + location[2] - 8)  # inside the value

    engine = open_hash()  # hint files: the data file is not read at open
    with pytest.raises(CorruptionError) as info:
        engine.get(b"k005")
    assert info.value.path == damaged
    assert os.path.basename(damaged) in str(info.value)
    assert engine.get(b"k006") == b"value-006" + b"." * 30
    with pytest.raises(CorruptionError):
        list(engine.scan())


def test_flipped_byte_in_a_hint_file_raises_naming_it(open_hash):
    engine = open_hash()
    for i in range(200):
        engine.put(b"k%03d" % i, b"v" * 30)
    engine.close()
    hint = os.path.join(open_hash.path, hint_files(open_hash.path)[1])
    flip(hint, os.path.getsize(hint) // 2)
    with pytest.raises(CorruptionError) as info:
        open_hash()
    assert info.value.path == hint


def test_flipped_byte_in_a_data_file_header_raises_naming_it(open_hash):
    engine = open_hash()
    for i in range(200):
        engine.put(b"k%03d" % i, b"v" * 30)
    engine.close()
    damaged = os.path.join(open_hash.path, data_files(open_hash.path)[0])
    flip(damaged, 3)
    with pytest.raises(CorruptionError) as info:
        open_hash()
    assert info.value.path == damaged


# ---------------------------------------------------------------------------- reopen


def test_reopen_many_times_keeps_everything(open_hash):
    rng = random.Random(3)
    model: dict[bytes, bytes] = {}
    for round_ in range(6):
        engine = open_hash(auto_merge=False)
        assert list(engine.scan()) == model_scan(model)
        for _ in range(150):
            key = b"k%02d" % rng.randrange(60)
            roll = rng.random()
            if roll < 0.6:
                model[key] = rng.randbytes(rng.randint(0, 90))
                engine.put(key, model[key])
            elif roll < 0.8:
                model.pop(key, None)
                engine.delete(key)
            else:
                ops = [("put", key, b"b%d" % round_), ("delete", b"k%02d" % rng.randrange(60), None)]
                engine.write(ops)
                model[key] = b"b%d" % round_
                model.pop(ops[1][1], None)
        if round_ % 2:
            engine.merge()
        engine._check()
        engine.close()
    engine = open_hash()
    assert list(engine.scan()) == model_scan(model)
    engine._check()


# --------------------------------------------------------------------- options, stats


def test_unknown_and_bad_options_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="max_file_bytez"):
        HashEngine(str(tmp_path / "a"), max_file_bytez=10)
    for bad in ({"max_file_bytes": 0}, {"merge_dead_ratio": 1.5}, {"auto_merge": "yes"}, {"write_buffer_bytes": -1}):
        with pytest.raises(InvalidArgument):
            HashEngine(str(tmp_path / "b"), **bad)


def test_scans_report_the_keys_they_sort(open_hash):
    engine = open_hash()
    for i in range(500):
        engine.put(b"k%03d" % (499 - i), b"v")
    assert engine.stats()["scan_keys_sorted"] == 0
    assert len(list(engine.scan())) == 500
    first = engine.stats()
    assert first["scan_sorts"] == 1 and first["scan_keys_sorted"] == 500
    list(engine.scan(b"k1", b"k2"))  # nothing changed: the sorted list is reused
    assert engine.stats()["scan_sorts"] == 1
    engine.put(b"new", b"v")
    assert [k for k, _ in engine.scan(b"n")] == [b"new"]
    assert engine.stats()["scan_sorts"] == 2


def test_check_catches_drifted_accounting(open_hash):
    engine = open_hash()
    engine.put(b"a", b"1")
    engine._check()
    engine._dead[engine._active_id] += 1
    with pytest.raises(AssertionError):
        engine._check()
    engine._dead[engine._active_id] -= 1
    engine._keydir[b"b"] = engine._keydir[b"a"]  # an entry pointing at another key's record
    with pytest.raises(AssertionError):
        engine._check()
    del engine._keydir[b"b"]


def test_merge_refuses_to_copy_a_damaged_record(open_hash):
    engine = open_hash(auto_merge=False)
    for i in range(200):
        engine.put(b"k%03d" % i, b"value-%03d" % i + b"." * 30)
    file_id, offset, size = record_location(engine, b"k010")
    assert file_id != engine._active_id
    damaged = os.path.join(open_hash.path, fmt.data_file_name(file_id))
    flip(damaged, offset + size - 6)
    with pytest.raises(CorruptionError) as info:
        engine.merge()
    assert info.value.path == damaged
    # nothing was lost or deleted: every other key still reads, the damaged file stays
    assert os.path.exists(damaged)
    assert all(engine.get(b"k%03d" % i) == b"value-%03d" % i + b"." * 30 for i in range(200) if i != 10)



def test_one_engine_per_directory(open_hash):
    from engines import EngineError

    first = open_hash()
    first.put(b"a", b"1")
    with pytest.raises(EngineError, match="in use"):
        HashEngine(open_hash.path)
    first.close()
    again = open_hash()
    assert again.get(b"a") == b"1"


# --------------------------------------------------------------------------- group commit


def test_group_commit_credits_what_an_fsync_covered():
    from engines.base import GroupCommit

    calls = []

    def flush_everything(target):
        calls.append(target)
        return 100  # the whole buffer went out: everything up to 100 is durable

    group = GroupCommit(flush_everything)
    group.wait_durable(10)
    assert calls == [10]
    group.wait_durable(60)  # appended while the first fsync ran: covered, no fsync
    group.wait_durable(100)
    assert calls == [10] and group.fsyncs == 1 and group.durable_position == 100
    group.wait_durable(101)
    assert calls == [10, 101]


def test_group_commit_sync_fn_returning_none_covers_its_target():
    from engines.base import GroupCommit

    calls = []
    group = GroupCommit(calls.append)  # returns None, like the lsm engine's WAL sync
    group.written(30)
    group.wait_durable(10)
    assert calls == [30]  # the target is everything written so far
    group.wait_durable(30)
    assert calls == [30]
    group.wait_durable(31)
    assert calls == [30, 31] and group.durable_position == 31


def test_sync_always_writers_share_fsyncs(open_hash):
    engine = open_hash(sync="always", max_file_bytes=1 << 20)
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)
    errors = []

    def writer(index):
        try:
            start.wait()
            for i in range(per_thread):
                engine.put(b"t%d-%03d" % (index, i), b"v" * 50)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors[:3]
    fsyncs = engine.stats()["group_commit_fsyncs"]
    assert 0 < fsyncs < threads * per_thread * 0.75, f"{fsyncs} fsyncs for {threads * per_thread} writes"
    assert len(engine) == threads * per_thread


# --------------------------------------------------------------------------- merge vs reads


def _hammer_reads_during_merges(engine, *, writers: int, seconds: float, min_merges: int) -> dict:
    """Writers put, delete and batch their own keys and check every value they read
    against their own model; a merger merges back to back and a syncer syncs (which
    flushes the append buffer and releases the descriptors of rotated files). With tiny
    files and a tiny buffer, reads land on the buffer, on flushed bytes of the active
    file, on just-rotated files and on files a merge is retiring."""
    errors: list[BaseException] = []
    stop = threading.Event()
    merges = [0]
    reads = [0]
    models = [dict() for _ in range(writers)]

    def writer(index):
        rng = random.Random(index)
        keys = [b"w%d-%02d" % (index, i) for i in range(24)]
        model = models[index]
        try:
            while not stop.is_set():
                key = rng.choice(keys)
                r = rng.random()
                if r < 0.4:
                    value = rng.randbytes(rng.randint(1, 40))
                    engine.put(key, value)
                    model[key] = value
                elif r < 0.45:
                    engine.delete(key)
                    model.pop(key, None)
                elif r < 0.5:
                    other = rng.choice(keys)
                    engine.write([("put", key, b"b" + key), ("delete", other, None)] if other != key
                                 else [("put", key, b"b" + key)])
                    model[key] = b"b" + key
                    if other != key:
                        model.pop(other, None)
                else:
                    if engine.get(key) != model.get(key):
                        raise AssertionError(f"{key!r}: read {engine.get(key)!r}, wrote {model.get(key)!r}")
                    reads[0] += 1
                if rng.random() < 0.05:
                    time.sleep(0.0005)  # let the merger and syncer have the GIL
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    def merger():
        try:
            while not stop.is_set():
                engine.merge()
                merges[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    def syncer():
        try:
            while not stop.is_set():
                engine.sync()
                time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    threads += [threading.Thread(target=merger), threading.Thread(target=syncer)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    # run for `seconds`, and on (bounded by 4x) until `min_merges` merges raced with the reads
    while not stop.is_set() and (time.monotonic() < deadline or merges[0] < min_merges):
        if time.monotonic() > deadline + 3 * seconds:
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert merges[0] >= min_merges, f"only {merges[0]} merges ran"
    expected = {}
    for model in models:
        expected.update(model)
    engine._check()
    assert dict(engine.scan()) == expected
    return {"merges": merges[0], "reads": reads[0]}


def test_reads_stay_correct_while_merges_retire_files(open_hash):
    engine = open_hash(auto_merge=False, max_file_bytes=2048, write_buffer_bytes=256)
    done = _hammer_reads_during_merges(engine, writers=3, seconds=1.5, min_merges=3)
    assert done["reads"] > 0


@pytest.mark.slow
def test_reads_stay_correct_while_merges_retire_files_long(open_hash):
    # 8 KiB files: with 2 KiB ones, writers outrun the merges and the open files (each
    # holds an mmap) reach the descriptor limit within a minute.
    for sync in ("never", "batch", "always"):
        engine = open_hash(os.path.join(open_hash.path, sync), auto_merge=False, max_file_bytes=8192,
                           write_buffer_bytes=256, sync=sync)
        _hammer_reads_during_merges(engine, writers=4, seconds=10, min_merges=20)
        engine.close()


def test_a_read_that_raced_with_a_merge_finds_the_moved_record(open_hash):
    """A get holding the entry of a file a merge retired re-reads the key's new entry
    (no error); damage is still raised (test_flipped_byte_in_an_older_data_file_...)."""
    engine = open_hash(auto_merge=False)
    for i in range(100):
        engine.put(b"k%03d" % i, b"value-%03d" % i + b"." * 30)
    stale = engine._keydir[b"k001"]
    engine.merge()
    assert engine._files.get(fmt.entry_file(stale)) is None  # retired and closed
    assert engine._read_slow(b"k001", stale) == b"value-001" + b"." * 30
    engine.put(b"k002", b"new")
    assert engine._read_slow(b"k002", engine._keydir[b"k002"]) == b"new"  # from the append buffer


def test_sync_never_hands_the_append_buffer_to_the_os_within_the_interval(open_hash):
    """A process crash must not lose more than sync_interval_ms of sync="never" writes:
    the buffer reaches the file with no further call on the engine."""
    engine = open_hash(sync="never", sync_interval_ms=5.0, max_file_bytes=1 << 20)
    active = os.path.join(open_hash.path, fmt.data_file_name(engine._active_id))
    before = os.path.getsize(active)
    engine.put(b"k", b"v" * 100)
    deadline = time.monotonic() + 10
    while os.path.getsize(active) == before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert os.path.getsize(active) == before + fmt.RECORD_OVERHEAD + 1 + 100
    copy = crash_copy(open_hash.path, open_hash.path + "-crashed")
    engine.close()
    assert open_hash(copy).get(b"k") == b"v" * 100


# --------------------------------------------------------------------------- active file map


def test_active_file_is_read_through_its_map_and_checked(open_hash, monkeypatch):
    """Gets of the active file slice its map once enough was flushed past it, pread
    the rest of the flushed bytes, and copy from the append buffer beyond; a flipped
    byte in a mapped record is still caught, naming the file."""
    monkeypatch.setattr(hash_engine, "_REMAP_BYTES", 1024)
    engine = open_hash(max_file_bytes=1 << 20, write_buffer_bytes=512)
    values = {b"k%04d" % i: b"v%04d" % i * 10 for i in range(300)}
    for key, value in values.items():
        engine.put(key, value)
    active = engine._active
    assert not active.sealed and active.mm is not None
    assert 1024 <= active.mapped <= active.flushed < active.size + len(engine._buf) + 1
    where = {"map": 0, "pread": 0, "buffer": 0}
    for key in engine._keydir:
        file_id, offset, size = record_location(engine, key)
        assert file_id == active.file_id
        end = offset + size
        where["map" if end <= active.mapped else "pread" if end <= active.flushed else "buffer"] += 1
    assert all(where.values()), where  # every path is taken below
    assert all(engine.get(key) == value for key, value in values.items())
    engine._check()

    file_id, offset, size = record_location(engine, b"k0003")
    assert offset + size <= active.mapped
    flip(active.path, offset + size - 6)  # the map shares the page cache: it sees this
    with pytest.raises(CorruptionError) as info:
        engine.get(b"k0003")
    assert info.value.path == active.path
    assert engine.get(b"k0004") == values[b"k0004"]


def test_get_after_close_raises_for_mapped_records(open_hash, monkeypatch):
    """Hits skip the closed check: close() closes every map, which sends them to the
    slow path, which raises EngineClosed (never a value, never another error)."""
    monkeypatch.setattr(hash_engine, "_REMAP_BYTES", 256)
    engine = open_hash(max_file_bytes=4096, write_buffer_bytes=256)
    for i in range(100):
        engine.put(b"k%03d" % i, b"v" * 40)
    entries = {k: fmt.unpack_entry(e) for k, e in engine._keydir.items()}
    sealed = [k for k, e in entries.items() if engine._files[e[0]].sealed]
    mapped_active = [k for k, e in entries.items()
                     if e[0] == engine._active_id and e[1] + e[2] <= engine._active.mapped]
    assert sealed and mapped_active
    engine.close()
    for key in (sealed[0], mapped_active[0], b"k099", b"missing"):
        with pytest.raises(EngineClosed):
            engine.get(key)


def test_reads_stay_correct_while_the_active_file_is_remapped(open_hash, monkeypatch):
    """The hammer above with the active file remapped at nearly every flush: lock-free
    gets race with remaps and rotations as well as with merges."""
    monkeypatch.setattr(hash_engine, "_REMAP_BYTES", 64)
    engine = open_hash(auto_merge=False, max_file_bytes=2048, write_buffer_bytes=256)
    done = _hammer_reads_during_merges(engine, writers=3, seconds=1.5, min_merges=3)
    assert done["reads"] > 0


def test_hint_of_a_rotated_file_keeps_each_keys_last_record(open_hash):
    """The active file's index is kept as lists in append order; its hint must hold the
    last record of each key there (a put after a delete, a delete after a put)."""
    engine = open_hash(max_file_bytes=1 << 20)
    engine.put(b"a", b"1")
    engine.put(b"b", b"1")
    engine.put(b"a", b"2")
    engine.delete(b"b")
    engine.write([("put", b"c", b"1"), ("delete", b"a", None)])
    engine.put(b"a", b"3")
    engine.put(b"d", b"1")
    engine.delete(b"d")
    engine.close()
    engine = open_hash()
    assert engine.stats()["hint_files_loaded"] == 1 and engine.stats()["data_files_scanned"] == 0
    assert dict(engine.scan()) == {b"a": b"3", b"c": b"1"}
    engine._check()


def test_hint_after_overwrites_within_one_file_counts_each_key_once(open_hash):
    """Overwrites alone (no delete, no batch) also repeat a key in the active file: its
    hint must still hold each key once, or the reopened byte accounting drifts."""
    engine = open_hash(max_file_bytes=1 << 20)
    for round_ in range(3):
        for i in range(50):
            engine.put(b"k%02d" % i, b"v%d" % round_ * 20)
    engine.put(b"new", b"1")
    engine.close()
    engine = open_hash()
    assert engine.stats()["hint_entries_loaded"] == 51
    assert engine.stats()["dead_bytes"] == 2 * 50 * (fmt.RECORD_OVERHEAD + 3 + 40)
    engine._check()
    assert engine.get(b"k07") == b"v2" * 20


def test_a_failed_remap_of_the_active_file_fails_no_write(open_hash, monkeypatch):
    """Mapping the active file is only a faster read path: if mmap fails (out of map
    areas), writes go on and gets pread."""
    monkeypatch.setattr(hash_engine, "_REMAP_BYTES", 256)

    def no_map(self, length):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hash_engine.DataFile, "map_prefix", no_map)
    engine = open_hash(max_file_bytes=1 << 20, write_buffer_bytes=256)
    values = {b"k%03d" % i: b"v%03d" % i * 10 for i in range(100)}
    for key, value in values.items():
        engine.put(key, value)
    assert engine._active.mapped == 0 and engine.stats()["remap_errors"] > 0
    assert all(engine.get(key) == value for key, value in values.items())
    engine._check()


# --------------------------------------------------------------------------- keydir entries


@pytest.mark.parametrize("file_id, offset, size", [
    (1, 20, 15), (0, 0, 1), (2**64 - 1, 2**31, 2**31 - 1), (7, 2**32 - 2, 1), (300, 20, 129),
])
def test_keydir_entry_packing_round_trips(file_id, offset, size):
    entry = fmt.pack_entry(file_id, offset, size)
    assert fmt.unpack_entry(entry) == (file_id, offset, size)
    assert (fmt.entry_file(entry), fmt.entry_size(entry)) == (file_id, size)
    assert entry & ((1 << 64) - 1) == fmt.pack_position(offset, size) > 0


def test_hint_round_trips_positions_and_tombstones():
    keys = [b"a", b"bb", b"ccc", b"dddd"]
    positions = [fmt.pack_position(20, 15), -fmt.pack_position(35, 14), fmt.pack_position(2**31, 2**31 - 1),
                 fmt.pack_position(49, 1)]
    data = fmt.encode_hint(9, keys, positions, 12345)
    data_size, got_keys, kinds, offsets, sizes = fmt.decode_hint(data, 9, "x.hint")
    assert (data_size, got_keys, bytes(kinds)) == (12345, keys, bytes([1, 2, 1, 1]))
    assert list(offsets) == [20, 35, 2**31, 49] and list(sizes) == [15, 14, 2**31 - 1, 1]
    entries = list(fmt.keydir_entries(9, offsets, sizes))
    assert [fmt.unpack_entry(e) for e in entries] == [(9, 20, 15), (9, 35, 14), (9, 2**31, 2**31 - 1), (9, 49, 1)]
    puts_only = fmt.encode_hint(9, [b"a"], [fmt.pack_position(20, 15)], 35)
    assert list(fmt.decode_hint(puts_only, 9, "x.hint")[4]) == [15]


def test_puts_leave_nothing_for_the_cyclic_gc(open_hash):
    """Keydir entries are ints, which the GC does not track: a fill of a large keydir
    triggers no young collections (a tuple per entry triggered one every 700 puts)."""
    engine = open_hash(max_file_bytes=1 << 20)
    engine.put(b"first", b"v")
    entry = engine._keydir[b"first"]
    assert type(entry) is int and not gc.is_tracked(entry)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(5000):
            engine.put(b"k%05d" % i, b"v" * 100)
        for i in range(0, 5000, 2):
            engine.put(b"k%05d" % i, b"w" * 100)  # overwrites
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grown < 500, f"{grown} GC-tracked objects left by 7500 puts"
    engine._check()


def test_data_files_are_kept_under_4_gib(tmp_path):
    """Keydir entries hold 32-bit offsets: options that could make a larger file fail."""
    with pytest.raises(InvalidArgument, match="max_file_bytes"):
        HashEngine(str(tmp_path / "h"), max_file_bytes=1 << 32)
    with pytest.raises(InvalidArgument, match="4 GiB"):
        HashEngine(str(tmp_path / "h"), max_key_bytes=1024, max_value_bytes=(1 << 32) - 1024 - 20)


def test_a_merge_that_would_pass_the_file_size_bound_fails_and_loses_nothing(open_hash, monkeypatch):
    engine = open_hash(auto_merge=False)
    for i in range(100):
        engine.put(b"k%03d" % i, b"value-%03d" % i + b"." * 30)
    monkeypatch.setattr(hash_engine, "MAX_FILE_END", 2000)  # stands for 4 GiB
    with pytest.raises(EngineError, match="4 GiB"):
        engine.merge()
    assert all(engine.get(b"k%03d" % i) == b"value-%03d" % i + b"." * 30 for i in range(100))
    engine.wait_idle()  # hints of the rotated file are written meanwhile
    assert not [n for n in os.listdir(open_hash.path) if n.endswith(".tmp")]  # the output is gone
    engine._check()
