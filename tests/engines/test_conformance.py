"""The conformance suite every engine passes: what a user of the Engine protocol relies on.

Each test runs once per engine kind (`memory`, `hash`, `lsm`); tests named `*_reopen*`
or taking `persistent_opener` run on the engines that keep files. Expected results come
from a plain dict (`model_scan`), never from another engine.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from engines import EngineClosed, InvalidArgument

from .conftest import engine_files, engine_options, model_scan, run_maintenance, wait_idle


def assert_same(engine, model: dict) -> None:
    """The engine holds exactly `model`: every key by get(), the whole by scan() both ways."""
    for key, value in model.items():
        assert engine.get(key) == value, key
    forward = list(engine.scan())
    assert forward == model_scan(model)
    assert list(engine.scan(reverse=True)) == forward[::-1]
    engine._check()


def random_keys(rng: random.Random, count: int, *, min_len: int = 1, max_len: int = 24) -> list[bytes]:
    keys = set()
    while len(keys) < count:
        keys.add(rng.randbytes(rng.randint(min_len, max_len)))
    return sorted(keys)


# ---------------------------------------------------------------------------------- CRUD


def test_put_get_overwrite_delete(engine):
    assert engine.get(b"apple") is None
    engine.put(b"apple", b"red")
    assert engine.get(b"apple") == b"red"
    engine.put(b"apple", b"green")
    assert engine.get(b"apple") == b"green"
    engine.put(b"banana", b"yellow")
    engine.delete(b"apple")
    assert engine.get(b"apple") is None
    assert engine.get(b"banana") == b"yellow"
    # Deleting what is absent is not an error and changes nothing.
    engine.delete(b"apple")
    engine.delete(b"cherry")
    assert list(engine.scan()) == [(b"banana", b"yellow")]
    # A deleted key can be written again.
    engine.put(b"apple", b"again")
    assert_same(engine, {b"apple": b"again", b"banana": b"yellow"})


def test_empty_value_is_a_value_not_absence(opener):
    engine = opener()
    engine.put(b"empty", b"")
    engine.put(b"full", b"x")
    assert engine.get(b"empty") == b""
    assert list(engine.scan()) == [(b"empty", b""), (b"full", b"x")]
    engine.delete(b"full")
    engine.put(b"full", b"")
    if opener.path is not None:
        engine.close()
        engine = opener()
    assert_same(engine, {b"empty": b"", b"full": b""})


def test_one_mib_values(opener):
    rng = random.Random(1)
    big = {b"big-%d" % i: rng.randbytes(1 << 20) for i in range(3)}
    engine = opener()
    for key, value in big.items():
        engine.put(key, value)
    # overwrite one big value with another big value, and one with a small one
    big[b"big-0"] = rng.randbytes(1 << 20)
    engine.put(b"big-0", big[b"big-0"])
    big[b"big-1"] = b"small now"
    engine.put(b"big-1", b"small now")
    assert_same(engine, big)
    if opener.path is not None:
        engine.close()
        engine = opener()
        assert_same(engine, big)


def test_accepts_bytearray_and_memoryview_and_keeps_a_copy(engine):
    key = bytearray(b"mutable-key")
    value = bytearray(b"mutable-value")
    engine.put(key, value)
    key[0:1] = b"X"
    value[0:1] = b"X"
    assert engine.get(b"mutable-key") == b"mutable-value"
    assert engine.get(memoryview(b"mutable-key")) == b"mutable-value"
    got = engine.get(b"mutable-key")
    assert isinstance(got, bytes)


# ------------------------------------------------------------------ keys with any bytes


def every_byte_keys() -> dict[bytes, bytes]:
    """Every single-byte key 0x00..0xff, keys that are prefixes of one another, and keys
    around the bytes an encoder might treat specially (0x00, 0xff, newline, separators)."""
    model = {bytes([b]): b"single-%d" % b for b in range(256)}
    for stem in (b"\x00", b"\xff", b"a", b"\n", b"/", b"\x7f", b"\x80"):
        for n in range(2, 6):
            model[stem * n] = b"repeat-%d-" % n + stem
    for key in (b"ab", b"abc", b"abc\x00", b"abc\x00\x00", b"abc\xff", b"abd", b"a\x00b", b"\x00a", b"\xff\x00"):
        model[key] = b"v:" + key
    return model


def test_keys_using_every_byte_value(opener):
    model = every_byte_keys()
    engine = opener()
    order = list(model)
    random.Random(2).shuffle(order)
    for key in order:
        engine.put(key, model[key])
    assert_same(engine, model)
    # prefixes bound scans exactly: [b"abc", b"abd") holds b"abc" and its extensions only
    assert [k for k, _ in engine.scan(b"abc", b"abd")] == [b"abc", b"abc\x00", b"abc\x00\x00", b"abc\xff"]
    assert [k for k, _ in engine.scan(b"\x00", b"\x01")] == [b"\x00" * n for n in range(1, 6)] + [b"\x00a"]
    assert [k for k, _ in engine.scan(b"\xff")] == [b"\xff", b"\xff\x00"] + [b"\xff" * n for n in range(2, 6)]
    # deleting a key leaves its prefixes and extensions alone
    engine.delete(b"abc")
    engine.delete(b"\x00\x00")
    del model[b"abc"], model[b"\x00\x00"]
    assert_same(engine, model)
    if opener.path is not None:
        engine.close()
        engine = opener()
        assert_same(engine, model)


# ----------------------------------------------------------------------------- scans


SCAN_KEYS = [b"", b"a", b"aa", b"ab", b"abc", b"b", b"ba", b"c", b"\x00", b"\xff", b"zz", b"a\x00"]


def scan_data() -> dict[bytes, bytes]:
    rng = random.Random(3)
    model = {k: b"v-" + k for k in every_byte_keys() if k}
    for key in random_keys(rng, 300):
        model[key] = rng.randbytes(rng.randint(0, 40))
    return model


SCAN_CASES = [
    (start, end, reverse, limit)
    for start, end in [
        (None, None),
        (b"a", None),
        (None, b"b"),
        (b"a", b"b"),
        (b"ab", b"abc"),      # end is an extension of start
        (b"abc", b"abc"),     # empty: start == end
        (b"b", b"a"),         # empty: start > end
        (b"\x00", b"\x00\x00"),
        (b"\xff", None),
        (b"\x80", b"\x81"),
        (b"zzzz", None),      # past every key
        (None, b"\x00"),      # before every key
    ]
    for reverse in (False, True)
    for limit in (None, 0, 1, 7)
]


@pytest.mark.parametrize("start,end,reverse,limit", SCAN_CASES)
def test_scan_bounds_reverse_limit(engine, start, end, reverse, limit):
    model = scan_data()
    engine.write([("put", k, v) for k, v in model.items()])
    got = list(engine.scan(start, end, reverse=reverse, limit=limit))
    assert got == model_scan(model, start, end, reverse, limit)


def test_scan_after_overwrites_and_deletes(opener):
    rng = random.Random(4)
    engine = opener()
    model: dict[bytes, bytes] = {}
    keys = random_keys(rng, 200)
    for round_ in range(4):
        for key in keys:
            roll = rng.random()
            if roll < 0.5:
                model[key] = b"r%d-" % round_ + rng.randbytes(rng.randint(0, 30))
                engine.put(key, model[key])
            elif roll < 0.75:
                model.pop(key, None)
                engine.delete(key)
        for start, end in [(None, None), (keys[20], keys[120]), (keys[150], None)]:
            for reverse in (False, True):
                for limit in (None, 5):
                    assert list(engine.scan(start, end, reverse=reverse, limit=limit)) == model_scan(
                        model, start, end, reverse, limit
                    )
    assert_same(engine, model)


def test_scan_iterator_stops_early_and_can_be_abandoned(engine):
    for i in range(1000):
        engine.put(b"k%04d" % i, b"v%d" % i)
    it = engine.scan(b"k0100")
    first = [next(it) for _ in range(3)]
    assert first == [(b"k0100", b"v100"), (b"k0101", b"v101"), (b"k0102", b"v102")]
    del it  # abandoned half way: nothing must stay locked
    engine.put(b"k0100", b"after")
    assert engine.get(b"k0100") == b"after"
    assert len(list(engine.scan())) == 1000


# What each engine's stats() says happened: files rolled over while writing, and the
# maintenance that ran (names from engines/hash/engine.py and engines/lsm/engine.py).
ROLLOVER_STATS = {"hash": ("rotations",), "lsm": ("flushes",)}
MAINTENANCE_STATS = {"hash": ("merges",), "lsm": ("compactions", "trivial_moves")}


def stat_total(stats: dict, names) -> int:
    return sum(int(stats.get(name) or 0) for name in names)


def test_scan_across_many_files_flushes_and_compactions(opener):
    """Enough data, with small files, that the lsm flushes several SSTables and the hash
    engine rotates several data files; scans must merge them all correctly, before and
    after compaction/merge and reopen."""
    rng = random.Random(5)
    engine = opener(**engine_options(opener.kind, small_files=True))
    keys = random_keys(rng, 1500, min_len=4, max_len=20)
    model: dict[bytes, bytes] = {}
    for round_ in range(3):
        batch = []
        for key in keys:
            roll = rng.random()
            if roll < 0.6:
                model[key] = b"%d:" % round_ + rng.randbytes(rng.randint(20, 120))
                batch.append(("put", key, model[key]))
            elif roll < 0.8:
                model.pop(key, None)
                batch.append(("delete", key, None))
            if len(batch) >= 50 or (batch and rng.random() < 0.02):
                engine.write(batch)
                batch = []
        if batch:
            engine.write(batch)
        assert list(engine.scan()) == model_scan(model)
    if opener.path is not None:
        files = engine_files(opener.path)
        assert len(files) >= 3, f"expected several files with small file options, got {files} ({engine.stats()})"
        rolled = stat_total(engine.stats(), ROLLOVER_STATS.get(opener.kind, ()))
        assert rolled >= 3, f"expected several flushes / rotations, stats say {engine.stats()}"
    lo, hi = keys[100], keys[900]
    expected_cases = [(lo, hi, False, None), (lo, hi, True, None), (None, None, True, 50), (hi, None, False, 10)]
    for start, end, reverse, limit in expected_cases:
        assert list(engine.scan(start, end, reverse=reverse, limit=limit)) == model_scan(model, start, end, reverse, limit)
    run_maintenance(engine)
    wait_idle(engine)
    assert_same(engine, model)
    if opener.path is not None:
        maintained = stat_total(engine.stats(), MAINTENANCE_STATS.get(opener.kind, ()))
        assert maintained >= 1, f"expected a merge / compaction to have run, stats say {engine.stats()}"
        engine.close()
        engine = opener(**engine_options(opener.kind, small_files=True))
        assert_same(engine, model)
        for start, end, reverse, limit in expected_cases:
            assert list(engine.scan(start, end, reverse=reverse, limit=limit)) == model_scan(
                model, start, end, reverse, limit
            )


# ---------------------------------------------------------------------------- batches


def test_batch_applies_in_order(engine):
    engine.put(b"gone", b"1")
    engine.write(
        [
            ("put", b"a", b"1"),
            ("put", b"a", b"2"),          # later op on the same key wins
            ("put", b"b", b"1"),
            ("delete", b"b", None),       # put then delete: absent
            ("delete", b"c", None),
            ("put", b"c", b"3"),          # delete then put: present
            ("delete", b"gone", None),
        ]
    )
    assert_same(engine, {b"a": b"2", b"c": b"3"})
    engine.write([])  # an empty batch is allowed and changes nothing
    assert_same(engine, {b"a": b"2", b"c": b"3"})


BAD_BATCH_ITEMS = [
    ("frobnicate", b"k", b"v"),
    ("put", b"", b"v"),
    ("put", "str-key", b"v"),
    ("put", b"k", "str-value"),
    ("put", b"k", None),
    ("delete", b"k", b"v"),
    ("put", b"k"),
    ("put", b"k", b"v", b"extra"),
    None,
    b"put",
]


@pytest.mark.parametrize("bad", BAD_BATCH_ITEMS, ids=repr)
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_batch_with_a_bad_op_changes_nothing(opener, bad, position):
    engine = opener()
    engine.put(b"existing", b"old")
    model = {b"existing": b"old"}
    good = [("put", b"new-1", b"x"), ("delete", b"existing", None), ("put", b"new-2", b"y")]
    batch = list(good)
    batch.insert({"first": 0, "middle": 2, "last": len(good)}[position], bad)
    with pytest.raises((InvalidArgument, TypeError)):
        engine.write(batch)
    assert_same(engine, model)
    if opener.path is not None:
        engine.close()
        assert_same(opener(), model)


def test_batch_over_limits_changes_nothing(opener):
    engine = opener(max_batch_ops=10, max_batch_bytes=1000)
    engine.put(b"existing", b"old")
    with pytest.raises(InvalidArgument):
        engine.write([("put", b"k%d" % i, b"v") for i in range(11)])
    with pytest.raises(InvalidArgument):
        engine.write([("put", b"k%d" % i, b"v" * 300) for i in range(4)])
    engine.write([("put", b"k%d" % i, b"v") for i in range(10)])  # at the limit: fine
    assert_same(engine, {b"existing": b"old", **{b"k%d" % i: b"v" for i in range(10)}})


# ----------------------------------------------------------------- reopen, sync, close


def fill_mixed(engine, rng: random.Random, model: dict, ops: int) -> None:
    keys = [b"key-%03d" % i for i in range(150)]
    for _ in range(ops):
        roll = rng.random()
        key = rng.choice(keys)
        if roll < 0.55:
            model[key] = rng.randbytes(rng.randint(0, 200))
            engine.put(key, model[key])
        elif roll < 0.75:
            model.pop(key, None)
            engine.delete(key)
        else:
            batch = []
            for _ in range(rng.randint(1, 8)):
                k = rng.choice(keys)
                if rng.random() < 0.7:
                    v = rng.randbytes(rng.randint(0, 100))
                    batch.append(("put", k, v))
                    model[k] = v
                else:
                    batch.append(("delete", k, None))
                    model.pop(k, None)
            engine.write(batch)


@pytest.mark.parametrize("sync", ["always", "batch", "never"])
@pytest.mark.parametrize("small_files", [False, True], ids=["default-files", "small-files"])
def test_reopen_keeps_everything(persistent_opener, sync, small_files):
    rng = random.Random(6)
    options = engine_options(persistent_opener.kind, small_files=small_files, sync=sync)
    model: dict[bytes, bytes] = {}
    engine = persistent_opener(**options)
    for round_ in range(3):
        fill_mixed(engine, rng, model, 400)
        if round_ == 1:
            run_maintenance(engine)
        engine.close()
        engine = persistent_opener(**options)
        assert_same(engine, model)
    # reopening without writing in between changes nothing either
    engine.close()
    engine = persistent_opener(**options)
    assert_same(engine, model)


def test_sync_returns_and_data_stays(opener):
    engine = opener(sync="never")
    engine.put(b"a", b"1")
    engine.sync()
    engine.sync()  # twice, nothing new: fine
    assert engine.get(b"a") == b"1"


def test_use_after_close_raises_engine_closed(opener):
    engine = opener()
    engine.put(b"a", b"1")
    engine.close()
    engine.close()  # closing twice is harmless
    calls = {
        "get": lambda: engine.get(b"a"),
        "put": lambda: engine.put(b"a", b"2"),
        "delete": lambda: engine.delete(b"a"),
        "write": lambda: engine.write([("put", b"b", b"1")]),
        "scan": lambda: list(engine.scan()),
        "sync": lambda: engine.sync(),
    }
    for name, call in calls.items():
        with pytest.raises(EngineClosed):
            call()
    if opener.path is not None:
        # nothing was written after close
        assert_same(opener(), {b"a": b"1"})


def test_close_with_a_scan_open(opener):
    engine = opener()
    for i in range(600):
        engine.put(b"k%04d" % i, b"v")
    it = engine.scan()
    assert next(it) == (b"k0000", b"v")
    engine.close()
    # the open iterator either goes on or raises EngineClosed; it never crashes otherwise
    try:
        rest = list(it)
    except EngineClosed:
        rest = None
    if rest is not None:
        keys = [k for k, _ in rest]
        assert keys == sorted(set(keys))
    if opener.path is not None:
        assert len(list(opener().scan())) == 600


# ---------------------------------------------------------------------------- threads


def test_threads_writing_and_scanning(opener):
    """Writers on disjoint key ranges and scanners at once: no exception, every scan in
    strictly increasing (or decreasing) order, and the final state is every writer's last word."""
    engine = opener(**engine_options(opener.kind, small_files=True))
    writers, ops_per_writer = 4, 400
    models: list[dict] = [{} for _ in range(writers)]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(index: int) -> None:
        rng = random.Random(100 + index)
        model = models[index]
        keys = [b"w%d-%03d" % (index, i) for i in range(120)]
        try:
            for _ in range(ops_per_writer):
                roll = rng.random()
                key = rng.choice(keys)
                if roll < 0.6:
                    value = rng.randbytes(rng.randint(0, 150))
                    engine.put(key, value)
                    model[key] = value
                elif roll < 0.8:
                    engine.delete(key)
                    model.pop(key, None)
                else:
                    batch = [("put", k, b"b" * rng.randint(0, 50)) for k in rng.sample(keys, 5)]
                    engine.write(batch)
                    for _, k, v in batch:
                        model[k] = v
                if rng.random() < 0.05:
                    assert engine.get(key) == model.get(key)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    scans = [0]

    def scanner(reverse: bool) -> None:
        try:
            while not done.is_set():
                keys = [k for k, _ in engine.scan(reverse=reverse)]
                expected = sorted(set(keys), reverse=reverse)
                assert keys == expected, "scan out of order or with duplicate keys"
                scans[0] += 1
                # Back-to-back scans hold the GIL while sync writers wait for it after each
                # fsync: 4 writers did ~140 writes/s in all behind 2 busy scanners. A pause
                # keeps this test quick; scans still overlap writes.
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    scanners = [threading.Thread(target=scanner, args=(r,)) for r in (False, True)]
    for t in threads + scanners:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    for t in scanners:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert scans[0] > 0
    model = {k: v for m in models for k, v in m.items()}
    wait_idle(engine)
    assert_same(engine, model)
    if opener.path is not None:
        engine.close()
        assert_same(opener(**engine_options(opener.kind, small_files=True)), model)


def test_concurrent_batches_on_the_same_keys_do_not_interleave(engine):
    """Two writers each overwrite the same 20 keys in one batch, many times, while a reader
    scans. Batches are atomic, so they apply one after the other: at the end every key
    holds the stamp of the same (last) batch, never a mix of the two writers."""
    keys = [b"group-%02d" % i for i in range(20)]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(name: bytes) -> None:
        try:
            for stamp in range(200):
                engine.write([("put", k, name + b"%d" % stamp) for k in keys])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                seen = [k for k, _ in engine.scan(b"group-", b"group.")]
                assert seen == sorted(set(seen))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in (b"a", b"b")]
    scan_thread = threading.Thread(target=reader)
    for t in writers + [scan_thread]:
        t.start()
    for t in writers:
        t.join(timeout=120)
    done.set()
    scan_thread.join(timeout=120)
    assert not errors, errors[:3]
    final = {engine.get(k) for k in keys}
    assert final in ({b"a199"}, {b"b199"}), final
