"""The request coordinator: any node runs it for the requests it receives (Dynamo §4.5).

Phases, as Riak's put and get FSMs name them:

put/delete: *prepare* (preference list, minus down primaries, plus one fallback per down
primary when sloppy quorum is on), *version* (one replica, this node when it is a
target, mints the new version; `Replica.coordinate`), *execute* (send the version to the
other targets in parallel; a target that fails is replaced by the next up fallback with a
hint naming the primary), *wait* for W acks or the deadline, answer, and let the
remaining sends finish in the background (bounded by the request's deadline).

get: *prepare* as above, ask all targets, *wait* for R replies (not-found counts),
reconcile them (`versions.merge_all`), answer, then *read repair* in the background:
wait up to `read_repair_wait_s` for the other replies and send the reconciled object to
every primary that answered something else. At most `max_read_repairs` repairs run at
once; a read that finds them all busy skips its repair (counted).

range: a coverage read: ask every up node for its keys under the prefix, merge per key,
and say `partial` when some ring arc had none of its N replicas answer.

Time: deadlines use the event loop's clock (virtual in the simulator); version timestamps
use `wall_clock()`, passed in.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable, Protocol

from api.service import InvalidRequest, Unavailable

from . import versions
from .membership import FailureDetector
from .quorum import ReadTally, Target, WriteTally, next_fallback, plan_targets
from .ring import Ring
from .transport import PeerUnreachable, RemoteError, b64, unb64
from .vclock import VClock
from .versions import VersionedObject

Call = Callable[[str, str, dict, float], Awaitable[dict]]


class LocalReplica(Protocol):
    """This node's own replica, called directly when it is one of a request's targets:
    the same work as the peer methods `coordinate` and `fetch`, without building and
    parsing a message (JSON, base64, an encode and a decode of the object). Refusals are
    `RemoteError`s, exactly as a peer would send them."""

    async def coordinate(
        self, key: bytes, value: bytes | None, context: VClock, *, hint_for: str | None, now: float
    ) -> tuple[VersionedObject, bytes]:
        """Mint and store the new version; returns it and its encoding (as stored)."""

    def fetch_encoded(self, key: bytes) -> bytes | None:
        """The stored object's encoding, or None."""


# A coverage read pages through the nodes at most this many times (deleted keys and
# truncated pages cost rounds); what it has then is returned.
MAX_RANGE_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class CoordinatorLimits:
    # One peer call never waits longer than this, so a paused node costs at most this much
    # before its fallback is tried (the request's own timeout still bounds the whole).
    peer_timeout_s: float = 1.0
    # After answering a read, how long to wait for the other replicas before repairing.
    read_repair_wait_s: float = 1.0
    # Concurrent read repairs; more are skipped (and counted) rather than queued.
    max_read_repairs: int = 32
    # Writes still sending to their last replicas after answering the client.
    max_background_writes: int = 1024


async def _wait_until(event: asyncio.Event, deadline: float) -> None:
    """Wait for `event` until the loop time `deadline`. (asyncio.timeout, unlike
    wait_for, makes no extra task: this runs once per client request.)"""
    if event.is_set():
        return
    try:
        async with asyncio.timeout_at(deadline):
            await event.wait()
    except TimeoutError:
        pass


