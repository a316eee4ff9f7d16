"""The seam between the HTTP layer and the two cluster modes: what a KV service offers.

`api/` talks to a `CPService` (consensus/service.py) or an `APService` (dynamo/service.py)
through the protocols below and renders their results as API.md says. This module is the
contract itself, so it imports nothing of capkv: `consensus/` and `dynamo/` import their
result types and errors from here, and nothing else of `api/`.

Errors: a service raises a `ServiceError` subclass; the HTTP layer turns it into
`{"error": {"code", "message", ...details}}` with the class's status. Anything else that
escapes a service is a bug and becomes a 500.

Keys and values are `bytes` here; the HTTP layer validates and decodes them first
(keys 1..4096 bytes of UTF-8, values up to `max_value_bytes`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Protocol


# --- errors -------------------------------------------------------------------------


class ServiceError(Exception):
    """An error a client should see. `details` join the JSON error object."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class InvalidRequest(ServiceError):
    """400: the request is malformed; `code` is one of API.md's `invalid_*`."""

    status = 400
    code = "invalid_request"


class KeyNotFound(ServiceError):
    status = 404
    code = "key_not_found"


class NotFound(ServiceError):
    """404 for things other than keys (a lease, a member); `code` says which."""

    status = 404
    code = "not_found"


class Compacted(ServiceError):
    """410: the revision asked for was compacted; details carry `compact_revision`."""

    status = 410
    code = "compacted"


class PreconditionFailed(ServiceError):
    """412: a compare-and-swap did not hold; details carry the current `mod_revision`."""

    status = 412
    code = "precondition_failed"


class ValueTooLarge(ServiceError):
    status = 413
    code = "value_too_large"


class NotSupportedInMode(ServiceError):
    status = 501
    code = "not_supported_in_mode"


class Unavailable(ServiceError):
    """503: definitely not applied (no leader, no quorum, too few replicas). Safe to retry."""

    status = 503
    code = "unavailable"


class OutcomeUnknown(ServiceError):
    """504: the write may or may not have been applied; retry only with the same request_id."""

    status = 504
    code = "outcome_unknown"


