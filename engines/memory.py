"""The `memory` engine: a SortedDict under a lock. Volatile; the reference model in tests."""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

from sortedcontainers import SortedDict

from .base import (
    EngineClosed,
    EngineOptions,
    InvalidArgument,
    check_batch,
    check_key,
    check_scan_args,
    check_value,
)

# A scan copies this many items at a time under the lock, so a long scan never holds
# the lock for long and writers interleave with it.
_SCAN_CHUNK = 256


class MemoryEngine:
    def __init__(self, **options) -> None:
        try:
            self.options = EngineOptions(**options)
        except TypeError as exc:
            raise InvalidArgument(f"memory engine: {exc}") from None
        self._data: SortedDict = SortedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._bytes = 0

    def _open(self) -> None:
        if self._closed:
            raise EngineClosed("memory engine is closed")

    def get(self, key: bytes) -> bytes | None:
        key = check_key(key, self.options)
        self._open()
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.write([("put", key, value)])

    def delete(self, key: bytes) -> None:
        self.write([("delete", key, None)])

    def write(self, batch: Sequence) -> None:
        ops = check_batch(batch, self.options)
        with self._lock:
            self._open()
            for op, key, value in ops:
                old = self._data.pop(key, None)
                if old is not None:
                    self._bytes -= len(key) + len(old)
                if op == "put":
                    self._data[key] = value
                    self._bytes += len(key) + len(value)

    def scan(self, start=None, end=None, *, reverse=False, limit=None) -> Iterator[tuple[bytes, bytes]]:
        check_scan_args(start, end, limit)
        self._open()
        return self._scan(None if start is None else bytes(start), None if end is None else bytes(end), reverse, limit)

    def _scan(self, start, end, reverse, limit):
        if limit == 0 or (start is not None and end is not None and start >= end):
            return
        emitted = 0
        # Resume point: the last key emitted; the next chunk starts strictly after it.
        cursor = None
        while True:
            with self._lock:
                if reverse:
                    hi = cursor if cursor is not None else end
                    keys = self._data.irange(start, hi, inclusive=(True, False), reverse=True)
                else:
                    lo = cursor if cursor is not None else start
                    keys = self._data.irange(lo, end, inclusive=(cursor is None, False))
                chunk = []
                for key in keys:
                    chunk.append((key, self._data[key]))
                    if len(chunk) == _SCAN_CHUNK:
                        break
            for item in chunk:
                yield item
                emitted += 1
                if limit is not None and emitted >= limit:
                    return
            if len(chunk) < _SCAN_CHUNK:
                return
            cursor = chunk[-1][0]

    def sync(self) -> None:
        self._open()

    def close(self) -> None:
        self._closed = True

    def stats(self) -> dict:
        return {"engine": "memory", "keys": len(self._data), "live_bytes": self._bytes, "closed": self._closed}

    def __len__(self) -> int:
        return len(self._data)

    def _check(self) -> None:
        with self._lock:
            self._data._check()
            assert self._bytes == sum(len(k) + len(v) for k, v in self._data.items()), "byte accounting drifted"