class Coordinator:
    def __init__(
        self,
        self_id: str,
        *,
        ring: Callable[[], Ring],
        n: int,
        detector: FailureDetector,
        call: Call,
        wall_clock: Callable[[], float],
        sloppy: bool = True,
        lww: bool = False,
        limits: CoordinatorLimits = CoordinatorLimits(),
        metrics: dict | None = None,
        previous_ring: Callable[[], Ring | None] = lambda: None,
        local: LocalReplica | None = None,
    ):
        self.self_id = self_id
        self.ring = ring
        # While data moves after a ring change, the ring before it: reads also ask the key's
        # old primaries, so a key not yet streamed to its new owners is still found.
        self.previous_ring = previous_ring
        self.n = n
        self.detector = detector
        self._call = call
        self.wall_clock = wall_clock
        self.sloppy = sloppy
        self.lww = lww
        self.limits = limits
        self.metrics = metrics if metrics is not None else {}
        self.local = local
        self._background: set[asyncio.Task] = set()
        self._repairs_running = 0
        self._closed = False

    # --- helpers -------------------------------------------------------------------------
    def _count(self, name: str, by: float = 1) -> None:
        self.metrics[name] = self.metrics.get(name, 0) + by

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _rpc_timeout(self, deadline: float) -> float:
        return max(0.0, min(self.limits.peer_timeout_s, deadline - self._now()))

    async def call(self, node: str, method: str, payload: dict, deadline: float) -> dict:
        """One peer call that feeds the failure detector."""
        timeout = self._rpc_timeout(deadline)
        if timeout <= 0:
            raise PeerUnreachable("request deadline passed")
        started = self._now()
        try:
            reply = await self._call(node, method, payload, timeout)
        except PeerUnreachable:
            # A refusal, or a timeout with the full per-peer budget, says the peer is in
            # trouble; running out of a short client deadline says nothing about it.
            quick = self._now() - started < 0.9 * timeout
            if quick or timeout >= self.limits.peer_timeout_s:
                self.detector.record_failure(node, self._now())
            raise
        self.detector.record_success(node, self._now())
        return reply

    async def _coordinate_here(self, key: bytes, value: bytes | None, context: VClock, hint_for, now: float, deadline: float):
        """`coordinate` on this node's replica (`LocalReplica`), bounded and fed to the
        failure detector as `call` is."""
        timeout = self._rpc_timeout(deadline)
        if timeout <= 0:
            raise PeerUnreachable("request deadline passed")
        try:
            async with asyncio.timeout(timeout):
                result = await self.local.coordinate(key, value, context, hint_for=hint_for, now=now)
        except TimeoutError:
            if timeout >= self.limits.peer_timeout_s:
                self.detector.record_failure(self.self_id, self._now())
            raise PeerUnreachable("local replica timed out") from None
        self.detector.record_success(self.self_id, self._now())
        return result

    def _prepare(self, key: bytes):
        preference, fallbacks = self.ring().placement(key, self.n)
        targets = plan_targets(preference, fallbacks, up=self.detector.up(), sloppy=self.sloppy)
        return preference, fallbacks, targets

    def _replacement(self, failed: Target, fallbacks: list[str], used: set[str]) -> Target | None:
        if not self.sloppy:
            return None
        node = next_fallback(fallbacks, used, self.detector.up())
        if node is None:
            return None
        used.add(node)
        return Target(node, failed.hint_for or failed.node)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- writes --------------------------------------------------------------------------
    async def write(self, key: bytes, value: bytes | None, context: VClock, *, w: int, timeout: float) -> VersionedObject:
        """Coordinate a put (value) or delete (None); returns the new version after W acks."""
        self._check_quorum("w", w)
        deadline = self._now() + timeout
        _, fallbacks, targets = self._prepare(key)
        if len(targets) < w:  # fail before anything is written: definitely not applied
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(targets)} replicas are reachable for this key; the write needs {w}", wanted=w, reachable=len(targets)
            )
        used = {t.node for t in targets}
        tally = WriteTally(w, planned=len(targets))
        pending = sorted(targets, key=lambda t: t.node != self.self_id)  # version here when possible
        now = self.wall_clock()
        payload = None
        obj = None
        encoded = None  # the versioning replica's encoding of obj (base64), sent on as it is
        while pending and obj is None:
            target = pending.pop(0)
            try:
                if target.node == self.self_id and self.local is not None:
                    obj, raw = await self._coordinate_here(key, value, context, target.hint_for, now, deadline)
                    encoded = b64(raw)
                else:
                    if payload is None:
                        payload = {"key": b64(key), "value": None if value is None else b64(value), "context": context.counters(), "timestamp": now}
                    reply = await self.call(target.node, "coordinate", {**payload, "hint_for": target.hint_for}, deadline)
                    encoded = reply["object"]
                    obj = versions.decode_object(unb64(encoded))
                tally.ack(target.node)
            except (PeerUnreachable, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code == "too_many_siblings":
                    self._count("writes_refused_siblings")
                    raise Unavailable(exc.message, code="too_many_siblings") from None
                tally.fail(target.node)
                replacement = self._replacement(target, fallbacks, used)
                if replacement is not None:
                    tally.add_replacement()
                    pending.append(replacement)
        if obj is None:
            self._count("quorum_failures")
            raise Unavailable(
                f"no replica could take the write (wanted {w} acknowledgements, got 0)", wanted=w, acknowledged=0
            )
        if pending:
            settled = asyncio.Event()
            if tally.done:
                settled.set()
            store = {"key": b64(key), "object": encoded}
            # Over the cap, this write keeps its client waiting for all its sends
            # (back-pressure) instead of leaving more work running in the background.
            capped = len(self._background) >= self.limits.max_background_writes
            if capped:
                self._count("background_writes_capped")
            sends = [self._spawn(self._replicate(store, target, tally, fallbacks, used, deadline, settled)) for target in pending]
            if not tally.done:
                await _wait_until(settled, deadline)
            if capped and deadline > self._now():
                await asyncio.wait(sends, timeout=deadline - self._now())
        if not tally.ok:
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(tally.acked)} of the {w} replicas needed acknowledged in time; the write may show up later",
                wanted=w,
                acknowledged=len(tally.acked),
            )
        return obj

    async def _replicate(self, store: dict, target: Target, tally: WriteTally, fallbacks, used, deadline, settled) -> None:
        while target is not None:
            try:
                await self.call(target.node, "store", {**store, "hint_for": target.hint_for}, deadline)
                tally.ack(target.node)
                if target.hint_for:
                    self._count("hinted_writes")
                target = None
            except (PeerUnreachable, RemoteError):
                tally.fail(target.node)
                target = self._replacement(target, fallbacks, used) if self._now() < deadline else None
                if target is not None:
                    tally.add_replacement()
            if tally.done:
                settled.set()
        if tally.done:
            settled.set()

    # --- reads ---------------------------------------------------------------------------
    async def read(self, key: bytes, *, r: int, timeout: float) -> VersionedObject | None:
        """The reconciled object from at least R replicas (None: no replica has the key)."""
        self._check_quorum("r", r)
        deadline = self._now() + timeout
        _, fallbacks, targets = self._prepare(key)
        if len(targets) < r:
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(targets)} replicas are reachable for this key; the read needs {r}", wanted=r, reachable=len(targets)
            )
        used = {t.node for t in targets}
        old_owners = self._old_owners(key, used)
        if old_owners:
            # Handover: ask the old primaries too and wait for every answer (a new owner's
            # not-found must not make the quorum before the old owner's copy arrives).
            self._count("handover_reads")
            targets = targets + [Target(node) for node in old_owners]
            used |= set(old_owners)
        tally = ReadTally(r, len(targets), lww=self.lww, wait_all=bool(old_owners))
        settled = asyncio.Event()
        if tally.done:
            settled.set()
        fallback_nodes: set[str] = {t.node for t in targets if t.hint_for} | set(old_owners)
        tasks = []
        for target in targets:
            if target.node == self.self_id and self.local is not None and self._fetch_here(key, tally):
                continue
            tasks.append(asyncio.ensure_future(self._fetch(key, target, tally, fallbacks, used, fallback_nodes, deadline, settled)))
        if not tally.done:
            await _wait_until(settled, deadline)
        if not tally.ok:
            for task in tasks:
                task.cancel()
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(tally.replies)} of the {r} replicas needed answered in time", wanted=r, answered=len(tally.replies)
            )
        merged = tally.reconciled()
        if merged is not None:
            self._count("siblings_seen", len(merged.live_values))
            self._count("reads_with_siblings", len(merged.live_values) > 1)
        self._watch_read_repair(key, tally, tasks, fallback_nodes, deadline)
        return merged

    def _old_owners(self, key: bytes, used: set[str]) -> list[str]:
        previous = self.previous_ring()
        if previous is None:
            return []
        up = self.detector.up()
        return [node for node in previous.preference_list(key, self.n) if node not in used and node in up]

    def _fetch_here(self, key: bytes, tally: ReadTally) -> bool:
        """Read this node's copy in line (no task, no message); False when that failed
        (the caller then asks through `call`, which counts the failure and replaces it)."""
        try:
            tally.reply_encoded(self.self_id, self.local.fetch_encoded(key))
        except (RemoteError, ValueError):
            return False
        return True

    async def _fetch(self, key, target, tally, fallbacks, used, fallback_nodes, deadline, settled) -> None:
        while target is not None:
            try:
                reply = await self.call(target.node, "fetch", {"key": b64(key)}, deadline)
                raw = reply.get("object")
                # a copy that does not decode counts as a failed replica (ValueError)
                tally.reply_encoded(target.node, None if raw is None else unb64(raw))
                target = None
            except (PeerUnreachable, RemoteError, ValueError):
                tally.fail(target.node)
                target = self._replacement(target, fallbacks, used) if self._now() < deadline else None
                if target is not None:
                    fallback_nodes.add(target.node)
                    tally.add_replacement()
            if tally.done:
                settled.set()

    def _watch_read_repair(self, key, tally: ReadTally, tasks, fallback_nodes, deadline) -> None:
        """Read repair, once the replicas still asked have answered or `read_repair_wait_s`
        has passed (then they are cancelled): done callbacks and one timer, not a task per
        read; a repair runs as a task only when some replica is stale."""
        pending = [task for task in tasks if not task.done()]
        wait = min(self.limits.read_repair_wait_s, max(0.0, deadline - self._now()))
        if pending and wait <= 0:
            for task in pending:
                task.cancel()
        if not pending or wait <= 0:
            self._start_read_repair(key, tally, fallback_nodes)
            return
        left = len(pending)

        def answered(_task) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                timer.cancel()
                self._start_read_repair(key, tally, fallback_nodes)

        def give_up() -> None:
            for task in pending:
                task.cancel()  # each one's callback still runs, the last starts the repair

        timer = asyncio.get_running_loop().call_later(wait, give_up)
        for task in pending:
            task.add_done_callback(answered)

    def _start_read_repair(self, key: bytes, tally: ReadTally, fallback_nodes) -> None:
        if self._closed:
            return
        stale = tally.repairs(exclude=fallback_nodes)
        if not stale:
            return
        if self._repairs_running >= self.limits.max_read_repairs:
            self._count("read_repairs_skipped", len(stale))
            return
        self._repairs_running += 1  # here, not in the task: the cap holds at once
        self._spawn(self._read_repair(key, tally.reconciled(), stale))

    async def _read_repair(self, key: bytes, merged: VersionedObject, stale: list[str]) -> None:
        try:
            store = {"key": b64(key), "object": b64(versions.encode_object(merged)), "hint_for": None}
            repair_deadline = self._now() + self.limits.peer_timeout_s
            results = await asyncio.gather(
                *(self.call(node, "store", store, repair_deadline) for node in stale), return_exceptions=True
            )
            self._count("read_repairs", sum(1 for result in results if not isinstance(result, BaseException)))
        finally:
            self._repairs_running -= 1

    # --- coverage reads -------------------------------------------------------------------
    async def range(self, prefix: bytes, *, limit: int, timeout: float) -> tuple[list[tuple[bytes, VersionedObject]], bool]:
        """Up to `limit` live keys under `prefix`, in key order, and whether some ring arc had
        no replica answering. Pages through the nodes (at most `MAX_RANGE_ROUNDS` rounds)
        so deleted keys do not eat the limit."""
        deadline = self._now() + timeout
        ring = self.ring()
        up = self.detector.up()
        asking = [node for node in ring.nodes if node in up]
        out: list[tuple[bytes, VersionedObject]] = []
        cursor: bytes | None = None
        for _ in range(MAX_RANGE_ROUNDS):
            payload = {"prefix": b64(prefix), "limit": limit, "start_after": None if cursor is None else b64(cursor)}
            results = await asyncio.gather(*(self.call(node, "scan", payload, deadline) for node in asking), return_exceptions=True)
            merged: dict[bytes, VersionedObject | None] = {}
            bound: bytes | None = None  # keys above the smallest truncated page are not complete yet
            answered = []
            for node, result in zip(asking, results):
                if isinstance(result, BaseException):
                    continue
                answered.append(node)
                items = [(unb64(k), versions.decode_object(unb64(o))) for k, o in result["items"]]
                for key, obj in items:
                    merged[key] = versions.merge(merged.get(key), obj, lww=self.lww)
                if result.get("more") and items:
                    bound = items[-1][0] if bound is None else min(bound, items[-1][0])
            asking = answered
            for key in sorted(k for k in merged if bound is None or k <= bound):
                if not merged[key].is_deleted:
                    out.append((key, merged[key]))
            if len(out) >= limit or bound is None or not asking:
                break
            cursor = bound
        answered_all = set(asking)
        partial = any(not (set(replicas) & answered_all) for replicas in ring.replica_sets(self.n))
        return out[:limit], partial

    def _check_quorum(self, name: str, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.n:
            raise InvalidRequest(f"{name} must be between 1 and N={self.n}, not {value!r}", code="invalid_quorum")
