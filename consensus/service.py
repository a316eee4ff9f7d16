"""The `cp` mode's `CPService` (api/service.py): a Raft-replicated etcd-like store.

    service = create_service(config)      # NodeConfig from the cluster file and flags
    await service.start()                 # on the main thread's loop (pysyncobj needs it)
    await service.put(b"a", b"1", request_id="r1")
    kv, revision = await service.get(b"a")
    await service.stop()

Any node serves every request: a follower's writes and barriers are forwarded to the
leader by pysyncobj, and the answer comes back when this node has applied the entry, so a
client never sees a redirect. How the pieces fit, and what durability each `--sync` gives,
is in consensus/DESIGN.md.

Outcomes: `Unavailable` (503) when a write was definitely not applied (no leader, no
quorum, refused), `OutcomeUnknown` (504) when it may have been (leader changed, timeout).
Every write carries a request id (the client's, or one made here), so the service itself
retries within the request's timeout when that is safe, and a client retry with the same
`request_id` applies at most once.

CPExtras (txn, leases, watch, compact, add/remove_member) are here too; how each works
under failure is in consensus/DESIGN.md ("Transactions, leases, watches, ...").

    result = await service.txn([Compare(b"a", "value", "==", b"1")], [TxnOp("put", b"a", b"2")], [])
    lease = await service.lease_grant(10); await service.put(b"k", b"v", lease=lease.id)
    async for batch in service.watch(b"a/", b"a0", start_revision=5): ...
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import math
import os
import secrets
import threading
import uuid
from typing import Any

from api.service import (
    Compacted,
    Compare,
    DeleteResult,
    LeaseInfo,
    Member,
    TxnOp,
    TxnResult,
    InvalidRequest,
    KeyValue,
    NodeConfig,
    NotFound,
    OutcomeUnknown,
    PreconditionFailed,
    PutResult,
    RangeResult,
    ServiceError,
    Unavailable,
    ValueTooLarge,
)
from engines import open_engine

from .bridge import Bridge
from .raft_node import APPLIED, NOT_APPLIED, Peer, RaftNode, RaftOptions
from .reads import ReadBarrier
from .state_machine import (
    KVStateMachine,
    StateMachineLimits,
    kv_from_dict,
    make_barrier,
    make_compact,
    make_delete,
    make_lease,
    make_member,
    make_put,
    make_txn,
    txn_problem,
)
from .watch import WatchHub, WatchLimits

logger = logging.getLogger(__name__)

CONSISTENCIES = ("linearizable", "serializable")


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """Bounds of the service layer; each says why."""

    # Requests waiting on Raft at once; more wait for a slot (within their timeout).
    max_in_flight: int = 10_000
    # A barrier that is not applied in this long fails its readers (503); they retry
    # with a new one while their own timeout lasts.
    barrier_timeout_s: float = 5.0
    # Read barriers in flight at once (reads.py): a read that arrives while one is in
    # flight gets its own instead of waiting for that one to finish first (measured at
    # 64 clients: 1 -> ~1 000 lin gets/s, 2 -> ~1 500-1 600, 4 -> ~1 850).
    max_read_barriers_in_flight: int = 4
    # Back-off between retries of a write that was not applied (no leader yet, ...).
    retry_backoff_min_s: float = 0.02
    retry_backoff_max_s: float = 0.5
    # The longest a request may ask to wait.
    max_timeout_s: float = 300.0
    # Range reads up to this many items run on the event loop; longer ones on a thread.
    inline_range_limit: int = 256
    # Random lease ids tried before giving up (a clash among 2**63 ids is one in billions).
    lease_id_attempts: int = 3
    # `leases()` lists at most this many.
    max_leases_listed: int = 100_000
    # How often the leader looks for expired leases (expiry is this late at most).
    lease_check_interval_s: float = 0.1
    # A new leader gives every lease at least this long (its keepalives may have been
    # refused during the election); never shortens one.
    lease_promote_grace_s: float = 2.0
    # Expiry proposals in flight at once.
    max_expiries_in_flight: int = 64


def create_service(
    config: NodeConfig,
    *,
    raft_options: RaftOptions | None = None,
    limits: ServiceLimits | None = None,
    state_machine_limits: StateMachineLimits | None = None,
) -> "ConsensusService":
    """The entry point the HTTP layer and CLI call. Nothing starts until `start()`."""
    return ConsensusService(config, raft_options=raft_options, limits=limits, state_machine_limits=state_machine_limits)


class _Slot:
    """`async with`: one of the service's in-flight slots, waited for until `deadline`
    (503 past it). A plain class, not one built per request: that cost ~20 µs a write."""

    __slots__ = ("_slots", "_deadline")

    def __init__(self, slots: asyncio.Semaphore, deadline: float) -> None:
        self._slots = slots
        self._deadline = deadline

    async def __aenter__(self) -> None:
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # free slot: does not wait
            return
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(slots.acquire(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise Unavailable("too many requests in flight on this node", reason="overloaded") from None

    async def __aexit__(self, *exc) -> None:
        self._slots.release()


class ConsensusService:
    mode = "cp"

    def __init__(
        self,
        config: NodeConfig,
        *,
        raft_options: RaftOptions | None = None,
        limits: ServiceLimits | None = None,
        state_machine_limits: StateMachineLimits | None = None,
    ) -> None:
        if not config.secret:
            raise ValueError("NodeConfig.secret is empty: the Raft port must be password protected")
        ids = [m.id for m in config.members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"member ids repeat: {ids}")
        config.self_member  # KeyError when node_id is not a member
        if config.sync not in ("always", "batch", "never"):
            raise ValueError(f"sync must be always, batch or never, not {config.sync!r}")
        self.config = config
        self.node_id = config.node_id
        self.raft_options = raft_options or RaftOptions()
        self.limits = limits or ServiceLimits()
        self.sm_limits = state_machine_limits or StateMachineLimits(max_value_bytes=config.max_value_bytes)
        self._engine = None
        self._sm: KVStateMachine | None = None
        self._raft: RaftNode | None = None
        self._bridge: Bridge | None = None
        self._barrier: ReadBarrier | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Future] = set()
        self._hub: WatchHub | None = None
        self._lessor = Lessor()
        self._lease_task: asyncio.Task | None = None
        self._request_id_tag = uuid.uuid4().hex[:16]
        self._request_ids = itertools.count(1)
        self._started = False
        self._stopped = False
        self._counters = dict.fromkeys(
            (
                "writes_total",
                "writes_retried_total",
                "writes_unavailable_total",
                "writes_outcome_unknown_total",
                "reads_linearizable_total",
                "reads_serializable_total",
                "reads_unavailable_total",
                "precondition_failed_total",
                "duplicate_requests_total",
                "leases_expired_total",
                "txns_total",
            ),
            0,
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the engine and join the Raft group. Must run on the main thread's loop:
        pysyncobj's tick thread stops when the thread that built it ends."""
        if self._started:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ConsensusService.start() must run on the main thread (pysyncobj's tick thread dies with its creator)")
        config = self.config
        os.makedirs(config.data_dir, exist_ok=True)
        engine_options = dict(
            # The Raft journal is the write-ahead log of cp mode: the engine is made durable
            # when a snapshot replaces a log prefix (raft_node._Snapshots), not on every apply.
            sync="never",
            max_key_bytes=2 * self.sm_limits.max_key_bytes + 64,
            max_value_bytes=64 * 1024 * 1024,
            max_batch_bytes=128 * 1024 * 1024,
        )
        if config.engine == "memory":
            self._engine = open_engine("memory", **engine_options)
        else:
            self._engine = open_engine(config.engine, os.path.join(config.data_dir, "kv"), **engine_options)
        self._sm = KVStateMachine(self._engine, self.sm_limits)
        loop = asyncio.get_running_loop()
        self._bridge = Bridge(loop)
        self._slots = asyncio.Semaphore(self.limits.max_in_flight)
        self._barrier = ReadBarrier(self._propose_barrier, self.limits.max_read_barriers_in_flight)
        self._hub = WatchHub(loop, self._sm, WatchLimits(), on_leases=self._on_leases)
        self._lessor.load(self._sm.leases(), loop.time())
        self._sm.listener = self._hub.on_apply
        routes = dict(config.peer_routes)
        me = config.self_member
        peers = [Peer(m.id, m.peer_address, routes.get(m.id)) for m in config.members if m.id != me.id]
        try:
            self._raft = self._new_raft_node(me, peers)
        except BaseException:
            self._engine.close()
            raise
        for member_id, record in self._sm.members().items():
            if not record["removed"]:
                self._raft.register_member(member_id, record["peer_address"])
        self._started = True
        self._lease_task = asyncio.ensure_future(self._lease_timer())

    def _on_leases(self, notices: list) -> None:
        self._lessor.apply([n for n in notices if n[0] in ("refresh", "gone")], asyncio.get_running_loop().time())
        for kind, member_id, _, _ in notices:
            if kind in ("member", "step_down"):
                self._on_member_notice(kind, member_id)
            elif kind == "installed":
                # A snapshot replaced the store: leases and members as it holds them.
                self._lessor.deadlines.clear()
                self._lessor.load(self._sm.leases(), asyncio.get_running_loop().time())
                for mid, record in self._sm.members().items():
                    if not record["removed"]:
                        self._raft.register_member(mid, record["peer_address"])

    def _new_raft_node(self, me, peers) -> RaftNode:
        config = self.config
        return RaftNode(
            self._sm,
            Peer(me.id, me.peer_address),
            peers,
            data_dir=os.path.join(config.data_dir, "raft"),
            password=config.secret,
            sync=config.sync,
            options=self.raft_options,
        )

    async def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._hub.close()
        if self._lease_task is not None:
            self._lease_task.cancel()
        await self._barrier.close(Unavailable("this node is stopping", reason="stopped"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._raft.destroy)
        for future in list(self._inflight):
            if not future.done():
                future.set_result((None, "stopped", "node stopped"))
        self._engine.close()

    # --- writes --------------------------------------------------------------------------

    def _check_running(self) -> None:
        if not self._started or self._stopped:
            raise Unavailable("this node is not running", reason="stopped")
        if self._sm.failed:
            raise Unavailable(f"this replica stopped applying: {self._sm.failed}", reason="replica_failed")

    def _check_timeout(self, timeout: float) -> float:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InvalidRequest("timeout must be a positive number of seconds", code="invalid_timeout")
        return min(float(timeout), self.limits.max_timeout_s)

    def _check_key(self, key: Any, name: str = "key") -> bytes:
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise InvalidRequest(f"{name} must be 1 to {self.sm_limits.max_key_bytes} bytes", code="invalid_key")
        if len(key) > self.sm_limits.max_key_bytes:
            raise InvalidRequest(f"{name} is {len(key)} bytes; the limit is {self.sm_limits.max_key_bytes}", code="invalid_key")
        return bytes(key)

    def _check_mod_revision(self, value: Any) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest("if_mod_revision must be a non-negative integer", code="invalid_if_mod_revision")
        return value

    def _request_id(self, request_id: Any) -> str:
        if request_id is None:
            # Unique without a uuid4 per write: a random tag per service instance (a
            # restart draws a new one) and a counter.
            return f"{self.node_id}:{self._request_id_tag}:{next(self._request_ids)}"
        if not isinstance(request_id, str) or not request_id or len(request_id.encode()) > self.sm_limits.max_request_id_bytes:
            raise InvalidRequest(
                f"request_id must be 1 to {self.sm_limits.max_request_id_bytes} bytes of text", code="invalid_request_id"
            )
        return request_id

    def _leader_unreachable(self) -> str | None:
        """Why a command submitted now would certainly not be applied, or None.

        pysyncobj drops a command forwarded to a leader it is not connected to and never
        calls back, and a leader without a quorum appends commands that cannot commit: in
        both cases we answer 503 at once instead of waiting out the timeout.
        """
        raft = self._raft
        leader = raft.leader_id()
        if leader is None:
            return "no leader"
        if not raft.has_quorum():
            return "no quorum: this node reaches too few members"
        if leader != self.node_id and not raft.reachable(leader):
            return f"the leader {leader} is unreachable"
        return None

    async def _submit(self, command: dict, timeout: float, *, retry_unknown: bool) -> dict:
        """Replicate `command` within `timeout`; returns the state machine's result.

        Retries a definitely-not-applied attempt (and, with `retry_unknown`, an ambiguous
        one: the command carries a request id, so it applies at most once) with back-off
        until the deadline.
        """
        self._check_running()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = self.limits.retry_backoff_min_s
        maybe_applied = False
        reason = "timed out"
        attempt = 0
        async with self._slot(deadline):
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if self._stopped:
                    reason = "node stopped"
                    break
                if attempt:
                    self._counters["writes_retried_total"] += 1
                attempt += 1
                blocked = self._leader_unreachable()
                if blocked is None:
                    future = self._bridge.submit(self._raft.submit, command)
                    self._inflight.add(future)
                    try:
                        result, outcome, reason = await asyncio.wait_for(asyncio.shield(future), remaining)
                    except asyncio.TimeoutError:
                        maybe_applied = True
                        reason = "timed out waiting for the write to commit"
                        break
                    finally:
                        self._inflight.discard(future)
                    if outcome == APPLIED:
                        if isinstance(result, dict) and result.get("error") == "already_applied":
                            maybe_applied = True  # replay race; the retry answers
                        else:
                            return result
                    elif outcome == NOT_APPLIED:
                        pass
                    elif outcome == "stopped":
                        maybe_applied = True
                        break
                    else:
                        maybe_applied = True
                        if not retry_unknown:
                            break
                else:
                    reason = blocked
                await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                backoff = min(backoff * 2, self.limits.retry_backoff_max_s)
        if maybe_applied:
            raise OutcomeUnknown(
                f"the write may or may not have been applied ({reason}); retry with the same request_id",
                reason=reason,
            )
        raise Unavailable(f"the write was not applied: {reason}", reason=reason)

    def _slot(self, deadline: float) -> "_Slot":
        return _Slot(self._slots, deadline)

    def _raise_for(self, result: dict) -> None:
        error = result.get("error")
        if error is None:
            return
        message = result.get("message", error)
        if error == "precondition_failed":
            self._counters["precondition_failed_total"] += 1
            raise PreconditionFailed(message, mod_revision=result["mod_revision"], revision=result.get("revision"))
        if error == "value_too_large":
            raise ValueTooLarge(message)
        if error == "lease_not_found":
            raise NotFound(message, code="lease_not_found")
        if error == "lease_exists":
            raise PreconditionFailed(message, code="lease_exists", lease_id=result.get("lease_id"))
        if error == "compacted":
            raise Compacted(message, compact_revision=result.get("compact_revision", self._sm.compact_revision))
        if error == "responses_unavailable":
            # The txn was applied (at `revision`) by an earlier attempt with this request id,
            # but its responses were cut from the bounded retry cache: 410, like a compacted
            # revision, with what is still known.
            raise Compacted(message, code=error, revision=result.get("revision"), succeeded=result.get("succeeded"))
        if error == "replica_failed":
            raise Unavailable(message, reason="replica_failed")
        if error.startswith("invalid_") or error in ("too_many_keys", "too_many_leases", "unsupported_command_version"):
            raise InvalidRequest(message, code=error if error.startswith("invalid_") else f"invalid_{error}")
        raise ServiceError(message, code=error)

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
        key = self._check_key(key)
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidRequest("value must be bytes", code="invalid_value")
        if len(value) > self.config.max_value_bytes:
            raise ValueTooLarge(f"value is {len(value)} bytes; the limit is {self.config.max_value_bytes}")
        if not isinstance(lease, int) or isinstance(lease, bool):
            raise InvalidRequest("lease must be an integer", code="invalid_lease")
        command = make_put(
            key,
            bytes(value),
            lease=lease,
            if_mod_revision=self._check_mod_revision(if_mod_revision),
            prev=bool(prev),
            request_id=self._request_id(request_id),
        )
        timeout = self._check_timeout(timeout)
        self._counters["writes_total"] += 1
        result = await self._write(command, timeout)
        prev_kv = result.get("prev")
        return PutResult(revision=result["revision"], created=bool(result["created"]), prev=kv_from_dict(prev_kv) if prev_kv else None)

    async def delete(
        self,
        key: bytes,
        end: bytes | None = None,
        *,
        if_mod_revision: int | None = None,
        prev: bool = False,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> DeleteResult:
        key = self._check_key(key)
        if end is not None:
            if not isinstance(end, (bytes, bytearray)) or not end:
                raise InvalidRequest("end must be non-empty bytes", code="invalid_range_end")
            end = bytes(end)
            if if_mod_revision is not None:
                raise InvalidRequest("if_mod_revision applies to a single key, not a range", code="invalid_if_mod_revision")
        command = make_delete(
            key,
            end,
            if_mod_revision=self._check_mod_revision(if_mod_revision),
            prev=bool(prev),
            request_id=self._request_id(request_id),
        )
        timeout = self._check_timeout(timeout)
        self._counters["writes_total"] += 1
        result = await self._write(command, timeout)
        return DeleteResult(
            revision=result["revision"],
            deleted=int(result["deleted"]),
            prev=[kv_from_dict(d) for d in result.get("prev") or []],
        )

    async def _write(self, command: dict, timeout: float) -> dict:
        try:
            result = await self._submit(command, timeout, retry_unknown=True)
        except Unavailable:
            self._counters["writes_unavailable_total"] += 1
            raise
        except OutcomeUnknown:
            self._counters["writes_outcome_unknown_total"] += 1
            raise
        if result.get("duplicate"):
            self._counters["duplicate_requests_total"] += 1
        self._raise_for(result)
        return result

    # --- reads ---------------------------------------------------------------------------

    async def _propose_barrier(self) -> dict:
        result = await self._submit(make_barrier(), self.limits.barrier_timeout_s, retry_unknown=False)
        return result

    async def _linearize(self, timeout: float) -> None:
        """Wait for a read barrier proposed after this call (reads.py), within `timeout`."""
        self._check_running()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = self.limits.retry_backoff_min_s
        reason = "timed out waiting for a read barrier"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._barrier.wait(), remaining)
                return
            except asyncio.TimeoutError:
                break
            except (Unavailable, OutcomeUnknown) as exc:
                reason = exc.message
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, self.limits.retry_backoff_max_s)
        self._counters["reads_unavailable_total"] += 1
        raise Unavailable(f"cannot serve a linearizable read: {reason}; consistency=serializable reads this replica", reason=reason)

    async def _before_read(self, consistency: str, timeout: float) -> None:
        if consistency not in CONSISTENCIES:
            raise InvalidRequest(f"consistency must be one of {', '.join(CONSISTENCIES)}", code="invalid_consistency")
        timeout = self._check_timeout(timeout)
        if not self._started or self._stopped:
            raise Unavailable("this node is not running", reason="stopped")
        if self._sm.failed:
            raise Unavailable(f"this replica stopped applying: {self._sm.failed}", reason="replica_failed")
        if consistency == "linearizable":
            self._counters["reads_linearizable_total"] += 1
            await self._linearize(timeout)
        else:
            self._counters["reads_serializable_total"] += 1

    async def get(
        self, key: bytes, *, consistency: str = "linearizable", revision: int | None = None, timeout: float = 5.0
    ) -> tuple[KeyValue | None, int]:
        key = self._check_key(key)
        await self._before_read(consistency, timeout)
        return self._sm.get(key, revision)

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
        if not isinstance(start, (bytes, bytearray)):
            raise InvalidRequest("start must be bytes", code="invalid_key")
        if len(start) > self.sm_limits.max_key_bytes:
            raise InvalidRequest("start is too long", code="invalid_key")
        if end is not None and (not isinstance(end, (bytes, bytearray)) or not end):
            raise InvalidRequest("end must be non-empty bytes or None", code="invalid_range_end")
        start = bytes(start) or b"\x00"
        await self._before_read(consistency, timeout)
        read = functools.partial(
            self._sm.range,
            start,
            None if end is None else bytes(end),
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            revision=revision,
        )
        if end is not None and (not limit or limit > self.limits.inline_range_limit or count_only or revision):
            # A scan that may be long runs on a worker thread so the loop keeps serving.
            items, revision_seen, more, count = await asyncio.get_running_loop().run_in_executor(None, read)
        else:
            items, revision_seen, more, count = read()
        return RangeResult(revision=revision_seen, items=items, more=more, count=count)

    # --- cluster -------------------------------------------------------------------------

    async def status(self) -> dict:
        raft = self._raft
        running = self._started and not self._stopped
        leader = raft.leader_id() if running else None
        members = []
        for member in (self._members() if running else self.config.members):
            if member.id == self.node_id:
                role = raft.role() if running else "stopped"
            else:
                role = "leader" if member.id == leader else "follower"
            members.append(
                {
                    "id": member.id,
                    "client_url": member.client_url,
                    "peer_address": member.peer_address,
                    "role": role,
                    "reachable": bool(running and raft.reachable(member.id)),
                }
            )
        return {
            "mode": self.mode,
            "node": self.node_id,
            "leader": leader,
            "term": raft.term if raft else 0,
            "commit_index": raft.commit_index if raft else 0,
            "applied_index": raft.applied_index if raft else 0,
            "revision": self._sm.revision if self._sm else 0,
            "compact_revision": self._sm.compact_revision if self._sm else 0,
            "sync": self.config.sync,
            "members": members,
        }

    def health(self) -> tuple[bool, str]:
        if not self._started or self._stopped:
            return False, "not running"
        if self._sm.failed:
            return False, f"replica stopped applying: {self._sm.failed}"
        blocked = self._leader_unreachable()
        if blocked is not None:
            return False, blocked
        return True, "ok"

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
        if not self._started:
            return out
        raft = self._raft
        out.update(
            {
                "raft_term": float(raft.term),
                "raft_commit_index": float(raft.commit_index),
                "raft_applied_index": float(raft.applied_index),
                "raft_leader_changes_total": float(raft.leader_changes),
                "raft_is_leader": 1.0 if raft.role() == "leader" else 0.0,
                "raft_has_leader": 0.0 if raft.leader_id() is None else 1.0,
                "store_revision": float(self._sm.revision),
                "store_compact_revision": float(self._sm.compact_revision),
                "store_applied_commands_total": float(self._sm.applied_commands),
                "store_skipped_commands_total": float(self._sm.skipped_commands),
                "read_barriers_total": float(self._barrier.barriers),
                "read_barrier_reads_total": float(self._barrier.reads),
                "bridge_wakeups_total": float(self._bridge.wakeups),
                "watchers": float(len(self._hub.watchers)),
                "watch_events_delivered_total": float(self._hub.events_delivered),
                "watch_canceled_slow_total": float(self._hub.canceled_slow),
                "watch_wakeups_total": float(self._hub.wakeups),
                "leases": float(len(self._lessor.deadlines)),
                "store_compacted_rows_total": float(self._sm.compacted_rows),
            }
        )
        for key, value in raft.stats().items():
            out[f"raft_{key}"] = float(value)
        return out

    # --- CPExtras: transactions ----------------------------------------------------------

    def _compare_dict(self, compare: Any) -> dict:
        if not isinstance(compare, Compare):
            raise InvalidRequest("a compare is an api.service.Compare", code="invalid_txn")
        key = self._check_key(compare.key)
        if compare.target not in ("value", "version", "create_revision", "mod_revision", "lease"):
            raise InvalidRequest(f"unknown compare target {compare.target!r}", code="invalid_txn")
        if compare.op not in ("==", "!=", "<", ">"):
            raise InvalidRequest(f"unknown compare op {compare.op!r}", code="invalid_txn")
        value = compare.value
        if compare.target == "value":
            if not isinstance(value, (bytes, bytearray)):
                raise InvalidRequest("a value compare takes bytes", code="invalid_txn")
            value = bytes(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"a {compare.target} compare takes an integer", code="invalid_txn")
        return {"key": key, "target": compare.target, "op": compare.op, "value": value, "end": self._check_end(compare.end)}

    def _check_end(self, end: Any) -> bytes | None:
        if end is None:
            return None
        if not isinstance(end, (bytes, bytearray)) or not end:
            raise InvalidRequest("end must be non-empty bytes", code="invalid_range_end")
        return bytes(end)

    def _op_dict(self, op: Any, depth: int = 0) -> dict:
        if not isinstance(op, TxnOp):
            raise InvalidRequest("a txn op is an api.service.TxnOp", code="invalid_txn")
        if op.op == "txn":
            if depth >= 8:
                raise InvalidRequest("txns nest at most 8 deep", code="invalid_txn")
            return {
                "op": "txn",
                "compare": [self._compare_dict(c) for c in op.compare],
                "success": [self._op_dict(o, depth + 1) for o in op.success],
                "failure": [self._op_dict(o, depth + 1) for o in op.failure],
            }
        key = self._check_key(op.key)
        end = self._check_end(op.end)
        if op.op == "get":
            for name in ("limit", "revision"):
                value = getattr(op, name)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise InvalidRequest(f"{name} must be a non-negative integer", code=f"invalid_{name}")
            return {"op": "get", "key": key, "end": end, "limit": op.limit, "keys_only": bool(op.keys_only),
                    "count_only": bool(op.count_only), "revision": op.revision}  # fmt: skip
        if op.op == "put":
            value = op.value if op.value is not None else b""
            if not isinstance(value, (bytes, bytearray)):
                raise InvalidRequest("value must be bytes", code="invalid_value")
            if len(value) > self.config.max_value_bytes:
                raise ValueTooLarge(f"value is {len(value)} bytes; the limit is {self.config.max_value_bytes}")
            if not isinstance(op.lease, int) or isinstance(op.lease, bool) or op.lease < 0:
                raise InvalidRequest("lease must be a non-negative integer", code="invalid_lease")
            return {"op": "put", "key": key, "value": bytes(value), "lease": op.lease, "prev": bool(op.prev)}
        if op.op == "delete":
            return {"op": "delete", "key": key, "end": end, "prev": bool(op.prev)}
        raise InvalidRequest(f"unknown txn op {op.op!r}", code="invalid_txn")

    async def txn(
        self,
        compare: list,
        success: list,
        failure: list,
        *,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> TxnResult:
        """Atomic compare-then-branch, one revision for all its writes (one command)."""
        command = make_txn(
            [self._compare_dict(c) for c in compare],
            [self._op_dict(o) for o in success],
            [self._op_dict(o) for o in failure],
            request_id=self._request_id(request_id),
        )
        problem = txn_problem(command, self.sm_limits.max_txn_ops)
        if problem is not None:
            raise InvalidRequest(problem, code="invalid_txn")
        timeout = self._check_timeout(timeout)
        # Read-only txns go through the log too (linearizable, one code path); a barrier
        # and a local evaluation would save the log entry.
        self._counters["txns_total"] += 1
        result = await self._write(command, timeout)
        return _txn_result(result)

    # --- CPExtras: leases ----------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float = 5.0) -> LeaseInfo:
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= self.sm_limits.max_lease_ttl_s:
            raise InvalidRequest(f"ttl must be 1..{self.sm_limits.max_lease_ttl_s} seconds", code="invalid_ttl")
        if not isinstance(lease_id, int) or isinstance(lease_id, bool) or not 0 <= lease_id < 2**63:
            raise InvalidRequest("a lease id is a positive 63-bit integer (0: pick one)", code="invalid_lease")
        timeout = self._check_timeout(timeout)
        chosen = lease_id
        for _ in range(self.limits.lease_id_attempts):
            if not lease_id:
                chosen = secrets.randbelow(2**63 - 1) + 1  # as etcd: random, chosen before proposing
            command = make_lease("lease_grant", chosen, ttl=ttl, request_id=self._request_id(None))
            try:
                result = await self._write(command, timeout)
            except PreconditionFailed:
                if lease_id:
                    raise
                continue
            return LeaseInfo(id=chosen, ttl=int(result["ttl"]), granted_ttl=int(result["ttl"]))
        raise Unavailable("could not pick a free lease id", reason="lease_id")

    def _check_lease_id(self, lease_id: Any) -> int:
        if not isinstance(lease_id, int) or isinstance(lease_id, bool) or not 0 < lease_id < 2**63:
            raise NotFound(f"lease {lease_id} not found", code="lease_not_found")
        return lease_id

    async def lease_revoke(self, lease_id: int, *, timeout: float = 5.0) -> int:
        lease_id = self._check_lease_id(lease_id)
        timeout = self._check_timeout(timeout)
        self._counters["writes_total"] += 1
        result = await self._write(make_lease("lease_revoke", lease_id, request_id=self._request_id(None)), timeout)
        return int(result["revision"])

    async def lease_keepalive(self, lease_id: int, *, timeout: float = 5.0) -> LeaseInfo:
        lease_id = self._check_lease_id(lease_id)
        timeout = self._check_timeout(timeout)
        # Idempotent (it only moves the lease's refresh index), so no request id is needed.
        result = await self._write(make_lease("lease_keepalive", lease_id), timeout)
        ttl = int(result["ttl"])
        return LeaseInfo(id=lease_id, ttl=ttl, granted_ttl=ttl)

    async def lease_info(self, lease_id: int, *, keys: bool = False, timeout: float = 5.0) -> LeaseInfo:
        lease_id = self._check_lease_id(lease_id)
        await self._before_read("linearizable", timeout)
        lease = self._sm.lease(lease_id)
        if lease is None:
            raise NotFound(f"lease {lease_id} not found (it expired, was revoked, or never existed)", code="lease_not_found")
        return self._lease_info(lease_id, lease, keys)

    def _lease_info(self, lease_id: int, lease: dict, keys: bool) -> LeaseInfo:
        granted = int(lease["ttl"])
        left = self._lessor.ttl_left(lease_id, asyncio.get_running_loop().time(), granted)
        return LeaseInfo(id=lease_id, ttl=left, granted_ttl=granted, keys=self._sm.lease_keys(lease_id) if keys else [])

    async def leases(self, *, timeout: float = 5.0) -> list[LeaseInfo]:
        await self._before_read("linearizable", timeout)
        return [self._lease_info(lease_id, lease, False) for lease_id, lease in self._sm.leases()[: self.limits.max_leases_listed]]

    async def _lease_timer(self) -> None:
        """On the leader: propose the expiry of every lease whose time is up. On becoming
        leader, re-arm every lease from now, never shorter than it was (Lessor.promote)."""
        loop = asyncio.get_running_loop()
        was_leader = False
        in_flight: set[int] = set()
        while not self._stopped:
            await asyncio.sleep(self.limits.lease_check_interval_s)
            try:
                is_leader = self._raft.role() == "leader"
            except Exception:  # noqa: BLE001 - stopping
                return
            now = loop.time()
            if is_leader and not was_leader:
                self._lessor.promote(now, self.limits.lease_promote_grace_s)
            was_leader = is_leader
            if not is_leader:
                continue
            for lease_id, refresh in self._lessor.due(now, self.limits.max_expiries_in_flight - len(in_flight)):
                if lease_id in in_flight:
                    continue
                in_flight.add(lease_id)
                task = asyncio.ensure_future(self._expire(lease_id, refresh))
                task.add_done_callback(lambda _t, i=lease_id: in_flight.discard(i))

    async def _expire(self, lease_id: int, refresh: int) -> None:
        try:
            await self._submit(make_lease("lease_expire", lease_id, refresh=refresh), 5.0, retry_unknown=True)
            self._counters["leases_expired_total"] += 1
        except ServiceError:
            pass  # still due: the next check proposes it again

    # --- CPExtras: watches and compaction ------------------------------------------------

    def watch(
        self,
        start: bytes,
        end: bytes | None = None,
        *,
        start_revision: int | None = None,
        prev: bool = False,
        progress_interval: float = 10.0,
    ):
        """Events of [start, end) from `start_revision` (consensus/watch.py). Raises
        Compacted at once when that revision's history is gone."""
        self._check_running()
        if not isinstance(start, (bytes, bytearray)):
            raise InvalidRequest("start must be bytes", code="invalid_key")
        start = bytes(start) or b"\x00"
        end = self._check_end(end)
        if start_revision is not None and (
            not isinstance(start_revision, int) or isinstance(start_revision, bool) or start_revision < 0
        ):
            raise InvalidRequest("start_revision must be a non-negative integer", code="invalid_revision")
        if not isinstance(progress_interval, (int, float)) or not progress_interval > 0:
            raise InvalidRequest("progress_interval must be positive", code="invalid_progress_interval")
        return self._hub.watch(start, end, start_revision=start_revision or None, prev=bool(prev),
                               progress_interval=float(progress_interval))  # fmt: skip

    async def compact(self, revision: int, *, timeout: float = 5.0) -> int:
        """Drop history below `revision`; returns the store's revision. Compacted when it
        is at or below the compact revision, InvalidRequest when it is in the future."""
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
            raise InvalidRequest("revision must be a positive integer", code="invalid_revision")
        timeout = self._check_timeout(timeout)
        result = await self._submit(make_compact(revision), timeout, retry_unknown=False)
        self._raise_for(result)
        return int(result["revision"])

    # --- CPExtras: membership ------------------------------------------------------------

    def _members(self) -> list[Member]:
        """The cluster file's members, updated by replicated member changes."""
        members = {m.id: m for m in self.config.members}
        for member_id, record in self._sm.members().items() if self._sm else ():
            if record["removed"]:
                members.pop(member_id, None)
            else:
                members[member_id] = Member(member_id, record["client_url"], record["peer_address"])
        return list(members.values())

    def _on_member_notice(self, kind: str, member_id: str) -> None:
        if kind == "member":
            record = self._sm.members().get(member_id)
            if record and not record["removed"]:
                self._raft.register_member(member_id, record["peer_address"])
        elif kind == "step_down" and member_id == self.node_id and self._raft.role() == "leader":
            self._raft.change_membership(("transfer",), lambda *args: None)

    async def _change_raft_membership(self, change: tuple, deadline: float) -> None:
        """One pysyncobj membership change, retried while the leader refuses it (its
        previous change or its own no-op is not applied yet) until `deadline`."""
        loop = asyncio.get_running_loop()
        backoff = self.limits.retry_backoff_min_s
        reason = "timed out"
        while loop.time() < deadline:
            blocked = self._leader_unreachable()
            if blocked is None:
                future = self._bridge.submit(self._raft.change_membership, change)
                try:
                    _, outcome, reason = await asyncio.wait_for(asyncio.shield(future), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise OutcomeUnknown(f"the membership change may or may not have happened ({reason})", reason=reason) from None
                if outcome == APPLIED:
                    return
            else:
                reason = blocked
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.limits.retry_backoff_max_s)
        raise Unavailable(f"the membership change was not made: {reason}", reason=reason)

    def _raft_has(self, address: str) -> bool:
        return address in self._raft.member_addresses()

    async def add_member(self, member: Member, *, timeout: float = 30.0) -> dict:
        """Add one member (pysyncobj's single-server change). Then start the new node with
        the full new member list. Writes go on meanwhile."""
        if not isinstance(member, Member) or not member.id or not member.peer_address or not member.client_url:
            raise InvalidRequest("a member needs an id, a client_url and a peer_address", code="invalid_member")
        if ":" not in member.peer_address:
            raise InvalidRequest("peer_address is host:port", code="invalid_member")
        timeout = self._check_timeout(timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        current = self._members()
        if any(m.id == member.id for m in current):
            raise InvalidRequest(f"member {member.id} exists", code="invalid_member_id")
        if any(m.peer_address == member.peer_address for m in current):
            raise InvalidRequest(f"peer address {member.peer_address} is taken", code="invalid_member")
        self._raft.register_member(member.id, member.peer_address)
        await self._write(make_member("member_add", member.id, client_url=member.client_url,
                                      peer_address=member.peer_address), timeout)  # fmt: skip
        if not self._raft_has(member.peer_address):
            await self._change_raft_membership(("add", member.id, member.peer_address), deadline)
        return {"added": member.id, "members": [m.id for m in self._members()]}

    async def remove_member(self, member_id: str, *, timeout: float = 30.0) -> dict:
        """Remove one member; the leader first hands leadership over (pysyncobj's leader
        cannot remove itself). Stop the removed node afterwards."""
        timeout = self._check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        member = next((m for m in self._members() if m.id == member_id), None)
        if member is None:
            raise NotFound(f"no member {member_id}", code="member_not_found")
        if len(self._members()) <= 1:
            raise InvalidRequest("the last member cannot be removed", code="invalid_member_id")
        if self._raft_has(member.peer_address):
            while self._raft.leader_id() == member_id and loop.time() < deadline:
                if member_id == self.node_id:
                    self._raft.change_membership(("transfer",), lambda *args: None)
                else:
                    await self._write(make_member("member_step_down", member_id), max(0.1, deadline - loop.time()))
                until = min(deadline, loop.time() + 3.0)
                while self._raft.leader_id() in (member_id, None) and loop.time() < until:
                    await asyncio.sleep(0.05)
            if self._raft.leader_id() == member_id:
                raise Unavailable(f"{member_id} leads and did not hand leadership over", reason="leader_transfer")
            await self._change_raft_membership(("remove", member.peer_address), deadline)
        await self._write(make_member("member_remove", member_id, client_url=member.client_url,
                                      peer_address=member.peer_address), max(0.1, deadline - loop.time()))  # fmt: skip
        return {"removed": member_id, "members": [m.id for m in self._members()]}

    # --- extras beyond the CPService protocol ---------------------------------------------

    def force_snapshot(self) -> None:
        """Ask pysyncobj to compact its log now (tests, operators)."""
        self._raft.force_snapshot()

    @property
    def state_machine(self) -> KVStateMachine:
        return self._sm


class Lessor:
    """When each lease is due, by this node's monotonic clock (loop thread; pure: the
    time comes in as an argument).

    Every node re-arms a lease when it applies its grant or keepalive, so a follower's
    deadlines trail the leader's by its apply lag, never lead them; only the leader acts
    on them (by proposing `lease_expire` with the refresh index it saw).

        lessor.apply([("refresh", 7, 10, 42)], now=100.0)   # lease 7, ttl 10, log index 42
        lessor.due(111.0, limit=64) -> [(7, 42)]
    """

    def __init__(self) -> None:
        self.deadlines: dict[int, list] = {}  # id -> [deadline, granted ttl, refresh index]

    def load(self, leases: list, now: float) -> None:
        for lease_id, lease in leases:
            self.deadlines[lease_id] = [now + lease["ttl"], lease["ttl"], lease["refresh"]]

    def apply(self, changes: list, now: float) -> None:
        for what, lease_id, ttl, refresh in changes:
            if what == "refresh":
                self.deadlines[lease_id] = [now + ttl, ttl, refresh]
            else:
                self.deadlines.pop(lease_id, None)

    def promote(self, now: float, grace: float) -> None:
        """Becoming leader: no lease is due sooner than `grace` from now (or its ttl)."""
        for entry in self.deadlines.values():
            entry[0] = max(entry[0], now + min(grace, entry[1]))

    def due(self, now: float, limit: int) -> list[tuple[int, int]]:
        out = []
        for lease_id, (deadline, _, refresh) in self.deadlines.items():
            if deadline <= now:
                out.append((lease_id, refresh))
                if len(out) >= limit:
                    break
        return out

    def ttl_left(self, lease_id: int, now: float, granted: int) -> int:
        entry = self.deadlines.get(lease_id)
        if entry is None:
            return granted
        return max(0, min(granted, math.ceil(entry[0] - now)))

    def _check(self) -> None:
        for deadline, ttl, refresh in self.deadlines.values():
            assert ttl >= 1 and refresh >= 0


def _txn_result(result: dict) -> TxnResult:
    responses = []
    for response in result.get("responses") or []:
        op = response.get("op")
        if op == "get":
            items = [kv_from_dict(d) for d in response.get("items") or []]
            responses.append(RangeResult(revision=result["revision"], items=items, more=bool(response.get("more")),
                                         count=int(response.get("count", len(items)))))  # fmt: skip
        elif op == "put":
            prev = response.get("prev")
            responses.append(PutResult(revision=response["revision"], created=bool(response.get("created")),
                                       prev=kv_from_dict(prev) if prev else None))  # fmt: skip
        elif op == "delete":
            responses.append(DeleteResult(revision=response["revision"], deleted=int(response["deleted"]),
                                          prev=[kv_from_dict(d) for d in response.get("prev") or []]))  # fmt: skip
        else:
            responses.append(_txn_result(response))
    return TxnResult(succeeded=bool(result["succeeded"]), revision=int(result["revision"]), responses=responses)
