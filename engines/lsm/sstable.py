"""Immutable sorted tables (SSTables): data blocks, a sparse index, a Bloom filter, a footer.

A table is written once, from keys already in order, and never changed; it is deleted
when compaction has replaced it and no reader holds it. The byte layout is in engines/FORMATS.md.

    data block 0 | crc | data block 1 | crc | ... | index | crc | bloom | crc | footer (56 bytes)

A data block stores its keys and values column-wise (a count, the end offset of every key
and value, a kind byte per entry, then all keys, then all values) so that decoding a block
is a few C-level slices instead of a struct call per entry:

    >>> blob = encode_block([b"a", b"b"], [b"1", TOMBSTONE])
    >>> decode_block(blob)
    ([b'a', b'b'], [b'1', b''])

(the second value is the `TOMBSTONE` singleton: `v is TOMBSTONE` tells a delete from an
empty value). The index keeps the last key of every block in memory, so a get is a Bloom
probe, a bisect over the index, one block read (checksummed), and a bisect in the block.

Readers find damage, never serve it: a bad magic, version, footer, block checksum or
length raises `CorruptionError` naming the file and the byte.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import threading
import zlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from functools import lru_cache
from itertools import accumulate, chain, repeat
from operator import add, is_

from ..base import CorruptionError
from .bloom import BloomFilter

SST_MAGIC = b"capkvSST"
SST_VERSION = 1
# index_offset u64, index_size u32, bloom_offset u64, bloom_size u32, entries u64,
# tombstones u64, footer_crc u32, version u32, magic 8 bytes
_FOOTER = struct.Struct("<QIQIQQII8s")
FOOTER_SIZE = _FOOTER.size  # 56
_FOOTER_CRC_SPAN = 8 + 4 + 8 + 4 + 8 + 8
_U32 = struct.Struct("<I")
_INDEX_HEAD = struct.Struct("<II")  # block count, smallest key length

KIND_PUT = 0
KIND_DELETE = 1


class _Tombstone(bytes):
    """The value a delete leaves behind until compaction can drop it (a singleton).

    A bytes subclass of length 0, so joins and lengths need no special case, told apart
    from a real empty value by identity: `value is TOMBSTONE`."""

    def __repr__(self) -> str:
        return "TOMBSTONE"

    def __reduce__(self):
        # Unpickled (in the flush and compaction worker) as the singleton itself.
        return (_the_tombstone, ())


def _the_tombstone() -> "_Tombstone":
    return TOMBSTONE


TOMBSTONE = _Tombstone()

_LITTLE = sys.byteorder == "little"


_U32_CODE = "I" if array("I").itemsize == 4 else "L"


def _u32_array(data, offset: int, count: int) -> array:
    out = array(_U32_CODE)
    out.frombytes(data[offset:offset + 4 * count])
    if not _LITTLE:  # pragma: no cover
        out.byteswap()
    return out


def _u64_array(data, offset: int, count: int) -> array:
    out = array("Q")
    out.frombytes(data[offset:offset + 8 * count])
    if not _LITTLE:  # pragma: no cover
        out.byteswap()
    return out


def _pack_u32(values) -> bytes:
    out = array(_U32_CODE, values)
    if not _LITTLE:  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def encode_block(keys: list, values: list) -> bytes:
    """The contents of one data block (without its checksum); `keys` sorted and distinct."""
    n = len(keys)
    kinds = bytes(map(is_, values, repeat(TOMBSTONE)))  # True -> 1 = KIND_DELETE
    return b"".join(
        (
            _U32.pack(n),
            _pack_u32(accumulate(map(len, keys))),
            _pack_u32(accumulate(map(len, values))),
            kinds,
            b"".join(keys),
            b"".join(values),
        )
    )


def decode_block(data) -> tuple[list, list]:
    """(keys, values) of a data block's contents; raises ValueError when lengths disagree."""
    (n,) = _U32.unpack_from(data, 0)
    head = 4 + 9 * n
    if head > len(data):
        raise ValueError(f"block claims {n} entries but holds {len(data)} bytes")
    key_ends = _u32_array(data, 4, n)
    value_ends = _u32_array(data, 4 + 4 * n, n)
    keys_size = key_ends[-1] if n else 0
    values_size = value_ends[-1] if n else 0
    if head + keys_size + values_size != len(data):
        raise ValueError(f"block of {len(data)} bytes: its offsets describe {head + keys_size + values_size}")
    key_area = data[head:head + keys_size]
    value_area = data[head + keys_size:]
    keys = _split(key_area, key_ends, n)
    values = _split(value_area, value_ends, n)
    kinds = data[4 + 8 * n:head]
    if any(kinds):
        for i, kind in enumerate(kinds):
            if kind == KIND_DELETE:
                values[i] = TOMBSTONE
            elif kind != KIND_PUT:
                raise ValueError(f"entry {i} has unknown kind {kind}")
    return keys, values


