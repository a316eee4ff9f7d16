"""Byte layouts of the hash engine's files: data files and hint files (see engines/FORMATS.md).

Pure encoding and decoding over bytes, no file handles, so every rule here is testable on
a buffer. Integers are little-endian. A data file is a header and then records:

    header  magic "CKVHASHD" | version u32 | file id u64                    (20 bytes)
    record  kind u8 | key_len u32 | value_len u32 | key | value | crc32 u32  (13 + k + v)
    batch   kind=3  | op_count u32 | body_len u32 | body | crc32 u32         (13 + body)

Every record ends with the CRC-32 (zlib's) of all its bytes before the CRC. That puts a
record in the form CRC-32 checks fastest: crc32(whole record) is the constant RESIDUE
(0x2144DF1C) exactly when the record is intact, so a get checks a record with one crc32
call and no slicing. A delete is a tombstone: kind 2, value_len 0. A batch's body is its
ops as ordinary records, each with its own CRC; the batch CRC covers the batch fields and
the whole body, so a batch torn anywhere fails one check and is dropped whole:

    put(b"k", b"v")  ->  01 | 01000000 | 01000000 | 6b | 76 | crc      (15 bytes)

A hint file describes one data file exactly: for every key that occurs in the data file,
where its last record there is and whether it is a put or a tombstone. It is columnar so a
restart rebuilds the keydir with C-level loops instead of one Python step per record.
"""
from __future__ import annotations

import struct
import sys
import zlib
from array import array
from itertools import accumulate, pairwise, repeat
from operator import or_

from ..base import CorruptionError

crc32 = zlib.crc32

DATA_MAGIC = b"CKVHASHD"
HINT_MAGIC = b"CKVHASHH"
FORMAT_VERSION = 1

FILE_HEADER = struct.Struct("<8sIQ")
HEADER_SIZE = FILE_HEADER.size  # 20

KIND_PUT = 1
KIND_DELETE = 2
KIND_BATCH = 3

RECORD_FIELDS = struct.Struct("<BII")
FIELDS_SIZE = RECORD_FIELDS.size  # 9: where a record's key starts
CRC = struct.Struct("<I")
RECORD_OVERHEAD = FIELDS_SIZE + CRC.size  # 13
# crc32(message + crc32(message) as u32 little-endian) for every message.
RESIDUE = 0x2144DF1C

HINT_COUNT = struct.Struct("<Q")
HINT_FOOTER = struct.Struct("<QI")  # data file size, crc32 of every byte before the crc

_LITTLE = sys.byteorder == "little"

# ------------------------------------------------------------------------ keydir entries
#
# A keydir entry says where a key's newest record is: (file id, offset, size), packed into
# one int as
#
#     file_id << 64 | offset << 32 | size          (1, 20, 15) -> 1 << 64 | 20 << 32 | 15
#
# rather than held as a tuple. A tuple of three ints is up to four objects in as many
# places in memory: a get from a large keydir paid a cache miss for each, and every put
# made a tuple the cyclic GC tracks (a young collection every 700 puts). One int is one
# object, not tracked by the GC, and 36 instead of about 90 bytes. Offsets and sizes are
# below 2**32 (HashEngine keeps data files under 4 GiB); the file id has no bound (it is
# on top). The low 64 bits, `offset << 32 | size`, are the record's *position* in its
# file: hint lists hold positions (negated for a tombstone), which fit an array("Q")
# whose 32-bit halves are the size and offset columns of a hint file, so a hint is
# written and read without a Python step per entry. Entries are equal exactly when they
# name the same record: positions are never reused.
ENTRY_FILE_SHIFT = 64
ENTRY_OFFSET_SHIFT = 32
ENTRY_FIELD_MASK = (1 << 32) - 1   # offsets and sizes are below 2**32
MAX_FILE_END = 1 << 32             # every data file stays below this size


def pack_entry(file_id: int, offset: int, size: int) -> int:
    """`(file id, offset, size)` of a record -> its keydir entry (see above)."""
    return file_id << ENTRY_FILE_SHIFT | offset << ENTRY_OFFSET_SHIFT | size


def pack_position(offset: int, size: int) -> int:
    """A record's position in its file: a keydir entry without its file id."""
    return offset << ENTRY_OFFSET_SHIFT | size


