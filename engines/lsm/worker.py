"""Flushes and compactions in a child process, so they do not compete for the GIL.

A flush or a compaction is seconds of pure-Python CPU work (decoding, merging, encoding
blocks, building Bloom filters). In a thread of the engine's process it holds the GIL
for up to `sys.getswitchinterval()` (5 ms) at a time, so every get, put and scan behind it
waits: measured, a 1,000,000-key fill ran at a third of its speed and scans had 12 ms
p99s. A child process runs the same code on another core, and the engine's threads only
wait for its answer (a blocking pipe read, which releases the GIL).

    client = WorkerClient()
    meta = client.call("flush_memtable", path="/d/000012.sst.worker.tmp", entries={b"a": b"1"},
                       block_bytes=4096, bloom_bits_per_key=10)
    client.close()

Protocol: length-prefixed pickles on the child's stdin and stdout, one request then one
reply, `(kind, kwargs)` -> `("ok", result)` or `("error", details)`. The child is
`python -c "from engines.lsm.worker import main; main()"`, started with `subprocess` (not `multiprocessing`, whose
spawn re-imports the parent's `__main__`). It writes tables only under names ending in
`.worker.tmp`; the engine renames them into place, so a worker outliving a killed engine
can never overwrite a file a new engine opened (and `.tmp` files are deleted on open).
It exits when its stdin closes (the engine closed or died), and abandons a merge when
its parent changes (the engine was killed mid-compaction).
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading

from ..base import CorruptionError, EngineError

_LENGTH = struct.Struct("<Q")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER_SUFFIX = ".worker.tmp"


class WorkerDied(EngineError):
    """The worker process ended before answering (killed, or the engine is closing)."""


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream):
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        return None
    return pickle.loads(data)


# ----------------------------------------------------------------------- the child


def _flush_memtable(path, entries, block_bytes, bloom_bits_per_key):
    """A frozen memtable's table from its dict of entries (key -> value or TOMBSTONE), sent
    unsorted: the engine pickles one dict (C, ~0.5 us an entry) and leaves the sort
    here, off its GIL. None for an empty memtable."""
    from .sstable import write_table

    assert path.endswith(WORKER_SUFFIX)
    if not entries:
        return None
    keys = sorted(entries)
    return write_table(path, keys, list(map(entries.__getitem__, keys)), block_bytes=block_bytes,
                       bloom_bits_per_key=bloom_bits_per_key)


def _compact(runs, output_paths, drop_tombstones, block_bytes, bloom_bits_per_key, target_file_bytes, parent):
    from .compaction import merge_runs
    from .sstable import BlockCache, Table, write_table

    cache = BlockCache(1)  # compaction reads bypass it anyway
    tables = [[Table(path, i, cache) for i, path in enumerate(run)] for run in runs]
    names = iter(output_paths)

    def write_output(keys, values):
        path = next(names)
        assert path.endswith(WORKER_SUFFIX)
        meta = write_table(path, keys, values, block_bytes=block_bytes, bloom_bits_per_key=bloom_bits_per_key)
        return path, meta

    return merge_runs(tables, drop_tombstones=drop_tombstones, target_file_bytes=target_file_bytes,
                      write_output=write_output, should_stop=lambda: os.getppid() != parent)


_HANDLERS = {"flush_memtable": _flush_memtable, "compact": _compact}


def main() -> None:
    requests = sys.stdin.buffer
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the pipe
    parent = os.getppid()
    while True:
        request = _receive(requests)
        if request is None:
            return
        kind, kwargs = request
        if kind == "compact":
            kwargs["parent"] = parent
        try:
            reply = ("ok", _HANDLERS[kind](**kwargs))
        except CorruptionError as exc:
            reply = ("corruption", (exc.path, exc.offset, exc.reason))
        except BaseException as exc:  # noqa: BLE001 - sent to the engine, which raises it
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _send(replies, reply)
        except BrokenPipeError:
            return


# ----------------------------------------------------------------------- the engine's side


class WorkerClient:
    """One worker process, started on first use; calls are serialised (one at a time)."""

    def __init__(self, name: str = "capkv-lsm-worker") -> None:
        self.name = name
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.calls = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.Popen(
            # -c, not -m: under -m the module would run twice (as __main__ and as itself).
            [sys.executable, "-c", "from engines.lsm.worker import main; main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=_PACKAGE_ROOT, close_fds=True,
        )

    def call(self, kind: str, **kwargs):
        with self._lock:
            if self._closed:
                raise WorkerDied(f"{self.name} is closed")
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            try:
                _send(process.stdin, (kind, kwargs))
                reply = _receive(process.stdout)
            except (BrokenPipeError, OSError, ValueError):
                reply = None
            self.calls += 1
            if reply is None:
                process.kill()
                process.wait()
                self._process = None
                raise WorkerDied(f"{self.name} ended during {kind!r}")
        status, result = reply
        if status == "ok":
            return result
        if status == "corruption":
            raise CorruptionError(*result)
        raise EngineError(f"{self.name}: {kind} failed: {result}")

    def kill(self) -> None:
        """Stop at once (a merge in progress is abandoned); later calls raise WorkerDied."""
        self._closed = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()