def search_block(data: bytes, key: bytes):
    """The value (maybe TOMBSTONE) of `key` in a block's contents, or None; a binary search
    over the encoded block, decoding only the keys it compares (a get needs no more).

    Raises ValueError or IndexError when the block's offsets do not hold together."""
    (n,) = _U32.unpack_from(data, 0)
    key_ends = _u32_array(data, 4, n)
    head = 4 + 9 * n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) >> 1
        begin = key_ends[mid - 1] if mid else 0
        if data[head + begin:head + key_ends[mid]] < key:
            lo = mid + 1
        else:
            hi = mid
    if lo == n or data[head + (key_ends[lo - 1] if lo else 0):head + key_ends[lo]] != key:
        return None
    kind = data[4 + 8 * n + lo]
    if kind == KIND_DELETE:
        return TOMBSTONE
    if kind != KIND_PUT:
        raise ValueError(f"entry {lo} has unknown kind {kind}")
    values_at = head + key_ends[n - 1]
    ends_at = 4 + 4 * n + 4 * lo  # value_ends[lo], and value_ends[lo - 1] before it
    begin = _U32.unpack_from(data, ends_at - 4)[0] if lo else 0
    (finish,) = _U32.unpack_from(data, ends_at)
    if begin > finish or values_at + finish > len(data):
        raise ValueError(f"entry {lo} has value offsets {begin}..{finish} outside its block")
    return data[values_at + begin:values_at + finish]


@lru_cache(maxsize=512)
def _even_ends(width: int, n: int) -> array:
    return array(_U32_CODE, range(width, width * n + 1, width))


@lru_cache(maxsize=512)
def _even_splitter(width: int, n: int) -> struct.Struct:
    return struct.Struct(f"{width}s" * n)


def _split(area: bytes, ends: array, n: int) -> list:
    """area cut at `ends`. When every piece has the same length (fixed-size keys or values,
    common in practice) one struct.unpack cuts them all in C, 3x faster than slicing."""
    if n and ends[0] and ends == _even_ends(ends[0], n):
        return list(_even_splitter(ends[0], n).unpack(area))
    return [area[a:b] for a, b in zip(chain((0,), ends), ends)]


