"""One seeded simulation of an ap cluster: nodes, clients, faults, then the checks.

    result = simulate(seed=7, conflicts="vclock")
    result.lost_acked      # acknowledged writes that vanished although no context covered them
    result.diverged        # keys whose primaries still differ after heal + handoff + repair

The run: 5 nodes by default (`size=` up to 20; N=3 R=2 W=2), each with gossip and
anti-entropy running, on a SimNetwork with delay, loss and duplication; clients
do blind writes, read-modify-writes with their last read's context, deletes with context
and reads on a few hot keys, through random nodes; a fault schedule partitions the
network, crashes and restarts nodes (their engine survives, minus a random suffix of the
writes of the last `loss_window_s` seconds that no sync covered: `kill -9` with
`--sync never`). Then everything heals, time passes for handoff, every key is read with r=N (read
repair), and the checker compares each key's final siblings with the history:

* every acknowledged write must still be a sibling unless some later write's context had
  seen it (a write that was attempted, acked or not, may have superseded what it saw);
* no sibling may hold a value nobody wrote;
* all primaries must hold the same version (convergence), and a coverage read (range)
  must return exactly the keys and siblings the per-key reads returned.

`lww` mode keeps one sibling per key, so it loses concurrent acked writes: `lost_acked`
counts them (vclock mode must lose none).
"""
from __future__ import annotations

import asyncio
import dataclasses
import random

from api.service import Member, NodeConfig, ServiceError
from dynamo.antientropy import AntiEntropyOptions
from dynamo.coordinator import CoordinatorLimits
from dynamo.gossip import GossipPolicy
from dynamo.service import APOptions, DynamoService, with_tombstone_grace
from engines.memory import MemoryEngine

from .network import SimNetwork
from .vloop import run

NODES = ["n1", "n2", "n3", "n4", "n5"]
# After the heal (and the 5 s for hints), every node must see every node alive within this.
VIEWS_CONVERGE_WITHIN_S = 15.0
OPTIONS = APOptions(
    probe_interval_s=0.2,
    handoff_interval_s=0.1,
    coordinator=CoordinatorLimits(peer_timeout_s=0.2, read_repair_wait_s=0.2),
    # Gossip and anti-entropy run in every simulation, at a pace that keeps a run cheap.
    gossip=GossipPolicy(interval_s=1.0, fanout=1, suspect_after_s=3.0, down_after_s=8.0),
    anti_entropy=AntiEntropyOptions(interval_s=2.0),
)


class CrashableMemoryEngine(MemoryEngine):
    """A memory engine that survives its node's crash (close is a no-op), except for the
    writes of the last `loss_window_s` not covered by a `sync()`: `crash()` undoes a random
    suffix of those, as `kill -9` with `--sync never` loses what was not yet on disk."""

    def __init__(self, clock, rng, loss_window_s: float):
        super().__init__()
        self.clock, self.rng, self.loss_window_s = clock, rng, loss_window_s
        self._undo: list[tuple[float, list[tuple[bytes, bytes | None]]]] = []  # (time, old values)
        self.lost_batches = 0

    def write(self, batch) -> None:
        before = [(key, self.get(key)) for _, key, _ in batch]
        super().write(batch)
        now = self.clock()
        self._undo = [entry for entry in self._undo if now - entry[0] <= self.loss_window_s]
        self._undo.append((now, before))

    def sync(self) -> None:
        super().sync()
        self._undo.clear()

    def crash(self) -> None:
        now = self.clock()
        recent = [entry for entry in self._undo if now - entry[0] <= self.loss_window_s]
        keep = self.rng.randint(0, len(recent)) if recent else 0
        for _, before in reversed(recent[keep:]):
            ops = [("put", k, v) if v is not None else ("delete", k, None) for k, v in reversed(before)]
            super().write(ops)
            self.lost_batches += 1
        self._undo.clear()

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Write:
    key: bytes
    value: bytes | None  # None: delete
    saw: frozenset  # values the context's read had seen (superseded if applied)
    ok: bool | None = None


@dataclasses.dataclass
class SimResult:
    seed: int
    conflicts: str
    writes: int
    acked: int
    lost_acked: int
    lost_examples: list
    invented: int
    diverged: list
    max_siblings: int
    messages: int
    virtual_seconds: float
    final: dict
    faults: dict
    # with aae_within_s: virtual seconds after the heal until every key's primaries held
    # the same version with no read at all (None: they did not within the bound)
    aae_converged_s: float | None = None

    def failed(self) -> bool:
        return bool(self.invented or self.diverged or (self.conflicts == "vclock" and self.lost_acked))


