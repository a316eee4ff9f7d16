"""The `hash` engine: Bitcask as Riak uses it (Sheehy & Smith, "Bitcask", 2010).

Every write is appended to the active data file; an in-memory *keydir* maps each live key
to `(file id, offset, size)` of its newest record (packed into one int, format.pack_entry:
one object per key that the cyclic GC does not track), so a get is one dict lookup and one read
(an mmap slice; for the active file, which is mapped again after every `_REMAP_BYTES` it
grows, a `pread` of its last flushed bytes or a copy from the append buffer) plus a CRC
check of the whole record:

    put(b"a", b"1")   -> record at (1, 20, 15)      keydir {a: (1, 20, 15)}
    put(b"a", b"22")  -> record at (1, 35, 16)      keydir {a: (1, 35, 16)}; 15 bytes dead
    delete(b"a")      -> tombstone at (1, 51, 14)   keydir {}; all 45 bytes dead
    ... the active file passes max_file_bytes -> it becomes immutable, file 2 is active
    merge()           -> live records of every immutable file are copied into new files
                         with hint files; the old files are deleted

Files (byte layouts in engines/FORMATS.md and format.py): `<id>.data` data files, `<id>.hint` hint
files. Ids order history: a higher id holds newer records. A merge rotates first and takes
the ids between the newest input and the new active file for its output, so a restart that
replays files in id order always sees a key's newest record last.

Restart reads each data file's hint file when it has one whose recorded size matches the
data file, and scans the data file otherwise (and then writes its hint). Hints are written
for a file when it stops being active: in the background after rotation, at close, after
recovery, and by merge for its output. The newest data file may end in a torn tail (a
crash mid-append): the first bad record is cut when nothing valid follows it; if valid
records follow, the damage is in the middle and opening raises CorruptionError.

Scans: the keydir is a hash, so a scan sorts its keys. The sorted list is cached and
reused; keys added since the last scan are sorted on their own and merged in (timsort
merges two sorted runs in linear time), and the list is rebuilt from the whole keydir
(O(N log N)) when more than half of it is deleted keys. So a scan costs O(N) once keys
changed, O(log N + items) when none did; `stats()` counts `scan_sorts` and
`scan_keys_sorted`. Use the `lsm` engine when range scans dominate.

Threads: one lock (`_lock`) serialises appends and keydir changes; gets take no lock (a
dict lookup of an immutable int entry is atomic under the GIL). A
lock-free read can race with a rotation (the active file's descriptor released as it is
read), a buffer flush, a remap (harmless: the old map stays valid while the reader holds
it) or a merge retiring the file; it then fails its CRC/key check and is retried with
the key's current entry, and a read that still fails on a file no merge retired is
repeated under `_lock`, where nothing moves, before CorruptionError is raised
(`_read_slow`, `_read_locked`). A hit does not check `_closed`: close() closes every map,
so such a read fails and the slow path raises EngineClosed. Group commit shares fsyncs among `sync="always"` writers
(base.GroupCommit; `_sync_files` returns the position its flush and fsync covered, so
writers that appended meanwhile return without an fsync of their own). A merge never
holds the write lock for longer than a buffer flush (see `merge()`); one engine per
directory (a flock on `LOCK`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from typing import Iterator, Sequence

from ..base import (
    CorruptionError,
    EngineClosed,
    EngineError,
    EngineOptions,
    GroupCommit,
    InvalidArgument,
    PeriodicSyncer,
    check_batch,
    check_key,
    check_scan_args,
    check_value,
)
from .format import (
    CRC,
    DATA_MAGIC,
    FIELDS_SIZE,
    HEADER_SIZE,
    KIND_BATCH,
    KIND_DELETE,
    KIND_PUT,
    ENTRY_FILE_SHIFT,
    ENTRY_OFFSET_SHIFT,
    ENTRY_FIELD_MASK,
    MAX_FILE_END,
    RECORD_FIELDS,
    RECORD_OVERHEAD,
    RESIDUE,
    TornTail,
    crc32,
    data_file_name,
    decode_hint,
    decode_record,
    encode_batch,
    encode_hint,
    encode_record,
    check_file_header,
    file_header,
    find_valid_record,
    hint_file_name,
    entry_file,
    entry_size,
    keydir_entries,
    last_entries,
    pack_entry,
    pack_position,
    unpack_entry,
    parse_file_name,
    parse_records,
)

logger = logging.getLogger("capkv.engines.hash")

# The LOCK file's content (engines/FORMATS.md); what matters is the flock on it.
LOCK_CONTENT = b"CKVHLOCK 1 capkv hash engine directory lock (held with flock while open)\n"

_PACK_CRC = CRC.pack
# put and get unpack keydir entries with these numbers written out (format.pack_entry).
assert (ENTRY_FILE_SHIFT, ENTRY_OFFSET_SHIFT, ENTRY_FIELD_MASK) == (64, 32, 0xFFFFFFFF)

# A merge moves keydir entries to its output this many at a time under the write lock, so
# writers and readers wait at most for one such chunk (well under a millisecond).
_SWAP_CHUNK = 256
# A merge writes its output through a buffer of this size.
_MERGE_BUFFER_BYTES = 1 << 20
# The active file is mapped again once this much was flushed past its map: a map call
# per this many bytes written, and at most this much of the file read with pread.
_REMAP_BYTES = 1 << 20
# A get retries this many times when merges retire the file it was reading.
_READ_RETRIES = 8
# Hint files of rotated files waiting for the maintenance thread, each holding its file's
# index in memory. Past this many (writers rotating faster than hints are written) the
# oldest job is dropped: that file is scanned at the next open instead, or merged first.
_MAX_PENDING_HINTS = 16
# Keydir entries hold offsets and sizes below 2**32 (format.pack_entry). A record ends
# within max_file_bytes, unless it is the first of its file (then it ends before the
# header plus the largest record or batch, which __init__ keeps under 4 GiB), so this
# bound keeps every data file under 4 GiB.
_MAX_FILE_BYTES = MAX_FILE_END - 1


@dataclasses.dataclass(frozen=True)
class HashOptions:
    """The hash engine's own options (besides EngineOptions). Each says why it exists."""

    # A data file stops growing here and becomes immutable (and mergeable). Larger files
    # mean fewer files and merges; smaller ones reclaim space sooner.
    max_file_bytes: int = 64 * 1024 * 1024
    # Appends collect in a user-space buffer that is written out at this size, at every
    # sync and (sync="never") within sync_interval_ms by a flusher thread: the put path
    # is one buffered append. A get of a record still in it copies it from there.
    write_buffer_bytes: int = 64 * 1024
    # Merge in the background when dead bytes in immutable files are at least this
    # fraction of them and at least merge_min_dead_bytes. A merge rewrites every live
    # byte of the immutable files (and costs a few microseconds of Python per record),
    # so it should reclaim a lot when it runs; Bitcask's defaults are 60 % and 512 MB.
    merge_dead_ratio: float = 0.6
    merge_min_dead_bytes: int = 256 * 1024 * 1024
    # Off: merges run only when `merge()` is called.
    auto_merge: bool = True

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "write_buffer_bytes", "merge_min_dead_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive int, not {value!r}")
        if self.max_file_bytes > _MAX_FILE_BYTES:
            raise InvalidArgument(f"max_file_bytes must be below 4 GiB ({MAX_FILE_END}), not {self.max_file_bytes}")
        ratio = self.merge_dead_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise InvalidArgument(f"merge_dead_ratio must be in (0, 1], not {ratio!r}")
        if not isinstance(self.auto_merge, bool):
            raise InvalidArgument(f"auto_merge must be True or False, not {self.auto_merge!r}")


