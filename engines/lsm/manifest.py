"""The manifest: which SSTables make up the store, at which level, and which logs still matter.

It is one small file, `MANIFEST`, replaced whole after every flush and compaction:
written to `MANIFEST.tmp`, fsynced, renamed over `MANIFEST`, and the directory fsynced,
so after a crash it is either the old list or the new one, never a mix.

    magic "capkvMAN" | version u32 | body_length u32 | body_crc32 u32 | body (JSON, UTF-8)

    body = {"next_file": 12, "log_number": 11,
            "tables": [{"file": 9, "level": 0, "size": 4096, "entries": 30, "tombstones": 2,
                        "smallest": "6b31", "largest": "6b39"}]}

`log_number` is the oldest write-ahead log whose records are not yet in a table: on
recovery logs numbered below it are deleted, the rest replayed. Keys are hex strings.

    >>> body = {"next_file": 2, "log_number": 1, "tables": []}
    >>> decode(encode(body), "MANIFEST") == body
    True
"""
from __future__ import annotations

import json
import os
import struct
import zlib

from ..base import CorruptionError

MANIFEST_NAME = "MANIFEST"
MANIFEST_MAGIC = b"capkvMAN"
MANIFEST_VERSION = 1
_HEADER = struct.Struct("<8sIII")  # magic, version, body length, body crc32
# A manifest lists a few hundred tables at most; anything much larger is damage.
MAX_BODY_BYTES = 64 * 1024 * 1024


def encode(body: dict) -> bytes:
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return _HEADER.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, path: str) -> dict:
    """The body of a manifest; `CorruptionError` naming `path` on any damage."""
    if len(data) < _HEADER.size:
        raise CorruptionError(path, 0, f"manifest of {len(data)} bytes is shorter than its header")
    magic, version, length, crc = _HEADER.unpack_from(data, 0)
    if magic != MANIFEST_MAGIC:
        raise CorruptionError(path, 0, f"bad manifest magic {magic!r}")
    if version != MANIFEST_VERSION:
        raise CorruptionError(path, 8, f"manifest format version {version}; this build reads {MANIFEST_VERSION}")
    payload = data[_HEADER.size:]
    if length != len(payload) or length > MAX_BODY_BYTES:
        raise CorruptionError(path, 12, f"manifest body is {len(payload)} bytes, its header says {length}")
    if zlib.crc32(payload) != crc:
        raise CorruptionError(path, _HEADER.size, "manifest checksum mismatch")
    try:
        body = json.loads(payload)
        _validate(body)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptionError(path, _HEADER.size, f"manifest body does not parse: {exc}") from None
    return body


def _validate(body: dict) -> None:
    if not isinstance(body.get("next_file"), int) or not isinstance(body.get("log_number"), int):
        raise ValueError("next_file and log_number must be integers")
    for table in body["tables"]:
        for field in ("file", "level", "size", "entries", "tombstones"):
            if not isinstance(table[field], int) or table[field] < 0:
                raise ValueError(f"table field {field} must be a non-negative integer")
        bytes.fromhex(table["smallest"])
        bytes.fromhex(table["largest"])


def read(directory: str) -> dict | None:
    """The manifest in `directory`, or None when there is none (a new store)."""
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BODY_BYTES + 1024)
    except FileNotFoundError:
        return None
    return decode(data, path)


def write(directory: str, body: dict) -> None:
    """Replace the manifest atomically: temp file, fsync, rename, fsync the directory."""
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(encode(body))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(directory)


def sync_directory(directory: str) -> None:
    """Make renames, creations and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
