"""Damaged files never serve wrong data (generic, for every engine that keeps files).

The engine writes a known data set with small files and closes. Then, one damage at a time
on a copy of its directory, a byte of one file is flipped or a file's tail is cut, and the
engine is opened and read whole. For every key the only acceptable answers are:

- the value that was written;
- `CorruptionError` (from the read, or from opening, naming the damaged file);
- nothing, only when the engine reports that it cut a torn log tail (`stats()`), and then
  only for a suffix of the writes (recovery to a prefix of the history).

A wrong value, a key nobody wrote, or any other exception type is a failure.

The torn-tail tests find the active log generically: the file that grows when one more
write is acknowledged with `sync="always"`. They copy the directory while the engine is
still open (as kill -9 would leave it), tear the last record, and expect the engine to
open with every earlier write, the torn one gone, and the cut counted in `stats()`.
"""
from __future__ import annotations

import os
import random
import shutil

import pytest

from engines import CorruptionError, open_engine

from .conftest import engine_files, engine_options, tail_cuts


def file_sizes(path: str) -> dict[str, int]:
    """Sizes of the files in an engine's directory (files that vanish meanwhile skipped)."""
    sizes = {}
    for name in engine_files(path):
        try:
            sizes[name] = os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return sizes


def probe_active_log(engine, path: str, key: bytes, value: bytes) -> tuple[str, int] | None:
    """Write one record durably and return (the file it was appended to, where it starts):
    the one file that existed before and grew. None when that is ambiguous (a rotation or
    background work changed files meanwhile); the caller writes another record."""
    engine.sync()
    before = file_sizes(path)
    engine.put(key, value)
    engine.sync()
    after = file_sizes(path)
    grown = [name for name in after if name in before and after[name] > before[name]]
    if len(grown) != 1:
        return None
    return grown[0], before[grown[0]]


def write_known_data(kind: str, path: str, count: int = 400, seed: int = 21):
    """Each key written once, in this order. Returns ([(key, value)] in write order, the
    active log, the offset in it where the last record starts)."""
    rng = random.Random(seed)
    writes = []
    engine = open_engine(kind, path, **engine_options(kind, small_files=True, sync="never"))
    try:
        for i in range(count):
            key = b"key-%05d-" % i + rng.randbytes(rng.randint(0, 8)).hex().encode()
            value = rng.randbytes(rng.randint(1, 300))
            if rng.random() < 0.1:
                engine.write([("put", key, value)])
            else:
                engine.put(key, value)
            writes.append((key, value))
        for attempt in range(20):
            key, value = b"key-%05d-last" % (count + attempt), b"the last record %d" % attempt
            probe = probe_active_log(engine, path, key, value)
            writes.append((key, value))
            if probe is not None:
                break
        else:
            raise AssertionError("could not tell which file is the active log")
    finally:
        engine.close()
    return writes, probe[0], probe[1]


@pytest.fixture
def pristine(persistent_kind, tmp_path):
    path = str(tmp_path / "pristine")
    writes, active_log, last_record_at = write_known_data(persistent_kind, path)
    files = engine_files(path)
    assert files, "the engine wrote no files"
    return persistent_kind, path, writes, files, (active_log, last_record_at)


def names_file(error: CorruptionError, damaged: str) -> bool:
    if getattr(error, "path", None):
        try:
            if os.path.realpath(error.path) == os.path.realpath(damaged):
                return True
        except OSError:
            pass
    return os.path.basename(damaged) in str(error)


def check_reads(kind: str, path: str, damaged: str, writes: list[tuple[bytes, bytes]], what: str, *,
                may_cut: bool) -> str:
    """Open and read everything after one damage; returns how the engine coped (for the log).

    `may_cut`: the damaged file is the active log, whose damaged tail the engine may cut
    (losing a suffix of the writes) instead of raising CorruptionError."""
    expected = dict(writes)
    try:
        engine = open_engine(kind, path, **engine_options(kind, small_files=True, sync="never"))
    except CorruptionError as exc:
        assert names_file(exc, damaged), f"{what}: CorruptionError on open does not name {damaged}: {exc}"
        return "refused to open"
    try:
        cuts = tail_cuts(engine.stats())
        answers: dict[bytes, object] = {}
        for key, value in writes:
            try:
                got = engine.get(key)
            except CorruptionError as exc:
                answers[key] = exc
                continue
            assert got is None or got == value, f"{what}: get({key!r}) returned a wrong value"
            answers[key] = got
        missing = [i for i, (key, _) in enumerate(writes) if answers[key] is None]
        if missing:
            assert may_cut, (
                f"{what}: {len(missing)} acknowledged keys missing (first {writes[missing[0]][0]!r}), without "
                f"CorruptionError, after damage that is not a torn tail: not in the last record of the active log "
                f"(stats report {cuts} cut tails)"
            )
            assert cuts > 0, f"{what}: {len(missing)} keys silently missing (first {writes[missing[0]][0]!r}) with no torn tail reported"
            present = [i for i, (key, _) in enumerate(writes) if isinstance(answers[key], bytes)]
            assert not present or max(present) < min(missing), (
                f"{what}: after cutting a tail the engine lost write #{min(missing)} but kept the later #{max(present)}"
            )
        try:
            scanned = list(engine.scan())
        except CorruptionError:
            scanned = None
        if scanned is not None:
            for key, value in scanned:
                assert key in expected, f"{what}: scan returned a key nobody wrote: {key!r}"
                assert value == expected[key], f"{what}: scan returned a wrong value for {key!r}"
            keys = [k for k, _ in scanned]
            assert keys == sorted(set(keys)), f"{what}: scan out of order or with duplicates"
            seen = set(keys)
            for key, answer in answers.items():
                if isinstance(answer, bytes):
                    assert key in seen, f"{what}: get({key!r}) finds it but scan silently skips it"
                elif isinstance(answer, CorruptionError):
                    assert key in seen, f"{what}: get({key!r}) raises CorruptionError but scan silently skips it"
        errors = sum(isinstance(a, CorruptionError) for a in answers.values())
        return f"opened; {errors} reads raised, {len(missing)} cut, cuts={cuts}"
    finally:
        engine.close()


