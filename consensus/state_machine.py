"""The cp mode's replicated state machine: etcd's revisions over an `Engine`.

Every node applies the same committed commands in the same order through `apply()`, and
so holds the same store. The module is pure in the STYLE.md sense: it never reads the
clock, never awaits, never imports pysyncobj; the Raft log index of each command comes in
as an argument. It does I/O only through the engine it is given.

Commands are versioned data, not method names, so a journal written today still means the
same thing after the code grows (txn, leases and compaction are new `op`s, not new
replicated methods):

    {"v": 1, "op": "put", "key": b"a", "value": b"1", "lease": 0,
     "if_mod_revision": None, "prev": False, "request_id": "r-17"}
    {"v": 1, "op": "delete", "key": b"a", "end": None, "if_mod_revision": None, ...}
    {"v": 1, "op": "barrier"}

`apply()` never raises: a replicated method that raises wedges pysyncobj's apply loop on
every node forever (research/pysyncobj.md §0.4). It returns a result dict, or an error
value `{"error": code, "message": ..., ...details}`.

Revisions are etcd's (API.md): one global counter, incremented once per write request that
changes something; per key `create_revision`, `mod_revision` and `version` (a delete resets
the version, so a re-created key starts again at 1). A worked sequence:

    put a=1        -> revision 2: a{create 2, mod 2, version 1}
    put a=2        -> revision 3: a{create 2, mod 3, version 2}
    delete a       -> revision 4: a gone; a read at revision 3 still sees a=2
    put a=3        -> revision 5: a{create 5, mod 5, version 1}
    delete b       -> nothing deleted: the revision stays 5
    put a=4 if_mod_revision=3 -> precondition_failed, mod_revision 5; revision stays 5

The store starts at revision 1 (etcd's empty store is at revision 1 too).

Engine layout (all keys of the engine belong to this module; `enc()` escapes NUL so that
the encoded order is the key order):

    b"m"                          -> meta: applied_index, revision, compact_revision
    b"k" + enc(key)               -> the current record of a live key
    b"h" + enc(key) + 00 00 + rev -> every version of the key, tombstones included (history)
    b"e" + rev                    -> the keys a revision changed (the event log, for watches)
    b"d" + index                  -> a remembered request id and its first result
    b"i"                          -> present while a snapshot is being installed

Every command writes all its rows and the new meta (with its log index) in one atomic
engine batch, so after a crash the engine is exactly the state after some log index, and
replay skips the entries at or below it (as etcd's consistent_index does).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import struct
import threading
from typing import Any, Iterable, Iterator

from api.service import Compacted, InvalidRequest, KeyValue, Unavailable

COMMAND_VERSION = 1

_META_KEY = b"m"
_INSTALLING_KEY = b"i"
_CURRENT = b"k"
_HISTORY = b"h"
_EVENTS = b"e"
_DEDUPE = b"d"

_META = struct.Struct(">QQQ")  # applied_index, revision, compact_revision
_RECORD = struct.Struct(">QQQqB")  # create_revision, mod_revision, version, lease, flags
_TOMBSTONE = 1
_U64 = struct.Struct(">Q")
_KEY_END = b"\x00\x00"  # ends an encoded key inside a history row


def enc(key: bytes) -> bytes:
    """Order-preserving escape of a user key: NUL becomes NUL 0xFF.

        >>> enc(b"a\\x00b")
        b'a\\x00\\xffb'
    """
    return key.replace(b"\x00", b"\x00\xff")


def dec(encoded: bytes) -> bytes:
    return encoded.replace(b"\x00\xff", b"\x00")


def history_key(key: bytes, revision: int) -> bytes:
    return _HISTORY + enc(key) + _KEY_END + _U64.pack(revision)


def _split_history_key(row_key: bytes) -> tuple[bytes, int]:
    return dec(row_key[1:-10]), _U64.unpack(row_key[-8:])[0]


@dataclasses.dataclass(frozen=True)
class StateMachineLimits:
    """Bounds on what one command may cost; every field says why it exists."""

    # Request ids are remembered so that a retried write applies once. A client retries
    # within seconds; 10 000 ids cover that at thousands of writes per second.
    max_request_ids: int = 10_000
    # ...and an id older than this many log entries is forgotten even if there is room.
    request_id_max_age_entries: int = 1_000_000
    # A range delete is one atomic engine batch of about three rows per key.
    max_delete_keys: int = 10_000
    # ...and each deleted key is written about three times into that batch.
    max_delete_key_bytes: int = 8 * 1024 * 1024
    # A range read holds its results in memory.
    max_range_items: int = 100_000
    # The API caps keys at 4 KiB and values at 1 MiB by default (--max-value-bytes).
    max_key_bytes: int = 4096
    max_value_bytes: int = 16 * 1024 * 1024
    # A request id is a client-chosen string.
    max_request_id_bytes: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")


@dataclasses.dataclass(frozen=True)
class Record:
    create_revision: int
    mod_revision: int
    version: int
    lease: int
    value: bytes | None  # None for a tombstone

    def encode(self) -> bytes:
        flags = _TOMBSTONE if self.value is None else 0
        return _RECORD.pack(self.create_revision, self.mod_revision, self.version, self.lease, flags) + (
            self.value or b""
        )

    @classmethod
    def decode(cls, data: bytes) -> "Record":
        create, mod, version, lease, flags = _RECORD.unpack_from(data)
        value = None if flags & _TOMBSTONE else bytes(data[_RECORD.size :])
        return cls(create, mod, version, lease, value)

    def to_kv(self, key: bytes, keys_only: bool = False) -> KeyValue:
        return KeyValue(
            key=key,
            value=None if keys_only else self.value,
            create_revision=self.create_revision,
            mod_revision=self.mod_revision,
            version=self.version,
            lease=self.lease,
        )


def _kv_to_dict(kv: KeyValue) -> dict:
    return {
        "key": kv.key,
        "value": kv.value,
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    }


def kv_from_dict(d: dict) -> KeyValue:
    return KeyValue(d["key"], d["value"], d["create_revision"], d["mod_revision"], d["version"], d.get("lease", 0))


def _error(code: str, message: str, **details: Any) -> dict:
    return {"error": code, "message": message, **details}


class CommandError(Exception):
    """A command that cannot apply; becomes an error value, never escapes `apply()`."""

    def __init__(self, code: str, message: str, **details: Any):
        super().__init__(message)
        self.result = _error(code, message, **details)


def make_put(
    key: bytes,
    value: bytes,
    *,
    lease: int = 0,
    if_mod_revision: int | None = None,
    prev: bool = False,
    request_id: str | None = None,
) -> dict:
    return {
        "v": COMMAND_VERSION,
        "op": "put",
        "key": key,
        "value": value,
        "lease": lease,
        "if_mod_revision": if_mod_revision,
        "prev": prev,
        "request_id": request_id,
    }


def make_delete(
    key: bytes,
    end: bytes | None = None,
    *,
    if_mod_revision: int | None = None,
    prev: bool = False,
    request_id: str | None = None,
) -> dict:
    return {
        "v": COMMAND_VERSION,
        "op": "delete",
        "key": key,
        "end": end,
        "if_mod_revision": if_mod_revision,
        "prev": prev,
        "request_id": request_id,
    }


def make_barrier() -> dict:
    return {"v": COMMAND_VERSION, "op": "barrier"}


class _RemembersRequests:
    """Request id -> (log index, fingerprint, first result), bounded by count and age.

    The oldest ids are forgotten first (the dict keeps insertion order, which is log order).
    """

    def __init__(self) -> None:
        self.entries: "collections.OrderedDict[str, tuple[int, str, dict]]" = collections.OrderedDict()


class KVStateMachine:
    """The store as of some Raft log index, kept in `engine`.

    Threads: `apply()` (and snapshot capture/install) run on one thread, pysyncobj's; the
    read methods run on any thread. A read sees the store as of one revision: it reads
    optimistically and checks a sequence counter that `apply()` bumps before and after
    each engine batch (a seqlock), retrying a few times and then taking the apply lock.

        sm = KVStateMachine(open_engine("memory"))
        sm.apply(make_put(b"a", b"1", request_id="r1"), index=2)
        -> {"revision": 2, "created": True, "prev": None}
        sm.get(b"a") -> (KeyValue(b"a", b"1", 2, 2, 1), 2)
    """

    _OPTIMISTIC_READ_ATTEMPTS = 3
    _LOCKED_READ_WAIT_S = 0.5

    def __init__(self, engine, limits: StateMachineLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or StateMachineLimits()
        self.lock = threading.Lock()  # held by apply while it writes; by reads that give up optimism
        self._sequence = 0  # odd while an apply is writing
        self.failed: str | None = None  # set when the engine refused a write: this replica diverged
        self.applied_index = 0
        self.revision = 1
        self.compact_revision = 0
        self._requests = _RemembersRequests()
        self.applied_commands = 0
        self.skipped_commands = 0
        self._load()

    # --- loading -------------------------------------------------------------------------

    def _load(self) -> None:
        if self.engine.get(_INSTALLING_KEY) is not None:
            # A snapshot install was cut short: the content is neither the old nor the new
            # state. Start empty; pysyncobj reinstalls the dump it had already stored.
            self._wipe()
        meta = self.engine.get(_META_KEY)
        if meta is not None:
            self.applied_index, self.revision, self.compact_revision = _META.unpack(meta)
        entries = self._requests.entries
        for row_key, row in self.engine.scan(_DEDUPE, _DEDUPE + b"\xff"):
            index = _U64.unpack(row_key[1:])[0]
            request_id, fingerprint, result = _decode_request(row)
            entries[request_id] = (index, fingerprint, result)

    def _wipe(self) -> None:
        while True:
            keys = [k for k, _ in self.engine.scan(limit=1000)]
            if not keys:
                return
            self.engine.write([("delete", k, None) for k in keys])

    # --- apply ---------------------------------------------------------------------------

    def apply(self, command: Any, index: int) -> dict:
        """Apply the command at Raft log `index`; returns its result or an error value.

        Entries at or below `applied_index` were applied before a restart: they are
        skipped and answer `{"error": "already_applied"}` (nobody waits for them).
        """
        try:
            if self.failed is not None:
                return _error("replica_failed", self.failed)
            if index <= self.applied_index:
                self.skipped_commands += 1
                return _error("already_applied", f"log index {index} is at or below {self.applied_index}")
            result = self._apply(command, index)
            self.applied_commands += 1
            return result
        except CommandError as exc:
            return exc.result
        except Exception as exc:  # noqa: BLE001 - apply must never raise (see module docstring)
            self.failed = f"applying log index {index} failed: {exc!r}"
            return _error("replica_failed", self.failed)

    def _apply(self, command: Any, index: int) -> dict:
        if not isinstance(command, dict):
            raise CommandError("invalid_command", f"a command is a dict, not {type(command).__name__}")
        version = command.get("v")
        if version != COMMAND_VERSION:
            raise CommandError("unsupported_command_version", f"command version {version!r} is not supported")
        op = command.get("op")
        if op == "barrier":
            return {"revision": self.revision, "index": index}
        if op not in ("put", "delete"):
            raise CommandError("invalid_command", f"unknown op {op!r}")

        request_id = command.get("request_id")
        fingerprint = ""
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise CommandError("invalid_request_id", "request_id must be a non-empty string")
            if len(request_id.encode()) > self.limits.max_request_id_bytes:
                raise CommandError("invalid_request_id", f"request_id is over {self.limits.max_request_id_bytes} bytes")
            fingerprint = _fingerprint(command)
            seen = self._requests.entries.get(request_id)
            if seen is not None:
                return self._repeat(command, seen, fingerprint)

        if op == "put":
            result, rows = self._put(command)
        else:
            result, rows = self._delete(command)
        self._commit(index, rows, request_id, fingerprint, result)
        return result

    def _repeat(self, command: dict, seen: tuple[int, str, dict], fingerprint: str) -> dict:
        _, first_fingerprint, first_result = seen
        if first_fingerprint != fingerprint:
            raise CommandError(
                "invalid_request_id", "this request_id was already used by a different write; use a new one"
            )
        result = dict(first_result)
        result["duplicate"] = True
        # The stored result leaves out previous values (they can be large); they are the
        # key(s) as of the revision just before the write, so read them from history.
        revision = result.get("revision", 0)
        if command.get("prev") and "error" not in result and revision > 1 and revision - 1 >= self.compact_revision:
            if command["op"] == "put":
                kv, _ = self._read_key(command["key"], revision - 1)
                result["prev"] = None if kv is None else _kv_to_dict(kv)
            elif result.get("deleted"):
                items = self._read_history_range(command["key"], command.get("end"), revision - 1, None, False)
                result["prev"] = [_kv_to_dict(kv) for kv in items]
        return result

    def _check_key(self, key: Any, name: str = "key") -> bytes:
        if not isinstance(key, bytes) or not key:
            raise CommandError("invalid_key", f"{name} must be non-empty bytes")
        if len(key) > self.limits.max_key_bytes:
            raise CommandError("invalid_key", f"{name} is over {self.limits.max_key_bytes} bytes")
        return key

    def _check_compare(self, command: dict) -> int | None:
        expected = command.get("if_mod_revision")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 0):
            raise CommandError("invalid_if_mod_revision", "if_mod_revision must be a non-negative integer")
        return expected

    def _current(self, key: bytes) -> Record | None:
        data = self.engine.get(_CURRENT + enc(key))
        return None if data is None else Record.decode(data)

    def _put(self, command: dict) -> tuple[dict, list]:
        key = self._check_key(command.get("key"))
        value = command.get("value")
        if not isinstance(value, bytes):
            raise CommandError("invalid_value", "value must be bytes")
        if len(value) > self.limits.max_value_bytes:
            raise CommandError("value_too_large", f"value is over {self.limits.max_value_bytes} bytes")
        lease = command.get("lease", 0)
        if not isinstance(lease, int) or isinstance(lease, bool):
            raise CommandError("invalid_lease", "lease must be an integer")
        if lease != 0:
            # Leases come with the next issue; until then no lease exists.
            raise CommandError("lease_not_found", f"lease {lease} does not exist")
        expected = self._check_compare(command)
        current = self._current(key)
        current_mod = current.mod_revision if current else 0
        if expected is not None and expected != current_mod:
            return (
                _error(
                    "precondition_failed",
                    f"the key's mod_revision is {current_mod}, not {expected}",
                    mod_revision=current_mod,
                    revision=self.revision,
                ),
                [],
            )
        revision = self.revision + 1
        record = Record(
            create_revision=current.create_revision if current else revision,
            mod_revision=revision,
            version=current.version + 1 if current else 1,
            lease=lease,
            value=value,
        )
        encoded = record.encode()
        rows = [
            ("put", _CURRENT + enc(key), encoded),
            ("put", history_key(key, revision), encoded),
            ("put", _EVENTS + _U64.pack(revision), _encode_keys([key])),
        ]
        result = {"revision": revision, "created": current is None, "prev": None}
        if command.get("prev") and current is not None:
            result["prev"] = _kv_to_dict(current.to_kv(key))
        return result, rows

    def _delete(self, command: dict) -> tuple[dict, list]:
        key = self._check_key(command.get("key"))
        end = command.get("end")
        expected = self._check_compare(command)
        if end is None:
            current = self._current(key)
            if expected is not None and expected != (current.mod_revision if current else 0):
                current_mod = current.mod_revision if current else 0
                return (
                    _error(
                        "precondition_failed",
                        f"the key's mod_revision is {current_mod}, not {expected}",
                        mod_revision=current_mod,
                        revision=self.revision,
                    ),
                    [],
                )
            victims = [(key, current)] if current is not None else []
        else:
            if not isinstance(end, bytes) or not end:
                raise CommandError("invalid_range_end", "end must be non-empty bytes")
            if expected is not None:
                raise CommandError("invalid_if_mod_revision", "if_mod_revision applies to a single key, not a range")
            victims = []
            key_bytes = 0
            for row_key, row in self.engine.scan(*self._current_bounds(key, end)):
                victims.append((dec(row_key[1:]), Record.decode(row)))
                key_bytes += len(row_key)
                if len(victims) > self.limits.max_delete_keys or key_bytes > self.limits.max_delete_key_bytes:
                    raise CommandError(
                        "too_many_keys",
                        f"the range holds more than {self.limits.max_delete_keys} keys; delete it in smaller ranges",
                    )
        if not victims:
            return {"revision": self.revision, "deleted": 0, "prev": []}, []
        revision = self.revision + 1
        tombstone = Record(0, revision, 0, 0, None).encode()
        rows = []
        for victim, _ in victims:
            rows.append(("delete", _CURRENT + enc(victim), None))
            rows.append(("put", history_key(victim, revision), tombstone))
        rows.append(("put", _EVENTS + _U64.pack(revision), _encode_keys([k for k, _ in victims])))
        result = {"revision": revision, "deleted": len(victims), "prev": []}
        if command.get("prev"):
            result["prev"] = [_kv_to_dict(record.to_kv(k)) for k, record in victims]
        return result, rows

    def _commit(self, index: int, rows: list, request_id: str | None, fingerprint: str, result: dict) -> None:
        revision = result["revision"] if rows else self.revision
        evicted: list[str] = []
        if request_id is not None:
            stored = {k: v for k, v in result.items() if k != "prev"}
            rows.append(("put", _DEDUPE + _U64.pack(index), _encode_request(request_id, fingerprint, stored)))
            entries = self._requests.entries
            entries[request_id] = (index, fingerprint, stored)
            oldest_allowed = index - self.limits.request_id_max_age_entries
            while entries:
                old_id, (old_index, _, _) = next(iter(entries.items()))
                if len(entries) <= self.limits.max_request_ids and old_index >= oldest_allowed:
                    break
                del entries[old_id]
                evicted.append(old_id)
                rows.append(("delete", _DEDUPE + _U64.pack(old_index), None))
        rows.append(("put", _META_KEY, _META.pack(index, revision, self.compact_revision)))
        with self.lock:
            self._sequence += 1
            try:
                self.engine.write(rows)
                self.applied_index = index
                self.revision = revision
            finally:
                self._sequence += 1

    # --- reads ---------------------------------------------------------------------------

    def _consistent(self, read):
        """Run `read(revision)` against one revision: optimistic first, then under the lock."""
        for _ in range(self._OPTIMISTIC_READ_ATTEMPTS):
            before = self._sequence
            if before % 2:
                continue
            revision = self.revision
            result = read(revision)
            if self._sequence == before:
                return result
        # Past optimism: an apply is writing (microseconds) or a snapshot is being installed
        # (seconds); wait briefly, never for a whole install (reads may run on the loop).
        if not self.lock.acquire(timeout=self._LOCKED_READ_WAIT_S):
            raise Unavailable("this replica is installing a snapshot; retry shortly", reason="installing_snapshot")
        try:
            return read(self.revision)
        finally:
            self.lock.release()

    def _check_revision(self, revision: int | None) -> int | None:
        if revision is None or revision == 0:
            return None
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise InvalidRequest("revision must be a non-negative integer", code="invalid_revision")
        if revision < self.compact_revision:
            raise Compacted(
                f"revision {revision} was compacted; the oldest readable revision is {self.compact_revision}",
                compact_revision=self.compact_revision,
            )
        if revision > self.revision:
            raise InvalidRequest(
                f"revision {revision} is in the future; the store is at revision {self.revision}",
                code="invalid_revision",
                revision=self.revision,
            )
        return revision

    def get(self, key: bytes, revision: int | None = None) -> tuple[KeyValue | None, int]:
        """The key as of `revision` (None: now) and the store revision the read saw."""
        at = self._check_revision(revision)
        if at is not None:
            kv, _ = self._read_key(key, at)
            return kv, self.revision

        def read(current_revision):
            data = self.engine.get(_CURRENT + enc(key))
            return (None if data is None else Record.decode(data).to_kv(key)), current_revision

        return self._consistent(read)

    def _read_key(self, key: bytes, revision: int) -> tuple[KeyValue | None, int]:
        start = _HISTORY + enc(key) + _KEY_END
        for _, data in self.engine.scan(start, start + _U64.pack(revision + 1), reverse=True, limit=1):
            record = Record.decode(data)
            return (None if record.value is None else record.to_kv(key)), revision
        return None, revision

    def _current_bounds(self, start: bytes, end: bytes | None) -> tuple[bytes, bytes]:
        if end is None:
            return _CURRENT + enc(start), _CURRENT + enc(start) + b"\x00"
        if end == b"\x00":
            return _CURRENT + enc(start), _CURRENT + b"\xff"
        return _CURRENT + enc(start), _CURRENT + enc(end)

    def range(
        self,
        start: bytes,
        end: bytes | None,
        *,
        limit: int | None = None,
        keys_only: bool = False,
        count_only: bool = False,
        revision: int | None = None,
    ) -> tuple[list[KeyValue], int, bool, int]:
        """Keys in [start, end) as of `revision`: (items, store revision, more, count).

        `end` None means just `start`; b"\\0" means every key >= start (etcd's range_end).
        `count` is every match; `items` holds at most `limit` of them (none if count_only).
        """
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise InvalidRequest("limit must be a non-negative integer", code="invalid_limit")
        cap = self.limits.max_range_items
        if not limit or limit > cap:
            limit = cap
        if count_only:
            keys_only = True
        at = self._check_revision(revision)
        if at is not None:
            items = self._read_history_range(start, end, at, None, keys_only)
            count = len(items)
            return ([] if count_only else items[:limit]), self.revision, count > limit and not count_only, count

        def read(current_revision):
            items: list[KeyValue] = []
            count = 0
            for row_key, data in self.engine.scan(*self._current_bounds(start, end)):
                count += 1
                if not count_only and len(items) < limit:
                    items.append(Record.decode(data).to_kv(dec(row_key[1:]), keys_only))
            return items, current_revision, count > len(items) and not count_only, count

        return self._consistent(read)

    def _read_history_range(
        self, start: bytes, end: bytes | None, revision: int, limit: int | None, keys_only: bool
    ) -> list[KeyValue]:
        """Scan every version in the range and keep, per key, the last one at or below
        `revision`. Costs O(versions in the range), not O(keys): compaction bounds it."""
        if end is None:
            kv, _ = self._read_key(start, revision)
            return [] if kv is None else [kv]
        low = _HISTORY + enc(start)
        high = _HISTORY + b"\xff" if end == b"\x00" else _HISTORY + enc(end)
        items: list[KeyValue] = []
        last_key: bytes | None = None
        last_record: Record | None = None

        def flush():
            if last_key is not None and last_record is not None and last_record.value is not None:
                items.append(last_record.to_kv(last_key, keys_only))

        for row_key, data in self.engine.scan(low, high):
            key, row_revision = _split_history_key(row_key)
            if key != last_key:
                flush()
                last_key, last_record = key, None
                if limit is not None and len(items) >= limit:
                    break
            if row_revision <= revision:
                last_record = Record.decode(data)
        else:
            flush()
        return items if limit is None else items[:limit]

    # --- snapshots -----------------------------------------------------------------------

    def capture_snapshot(self) -> "SnapshotSource":
        """Called on the apply thread: pin what a snapshot at the current state holds.

        History rows at or below the pinned revision never change (only compaction removes
        rows, and it must not run past a snapshot in progress), so another thread can read
        them afterwards while applies go on; the request ids are copied now.
        """
        return SnapshotSource(
            engine=self.engine,
            revision=self.revision,
            compact_revision=self.compact_revision,
            requests=list(self._requests.entries.items()),
        )

    def install_snapshot(self, index: int, revision: int, compact_revision: int, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the whole store by a snapshot at log `index` (apply thread only).

        Crash-safe: a marker row is written first and removed with the final meta, and
        `_load()` wipes a store that still carries it.
        """
        with self.lock:
            self._sequence += 1
            try:
                self.engine.write([("put", _INSTALLING_KEY, b"1")])
                self._wipe_except_marker()
                batch: list = []
                latest: dict[bytes, Record] = {}
                requests: "collections.OrderedDict[str, tuple[int, str, dict]]" = collections.OrderedDict()
                for row_key, row in rows:
                    tag = row_key[:1]
                    if tag == _HISTORY:
                        key, _ = _split_history_key(row_key)
                        record = Record.decode(row)
                        if record.value is None:
                            latest.pop(key, None)
                        else:
                            latest[key] = record
                    elif tag == _DEDUPE:
                        request_id, fingerprint, result = _decode_request(row)
                        requests[request_id] = (_U64.unpack(row_key[1:])[0], fingerprint, result)
                    elif tag != _EVENTS:
                        raise ValueError(f"snapshot row with unknown tag {tag!r}")
                    batch.append(("put", row_key, row))
                    if len(batch) >= 1000:
                        self.engine.write(batch)
                        batch = []
                for key, record in latest.items():
                    batch.append(("put", _CURRENT + enc(key), record.encode()))
                    if len(batch) >= 1000:
                        self.engine.write(batch)
                        batch = []
                self.engine.write(batch)
                self.engine.sync()
                self.engine.write(
                    [
                        ("put", _META_KEY, _META.pack(index, revision, compact_revision)),
                        ("delete", _INSTALLING_KEY, None),
                    ]
                )
                self.engine.sync()
                self.applied_index, self.revision, self.compact_revision = index, revision, compact_revision
                self._requests.entries = requests
                self.failed = None
            finally:
                self._sequence += 1

    def _wipe_except_marker(self) -> None:
        while True:
            keys = [k for k, _ in self.engine.scan(limit=1001) if k != _INSTALLING_KEY][:1000]
            if not keys:
                return
            self.engine.write([("delete", k, None) for k in keys])

    # --- invariants ----------------------------------------------------------------------

    def _check(self) -> None:
        """Assert the store's invariants (tests call it after every step)."""
        meta = self.engine.get(_META_KEY)
        if meta is not None:
            assert _META.unpack(meta) == (self.applied_index, self.revision, self.compact_revision), "meta row drifted"
        assert self.revision >= 1 and self.compact_revision <= self.revision
        assert len(self._requests.entries) <= self.limits.max_request_ids
        indexes = [index for index, _, _ in self._requests.entries.values()]
        assert indexes == sorted(indexes), "request ids out of log order"
        # Every current record is the newest history row of its key.
        for row_key, data in self.engine.scan(_CURRENT, _CURRENT + b"\xff"):
            key = dec(row_key[1:])
            record = Record.decode(data)
            assert record.value is not None
            assert 1 <= record.create_revision <= record.mod_revision <= self.revision, (key, record)
            newest = list(self.engine.scan(history_key(key, 0), history_key(key, 0)[:-8] + b"\xff" * 8, reverse=True, limit=1))
            assert newest and Record.decode(newest[0][1]) == record, (key, record)


@dataclasses.dataclass
class SnapshotSource:
    """What a snapshot holds, readable from a thread other than the apply thread."""

    engine: Any
    revision: int
    compact_revision: int
    requests: list

    def rows(self) -> Iterator[tuple[bytes, bytes]]:
        for row_key, row in self.engine.scan(_HISTORY, _HISTORY + b"\xff"):
            if _U64.unpack(row_key[-8:])[0] <= self.revision:
                yield row_key, row
        for row_key, row in self.engine.scan(_EVENTS, _EVENTS + _U64.pack(self.revision + 1)):
            yield row_key, row
        for request_id, (index, fingerprint, result) in self.requests:
            yield _DEDUPE + _U64.pack(index), _encode_request(request_id, fingerprint, result)


def _fingerprint(command: dict) -> str:
    """What makes two writes "the same request": op, key(s), value and compare."""
    digest = hashlib.blake2b(digest_size=12)
    for part in (command.get("op"), command.get("key"), command.get("end"), command.get("value"), command.get("if_mod_revision")):
        digest.update(repr(part).encode() if not isinstance(part, bytes) else part)
        digest.update(b"\x00|")
    return digest.hexdigest()


def _encode_keys(keys: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(k)) + k for k in keys)


def decode_keys(data: bytes) -> list[bytes]:
    keys, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        keys.append(bytes(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return keys


def _encode_request(request_id: str, fingerprint: str, result: dict) -> bytes:
    return json.dumps({"id": request_id, "fp": fingerprint, "result": result}, separators=(",", ":")).encode()


def _decode_request(data: bytes) -> tuple[str, str, dict]:
    obj = json.loads(data)
    return obj["id"], obj["fp"], obj["result"]