class SimCluster:
    def __init__(self, seed: int, conflicts: str, drop: float, duplicate: float, skew_s: float, hinted_handoff: bool = True,
                 loss_window_s: float = 0.0, options: APOptions = OPTIONS, nodes: list[str] = NODES):
        self.options = options
        self.nodes = list(nodes)
        self.rng = random.Random(seed)
        self.network = SimNetwork(random.Random(self.rng.getrandbits(64)), drop=drop, duplicate=duplicate)
        loop = asyncio.get_event_loop()
        self.engines = {
            n: CrashableMemoryEngine(loop.time, random.Random(self.rng.getrandbits(64)), loss_window_s) for n in self.nodes
        }
        self.skew = {n: self.rng.uniform(-skew_s, skew_s) for n in self.nodes}
        self.conflicts = conflicts
        self.hinted_handoff = hinted_handoff
        self.members = tuple(Member(n, f"http://{n}", f"{n}:1") for n in self.nodes)
        self.services: dict[str, DynamoService] = {}
        self.faults = {"partitions": 0, "crashes": 0, "hints_delivered": 0, "read_repairs": 0, "handoff_deleted": 0, "epochs": 0,
                       "lost_batches": 0, "tombstones_reaped": 0}

    async def start(self, node: str) -> None:
        loop = asyncio.get_running_loop()
        config = NodeConfig(node_id=node, members=self.members, secret="sim", data_dir="/nonexistent", engine="memory",
                            conflicts=self.conflicts, hinted_handoff=self.hinted_handoff)
        service = DynamoService(
            config,
            transport=self.network.transport(node),
            wall_clock=lambda: 1_700_000_000.0 + loop.time() + self.skew[node],
            rng=random.Random(self.rng.getrandbits(64)),
            options=self.options,
            engine=self.engines[node],
        )
        await service.start()
        self.services[node] = service
        self.network.handlers[node] = service.handle
        self.network.crashed.discard(node)

    async def crash(self, node: str) -> None:
        self.network.crashed.add(node)
        service = self.services.pop(node)
        self._collect(service)
        self.faults["crashes"] += 1
        await service.stop()
        before = self.engines[node].lost_batches
        self.engines[node].crash()
        self.faults["lost_batches"] += self.engines[node].lost_batches - before

    def _collect(self, service: DynamoService) -> None:
        metrics = service.metrics()
        self.faults["hints_delivered"] += metrics["ap_hints_delivered_total"]
        self.faults["read_repairs"] += metrics["ap_read_repairs_total"]
        self.faults["handoff_deleted"] += metrics["ap_handoff_deleted_total"]
        self.faults["epochs"] += metrics["ap_actor_epochs_total"]
        self.faults["tombstones_reaped"] += metrics["ap_tombstones_reaped_total"]

    def alive(self) -> list[str]:
        return sorted(self.services)


def _diverged(sim: SimCluster, key_names) -> list[bytes]:
    """Keys whose primaries do not all hold the same version (read straight from replicas)."""
    reader = sim.services["n1"]
    diverged = []
    for key in key_names:
        primaries = reader.preflist(key)["preference_list"]
        objects = [sim.services[p].replica.fetch(key) for p in primaries]
        if any(obj is None for obj in objects) and any(obj is not None for obj in objects):
            diverged.append(key)
        elif objects[0] is not None and not all(objects[0].same_as(obj) for obj in objects[1:]):
            diverged.append(key)
    return diverged


