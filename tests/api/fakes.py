"""In-memory fakes of CPService and APService, faithful enough to test the HTTP layer,
the client and the launcher without Raft or a ring.

- `FakeCPService`: one global revision counter, per-key create/mod revision and version
  (reset by delete), compare-and-swap, request-id dedupe, reads at past revisions from a
  full history, a settable compact revision; and CPExtras: atomic txns (one revision,
  nested txns, etcd's duplicate-key rule), leases on an injectable clock (expiry deletes
  the keys at one revision with events), watches with replay from a start revision, a
  bounded per-watcher buffer (a slow watcher gets a final canceled batch) and progress
  batches when idle, compaction, membership.
- `FakeAPService`: each stored version carries a vector clock; a write with a context
  replaces the versions that context covers, one without is a sibling; deletes are
  tombstones; contexts are base64 JSON clocks.

Both can be made to fail: `unavailable = "reason"` makes every call raise `Unavailable`
(and `health()` report it); `delay` makes every call sleep first.

`create_cp_service(config)` / `create_ap_service(config)` are the factories the CLI's
hidden `--service-factory tests.api.fakes:create_cp_service` uses (launcher tests).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import itertools
import json
import time
from typing import Any

from api.service import (
    APRead,
    Compacted,
    Compare,
    DeleteResult,
    InvalidRequest,
    KeyValue,
    LeaseInfo,
    Member,
    NodeConfig,
    NotFound,
    PreconditionFailed,
    PutResult,
    RangeResult,
    TxnResult,
    Unavailable,
    WatchBatch,
    WatchEvent,
)


class _Failable:
    unavailable: str | None = None
    delay: float = 0.0

    async def _enter(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.unavailable:
            raise Unavailable(f"fake: {self.unavailable}")

    def health(self) -> tuple[bool, str]:
        return (False, self.unavailable) if self.unavailable else (True, "ok")


class _FakeWatcher:
    """One watch on the fake: a bounded queue of batches the commit path fills."""

    def __init__(self, start: bytes, end: bytes | None, prev: bool, capacity: int):
        self.start = start
        self.end = end
        self.prev = prev
        self.capacity = capacity
        self.queue: collections.deque[WatchBatch] = collections.deque()
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.stopping = False

    def matches(self, key: bytes) -> bool:
        return in_range(key, self.start, self.end)

    def offer(self, batch: WatchBatch) -> None:
        if self.overflowed:
            return
        if len(self.queue) >= self.capacity:
            self.overflowed = True  # too slow: the iterator ends with a canceled batch
        else:
            self.queue.append(batch)
        self.wakeup.set()


def in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    """etcd's [start, end): end None is just `start`, b"\\0" is every key >= start."""
    if end is None:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


