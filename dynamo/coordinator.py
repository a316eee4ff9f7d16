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
# The same call as a future (`transport.start_call`): no task when the transport can send
# at once; cancelling the future abandons the call.
StartCall = Callable[[str, str, dict, float], "asyncio.Future[dict]"]


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


async def _wait_until(done: asyncio.Future, deadline: float) -> None:
    """Wait for the future `done` until the loop time `deadline`. (One timer and the
    future: no task, no Event and its waiter future, no Timeout context; this runs once
    per client request.)"""
    if done.done():
        return
    timer = asyncio.get_running_loop().call_at(deadline, _settle, done)
    try:
        await done
    finally:
        timer.cancel()


def _settle(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


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
        start_call: StartCall | None = None,
    ):
        self.self_id = self_id
        self.ring = ring
        # While data moves after a ring change, the ring before it: reads also ask the key's
        # old primaries, so a key not yet streamed to its new owners is still found.
        self.previous_ring = previous_ring
        self.n = n
        self.detector = detector
        self._call = call
        self._start_call = start_call or (lambda *args: asyncio.ensure_future(call(*args)))
        self.wall_clock = wall_clock
        self.sloppy = sloppy
        self.lww = lww
        self.limits = limits
        self.metrics = metrics if metrics is not None else {}
        self.local = local
        self._background: set[asyncio.Task] = set()
        # Replica sends (writes) and fetches (reads) in flight, as futures with callbacks
        # (no task each); close() cancels them.
        self._in_flight: set[asyncio.Future] = set()
        self._sends_in_flight = 0  # of which write sends (bounded by max_background_writes)
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

    def _begin(
        self, node: str, method: str, payload: dict, deadline: float, answered: Callable[[asyncio.Future], None]
    ) -> asyncio.Future:
        """`call` as a future, for the fan-out of a request: `answered(future)` runs once it
        is done (a reply, an exception, or cancelled), after the failure detector heard of
        it as with `call`. One callback per replica asked instead of a task."""
        timeout = self._rpc_timeout(deadline)
        if timeout <= 0:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(PeerUnreachable("request deadline passed"))
        else:
            future = self._start_call(node, method, payload, timeout)
            self._in_flight.add(future)
        future.add_done_callback(_Answered(self, node, self._now(), timeout, answered))
        return future

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
        for future in list(self._in_flight):
            future.cancel()
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
            settled = asyncio.get_running_loop().create_future()
            if tally.done:
                settled.set_result(None)
            # Over the cap, this write keeps its client waiting for all its sends
            # (back-pressure) instead of leaving more work running in the background.
            capped = self._sends_in_flight >= self.limits.max_background_writes
            if capped:
                self._count("background_writes_capped")
            sends = _Sends(self, {"key": b64(key), "object": encoded}, tally, fallbacks, used, deadline, settled)
            for target in pending:
                sends.send(target)
            if not tally.done:
                await _wait_until(settled, deadline)
            if capped and sends.left:
                await _wait_until(sends.finished, deadline)
        if not tally.ok:
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(tally.acked)} of the {w} replicas needed acknowledged in time; the write may show up later",
                wanted=w,
                acknowledged=len(tally.acked),
            )
        return obj

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
        settled = asyncio.get_running_loop().create_future()
        if tally.done:
            settled.set_result(None)
        fallback_nodes: set[str] = {t.node for t in targets if t.hint_for} | set(old_owners)
        fetches = _Fetches(self, key, tally, fallbacks, used, fallback_nodes, deadline, settled)
        for target in targets:
            if target.node == self.self_id and self.local is not None and self._fetch_here(key, tally):
                continue
            fetches.ask(target)
        if not tally.done:
            await _wait_until(settled, deadline)
        if not tally.ok:
            fetches.cancel()
            self._count("quorum_failures")
            raise Unavailable(
                f"only {len(tally.replies)} of the {r} replicas needed answered in time", wanted=r, answered=len(tally.replies)
            )
        merged = tally.reconciled()
        if merged is not None:
            self._count("siblings_seen", len(merged.live_values))
            self._count("reads_with_siblings", len(merged.live_values) > 1)
        fetches.then_read_repair()
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


class _Answered:
    """A `_begin` call is done: feed the failure detector as `Coordinator.call` does (a
    success; a refusal says nothing; `PeerUnreachable` counts when it came quickly or with
    the whole per-peer budget: running out of a short client deadline says nothing about
    the peer), then hand the future to the request's callback."""

    __slots__ = ("coordinator", "node", "started", "timeout", "answered")

    def __init__(self, coordinator: Coordinator, node: str, started: float, timeout: float, answered):
        self.coordinator, self.node, self.started, self.timeout = coordinator, node, started, timeout
        self.answered = answered

    def __call__(self, future: asyncio.Future) -> None:
        coordinator = self.coordinator
        coordinator._in_flight.discard(future)
        if not future.cancelled():
            error = future.exception()
            now = coordinator._now()
            if error is None:
                coordinator.detector.record_success(self.node, now)
            elif isinstance(error, PeerUnreachable):
                quick = now - self.started < 0.9 * self.timeout
                if quick or self.timeout >= coordinator.limits.peer_timeout_s:
                    coordinator.detector.record_failure(self.node, now)
        self.answered(future)


