"""In-memory fakes of CPService and APService, faithful enough to test the HTTP layer,
the client and the launcher without Raft or a ring.

- `FakeCPService`: one global revision counter, per-key create/mod revision and version
  (reset by delete), compare-and-swap, request-id dedupe, reads at past revisions from a
  full history, a settable compact revision, leases accepted as numbers.
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
import json
from typing import Any

from api.service import (
    APRead,
    Compacted,
    DeleteResult,
    InvalidRequest,
    KeyValue,
    Member,
    NodeConfig,
    NotFound,
    PreconditionFailed,
    PutResult,
    RangeResult,
    Unavailable,
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


class FakeCPService(_Failable):
    mode = "cp"

    def __init__(self, config: NodeConfig | None = None):
        self.config = config
        self.node_id = config.node_id if config else "n1"
        self.members = config.members if config else (Member("n1", "http://127.0.0.1:1", "127.0.0.1:2"),)
        self.revision = 1  # etcd starts at 1
        self.compact_revision = 0
        self.store: dict[bytes, KeyValue] = {}
        self.history: list[tuple[int, bytes, KeyValue | None]] = []  # (revision, key, kv or None=deleted)
        self.request_ids: dict[str, Any] = {}
        self.calls = 0
        self.started = False
        self.stopped = False
        self.last_call: dict[str, Any] = {}

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    # --- reads ---

    def _at(self, revision: int | None) -> dict[bytes, KeyValue]:
        if revision is None:
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

    async def range(self, start, end, *, limit=None, keys_only=False, count_only=False, revision=None,
                    consistency="linearizable", timeout=5.0):  # fmt: skip
        self.last_call = {"op": "range", "start": start, "end": end, "limit": limit, "keys_only": keys_only,
                          "revision": revision, "consistency": consistency, "timeout": timeout}  # fmt: skip
        await self._enter()
        state = self._at(revision)
        keys = sorted(k for k in state if k >= start and (end is None and k == start or end == b"\0" or end is not None and k < end))
        items = [state[k] for k in keys]
        if keys_only:
            items = [KeyValue(kv.key, None, kv.create_revision, kv.mod_revision, kv.version, kv.lease) for kv in items]
        count = len(items)
        more = limit is not None and count > limit
        if limit is not None:
            items = items[:limit]
        return RangeResult(revision=self.revision, items=items, more=more, count=count)

    # --- writes ---

    def _compare(self, key: bytes, if_mod_revision: int | None) -> None:
        if if_mod_revision is None:
            return
        current = self.store.get(key)
        current_mod = current.mod_revision if current else 0
        if current_mod != if_mod_revision:
            raise PreconditionFailed(
                f"mod_revision of {key!r} is {current_mod}, not {if_mod_revision}", mod_revision=current_mod
            )

    async def put(self, key, value, *, lease=0, if_mod_revision=None, prev=False, request_id=None, timeout=5.0):
        self.last_call = {"op": "put", "key": key, "value": value, "lease": lease, "if_mod_revision": if_mod_revision,
                          "prev": prev, "request_id": request_id, "timeout": timeout}  # fmt: skip
        await self._enter()
        if request_id is not None and request_id in self.request_ids:
            return self.request_ids[request_id]
        self._compare(key, if_mod_revision)
        self.revision += 1
        old = self.store.get(key)
        kv = KeyValue(key, value, old.create_revision if old else self.revision, self.revision,
                      (old.version if old else 0) + 1, lease)  # fmt: skip
        self.store[key] = kv
        self.history.append((self.revision, key, kv))
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
        if end is None:
            doomed = [key] if key in self.store else []
        else:
            doomed = sorted(k for k in self.store if k >= key and (end == b"\0" or k < end))
        if not doomed:
            return DeleteResult(revision=self.revision, deleted=0)
        self.revision += 1
        old = [self.store.pop(k) for k in doomed]
        for k in doomed:
            self.history.append((self.revision, k, None))
        result = DeleteResult(revision=self.revision, deleted=len(old), prev=old if prev else [])
        if request_id is not None:
            self.request_ids[request_id] = result
        return result

    async def status(self) -> dict:
        return {
            "mode": "cp",
            "node": self.node_id,
            "leader": self.members[0].id,
            "term": 1,
            "commit_index": self.revision,
            "applied_index": self.revision,
            "revision": self.revision,
            "members": [
                {"id": m.id, "client_url": m.client_url, "peer_address": m.peer_address,
                 "role": "leader" if i == 0 else "follower", "reachable": True}
                for i, m in enumerate(self.members)
            ],
        }  # fmt: skip

    def metrics(self) -> dict[str, float]:
        return {"revision": self.revision, "keys": len(self.store), "raft_term": 1}

    def _check(self) -> None:
        for key, kv in self.store.items():
            assert kv.key == key and kv.create_revision <= kv.mod_revision <= self.revision and kv.version >= 1
        revisions = [rev for rev, _, _ in self.history]
        assert revisions == sorted(revisions)


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


def create_ap_service(config: NodeConfig) -> FakeAPService:
    return FakeAPService(config)
