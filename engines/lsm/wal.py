"""The write-ahead log: every write is appended here before the memtable sees it.

One log file backs one memtable; when the memtable fills, the engine starts a new log and
the old one is deleted once its memtable is safely in an SSTable named by the manifest.

    header:  magic "capkvWAL" | version u32
    record:  crc32 u32 | length u32 | payload (length bytes)
    payload: one or more ops, each  kind u8 | key_len u32 | value_len u32 | key | value

A batch is one record, so after a crash it is replayed whole or not at all. Replay stops
at the first record that is incomplete or fails its checksum: that is a torn tail (the
process died mid-append, or the OS lost unsynced pages), which is cut off and reported.

    >>> record = encode_put(b"k", b"v")
    >>> decode_payload(record[8:])
    [(0, b'k', b'v')]
"""
from __future__ import annotations

import os
import struct
import zlib

from ..base import CorruptionError

WAL_MAGIC = b"capkvWAL"
WAL_VERSION = 1
_HEADER = struct.Struct("<8sI")
HEADER_SIZE = _HEADER.size  # 12
_RECORD = struct.Struct("<II")  # crc32 of payload, payload length
RECORD_HEADER_SIZE = _RECORD.size
_OP = struct.Struct("<BII")  # kind, key length, value length
OP_PUT = 0
OP_DELETE = 1
_KINDS = {"put": OP_PUT, "delete": OP_DELETE}

_crc32 = zlib.crc32
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_pack_record = _RECORD.pack
_pack_op = _OP.pack


def encode_put(key: bytes, value: bytes) -> bytes:
    """The record of a single put: the engine's fast path."""
    payload = _pack_op(OP_PUT, len(key), len(value)) + key + value
    return _pack_record(_crc32(payload), len(payload)) + payload


def encode_batch(ops) -> bytes:
    """The record of a validated batch of ("put" | "delete", key, value | None)."""
    parts = []
    for op, key, value in ops:
        if value is None:
            value = b""
        parts.append(_pack_op(_KINDS[op], len(key), len(value)))
        parts.append(key)
        parts.append(value)
    payload = b"".join(parts)
    return _pack_record(_crc32(payload), len(payload)) + payload


def decode_payload(payload) -> list[tuple[int, bytes, bytes]]:
    """[(kind, key, value)] of a record's payload; ValueError when it does not parse."""
    ops = []
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + _OP.size > end:
            raise ValueError("op header runs past the record")
        kind, key_len, value_len = _OP.unpack_from(payload, pos)
        pos += _OP.size
        if kind not in (OP_PUT, OP_DELETE) or pos + key_len + value_len > end or key_len == 0:
            raise ValueError(f"bad op (kind {kind}, key {key_len} bytes, value {value_len} bytes)")
        key = bytes(payload[pos:pos + key_len])
        pos += key_len
        value = bytes(payload[pos:pos + value_len])
        pos += value_len
        ops.append((kind, key, value))
    if not ops:
        raise ValueError("empty record")
    return ops