class _Sends:
    """The execute phase of one write: the version goes to each other target; a target that
    fails is replaced by the next unused up fallback (while the deadline allows); `settled`
    is set once the tally is done, `finished` once no send is left. Callbacks, no tasks."""

    __slots__ = ("coordinator", "store", "tally", "fallbacks", "used", "deadline", "settled", "left", "_finished")

    def __init__(self, coordinator: Coordinator, store: dict, tally: WriteTally, fallbacks, used, deadline: float, settled):
        self.coordinator, self.store, self.tally = coordinator, store, tally
        self.fallbacks, self.used, self.deadline, self.settled = fallbacks, used, deadline, settled
        self.left = 0
        self._finished: asyncio.Future | None = None

    @property
    def finished(self) -> asyncio.Future:
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
            if not self.left:
                self._finished.set_result(None)
        return self._finished

    def send(self, target: Target) -> None:
        self.left += 1
        self.coordinator._sends_in_flight += 1
        self.coordinator._begin(
            target.node, "store", {**self.store, "hint_for": target.hint_for}, self.deadline,
            lambda future: self._answered(target, future),
        )

    def _answered(self, target: Target, future: asyncio.Future) -> None:
        self.left -= 1
        self.coordinator._sends_in_flight -= 1
        coordinator, tally = self.coordinator, self.tally
        if not future.cancelled():
            if future.exception() is None:
                tally.ack(target.node)
                if target.hint_for:
                    coordinator._count("hinted_writes")
            else:  # PeerUnreachable, RemoteError (or a failure of our own): that replica failed
                tally.fail(target.node)
                if coordinator._now() < self.deadline:
                    replacement = coordinator._replacement(target, self.fallbacks, self.used)
                    if replacement is not None:
                        tally.add_replacement()
                        self.send(replacement)
        if tally.done:
            _settle(self.settled)
        if not self.left and self._finished is not None:
            _settle(self._finished)


class _Fetches:
    """The replica reads of one get: each target is asked for its copy; a target that fails
    is replaced by the next unused up fallback (while the deadline allows); `settled` is set
    once the tally is done. After the answer, `then_read_repair` waits (callbacks and one
    timer, no task) for the replicas still asked, at most `read_repair_wait_s`, then
    repairs; a repair runs as a task only when some replica is stale."""

    __slots__ = ("coordinator", "key", "payload", "tally", "fallbacks", "used", "fallback_nodes", "deadline", "settled",
                 "asked", "_when_all", "_timer")

    def __init__(self, coordinator: Coordinator, key: bytes, tally: ReadTally, fallbacks, used, fallback_nodes, deadline, settled):
        self.coordinator, self.key, self.tally = coordinator, key, tally
        self.payload = {"key": b64(key)}
        self.fallbacks, self.used, self.fallback_nodes = fallbacks, used, fallback_nodes
        self.deadline, self.settled = deadline, settled
        self.asked: set[asyncio.Future] = set()
        self._when_all = None
        self._timer: asyncio.TimerHandle | None = None

    def ask(self, target: Target) -> None:
        future = self.coordinator._begin(
            target.node, "fetch", self.payload, self.deadline, lambda future: self._answered(target, future)
        )
        self.asked.add(future)

    def _answered(self, target: Target, future: asyncio.Future) -> None:
        self.asked.discard(future)
        coordinator, tally = self.coordinator, self.tally
        if not future.cancelled():
            failed = future.exception() is not None  # PeerUnreachable, RemoteError
            if not failed:
                raw = future.result().get("object")
                try:
                    tally.reply_encoded(target.node, None if raw is None else unb64(raw))
                except (ValueError, TypeError):  # a copy that does not decode: a failed replica
                    failed = True
            if failed:
                tally.fail(target.node)
                if coordinator._now() < self.deadline:
                    replacement = coordinator._replacement(target, self.fallbacks, self.used)
                    if replacement is not None:
                        self.fallback_nodes.add(replacement.node)
                        tally.add_replacement()
                        self.ask(replacement)
            if tally.done:
                _settle(self.settled)
        if not self.asked and self._when_all is not None:
            when_all, self._when_all = self._when_all, None
            if self._timer is not None:
                self._timer.cancel()
            when_all()

    def cancel(self) -> None:
        for future in list(self.asked):
            future.cancel()

    def then_read_repair(self) -> None:
        coordinator = self.coordinator
        start = lambda: coordinator._start_read_repair(self.key, self.tally, self.fallback_nodes)  # noqa: E731
        wait = min(coordinator.limits.read_repair_wait_s, max(0.0, self.deadline - coordinator._now()))
        if self.asked and wait <= 0:
            self.cancel()  # each one's callback still runs
        if not self.asked:
            start()
            return
        self._when_all = start
        # Give up on the slow ones: cancelling them runs their callbacks; the last starts the repair.
        self._timer = asyncio.get_running_loop().call_later(wait, self.cancel)