def damage_positions(size: int, rng: random.Random, extra: int) -> list[int]:
    picks = {0, 1, 4, 8, size // 3, size // 2, size - 9, size - 2, size - 1}
    picks.update(rng.randrange(size) for _ in range(extra))
    return sorted(p for p in picks if 0 <= p < size)


def flip_cases(pristine, extra_positions: int):
    kind, path, writes, files, active_log = pristine
    rng = random.Random(31)
    for name in files:
        size = os.path.getsize(os.path.join(path, name))
        for position in damage_positions(size, rng, extra_positions):
            yield name, position


def run_flips(pristine, tmp_path, extra_positions: int) -> dict:
    kind, path, writes, files, active_log = pristine
    outcomes: dict[str, int] = {}
    for n, (name, position) in enumerate(flip_cases(pristine, extra_positions)):
        copy = str(tmp_path / f"flip-{n}")
        shutil.copytree(path, copy)
        damaged = os.path.join(copy, name)
        with open(damaged, "r+b") as f:
            f.seek(position)
            byte = f.read(1)
            f.seek(position)
            f.write(bytes([byte[0] ^ 0x5A]))
        # Only the last record of the active log may be cut: damage before it is followed by
        # valid records, so it is no torn write and must raise CorruptionError (or be harmless).
        may_cut = name == active_log[0] and position >= active_log[1]
        outcome = check_reads(kind, copy, damaged, writes, f"{name} byte {position} flipped", may_cut=may_cut)
        key = outcome.split(";")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
        shutil.rmtree(copy)
    return outcomes


def run_cuts(pristine, tmp_path) -> dict:
    kind, path, writes, files, active_log = pristine
    outcomes: dict[str, int] = {}
    for n, name in enumerate(files):
        size = os.path.getsize(os.path.join(path, name))
        for new_size in sorted({0, size // 2, max(0, size - 7), max(0, size - 1)}):
            if new_size == size:
                continue
            copy = str(tmp_path / f"cut-{n}-{new_size}")
            shutil.copytree(path, copy)
            damaged = os.path.join(copy, name)
            os.truncate(damaged, new_size)
            outcome = check_reads(kind, copy, damaged, writes, f"{name} cut from {size} to {new_size} bytes",
                                  may_cut=name == active_log[0])
            key = outcome.split(";")[0]
            outcomes[key] = outcomes.get(key, 0) + 1
            shutil.rmtree(copy)
    return outcomes


def test_pristine_copy_reads_back(pristine, tmp_path):
    """The harness itself: an undamaged copy opens with every write and no cut reported."""
    kind, path, writes, files, active_log = pristine
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    engine = open_engine(kind, copy, **engine_options(kind, small_files=True))
    try:
        assert dict(engine.scan()) == dict(writes)
        assert tail_cuts(engine.stats()) == 0
    finally:
        engine.close()


def test_flipped_bytes_never_return_wrong_values(pristine, tmp_path):
    run_flips(pristine, tmp_path, extra_positions=2)


def test_cut_file_tails_never_return_wrong_values(pristine, tmp_path):
    run_cuts(pristine, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_flipped_bytes_many_positions(pristine, tmp_path):
    run_flips(pristine, tmp_path, extra_positions=60)


# ------------------------------------------------------------------- torn active log


@pytest.fixture
def crashed_with_tail(persistent_kind, tmp_path):
    """A directory as kill -9 leaves it after 50 acknowledged writes and one more, and the
    active log (the file that grew for the last write) with its size before that write."""
    kind = persistent_kind
    path = str(tmp_path / "live")
    engine = open_engine(kind, path, sync="always")
    try:
        writes = [(b"early-%03d" % i, b"value-%03d-" % i + b"x" * (i % 40)) for i in range(50)]
        for key, value in writes:
            engine.put(key, value)
        before = {name: os.path.getsize(os.path.join(path, name)) for name in engine_files(path)}
        engine.put(b"last-key", b"last-value" * 20)
        after = {name: os.path.getsize(os.path.join(path, name)) for name in engine_files(path)}
        grown = [name for name in after if after[name] > before.get(name, 0)]
        assert len(grown) == 1, f"expected one active log to grow on a sync write, got {grown} ({before} -> {after})"
        crashed = str(tmp_path / "crashed")
        shutil.copytree(path, crashed)
    finally:
        engine.close()
    name = grown[0]
    return kind, crashed, name, before.get(name, 0), after[name], writes


def reopen_after_damage(kind, crashed, tmp_path, label, damage) -> tuple[dict, dict]:
    copy = str(tmp_path / label)
    shutil.copytree(crashed, copy)
    damage(copy)
    engine = open_engine(kind, copy, sync="always")
    try:
        engine._check()
        state = dict(engine.scan())
        stats = engine.stats()
        # the engine goes on working after the cut, and keeps what it writes next
        engine.put(b"after-recovery", b"ok")
    finally:
        engine.close()
    engine = open_engine(kind, copy, sync="always")
    try:
        assert engine.get(b"after-recovery") == b"ok", f"{label}: a write after recovering from a torn tail was lost"
        assert engine.get(b"early-000") is not None
    finally:
        engine.close()
    return state, stats


def test_torn_tail_of_active_log_is_cut(crashed_with_tail, tmp_path):
    kind, crashed, name, before, after, writes = crashed_with_tail
    record = after - before
    cuts = sorted({1, 2, record // 2, record - 1} & set(range(1, record)))
    for cut in cuts:
        def damage(copy, cut=cut):
            os.truncate(os.path.join(copy, name), before + cut)

        state, stats = reopen_after_damage(kind, crashed, tmp_path, f"torn-{cut}", damage)
        assert state == dict(writes), f"{name} torn {cut} bytes into its last record: earlier writes lost or wrong"
        assert tail_cuts(stats) >= 1, f"{name} torn {cut} bytes into its last record: cut not reported in stats {stats}"


def test_whole_last_record_cut_is_a_clean_log(crashed_with_tail, tmp_path):
    kind, crashed, name, before, after, writes = crashed_with_tail

    def damage(copy):
        os.truncate(os.path.join(copy, name), before)

    state, _ = reopen_after_damage(kind, crashed, tmp_path, "record-boundary", damage)
    assert state == dict(writes)


def test_crashed_copy_without_damage_keeps_the_last_write(crashed_with_tail, tmp_path):
    kind, crashed, name, before, after, writes = crashed_with_tail
    state, stats = reopen_after_damage(kind, crashed, tmp_path, "undamaged", lambda copy: None)
    assert state == {**dict(writes), b"last-key": b"last-value" * 20}
    assert tail_cuts(stats) == 0


@pytest.mark.parametrize("garbage", ["zeros", "random"])
def test_garbage_after_the_last_record_is_cut(crashed_with_tail, tmp_path, garbage):
    """What a crash during an append can leave: the file extended with zeros or junk."""
    kind, crashed, name, before, after, writes = crashed_with_tail
    junk = bytes(300) if garbage == "zeros" else random.Random(5).randbytes(300)

    def damage(copy):
        with open(os.path.join(copy, name), "ab") as f:
            f.write(junk)

    state, stats = reopen_after_damage(kind, crashed, tmp_path, f"garbage-{garbage}", damage)
    assert state == {**dict(writes), b"last-key": b"last-value" * 20}
    assert tail_cuts(stats) >= 1, f"{garbage} after the last record of {name}: cut not reported in stats {stats}"


def test_corrupt_last_record_is_cut(crashed_with_tail, tmp_path):
    """A flipped byte inside the last record of the active log: its checksum fails, it is
    cut like a torn tail (never served), and every earlier write stays."""
    kind, crashed, name, before, after, writes = crashed_with_tail
    position = before + (after - before) * 3 // 4

    def damage(copy):
        with open(os.path.join(copy, name), "r+b") as f:
            f.seek(position)
            byte = f.read(1)
            f.seek(position)
            f.write(bytes([byte[0] ^ 0xFF]))

    try:
        state, stats = reopen_after_damage(kind, crashed, tmp_path, "flipped-last", damage)
    except CorruptionError as exc:
        # refusing to open is also safe, if it names the file
        assert os.path.basename(name) in str(exc)
        return
    assert state == dict(writes), "the corrupt last record was served, or earlier writes were lost"
    assert tail_cuts(stats) >= 1