HASH_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(HashOptions))


class DataFile:
    """One open data file. `mm` maps its first `mapped` bytes (None and 0 until mapped).
    An immutable (`sealed`) file is mapped whole. The active one is mapped up to a recent
    flush (remapped as it grows, `_flush`), read with pread from there up to `flushed`,
    and from the append buffer beyond. `retired` is set before a merge closes it."""

    __slots__ = ("file_id", "path", "fd", "mm", "mapped", "sealed", "size", "flushed", "retired", "closed")

    def __init__(self, file_id: int, path: str, fd: int, size: int) -> None:
        self.file_id = file_id
        self.path = path
        self.fd = fd
        self.mm: mmap.mmap | None = None
        self.mapped = 0
        self.sealed = False
        self.size = size
        self.flushed = size
        self.retired = False
        self.closed = False

    def map(self) -> None:
        """Map the whole file, which is immutable from now on."""
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self.mapped = len(self.mm)
        self.sealed = True

    def map_prefix(self, length: int) -> None:
        """Map the active file's first `length` (flushed) bytes. A reader may still hold
        the previous map: it stays valid (and mapped) until its last reference goes.
        `mm` is set before `mapped`, so a lock-free reader that sees the new length sees
        a map at least that long."""
        self.mm = mmap.mmap(self.fd, length, access=mmap.ACCESS_READ)
        self.mapped = length

    def release_fd(self) -> None:
        """An immutable file that is durable needs no descriptor of its own: the mmap
        holds one. Halves the descriptors an engine with many files holds."""
        if self.sealed and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, size: int) -> bytes:
        end = offset + size
        if end > self.mapped:
            try:
                return os.pread(self.fd, size, offset)
            except OSError:
                if end > self.mapped:  # else rotated meanwhile: its fd is gone, its map is there
                    raise
        return self.mm[offset:end]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.mapped = 0  # lock-free gets take the slow path, which sees why
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _MergeAborted(Exception):
    pass