# --- configuration ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
    """A node of the cluster file. `client_url` is this API; `peer_address` is host:port
    for node-to-node traffic (Raft in cp, peer RPC in ap)."""

    id: str
    client_url: str
    peer_address: str


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything a service needs to start one node. Built by the CLI from a cluster file
    and flags; the services never read files or flags themselves."""

    node_id: str
    members: tuple[Member, ...]
    secret: str  # authenticates peer traffic; never empty
    data_dir: str  # this node's own directory (already node-specific)
    engine: str = "lsm"  # memory | hash | lsm
    sync: str = "always"  # always | batch | never
    max_value_bytes: int = 1024 * 1024
    # ap mode
    replicas: int = 3  # N
    read_quorum: int = 2  # R
    write_quorum: int = 2  # W
    vnodes: int = 150
    conflicts: str = "vclock"  # vclock | lww
    hinted_handoff: bool = True
    join: str | None = None  # ap: a client URL of a running node to join through
    # Where this node's peers are really reached, when a test proxy sits in between:
    # member id -> host:port (defaults to each member's peer_address).
    peer_routes: tuple[tuple[str, str], ...] = ()

    @property
    def self_member(self) -> Member:
        for member in self.members:
            if member.id == self.node_id:
                return member
        raise KeyError(self.node_id)


# --- cp results ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """A key as of some revision, etcd-style. `value` is None when only keys were asked."""

    key: bytes
    value: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class RangeResult:
    revision: int  # the store's revision the read saw
    items: list[KeyValue]
    more: bool  # more keys matched than `limit` returned
    count: int  # how many keys matched in all


@dataclasses.dataclass(frozen=True)
class PutResult:
    revision: int
    created: bool
    prev: KeyValue | None = None


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    revision: int
    deleted: int
    prev: list[KeyValue] = dataclasses.field(default_factory=list)


class CPService(Protocol):
    """The `cp` mode: linearizable, revisions as etcd has them.

    `timeout` is in seconds. Writes raise `Unavailable` when they were definitely not
    applied and `OutcomeUnknown` when they may have been; a `request_id` makes a retry of
    the same write apply at most once. Reads are linearizable unless
    `consistency="serializable"`.
    """

    mode: str  # "cp"
    node_id: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def get(
        self, key: bytes, *, consistency: str = "linearizable", revision: int | None = None, timeout: float = 5.0
    ) -> tuple[KeyValue | None, int]:
        """The key (or None) and the store revision the read saw; `Compacted` below the
        compact revision, `InvalidRequest` above the current one."""

    async def range(
        self,
        start: bytes,
        end: bytes | None,
        *,
        limit: int | None = None,
        keys_only: bool = False,
        count_only: bool = False,
        revision: int | None = None,
        consistency: str = "linearizable",
        timeout: float = 5.0,
    ) -> RangeResult:
        """Keys in [start, end) in key order (end None: just `start`; end b"\\0": every key >= start)."""

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        lease: int = 0,
        if_mod_revision: int | None = None,
        prev: bool = False,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> PutResult:
        """`if_mod_revision=0` means only if absent; raises `PreconditionFailed` with the
        current `mod_revision` when the compare does not hold (nothing written)."""

    async def delete(
        self,
        key: bytes,
        end: bytes | None = None,
        *,
        if_mod_revision: int | None = None,
        prev: bool = False,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> DeleteResult: ...

    async def status(self) -> dict:
        """`GET /v1/cluster` for cp: {mode, node, leader, term, commit_index,
        applied_index, revision, members: [{id, client_url, peer_address, role, reachable}]}."""

    def health(self) -> tuple[bool, str]:
        """(True, "ok") when this node can serve linearizable reads and writes now."""

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics, Prometheus names without the `capkv_` prefix."""


# --- cp: transactions, leases, watches (the second cp issue) -------------------------------------


@dataclasses.dataclass(frozen=True)
class Compare:
    """One txn compare, etcd-style: `target` of the key(s) in [key, end) `op` `value`.

    target: "value" (bytes) | "version" | "create_revision" | "mod_revision" | "lease" (int);
    op: "==" | "!=" | "<" | ">". An absent key has version, revisions and lease 0 and no
    value (a value compare on it is false), as in etcd.
    """

    key: bytes
    target: str
    op: str
    value: bytes | int
    end: bytes | None = None


@dataclasses.dataclass(frozen=True)
class TxnOp:
    """One txn request: op "get" | "put" | "delete" | "txn" (nested, etcd allows it).

    get: key, end, limit, keys_only, count_only, revision; put: key, value, lease, prev;
    delete: key, end, prev; txn: compare, success, failure.
    """

    op: str
    key: bytes = b""
    value: bytes | None = None
    end: bytes | None = None
    lease: int = 0
    prev: bool = False
    limit: int | None = None
    keys_only: bool = False
    count_only: bool = False
    revision: int | None = None
    compare: tuple[Compare, ...] = ()
    success: tuple["TxnOp", ...] = ()
    failure: tuple["TxnOp", ...] = ()


@dataclasses.dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # One per op of the branch taken: RangeResult, PutResult, DeleteResult or TxnResult.
    responses: list


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    id: int
    ttl: int  # seconds left; -1 when the lease does not exist (etcd's TimeToLive)
    granted_ttl: int
    keys: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    type: str  # "put" | "delete"
    kv: KeyValue  # for a delete: key, mod_revision = the delete's revision, version 0
    prev: KeyValue | None = None


@dataclasses.dataclass(frozen=True)
class WatchBatch:
    """What a watch yields: events of one or more revisions, in order; or, with no
    events, a progress notice that the store reached `revision`. `canceled` with a
    `reason` is the last batch (compacted, too slow, node stopping)."""

    revision: int
    events: list[WatchEvent]
    canceled: bool = False
    reason: str = ""
    compact_revision: int = 0


