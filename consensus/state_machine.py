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

import base64
import collections
import dataclasses
import hashlib
import json
import struct
import threading
from typing import Any, Iterable, Iterator

from api.service import Compacted, InvalidRequest, KeyValue, Unavailable, WatchEvent

COMMAND_VERSION = 1

_META_KEY = b"m"
_INSTALLING_KEY = b"i"
_CURRENT = b"k"
_HISTORY = b"h"
_EVENTS = b"e"
_DEDUPE = b"d"
_LEASES = b"l"  # + id: {"ttl", "refresh"} (JSON)
_ATTACHED = b"a"  # + lease id + enc(key): the key is attached to the lease
_MEMBERS = b"M"  # + member id: {"client_url", "peer_address", "removed"} (JSON)
_WRITE_OPS = ("put", "delete", "txn", "compact", "lease_grant", "lease_keepalive", "lease_revoke", "lease_expire",
              "member_add", "member_remove", "member_step_down")  # fmt: skip
_COMPARE_TARGETS = ("value", "version", "create_revision", "mod_revision", "lease")
_COMPARE_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}

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
    # A retried txn must answer what the first attempt would have (its get responses and
    # previous values), so its whole result is kept with its id: one result up to this
    # size (JSON, values in base64)...
    max_request_result_bytes: int = 256 * 1024
    # ...and all kept results together up to this; past it the oldest are cut down to
    # their outcome, and a retry of one of those is refused (`responses_unavailable`).
    max_request_results_bytes: int = 8 * 1024 * 1024
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
    # Each lease is a row and a timer on every node.
    max_leases: int = 100_000
    # A lease's keys are all deleted in one apply, one engine batch and one watch batch
    # when it is revoked or expires (one revision, as etcd): attaching more than this many
    # keys to one lease is refused, so that apply costs no more than the largest range
    # delete (`max_delete_keys`), and the tick thread that runs it keeps heartbeating.
    max_lease_keys: int = 10_000
    # etcd's limit on a lease's TTL (MaxLeaseTTL, 9 000 000 000 s) is needlessly large.
    max_lease_ttl_s: int = 10 * 365 * 24 * 3600
    # Ops per list (compare, success, failure) of one txn, etcd's default (--max-txn-ops).
    max_txn_ops: int = 128
    # History rows one apply examines for physical compaction (the rest at later applies):
    # the tick thread that applies also sends heartbeats.
    compact_rows_per_apply: int = 20_000

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
    A txn result that carries data (get responses, previous values) is kept whole, marked
    `_KEPT`, while all of those fit `max_request_results_bytes`; `kept` accounts for them,
    oldest first, and is derived from `entries` alone, so every replica, restarted or
    installed from a snapshot, cuts down the same results at the same log index.
    """

    def __init__(self) -> None:
        self.entries: "collections.OrderedDict[str, tuple[int, str, dict]]" = collections.OrderedDict()
        self.kept: dict[str, int] = {}  # request id -> stored bytes of a whole result, log order
        self.kept_bytes = 0

    def recount(self) -> None:
        self.kept = {rid: len(_encode_request(rid, fp, result))
                     for rid, (_, fp, result) in self.entries.items() if result.get(_KEPT)}  # fmt: skip
        self.kept_bytes = sum(self.kept.values())

    def keep(self, request_id: str, size: int) -> None:
        self.kept[request_id] = size
        self.kept_bytes += size

    def unkeep(self, request_id: str) -> None:
        self.kept_bytes -= self.kept.pop(request_id, 0)


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
        self._lease_key_counts: dict[int, int] = {}  # lease id -> keys attached (from the `a` rows)
        # Called on the apply thread after each command that changed keys, leases or members:
        # listener(revision, [WatchEvent with prev], notices), a notice being
        # ("refresh" | "gone", lease id, ttl, log index) or ("member" | "step_down", member id, 0, log index).
        self.listener = None
        self._snapshot_pins = 0  # snapshots being written: physical compaction waits
        self._pins_lock = threading.Lock()
        self._compact_pending = False
        self._compact_cursor: bytes | None = None  # where the incremental physical compaction resumes
        self.compacted_rows = 0
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
            self._compact_pending = self.compact_revision > 0
        entries = self._requests.entries
        for row_key, row in self.engine.scan(_DEDUPE, _DEDUPE + b"\xff"):
            index = _U64.unpack(row_key[1:])[0]
            request_id, fingerprint, result = _decode_request(row)
            entries[request_id] = (index, fingerprint, result)
        self._requests.recount()
        self._count_lease_keys()

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
        if op not in _WRITE_OPS:
            raise CommandError("invalid_command", f"unknown op {op!r}")
        if self._compact_pending and not self._snapshot_pins:
            self._physical_compact()
        if op == "compact":
            return self._compact(command, index)

        request_id = command.get("request_id")
        fingerprint = ""
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise CommandError("invalid_request_id", "request_id must be a non-empty string")
            if len(request_id.encode()) > self.limits.max_request_id_bytes:
                raise CommandError("invalid_request_id", f"request_id is over {self.limits.max_request_id_bytes} bytes")
            fingerprint = _fingerprint(command) if op in ("put", "delete") else _fingerprint_any(command)
            seen = self._requests.entries.get(request_id)
            if seen is not None:
                return self._repeat(command, seen, fingerprint)

        batch = _Batch(self, index)
        if op == "put":
            result = self._put(command, batch)
        elif op == "delete":
            result = self._delete(command, batch)
        elif op == "txn":
            result = self._txn(command, batch)
        elif op.startswith("member_"):
            result = self._member_op(op, command, batch)
        else:
            result = self._lease_op(op, command, batch)
        rows = batch.finish(result)
        self._commit(index, rows, request_id, fingerprint, result)
        if batch.lease_key_changes and "error" not in result:
            self._apply_lease_key_changes(batch.lease_key_changes)
        if batch.events or batch.lease_changes:
            listener = self.listener
            if listener is not None:
                listener(batch.revision if batch.events else self.revision, batch.events, batch.lease_changes)
        return result

    def _repeat(self, command: dict, seen: tuple[int, str, dict], fingerprint: str) -> dict:
        _, first_fingerprint, first_result = seen
        if first_fingerprint != fingerprint:
            raise CommandError(
                "invalid_request_id", "this request_id was already used by a different write; use a new one"
            )
        if "responses" in first_result:
            return self._repeat_txn(command, first_result)
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

    def _repeat_txn(self, command: dict, first_result: dict) -> dict:
        """A retried txn answers its first result whole, or, when that was too large to
        keep, says what is known: it applied at revision R; its responses are gone.

            txn [put a=1, get a] request_id r -> {"succeeded": True, "revision": 7, "responses": [...]}
            same again                        -> the same, plus "duplicate": True (applied once)
            same again, result cut down       -> {"error": "responses_unavailable", "revision": 7, ...}
        """
        if first_result.get(_KEPT):
            result = _from_stored(first_result)
            del result[_KEPT]
        elif first_result.get(_DROPPED) or _has_omitted(first_result):
            revision, succeeded = first_result.get("revision"), bool(first_result.get("succeeded"))
            return _error(
                "responses_unavailable",
                f"request {command.get('request_id')!r} was already applied at revision {revision} "
                f"({'compare held' if succeeded else 'compare failed'}); its responses were too large to keep "
                "for a retry; read the keys again",
                revision=revision,
                succeeded=succeeded,
            )
        else:
            result = _from_stored(first_result)  # nothing was left out: puts and deletes without prev
        result["duplicate"] = True
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

    def _put(self, command: dict, batch: "_Batch") -> dict:
        key = self._check_key(command.get("key"))
        value = self._check_value(command.get("value"))
        lease = self._check_lease_id(command.get("lease", 0))
        expected = self._check_compare(command)
        current = batch.current(key)
        current_mod = current.mod_revision if current else 0
        if expected is not None and expected != current_mod:
            return _error(
                "precondition_failed",
                f"the key's mod_revision is {current_mod}, not {expected}",
                mod_revision=current_mod,
                revision=self.revision,
            )
        if lease and (current is None or current.lease != lease):
            self._attach(lease, batch)
        old = batch.put(key, value, lease)
        if old is not None and old.lease and old.lease != lease:
            batch.lease_key_changes[old.lease] = batch.lease_key_changes.get(old.lease, 0) - 1
        result = {"revision": batch.revision, "created": old is None, "prev": None}
        if command.get("prev") and old is not None:
            result["prev"] = _kv_to_dict(old.to_kv(key))
        return result

    def _check_value(self, value: Any) -> bytes:
        if not isinstance(value, bytes):
            raise CommandError("invalid_value", "value must be bytes")
        if len(value) > self.limits.max_value_bytes:
            raise CommandError("value_too_large", f"value is over {self.limits.max_value_bytes} bytes")
        return value

    def _check_lease_id(self, lease: Any) -> int:
        if not isinstance(lease, int) or isinstance(lease, bool) or lease < 0 or lease >= 2**63:
            raise CommandError("invalid_lease", "lease must be an integer in [0, 2**63)")
        if lease != 0 and self.engine.get(_lease_key(lease)) is None:
            raise CommandError("lease_not_found", f"lease {lease} does not exist")
        return lease

    def _delete(self, command: dict, batch: "_Batch") -> dict:
        key = self._check_key(command.get("key"))
        end = command.get("end")
        expected = self._check_compare(command)
        if end is None:
            current = batch.current(key)
            if expected is not None and expected != (current.mod_revision if current else 0):
                current_mod = current.mod_revision if current else 0
                return _error(
                    "precondition_failed",
                    f"the key's mod_revision is {current_mod}, not {expected}",
                    mod_revision=current_mod,
                    revision=self.revision,
                )
            victims = [(key, current)] if current is not None else []
        else:
            if not isinstance(end, bytes) or not end:
                raise CommandError("invalid_range_end", "end must be non-empty bytes")
            if expected is not None:
                raise CommandError("invalid_if_mod_revision", "if_mod_revision applies to a single key, not a range")
            victims = batch.range(key, end, self.limits.max_delete_keys)
        batch.delete(victims)
        for _, record in victims:
            if record.lease:
                batch.lease_key_changes[record.lease] = batch.lease_key_changes.get(record.lease, 0) - 1
        result = {"revision": batch.revision if victims else self.revision, "deleted": len(victims), "prev": []}
        if command.get("prev"):
            result["prev"] = [_kv_to_dict(record.to_kv(k)) for k, record in victims]
        return result

    # --- transactions --------------------------------------------------------------------

    def _txn(self, command: dict, batch: "_Batch") -> dict:
        """etcd's Txn: compares, then one branch; every write at one revision.

        Ops of the branch see the writes of the ops before them (etcd does the same).
        """
        problem = txn_problem(command, self.limits.max_txn_ops)
        if problem is not None:
            raise CommandError("invalid_txn", problem)
        return self._run_txn(command, batch)

    def _run_txn(self, txn: dict, batch: "_Batch") -> dict:
        succeeded = all(self._holds(c, batch) for c in txn.get("compare") or [])
        responses = []
        for op in txn.get("success" if succeeded else "failure") or []:
            kind = op.get("op")
            if kind == "get":
                responses.append(self._txn_get(op, batch))
            elif kind == "put":
                response = self._put({**op, "if_mod_revision": None}, batch)
                responses.append({"op": "put", **response})
            elif kind == "delete":
                response = self._delete({**op, "if_mod_revision": None}, batch)
                responses.append({"op": "delete", **response})
            elif kind == "txn":
                responses.append({"op": "txn", **self._run_txn(op, batch)})
            else:
                raise CommandError("invalid_txn", f"unknown txn op {kind!r}")
        return {"succeeded": succeeded, "revision": batch.revision if batch.written else self.revision, "responses": responses}

    def _holds(self, compare: dict, batch: "_Batch") -> bool:
        key = self._check_key(compare.get("key"))
        end = compare.get("end")
        target, op, wanted = compare.get("target"), compare.get("op"), compare.get("value")
        if target not in _COMPARE_TARGETS or op not in _COMPARE_OPS:
            raise CommandError("invalid_txn", f"bad compare {target!r} {op!r}")
        if end is None:
            records = [batch.current(key)]
        else:
            records = [r for _, r in batch.range(key, end, self.limits.max_range_items)] or [None]
        for record in records:
            if target == "value":
                if record is None:
                    return False
                actual = record.value or b""
                if not isinstance(wanted, bytes):
                    raise CommandError("invalid_txn", "a value compare takes bytes")
            else:
                actual = 0 if record is None else getattr(record, target)
                if not isinstance(wanted, int) or isinstance(wanted, bool):
                    raise CommandError("invalid_txn", f"a {target} compare takes an integer")
            if not _COMPARE_OPS[op](actual, wanted):
                return False
        return True

    def _txn_get(self, op: dict, batch: "_Batch") -> dict:
        key = self._check_key(op.get("key"))
        end = op.get("end")
        limit = op.get("limit") or self.limits.max_range_items
        if not isinstance(limit, int) or limit < 0:
            raise CommandError("invalid_txn", "limit must be a non-negative integer")
        keys_only, count_only = bool(op.get("keys_only")), bool(op.get("count_only"))
        revision = op.get("revision") or None
        if revision is not None:
            if not isinstance(revision, int) or revision > self.revision:
                raise CommandError("invalid_revision", f"revision {revision} is in the future; the store is at {self.revision}")
            if revision < self.compact_revision:
                raise CommandError("compacted", f"revision {revision} was compacted", compact_revision=self.compact_revision)
            kvs = self._read_history_range(key, end, revision, None, keys_only or count_only)
        elif end is None:
            record = batch.current(key)
            kvs = [] if record is None else [record.to_kv(key, keys_only or count_only)]
        else:
            kvs = [r.to_kv(k, keys_only or count_only) for k, r in batch.range(key, end, self.limits.max_range_items)]
        count = len(kvs)
        items = [] if count_only else kvs[:limit]
        return {"op": "get", "items": [_kv_to_dict(kv) for kv in items], "count": count,
                "more": not count_only and count > len(items)}  # fmt: skip

    # --- leases --------------------------------------------------------------------------

    def _lease_op(self, op: str, command: dict, batch: "_Batch") -> dict:
        """Grant, keep alive, revoke, expire. No clock here: the leader decides when a
        lease is due and proposes `lease_expire` with the lease's `refresh` index it saw;
        a keepalive applied in between changes that index and the expiry does nothing."""
        lease_id = command.get("id")
        if not isinstance(lease_id, int) or isinstance(lease_id, bool) or not 0 < lease_id < 2**63:
            raise CommandError("invalid_lease", "a lease id is an integer in [1, 2**63)")
        row = self.engine.get(_lease_key(lease_id))
        lease = None if row is None else json.loads(row)
        if op == "lease_grant":
            ttl = command.get("ttl")
            if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= self.limits.max_lease_ttl_s:
                raise CommandError("invalid_ttl", f"ttl must be 1..{self.limits.max_lease_ttl_s} seconds")
            if lease is not None:
                raise CommandError("lease_exists", f"lease {lease_id} already exists", lease_id=lease_id)
            if self._lease_count() >= self.limits.max_leases:
                raise CommandError("too_many_leases", f"at most {self.limits.max_leases} leases may exist")
            lease = {"ttl": ttl, "refresh": batch.index}
            batch.rows.append(("put", _lease_key(lease_id), json.dumps(lease).encode()))
            batch.lease_changes.append(("refresh", lease_id, ttl, batch.index))
            return {"id": lease_id, "ttl": ttl, "revision": self.revision}
        if lease is None:
            if op == "lease_expire":
                return {"revision": self.revision, "expired": False}
            raise CommandError("lease_not_found", f"lease {lease_id} does not exist")
        if op == "lease_keepalive":
            lease["refresh"] = batch.index
            batch.rows.append(("put", _lease_key(lease_id), json.dumps(lease).encode()))
            batch.lease_changes.append(("refresh", lease_id, lease["ttl"], batch.index))
            return {"id": lease_id, "ttl": lease["ttl"], "revision": self.revision}
        if op == "lease_expire" and command.get("refresh") != lease["refresh"]:
            return {"revision": self.revision, "expired": False}  # kept alive meanwhile
        victims = []
        for key in self.lease_keys(lease_id):
            record = batch.current(key)
            if record is not None:
                victims.append((key, record))
        batch.delete(victims)
        batch.lease_key_changes[lease_id] = None  # gone with the lease
        batch.rows.append(("delete", _lease_key(lease_id), None))
        batch.lease_changes.append(("gone", lease_id, 0, batch.index))
        return {"revision": batch.revision if victims else self.revision, "deleted": len(victims), "expired": True}

    def _attach(self, lease_id: int, batch: "_Batch") -> None:
        """Count one more key on the lease in this batch; refuse past `max_lease_keys`."""
        change = batch.lease_key_changes.get(lease_id, 0) or 0
        if self._lease_key_counts.get(lease_id, 0) + change >= self.limits.max_lease_keys:
            raise CommandError(
                "too_many_keys",
                f"lease {lease_id} has {self.limits.max_lease_keys} keys attached already; attach more keys to "
                "another lease (all keys of a lease are deleted in one revision when it ends)",
            )
        batch.lease_key_changes[lease_id] = change + 1

    def _apply_lease_key_changes(self, changes: dict) -> None:
        counts = self._lease_key_counts
        for lease_id, change in changes.items():
            left = 0 if change is None else counts.get(lease_id, 0) + change
            if left:
                counts[lease_id] = left
            else:
                counts.pop(lease_id, None)

    def _count_lease_keys(self) -> dict[int, int]:
        """Keys attached per lease, from the `a` rows (at load and after a snapshot install)."""
        counts: dict[int, int] = {}
        for row_key, _ in self.engine.scan(_ATTACHED, _ATTACHED + b"\xff"):
            lease_id = _U64.unpack_from(row_key, 1)[0]
            counts[lease_id] = counts.get(lease_id, 0) + 1
        self._lease_key_counts = counts
        return counts

    def _lease_count(self) -> int:
        return sum(1 for _ in self.engine.scan(_LEASES, _LEASES + b"\xff", limit=self.limits.max_leases))

    def lease(self, lease_id: int) -> dict | None:
        """{"ttl": granted seconds, "refresh": log index of the grant or last keepalive}."""
        row = self.engine.get(_lease_key(lease_id))
        return None if row is None else json.loads(row)

    def leases(self) -> list[tuple[int, dict]]:
        return [(_U64.unpack(k[1:])[0], json.loads(v)) for k, v in self.engine.scan(_LEASES, _LEASES + b"\xff")]

    def lease_keys(self, lease_id: int) -> list[bytes]:
        prefix = _ATTACHED + _U64.pack(lease_id)
        return [dec(k[len(prefix):]) for k, _ in self.engine.scan(prefix, prefix + b"\xff" * 2)]

    # --- membership ----------------------------------------------------------------------

    def _member_op(self, op: str, command: dict, batch: "_Batch") -> dict:
        """Who the members are beyond the cluster file (ids, client URLs, peer addresses):
        pysyncobj replicates only peer addresses, the API shows ids and URLs. No revision."""
        member_id = command.get("id")
        if not isinstance(member_id, str) or not member_id or len(member_id) > 256:
            raise CommandError("invalid_member_id", "a member id is a non-empty string")
        if op == "member_add":
            record = {"client_url": command.get("client_url"), "peer_address": command.get("peer_address"), "removed": False}
            if not all(isinstance(record[k], str) and record[k] for k in ("client_url", "peer_address")):
                raise CommandError("invalid_member", "a member needs a client_url and a peer_address")
        elif op == "member_remove":
            record = {"client_url": command.get("client_url") or "", "peer_address": command.get("peer_address") or "",
                      "removed": True}  # fmt: skip
        else:
            batch.lease_changes.append(("step_down", member_id, 0, batch.index))
            return {"revision": self.revision}
        batch.rows.append(("put", _MEMBERS + member_id.encode(), json.dumps(record).encode()))
        batch.lease_changes.append(("member", member_id, 0, batch.index))
        return {"revision": self.revision}

    def members(self) -> dict[str, dict]:
        """Member id -> {"client_url", "peer_address", "removed"} changed since the cluster file."""
        return {k[1:].decode(): json.loads(v) for k, v in self.engine.scan(_MEMBERS, _MEMBERS + b"\xff")}

    # --- compaction ----------------------------------------------------------------------

    def _compact(self, command: dict, index: int) -> dict:
        revision = command.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
            raise CommandError("invalid_revision", "revision must be a positive integer")
        if revision > self.revision:
            raise CommandError("invalid_revision", f"revision {revision} is in the future; the store is at {self.revision}",
                               revision=self.revision)  # fmt: skip
        if revision <= self.compact_revision:
            raise CommandError("compacted", f"revision {revision} is already compacted",
                               compact_revision=self.compact_revision)  # fmt: skip
        with self.lock:
            self._sequence += 1
            try:
                self.engine.write([("put", _META_KEY, _META.pack(index, self.revision, revision))])
                self.applied_index = index
                self.compact_revision = revision
            finally:
                self._sequence += 1
        self._compact_pending = True
        self._compact_cursor = None
        if not self._snapshot_pins:
            self._physical_compact()
        return {"revision": self.revision, "compact_revision": revision}

    def _physical_compact(self) -> None:
        """Delete history rows nobody may read any more (below `compact_revision`, except
        each key's newest version at or below it, unless that is a tombstone) and event
        rows below it. Not while a snapshot is being written: the snapshot thread reads
        those rows. Incremental: at most `compact_rows_per_apply` history rows per apply
        (the tick thread must keep heartbeats going), resumed at the next apply. Physical
        removal is local; the logical `compact_revision` is what is replicated."""
        upto = self.compact_revision
        budget = self.limits.compact_rows_per_apply
        doomed: list[bytes] = []
        last_key = None
        candidate = None  # the newest row <= upto of `last_key`: kept unless a tombstone
        low = self._compact_cursor or _HISTORY
        finished = True
        seen = 0
        for row_key, data in self.engine.scan(low, _HISTORY + b"\xff"):
            key, revision = _split_history_key(row_key)
            if key != last_key:
                if candidate is not None and Record.decode(candidate[1]).value is None:
                    doomed.append(candidate[0])
                if seen >= budget:
                    self._compact_cursor = row_key
                    finished = False
                    candidate = None
                    break
                last_key, candidate = key, None
            seen += 1
            if revision <= upto:
                if candidate is not None:
                    doomed.append(candidate[0])
                candidate = (row_key, data)
        if candidate is not None and Record.decode(candidate[1]).value is None:
            doomed.append(candidate[0])
        if finished:
            doomed.extend(k for k, _ in self.engine.scan(_EVENTS, _EVENTS + _U64.pack(upto)))
            self._compact_cursor = None
            self._compact_pending = False
        for start in range(0, len(doomed), 1000):
            with self.lock:
                self._sequence += 1
                try:
                    self.engine.write([("delete", k, None) for k in doomed[start : start + 1000]])
                finally:
                    self._sequence += 1
        self.compacted_rows += len(doomed)

    def release_snapshot(self) -> None:
        """The snapshot writer is done with the rows it pinned (any thread)."""
        with self._pins_lock:
            self._snapshot_pins = max(0, self._snapshot_pins - 1)

    # --- watches -------------------------------------------------------------------------

    def events(self, start: bytes, end: bytes | None, from_revision: int, max_events: int) -> tuple[list, int]:
        """Events of keys in [start, end) from `from_revision`, whole revisions only, at
        most about `max_events`: ([(revision, [WatchEvent])], last revision read, whether
        that was the newest revision).
        Raises Compacted when `from_revision` is below the compact revision."""
        def read(current):
            if from_revision < self.compact_revision:
                raise Compacted(f"revision {from_revision} was compacted", compact_revision=self.compact_revision)
            out, count, last = [], 0, from_revision - 1
            for row_key, data in self.engine.scan(_EVENTS + _U64.pack(from_revision), _EVENTS + _U64.pack(current + 1)):
                revision = _U64.unpack(row_key[1:])[0]
                events = []
                for key in decode_keys(data):
                    if not _in_range(key, start, end):
                        continue
                    record, prev = self._versions_at(key, revision)
                    if record is None:
                        continue
                    events.append(_event(key, record, revision, prev))
                if events:
                    out.append((revision, events))
                    count += len(events)
                last = revision
                if count >= max_events:
                    return out, last, False
            return out, current, True

        return self._consistent(read)

    def _versions_at(self, key: bytes, revision: int):
        low = history_key(key, 0)
        rows = list(self.engine.scan(low, history_key(key, revision + 1), reverse=True, limit=2))
        if not rows or _split_history_key(rows[0][0])[1] != revision:
            return None, None
        record = Record.decode(rows[0][1])
        prev = Record.decode(rows[1][1]) if len(rows) > 1 else None
        if prev is not None and prev.value is None:
            prev = None
        return record, prev

    def _commit(self, index: int, rows: list, request_id: str | None, fingerprint: str, result: dict) -> None:
        revision = result["revision"] if rows else self.revision
        evicted: list[str] = []
        if request_id is not None:
            stored = _stored_result(result, self.limits.max_request_result_bytes)
            row = _encode_request(request_id, fingerprint, stored)
            kept_size = len(row) if stored.get(_KEPT) else 0
            if kept_size > self.limits.max_request_result_bytes:
                stored, kept_size = _outcome_only(result), 0
                row = _encode_request(request_id, fingerprint, stored)
            rows.append(("put", _DEDUPE + _U64.pack(index), row))
            requests = self._requests
            entries = requests.entries
            entries[request_id] = (index, fingerprint, stored)
            if kept_size:
                requests.keep(request_id, kept_size)
            oldest_allowed = index - self.limits.request_id_max_age_entries
            while entries:
                old_id, (old_index, _, _) = next(iter(entries.items()))
                if len(entries) <= self.limits.max_request_ids and old_index >= oldest_allowed:
                    break
                del entries[old_id]
                requests.unkeep(old_id)
                evicted.append(old_id)
                rows.append(("delete", _DEDUPE + _U64.pack(old_index), None))
            # Whole results over the budget: the oldest keep only their outcome (the row is
            # rewritten in this batch, so a restart or a snapshot sees the same cut).
            while requests.kept_bytes > self.limits.max_request_results_bytes:
                old_id = next(iter(requests.kept))
                requests.unkeep(old_id)
                old_index, old_fingerprint, old_result = entries[old_id]
                reduced = _outcome_only(old_result)
                entries[old_id] = (old_index, old_fingerprint, reduced)
                rows.append(("put", _DEDUPE + _U64.pack(old_index), _encode_request(old_id, old_fingerprint, reduced)))
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
        with self._pins_lock:
            self._snapshot_pins += 1
        return SnapshotSource(
            engine=self.engine,
            revision=self.revision,
            compact_revision=self.compact_revision,
            requests=list(self._requests.entries.items()),
            leases=list(self.engine.scan(_LEASES, _LEASES + b"\xff")) + list(self.engine.scan(_MEMBERS, _MEMBERS + b"\xff")),
            release=self.release_snapshot,
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
                    elif tag not in (_EVENTS, _LEASES, _MEMBERS):
                        raise ValueError(f"snapshot row with unknown tag {tag!r}")
                    batch.append(("put", row_key, row))
                    if len(batch) >= 1000:
                        self.engine.write(batch)
                        batch = []
                for key, record in latest.items():
                    batch.append(("put", _CURRENT + enc(key), record.encode()))
                    if record.lease:
                        batch.append(("put", _attached_key(record.lease, key), b""))
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
                self._requests.recount()
                self._count_lease_keys()
                self._compact_pending = compact_revision > 0
                self._compact_cursor = None
                self.failed = None
            finally:
                self._sequence += 1
        if self.listener is not None:
            # Watchers re-read what the snapshot brought from the engine; leases re-arm.
            self.listener(revision, [], [("installed", "", 0, index)])

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
        kept = {rid: len(_encode_request(rid, fp, r)) for rid, (_, fp, r) in self._requests.entries.items() if r.get(_KEPT)}
        assert kept == self._requests.kept and sum(kept.values()) == self._requests.kept_bytes, "kept results drifted"
        assert self._requests.kept_bytes <= self.limits.max_request_results_bytes
        counts = self._lease_key_counts
        assert self._count_lease_keys() == counts, "attached-key counts drifted from the `a` rows"
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
    leases: list = dataclasses.field(default_factory=list)
    release: Any = None

    def done(self) -> None:
        """The writer finished reading (compaction may delete history rows again)."""
        release, self.release = self.release, None
        if release is not None:
            release()

    def rows(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.leases
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


def _lease_key(lease_id: int) -> bytes:
    return _LEASES + _U64.pack(lease_id)


def _attached_key(lease_id: int, key: bytes) -> bytes:
    return _ATTACHED + _U64.pack(lease_id) + enc(key)


def _in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    """etcd's [start, end): end None is just `start`, b"\\0" is every key >= start."""
    if end is None:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


def _event(key: bytes, record: "Record", revision: int, prev: "Record | None") -> WatchEvent:
    if record.value is None:
        kv = KeyValue(key, None, 0, revision, 0)
        return WatchEvent("delete", kv, None if prev is None else prev.to_kv(key))
    return WatchEvent("put", record.to_kv(key), None if prev is None else prev.to_kv(key))


class _Batch:
    """The rows, events and lease changes of one command, all at one new revision.

    Reads through it see the command's own earlier writes (a txn's later ops see its
    earlier ones), so one txn is one engine batch, one revision, one event row.
    """

    def __init__(self, sm: "KVStateMachine", index: int) -> None:
        self.sm = sm
        self.index = index
        self.revision = sm.revision + 1
        self.rows: list = []
        self.overlay: dict[bytes, Record | None] = {}
        self.changed: list[bytes] = []
        self.events: list[WatchEvent] = []
        self.lease_changes: list[tuple] = []
        self.lease_key_changes: dict[int, int | None] = {}  # lease id -> keys attached (+) or detached (-); None: revoked

    @property
    def written(self) -> bool:
        return bool(self.changed)

    def current(self, key: bytes) -> "Record | None":
        if key in self.overlay:
            return self.overlay[key]
        return self.sm._current(key)

    def range(self, start: bytes, end: bytes, cap: int) -> list[tuple[bytes, "Record"]]:
        found: dict[bytes, Record] = {}
        key_bytes = 0
        for row_key, row in self.sm.engine.scan(*self.sm._current_bounds(start, end)):
            key = dec(row_key[1:])
            if key not in self.overlay:
                found[key] = Record.decode(row)
                key_bytes += len(row_key)
                if len(found) > cap or key_bytes > self.sm.limits.max_delete_key_bytes:
                    raise CommandError(
                        "too_many_keys", f"the range holds more than {cap} keys; use smaller ranges"
                    )
        for key, record in self.overlay.items():
            if record is not None and _in_range(key, start, end):
                found[key] = record
        return sorted(found.items())

    def put(self, key: bytes, value: bytes, lease: int) -> "Record | None":
        old = self.current(key)
        revision = self.revision
        record = Record(
            create_revision=old.create_revision if old else revision,
            mod_revision=revision,
            version=old.version + 1 if old else 1,
            lease=lease,
            value=value,
        )
        if old is not None and old.lease and old.lease != lease:
            self.rows.append(("delete", _attached_key(old.lease, key), None))
        if lease:
            self.rows.append(("put", _attached_key(lease, key), b""))
        encoded = record.encode()
        self.rows.append(("put", _CURRENT + enc(key), encoded))
        self.rows.append(("put", history_key(key, revision), encoded))
        self.overlay[key] = record
        self.changed.append(key)
        self.events.append(WatchEvent("put", record.to_kv(key), None if old is None else old.to_kv(key)))
        return old

    def delete(self, victims: list[tuple[bytes, "Record"]]) -> None:
        if not victims:
            return
        tombstone = Record(0, self.revision, 0, 0, None).encode()
        for key, old in victims:
            self.rows.append(("delete", _CURRENT + enc(key), None))
            self.rows.append(("put", history_key(key, self.revision), tombstone))
            if old.lease:
                self.rows.append(("delete", _attached_key(old.lease, key), None))
            self.overlay[key] = None
            self.changed.append(key)
            self.events.append(WatchEvent("delete", KeyValue(key, None, 0, self.revision, 0), old.to_kv(key)))

    def finish(self, result: dict) -> list:
        if "error" in result:
            return []
        if self.changed:
            self.rows.append(("put", _EVENTS + _U64.pack(self.revision), _encode_keys(self.changed)))
        else:
            self.revision = self.sm.revision
        return self.rows


def txn_problem(txn: dict, max_ops: int = 128) -> str | None:
    """Why a txn must be refused before anything applies (etcd's rules), or None:
    too many ops, an unknown op, or a key written twice in one branch (a put and a
    delete covering it count, nested txns included).

        >>> txn_problem({"compare": [], "success": [{"op": "put", "key": b"a", "value": b"1"},
        ...                                        {"op": "put", "key": b"a", "value": b"2"}]})
        'duplicate key given in txn request'
    """
    try:
        _branch_check(txn, max_ops)
    except ValueError as exc:
        return str(exc)
    return None


def _branch_check(txn: dict, max_ops: int) -> None:
    for name in ("compare", "success", "failure"):
        ops = txn.get(name) or []
        if not isinstance(ops, list):
            raise ValueError(f"{name} must be a list")
        if len(ops) > max_ops:
            raise ValueError(f"a txn has at most {max_ops} ops per list; {name} has {len(ops)}")
    for branch in ("success", "failure"):
        _branch_writes(txn.get(branch) or [], max_ops)


def _branch_writes(ops: list, max_ops: int) -> tuple[set, list]:
    puts: set = set()
    deletes: list = []
    for op in ops:
        if not isinstance(op, dict):
            raise ValueError("a txn op is a dict")
        kind = op.get("op")
        if kind == "put":
            if op.get("key") in puts:
                raise ValueError("duplicate key given in txn request")
            puts.add(op.get("key"))
        elif kind == "delete":
            deletes.append((op.get("key"), op.get("end")))
        elif kind == "txn":
            _branch_check(op, max_ops)
            for branch in ("success", "failure"):
                nested_puts, nested_deletes = _branch_writes(op.get(branch) or [], max_ops)
                if nested_puts & puts:
                    raise ValueError("duplicate key given in txn request")
                puts |= nested_puts
                deletes += nested_deletes
        elif kind != "get":
            raise ValueError(f"unknown txn op {kind!r}")
    for key in puts:
        if any(isinstance(key, bytes) and isinstance(s, bytes) and _in_range(key, s, e) for s, e in deletes):
            raise ValueError("duplicate key given in txn request")
    return puts, deletes


def make_txn(compare: list, success: list, failure: list, *, request_id: str | None = None) -> dict:
    return {"v": COMMAND_VERSION, "op": "txn", "compare": compare, "success": success, "failure": failure,
            "request_id": request_id}  # fmt: skip


def make_lease(op: str, lease_id: int, *, ttl: int | None = None, refresh: int | None = None,
               request_id: str | None = None) -> dict:  # fmt: skip
    command = {"v": COMMAND_VERSION, "op": op, "id": lease_id, "request_id": request_id}
    if ttl is not None:
        command["ttl"] = ttl
    if refresh is not None:
        command["refresh"] = refresh
    return command


def make_compact(revision: int) -> dict:
    return {"v": COMMAND_VERSION, "op": "compact", "revision": revision}


def _fingerprint_any(command: dict) -> str:
    """A request's identity for the ops added after `_fingerprint` (whose output is
    persisted and so must not change): everything but the request id."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(sorted((k, v) for k, v in command.items() if k != "request_id")).encode())
    return digest.hexdigest()


def _storable(result: dict) -> dict:
    """What a request-id row keeps of a result: JSON-able and small (no values)."""
    stored = {}
    for name, value in result.items():
        if name == "prev":
            continue
        if name == "responses":
            value = [_storable_response(r) for r in value]
        if name == "items":
            value = []
        stored[name] = value
    return stored


def _storable_response(response: dict) -> dict:
    out = _storable(response)
    if response.get("op") == "get":
        out["omitted"] = True  # the items were left out (rows written before results were kept)
    return out


_KEPT = "_kept"  # a request-id row holds this txn's whole result (values as {"$b": base64})
_DROPPED = "_dropped"  # ...holds only its outcome: a retry is answered `responses_unavailable`
_BYTES_TAG = "$b"


class _TooLarge(Exception):
    pass


def _stored_result(result: dict, max_bytes: int) -> dict:
    """What a request-id row keeps of a first result (JSON-able; the caller checks the
    encoded size of a whole one, marked `_KEPT`, against `max_bytes`).

    Puts, deletes, leases: the outcome without previous values (a retry reads those from
    history). A txn: the whole result; when its responses carry data (gets, previous
    values), only if its JSON fits `max_bytes`, else the outcome only, marked `_DROPPED`.
    """
    if "responses" not in result or "error" in result:
        return _storable(result)
    if not _carries_data(result):
        return _to_stored(result, [float("inf")])  # no values in it: as small as the command
    try:
        whole = _to_stored(result, [max_bytes])
    except _TooLarge:
        return _outcome_only(result)
    whole[_KEPT] = True
    return whole


def _outcome_only(result: dict) -> dict:
    out = _storable(result)
    out.pop(_KEPT, None)
    out[_DROPPED] = True
    return out


def _carries_data(result: dict) -> bool:
    for response in result.get("responses") or []:
        if response.get("op") == "get" or response.get("prev") or _carries_data(response):
            return True
    return False


def _has_omitted(result: dict) -> bool:
    return any(r.get("omitted") or _has_omitted(r) for r in result.get("responses") or [])


_PLAIN = frozenset((int, bool, str, float, type(None)))  # stored as they are


def _to_stored(value: Any, budget: list) -> Any:
    """`value` with bytes as {"$b": base64}; raises _TooLarge once the bytes seen exceed
    the budget (so a huge range is not encoded only to be dropped)."""
    if isinstance(value, bytes):
        budget[0] -= (len(value) + 2) // 3 * 4
        if budget[0] < 0:
            raise _TooLarge
        return {_BYTES_TAG: base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {name: item if type(item) in _PLAIN else _to_stored(item, budget) for name, item in value.items()}
    if isinstance(value, list):
        return [item if type(item) in _PLAIN else _to_stored(item, budget) for item in value]
    return value


def _from_stored(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES_TAG in value:
            return base64.b64decode(value[_BYTES_TAG])
        return {name: _from_stored(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_from_stored(item) for item in value]
    return value


def make_member(op: str, member_id: str, *, client_url: str = "", peer_address: str = "") -> dict:
    return {"v": COMMAND_VERSION, "op": op, "id": member_id, "client_url": client_url, "peer_address": peer_address}