def unpack_entry(entry: int) -> tuple[int, int, int]:
    """A keydir entry (or, with file id 0, a position) -> `(file id, offset, size)`."""
    return entry >> ENTRY_FILE_SHIFT, entry >> ENTRY_OFFSET_SHIFT & ENTRY_FIELD_MASK, entry & ENTRY_FIELD_MASK


def entry_file(entry: int) -> int:
    return entry >> ENTRY_FILE_SHIFT


def entry_size(entry: int) -> int:
    return entry & ENTRY_FIELD_MASK


def data_file_name(file_id: int) -> str:
    return f"{file_id:016x}.data"


def hint_file_name(file_id: int) -> str:
    return f"{file_id:016x}.hint"


def parse_file_name(name: str) -> tuple[int, str] | None:
    """`"000000000000002a.data"` -> `(42, "data")`; None for names that are not ours."""
    stem, dot, suffix = name.partition(".")
    if suffix not in ("data", "hint") or len(stem) != 16:
        return None
    try:
        return int(stem, 16), suffix
    except ValueError:
        return None


def file_header(magic: bytes, file_id: int) -> bytes:
    return FILE_HEADER.pack(magic, FORMAT_VERSION, file_id)


def check_file_header(buf, magic: bytes, file_id: int, path: str) -> None:
    """Raise CorruptionError unless `buf` starts with our header for `file_id`."""
    if len(buf) < HEADER_SIZE:
        raise CorruptionError(path, 0, f"file is {len(buf)} bytes, shorter than its {HEADER_SIZE}-byte header")
    got_magic, version, got_id = FILE_HEADER.unpack_from(buf, 0)
    if got_magic != magic:
        raise CorruptionError(path, 0, f"bad magic {got_magic!r}, expected {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptionError(path, 8, f"format version {version}; this build reads version {FORMAT_VERSION}")
    if got_id != file_id:
        raise CorruptionError(path, 12, f"header names file id {got_id}, the file name says {file_id}")


def encode_record(kind: int, key: bytes, value: bytes) -> bytes:
    """One put (kind 1) or tombstone (kind 2, value b"") record, CRC last."""
    body = RECORD_FIELDS.pack(kind, len(key), len(value)) + key + value
    return body + CRC.pack(crc32(body))


def encode_batch(records: list[bytes]) -> bytes:
    """Frame already-encoded records as one atomic batch record."""
    body = RECORD_FIELDS.pack(KIND_BATCH, len(records), sum(map(len, records))) + b"".join(records)
    return body + CRC.pack(crc32(body))


def decode_record(rec: bytes, key: bytes | None = None) -> tuple[int, bytes, bytes] | None:
    """`(kind, key, value)` of one whole put/delete record, or None when its CRC, kind,
    lengths or (if given) key do not hold."""
    if len(rec) < RECORD_OVERHEAD:
        return None
    kind, klen, vlen = RECORD_FIELDS.unpack_from(rec, 0)
    if kind not in (KIND_PUT, KIND_DELETE) or RECORD_OVERHEAD + klen + vlen != len(rec) or klen == 0:
        return None
    if crc32(rec) != RESIDUE:
        return None
    got_key = rec[FIELDS_SIZE:FIELDS_SIZE + klen]
    if key is not None and got_key != key:
        return None
    return kind, got_key, rec[FIELDS_SIZE + klen:-4]


class TornTail(Exception):
    """Raised by `parse_records` at the first record that is not whole and valid."""

    def __init__(self, offset: int, reason: str, *, incomplete: bool = False, resume: int | None = None):
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        # incomplete: the record runs past the end of the file (what a crash mid-append
        # leaves). resume: where the next record would start if only this one is damaged.
        self.incomplete = incomplete
        self.resume = resume


def parse_records(buf, start: int, verify_inner: bool = False):
    """Yield `(kind, key, offset, size)` for every put and delete record of a data file
    body `buf[start:]`, batches unpacked; raise TornTail at the first bad or short record.

    Batch ops are covered by the batch CRC, so their own CRCs are checked only with
    `verify_inner` (merge does; recovery trusts the frame).
    """
    end = len(buf)
    pos = start
    unpack = RECORD_FIELDS.unpack_from
    while pos < end:
        if end - pos < RECORD_OVERHEAD:
            raise TornTail(pos, f"{end - pos} bytes left, less than a record", incomplete=True)
        kind, a, b = unpack(buf, pos)
        if kind == KIND_PUT or kind == KIND_DELETE:
            size = RECORD_OVERHEAD + a + b
            if pos + size > end:
                raise TornTail(pos, f"record of {size} bytes runs past the end of the file", incomplete=True)
            if a == 0 or (kind == KIND_DELETE and b != 0):
                raise TornTail(pos, "record lengths are impossible")
            if crc32(buf[pos:pos + size]) != RESIDUE:
                raise TornTail(pos, "record checksum mismatch", resume=pos + size)
            yield kind, bytes(buf[pos + FIELDS_SIZE:pos + FIELDS_SIZE + a]), pos, size
            pos += size
        elif kind == KIND_BATCH:
            size = RECORD_OVERHEAD + b
            if pos + size > end:
                raise TornTail(pos, f"batch of {size} bytes runs past the end of the file", incomplete=True)
            if crc32(buf[pos:pos + size]) != RESIDUE:
                raise TornTail(pos, "batch checksum mismatch", resume=pos + size)
            inner = pos + FIELDS_SIZE
            body_end = inner + b
            items = []
            for _ in range(a):
                if body_end - inner < RECORD_OVERHEAD:
                    raise TornTail(pos, "batch body shorter than its op count", resume=pos + size)
                ikind, ka, vb = unpack(buf, inner)
                isize = RECORD_OVERHEAD + ka + vb
                if ikind not in (KIND_PUT, KIND_DELETE) or inner + isize > body_end or ka == 0:
                    raise TornTail(pos, "batch op malformed", resume=pos + size)
                if verify_inner and crc32(buf[inner:inner + isize]) != RESIDUE:
                    raise TornTail(inner, "batch op checksum mismatch", resume=pos + size)
                items.append((ikind, bytes(buf[inner + FIELDS_SIZE:inner + FIELDS_SIZE + ka]), inner, isize))
                inner += isize
            if inner != body_end:
                raise TornTail(pos, "batch body longer than its ops", resume=pos + size)
            yield from items
            pos += size
        else:
            raise TornTail(pos, f"unknown record kind {kind}")


def find_valid_record(buf, start: int, max_key: int, max_value: int) -> int | None:
    """The offset of the first whole, checksummed record at or after `start`, or None.

    Recovery uses it to tell a torn tail (nothing valid after the damage: cut it) from
    damage in the middle of a file (valid records follow: refuse, never drop them).
    Candidates are the positions of a kind byte 1, 2 or 3, found with bytes.find.
    """
    data = bytes(buf[start:len(buf)])
    candidates = set()
    for kind_byte in (b"\x01", b"\x02", b"\x03"):
        i = data.find(kind_byte)
        while i != -1:
            candidates.add(i)
            i = data.find(kind_byte, i + 1)
    for rel in sorted(candidates):
        if len(data) - rel < RECORD_OVERHEAD:
            break
        kind, a, b = RECORD_FIELDS.unpack_from(data, rel)
        if kind == KIND_BATCH:
            if a == 0:
                continue
            size = RECORD_OVERHEAD + b
        else:
            if a == 0 or a > max_key or b > max_value or (kind == KIND_DELETE and b):
                continue
            size = RECORD_OVERHEAD + a + b
        if rel + size > len(data):
            continue
        if crc32(data[rel:rel + size]) == RESIDUE:
            return start + rel
    return None


# ------------------------------------------------------------------------ hint files
#
#   header   magic "CKVHASHH" | version u32 | file id u64            (20 bytes)
#   count    n u64
#   kinds    n x u8          1 put, 2 tombstone
#   key_lens n x u32
#   sizes    n x u32         record size in the data file
#   offsets  n x u64         record offset in the data file
#   keys     sum(key_lens) bytes, concatenated in entry order
#   footer   data file size u64 | crc32 u32 of every byte before it


def encode_hint(file_id: int, keys: list, positions: list, data_size: int) -> bytes:
    """`keys[i]`'s last record in the data file is at `positions[i]` (`pack_position`),
    negated for a tombstone. Each key appears once (see `last_entries`).

    Built with C-level passes: positions go into an array("Q") whose 32-bit halves are
    the size and offset columns, read out through strided memoryviews. A hint of half a
    million entries is written while writers run (holding the GIL against them): every
    pass of Python int arithmetic here costs about 0.05 us per entry.
    """
    try:
        packed = array("Q", positions)  # raises on a negative position (a tombstone)
        kinds = bytes([KIND_PUT]) * len(keys)
    except OverflowError:
        kinds = bytes([KIND_PUT if position > 0 else KIND_DELETE for position in positions])
        packed = array("Q", list(map(abs, positions)))
    low, high = _halves(packed)  # size, offset of each entry
    sizes = array("I", low.tobytes())
    offsets = array("Q", bytes(8 * len(packed)))
    _halves(offsets)[0][:] = high  # u32 offsets widened to u64
    key_lens = array("I", list(map(len, keys)))
    if not _LITTLE:
        for arr in (key_lens, sizes, offsets):
            arr.byteswap()
    out = b"".join(
        (
            file_header(HINT_MAGIC, file_id),
            HINT_COUNT.pack(len(keys)),
            kinds,
            key_lens.tobytes(),
            sizes.tobytes(),
            offsets.tobytes(),
            b"".join(keys),
            struct.pack("<Q", data_size),
        )
    )
    return out + CRC.pack(crc32(out))


def last_entries(keys: list, values: list) -> tuple[list, list]:
    """Keep each key's last value, in order of first appearance (C-level dict passes)."""
    index = dict(zip(keys, values))
    return list(index), list(index.values())


def decode_hint(buf: bytes, file_id: int, path: str):
    """Return `(data_size, keys, kinds, offsets, sizes)` of a hint file; raise
    CorruptionError naming it when its header, lengths or CRC do not hold."""
    check_file_header(buf, HINT_MAGIC, file_id, path)
    if len(buf) < HEADER_SIZE + HINT_COUNT.size + HINT_FOOTER.size:
        raise CorruptionError(path, len(buf), "hint file too short for its count and footer")
    (stored_crc,) = CRC.unpack_from(buf, len(buf) - 4)
    if crc32(memoryview(buf)[:-4]) != stored_crc:
        raise CorruptionError(path, -1, "hint file checksum mismatch")
    (n,) = HINT_COUNT.unpack_from(buf, HEADER_SIZE)
    pos = HEADER_SIZE + HINT_COUNT.size
    fixed = n * (1 + 4 + 4 + 8)
    if pos + fixed + HINT_FOOTER.size > len(buf):
        raise CorruptionError(path, pos, f"hint file too short for {n} entries")
    kinds = buf[pos:pos + n]
    pos += n
    key_lens = array("I")
    key_lens.frombytes(buf[pos:pos + 4 * n])
    pos += 4 * n
    sizes = array("I")
    sizes.frombytes(buf[pos:pos + 4 * n])
    pos += 4 * n
    offsets = array("Q")
    offsets.frombytes(buf[pos:pos + 8 * n])
    pos += 8 * n
    if not _LITTLE:
        for arr in (key_lens, sizes, offsets):
            arr.byteswap()
    keys_len = sum(key_lens)
    if pos + keys_len + HINT_FOOTER.size != len(buf):
        raise CorruptionError(path, pos, "hint file length does not match its entries")
    blob = buf[pos:pos + keys_len]
    bounds = accumulate(key_lens, initial=0)
    keys = [blob[a:b] for a, b in pairwise(bounds)]
    (data_size,) = struct.unpack_from("<Q", buf, pos + keys_len)
    if kinds.strip(b"\x01\x02"):
        raise CorruptionError(path, HEADER_SIZE + HINT_COUNT.size, "hint entry of unknown kind")
    return data_size, keys, kinds, offsets, sizes


def keydir_entries(file_id: int, offsets, sizes):
    """Lazily the keydir entries (`pack_entry`) of a hint's records (`offsets` an
    array("Q"), `sizes` an array("I")), for `dict.update`: the positions are assembled
    in an array("Q") through strided memoryviews, then one C-level map adds the file."""
    positions = array("Q", bytes(8 * len(sizes)))
    low, high = _halves(positions)
    low[:] = memoryview(sizes).cast("B").cast("I")
    high[:] = _halves(offsets)[0]  # offsets are below 2**32: their low halves
    return map(or_, repeat(file_id << ENTRY_FILE_SHIFT), positions.tolist())


def _halves(words: array):
    """(low halves, high halves) of an array("Q") as strided u32 memoryviews."""
    view = memoryview(words).cast("B").cast("I")
    return (view[0::2], view[1::2]) if _LITTLE else (view[1::2], view[0::2])
