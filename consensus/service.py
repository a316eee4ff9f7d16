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
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import threading
import uuid
from typing import Any

from api.service import (
    DeleteResult,
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
from .state_machine import KVStateMachine, StateMachineLimits, kv_from_dict, make_barrier, make_delete, make_put

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
    # Back-off between retries of a write that was not applied (no leader yet, ...).
    retry_backoff_min_s: float = 0.02
    retry_backoff_max_s: float = 0.5
    # The longest a request may ask to wait.
    max_timeout_s: float = 300.0
    # Range reads up to this many items run on the event loop; longer ones on a thread.
    inline_range_limit: int = 256


def create_service(
    config: NodeConfig,
    *,
    raft_options: RaftOptions | None = None,
    limits: ServiceLimits | None = None,
    state_machine_limits: StateMachineLimits | None = None,
) -> "ConsensusService":
    """The entry point the HTTP layer and CLI call. Nothing starts until `start()`."""
    return ConsensusService(config, raft_options=raft_options, limits=limits, state_machine_limits=state_machine_limits)


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
        self._barrier = ReadBarrier(self._propose_barrier)
        routes = dict(config.peer_routes)
        me = config.self_member
        peers = [Peer(m.id, m.peer_address, routes.get(m.id)) for m in config.members if m.id != me.id]
        try:
            self._raft = self._new_raft_node(me, peers)
        except BaseException:
            self._engine.close()
            raise
        self._started = True

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
            return f"{self.node_id}:{uuid.uuid4().hex}"
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

    def _slot(self, deadline: float):
        service = self

        class _Slot:
            async def __aenter__(self):
                if not service._slots.locked():
                    await service._slots.acquire()  # free slot: does not wait
                    return
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(service._slots.acquire(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise Unavailable("too many requests in flight on this node", reason="overloaded") from None

            async def __aexit__(self, *exc):
                service._slots.release()

        return _Slot()

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
        if error == "replica_failed":
            raise Unavailable(message, reason="replica_failed")
        if error.startswith("invalid_") or error in ("too_many_keys", "unsupported_command_version"):
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
        for member in self.config.members:
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
            }
        )
        for key, value in raft.stats().items():
            out[f"raft_{key}"] = float(value)
        return out

    # --- extras beyond the CPService protocol ---------------------------------------------

    def force_snapshot(self) -> None:
        """Ask pysyncobj to compact its log now (tests, operators)."""
        self._raft.force_snapshot()

    @property
    def state_machine(self) -> KVStateMachine:
        return self._sm
