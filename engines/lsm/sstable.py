"""Immutable sorted tables (SSTables): data blocks, a sparse index, a Bloom filter, a footer.

A table is written once, from keys already in order, and never changed; it is deleted
when compaction has replaced it and no reader holds it. The byte layout is in engines/FORMATS.md.

    data block 0 | crc | data block 1 | crc | ... | index | crc | bloom | crc | footer (56 bytes)

A data block stores its keys and values column-wise (a count, the end offset of every key
and value, a kind byte per entry, then all keys, then all values) so that decoding a block
is a few C-level slices instead of a struct call per entry:

    >>> blob = encode_block([b"a", b"b"], [b"1", TOMBSTONE])
    >>> decode_block(blob)
    ((b'a', b'b'), (b'1', TOMBSTONE))

(the second value is the `TOMBSTONE` singleton: `v is TOMBSTONE` tells a delete from an
empty value). The index keeps the last key of every block in memory, so a get is a Bloom
probe, a bisect over the index, and a search of one block where it lies in the mmap
(`Table.find`); a block's checksum is checked on the table's first read of it.

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
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from itertools import accumulate, chain, repeat
from operator import add, is_, itemgetter

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

# What `Table.take_forward` / `take_backward` found past their last piece.
TAKE_EXHAUSTED = 0  # nothing more in this table: the run goes on with the next one
TAKE_MORE = 1  # more keys in this table
TAKE_END = 2  # the scan's range ends here


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


def decode_block(data) -> tuple[tuple, tuple]:
    """(keys, values) of a data block's contents, as tuples; raises ValueError when lengths
    disagree.

    Tuples, not lists: a cached block is shared by every reader and must not change, and
    the garbage collector stops tracking a tuple of bytes after its first look at it, so
    thousands of cached blocks do not slow every full collection down.

    Keys or values of one size throughout (16-byte keys, 100-byte values: common) are cut
    by one struct.unpack; such runs are recognised by comparing the encoded end offsets
    with those of even pieces, a C-level bytes comparison (see `_split`)."""
    (n,) = _U32.unpack_from(data, 0)
    head = 4 + 9 * n
    if head > len(data):
        raise ValueError(f"block claims {n} entries but holds {len(data)} bytes")
    if not n:
        if head != len(data):
            raise ValueError(f"empty block of {len(data)} bytes")
        return (), ()
    keys_size = _U32.unpack_from(data, 4 * n)[0]
    values_size = _U32.unpack_from(data, 8 * n)[0]
    if head + keys_size + values_size != len(data):
        raise ValueError(f"block of {len(data)} bytes: its offsets describe {head + keys_size + values_size}")
    keys = _split(data, 4, head, keys_size, n)
    values = _split(data, 4 + 4 * n, head + keys_size, values_size, n)
    kinds = data[4 + 8 * n:head]
    if kinds.count(0) != n:
        values = list(values)
        for i, kind in enumerate(kinds):
            if kind == KIND_DELETE:
                values[i] = TOMBSTONE
            elif kind != KIND_PUT:
                raise ValueError(f"entry {i} has unknown kind {kind}")
        values = tuple(values)
    return keys, values


# (width, n) -> (the encoded end offsets of n pieces of `width` bytes, a Struct that cuts
# them, its bound unpack_from). A plain dict: an lru_cache wrapper costs more than the
# unpack it saves. Bounded: cleared when it reaches _EVEN_LIMIT shapes (blocks of one
# store have a handful).
_even_shapes: dict = {}
_EVEN_LIMIT = 4096


def _even_shape(width: int, n: int) -> tuple:
    if len(_even_shapes) >= _EVEN_LIMIT:
        _even_shapes.clear()
    cutter = struct.Struct(f"{width}s" * n)
    shape = _even_shapes[width, n] = (_pack_u32(range(width, width * n + 1, width)), cutter, cutter.unpack_from)
    return shape


def _cutter(width: int, n: int):
    """`unpack_from(buffer, offset)` of n pieces of `width` bytes each."""
    return (_even_shapes.get((width, n)) or _even_shape(width, n))[2]


def _split(data, ends_at: int, area_at: int, area_size: int, n: int) -> tuple:
    """The n pieces of the area at `area_at` whose end offsets (u32, relative to the area)
    are encoded at `ends_at`. When every piece has the same length, one struct.unpack
    cuts them all in C (3x faster than slicing); otherwise they are sliced one by one."""
    width = area_size // n
    if width and width * n == area_size:
        shape = _even_shapes.get((width, n)) or _even_shape(width, n)
        if data[ends_at:ends_at + 4 * n] == shape[0]:
            return shape[1].unpack_from(data, area_at)
    ends = _u32_array(data, ends_at, n)
    area = data[area_at:area_at + area_size]
    return tuple([area[a:b] for a, b in zip(chain((0,), ends), ends)])


def _shape_of(data, offset: int) -> tuple:
    """How the entries of a checked data block (`data`, at `offset` in its file) lie in the
    file, for `Table.find` and short scans: (keys_at, n, key_width, values_at, value_width,
    tombstones, cut_keys, cut_values), absolute offsets; key_width is 0 when keys differ in
    length (then `find` decodes the block), value_width 0 when values do; cut_keys
    (cut_values) is the `unpack_from` that cuts all n keys (values) of one length, else
    None. Raises ValueError for a malformed block, as `decode_block` would (so a get never
    serves from a block a scan would reject)."""
    (n,) = _U32.unpack_from(data, 0)
    head = 4 + 9 * n
    if head > len(data) or not n:
        decode_block(data)  # raises the precise error for a bad or empty block
        raise ValueError("a data block holds no entries")
    keys_size = _U32.unpack_from(data, 4 * n)[0]
    values_size = _U32.unpack_from(data, 8 * n)[0]
    if head + keys_size + values_size != len(data):
        raise ValueError(f"block of {len(data)} bytes: its offsets describe {head + keys_size + values_size}")
    kinds = data[4 + 8 * n:head]
    puts = kinds.count(KIND_PUT)
    if puts != n and puts + kinds.count(KIND_DELETE) != n:
        raise ValueError("an entry has an unknown kind")
    key_width = _even_width(data, 4, keys_size, n)
    value_width = _even_width(data, 4 + 4 * n, values_size, n)
    if not value_width:
        # find() reads value ends straight from the file: they must be in order and in bounds.
        ends = _u32_array(data, 4 + 4 * n, n)
        if any(a > b for a, b in zip(chain((0,), ends), ends)):
            raise ValueError("value end offsets out of order")
    return (offset + head, n, key_width, offset + head + keys_size, value_width, puts != n,
            _cutter(key_width, n) if key_width else None, _cutter(value_width, n) if value_width else None)


def _even_width(data, ends_at: int, area_size: int, n: int) -> int:
    """The common length of the n pieces whose end offsets are at `ends_at`, or 0."""
    width = area_size // n
    if width and width * n == area_size:
        shape = _even_shapes.get((width, n)) or _even_shape(width, n)
        if data[ends_at:ends_at + 4 * n] == shape[0]:
            return width
    return 0


_FIRST_8 = itemgetter(slice(0, 8))


def key_number(key: bytes) -> int:
    """A key's place in the key space as a number: its first 8 bytes, big-endian (keys
    shorter than 8 bytes padded with zeros), so that key order is number order up to ties."""
    return int.from_bytes(key[:8] if len(key) >= 8 else key.ljust(8, b"\0"), "big")


class BlockCache:
    """Decoded blocks, (keys, values) tuples, shared by every table of an engine, bounded
    by `capacity_bytes`.

    Bounded by the encoded size of the blocks it holds; decoded, they cost about 1.6 times
    that in Python objects (16-byte keys, 100-byte values). The key of block i
    of table number t is the int `t << 32 | i` (`cache_key`): hashing an int is cheaper
    than a tuple. Eviction is first-in first-out (an OrderedDict in insertion order): a hit
    is one lock-free lookup, which matters more to a Python get than LRU's better hit rate
    would."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        # OrderedDict, not dict: popping the oldest of a plain dict leaves holes at its
        # front that every later `next(iter(...))` walks over (quadratic).
        self._blocks: OrderedDict = OrderedDict()
        # (block, size) or None, without the lock: a single dict read is atomic.
        self.lookup = self._blocks.get
        self._bytes = 0
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, cache_key):
        """((keys, values), size) or None."""
        return self._blocks.get(cache_key)

    def put(self, cache_key, block, size: int) -> None:
        with self._lock:
            self.misses += 1
            if size > self.capacity_bytes or cache_key in self._blocks:
                return
            self._blocks[cache_key] = (block, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                self._bytes -= self._blocks.popitem(last=False)[1][1]

    def drop_table(self, number: int) -> None:
        with self._lock:
            for cache_key in [k for k in self._blocks if k >> 32 == number]:
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

    Thread-safe: it is immutable, and block reads go through an mmap (slices copy). Once
    a block has been checked, a small tuple notes its shape (`_shape_of`), about 180 bytes
    a block of 4 KiB (5.3 MB for 1,000,000 entries of 116 bytes), and a short scan's first
    use notes the numbers of the index's keys (`key_numbers`, about 45 bytes a block):
    memory in proportion to the index, like its last keys.
    """

    __slots__ = ("number", "path", "size", "entries", "tombstones", "smallest", "largest", "last_keys",
                 "bloom_bits", "bloom_num_bits", "bloom_more_steps",
                 "_offsets", "_sizes", "_bloom", "_file", "_map", "_cache", "_lookup", "_cache_base", "_shapes",
                 "_key_numbers", "__weakref__")

    def __init__(self, path: str, number: int, cache: BlockCache) -> None:
        import weakref

        self.number = number
        self.path = path
        self._cache = cache
        self._lookup = cache.lookup
        self._cache_base = number << 32  # + block index = the block's cache key
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
            # Per data block, once its checksum has been checked: where and how its keys
            # lie in the mapping (`_block_shape`); None until then.
            self._shapes = [None] * count
            self._key_numbers = None  # see key_numbers()
        except (ValueError, struct.error, IndexError) as exc:
            raise CorruptionError(path, index_offset, f"bad index block: {exc}") from None
        try:
            self._bloom = BloomFilter.decode(self._read(bloom_offset, bloom_size))
        except ValueError as exc:
            raise CorruptionError(path, bloom_offset, f"bad bloom filter: {exc}") from None
        # For the engine's get, which probes the filters of several tables inline.
        self.bloom_bits = self._bloom.bits
        self.bloom_num_bits = self._bloom.num_bits
        self.bloom_more_steps = range(self._bloom.num_hashes - 1)

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

    def block(self, index: int, use_cache: bool = True) -> tuple[tuple, tuple]:
        """(keys, values) of data block `index`, from the cache or read, checked, decoded
        and cached.

        Compaction passes use_cache=False: it reads each block once, and must not push
        the blocks that gets and scans use out of the cache. It also checks the checksum
        again even when this table has checked it before: a merge must never carry damage
        into a new table under a fresh checksum."""
        if use_cache:
            entry = self._lookup(self._cache_base + index)
            if entry is not None:
                return entry[0]
        offset = self._offsets[index]
        size = self._sizes[index]
        shape = self._shapes[index] if use_cache else None
        if shape is not None and shape[2] and shape[4]:
            # Checked once already (see `_block_shape`), keys and values each of one
            # length: cut straight out of the mapping, no copy of the block, no checksum.
            keys_at, n, _, values_at, _, tombstones, cut_keys, cut_values = shape
            keys = cut_keys(self._map, keys_at)
            values = cut_values(self._map, values_at)
            if tombstones:
                values = tuple([TOMBSTONE if kind == KIND_DELETE else value
                                for kind, value in zip(self._map[keys_at - n:keys_at], values)])
            block = (keys, values)
        else:
            data = self._map[offset:offset + size] if shape is not None else self._read(offset, size)
            try:
                block = decode_block(data)
                if use_cache and shape is None:
                    self._shapes[index] = _shape_of(data, offset)
            except (ValueError, struct.error) as exc:
                raise CorruptionError(self.path, offset, f"bad data block: {exc}") from None
        if use_cache:
            self._cache.put(self._cache_base + index, block, size)
        return block

    def block_keys(self, index: int) -> tuple:
        """The keys of data block `index`, for short scans (short_scan.py), which then ask
        `block_values` for the values of only the entries they keep.

        A checked block of keys of one length is cut out of the mapping by one
        struct.unpack and not cached: a scan's block costs the same whether or not it was
        read before, and no cache churns (decoding a block and evicting another cost about
        as much as decoding it again). Other blocks come from `block` (decoded, cached)."""
        shape = self._shapes[index] or self._block_shape(index)
        if shape[6] is not None:
            return shape[6](self._map, shape[0])
        return self.block(index)[0]

    def block_values(self, index: int, start: int, stop: int):
        """The values (TOMBSTONE for deletes) of entries [start, stop) of data block
        `index`, after `block_keys(index)`: cut out of the mapping when keys and values are
        each of one length, else sliced from the decoded block."""
        shape = self._shapes[index] or self._block_shape(index)
        keys_at, n, key_width, values_at, value_width, tombstones, _, cut_values = shape
        if not (key_width and value_width):
            return self.block(index)[1][start:stop]
        count = stop - start
        if count == n:
            values = cut_values(self._map, values_at)
        elif count > 0:
            values = (_even_shapes.get((value_width, count)) or _even_shape(value_width, count))[2](
                self._map, values_at + start * value_width)
        else:
            return ()
        if tombstones:
            kinds_at = keys_at - n
            values = tuple([TOMBSTONE if kind == KIND_DELETE else value
                            for kind, value in zip(self._map[kinds_at + start:kinds_at + stop], values)])
        return values

    def key_numbers(self) -> list:
        """`key_number` of the table's first key, then of every block's last key: where
        short scans estimate how densely the table covers the key space (short_scan.py).
        Built on first use (a scan), not at open."""
        numbers = self._key_numbers
        if numbers is None:
            keys = [self.smallest] + self.last_keys
            if min(map(len, keys)) >= 8:  # the usual case, in C: 2,000 blocks in 0.3 ms
                numbers = list(map(int.from_bytes, map(_FIRST_8, keys), repeat("big")))
            else:
                numbers = list(map(key_number, keys))
            self._key_numbers = numbers
        return numbers

    def take_forward(self, after, inclusive: bool, end, need: int, pieces: list, block=None) -> tuple[int, int]:
        """For short scans (short_scan.py): candidates from `after` on (past it when not
        `inclusive`; from the first key when None), before `end` (None: no end), appended
        to `pieces` as (table, block, keys, i, j), one per block: keys[i:j] of data block
        `block`, whose keys are `keys` (a tuple, cut out of the mapping). Whole blocks but
        the first, until `need` candidates are taken.

        Returns (need less what was taken, TAKE_EXHAUSTED: no key of this table is left
        past the last piece | TAKE_MORE: some are | TAKE_END: `end` was reached).
        `block`: the block `after` falls in, when the caller found it already."""
        last_keys = self.last_keys
        count = len(last_keys)
        if after is None or after < self.smallest:
            b, after = 0, None
        elif block is not None:
            b = block
        else:
            b = bisect_left(last_keys, after) if inclusive else bisect_right(last_keys, after)
        shapes = self._shapes
        mapped = self._map
        while b < count:
            shape = shapes[b] or self._block_shape(b)
            keys = shape[6](mapped, shape[0]) if shape[6] is not None else self.block(b)[0]
            i = 0
            if after is not None:
                i = bisect_left(keys, after) if inclusive else bisect_right(keys, after)
                after = None
            j = len(keys)
            if end is not None and keys[-1] >= end:
                j = bisect_left(keys, end, i)
                if j > i:
                    pieces.append((self, b, keys, i, j))
                return need - (j - i), TAKE_END
            if i < j:
                pieces.append((self, b, keys, i, j))
                need -= j - i
            b += 1
            if need <= 0:
                return need, TAKE_MORE if b < count else TAKE_EXHAUSTED
        return need, TAKE_EXHAUSTED

    def take_backward(self, before, inclusive: bool, start, need: int, pieces: list, block=None) -> tuple[int, int]:
        """`take_forward` mirrored: candidates up to `before` (before it when not
        `inclusive`; from the last key when None), from `start` (None: no start) on, whole
        blocks but the first, appended to `pieces` from the highest block down."""
        last_keys = self.last_keys
        if before is None or before > self.largest:
            b, before = len(last_keys) - 1, None
        elif block is not None:
            b = block
        else:
            b = bisect_right(last_keys, before) if inclusive else bisect_left(last_keys, before)
            if b == len(last_keys):
                b -= 1
        shapes = self._shapes
        mapped = self._map
        while b >= 0:
            shape = shapes[b] or self._block_shape(b)
            keys = shape[6](mapped, shape[0]) if shape[6] is not None else self.block(b)[0]
            j = len(keys)
            if before is not None:
                j = bisect_right(keys, before) if inclusive else bisect_left(keys, before)
                before = None
            if start is not None and keys[0] < start:
                i = bisect_left(keys, start, 0, j)
                if j > i:
                    pieces.append((self, b, keys, i, j))
                return need - (j - i), TAKE_END
            if j:
                pieces.append((self, b, keys, 0, j))
                need -= j
            b -= 1
            if need <= 0:
                return need, TAKE_MORE if b >= 0 else TAKE_EXHAUSTED
        return need, TAKE_EXHAUSTED

    def get(self, key: bytes, hash_pair) -> bytes | None:
        """The value (maybe TOMBSTONE) this table holds for `key`, or None."""
        if not self._bloom.may_contain(hash_pair):
            return None
        return self.find(key)

    def find(self, key: bytes) -> bytes | None:
        """`get` after its Bloom probe passed: the value (maybe TOMBSTONE) or None.

        A bisect over the index picks the block. A block of keys of one length (the usual
        case) is searched where it lies, in the mapping (the OS page cache), without
        decoding it: `mmap.find` of the key in the block's key area (C), kept only at a
        multiple of the key length, then one slice for the value. Nothing is allocated
        but the value, so gets need no block cache. The block's checksum is checked the
        first time this table reads it (`_block_shape`). Blocks of keys of mixed lengths
        are decoded and cached (`block`) and searched by bisection.

            keys area of a block of 16-byte keys:  k0 k1 k2 ...   find(k2) -> 32 -> entry 2
        """
        last_keys = self.last_keys
        index = bisect_left(last_keys, key)
        if index == len(last_keys):
            return None
        shape = self._shapes[index] or self._block_shape(index)
        keys_at, n, key_width, values_at, value_width, tombstones, _, _ = shape
        if not key_width:
            keys, values = self.block(index)
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                return values[i]
            return None
        if len(key) != key_width:
            return None
        mapped = self._map
        keys_end = keys_at + n * key_width
        at = mapped.find(key, keys_at, keys_end)
        while at >= 0:
            i, misaligned = divmod(at - keys_at, key_width)
            if not misaligned:
                if tombstones and mapped[keys_at - n + i] == KIND_DELETE:
                    return TOMBSTONE
                if value_width:
                    start = values_at + i * value_width
                    return mapped[start:start + value_width]
                # Values of mixed lengths: entry i's value ends where the u32 at block
                # byte 4 + 4n + 4i says (the block starts 4 + 9n bytes before keys_at),
                # relative to the value area, and starts where entry i - 1's ends.
                ends_at = keys_at - 5 * n + 4 * i
                start = _U32.unpack_from(mapped, ends_at - 4)[0] if i else 0
                end = _U32.unpack_from(mapped, ends_at)[0]
                return mapped[values_at + start:values_at + end]
            # A match straddling two keys (a key whose bytes span a boundary): look on.
            at = mapped.find(key, at + 1, keys_end)
        return None

    def _block_shape(self, index: int) -> tuple:
        """Check data block `index` (checksum and lengths) and memoise its shape."""
        offset = self._offsets[index]
        data = self._read(offset, self._sizes[index])
        try:
            shape = _shape_of(data, offset)
        except (ValueError, struct.error) as exc:
            raise CorruptionError(self.path, offset, f"bad data block: {exc}") from None
        self._shapes[index] = shape
        return shape

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