class FakeCPService(_Failable):
    """cp mode in memory, the CPService core only (as consensus/ serves it today): the
    cp-only routes answer 501 not_implemented over it. `FakeCPExtrasService` adds
    CPExtras. `clock` (seconds, monotonic) decides lease expiry; `expire_leases()`
    applies it now (it also runs before every call)."""

    mode = "cp"
    # Batches a watcher may have waiting before it is cancelled as too slow.
    WATCH_BUFFER_BATCHES = 64

    def __init__(self, config: NodeConfig | None = None, *, clock=time.monotonic):
        self.config = config
        self.node_id = config.node_id if config else "n1"
        self.members = list(config.members if config else (Member("n1", "http://127.0.0.1:1", "127.0.0.1:2"),))
        self.clock = clock
        self.revision = 1  # etcd starts at 1
        self.compact_revision = 0
        self.store: dict[bytes, KeyValue] = {}
        self.history: list[tuple[int, bytes, KeyValue | None]] = []  # (revision, key, kv or None=deleted)
        self.events: list[WatchEvent] = []  # every event with its prev, in revision order
        self.lease_table: dict[int, dict] = {}  # id -> {"granted_ttl", "expires", "keys": set}
        self.next_lease_id = 7587869960372000001
        self.watchers: set[_FakeWatcher] = set()
        self.watch_buffer = self.WATCH_BUFFER_BATCHES
        self.request_ids: dict[str, Any] = {}
        self.calls = 0
        self.started = False
        self.stopped = False
        self.last_call: dict[str, Any] = {}

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        for watcher in list(self.watchers):
            watcher.stopping = True
            watcher.wakeup.set()

    async def _enter(self) -> None:
        await super()._enter()
        self.expire_leases()

    # --- reads ---

    def _at(self, revision: int | None) -> dict[bytes, KeyValue]:
        if revision is None or revision == 0:
            return self.store
        if revision < self.compact_revision:
            raise Compacted(f"revision {revision} is compacted", compact_revision=self.compact_revision)
        if revision > self.revision:
            raise InvalidRequest(f"revision {revision} is in the future (current {self.revision})", code="invalid_revision")
        state: dict[bytes, KeyValue] = {}
        for rev, key, kv in self.history:
            if rev > revision:
                break
            if kv is None:
                state.pop(key, None)
            else:
                state[key] = kv
        return state

    async def get(self, key, *, consistency="linearizable", revision=None, timeout=5.0):
        self.last_call = {"op": "get", "key": key, "consistency": consistency, "revision": revision, "timeout": timeout}
        await self._enter()
        return self._at(revision).get(key), self.revision

    def _range(self, state, start, end, limit, keys_only, count_only) -> RangeResult:
        keys = sorted(k for k in state if in_range(k, start, end))
        items = [state[k] for k in keys]
        if keys_only or count_only:
            items = [dataclasses.replace(kv, value=None) for kv in items]
        count = len(items)
        more = bool(limit) and count > limit
        if limit:
            items = items[:limit]
        if count_only:
            items = []
        return RangeResult(revision=self.revision, items=items, more=more, count=count)

    async def range(self, start, end, *, limit=None, keys_only=False, count_only=False, revision=None,
                    consistency="linearizable", timeout=5.0):  # fmt: skip
        self.last_call = {"op": "range", "start": start, "end": end, "limit": limit, "keys_only": keys_only,
                          "count_only": count_only, "revision": revision, "consistency": consistency,
                          "timeout": timeout}  # fmt: skip
        await self._enter()
        return self._range(self._at(revision), start, end, limit, keys_only, count_only)

    # --- writes: the shared apply path ---

    def _compare(self, key: bytes, if_mod_revision: int | None) -> None:
        if if_mod_revision is None:
            return
        current = self.store.get(key)
        current_mod = current.mod_revision if current else 0
        if current_mod != if_mod_revision:
            raise PreconditionFailed(
                f"mod_revision of {key!r} is {current_mod}, not {if_mod_revision}", mod_revision=current_mod
            )

    # Without CPExtras there is no way to grant a lease, so any lease number is accepted.
    enforce_leases = False

    def _check_lease(self, lease: int) -> None:
        if lease and self.enforce_leases and lease not in self.lease_table:
            raise NotFound(f"lease {lease} not found", code="lease_not_found")

    def _apply_put(self, key: bytes, value: bytes, lease: int, revision: int, events: list) -> KeyValue | None:
        old = self.store.get(key)
        kv = KeyValue(key, value, old.create_revision if old else revision, revision, (old.version if old else 0) + 1, lease)
        if old is not None and old.lease and old.lease in self.lease_table:
            self.lease_table[old.lease]["keys"].discard(key)
        if lease and lease in self.lease_table:
            self.lease_table[lease]["keys"].add(key)
        self.store[key] = kv
        events.append(WatchEvent("put", kv, old))
        return old

    def _apply_delete(self, keys: list[bytes], revision: int, events: list) -> list[KeyValue]:
        old = []
        for key in keys:
            kv = self.store.pop(key)
            if kv.lease and kv.lease in self.lease_table:
                self.lease_table[kv.lease]["keys"].discard(key)
            old.append(kv)
            events.append(WatchEvent("delete", KeyValue(key, None, 0, revision, 0), kv))
        return old

    def _commit(self, revision: int, events: list[WatchEvent]) -> None:
        """Make one revision's events visible: history, the event log, the watchers."""
        if not events:
            return
        self.revision = revision
        for event in events:
            self.history.append((revision, event.kv.key, event.kv if event.type == "put" else None))
            self.events.append(event)
        for watcher in list(self.watchers):
            mine = [self._for_watcher(e, watcher.prev) for e in events if watcher.matches(e.kv.key)]
            if mine:
                watcher.offer(WatchBatch(revision=revision, events=mine))

    @staticmethod
    def _for_watcher(event: WatchEvent, prev: bool) -> WatchEvent:
        return event if prev else WatchEvent(event.type, event.kv, None)

    def _doomed(self, key: bytes, end: bytes | None) -> list[bytes]:
        return sorted(k for k in self.store if in_range(k, key, end))

    async def put(self, key, value, *, lease=0, if_mod_revision=None, prev=False, request_id=None, timeout=5.0):
        self.last_call = {"op": "put", "key": key, "value": value, "lease": lease, "if_mod_revision": if_mod_revision,
                          "prev": prev, "request_id": request_id, "timeout": timeout}  # fmt: skip
        await self._enter()
        if request_id is not None and request_id in self.request_ids:
            return self.request_ids[request_id]
        self._compare(key, if_mod_revision)
        self._check_lease(lease)
        events: list[WatchEvent] = []
        old = self._apply_put(key, value, lease, self.revision + 1, events)
        self._commit(self.revision + 1, events)
        result = PutResult(revision=self.revision, created=old is None, prev=old if prev else None)
        if request_id is not None:
            self.request_ids[request_id] = result
        return result

    async def delete(self, key, end=None, *, if_mod_revision=None, prev=False, request_id=None, timeout=5.0):
        self.last_call = {"op": "delete", "key": key, "end": end, "if_mod_revision": if_mod_revision, "prev": prev,
                          "request_id": request_id, "timeout": timeout}  # fmt: skip
        await self._enter()
        if request_id is not None and request_id in self.request_ids:
            return self.request_ids[request_id]
        self._compare(key, if_mod_revision)
        doomed = self._doomed(key, end)
        if not doomed:
            return DeleteResult(revision=self.revision, deleted=0)
        events: list[WatchEvent] = []
        old = self._apply_delete(doomed, self.revision + 1, events)
        self._commit(self.revision + 1, events)
        result = DeleteResult(revision=self.revision, deleted=len(old), prev=old if prev else [])
        if request_id is not None:
            self.request_ids[request_id] = result
        return result

    # --- leases ---

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose time is up (each at its own revision); their ids."""
        now = self.clock()
        expired = sorted(lid for lid, lease in self.lease_table.items() if lease["expires"] <= now)
        for lease_id in expired:
            self._revoke(lease_id)
        return expired

    def _revoke(self, lease_id: int) -> int:
        lease = self.lease_table.pop(lease_id)
        events: list[WatchEvent] = []
        self._apply_delete(sorted(k for k in lease["keys"] if k in self.store), self.revision + 1, events)
        self._commit(self.revision + 1, events)
        return self.revision

    def _info(self, lease_id: int, keys: bool) -> LeaseInfo:
        lease = self.lease_table.get(lease_id)
        if lease is None:
            return LeaseInfo(id=lease_id, ttl=-1, granted_ttl=0)
        left = max(0, int(lease["expires"] - self.clock()))
        return LeaseInfo(id=lease_id, ttl=left, granted_ttl=lease["granted_ttl"], keys=sorted(lease["keys"]) if keys else [])

    async def status(self) -> dict:
        return {
            "mode": "cp",
            "node": self.node_id,
            "leader": self.members[0].id,
            "term": 1,
            "commit_index": self.revision,
            "applied_index": self.revision,
            "revision": self.revision,
            "compact_revision": self.compact_revision,
            "members": [
                {"id": m.id, "client_url": m.client_url, "peer_address": m.peer_address,
                 "role": "leader" if i == 0 else "follower", "reachable": True}
                for i, m in enumerate(self.members)
            ],
        }  # fmt: skip

    def metrics(self) -> dict[str, float]:
        return {"revision": self.revision, "keys": len(self.store), "raft_term": 1, "watchers": len(self.watchers)}

    def _check(self) -> None:
        for key, kv in self.store.items():
            assert kv.key == key and kv.create_revision <= kv.mod_revision <= self.revision and kv.version >= 1
            if kv.lease and self.enforce_leases:
                assert key in self.lease_table[kv.lease]["keys"], (key, kv.lease)
        for lease in self.lease_table.values():
            for key in lease["keys"]:
                assert key in self.store
        revisions = [rev for rev, _, _ in self.history]
        assert revisions == sorted(revisions)
        assert [e.kv.mod_revision for e in self.events] == revisions


class FakeCPExtrasService(FakeCPService):
    """`FakeCPService` with CPExtras: atomic txns, leases, watches, compaction, membership."""

    enforce_leases = True
    # Replayed history is delivered in batches of at most this many events.
    REPLAY_BATCH_EVENTS = 1000

    # --- transactions ---

    MAX_TXN_OPS = 128

    async def txn(self, compare, success, failure, *, request_id=None, timeout=5.0) -> TxnResult:
        self.last_call = {"op": "txn", "compare": compare, "success": success, "failure": failure,
                          "request_id": request_id, "timeout": timeout}  # fmt: skip
        await self._enter()
        if request_id is not None and request_id in self.request_ids:
            return self.request_ids[request_id]
        self._check_txn(list(compare), list(success), list(failure))
        events: list[WatchEvent] = []
        revision = self.revision + 1
        result = self._run_txn(list(compare), list(success), list(failure), revision, events)
        self._commit(revision, events)
        result = dataclasses.replace(result, revision=self.revision)
        if request_id is not None:
            self.request_ids[request_id] = result
        return result

    def _check_txn(self, compare: list, success: list, failure: list) -> None:
        """Refuse before applying anything, as etcd does: too many ops, a key written
        twice in one branch, or a lease that does not exist."""
        if max(len(compare), len(success), len(failure)) > self.MAX_TXN_OPS:
            raise InvalidRequest(f"a txn has at most {self.MAX_TXN_OPS} ops per list", code="invalid_txn")
        for branch in (success, failure):
            self._branch_writes(branch)

    def _branch_writes(self, ops: list) -> tuple[set, list]:
        puts: set[bytes] = set()
        deletes: list[tuple[bytes, bytes | None]] = []
        for op in ops:
            if op.op == "put":
                self._check_lease(op.lease)
                if op.key in puts:
                    raise InvalidRequest("duplicate key given in txn request", code="invalid_txn")
                puts.add(op.key)
            elif op.op == "delete":
                deletes.append((op.key, op.end))
            elif op.op == "txn":
                self._check_txn(list(op.compare), list(op.success), list(op.failure))
                for branch in (op.success, op.failure):
                    nested_puts, nested_deletes = self._branch_writes(list(branch))
                    if nested_puts & puts:
                        raise InvalidRequest("duplicate key given in txn request", code="invalid_txn")
                    puts |= nested_puts
                    deletes += nested_deletes
        for key in puts:
            if any(in_range(key, start, end) for start, end in deletes):
                raise InvalidRequest("duplicate key given in txn request", code="invalid_txn")
        return puts, deletes

    def _holds(self, compare: Compare) -> bool:
        keys = [compare.key] if compare.end is None else self._doomed(compare.key, compare.end)
        kvs = [self.store.get(k) for k in keys]
        if compare.end is not None and not kvs:
            kvs = [None]
        for kv in kvs:
            if compare.target == "value":
                if kv is None:
                    return False
                actual, wanted = kv.value or b"", compare.value
            else:
                actual = getattr(kv, compare.target, 0) if kv is not None else 0
                wanted = compare.value
            ok = {"==": actual == wanted, "!=": actual != wanted, "<": actual < wanted, ">": actual > wanted}[compare.op]
            if not ok:
                return False
        return True

    def _run_txn(self, compare, success, failure, revision: int, events: list) -> TxnResult:
        succeeded = all(self._holds(c) for c in compare)
        responses = []
        for op in success if succeeded else failure:
            if op.op == "get":
                state = self._at(op.revision) if op.revision else self.store
                responses.append(self._range(state, op.key, op.end, op.limit, op.keys_only, op.count_only))
            elif op.op == "put":
                old = self._apply_put(op.key, op.value or b"", op.lease, revision, events)
                responses.append(PutResult(revision=revision, created=old is None, prev=old if op.prev else None))
            elif op.op == "delete":
                old = self._apply_delete(self._doomed(op.key, op.end), revision, events)
                responses.append(DeleteResult(revision=revision, deleted=len(old), prev=old if op.prev else []))
            elif op.op == "txn":
                responses.append(self._run_txn(list(op.compare), list(op.success), list(op.failure), revision, events))
            else:
                raise InvalidRequest(f"unknown txn op {op.op!r}", code="invalid_txn")
        return TxnResult(succeeded=succeeded, revision=revision if events else self.revision, responses=responses)

    async def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float = 5.0) -> LeaseInfo:
        self.last_call = {"op": "lease_grant", "ttl": ttl, "lease_id": lease_id, "timeout": timeout}
        await self._enter()
        if not isinstance(ttl, int) or ttl < 1:
            raise InvalidRequest("ttl must be a whole number of seconds, at least 1", code="invalid_ttl")
        if lease_id < 0:
            raise InvalidRequest("a lease id is a positive integer", code="invalid_lease")
        if lease_id in self.lease_table:
            raise PreconditionFailed(f"lease {lease_id} already exists", lease_id=lease_id)
        if not lease_id:
            lease_id = self.next_lease_id
            self.next_lease_id += 1
        self.lease_table[lease_id] = {"granted_ttl": ttl, "expires": self.clock() + ttl, "keys": set()}
        return LeaseInfo(id=lease_id, ttl=ttl, granted_ttl=ttl)

    async def lease_revoke(self, lease_id: int, *, timeout: float = 5.0) -> int:
        self.last_call = {"op": "lease_revoke", "lease_id": lease_id, "timeout": timeout}
        await self._enter()
        if lease_id not in self.lease_table:
            raise NotFound(f"lease {lease_id} not found", code="lease_not_found")
        return self._revoke(lease_id)

    async def lease_keepalive(self, lease_id: int, *, timeout: float = 5.0) -> LeaseInfo:
        self.last_call = {"op": "lease_keepalive", "lease_id": lease_id, "timeout": timeout}
        await self._enter()
        lease = self.lease_table.get(lease_id)
        if lease is None:
            raise NotFound(f"lease {lease_id} not found", code="lease_not_found")
        lease["expires"] = self.clock() + lease["granted_ttl"]
        return LeaseInfo(id=lease_id, ttl=lease["granted_ttl"], granted_ttl=lease["granted_ttl"])

    async def lease_info(self, lease_id: int, *, keys: bool = False, timeout: float = 5.0) -> LeaseInfo:
        self.last_call = {"op": "lease_info", "lease_id": lease_id, "keys": keys, "timeout": timeout}
        await self._enter()
        return self._info(lease_id, keys)

    async def leases(self, *, timeout: float = 5.0) -> list[LeaseInfo]:
        await self._enter()
        return [self._info(lease_id, False) for lease_id in self.lease_table]

    # --- watch and compaction ---

    def watch(self, start, end=None, *, start_revision=None, prev=False, progress_interval=10.0):
        self.last_call = {"op": "watch", "start": start, "end": end, "start_revision": start_revision, "prev": prev,
                          "progress_interval": progress_interval}  # fmt: skip
        return self._watch(start, end, start_revision, prev, progress_interval)

    async def _watch(self, start, end, start_revision, prev, progress_interval):
        await self._enter()
        if start_revision is not None and start_revision < self.compact_revision:
            raise Compacted(f"revision {start_revision} is compacted", compact_revision=self.compact_revision)
        watcher = _FakeWatcher(start, end, prev, self.watch_buffer)
        # Registering and reading the backlog with no await in between: nothing committed
        # in between can be missed or repeated.
        self.watchers.add(watcher)
        backlog: list[WatchBatch] = []
        if start_revision is not None:
            # History comes in batches of up to REPLAY_BATCH_EVENTS, never splitting a revision.
            replay = [e for e in self.events if e.kv.mod_revision >= start_revision and watcher.matches(e.kv.key)]
            batch: list[WatchEvent] = []
            for _, group in itertools.groupby(replay, key=lambda e: e.kv.mod_revision):
                events = [self._for_watcher(e, prev) for e in group]
                if batch and len(batch) + len(events) > self.REPLAY_BATCH_EVENTS:
                    backlog.append(WatchBatch(revision=batch[-1].kv.mod_revision, events=batch))
                    batch = []
                batch += events
            if batch:
                backlog.append(WatchBatch(revision=batch[-1].kv.mod_revision, events=batch))
        try:
            for batch in backlog:
                yield batch
            while True:
                if watcher.queue:
                    yield watcher.queue.popleft()
                    continue
                if watcher.overflowed:
                    yield WatchBatch(revision=self.revision, events=[], canceled=True,
                                     reason=f"watcher fell more than {watcher.capacity} batches behind")  # fmt: skip
                    return
                if watcher.stopping:
                    yield WatchBatch(revision=self.revision, events=[], canceled=True, reason="node stopping")
                    return
                watcher.wakeup.clear()
                try:
                    async with asyncio.timeout(progress_interval):
                        await watcher.wakeup.wait()
                except TimeoutError:
                    yield WatchBatch(revision=self.revision, events=[])
        finally:
            self.watchers.discard(watcher)

    async def compact(self, revision: int, *, timeout: float = 5.0) -> int:
        self.last_call = {"op": "compact", "revision": revision, "timeout": timeout}
        await self._enter()
        if revision > self.revision:
            raise InvalidRequest(f"revision {revision} is in the future (current {self.revision})", code="invalid_revision")
        if revision <= self.compact_revision:
            raise Compacted(f"revision {revision} is already compacted", compact_revision=self.compact_revision)
        self.compact_revision = revision
        return self.revision

    # --- membership and status ---

    async def add_member(self, member: Member, *, timeout: float = 30.0) -> dict:
        await self._enter()
        if any(m.id == member.id for m in self.members):
            raise InvalidRequest(f"member {member.id} exists", code="invalid_member_id")
        self.members.append(member)
        return {"added": member.id, "members": [m.id for m in self.members]}

    async def remove_member(self, member_id: str, *, timeout: float = 30.0) -> dict:
        await self._enter()
        if not any(m.id == member_id for m in self.members):
            raise NotFound(f"no member {member_id}", code="member_not_found")
        self.members = [m for m in self.members if m.id != member_id]
        return {"removed": member_id, "members": [m.id for m in self.members]}


def encode_context(clock: dict[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(clock, sort_keys=True).encode()).decode()


def decode_context(context: str | None) -> dict[str, int]:
    if not context:
        return {}
    try:
        clock = json.loads(base64.urlsafe_b64decode(context.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("the context does not decode; send back one a read returned", code="invalid_context") from None
    if not isinstance(clock, dict) or not all(isinstance(v, int) for v in clock.values()):
        raise InvalidRequest("the context does not decode; send back one a read returned", code="invalid_context")
    return clock


def _descends(a: dict[str, int], b: dict[str, int]) -> bool:
    return all(a.get(node, 0) >= count for node, count in b.items())


class FakeAPService(_Failable):
    mode = "ap"

    def __init__(self, config: NodeConfig | None = None):
        self.config = config
        self.node_id = config.node_id if config else "n1"
        self.members = list(config.members if config else (Member("n1", "http://127.0.0.1:1", "127.0.0.1:2"),))
        self.n = config.replicas if config else 3
        # key -> list of (clock, value or None for a tombstone)
        self.store: dict[bytes, list[tuple[dict[str, int], bytes | None]]] = {}
        self.counter = 0
        self.calls = 0
        self.last_call: dict[str, Any] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def _read(self, key: bytes) -> APRead:
        versions = self.store.get(key, [])
        merged: dict[str, int] = {}
        for clock, _ in versions:
            for node, count in clock.items():
                merged[node] = max(merged.get(node, 0), count)
        return APRead(key=key, siblings=[v for _, v in versions if v is not None], context=encode_context(merged))

    def _write(self, key: bytes, value: bytes | None, context: str | None) -> str:
        seen = decode_context(context)
        self.counter += 1
        clock = dict(seen)
        clock[self.node_id] = max(clock.get(self.node_id, 0), self.counter)
        kept = [(c, v) for c, v in self.store.get(key, []) if not _descends(seen, c)]
        kept.append((clock, value))
        self.store[key] = kept
        return self._read(key).context

    async def get(self, key, *, r=None, timeout=5.0):
        self.last_call = {"op": "get", "key": key, "r": r, "timeout": timeout}
        await self._enter()
        return self._read(key)

    async def put(self, key, value, *, context=None, w=None, request_id=None, timeout=5.0):
        self.last_call = {"op": "put", "key": key, "value": value, "context": context, "w": w,
                          "request_id": request_id, "timeout": timeout}  # fmt: skip
        await self._enter()
        return self._write(key, value, context)

    async def delete(self, key, *, context=None, w=None, timeout=5.0):
        self.last_call = {"op": "delete", "key": key, "context": context, "w": w, "timeout": timeout}
        await self._enter()
        return self._write(key, None, context)

    async def range(self, prefix, *, limit=None, timeout=5.0):
        self.last_call = {"op": "range", "prefix": prefix, "limit": limit, "timeout": timeout}
        await self._enter()
        reads = [self._read(k) for k in sorted(self.store) if k.startswith(prefix)]
        reads = [r for r in reads if r.siblings]
        if limit is not None:
            reads = reads[:limit]
        return reads, False

    def preflist(self, key: bytes) -> dict:
        ids = [m.id for m in self.members]
        start = sum(key) % len(ids)
        order = ids[start:] + ids[:start]
        return {"key": key, "hash": sum(key), "preference_list": order[: self.n], "fallbacks": order[self.n:]}

    async def status(self) -> dict:
        return {
            "mode": "ap", "node": self.node_id, "n": self.n, "r": 2, "w": 2,
            "members": [{"id": m.id, "client_url": m.client_url, "peer_url": "http://" + m.peer_address,
                         "status": "alive", "tokens": 150, "ownership": 1 / len(self.members)} for m in self.members],
            "hints_pending": 0, "anti_entropy": {},
        }  # fmt: skip

    async def add_member(self, member: Member) -> dict:
        if any(m.id == member.id for m in self.members):
            raise InvalidRequest(f"member {member.id} exists", code="invalid_member_id")
        self.members.append(member)
        return {"added": member.id, "members": [m.id for m in self.members]}

    async def remove_member(self, member_id: str) -> dict:
        if not any(m.id == member_id for m in self.members):
            raise NotFound(f"no member {member_id}", code="member_not_found")
        self.members = [m for m in self.members if m.id != member_id]
        return {"removed": member_id, "members": [m.id for m in self.members]}

    def metrics(self) -> dict[str, float]:
        return {"keys": len(self.store), "siblings_max": max((len(v) for v in self.store.values()), default=0)}


def create_cp_service(config: NodeConfig) -> FakeCPService:
    return FakeCPService(config)


def create_cp_extras_service(config: NodeConfig) -> FakeCPExtrasService:
    return FakeCPExtrasService(config)


def create_ap_service(config: NodeConfig) -> FakeAPService:
    return FakeAPService(config)