class HashEngine:
    """Bitcask-style engine: see the module docstring. `HashEngine(path, **options)`.

        >>> e = HashEngine("/tmp/capkv-hash", sync="never", max_file_bytes=1 << 20)
        >>> e.put(b"k", b"v"); e.get(b"k")
        b'v'
        >>> e.merge()["bytes_reclaimed"] >= 0
        True
    """

    def __init__(self, path: str | os.PathLike, **options) -> None:
        own = {name: options.pop(name) for name in list(options) if name in HASH_OPTION_NAMES}
        try:
            self.options = EngineOptions(**options)
        except TypeError as exc:
            raise InvalidArgument(f"hash engine: {exc}") from None
        self.hash_options = HashOptions(**own)
        o = self.options
        # Record and batch lengths are u32 on disk (engines/FORMATS.md), and a data file
        # holding one of them after its header stays under 4 GiB (keydir entries).
        if HEADER_SIZE + o.max_key_bytes + o.max_value_bytes + RECORD_OVERHEAD >= MAX_FILE_END:
            raise InvalidArgument("max_key_bytes + max_value_bytes must stay under 4 GiB in the hash engine")
        if HEADER_SIZE + o.max_batch_bytes + RECORD_OVERHEAD * (o.max_batch_ops + 1) >= MAX_FILE_END:
            raise InvalidArgument("max_batch_bytes must stay under 4 GiB in the hash engine")
        if path is None:
            raise InvalidArgument("the hash engine stores files: give it a directory path")
        self._dir = os.fspath(path)
        os.makedirs(self._dir, exist_ok=True)
        if not os.path.isdir(self._dir):
            raise InvalidArgument(f"{self._dir} is not a directory")

        self._max_key = self.options.max_key_bytes
        self._max_value = self.options.max_value_bytes
        self._max_file = self.hash_options.max_file_bytes
        self._buffer_limit = self.hash_options.write_buffer_bytes
        self._sync_mode = self.options.sync

        self._lock = threading.Lock()          # appends, keydir, file table
        self._fsync_lock = threading.Lock()    # fsyncs vs closing file descriptors
        self._maint_lock = threading.Lock()    # one merge / hint writer at a time
        self._scan_lock = threading.Lock()     # one rebuild of the sorted key list at a time
        self._maint_cond = threading.Condition(threading.Lock())
        self._maint_wakeup = False
        self._maint_thread: threading.Thread | None = None

        self._closed = False
        # key -> entry of its newest record: (file id, offset, size) packed into one int
        # (format.pack_entry: one untracked object per key instead of a tuple of ints).
        self._keydir: dict[bytes, int] = {}
        self._files: dict[int, DataFile] = {}
        # file id -> bytes after the header that the keydir does not point at (overwritten
        # records, tombstones, batch frames). Live bytes = size - header - dead; tracking the
        # dead side keeps a put of a new key free of accounting.
        self._dead: dict[int, int] = {}
        self._active: DataFile | None = None
        self._active_id = 0
        self._active_size = 0
        # What the active file's hint will hold: every record's key and keydir entry in
        # append order (a negative size for a tombstone). Lists, not a dict: an append
        # costs a fifth of a dict store. The hint keeps each key's last entry; while
        # `_active_unique` (no key twice: no overwrite within the file, no tombstone, no
        # batch) the lists are that already and the hint skips the dedup pass.
        self._active_keys: list[bytes] = []
        self._active_positions: list[int] = []  # format.pack_position, negated for a tombstone
        self._active_unique = True
        # file id -> (rotated file, keys, positions, unique) waiting for the maintenance thread
        self._pending_hints: dict[int, tuple[DataFile, list, list, bool]] = {}
        self._unsynced: list[DataFile] = []
        self._dir_dirty = False
        self._buf = bytearray()
        # Positions for group commit: bytes appended since open over all files, i.e.
        # _base_position (files finished since open) + _active_size.
        self._base_position = 0

        # sorted key list for scans (None until the first scan)
        self._sorted_keys: list[bytes] | None = None
        self._new_keys: list[bytes] | None = None
        self._deleted_since_sort = 0

        self._stats = defaultdict(int)
        self._head_packers: dict[int, object] = {}  # key length -> struct pack (put)
        self._last_merge: dict = {}
        self._last_error: str | None = None

        # One engine per directory: two would both append and merge, deleting each
        # other's files. flock is released by the kernel when a process dies.
        self._lock_fd = os.open(os.path.join(self._dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise EngineError(f"{self._dir} is in use by another open engine (its LOCK file is held)") from None
        if os.fstat(self._lock_fd).st_size == 0:
            os.write(self._lock_fd, LOCK_CONTENT)
        started = time.perf_counter()
        try:
            self._recover()
            self._open_active(max(self._files, default=0) + 1)
            self._fsync_dir()
            self._open_seconds = time.perf_counter() - started
        except BaseException:
            for df in self._files.values():
                df.close()
            os.close(self._lock_fd)
            raise

        self._group_commit = GroupCommit(self._sync_files)
        self._syncer = None
        self._flusher: threading.Thread | None = None
        self._flusher_stop = threading.Event()
        self._after_write = None
        if self._sync_mode == "always":
            self._after_write = self._wait_durable
        elif self._sync_mode == "batch":
            self._syncer = PeriodicSyncer(self._sync_files, self.options.sync_interval_ms, name="capkv-hash-syncer")
            self._after_write = self._mark_dirty
        else:
            # sync="never": appends wait in the user-space buffer; this thread hands it to
            # the OS within sync_interval_ms, so a process crash (not a power loss) keeps
            # what was written before that. The put path pays nothing for it.
            self._flusher = threading.Thread(target=self._flush_loop, name="capkv-hash-flusher", daemon=True)
            self._flusher.start()

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Rebuild the keydir from hint files (or data files) in file id order."""
        data_ids, hint_ids = [], set()
        for name in os.listdir(self._dir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self._dir, name))  # an unfinished merge output or hint
                continue
            parsed = parse_file_name(name)
            if parsed is None:
                continue
            if parsed[1] == "data":
                data_ids.append(parsed[0])
            else:
                hint_ids.add(parsed[0])
        data_ids.sort()
        for file_id in hint_ids - set(data_ids):
            logger.warning("%s: hint file without its data file removed", self._dir)
            os.unlink(os.path.join(self._dir, hint_file_name(file_id)))
        newest = data_ids[-1] if data_ids else None
        keydir = self._keydir
        for file_id in data_ids:
            path = os.path.join(self._dir, data_file_name(file_id))
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if size < HEADER_SIZE:
                    if file_id != newest:
                        raise CorruptionError(path, 0, f"data file is {size} bytes, shorter than its header")
                    # A crash while a new file was being created: nothing in it was acknowledged.
                    os.close(fd)
                    fd = -1
                    self._cut_whole_file(file_id, path, size, "shorter than its header")
                    continue
                if size >= MAX_FILE_END:
                    raise EngineError(f"{path} is {size} bytes: this build reads data files under 4 GiB")
                check_file_header(os.pread(fd, HEADER_SIZE, 0), DATA_MAGIC, file_id, path)
                df = DataFile(file_id, path, fd, size)
                fd = -1
                df.map()
                df.release_fd()
                loaded = file_id in hint_ids and self._load_hint(df)
                if not loaded:
                    if not self._scan_data_file(df, allow_torn=file_id == newest):
                        continue
                self._files[file_id] = df
            finally:
                if fd >= 0:
                    os.close(fd)

    def _cut_whole_file(self, file_id: int, path: str, size: int, reason: str) -> None:
        logger.warning("%s: torn tail: cut the whole file (%d bytes): %s", path, size, reason)
        self._stats["torn_tails"] += 1
        self._stats["bytes_cut_at_open"] += size
        hint = os.path.join(self._dir, hint_file_name(file_id))
        if os.path.exists(hint):
            os.unlink(hint)
        os.unlink(path)

    def _load_hint(self, df: DataFile) -> bool:
        """Apply df's hint file to the keydir; False when the hint does not describe the
        data file as it is now (then the caller scans the data file)."""
        hint_path = os.path.join(self._dir, hint_file_name(df.file_id))
        with open(hint_path, "rb") as f:
            buf = f.read()
        data_size, keys, kinds, offsets, sizes = decode_hint(buf, df.file_id, hint_path)
        if data_size != df.size:
            logger.warning("%s: hint file says %d bytes, the data file has %d: scanning it instead",
                           hint_path, data_size, df.size)
            self._stats["stale_hints_ignored"] += 1
            return False
        keydir = self._keydir
        dead = self._dead
        file_id = df.file_id
        if KIND_DELETE not in kinds:
            # Entries of older files these keys replace become dead (C-level map/filter).
            if keydir:
                for old in filter(None, map(keydir.get, keys)):
                    dead[entry_file(old)] += entry_size(old)
            keydir.update(zip(keys, keydir_entries(file_id, offsets, sizes)))
            dead[file_id] = df.size - HEADER_SIZE - sum(sizes)
        else:
            dead[file_id] = df.size - HEADER_SIZE
            for key, kind, offset, size in zip(keys, kinds, offsets, sizes):
                old = keydir.pop(key, None)
                if old is not None:
                    dead[entry_file(old)] += entry_size(old)
                if kind == KIND_PUT:
                    keydir[key] = pack_entry(file_id, offset, size)
                    dead[file_id] -= size
        self._stats["hint_files_loaded"] += 1
        self._stats["hint_entries_loaded"] += len(keys)
        return True

    def _scan_data_file(self, df: DataFile, allow_torn: bool) -> bool:
        """Read every record of df into the keydir, cut a torn tail when allowed, and
        write df's hint. Returns False when nothing was left of the file."""
        index: dict[bytes, int] = {}  # key -> position (pack_position), negated for a tombstone
        file_id = df.file_id
        records = 0
        try:
            for kind, key, offset, size in parse_records(df.mm, HEADER_SIZE):
                position = pack_position(offset, size)
                index[key] = position if kind == KIND_PUT else -position
                records += 1
        except TornTail as torn:
            if not allow_torn:
                raise CorruptionError(df.path, torn.offset, torn.reason) from None
            mm = df.mm
            batch_cut = torn.incomplete and torn.offset < len(mm) and mm[torn.offset] == KIND_BATCH
            if not batch_cut:
                start = torn.resume if torn.resume is not None else torn.offset + 1
                found = find_valid_record(mm, start, self._max_key, self._max_value)
                if found is not None:
                    raise CorruptionError(
                        df.path, torn.offset, f"{torn.reason}, and a valid record follows at byte {found}: "
                        "damage inside the file, not a torn tail"
                    ) from None
            cut = df.size - torn.offset
            logger.warning("%s: torn tail at byte %d (%s): cut %d bytes", df.path, torn.offset, torn.reason, cut)
            self._stats["torn_tails"] += 1
            self._stats["bytes_cut_at_open"] += cut
            df.mm.close()
            os.truncate(df.path, torn.offset)
            df.fd = os.open(df.path, os.O_RDONLY)
            os.fsync(df.fd)
            df.size = df.flushed = torn.offset
            df.map()
            df.release_fd()
        self._stats["data_files_scanned"] += 1
        self._stats["records_scanned_at_open"] += records
        if df.size == HEADER_SIZE:
            df.close()
            hint = os.path.join(self._dir, hint_file_name(file_id))
            if os.path.exists(hint):
                os.unlink(hint)
            os.unlink(df.path)
            return False
        keydir = self._keydir
        dead = self._dead
        dead[file_id] = df.size - HEADER_SIZE
        base = file_id << ENTRY_FILE_SHIFT
        for key, position in index.items():
            old = keydir.pop(key, None)
            if old is not None:
                dead[entry_file(old)] += entry_size(old)
            if position > 0:
                keydir[key] = base | position
                dead[file_id] -= entry_size(position)
        self._write_hint_file(df, list(index), list(index.values()))
        return True

    # ------------------------------------------------------------------ files

    def _open_active(self, file_id: int) -> None:
        path = os.path.join(self._dir, data_file_name(file_id))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, file_header(DATA_MAGIC, file_id))
        except BaseException:
            os.close(fd)
            raise
        df = DataFile(file_id, path, fd, HEADER_SIZE)
        self._files[file_id] = df
        self._dead[file_id] = 0
        self._active = df
        self._active_id = file_id
        self._active_entry_base = file_id << ENTRY_FILE_SHIFT  # pack_entry's file part
        self._active_size = HEADER_SIZE
        self._active_keys = []
        self._active_positions = []
        self._active_unique = True
        self._dir_dirty = True

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _flush(self) -> None:
        """Write the append buffer to the active file. Caller holds `_lock`."""
        buf = self._buf
        if buf:
            active = self._active
            _write_all(active.fd, buf)
            active.flushed += len(buf)
            active.size = active.flushed
            buf.clear()
            if active.flushed - active.mapped >= _REMAP_BYTES:
                # Gets of the mapped part slice the map, which costs less than a pread.
                try:
                    active.map_prefix(active.flushed)
                except OSError as exc:  # e.g. out of map areas: gets pread instead, writes go on
                    if not self._stats["remap_errors"]:
                        logger.warning("%s: cannot map the active file (%s): reading it with pread", active.path, exc)
                    self._stats["remap_errors"] += 1

    def _flush_loop(self) -> None:
        """sync="never": write the append buffer to the OS every sync_interval_ms."""
        interval = self.options.sync_interval_ms / 1000.0
        while not self._flusher_stop.wait(interval):
            if not self._buf:  # a peek without the lock: the flush itself takes it
                continue
            try:
                with self._lock:
                    if self._closed:
                        return
                    self._flush()
            except OSError as exc:  # the next append, sync or close meets it again
                logger.warning("%s: background flush failed: %s", self._dir, exc)
                self._stats["maintenance_errors"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"

    def _rotate(self, next_id: int | None = None) -> None:
        """Make the active file immutable and start a new one. Caller holds `_lock`.

        Costs one buffer flush, one mmap and one file creation; its fsync and hint file
        are left to the next sync and to the maintenance thread.
        """
        self._flush()
        old = self._active
        old.size = old.flushed = self._active_size
        old.map()
        # Its descriptor stays open until the next fsync (or the maintenance thread)
        # releases it under _fsync_lock: a sync may be using it right now.
        self._unsynced.append(old)
        self._base_position += old.size
        self._pending_hints[old.file_id] = (old, self._active_keys, self._active_positions, self._active_unique)
        if len(self._pending_hints) > _MAX_PENDING_HINTS:
            del self._pending_hints[min(self._pending_hints)]
            self._stats["hint_jobs_dropped"] += 1
        self._open_active(next_id if next_id is not None else old.file_id + 1)
        self._stats["rotations"] += 1
        self._wake_maintenance()

    def _sync_files(self, target: int | None = None) -> int:
        """Make every append so far durable: flush, fsync rotated files not yet synced,
        the active file and (after creations) the directory. Safe while writers append;
        GroupCommit calls it with the position it covers; returns the position (bytes
        appended since open) that is durable when it returns."""
        time.sleep(0)  # let writers that are ready append first: this fsync covers them too
        # _fsync_lock around the whole call: two syncs at once (group commit, the batch
        # syncer, sync(), a merge) must not return before the files the other took are
        # fsynced. Lock order everywhere: _fsync_lock, then _lock.
        with self._fsync_lock:
            with self._lock:
                if self._active is None:
                    return 0
                self._flush()
                covered = self._base_position + self._active_size
                files = self._unsynced
                self._unsynced = []
                files.append(self._active)
                dir_dirty = self._dir_dirty
                self._dir_dirty = False
            for df in files:
                if df.closed:
                    continue  # retired by a merge (its live records are in synced outputs)
                if df.fd >= 0:
                    os.fsync(df.fd)
                    if df.sealed:
                        df.release_fd()  # rotated: the mmap is enough from now on
                else:
                    fd = os.open(df.path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            if dir_dirty:
                self._fsync_dir()
        self._stats["fsyncs"] += 1
        return covered

    def _write_hint_file(self, df: DataFile, keys: list, positions: list, unique: bool = True) -> None:
        """Write df's hint atomically (temp file, fsync, rename): `keys[i]`'s last record
        in df is at `positions[i]` (format.pack_position, negated for a tombstone); with
        `unique` False, keys may repeat (the last one counts)."""
        final = os.path.join(self._dir, hint_file_name(df.file_id))
        tmp = final + ".tmp"
        if not unique:
            keys, positions = last_entries(keys, positions)
        data = encode_hint(df.file_id, keys, positions, df.size)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._stats["hint_files_written"] += 1

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        # No closed check on a hit: close() closes every map (a slice of a closed map
        # raises ValueError), which sends the read to _read_slow, which raises EngineClosed.
        # The key is validated only on a miss: every key in the keydir passed check_key
        # when it was written, and anything else (str, int, too long, empty) is not in it.
        # Unhashable keys (bytearray, a writable memoryview) are converted first; a
        # read-only memoryview hashes and compares like the bytes it shows.
        try:
            entry = self._keydir.get(key)
        except (TypeError, ValueError):
            if self._closed:
                raise EngineClosed("hash engine is closed") from None
            key = check_key(key, self.options)
            entry = self._keydir.get(key)
        if entry is None:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            if type(key) is not bytes or not 0 < len(key) <= self._max_key:
                check_key(key, self.options)
            return None
        # format.unpack_entry inlined (its shifts and masks as literals: constants cost
        # less than global loads on this path).
        df = self._files.get(entry >> 64)
        if df is not None:
            offset = entry >> 32 & 0xFFFFFFFF
            end = offset + (entry & 0xFFFFFFFF)
            if end <= df.mapped:  # an immutable file, or the mapped part of the active one
                try:
                    rec = df.mm[offset:end]
                except ValueError:  # closed by a merge that retired the file, or by close()
                    rec = b""
            elif end <= df.flushed:
                try:
                    rec = os.pread(df.fd, end - offset, offset)
                except OSError:
                    rec = b""
            else:
                rec = b""
            # The whole record's CRC (format.RESIDUE), then that it is a put of this key
            # (a slice compare costs less than startswith, which parses its arguments).
            value_start = FIELDS_SIZE + len(key)
            if crc32(rec) == RESIDUE and rec[0] == KIND_PUT and rec[FIELDS_SIZE:value_start] == key:
                return rec[value_start:-4]
        return self._read_slow(key, entry)

    def _read_record(self, df: DataFile, entry: int) -> bytes | None:
        file_id, offset, size = unpack_entry(entry)
        if not df.sealed and offset + size > df.flushed:
            with self._lock:
                if df is self._active and offset >= df.flushed:
                    # Still in the append buffer (which holds whole records): copy it
                    # from there rather than paying a write for a read.
                    start = offset - df.flushed
                    return bytes(self._buf[start:start + size])
        try:
            return df.read(offset, size)
        except (ValueError, OSError):
            return None

    def _read_slow(self, key: bytes, entry: int) -> bytes | None:
        """The read path for the active file, and for an entry a merge moved or damage.

        Lock-free reads can race with a rotation (the active file's descriptor released
        as it is read), a flush, or a merge retiring the file; such a read fails its
        checks and is retried with the key's current entry. A read that fails on a file
        no merge retired is repeated under the write lock (`_read_locked`), where nothing
        can move, so CorruptionError is raised only for damage that is really there.
        """
        for _ in range(_READ_RETRIES):
            if self._closed:
                raise EngineClosed("hash engine is closed")
            df = self._files.get(entry_file(entry))
            if df is not None:
                rec = self._read_record(df, entry)
                if rec is not None:
                    decoded = decode_record(rec, key)
                    if decoded is not None and decoded[0] == KIND_PUT:
                        return decoded[2]
                if not df.retired and not df.closed:
                    break
            newer = self._keydir.get(key)
            if newer is None:
                return None
            if newer == entry and df is None:
                break
            entry = newer
        return self._read_locked(key)

    def _read_locked(self, key: bytes) -> bytes | None:
        """Read the key's current record under the write lock: no rotation, flush, fd
        release or merge retirement runs meanwhile, so a bad record here is damage."""
        with self._lock:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            entry = self._keydir.get(key)
            if entry is None:
                return None
            file_id, offset, size = unpack_entry(entry)
            df = self._files.get(file_id)
            if df is None:
                raise EngineError(f"keydir entry of {key[:60]!r} names file {file_id}, which is not open")
            if df is self._active and offset >= df.flushed:
                start = offset - df.flushed  # still in the append buffer
                rec = bytes(self._buf[start:start + size])
            else:
                try:
                    rec = df.read(offset, size)
                except (ValueError, OSError) as exc:
                    raise CorruptionError(df.path, offset, f"cannot read the record of key {key[:60]!r}: {exc}") from None
            decoded = decode_record(rec, key)
            if decoded is None or decoded[0] != KIND_PUT:
                reason = "short read" if len(rec) != size else "record checksum mismatch"
                raise CorruptionError(df.path, offset, f"{reason} in the record of key {key[:60]!r}")
            return decoded[2]

    def scan(
        self, start: bytes | None = None, end: bytes | None = None, *, reverse: bool = False, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, end) in order, by sorting the keydir's keys (module docstring:
        O(N) after changes, cached otherwise). Values are read at iteration time."""
        check_scan_args(start, end, limit)
        if self._closed:
            raise EngineClosed("hash engine is closed")
        return self._scan(
            None if start is None else bytes(start), None if end is None else bytes(end), reverse, limit
        )

    def _scan(self, start, end, reverse, limit):
        if limit == 0 or (start is not None and end is not None and start >= end):
            return
        keys = self._sorted_key_list()
        lo = 0 if start is None else bisect_left(keys, start)
        hi = len(keys) if end is None else bisect_left(keys, end)
        positions = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        emitted = 0
        previous = None
        get = self.get
        for i in positions:
            key = keys[i]
            if key == previous:  # a key deleted and added again sits in the list twice
                continue
            previous = key
            value = get(key)
            if value is None:
                continue
            yield key, value
            emitted += 1
            if limit is not None and emitted >= limit:
                return

    def _count_scan_delete(self) -> None:
        """A key left the keydir (caller holds `_lock`). The sorted list keeps it until the
        next full rebuild; past a bound, stop tracking new keys (memory) and rebuild then."""
        if self._new_keys is not None:
            self._deleted_since_sort += 1
            if self._deleted_since_sort > len(self._keydir) + 4096:
                self._new_keys = None

    def _sorted_key_list(self) -> list[bytes]:
        """The sorted keys (possibly with deleted keys and duplicates, which scans skip).

        A snapshot: the returned list is never changed afterwards, so iterating it needs no
        lock; writers only append new keys to `_new_keys` under the write lock.
        """
        with self._scan_lock:
            with self._lock:
                base = self._sorted_keys
                if base is None or self._new_keys is None or self._deleted_since_sort * 2 > len(base) + 64:
                    keys = list(self._keydir)
                    full = True
                else:
                    keys = self._new_keys
                    full = False
                self._new_keys = []
                if full:
                    self._deleted_since_sort = 0
            if full:
                keys.sort()
                self._stats["scan_sorts"] += 1
                self._stats["scan_keys_sorted"] += len(keys)
                self._sorted_keys = keys
            elif keys:
                keys.sort()
                merged = base + keys
                merged.sort()  # two sorted runs: a linear merge
                self._stats["scan_sorts"] += 1
                self._stats["scan_keys_sorted"] += len(merged)
                self._sorted_keys = merged
            return self._sorted_keys

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, value: bytes) -> None:
        # The fast path checks exactly what check_key/check_value check, for the common
        # case (bytes of allowed sizes); anything else takes their path and its errors.
        if type(key) is not bytes or type(value) is not bytes:
            key = check_key(key, self.options)
            value = check_value(value, self.options)
        key_len = len(key)
        value_len = len(value)
        if not 0 < key_len <= self._max_key or value_len > self._max_value:
            check_key(key, self.options)
            check_value(value, self.options)
        # The record is fields | key | value | crc; the CRC is appended after the rest so
        # the record is never built whole (one copy fewer of the value). The fields and
        # the key are packed by one struct per key length (a concatenation fewer: about
        # 0.1 us of a 2 us put).
        pack_head = self._head_packers.get(key_len)
        if pack_head is None:
            pack_head = self._head_packer(key_len)
        body = pack_head(KIND_PUT, key_len, value_len, key) + value
        crc = _PACK_CRC(crc32(body))
        size = key_len + value_len + RECORD_OVERHEAD
        # acquire/release rather than `with`: half the cost, and this is the hot path.
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            offset = self._active_size
            end = offset + size
            if end > self._max_file and offset > HEADER_SIZE:
                self._rotate()
                offset = HEADER_SIZE
                end = offset + size
            buf = self._buf
            buf += body
            buf += crc
            self._active_size = end
            position = offset << 32 | size  # format.pack_position, inlined
            entry = self._active_entry_base | position
            # One dict operation for a new key; an overwrite stores the entry after it.
            old = self._keydir.setdefault(key, entry)
            if old is not entry:
                self._keydir[key] = entry
                old_file = old >> 64
                self._dead[old_file] += old & 0xFFFFFFFF  # entry_size(old)
                if old_file == self._active_id:
                    self._active_unique = False
            elif self._new_keys is not None:
                self._new_keys.append(key)
            self._active_keys.append(key)
            self._active_positions.append(position)
            if len(buf) >= self._buffer_limit:
                self._flush()
            if self._after_write is None:  # sync="never": nothing more to do
                return
            appended = self._base_position + end  # what must be durable before we return
        finally:
            lock.release()
        self._after_write(appended)

    def _head_packer(self, key_len: int):
        """`pack(kind, key_len, value_len, key)` -> a record's fields and key, for keys of
        `key_len` bytes. One per key length in use: at most max_key_bytes of them."""
        pack = struct.Struct(f"<BII{key_len}s").pack
        self._head_packers[key_len] = pack
        return pack

    def delete(self, key: bytes) -> None:
        key = check_key(key, self.options)
        record = encode_record(KIND_DELETE, key, b"")
        size = len(record)
        with self._lock:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            old = self._keydir.pop(key, None)
            if old is None:
                # Nothing to delete. A tombstone for it may still be on its way to disk:
                # wait for what is written so far, so the ack means what it says.
                position = self._base_position + self._active_size
            else:
                offset = self._active_size
                if offset + size > self._max_file and offset > HEADER_SIZE:
                    self._rotate()
                    offset = HEADER_SIZE
                self._buf += record
                self._active_size = offset + size
                self._active_keys.append(key)
                self._active_positions.append(-pack_position(offset, size))
                self._active_unique = False
                dead = self._dead
                dead[entry_file(old)] += entry_size(old)
                dead[self._active_id] += size
                self._count_scan_delete()
                if len(self._buf) >= self._buffer_limit:
                    self._flush()
                position = self._base_position + self._active_size
        if self._after_write is not None:
            self._after_write(position)

    def write(self, batch: Sequence) -> None:
        """Apply the batch atomically: one framed record (format.py), one keydir update
        under the lock, so no reader sees half of it and recovery keeps all or none."""
        ops = check_batch(batch, self.options)
        if self._closed:
            raise EngineClosed("hash engine is closed")
        if not ops:
            return
        if len(ops) == 1:
            op, key, value = ops[0]
            return self.put(key, value) if op == "put" else self.delete(key)
        records = [
            encode_record(KIND_PUT, key, value) if op == "put" else encode_record(KIND_DELETE, key, b"")
            for op, key, value in ops
        ]
        frame = encode_batch(records)
        with self._lock:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            start = self._active_size
            if start + len(frame) > self._max_file and start > HEADER_SIZE:
                self._rotate()
                start = HEADER_SIZE
            file_id = self._active_id
            self._buf += frame
            self._active_size = start + len(frame)
            keydir, dead = self._keydir, self._dead
            index_keys, index_positions = self._active_keys, self._active_positions
            self._active_unique = False  # (rarely worth working out)
            dead[file_id] += len(frame) - sum(map(len, records))  # the frame's own bytes
            offset = start + FIELDS_SIZE
            for (op, key, _value), record in zip(ops, records):
                size = len(record)
                position = pack_position(offset, size)
                if op == "put":
                    old = keydir.get(key)
                    keydir[key] = pack_entry(file_id, offset, size)
                    if old is None and self._new_keys is not None:
                        self._new_keys.append(key)
                else:
                    position = -position
                    old = keydir.pop(key, None)
                    dead[file_id] += size
                    if old is not None:
                        self._count_scan_delete()
                if old is not None:
                    dead[entry_file(old)] += entry_size(old)
                index_keys.append(key)
                index_positions.append(position)
                offset += size
            if len(self._buf) >= self._buffer_limit:
                self._flush()
            position = self._base_position + self._active_size
        if self._after_write is not None:
            self._after_write(position)

    def _wait_durable(self, position: int) -> None:
        """sync="always": return once `position` (bytes appended since open) is on disk."""
        self._group_commit.wait_durable(position)

    def _mark_dirty(self, position: int) -> None:
        """sync="batch": the periodic syncer fsyncs within sync_interval_ms."""
        self._syncer.mark_dirty()

    def sync(self) -> None:
        if self._closed:
            raise EngineClosed("hash engine is closed")
        self._sync_files()

    # ------------------------------------------------------------------ merge

    def merge(self) -> dict:
        """Copy the live records of every immutable data file into new files with hint
        files, then delete the old files. Returns what it did.

        It never blocks readers and writers for longer than a flush: under the write lock
        it only rotates (one buffer flush and a file creation), registers each finished
        output file, moves keydir entries `_SWAP_CHUNK` at a time (an entry moves only if
        no write replaced it meanwhile: equal entries name the same record) and drops the
        old files from the table. Reading inputs, writing outputs and fsyncs run outside the lock, and
        gets never take it: one that raced with the retirement of its file re-reads the
        keydir and finds the entry moved.

        Tombstones are dropped: every file older than the outputs is an input, so no older
        value is left for them to hide. Old files are deleted oldest first, so a crash in
        the middle never keeps a value whose tombstone is gone.
        """
        with self._maint_lock:
            try:
                return self._merge_locked()
            except _MergeAborted:
                raise EngineClosed("hash engine was closed during the merge") from None

    def _merge_locked(self) -> dict:
        with self._lock:
            if self._closed:
                raise EngineClosed("hash engine is closed")
            inputs = [self._files[f] for f in sorted(self._files)]
            first_output = self._active_id + 1
            reserved = len(inputs) + 1
            self._rotate(next_id=first_output + reserved)
        input_bytes = sum(df.size for df in inputs)
        # Inputs durable first: nothing acknowledged may live only in a file being removed.
        # (sync="never" promises nothing across a power loss, and a process crash keeps
        # the page cache, so it skips these fsyncs, which are many with many small files.)
        durable = self._sync_mode != "never"
        if durable:
            self._sync_files()
        output = _MergeOutput(self, first_output, first_output + reserved)
        try:
            for df in inputs:
                self._copy_live_records(df, output)
            output.finish()
        except BaseException:
            output.abandon()
            raise
        # Records that superseded the ones left behind must be durable before the inputs go.
        if durable:
            self._sync_files()
        with self._lock:
            for df in inputs:
                if self._dead[df.file_id] != df.size - HEADER_SIZE:
                    # Some live record was not found walking the file: its framing is damaged.
                    raise CorruptionError(df.path, -1, "merge could not find every live record of this file")
            for df in inputs:
                del self._files[df.file_id]
                del self._dead[df.file_id]
                self._pending_hints.pop(df.file_id, None)
                df.retired = True
            self._unsynced = [df for df in self._unsynced if not df.retired]
        with self._fsync_lock:
            for df in inputs:  # oldest first
                df.close()
                hint = os.path.join(self._dir, hint_file_name(df.file_id))
                if os.path.exists(hint):
                    os.unlink(hint)
                os.unlink(df.path)
        self._fsync_dir()
        result = {
            "input_files": len(inputs),
            "output_files": len(output.published),
            "bytes_before": input_bytes,
            "bytes_written": output.bytes_written,
            "bytes_reclaimed": input_bytes - output.bytes_written,
            "keys_moved": output.keys_moved,
        }
        self._stats["merges"] += 1
        self._stats["merge_bytes_reclaimed"] += result["bytes_reclaimed"]
        self._stats["merge_bytes_written"] += result["bytes_written"]
        self._last_merge = result
        return result

    def _copy_live_records(self, df: DataFile, output: "_MergeOutput") -> None:
        """Walk df's records and append the live ones (the keydir points at them) to the
        merge output. Only live records have their CRC checked here: dead ones are dropped
        anyway, and a walk thrown off by damage shows as live data left behind."""
        mm = df.mm
        file_id = df.file_id
        # A live record's entry names this file and offset: entry >> 32 == file_base | pos.
        file_base = file_id << (ENTRY_FILE_SHIFT - ENTRY_OFFSET_SHIFT)
        get = self._keydir.get
        unpack = RECORD_FIELDS.unpack_from
        append = output.append
        end = len(mm)
        pos = HEADER_SIZE
        batch_end = -1
        try:
            while pos < end:
                if pos == batch_end:  # the CRC that closes a batch frame
                    pos += 4
                    continue
                kind, key_len, value_len = unpack(mm, pos)
                if kind == KIND_PUT:
                    size = RECORD_OVERHEAD + key_len + value_len
                    key = mm[pos + FIELDS_SIZE:pos + FIELDS_SIZE + key_len]
                    entry = get(key)
                    if entry is not None and entry >> ENTRY_OFFSET_SHIFT == file_base | pos:
                        record = mm[pos:pos + size]
                        if crc32(record) != RESIDUE:
                            raise CorruptionError(df.path, pos, f"record of key {key[:60]!r} fails its checksum")
                        append(key, entry, record)
                        if self._closed:
                            raise _MergeAborted()
                    pos += size
                elif kind == KIND_DELETE:
                    pos += RECORD_OVERHEAD + key_len
                elif kind == KIND_BATCH:
                    batch_end = pos + FIELDS_SIZE + value_len  # its ops follow as records
                    pos += FIELDS_SIZE
                else:
                    raise CorruptionError(df.path, pos, f"unknown record kind {kind}")
        except struct.error:
            raise CorruptionError(df.path, pos, "record header runs past the end of the file") from None

    def _publish_merge_output(self, df: DataFile, moved: list) -> int:
        """Register a finished output file, then point the keydir at it chunk by chunk."""
        with self._lock:
            self._files[df.file_id] = df
            self._dead[df.file_id] = df.size - HEADER_SIZE  # live once the keydir points here
        keydir = self._keydir
        count = 0
        for i in range(0, len(moved), _SWAP_CHUNK):
            with self._lock:
                dead = self._dead
                for key, old, new in moved[i:i + _SWAP_CHUNK]:
                    if keydir.get(key) == old:  # equal entries name the same record
                        keydir[key] = new
                        dead[entry_file(old)] += entry_size(old)
                        dead[entry_file(new)] -= entry_size(new)
                        count += 1
        return count

    def _merge_due(self) -> bool:
        if not self.hash_options.auto_merge:
            return False
        with self._lock:
            immutable = [df for file_id, df in self._files.items() if file_id != self._active_id]
            total = sum(df.size - HEADER_SIZE for df in immutable)
            dead = sum(self._dead[df.file_id] for df in immutable)
        return dead >= self.hash_options.merge_min_dead_bytes and dead >= self.hash_options.merge_dead_ratio * total

    # ------------------------------------------------------------------ background

    def _wake_maintenance(self) -> None:
        """Caller holds `_lock`. Starts the maintenance thread on first use."""
        with self._maint_cond:
            self._maint_wakeup = True
            self._maint_cond.notify()
        if self._maint_thread is None:
            self._maint_thread = threading.Thread(target=self._maintenance_loop, name="capkv-hash-maintenance", daemon=True)
            self._maint_thread.start()

    def _maintenance_loop(self) -> None:
        """Writes hint files of rotated files, and merges when `_merge_due()`."""
        while True:
            with self._maint_cond:
                while not self._maint_wakeup and not self._closed:
                    self._maint_cond.wait()
                if self._closed:
                    return
                self._maint_wakeup = False
            try:
                with self._maint_lock:
                    if self._closed:
                        return
                    self._release_idle_descriptors()
                    self._write_pending_hints()
                    if self._merge_due():
                        self._merge_locked()
            except (_MergeAborted, EngineClosed):
                return
            except Exception as exc:  # noqa: BLE001 - reported in stats; the engine goes on
                logger.exception("hash engine maintenance failed")
                self._stats["maintenance_errors"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"

    def _release_idle_descriptors(self) -> None:
        """Close the descriptors of rotated files (their mmaps hold one), so an engine
        with many files holds one descriptor per file. Fsyncs reopen them by name."""
        with self._lock:
            idle = [df for df in self._files.values() if df.sealed and df.fd >= 0]
        with self._fsync_lock:
            for df in idle:
                if not df.closed:
                    df.release_fd()

    def _write_pending_hints(self) -> None:
        """Caller holds `_maint_lock`: fsync each rotated file, then write its hint."""
        while True:
            with self._lock:
                if not self._pending_hints:
                    return
                file_id = min(self._pending_hints)
                df, keys, positions, unique = self._pending_hints.pop(file_id)
            if df.closed:
                continue
            # The hint records the data file's size; if a power loss leaves the data
            # file shorter than that, the next open sees the mismatch and scans it.
            self._write_hint_file(df, keys, positions, unique)

    def wait_idle(self) -> None:
        """Finish background work now: hint files of rotated files (and a running merge)."""
        with self._maint_lock:
            if not self._closed:
                self._write_pending_hints()

    # ------------------------------------------------------------------ close, stats

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._maint_cond:
            self._maint_cond.notify_all()
        if self._maint_thread is not None:
            self._maint_thread.join()
        if self._syncer is not None:
            self._syncer.stop()
        if self._flusher is not None:
            self._flusher_stop.set()
            self._flusher.join()
        with self._maint_lock:
            self._sync_files()
            self._write_pending_hints()
            with self._lock:
                active = self._active
                keys, positions, unique = self._active_keys, self._active_positions, self._active_unique
            if active.size > HEADER_SIZE:
                self._write_hint_file(active, keys, positions, unique)
            else:
                with self._fsync_lock:
                    active.close()
                os.unlink(active.path)
            with self._fsync_lock, self._lock:
                for df in self._files.values():
                    df.close()
            self._fsync_dir()
            os.close(self._lock_fd)  # releases the flock

    def stats(self) -> dict:
        with self._lock:
            total = sum(df.size for df in self._files.values()) + self._active_size - self._active.size
            dead = sum(self._dead.values())
            files = len(self._files)
            keys = len(self._keydir)
            sorted_len = len(self._sorted_keys) if self._sorted_keys is not None else 0
        out = {
            "engine": "hash",
            "keys": keys,
            "live_bytes": total - dead - HEADER_SIZE * files,
            "total_bytes": total,
            "dead_bytes": dead,
            "data_files": files,
            "active_file_id": self._active_id,
            "closed": self._closed,
            "open_seconds": round(self._open_seconds, 4),
            "fsyncs": self._stats["fsyncs"],
            "group_commit_fsyncs": self._group_commit.fsyncs,
            # scans sort the keydir's keys: this many keys were sorted over all scans so
            # far (a full sort costs N log N; keys added since the last scan merge in O(N))
            "scan_sorts": self._stats["scan_sorts"],
            "scan_keys_sorted": self._stats["scan_keys_sorted"],
            "scan_sorted_list_keys": sorted_len,
            "scan_cost": "sort of the keydir's keys: O(N log N) the first time, O(N) after writes, cached otherwise",
            "last_merge": dict(self._last_merge),
            "last_maintenance_error": self._last_error,
        }
        for name in (
            "rotations", "merges", "merge_bytes_reclaimed", "merge_bytes_written",
            "hint_files_loaded", "hint_entries_loaded", "hint_files_written", "stale_hints_ignored",
            "data_files_scanned", "records_scanned_at_open", "torn_tails", "bytes_cut_at_open",
            "maintenance_errors", "hint_jobs_dropped", "remap_errors",
        ):
            out[name] = self._stats[name]
        return out

    def __len__(self) -> int:
        return len(self._keydir)

    def _check(self) -> None:
        """Assert the keydir against the data files: every entry points at a whole put
        record of its key with a valid CRC, and per-file live/dead byte counts add up."""
        with self._lock:
            if self._closed:
                return
            self._flush()
            live: dict[int, int] = defaultdict(int)
            for key, entry in self._keydir.items():
                assert type(entry) is int and entry > 0, f"keydir entry of {key!r} is {entry!r}"
                file_id, offset, size = unpack_entry(entry)
                assert size > 0, f"keydir entry of {key!r} has size {size}"
                df = self._files.get(file_id)
                assert df is not None, f"keydir entry of {key!r} names file {file_id}, which is not open"
                assert HEADER_SIZE <= offset and offset + size <= df.size, f"entry of {key!r} outside {df.path}"
                decoded = decode_record(df.read(offset, size), key)
                assert decoded is not None, f"entry of {key!r} does not point at a valid record of it in {df.path}"
                assert decoded[0] == KIND_PUT, f"entry of {key!r} points at a tombstone"
                live[file_id] += size
            assert set(self._dead) == set(self._files), "byte accounting names other files than are open"
            for file_id, df in self._files.items():
                counted = df.size - HEADER_SIZE - self._dead[file_id]
                assert counted == live.get(file_id, 0), (
                    f"live bytes of {df.path}: counted {counted}, the keydir points at {live.get(file_id, 0)}"
                )
                assert 0 <= self._dead[file_id] <= df.size - HEADER_SIZE
                assert not df.retired and not df.closed
            assert self._active is self._files[self._active_id]
            assert self._active_size == self._active.size == self._active.flushed
            keys, positions = last_entries(self._active_keys, self._active_positions)
            if self._active_unique:
                assert len(keys) == len(self._active_keys), "the active file holds a key twice, marked unique"
            base = self._active_id << ENTRY_FILE_SHIFT
            for key, position in zip(keys, positions):
                assert 0 < abs(position) < MAX_FILE_END << ENTRY_OFFSET_SHIFT, f"position {position} of {key!r}"
                if position > 0:
                    assert self._keydir.get(key) == base | position, f"active index of {key!r} disagrees with the keydir"
                else:
                    assert key not in self._keydir, f"{key!r} is deleted in the active file but in the keydir"
            for file_id in self._pending_hints:
                assert file_id in self._files
            keys = self._sorted_keys
        if keys is not None:
            assert all(a <= b for a, b in zip(keys, keys[1:])), "sorted key list out of order"


class _MergeOutput:
    """Writes merge output files (`.tmp` until finished), each with its hint file."""

    def __init__(self, engine: HashEngine, first_id: int, end_id: int) -> None:
        self.engine = engine
        self.next_id = first_id
        self.end_id = end_id
        self.fd = -1
        self.file_id = 0
        self.size = 0
        self.buf = bytearray()
        self.index: dict = {}
        self.moved: list = []
        self.published: list[int] = []
        self.bytes_written = 0
        self.keys_moved = 0
        self.tmp_paths: list[str] = []

    def _start(self) -> None:
        self.file_id = self.next_id
        self.next_id += 1
        path = os.path.join(self.engine._dir, data_file_name(self.file_id)) + ".tmp"
        self.tmp_paths.append(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.buf += file_header(DATA_MAGIC, self.file_id)
        self.size = HEADER_SIZE

    def append(self, key: bytes, old_entry, record: bytes) -> None:
        size = len(record)
        if self.fd < 0:
            self._start()
        elif self.size + size > self.engine._max_file and self.size > HEADER_SIZE and self.next_id < self.end_id:
            self._finish_file()
            self._start()
        if self.size + size >= MAX_FILE_END:
            # Out of reserved ids with a file near 4 GiB (keydir entries hold 32-bit
            # offsets): give up this merge; its inputs stay as they are.
            raise EngineError(f"merge output file {self.file_id} would reach 4 GiB")
        position = pack_position(self.size, size)
        entry = pack_entry(self.file_id, self.size, size)
        self.buf += record
        self.size += size
        self.index[key] = position
        self.moved.append((key, old_entry, entry))
        if len(self.buf) >= _MERGE_BUFFER_BYTES:
            _write_all(self.fd, self.buf)
            self.buf.clear()

    def _finish_file(self) -> None:
        engine = self.engine
        _write_all(self.fd, self.buf)
        self.buf.clear()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        final = os.path.join(engine._dir, data_file_name(self.file_id))
        os.replace(final + ".tmp", final)
        fd = os.open(final, os.O_RDONLY)
        df = DataFile(self.file_id, final, fd, self.size)
        df.map()
        df.release_fd()
        engine._write_hint_file(df, list(self.index), list(self.index.values()))
        engine._fsync_dir()
        self.keys_moved += engine._publish_merge_output(df, self.moved)
        self.published.append(self.file_id)
        self.bytes_written += self.size
        self.index = {}
        self.moved = []

    def finish(self) -> None:
        if self.fd >= 0:
            self._finish_file()

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in self.tmp_paths:
            if os.path.exists(path):
                os.unlink(path)
