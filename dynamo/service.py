"""`APService`: the ap mode behind the HTTP API (api/service.py is the contract).

    service = create_service(NodeConfig(node_id="n1", members=..., secret=..., data_dir=...))
    await service.start()          # opens the engine, serves peers on the peer address
    ctx = await service.put(b"k", b"v")
    read = await service.get(b"k")  # APRead(key, siblings=[b"v"], context=...)
    await service.stop()

One node = a `Replica` (its data, in an engine), a `Coordinator` (the requests it
receives), a `FailureDetector`, a `PeerServer` for the other nodes' calls, and two
background loops: probes of peers that failed, and hinted handoff (replay at a bounded
rate to owners that answer again; expire hints older than their age limit).

Extras beyond the protocol (used by tests and, if wanted, an internal route):
`local_get(key)` reads this node's replica alone (no quorum, no repair);
`handle(method, payload)` is the peer RPC entry point; `metrics()` also reports per-node
hint counts. `request_id` is accepted and ignored: a retried put without context at worst
adds a sibling holding the same bytes, which reads show once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from typing import Callable

from api.service import APRead, InvalidRequest, Member, NodeConfig, NotFound, Unavailable, ValueTooLarge
from engines import open_engine

from . import versions
from .antientropy import INTERVAL_ENV, AntiEntropy, AntiEntropyOptions, TreeSet
from .coordinator import Coordinator, CoordinatorLimits
from .hints import HintPolicy, HintsFull
from .gossip import GossipPolicy, GossipState
from .membership import RING_FILE, CombinedDetector, FailureDetector, load_ring, save_ring
from .node import Replica, ReplicaLimits, TooManySiblings
from .ring import Ring
from .tombstones import GRACE_ENV, Reaper, ReapPolicy, TombstoneIndex, tombstone_time
from .framed import StreamTransport
from .transport import HttpTransport, PeerServer, PeerUnreachable, RemoteError, Transport, b64, start_call, unb64
from .vclock import PrunePolicy, VClock, decode_context, encode_context


@dataclasses.dataclass(frozen=True)
class APOptions:
    """Every limit and period of the ap mode, in one place."""

    prune: PrunePolicy = PrunePolicy()
    hints: HintPolicy = HintPolicy()
    replica: ReplicaLimits = ReplicaLimits()
    coordinator: CoordinatorLimits = CoordinatorLimits()
    probe_interval_s: float = 0.5  # how often a failed peer is asked whether it is back
    down_after: int = 3  # failures in a row before suspect becomes down
    handoff_interval_s: float = 0.5  # how often pending hints are looked at
    hint_expiry_interval_s: float = 60.0
    max_range_limit: int = 10_000  # keys one coverage read returns at most
    anti_entropy: AntiEntropyOptions = AntiEntropyOptions()
    gossip: GossipPolicy = GossipPolicy()
    # After a ring change a node reports its transfers done ("rebalanced through V", by
    # gossip) only after a pass that found nothing left to send, started at least this long
    # after the change: a write an old-ring coordinator sent here before it learned of
    # the change has landed (or timed out: the default client timeout is 5 s) by then.
    # Reads ask the old primaries too until every node of the old ring reports V done.
    handover_s: float = 5.0
    # A removed node that has not reported yet is asked every gossip round; after this many
    # rounds in a row without an answer it is taken for dead (removing a dead node is how a
    # failed machine is replaced) and the handover stops waiting for it: what it alone held
    # (writes acknowledged by it and nobody else) is lost, as with Riak's force-remove.
    # Should it come back, it still streams its keys to their new owners.
    departed_down_after: int = 6
    rebalance_retry_s: float = 1.0  # pause between rebalancing passes that left keys behind
    tombstones: ReapPolicy = ReapPolicy()

    def __post_init__(self) -> None:
        # No hint may carry a value past the grace of a tombstone that deleted it: a hint
        # lives at most max_age_s, plus up to one expiry period before expire() runs.
        if not self.tombstones.grace_s > self.hints.max_age_s + self.hint_expiry_interval_s:
            raise ValueError(
                f"the tombstone grace period ({self.tombstones.grace_s} s) must exceed the hint age limit plus "
                f"the hint expiry period ({self.hints.max_age_s} + {self.hint_expiry_interval_s} s)"
            )


# A finished rebalance is announced to every member, with this many rounds of retries.
ANNOUNCE_ATTEMPTS = 30
# Joining through another node (NodeConfig.join): attempts and the pause between them.
JOIN_ATTEMPTS = 20
JOIN_RETRY_S = 0.5


def with_tombstone_grace(options: APOptions, grace_s: float) -> APOptions:
    """`options` with tombstones reaped after `grace_s`; a grace shorter than the hint age
    limit plus the expiry period shortens both (to 1/2 and 1/4 of the grace), so the
    invariant of `APOptions` holds, and a pass runs at least once per grace period."""
    if not grace_s > 0:
        raise ValueError(f"{GRACE_ENV} must be a positive number of seconds, not {grace_s!r}")
    hints, expiry = options.hints, options.hint_expiry_interval_s
    if grace_s <= hints.max_age_s + expiry:
        hints = dataclasses.replace(hints, max_age_s=min(hints.max_age_s, grace_s / 2))
        expiry = min(expiry, grace_s / 4)
    policy = dataclasses.replace(options.tombstones, grace_s=grace_s, interval_s=min(options.tombstones.interval_s, grace_s))
    return dataclasses.replace(options, hints=hints, hint_expiry_interval_s=expiry, tombstones=policy)


def create_service(config: NodeConfig, **kwargs) -> "DynamoService":
    """Build the ap service. The environment variable `CAPKV_AAE_INTERVAL_S` sets the
    anti-entropy period in seconds (e.g. "1" in tests), or turns it off ("off"), and
    `CAPKV_TOMBSTONE_GRACE_S` the tombstone grace period (default 10 days): there is no
    serve flag for either."""
    grace = os.environ.get(GRACE_ENV)
    if grace:
        try:
            seconds = float(grace)
        except ValueError:
            raise ValueError(f"{GRACE_ENV} must be a positive number of seconds, not {grace!r}") from None
        kwargs["options"] = with_tombstone_grace(kwargs.get("options", APOptions()), seconds)
    env = os.environ.get(INTERVAL_ENV)
    if env:
        options = kwargs.get("options", APOptions())
        if env.strip().lower() in ("off", "0", "false", "no"):
            aae = dataclasses.replace(options.anti_entropy, enabled=False)
        else:
            try:
                aae = dataclasses.replace(options.anti_entropy, interval_s=float(env))
            except ValueError:
                raise ValueError(f"{INTERVAL_ENV} must be a positive number of seconds or 'off', not {env!r}") from None
        kwargs["options"] = dataclasses.replace(options, anti_entropy=aae)
    return DynamoService(config, **kwargs)


# What a replica's work may raise that a peer gets as a refusal (`DynamoService._refusal`)
# rather than as a failure of this node.
_REFUSED = (TooManySiblings, HintsFull, KeyError, TypeError, ValueError)


class _ReplicaHere:
    """`coordinator.LocalReplica` over this node's `Replica`: what `handle` does for the
    peer methods `coordinate` and `fetch`, with the same checks and refusals, for the
    requests this node coordinates itself (no message built, no base64, no re-decode)."""

    def __init__(self, service: "DynamoService"):
        self.service = service

    async def coordinate(self, key: bytes, value: bytes | None, context: VClock, *, hint_for: str | None, now: float):
        return await self.service._coordinate_here(key, value, context, hint_for=hint_for, now=now)

    def fetch_encoded(self, key: bytes) -> bytes | None:
        return self.service._serving_replica().fetch_encoded(key)


def _validate(config: NodeConfig) -> None:
    if not 1 <= config.replicas:
        raise ValueError(f"replicas (N) must be at least 1, not {config.replicas}")
    for name in ("read_quorum", "write_quorum"):
        value = getattr(config, name)
        if not 1 <= value <= config.replicas:
            raise ValueError(f"{name} must be between 1 and N={config.replicas}, not {value}")
    if config.conflicts not in ("vclock", "lww"):
        raise ValueError(f"conflicts must be vclock or lww, not {config.conflicts!r}")
    if not config.secret:
        raise ValueError("the ap mode needs a cluster secret for peer traffic")
    ids = [m.id for m in config.members]
    if len(ids) != len(set(ids)) or config.node_id not in ids:
        raise ValueError("members must have distinct ids and include this node")


class DynamoService:
    mode = "ap"

    def __init__(
        self,
        config: NodeConfig,
        *,
        transport: Transport | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        options: APOptions = APOptions(),
        engine=None,
    ):
        _validate(config)
        self.config = config
        self.node_id = config.node_id
        self.options = options
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.members: dict[str, Member] = {m.id: m for m in config.members}
        self._ring = Ring(self.members, config.vnodes)
        self._external_transport = transport
        self._engine = engine
        self.transport: Transport | None = None
        self.replica: Replica | None = None
        self.coordinator: Coordinator | None = None
        self._server: PeerServer | None = None
        self._loops: list[asyncio.Task] = []
        self._metrics: dict[str, float] = {}
        self.gossip: GossipState | None = None  # made at start (it needs the loop's clock)
        self.request_detector = FailureDetector(
            self.members, self.node_id, down_after=options.down_after, probe_interval_s=options.probe_interval_s
        )
        self.detector = CombinedDetector(self.request_detector, self._gossip_status)
        self._gossip_calls: dict[str, asyncio.Task] = {}
        self._departed_failures: dict[str, int] = {}  # removed node -> gossip rounds unanswered
        self._previous_ring: Ring | None = None
        self._previous_members: dict[str, Member] = {}
        self._rebalancing = 0
        self._member_changes = 0  # member-set changes seen; a rebalance serves the latest
        aae = options.anti_entropy
        self.trees = TreeSet(self.node_id, config.replicas, branching=aae.branching, depth=aae.depth)
        self.aae: AntiEntropy | None = None
        self.tombstones = TombstoneIndex()
        self.reaper: Reaper | None = None
        self._me = self.members[self.node_id]
        self._announced = 0  # the last ring version whose rebalance every member heard of
        self.started = False

    # --- lifecycle -------------------------------------------------------------------------
    def _gossip_status(self, node: str) -> str:
        if self.gossip is None:
            return "alive"
        return self.gossip.status(node, asyncio.get_running_loop().time())

    def _addresses(self) -> dict[str, str]:
        addresses = {m.id: m.peer_address for m in self.members.values()}
        addresses.update(dict(self.config.peer_routes))
        return addresses

    async def start(self) -> None:
        config = self.config
        if self._engine is None:
            if config.engine == "memory":
                self._engine = open_engine("memory")
            else:
                path = os.path.join(config.data_dir, "ap")
                os.makedirs(path, exist_ok=True)
                self._engine = open_engine(config.engine, path, sync=config.sync)
        self.replica = Replica(
            self.node_id,
            self._engine,
            rng=self.rng,
            lww=config.conflicts == "lww",
            prune=self.options.prune,
            hint_policy=self.options.hints,
            limits=self.options.replica,
            offload=config.engine != "memory",
        )
        loop = asyncio.get_running_loop()
        stored_version = self._load_ring()
        # A restart must out-number every earlier life of this node: milliseconds of wall time.
        self.gossip = GossipState(
            self.node_id,
            [dataclasses.asdict(m) for m in self.members.values()],
            now=loop.time(),
            incarnation=int(self.wall_clock() * 1000),
            policy=self.options.gossip,
        )
        self.gossip.ring_version = stored_version
        # Trees from the engine's content, before anyone can write (see TreeSet).
        def indexed(items):
            for key, obj in items:
                self.tombstones.update(key, tombstone_time(obj))
                yield key, obj

        self.tombstones = TombstoneIndex()
        self.trees.rebuild(self._ring, indexed(self.replica.items()))
        self.replica.on_change = self._on_change
        if self._external_transport is None:
            self.transport = StreamTransport(self._addresses(), config.secret)
            host, _, port = self.members[self.node_id].peer_address.rpartition(":")
            self._server = PeerServer(host, int(port), config.secret, self.handle, self.handle_now)
            await self._server.start()
        else:
            self.transport = self._external_transport
        self.coordinator = Coordinator(
            self.node_id,
            ring=lambda: self._ring,
            previous_ring=self._handover_ring,
            n=config.replicas,
            detector=self.detector,
            call=self._call,
            start_call=self._start_call,
            wall_clock=self.wall_clock,
            sloppy=config.hinted_handoff,
            lww=config.conflicts == "lww",
            limits=self.options.coordinator,
            metrics=self._metrics,
            local=_ReplicaHere(self),
        )
        self.aae = AntiEntropy(
            self.node_id,
            replica=self.replica,
            trees=self.trees,
            call=self.coordinator.call,
            is_alive=lambda node: self.detector.status(node) == "alive",
            wall_clock=self.wall_clock,
            rng=random.Random(self.rng.getrandbits(64)),
            options=self.options.anti_entropy,
            metrics=self._metrics,
            peer_timeout_s=self.options.coordinator.peer_timeout_s,
        )
        self.reaper = Reaper(
            self.node_id,
            replica=self.replica,
            index=self.tombstones,
            policy=self.options.tombstones,
            call=self.coordinator.call,
            primaries=lambda key: self._ring.preference_list(key, self.config.replicas),
            ring_ok=self._ring_settled,
            ring_version=lambda: self.gossip.ring_version,
            alive=lambda node: self.detector.status(node) == "alive",
            synced_at=self.trees.synced_at,
            wall_clock=self.wall_clock,
            metrics=self._metrics,
            peer_timeout_s=self.options.coordinator.peer_timeout_s,
        )
        self._loops = [
            asyncio.ensure_future(self._probe_loop()),
            asyncio.ensure_future(self._handoff_loop()),
            asyncio.ensure_future(self._gossip_loop()),
        ]
        if self.options.anti_entropy.enabled:
            self._loops.append(asyncio.ensure_future(self.aae.loop()))
            # Reaping needs exchanges since the tombstone was written: no AAE, no reaping.
            if self.options.tombstones.enabled:
                self._loops.append(asyncio.ensure_future(self.reaper.loop()))
        if config.join:
            self._loops.append(asyncio.ensure_future(self._join(config.join)))
        if stored_version:  # finish whatever transfer an earlier life of this node left undone
            self.coordinator._spawn(self._rebalance())
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        for task in self._loops + list(self._gossip_calls.values()):
            task.cancel()
        await asyncio.gather(*self._loops, *self._gossip_calls.values(), return_exceptions=True)
        self._gossip_calls.clear()
        await self.coordinator.close()
        if self._server is not None:
            await self._server.stop()
        if self._external_transport is None and self.transport is not None:
            await self.transport.close()
        if self.replica is not None:
            self.replica.close()
        if self._engine is not None:
            self._engine.close()

    def _ring_path(self) -> str | None:
        # A memory engine keeps nothing across a restart, so neither does its member list.
        if self.config.engine == "memory" or not self.config.data_dir:
            return None
        return os.path.join(self.config.data_dir, RING_FILE)

    def _load_ring(self) -> int:
        """At start: take the stored member list if it is newer than the cluster file
        (version 0); returns the ring version to start from."""
        path = self._ring_path()
        stored = load_ring(path) if path else None
        if stored is None or stored[0] <= 0:
            return 0
        version, members = stored
        if self.node_id not in {m["id"] for m in members}:
            # removed from the cluster, then restarted: serve from the cluster file, as before
            self._count("stored_ring_ignored")
            return 0
        self.members = {m["id"]: Member(**m) for m in members}
        self._ring = Ring(self.members, self.config.vnodes)
        self.detector.set_members(self.members)
        return version

    def _save_ring(self) -> None:
        path = self._ring_path()
        if path is None or self.gossip is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_ring(path, self.gossip.ring_version, list(self.gossip.members.values()))
        self._count("ring_saves")

    def _on_change(self, key: bytes, obj) -> None:
        self.trees.update(key, obj)
        self.tombstones.update(key, tombstone_time(obj))

    def _ring_settled(self, version: int | None) -> bool:
        """No handover in progress here, and (when given) the asker's ring version is ours."""
        if self._handover_ring() is not None:
            return False
        return version is None or (self.gossip is not None and int(version) == self.gossip.ring_version)

    async def _call(self, node: str, method: str, payload: dict, timeout: float) -> dict:
        if node == self.node_id:
            # asyncio.timeout, not wait_for: no task per local call, and on 3.11 wait_for can
            # swallow a cancel that lands just as the call finishes (stop() then hangs).
            try:
                async with asyncio.timeout(timeout):
                    return await self.handle(method, payload)
            except TimeoutError:
                raise PeerUnreachable("local replica timed out") from None
        return await self.transport.call(node, method, payload, timeout)

    def _start_call(self, node: str, method: str, payload: dict, timeout: float) -> asyncio.Future:
        """`_call` as a future (the coordinator's fan-out): no task when the transport can
        send at once."""
        if node == self.node_id:
            return asyncio.ensure_future(self._call(node, method, payload, timeout))
        return start_call(self.transport, node, method, payload, timeout)

    # --- peer RPC --------------------------------------------------------------------------
    def _serving_replica(self) -> Replica:
        """This node's replica, or the refusal a peer gets while the node starts or stops."""
        replica = self.replica
        if replica is None or not self.started:
            raise RemoteError("not_ready", "node is starting or stopping")
        return replica

    async def _coordinate_here(self, key: bytes, value: bytes | None, context: VClock, *, hint_for: str | None, now: float):
        """`coordinate` on this node's replica, for a peer's call (`handle`) and for this
        node's own coordinator (`_ReplicaHere`) alike: the new version and its encoding,
        or the refusal a peer would send."""
        try:
            result = await self._serving_replica().coordinate_encoded(key, value, context, hint_for=hint_for, now=now)
        except _REFUSED as exc:
            raise self._refusal("coordinate", exc) from None
        if hint_for:
            self._count("hints_stored")
        return result

    def handle_now(self, method: str, payload: dict) -> dict | None:
        """`handle` for the methods that wait for nothing (`fetch`, `ping`), answered in
        line by the peer server (no task per request); None for every other method."""
        if method != "fetch" and method != "ping":
            return None
        replica = self._serving_replica()
        if method == "ping":
            return {"node": self.node_id, "actor": replica.actor}
        try:
            # the stored bytes as they are: the caller decodes them (once per distinct copy)
            raw = replica.fetch_encoded(unb64(payload["key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._refusal(method, exc) from None
        return {"object": None if raw is None else b64(raw)}

    async def handle(self, method: str, payload: dict) -> dict:
        """The replica side of every peer call (see transport.py for the wire)."""
        replica = self._serving_replica()
        try:
            if method == "fetch" or method == "ping":
                return self.handle_now(method, payload)
            if method == "coordinate":
                value = payload.get("value")
                _, raw = await self._coordinate_here(
                    unb64(payload["key"]),
                    None if value is None else unb64(value),
                    VClock.of({str(a): int(c) for a, c in payload.get("context", {}).items()}),
                    hint_for=payload.get("hint_for"),
                    now=float(payload.get("timestamp") or self.wall_clock()),
                )
                return {"object": b64(raw)}
            if method == "store":
                raw = unb64(payload["object"])
                obj = versions.decode_object(raw)
                await replica.store(unb64(payload["key"]), obj, hint_for=payload.get("hint_for"), now=self.wall_clock(), encoded=raw)
                if payload.get("hint_for"):
                    self._count("hints_stored")
                return {"ok": True}
            if method == "scan":
                start_after = payload.get("start_after")
                items, more = replica.scan(
                    unb64(payload["prefix"]),
                    start_after=None if start_after is None else unb64(start_after),
                    limit=int(payload.get("limit") or 0) or None,
                )
                return {"items": [[b64(k), b64(versions.encode_object(o))] for k, o in items], "more": more}
            if method.startswith("aae_") or method in ("fetch_many", "store_many"):
                return await self.aae.handle(method, payload)
            if method in ("reap_check", "reap"):
                return await self.reaper.handle(method, payload)
            if method == "gossip":
                await self._merge_gossip(payload)
                return self.gossip.digest()
            if method == "members":
                version = payload.get("ring_version")
                if version is None:  # from a node without gossip: take the list as it is
                    await self._apply_members([Member(**m) for m in payload["members"]])
                else:
                    await self._merge_gossip({"ring": {"version": version, "members": payload["members"]}, "nodes": {}})
                return {"ok": True}
        except _REFUSED as exc:
            raise self._refusal(method, exc) from None
        raise RemoteError("unknown_method", f"no peer method {method!r}")

    def _refusal(self, method: str, exc: Exception) -> RemoteError:
        """The refusal a peer gets for an error of `_REFUSED` raised by `method`."""
        if isinstance(exc, TooManySiblings):
            return RemoteError("too_many_siblings", str(exc))
        if isinstance(exc, HintsFull):
            self._count("hints_refused")
            return RemoteError("hints_full", str(exc))
        return RemoteError("bad_request", f"{method}: {type(exc).__name__}: {exc}")

    # --- APService ---------------------------------------------------------------------------
    def _count(self, name: str, by: float = 1) -> None:
        self._metrics[name] = self._metrics.get(name, 0) + by

    def _ready(self) -> Coordinator:
        if not self.started:
            raise Unavailable("this node is not started", code="unavailable")
        return self.coordinator

    @staticmethod
    def _check_key(key: bytes) -> bytes:
        if not isinstance(key, (bytes, bytearray)) or not 1 <= len(key) <= 4096:
            raise InvalidRequest("a key is 1 to 4096 bytes", code="invalid_key")
        return bytes(key)

    @staticmethod
    def _check_timeout(timeout: float) -> float:
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise InvalidRequest(f"timeout must be in (0, 3600] seconds, not {timeout!r}", code="invalid_timeout")
        return float(timeout)

    @staticmethod
    def _context(context: str | None) -> VClock:
        try:
            return decode_context(context)
        except ValueError as exc:
            raise InvalidRequest(
                f"the context does not decode ({exc}); pass the context a read or write returned, unchanged",
                code="invalid_context",
            ) from None

    async def get(self, key: bytes, *, r: int | None = None, timeout: float = 5.0) -> APRead:
        key = self._check_key(key)
        coordinator = self._ready()
        self._count("requests_get")
        obj = await coordinator.read(key, r=self.config.read_quorum if r is None else r, timeout=self._check_timeout(timeout))
        return self._as_read(key, obj)

    @staticmethod
    def _as_read(key: bytes, obj) -> APRead:
        if obj is None:
            return APRead(key=key, siblings=[], context=encode_context(VClock()))
        return APRead(key=key, siblings=obj.live_values, context=encode_context(obj.clock))

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
        key = self._check_key(key)
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidRequest("a value is bytes", code="invalid_value")
        if len(value) > self.config.max_value_bytes:
            raise ValueTooLarge(f"the value is {len(value)} bytes; the limit is {self.config.max_value_bytes}")
        clock = self._context(context)
        coordinator = self._ready()
        self._count("requests_put")
        obj = await coordinator.write(
            key, bytes(value), clock, w=self.config.write_quorum if w is None else w, timeout=self._check_timeout(timeout)
        )
        return encode_context(obj.clock)

    async def delete(self, key: bytes, *, context: str | None = None, w: int | None = None, timeout: float = 5.0) -> str:
        key = self._check_key(key)
        clock = self._context(context)
        coordinator = self._ready()
        self._count("requests_delete")
        obj = await coordinator.write(
            key, None, clock, w=self.config.write_quorum if w is None else w, timeout=self._check_timeout(timeout)
        )
        return encode_context(obj.clock)

    async def range(self, prefix: bytes, *, limit: int | None = None, timeout: float = 5.0) -> tuple[list[APRead], bool]:
        if not isinstance(prefix, (bytes, bytearray)):
            raise InvalidRequest("a prefix is bytes", code="invalid_key")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidRequest(f"limit must be a positive integer, not {limit!r}", code="invalid_limit")
        coordinator = self._ready()
        self._count("requests_range")
        limit = min(limit or self.options.max_range_limit, self.options.max_range_limit)
        items, partial = await coordinator.range(bytes(prefix), limit=limit, timeout=self._check_timeout(timeout))
        return [self._as_read(k, obj) for k, obj in items], partial

    def local_get(self, key: bytes) -> APRead:
        """This node's own replica of `key`, without asking anyone (for operators and tests)."""
        key = self._check_key(key)
        self._ready()
        return self._as_read(key, self.replica.fetch(key))

    def preflist(self, key: bytes) -> dict:
        key = self._check_key(key)
        ring = self._ring
        return {
            "key": key,
            "hash": ring.key_hash(key),
            "preference_list": ring.preference_list(key, self.config.replicas),
            "fallbacks": ring.fallbacks(key, self.config.replicas),
        }

    async def status(self) -> dict:
        ownership = self._ring.ownership()
        return {
            "mode": "ap",
            "node": self.node_id,
            "n": self.config.replicas,
            "r": self.config.read_quorum,
            "w": self.config.write_quorum,
            "conflicts": self.config.conflicts,
            "hinted_handoff": self.config.hinted_handoff,
            "members": [
                {
                    "id": m.id,
                    "client_url": m.client_url,
                    "peer_url": f"http://{m.peer_address}",
                    "status": self.detector.status(m.id),
                    "incarnation": self.gossip.heard[m.id].incarnation if self.gossip and m.id in self.gossip.heard else None,
                    "heartbeat": self.gossip.heard[m.id].heartbeat if self.gossip and m.id in self.gossip.heard else None,
                    "tokens": self._ring.vnodes,
                    "ownership": round(ownership.get(m.id, 0.0), 6),
                }
                for m in sorted(self.members.values(), key=lambda m: m.id)
            ]
            + [
                {
                    "id": m.id,
                    "client_url": m.client_url,
                    "peer_url": f"http://{m.peer_address}",
                    "status": self._leave_status(m.id),
                    "tokens": 0,
                    "ownership": 0.0,
                }
                for m in self._departed()
            ],
            "handover": {
                "active": self._handover_ring() is not None,
                "ring_version": self.gossip.ring_version if self.gossip else 0,
                "waiting_for": self._handover_waiting(),
                "rebalanced": dict(sorted(self.gossip.rebalanced.items())) if self.gossip else {},
            },
            "hints_pending": self.replica.hints.count if self.replica else 0,
            "gossip": {
                "ring_version": self.gossip.ring_version if self.gossip else 0,
                "interval_s": self.options.gossip.interval_s,
                "rounds": int(self._metrics.get("gossip_rounds", 0)),
                "refutations": self.gossip.refutations if self.gossip else 0,
            },
            "anti_entropy": self.aae.status() if self.aae else {"enabled": False},
            "tombstones": self._tombstone_status(),
        }

    def _tombstone_status(self) -> dict:
        if self.reaper is None:
            return {"enabled": False, "held": len(self.tombstones), "reaped": self.tombstones.reaped}
        status = self.reaper.status()
        status["enabled"] = status["enabled"] and self.options.anti_entropy.enabled
        return status

    def health(self) -> tuple[bool, str]:
        if not self.started:
            return False, "node is not started"
        up = len(self.detector.up())
        need = max(self.config.read_quorum, self.config.write_quorum)
        if up < need:
            return False, f"only {up} nodes reachable; reads and writes need {need}"
        return True, "ok"

    def metrics(self) -> dict[str, float]:
        m = self._metrics
        hints = self.replica.hints if self.replica else None
        out = {
            "ap_get_requests_total": m.get("requests_get", 0),
            "ap_put_requests_total": m.get("requests_put", 0),
            "ap_delete_requests_total": m.get("requests_delete", 0),
            "ap_range_requests_total": m.get("requests_range", 0),
            "ap_quorum_failures_total": m.get("quorum_failures", 0),
            "ap_hinted_writes_total": m.get("hinted_writes", 0),
            "ap_hints_stored_total": m.get("hints_stored", 0),
            "ap_hints_refused_total": m.get("hints_refused", 0),
            "ap_hints_delivered_total": m.get("hints_delivered", 0),
            "ap_hints_dropped_total": hints.dropped if hints else 0,
            "ap_hints_pending": hints.count if hints else 0,
            "ap_hints_pending_bytes": hints.bytes if hints else 0,
            "ap_read_repairs_total": m.get("read_repairs", 0),
            "ap_read_repairs_skipped_total": m.get("read_repairs_skipped", 0),
            "ap_siblings_seen_total": m.get("siblings_seen", 0),
            "ap_reads_with_siblings_total": m.get("reads_with_siblings", 0),
            "ap_writes_refused_siblings_total": m.get("writes_refused_siblings", 0),
            "ap_handoff_deleted_total": m.get("handoff_deleted", 0),
            "ap_actor_epochs_total": self.replica.epochs_started if self.replica else 0,
            "ap_peers_alive": len(self.detector.up()),
            "ap_gossip_rounds_total": m.get("gossip_rounds", 0),
            "ap_rebalance_keys_sent_total": m.get("rebalance_keys_sent", 0),
            "ap_rebalancing": self._rebalancing,
            "ap_handover_reads_total": m.get("handover_reads", 0),
            "ap_gossip_refutations_total": self.gossip.refutations if self.gossip else 0,
            "ap_gossip_ring_version": self.gossip.ring_version if self.gossip else 0,
            "ap_members_suspect": sum(1 for n in self.members if self.detector.status(n) == "suspect"),
            "ap_members_down": sum(1 for n in self.members if self.detector.status(n) == "down"),
            "ap_aae_exchanges_total": m.get("aae_exchanges", 0),
            "ap_aae_exchanges_failed_total": m.get("aae_exchanges_failed", 0),
            "ap_aae_segments_differing_total": m.get("aae_segments_differing", 0),
            "ap_aae_keys_repaired_total": m.get("aae_keys_repaired", 0),
            "ap_aae_last_full_pass_timestamp_seconds": (self.aae.last_full_pass or 0) if self.aae else 0,
            "ap_aae_trees": len(self.trees.trees),
            "ap_aae_tree_keys": self.trees.keys,
            "ap_aae_tree_rebuilds_total": self.trees.rebuilds,
            "ap_tombstones_held": len(self.tombstones),
            "ap_tombstones_reaped_total": self.tombstones.reaped,
        }
        return out

    # --- membership ---------------------------------------------------------------------------
    async def add_member(self, member: Member) -> dict:
        if member.id in self.members:
            raise InvalidRequest(f"{member.id} is already a member", code="invalid_member")
        members = list(self.members.values()) + [member]
        return await self._change_members(members)

    async def remove_member(self, member_id: str) -> dict:
        if member_id not in self.members:
            raise NotFound(f"no member {member_id!r}", code="member_not_found")
        if len(self.members) <= 1:
            raise InvalidRequest("cannot remove the last member", code="invalid_member")
        return await self._change_members([m for m in self.members.values() if m.id != member_id])

    async def _change_members(self, members: list[Member]) -> dict:
        self._ready()
        self.gossip.change_members([dataclasses.asdict(m) for m in members], asyncio.get_running_loop().time())
        self._save_ring()
        payload = {"members": [dataclasses.asdict(m) for m in members], "ring_version": self.gossip.ring_version}
        targets = sorted(({m.id for m in members} | set(self.members)) - {self.node_id})
        if isinstance(self.transport, (HttpTransport, StreamTransport)):  # a new node and a removed one can be told
            self.transport.addresses = {**self.transport.addresses, **{m.id: m.peer_address for m in members}}
        # Everyone is told (at once) before the change shows here, so a caller that sees it
        # at this node knows every member that answered has it too.
        results = await asyncio.gather(
            *(self._call(node, "members", payload, self.options.coordinator.peer_timeout_s * 2) for node in targets),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, (PeerUnreachable, RemoteError)):
                raise result
        told = [self.node_id] + [n for n, r in zip(targets, results) if not isinstance(r, BaseException)]
        missed = [n for n, r in zip(targets, results) if isinstance(r, BaseException)]
        await self._apply_members(members)
        return {"members": sorted(m.id for m in members), "told": sorted(told), "not_told": missed}

    def _handover_ring(self) -> Ring | None:
        """The ring before the last change while its transfers are not complete cluster-wide."""
        if self._previous_ring is None:
            return None
        if self._handover_waiting():
            return self._previous_ring
        self._previous_ring = None
        self._previous_members = {}
        self._departed_failures.clear()
        return None

    def _handover_waiting(self) -> list[str]:
        """Nodes that held data under the old ring (departed ones included) and have not
        reported the current ring version rebalanced. A down member keeps the handover
        open; a removed node only until `departed_down_after` gossip rounds in a row went
        unanswered (`_ask_departed`)."""
        if self._previous_ring is None or self.gossip is None:
            return []
        limit = self.options.departed_down_after
        return [
            node for node in self.gossip.waiting_for(self._previous_ring.nodes)
            if node in self.members or self._departed_failures.get(node, 0) < limit
        ]

    def _departed(self) -> list[Member]:
        """Members of the old ring no longer in the list (this node too, once removed)."""
        gone = {i: m for i, m in self._previous_members.items() if i not in self.members}
        if self.node_id not in self.members and self.started:
            gone.setdefault(self.node_id, self._me)
        return [gone[i] for i in sorted(gone)]

    def _leave_status(self, node: str) -> str:
        """A node no longer in the member list: `leaving` until it reports every key it
        held sent to the new owners (its rebalance of the current ring), then `left`."""
        if node == self.node_id:
            return "left" if self._announced >= self.gossip.ring_version > 0 else "leaving"
        return "left" if self.gossip.rebalanced.get(node, 0) >= self.gossip.ring_version else "leaving"

    async def _merge_gossip(self, digest: dict) -> None:
        version = self.gossip.ring_version
        changed = self.gossip.merge(digest, asyncio.get_running_loop().time())
        if changed or self.gossip.ring_version != version:
            self._save_ring()
        if changed:
            self._count("gossip_ring_changes")
            await self._apply_members([Member(**m) for m in self.gossip.members.values()])
        elif self.gossip.ring_version != version and not self._rebalancing:
            # a new version with the same members (two changes settled on one): nothing
            # new to send, and a running rebalance would report the version at its end
            self.gossip.set_rebalanced(self.gossip.ring_version)

    async def _apply_members(self, members: list[Member]) -> None:
        new = {m.id: m for m in members}
        if set(new) == set(self.members):
            return
        if self._previous_ring is None:  # during a handover, keep the oldest ring
            self._previous_ring = self._ring
        self._member_changes += 1
        self._previous_members.update(self.members)
        self.members = new
        self._ring = Ring(new, self.config.vnodes)
        self.detector.set_members(new)
        if self.replica is not None:
            self.trees.rebuild(self._ring, self.replica.items())
        if isinstance(self.transport, (HttpTransport, StreamTransport)):
            # departed nodes stay addressable: they gossip their leave's progress
            self.transport.addresses = {**self.transport.addresses, **self._addresses()}
        self.coordinator._spawn(self._rebalance())

    async def _rebalance(self) -> None:
        """Push every local key this node no longer replicates to its new primaries, then
        drop it; keys it now replicates arrive from the others' rebalancing. Passes repeat
        until one finds nothing left to send, at least `handover_s` after the change; then
        this node reports the ring version rebalanced (gossip). A newer ring change ends
        this one (its own rebalance takes over)."""
        loop = asyncio.get_running_loop()
        changes, started = self._member_changes, loop.time()
        self._rebalancing += 1
        try:
            while True:
                left = await self._rebalance_keys()
                if self._member_changes != changes:
                    return
                if not left and loop.time() - started >= self.options.handover_s:
                    break
                await asyncio.sleep(self.options.rebalance_retry_s)
            version = self.gossip.ring_version  # no member change since: done for this one
            self.gossip.set_rebalanced(version)
            self._count("rebalances_done")
            await self._announce_rebalanced(version)
        finally:
            self._rebalancing -= 1

    async def _announce_rebalanced(self, version: int) -> None:
        """Tell every member now (not only the next gossip partners) that this node's
        transfers for `version` are done, so handovers close promptly; a node that was
        removed reports `left` only once every member has heard it, because it may be
        stopped right after. Retries a bounded number of times; gossip carries it anyway."""
        loop = asyncio.get_running_loop()
        pending = set(self.members) - {self.node_id}
        for _ in range(ANNOUNCE_ATTEMPTS):
            if self.gossip.ring_version != version:
                return
            results = await asyncio.gather(
                *(self.coordinator.call(node, "gossip", self.gossip.digest(), loop.time() + self.options.coordinator.peer_timeout_s)
                  for node in sorted(pending)),
                return_exceptions=True,
            )
            pending = {node for node, result in zip(sorted(pending), results) if isinstance(result, BaseException)}
            if not pending:
                self._announced = version
                return
            await asyncio.sleep(self.options.rebalance_retry_s)

    async def _rebalance_keys(self) -> int:
        """One pass; returns how many keys it found to send (0: nothing was left)."""
        found = 0
        replica, ring, n = self.replica, self._ring, self.config.replicas
        loop = asyncio.get_running_loop()
        for key in list(replica.keys()):
            primaries = ring.preference_list(key, n)
            if self.node_id in primaries:
                continue
            obj = replica.fetch(key)
            if obj is None:
                continue
            found += 1
            # Only the new primaries lack the key; the ones that stayed already hold it
            # (and anti-entropy fixes them if they do not).
            previous = self._previous_ring
            receivers = [p for p in primaries if previous is None or p not in previous.preference_list(key, n)] or primaries
            payload = {"key": b64(key), "object": b64(versions.encode_object(obj)), "hint_for": None}
            results = await asyncio.gather(
                *(self.coordinator.call(p, "store", payload, loop.time() + self.options.coordinator.peer_timeout_s) for p in receivers),
                return_exceptions=True,
            )
            if all(not isinstance(result, BaseException) for result in results):
                self._count("rebalance_keys_sent", len(receivers))
                if await replica.drop_if_unowned(key, self.node_id in self._ring.preference_list(key, n)):
                    self._count("handoff_deleted")
            await asyncio.sleep(1.0 / self.options.hints.replay_rate_per_s)
        return found

    async def _join(self, url: str) -> None:
        """Ask a running node (its client URL) to add this one; it then tells every member,
        this node included (`members` peer call). Retries a bounded number of times."""
        import aiohttp

        me = self.members[self.node_id]
        body = {"id": me.id, "client_url": me.client_url, "peer_address": me.peer_address}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for attempt in range(JOIN_ATTEMPTS):
                try:
                    async with session.post(url.rstrip("/") + "/v1/cluster/members", json=body) as response:
                        if response.status == 200:
                            self._count("joined")
                            return
                        reply = await response.json(content_type=None)
                        if response.status == 400 and "already" in str(reply):
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass
                await asyncio.sleep(JOIN_RETRY_S)
        self._count("join_failed")

    # --- background loops ------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.options.probe_interval_s / 2)
            due = self.detector.due_probes(loop.time())
            if due:
                deadline = loop.time() + self.options.coordinator.peer_timeout_s
                await asyncio.gather(*(self.coordinator.call(node, "ping", {}, deadline) for node in due), return_exceptions=True)
                # A failed probe re-arms the peer's next probe (record_failure).

    async def _gossip_loop(self) -> None:
        """Every round: our heartbeat up, mark who we suspect, swap views with `fanout`
        random members. A call still running from an earlier round is not doubled, so at
        most one call per peer is outstanding and a paused peer never delays a round."""
        loop = asyncio.get_running_loop()
        policy = self.options.gossip
        while True:
            await asyncio.sleep(policy.interval_s * self.rng.uniform(0.8, 1.2))
            now = loop.time()
            self.gossip.tick(now)
            self.gossip.mark_suspects(now)
            self._count("gossip_rounds")
            departed = [n for n in self._handover_waiting() if n not in self.members and n != self.node_id]
            for peer in self.gossip.pick_peers(self.rng) + departed:
                if peer in self._gossip_calls:
                    continue
                call = self._ask_departed(peer) if peer in departed else self._gossip_with(peer)
                task = asyncio.ensure_future(call)
                self._gossip_calls[peer] = task
                task.add_done_callback(lambda _, peer=peer: self._gossip_calls.pop(peer, None))

    async def _gossip_with(self, peer: str) -> None:
        deadline = asyncio.get_running_loop().time() + self.options.coordinator.peer_timeout_s
        try:
            reply = await self.coordinator.call(peer, "gossip", self.gossip.digest(), deadline)
            await self._merge_gossip(reply)
        except (PeerUnreachable, RemoteError, KeyError, TypeError, ValueError):
            self._count("gossip_failures")

    async def _ask_departed(self, node: str) -> None:
        """Swap views with a removed node that has not reported its transfers done yet (it
        is not a gossip partner any more), counting the rounds in a row it did not answer."""
        deadline = asyncio.get_running_loop().time() + self.options.coordinator.peer_timeout_s
        try:
            reply = await self.coordinator.call(node, "gossip", self.gossip.digest(), deadline)
        except PeerUnreachable:
            self._departed_failures[node] = self._departed_failures.get(node, 0) + 1
            return
        except RemoteError:  # it answered (starting, say): alive
            self._departed_failures[node] = 0
            return
        self._departed_failures[node] = 0
        try:
            await self._merge_gossip(reply)
        except (KeyError, TypeError, ValueError):
            self._count("gossip_failures")

    async def _handoff_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_expiry = loop.time()
        hints = self.replica.hints
        while True:
            await asyncio.sleep(self.options.handoff_interval_s)
            if loop.time() - last_expiry >= self.options.hint_expiry_interval_s:
                last_expiry = loop.time()
                ops, keys = hints.expire_keys(self.wall_clock())
                await self.replica.write_ops(ops)
                await self._drop_stray_copies(keys)
            for owner in hints.owners():
                if owner not in self.members:
                    ops, keys = hints.forget_owner_keys(owner)
                    await self.replica.write_ops(ops)
                    await self._drop_stray_copies(keys)
                    continue
                if self.detector.status(owner) != "alive":
                    continue
                await self._hand_off(owner, loop)

    async def _drop_stray_copies(self, keys: list[bytes]) -> None:
        """Drop this node's copy of each key whose last hint was just given up (expired, or
        its owner left) and which it does not replicate: nothing would ever hand it off,
        and once the key's tombstone is reaped it would bring the deleted value back (in a
        coverage read, or pushed by a rebalance). The price: a write acknowledged only by
        fallbacks whose owners stayed unreachable for the whole hint window is lost, as in
        Cassandra past max_hint_window without a repair."""
        for key in keys:
            if not self.replica.hints.has_key(key):
                still_owner = self.node_id in self._ring.preference_list(key, self.config.replicas)
                if await self.replica.drop_if_unowned(key, still_owner):
                    self._count("handoff_deleted")
                    self._count("stray_copies_dropped")

    async def _hand_off(self, owner: str, loop) -> None:
        hints, replica = self.replica.hints, self.replica
        for hint in hints.pending_for(owner, self.options.hints.replay_batch):
            obj = replica.fetch(hint.key)
            if obj is not None:
                payload = {"key": b64(hint.key), "object": b64(versions.encode_object(obj)), "hint_for": None}
                try:
                    await self.coordinator.call(owner, "store", payload, loop.time() + self.options.coordinator.peer_timeout_s)
                except (PeerUnreachable, RemoteError):
                    return
            # the hint's removal and the drop of the copy it covered in one batch
            still_owner = self.node_id in self._ring.preference_list(hint.key, self.config.replicas)
            if await replica.forget_hint_and_drop(hint.key, lambda hint=hint: hints.remove_if_unchanged(hint), still_owner):
                self._count("handoff_deleted")
            self._count("hints_delivered")
            await asyncio.sleep(1.0 / self.options.hints.replay_rate_per_s)