class BlockCache:
    """Decoded blocks shared by every table of an engine, bounded by `capacity_bytes`.

    Bounded by the encoded size of the blocks it holds; the decoded lists cost about twice
    that in Python objects. Keys are (table file number, block index). Eviction is
    first-in first-out (an OrderedDict in insertion order): a hit is one lock-free lookup,
    which matters more to a Python get than LRU's better hit rate would."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        # OrderedDict, not dict: popping the oldest of a plain dict leaves holes at its
        # front that every later `next(iter(...))` walks over (quadratic).
        self._blocks: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, cache_key):
        """(block, size) or None. `block` is the verified encoded bytes (cached by a get)
        or the decoded (keys, values) (cached by a scan)."""
        return self._blocks.get(cache_key)

    def upgrade(self, cache_key, block) -> None:
        """Replace a cached encoded block by its decoded form (same size accounting)."""
        with self._lock:
            entry = self._blocks.get(cache_key)
            if entry is not None:
                self._blocks[cache_key] = (block, entry[1])

    def put(self, cache_key, block, size: int) -> None:
        if size > self.capacity_bytes:
            return
        with self._lock:
            self.misses += 1
            if cache_key in self._blocks:
                return
            self._blocks[cache_key] = (block, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                self._bytes -= self._blocks.popitem(last=False)[1][1]

    def drop_table(self, number: int) -> None:
        with self._lock:
            for cache_key in [k for k in self._blocks if k[0] == number]:
                self._bytes -= self._blocks.pop(cache_key)[1]

    def _check(self) -> None:
        with self._lock:
            assert self._bytes == sum(size for _, size in self._blocks.values()), "block cache bytes drifted"
            assert self._bytes <= self.capacity_bytes


def write_table(path: str, keys: list, values: list, *, block_bytes: int, bloom_bits_per_key: int) -> dict:
    """Write `keys` (sorted, distinct, non-empty) and their values as a table at `path`, fsynced.

    Returns its metadata: {"size", "entries", "tombstones", "smallest", "largest"}.
    The file is written under a temporary name and renamed, so a crash never leaves a
    half table under a name the manifest could point at.
    """
    assert keys and len(keys) == len(values)
    chunks: list[bytes] = []
    offset = 0
    block_offsets: list[int] = []
    block_sizes: list[int] = []
    last_keys: list[bytes] = []
    # Cut blocks where the running size of keys and values crosses block_bytes.
    # Running size of the entries: key, value, and 9 bytes of offsets and kind each.
    sizes = list(accumulate(map(add, map(add, map(len, keys), map(len, values)), repeat(9))))
    start = 0
    n = len(keys)
    while start < n:
        limit = (sizes[start - 1] if start else 0) + block_bytes
        end = bisect_left(sizes, limit, start) + 1
        if end > n:
            end = n
        contents = encode_block(keys[start:end], values[start:end])
        block_offsets.append(offset)
        block_sizes.append(len(contents))
        last_keys.append(keys[end - 1])
        chunks.append(contents)
        chunks.append(_U32.pack(zlib.crc32(contents)))
        offset += len(contents) + 4
        start = end
    smallest = keys[0]
    index = b"".join(
        (
            _INDEX_HEAD.pack(len(last_keys), len(smallest)),
            array("Q", block_offsets).tobytes() if _LITTLE else _swapped("Q", block_offsets),
            _pack_u32(block_sizes),
            _pack_u32(accumulate(map(len, last_keys))),
            smallest,
            b"".join(last_keys),
        )
    )
    index_offset = offset
    chunks.append(index)
    chunks.append(_U32.pack(zlib.crc32(index)))
    offset += len(index) + 4
    bloom = BloomFilter.build(keys, bloom_bits_per_key).encode()
    bloom_offset = offset
    chunks.append(bloom)
    chunks.append(_U32.pack(zlib.crc32(bloom)))
    offset += len(bloom) + 4
    tombstones = sum(map(is_, values, repeat(TOMBSTONE)))
    head = struct.pack("<QIQIQQ", index_offset, len(index), bloom_offset, len(bloom), n, tombstones)
    chunks.append(_FOOTER.pack(index_offset, len(index), bloom_offset, len(bloom), n, tombstones,
                               zlib.crc32(head), SST_VERSION, SST_MAGIC))
    offset += FOOTER_SIZE
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(chunks))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": offset, "entries": n, "tombstones": tombstones, "smallest": smallest, "largest": keys[-1]}


def _swapped(code: str, values) -> bytes:  # pragma: no cover - big-endian hosts only
    out = array(code, values)
    out.byteswap()
    return out.tobytes()


class _TableFile:
    """The open file of a table; closed (and unlinked, once obsolete) when the last
    `Table` referring to it is garbage collected, i.e. when no reader holds it."""

    __slots__ = ("path", "map", "obsolete")

    def __init__(self, path: str, mapped) -> None:
        self.path = path
        self.map = mapped
        self.obsolete = False

    def release(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):  # pragma: no cover - a live memoryview; GC frees it later
            pass
        if self.obsolete:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Table:
    """An open SSTable: its index and Bloom filter in memory, its blocks read on demand.

    Thread-safe: it is immutable, and block reads go through an mmap (slices copy).
    """

    __slots__ = ("number", "path", "size", "entries", "tombstones", "smallest", "largest", "last_keys",
                 "_offsets", "_sizes", "_bloom", "_file", "_map", "_cache", "__weakref__")

    def __init__(self, path: str, number: int, cache: BlockCache) -> None:
        import weakref

        self.number = number
        self.path = path
        self._cache = cache
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptionError(path, -1, "table file named by the manifest is missing") from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size < FOOTER_SIZE:
                raise CorruptionError(path, 0, f"file of {self.size} bytes is shorter than a table footer")
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._map = mapped
        self._file = _TableFile(path, mapped)
        weakref.finalize(self, _TableFile.release, self._file)
        footer_at = self.size - FOOTER_SIZE
        (index_offset, index_size, bloom_offset, bloom_size, entries, tombstones, crc, version,
         magic) = _FOOTER.unpack_from(mapped, footer_at)
        if magic != SST_MAGIC:
            raise CorruptionError(path, footer_at, f"bad table magic {magic!r}")
        if version != SST_VERSION:
            raise CorruptionError(path, footer_at, f"table format version {version}; this build reads {SST_VERSION}")
        if zlib.crc32(mapped[footer_at:footer_at + _FOOTER_CRC_SPAN]) != crc:
            raise CorruptionError(path, footer_at, "footer checksum mismatch")
        if not (index_offset + index_size + 4 <= bloom_offset and bloom_offset + bloom_size + 4 <= footer_at):
            raise CorruptionError(path, footer_at, "footer offsets point outside the file")
        self.entries = entries
        self.tombstones = tombstones
        index = self._read(index_offset, index_size)
        try:
            count, smallest_len = _INDEX_HEAD.unpack_from(index, 0)
            pos = _INDEX_HEAD.size
            self._offsets = _u64_array(index, pos, count)
            pos += 8 * count
            self._sizes = _u32_array(index, pos, count)
            pos += 4 * count
            key_ends = _u32_array(index, pos, count)
            pos += 4 * count
            self.smallest = bytes(index[pos:pos + smallest_len])
            pos += smallest_len
            keys_area = index[pos:]
            if count == 0 or len(key_ends) != count or len(keys_area) != key_ends[-1]:
                raise ValueError("index lengths disagree")
            self.last_keys = [keys_area[a:b] for a, b in zip(chain((0,), key_ends), key_ends)]
            self.largest = self.last_keys[-1]
        except (ValueError, struct.error, IndexError) as exc:
            raise CorruptionError(path, index_offset, f"bad index block: {exc}") from None
        try:
            self._bloom = BloomFilter.decode(self._read(bloom_offset, bloom_size))
        except ValueError as exc:
            raise CorruptionError(path, bloom_offset, f"bad bloom filter: {exc}") from None

    def _read(self, offset: int, size: int) -> bytes:
        """The contents of the block at `offset`, checked against the crc that follows it."""
        end = offset + size
        if end + 4 > self.size:
            raise CorruptionError(self.path, offset, "block extends past the end of the file")
        data = self._map[offset:end]
        (crc,) = _U32.unpack_from(self._map, end)
        if zlib.crc32(data) != crc:
            raise CorruptionError(self.path, offset, "block checksum mismatch")
        return data

    @property
    def block_count(self) -> int:
        return len(self.last_keys)

    def block(self, index: int, use_cache: bool = True) -> tuple[list, list]:
        """(keys, values) of data block `index`, from the cache or read and checked.

        Compaction passes use_cache=False: it reads each block once, and must not push
        the blocks that gets and scans use out of the cache."""
        cache_key = (self.number, index)
        entry = self._cache.get(cache_key) if use_cache else None
        if entry is not None:
            block = entry[0]
            if block.__class__ is not bytes:
                return block
            data = block  # encoded, cached by a get: decode it once, for every later scan
        else:
            data = self._read(self._offsets[index], self._sizes[index])
        try:
            block = decode_block(data)
        except (ValueError, struct.error) as exc:
            raise CorruptionError(self.path, self._offsets[index], f"bad data block: {exc}") from None
        if entry is not None:
            self._cache.upgrade(cache_key, block)
        elif use_cache:
            self._cache.put(cache_key, block, len(data))
        return block

    def get(self, key: bytes, hash_pair) -> bytes | None:
        """The value (maybe TOMBSTONE) this table holds for `key`, or None."""
        # The Bloom probe, inlined (a get runs it once per candidate table).
        bloom = self._bloom
        h1, h2 = hash_pair
        m = bloom.num_bits
        bits = bloom.bits
        for _ in bloom.steps:
            p = h1 % m
            if not (bits[p >> 3] >> (p & 7)) & 1:
                return None
            h1 += h2
        index = bisect_left(self.last_keys, key)
        if index == len(self.last_keys):
            return None
        entry = self._cache.get((self.number, index))
        if entry is None:
            # Not cached: search the encoded block (a full decode costs 3x more), and cache
            # it encoded; a scan that reads it later decodes it in place.
            data = self._read(self._offsets[index], self._sizes[index])
            self._cache.put((self.number, index), data, len(data))
            block = data
        else:
            block = entry[0]
        if block.__class__ is bytes:
            try:
                return search_block(block, key)
            except (ValueError, IndexError, struct.error) as exc:
                raise CorruptionError(self.path, self._offsets[index], f"bad data block: {exc}") from None
        keys, values = block
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return values[i]
        return None

    def may_contain(self, hash_pair) -> bool:
        return self._bloom.may_contain(hash_pair)

    def block_for(self, key: bytes) -> int:
        """Index of the first block whose last key is >= key (block_count if none)."""
        return bisect_left(self.last_keys, key)

    def mark_obsolete(self) -> None:
        """Compaction replaced this table: unlink its file once no reader holds it."""
        self._file.obsolete = True
        self._cache.drop_table(self.number)

    def _check(self) -> None:
        """Every block checksums, decodes, and holds sorted keys inside the index's bounds."""
        previous = None
        total = 0
        for i in range(self.block_count):
            keys, values = self.block(i)
            assert keys, f"{self.path}: block {i} is empty"
            assert len(keys) == len(values)
            for key in keys:
                assert previous is None or previous < key, f"{self.path}: keys out of order in block {i}"
                previous = key
            assert keys[-1] == self.last_keys[i], f"{self.path}: index key of block {i} is not its last key"
            total += len(keys)
        assert total == self.entries, f"{self.path}: footer says {self.entries} entries, blocks hold {total}"
        assert self.block(0)[0][0] == self.smallest

    def __repr__(self) -> str:
        return f"Table({self.number}, {self.entries} entries, {self.smallest!r}..{self.largest!r})"