class CPExtras(Protocol):
    """The rest of cp mode, implemented by the same service as `CPService`."""

    async def txn(
        self,
        compare: list[Compare],
        success: list[TxnOp],
        failure: list[TxnOp],
        *,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> TxnResult:
        """Atomic: one revision for all its writes (none if it writes nothing).
        InvalidRequest(code="invalid_txn") for a key written twice in one branch."""

    async def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float = 5.0) -> LeaseInfo: ...

    async def lease_revoke(self, lease_id: int, *, timeout: float = 5.0) -> int:
        """Deletes the lease's keys (one revision, a delete event each); returns the revision.
        NotFound(code="lease_not_found") when it does not exist."""

    async def lease_keepalive(self, lease_id: int, *, timeout: float = 5.0) -> LeaseInfo: ...

    async def lease_info(self, lease_id: int, *, keys: bool = False, timeout: float = 5.0) -> LeaseInfo: ...

    async def leases(self, *, timeout: float = 5.0) -> list[LeaseInfo]: ...

    def watch(
        self,
        start: bytes,
        end: bytes | None = None,
        *,
        start_revision: int | None = None,
        prev: bool = False,
        progress_interval: float = 10.0,
    ) -> AsyncIterator[WatchBatch]:
        """Events for keys in [start, end) from `start_revision` (default: now + 1), in
        revision order, no gaps, no duplicates. Raises Compacted when start_revision is
        below the compact revision. The iterator's buffer is bounded: a watcher that falls
        too far behind gets a final canceled batch. Closing the iterator frees the watch."""

    async def compact(self, revision: int, *, timeout: float = 5.0) -> int: ...

    async def add_member(self, member: Member, *, timeout: float = 30.0) -> dict: ...

    async def remove_member(self, member_id: str, *, timeout: float = 30.0) -> dict: ...


# --- ap results ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class APRead:
    """What a quorum read found: the live siblings (empty when absent or deleted) and one
    opaque context that covers all of them, tombstones included."""

    key: bytes
    siblings: list[bytes]
    context: str


class APService(Protocol):
    """The `ap` mode: always writable, siblings for concurrent writes.

    `r`/`w` default to the cluster's R/W; `Unavailable` when fewer than W nodes acknowledged
    a write or fewer than R answered a read.
    """

    mode: str  # "ap"
    node_id: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def get(self, key: bytes, *, r: int | None = None, timeout: float = 5.0) -> APRead: ...

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        context: str | None = None,
        w: int | None = None,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Store `value`; returns the new context. `InvalidRequest(code="invalid_context")`
        for a context that does not decode."""

    async def delete(
        self, key: bytes, *, context: str | None = None, w: int | None = None, timeout: float = 5.0
    ) -> str: ...

    async def range(
        self, prefix: bytes, *, limit: int | None = None, timeout: float = 5.0
    ) -> tuple[list[APRead], bool]:
        """Every live key under `prefix` (coverage read); the bool is `partial`."""

    def preflist(self, key: bytes) -> dict:
        """{key, hash, preference_list, fallbacks} as API.md says."""

    async def status(self) -> dict:
        """`GET /v1/cluster` for ap."""

    async def add_member(self, member: Member) -> dict: ...

    async def remove_member(self, member_id: str) -> dict: ...

    def health(self) -> tuple[bool, str]: ...

    def metrics(self) -> dict[str, float]: ...


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`, as etcd computes
    range_end: b"a/" -> b"a0"; b"" or all-0xff -> b"\\0" (meaning "to the end")."""
    chars = bytearray(prefix)
    while chars:
        if chars[-1] < 0xFF:
            chars[-1] += 1
            return bytes(chars)
        chars.pop()
    return b"\0"


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "dataclasses", "Any", "AsyncIterator", "Protocol")]