async def _simulate(seed, conflicts, ops, clients, keys, drop, duplicate, faults, hinted_handoff, skew_s, loss_window_s,
                    options, aae_within_s, size):
    sim = SimCluster(seed, conflicts, drop, duplicate, skew_s=skew_s, hinted_handoff=hinted_handoff, loss_window_s=loss_window_s,
                     options=options, nodes=NODES if size == len(NODES) else [f"n{i + 1}" for i in range(size)])
    nodes = sim.nodes
    rng = sim.rng
    for node in nodes:
        await sim.start(node)
    key_names = [b"key-%d" % i for i in range(keys)]
    history: list[Write] = []
    max_siblings = 0
    remaining = [ops]

    async def client(cid: int) -> None:
        nonlocal max_siblings
        last_read: dict[bytes, tuple[str, frozenset]] = {}
        seq = 0
        while remaining[0] > 0:
            remaining[0] -= 1
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            alive = sim.alive()
            if not alive:
                continue
            node = sim.services[rng.choice(alive)]
            key = rng.choice(key_names)
            roll = rng.random()
            try:
                if roll < 0.3 or key not in last_read:
                    read = await node.get(key, timeout=1.0)
                    max_siblings = max(max_siblings, len(read.siblings))
                    last_read[key] = (read.context, frozenset(read.siblings))
                    continue
                seq += 1
                value = b"c%d-%d" % (cid, seq)
                if roll < 0.55:  # blind write
                    write = Write(key, value, frozenset())
                    context = None
                else:
                    context, saw = last_read.pop(key)
                    write = Write(key, None if roll > 0.93 else value, saw)
                history.append(write)
                if write.value is None:
                    await node.delete(key, context=context, timeout=1.0)
                else:
                    await node.put(key, value, context=context, timeout=1.0)
                write.ok = True
            except ServiceError:
                if history and history[-1].ok is None:
                    history[-1].ok = False

    async def nemesis() -> None:
        if not faults:
            return
        while remaining[0] > 0:
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            kind = rng.random()
            if kind < 0.4:
                split = rng.sample(nodes, rng.choice([1, 2]) if len(nodes) <= 5 else rng.randint(1, len(nodes) // 2))
                sim.network.partition(split, [n for n in nodes if n not in split])
                sim.faults["partitions"] += 1
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                sim.network.heal()
            elif kind < 0.8 and len(sim.alive()) > 3:
                victim = rng.choice(sim.alive())
                await sim.crash(victim)
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                await sim.start(victim)

    await asyncio.gather(nemesis(), *(client(i) for i in range(clients)))
    # heal everything and let hints flow
    sim.network.heal()
    sim.network.drop = sim.network.duplicate = 0.0
    for node in nodes:
        if node not in sim.services:
            await sim.start(node)
    aae_converged_s = None
    if aae_within_s is not None:
        # Anti-entropy alone (no client reads, so no read repair): poll the replicas.
        loop = asyncio.get_running_loop()
        healed = loop.time()
        while loop.time() - healed <= aae_within_s:
            if not _diverged(sim, key_names):
                aae_converged_s = round(loop.time() - healed, 3)
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(max(0.0, 5.0 - (loop.time() - healed)))  # as below: hints flow
    else:
        await asyncio.sleep(5.0)
    # Gossip views converge: every node sees every node alive again, within a bound.
    loop = asyncio.get_running_loop()
    settle_deadline = loop.time() + VIEWS_CONVERGE_WITHIN_S
    while not all(s.detector.status(n) == "alive" for s in sim.services.values() for n in nodes):
        if loop.time() > settle_deadline:
            views_converged = False
            break
        await asyncio.sleep(0.25)
    else:
        views_converged = True
    final: dict[bytes, list[bytes]] = {}
    reader = sim.services["n1"]
    unreadable = []
    for key in key_names:
        try:
            read = await reader.get(key, r=3, timeout=5.0)
        except ServiceError:
            unreadable.append(key)
            final[key] = []
            continue
        final[key] = read.siblings
        max_siblings = max(max_siblings, len(read.siblings))
    await asyncio.sleep(2.0)  # read repair
    diverged = _diverged(sim, key_names)
    if unreadable:
        diverged.append(b"<final r=N reads failed: %d keys>" % len(unreadable))
    if not views_converged:
        diverged.append(b"<membership views did not converge in time>")
    if aae_within_s is not None and aae_converged_s is None:
        diverged.append(b"<anti-entropy did not converge in time>")
    reap_deletes: list[Write] = []
    if options.tombstones.grace_s < 60:
        # Reaping: delete every key, let the grace pass, see every tombstone reaped, then
        # re-create every key (acknowledged writes after a reap must survive) and read
        # again; what a reaped tombstone had deleted must not come back (checked below).
        for key in key_names:
            write = Write(key, None, frozenset())
            history.append(write)
            reap_deletes.append(write)
            try:
                read = await reader.get(key, r=3, timeout=5.0)
                write.saw = frozenset(read.siblings)
                await sim.services[rng.choice(sim.alive())].delete(key, context=read.context, timeout=5.0)
                write.ok = True
            except ServiceError:
                write.ok = False
        loop = asyncio.get_running_loop()
        reap_deadline = loop.time() + options.tombstones.grace_s + 20 * options.tombstones.interval_s + 4 * options.anti_entropy.interval_s
        while any(len(s.tombstones) for s in sim.services.values()) and loop.time() < reap_deadline:
            await asyncio.sleep(0.5)
        if any(len(s.tombstones) for s in sim.services.values()):
            diverged.append(b"<tombstones not reaped: %r>" % sorted((n, len(s.tombstones)) for n, s in sim.services.items()))
        for key in key_names:
            write = Write(key, b"after-reap-" + key, frozenset(final[key]))
            history.append(write)
            try:
                read = await reader.get(key, r=3, timeout=5.0)
                write.saw = frozenset(read.siblings)
                await sim.services[rng.choice(sim.alive())].put(key, write.value, context=read.context, timeout=5.0)
                write.ok = True
            except ServiceError:
                write.ok = False
        await asyncio.sleep(2.0)
        for key in key_names:
            try:
                final[key] = (await reader.get(key, r=3, timeout=5.0)).siblings
            except ServiceError:
                final[key] = []
                diverged.append(b"<read after reap failed>")
        await asyncio.sleep(2.0)  # read repair
        diverged += _diverged(sim, key_names)
    # a coverage read after convergence agrees with the per-key quorum reads
    items, partial = await reader.range(b"key-", timeout=5.0)
    ranged = {read.key: sorted(read.siblings) for read in items}
    if partial or ranged != {k: sorted(v) for k, v in final.items() if v}:
        diverged.append(b"<range>")
    for service in sim.services.values():
        service.replica._check()
        service.detector._check()
        service.gossip._check()
        service.trees._check()
    # the checker
    written = {w.value for w in history if w.value is not None}
    superseded: dict[bytes, set] = {}
    for w in history:
        superseded.setdefault(w.key, set()).update(w.saw)
    lost = [w for w in history if w.ok and w.value is not None and w.value not in superseded.get(w.key, ()) and w.value not in final[w.key]]
    # Nothing the final deletes (made after the heal, on converged replicas, then reaped)
    # had seen may come back. (Not checked for every write: a duplicated `coordinate`
    # message mints a second dot for the same value, which a context need not cover.)
    resurrected = [(w.key, v) for w in reap_deletes if w.ok for v in w.saw if v in final[w.key]]
    lost += [Write(k, v, frozenset(), True) for k, v in resurrected]
    invented = sum(1 for key in key_names for v in final[key] if v not in written)
    for node in list(sim.services):
        sim._collect(sim.services[node])
        await sim.services[node].stop()
    await sim.network.drain()
    return SimResult(
        seed=seed,
        conflicts=conflicts,
        writes=len(history),
        acked=sum(1 for w in history if w.ok),
        lost_acked=len(lost),
        lost_examples=[(w.key, w.value) for w in lost[:5]],
        invented=invented,
        diverged=diverged,
        max_siblings=max_siblings,
        messages=sim.network.messages,
        virtual_seconds=round(asyncio.get_running_loop().time(), 3),
        final={k: sorted(v) for k, v in final.items()},
        faults=sim.faults,
        aae_converged_s=aae_converged_s,
    )


def simulate(seed: int, conflicts: str = "vclock", *, ops: int = 200, clients: int = 4, keys: int = 3,
             drop: float = 0.02, duplicate: float = 0.02, faults: bool = True, hinted_handoff: bool = True,
             skew_s: float = 0.05, loss_window_s: float = 0.1, anti_entropy: bool = True,
             aae_within_s: float | None = None, size: int = 5, reap_grace_s: float | None = None) -> SimResult:
    """One run; `skew_s` bounds each node's wall-clock offset (what lww orders by);
    a crash loses a random suffix of the writes of the last `loss_window_s` seconds;
    `reap_grace_s` reaps tombstones after that many (virtual) seconds."""
    options = OPTIONS if anti_entropy else dataclasses.replace(
        OPTIONS, anti_entropy=dataclasses.replace(OPTIONS.anti_entropy, enabled=False))
    if reap_grace_s is not None:
        options = with_tombstone_grace(options, reap_grace_s)
        options = dataclasses.replace(options, tombstones=dataclasses.replace(options.tombstones, interval_s=0.5))
    return run(_simulate(seed, conflicts, ops, clients, keys, drop, duplicate, faults, hinted_handoff, skew_s, loss_window_s,
                         options, aae_within_s, size))
