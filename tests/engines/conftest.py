"""Shared fixtures for the engine suites that every engine must pass (Riak's `standard_test`).

Every suite here is parametrized over `ENGINE_KINDS` and opens engines only through
`engines.open_engine(kind, path, **options)`, so a new engine joins every suite by being
added to that tuple. An engine whose package cannot be imported yet is skipped with the
import error as the reason, so the suites run while the engines are being written.

    def test_roundtrip(engine):          # one engine per kind, closed after the test
        engine.put(b"k", b"v")
        assert engine.get(b"k") == b"v"

    def test_reopen(persistent_opener):
        e = persistent_opener()          # opens each persistent kind in the test's directory
        e.put(b"k", b"v"); e.close()
        assert persistent_opener().get(b"k") == b"v"
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import pytest

import engines
from engines import open_engine

ENGINE_KINDS: tuple[str, ...] = tuple(engines.ENGINE_KINDS)
# Engines that keep their data in files and must keep it across close/reopen and kill -9.
PERSISTENT_KINDS: tuple[str, ...] = tuple(k for k in ENGINE_KINDS if k != "memory")

# Options that make an engine roll over to new files after a few KiB, so a test with a few
# hundred keys already spans several SSTables / data files, flushes and compactions. Each
# name is the one the engine's own options dataclass uses (engines/hash/, engines/lsm/).
SMALL_FILE_OPTIONS: dict[str, dict] = {
    "memory": {},
    # data files of 16 KiB; merge in the background once 16 KiB are dead
    "hash": {"max_file_bytes": 16 * 1024, "merge_min_dead_bytes": 16 * 1024},
    # memtables and SSTables of 16 KiB, level 1 full at 64 KiB: flushes and compactions
    # into several levels within a few hundred writes
    "lsm": {"memtable_bytes": 16 * 1024, "target_file_bytes": 16 * 1024, "level1_max_bytes": 64 * 1024,
            "block_bytes": 1024},
}

# The stats() counters in which each engine reports the torn or corrupt log tails it cut
# when it opened (engines/hash/engine.py, engines/lsm/engine.py). Summed by `tail_cuts()`.
TAIL_CUT_STATS: tuple[str, ...] = ("torn_tails", "wal_torn_tails")


# The class `engines.open_engine` imports for each kind (see engines/__init__.py).
ENGINE_CLASSES: dict[str, str] = {"memory": "MemoryEngine", "hash": "HashEngine", "lsm": "LSMEngine"}


def require_engine(kind: str) -> None:
    """Skip the calling test when engine `kind` cannot be imported yet (importorskip-style)."""
    if kind == "memory":
        return
    class_name = ENGINE_CLASSES.get(kind)
    try:
        module = importlib.import_module(f"engines.{kind}")
        getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"engine {kind!r} is not importable yet: {exc}")


def engine_options(kind: str, *, small_files: bool = False, **options) -> dict:
    """The options to open `kind` with: `small_files` adds `SMALL_FILE_OPTIONS[kind]`."""
    out = dict(SMALL_FILE_OPTIONS.get(kind, {})) if small_files else {}
    out.update(options)
    return out


def maintenance_methods(engine) -> list[Callable[[], object]]:
    """The engine-specific maintenance calls it offers: `flush()`, `compact()`, `merge()`.

    The suites call every one that exists; none is part of the Engine protocol.
    """
    out = []
    for name in ("flush", "compact", "merge"):
        method = getattr(engine, name, None)
        if callable(method):
            out.append(method)
    return out


def run_maintenance(engine) -> None:
    for method in maintenance_methods(engine):
        method()


def wait_idle(engine) -> None:
    """Wait for background work (compaction) when the engine offers a way to."""
    for name in ("wait_idle", "wait_for_compactions", "wait_background"):
        method = getattr(engine, name, None)
        if callable(method):
            method()
            return


def tail_cuts(stats: dict) -> int:
    """How many torn/corrupt log tails the engine says it cut when it opened."""
    return sum(int(stats.get(name) or 0) for name in TAIL_CUT_STATS)


def engine_files(path: str | os.PathLike) -> list[str]:
    """Every regular file under an engine's directory, sorted (relative paths)."""
    out = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, path))
    return sorted(out)


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in engine_files(path))


def model_scan(model: dict, start=None, end=None, reverse=False, limit=None) -> list[tuple[bytes, bytes]]:
    """What `Engine.scan()` must return, computed from a plain dict."""
    keys = sorted(k for k in model if (start is None or k >= start) and (end is None or k < end))
    if reverse:
        keys.reverse()
    if limit is not None:
        keys = keys[:limit]
    return [(k, model[k]) for k in keys]


class Opener:
    """Opens engines of one kind in one directory, and closes all of them after the test.

    `opener()` opens with the options given at construction merged with the call's;
    `opener.path` is the directory (None for memory).
    """

    def __init__(self, kind: str, path: str | None, **defaults) -> None:
        self.kind = kind
        self.path = path
        self.defaults = defaults
        self.opened: list = []

    def __call__(self, **options):
        merged = dict(self.defaults)
        merged.update(options)
        engine = open_engine(self.kind, self.path, **merged)
        self.opened.append(engine)
        return engine

    def close_all(self) -> None:
        for engine in self.opened:
            try:
                engine.close()
            except Exception:
                pass


@pytest.fixture(params=ENGINE_KINDS)
def kind(request) -> str:
    require_engine(request.param)
    return request.param


@pytest.fixture(params=PERSISTENT_KINDS)
def persistent_kind(request) -> str:
    require_engine(request.param)
    return request.param


def _engine_dir(kind: str, tmp_path) -> str | None:
    if kind == "memory":
        return None
    path = tmp_path / f"{kind}-data"
    return str(path)


@pytest.fixture
def opener(kind, tmp_path):
    """Opens engines of every kind (memory too) in this test's directory."""
    op = Opener(kind, _engine_dir(kind, tmp_path))
    yield op
    op.close_all()


@pytest.fixture
def persistent_opener(persistent_kind, tmp_path):
    """Opens engines of every persistent kind in this test's directory."""
    op = Opener(persistent_kind, _engine_dir(persistent_kind, tmp_path))
    yield op
    op.close_all()


@pytest.fixture
def engine(opener):
    """A freshly opened engine of each kind, with default options."""
    return opener()
