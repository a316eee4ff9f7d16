"""The snapshot file: the store at one Raft log index, as pysyncobj stores and ships it.

pysyncobj calls our serializer when it compacts its log and streams the resulting file to
a follower that is too far behind for the log (research/pysyncobj.md §4.2). The file holds
the two log entries pysyncobj needs to restart its log after the snapshot, and every row
of the store's history (`state_machine.SnapshotSource.rows()`); the current-key rows are
rebuilt from history on install. No pickle: a snapshot crosses the network.

Layout (integers big-endian):

    magic  b"CAPKVSNP"  (8)
    format version      u32 = 1
    header length       u32, then the header: JSON {index, revision, compact_revision,
                        last_entry: [b64 command, index, term], prev_entry: [...],
                        cluster: ["host:port", ...]}
    header crc32        u32
    rows, each:         u32 key length | u32 value length | key | value | u32 crc32(key+value)
    trailer:            u32 0xFFFFFFFF | u64 row count | u32 crc32 of every row crc

A file without its trailer, or with any checksum wrong, is refused whole
(`CorruptSnapshot`) before anything is installed.

    write_snapshot(path, header, rows)      # writes path.tmp, fsyncs, renames, fsyncs dir
    header = read_header(path)
    for key, value in read_rows(path): ...
"""
from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from typing import Iterable, Iterator

MAGIC = b"CAPKVSNP"
FORMAT_VERSION = 1
_U32 = struct.Struct(">I")
_ROW = struct.Struct(">II")
_TRAILER_MARK = 0xFFFFFFFF
_TRAILER = struct.Struct(">QI")
# A row is a history row of the engine: a key up to ~8 KiB escaped, a value up to the
# engine's value limit. Anything larger in a file is damage, not data.
MAX_ROW_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024


class CorruptSnapshot(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"snapshot {path}: {reason}")
        self.path = path


def encode_entry(entry) -> list:
    command, index, term = entry
    return [base64.b64encode(bytes(command)).decode(), int(index), int(term)]


def decode_entry(data) -> tuple:
    return (base64.b64decode(data[0]), int(data[1]), int(data[2]))


def fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: str, header: dict, rows: Iterable[tuple[bytes, bytes]], *, durable: bool = True) -> int:
    """Write the snapshot atomically (tmp file, fsync, rename, fsync dir); returns row count."""
    tmp = path + ".writing"
    count = 0
    crcs = 0
    with open(tmp, "wb", buffering=1024 * 1024) as f:
        blob = json.dumps(header, separators=(",", ":")).encode()
        f.write(MAGIC + _U32.pack(FORMAT_VERSION) + _U32.pack(len(blob)) + blob + _U32.pack(zlib.crc32(blob)))
        for key, value in rows:
            crc = zlib.crc32(value, zlib.crc32(key))
            f.write(_ROW.pack(len(key), len(value)) + key + value + _U32.pack(crc))
            crcs = zlib.crc32(_U32.pack(crc), crcs)
            count += 1
        f.write(_U32.pack(_TRAILER_MARK) + _TRAILER.pack(count, crcs))
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_directory(path)
    return count


def _read_exact(f, n: int, path: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptSnapshot(path, f"file ends early at byte {f.tell()}")
    return data


def _open(path: str):
    f = open(path, "rb")
    try:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise CorruptSnapshot(path, "not a capkv snapshot (bad magic)")
        (version,) = _U32.unpack(_read_exact(f, 4, path))
        if version != FORMAT_VERSION:
            raise CorruptSnapshot(path, f"format version {version} is not supported")
        (length,) = _U32.unpack(_read_exact(f, 4, path))
        if length > MAX_HEADER_BYTES:
            raise CorruptSnapshot(path, f"header length {length} is implausible")
        blob = _read_exact(f, length, path)
        (crc,) = _U32.unpack(_read_exact(f, 4, path))
        if zlib.crc32(blob) != crc:
            raise CorruptSnapshot(path, "header checksum mismatch")
        return f, json.loads(blob)
    except BaseException:
        f.close()
        raise


def read_header(path: str) -> dict:
    f, header = _open(path)
    f.close()
    return header


def read_rows(path: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield every row; raises CorruptSnapshot at the first damage (after yielding the rows before it)."""
    f, _ = _open(path)
    with f:
        count = 0
        crcs = 0
        while True:
            (key_length,) = _U32.unpack(_read_exact(f, 4, path))
            if key_length == _TRAILER_MARK:
                expected_count, expected_crcs = _TRAILER.unpack(_read_exact(f, _TRAILER.size, path))
                if expected_count != count or expected_crcs != crcs:
                    raise CorruptSnapshot(path, "trailer does not match the rows")
                return
            (value_length,) = _U32.unpack(_read_exact(f, 4, path))
            if key_length + value_length > MAX_ROW_BYTES:
                raise CorruptSnapshot(path, f"row {count} is implausibly large")
            key = _read_exact(f, key_length, path)
            value = _read_exact(f, value_length, path)
            (crc,) = _U32.unpack(_read_exact(f, 4, path))
            if zlib.crc32(value, zlib.crc32(key)) != crc:
                raise CorruptSnapshot(path, f"row {count} checksum mismatch")
            crcs = zlib.crc32(_U32.pack(crc), crcs)
            count += 1
            yield key, value


def verify(path: str) -> dict:
    """Read the whole file and check every checksum; returns the header."""
    header = read_header(path)
    for _ in read_rows(path):
        pass
    return header