class WalReplay:
    """What replaying one log found: its batches in order, and any torn tail cut off."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches: list[list[tuple[int, bytes, bytes]]] = []
        self.good_bytes = 0
        self.torn_bytes = 0
        self.torn_reason = ""


def _valid_record_after(data: bytes, bad_at: int, bad_length: int) -> int | None:
    """Where a whole record with a good checksum starts after the bad one at `bad_at`, or None.

    A torn write leaves nothing valid behind it; damage in the middle of a log does. Tries
    the offset the bad record's length points to, then every later byte (the length itself
    may be what was damaged): a cost of about one record's size, paid only after damage.
    """
    end = len(data)

    def is_record(at: int) -> bool:
        if at + RECORD_HEADER_SIZE > end:
            return False
        crc, length = _RECORD.unpack_from(data, at)
        body = at + RECORD_HEADER_SIZE
        return 0 < length <= end - body and _crc32(data[body:body + length]) == crc

    pointed = bad_at + RECORD_HEADER_SIZE + bad_length
    if bad_length and is_record(pointed):
        return pointed
    for at in range(bad_at + 1, end - RECORD_HEADER_SIZE + 1):
        if is_record(at):
            return at
    return None


def replay(path: str, *, cut: bool = True, newest: bool = True) -> WalReplay:
    """Read every whole, checksummed record of the log at `path`.

    A torn tail (short header, record past the end of file, checksum mismatch) ends the
    replay; with `cut` the file is truncated there so new appends follow good records.
    Only the newest log can have a torn tail: every older one was complete (and, unless
    sync="never", fsynced) when the next was started. So a bad record in an older log, or
    one followed by a valid record in the newest, is damage, not a tail: `CorruptionError`
    naming the file, as is a bad magic or version.
    """
    result = WalReplay(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER_SIZE and not newest:
        raise CorruptionError(path, 0, f"log of {len(data)} bytes is shorter than its header, and newer logs exist")
    if len(data) < HEADER_SIZE:
        # The header is written with the file's creation, so a shorter log lost its end
        # (or never got its header out before a crash). Either way no record survives:
        # reported as a torn tail, even at 0 bytes, since we cannot tell what was lost.
        result.torn_bytes = max(1, len(data))
        result.torn_reason = f"file of {len(data)} bytes is shorter than its header"
        if cut:
            # Rewritten as a valid empty log, so the next open does not report it again.
            with open(path, "wb") as f:
                f.write(_HEADER.pack(WAL_MAGIC, WAL_VERSION))
        return result
    magic, version = _HEADER.unpack_from(data, 0)
    if magic != WAL_MAGIC:
        raise CorruptionError(path, 0, f"bad write-ahead log magic {magic!r}")
    if version != WAL_VERSION:
        raise CorruptionError(path, 8, f"write-ahead log format version {version}; this build reads {WAL_VERSION}")
    pos = HEADER_SIZE
    end = len(data)
    view = memoryview(data)
    while pos < end:
        if pos + RECORD_HEADER_SIZE > end:
            result.torn_reason = f"record header at byte {pos} is cut short"
            break
        crc, length = _RECORD.unpack_from(data, pos)
        body = pos + RECORD_HEADER_SIZE
        if length == 0:
            # Never written (every record holds an op): a zero-filled tail, as a crash
            # during a file extension leaves it. Its crc of nothing would be 0 and "match".
            result.torn_reason = f"zero-length record at byte {pos}"
            break
        if body + length > end:
            result.torn_reason = f"record at byte {pos} claims {length} bytes; the file ends first"
            break
        payload = view[body:body + length]
        if _crc32(payload) != crc:
            result.torn_reason = f"record at byte {pos} fails its checksum"
            break
        try:
            result.batches.append(decode_payload(payload))
        except ValueError as exc:
            # The checksum held, so this is no torn write: the writer and reader disagree.
            raise CorruptionError(path, pos, f"record with a good checksum does not parse: {exc}") from None
        pos = body + length
    view.release()
    if pos < end:
        if not newest:
            raise CorruptionError(path, pos, f"{result.torn_reason}, in a log that newer logs follow")
        length = _RECORD.unpack_from(data, pos)[1] if pos + RECORD_HEADER_SIZE <= end else 0
        following = _valid_record_after(data, pos, length)
        if following is not None:
            raise CorruptionError(path, pos, f"{result.torn_reason}, yet a valid record follows at byte {following}")
    result.good_bytes = pos
    result.torn_bytes = end - pos
    if result.torn_bytes and cut:
        os.truncate(path, pos)
    return result


class WalWriter:
    """Appends records to a new log file through a bounded in-process buffer.

    `append` is called under the engine's write lock; `flush_buffer` moves buffered bytes
    to the OS (so a killed process keeps them); `fsync` makes them durable. The buffer is
    bounded by `buffer_bytes`: reaching it writes it out.
    """

    def __init__(self, path: str, number: int, *, buffer_bytes: int = 64 * 1024) -> None:
        self.path = path
        self.number = number
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._buffer = bytearray(_HEADER.pack(WAL_MAGIC, WAL_VERSION))
        self._buffer_bytes = buffer_bytes
        self.size = HEADER_SIZE
        self.closed = False
        self.flush_buffer()

    def append(self, record: bytes) -> None:
        buffer = self._buffer
        buffer += record
        self.size += len(record)
        if len(buffer) >= self._buffer_bytes:
            self.flush_buffer()

    def flush_buffer(self) -> None:
        buffer = self._buffer
        if buffer:
            view = memoryview(buffer)
            written = 0
            try:
                while written < len(buffer):
                    written += os.write(self._fd, view[written:])
            finally:
                view.release()
                del buffer[:written]

    def fsync(self) -> None:
        if not self.closed:
            # fdatasync: the data and the file size (appends change it), not the mtime.
            _datasync(self._fd)

    def close(self, *, sync: bool) -> None:
        if self.closed:
            return
        self.flush_buffer()
        if sync:
            _datasync(self._fd)
        os.close(self._fd)
        self.closed = True
