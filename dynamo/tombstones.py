"""Tombstone reaping: a deleted key's tombstone is removed once no replica can still
hold, or be handed, a value it deleted (Cassandra's gc_grace; Riak's delete_mode).

A key is *reapable* when, on the current ring and outside any handover:

1. its local object here is all tombstones, written more than `grace_s` ago (the newest
   sibling's timestamp), and this node is the key's first primary (one proposer per key);
2. every one of its N primaries is alive, and since the tombstone was written this node
   completed an anti-entropy exchange of the key's replica set with each other primary;
3. every other primary confirms (`reap_check`) it holds exactly that tombstone (same
   clock and dots) or nothing (it reaped it already, or never held the key), holds no hint
   for the key, and sees the same ring version with no handover in progress.

Then each primary (`reap`) deletes its copy only if it is *still* exactly that tombstone:
a write or re-create that landed meanwhile survives, and a delete racing a write keeps the
write. A primary whose reap failed keeps its tombstone; anti-entropy copies it back to the
others, and a later pass reaps it again: a tombstone coming back is harmless, a value
coming back is not.

Hints: a fallback hands off the *current* object of a key for at most the hint age limit
(plus the expiry period), so `grace_s` must exceed `hints.max_age_s +
hint_expiry_interval_s`: no hint can carry a value older than a tombstone past its grace.
`APOptions` refuses options that break this.

`TombstoneIndex` (which local keys are tombstones, and since when) and the decisions are
pure; `Reaper` is the asyncio driver (a pass every `interval_s`, at most `max_keys_per_pass`
keys looked at, `batch` keys per message, `rate_per_s` keys proposed per second).

    >>> index = TombstoneIndex()
    >>> index.update(b"k", 10.0); index.update(b"j", None)
    >>> index.due(now=20.0, grace_s=5.0, limit=10)
    [b'k']
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable, Iterable

from . import versions
from .hints import TOMBSTONE_GRACE_S
from .transport import PeerUnreachable, RemoteError, b64, unb64
from .versions import VersionedObject

GRACE_ENV = "CAPKV_TOMBSTONE_GRACE_S"
# Cassandra's gc_grace_seconds default (10 days): long enough for any outage an operator
# repairs by hand, and far above the 3 h hint window.
DEFAULT_GRACE_S = TOMBSTONE_GRACE_S

SAME, ABSENT, DIFFERS = "same", "absent", "differs"


@dataclasses.dataclass(frozen=True)
class ReapPolicy:
    enabled: bool = True
    grace_s: float = DEFAULT_GRACE_S  # a tombstone is kept at least this long after its write
    interval_s: float = 10.0  # a reaping pass this often
    max_keys_per_pass: int = 1024  # index entries looked at per pass
    batch: int = 64  # keys per reap_check / reap message
    rate_per_s: float = 500.0  # keys proposed per second, so reaping cannot starve clients

    def __post_init__(self) -> None:
        if self.grace_s <= 0 or self.interval_s <= 0 or self.rate_per_s <= 0:
            raise ValueError("grace_s, interval_s and rate_per_s must be positive")
        if self.max_keys_per_pass < 1 or self.batch < 1:
            raise ValueError("max_keys_per_pass and batch must be at least 1")


def written_at(obj: VersionedObject) -> float:
    """When the newest sibling was written (the coordinator's wall clock)."""
    return max(s.timestamp for s in obj.siblings)


def tombstone_time(obj: VersionedObject | None) -> float | None:
    """The write time of `obj` when it is a tombstone (every sibling deleted), else None."""
    if obj is None or not obj.siblings or not obj.is_deleted:
        return None
    return written_at(obj)


def replica_answer(local: VersionedObject | None, proposed: VersionedObject, *, hinted: bool, ok_ring: bool) -> str:
    """A primary's answer to "may this tombstone be reaped?"."""
    if not ok_ring or hinted:
        return DIFFERS
    if local is None:
        return ABSENT
    return SAME if local.same_as(proposed) else DIFFERS


def may_propose(
    tombstone_at: float,
    *,
    now: float,
    grace_s: float,
    primaries: list[str],
    self_id: str,
    alive: Callable[[str], bool],
    synced_at: Callable[[str], float | None],
) -> bool:
    """Conditions 1 and 2 above, for a key whose local object is a tombstone written at
    `tombstone_at`. `synced_at(peer)`: start time of this node's last complete exchange of
    the key's replica set with `peer` (None: never)."""
    if now - tombstone_at <= grace_s or not primaries or primaries[0] != self_id:
        return False
    for peer in primaries[1:]:
        synced = synced_at(peer)
        if not alive(peer) or synced is None or synced <= tombstone_at:
            return False
    return True


def confirmed(answers: Iterable[str]) -> bool:
    return all(a in (SAME, ABSENT) for a in answers)


class TombstoneIndex:
    """Which local keys hold a tombstone, and when it was written. Kept in step with the
    engine by the replica's change hook; iteration order is the order keys were last
    looked at or changed, so a pass resumes where the last one stopped."""

    def __init__(self) -> None:
        self._at: dict[bytes, float] = {}
        self.reaped = 0

    def __len__(self) -> int:
        return len(self._at)

    def update(self, key: bytes, at: float | None) -> None:
        self._at.pop(key, None)
        if at is not None:
            self._at[key] = at

    def due(self, now: float, grace_s: float, limit: int) -> list[bytes]:
        """Up to `limit` keys from the front whose grace has passed; every key looked at
        goes to the back, so keys that cannot be reaped yet do not block the others."""
        looked = [k for k, _ in zip(self._at, range(limit))]
        out = []
        for key in looked:
            at = self._at.pop(key)
            self._at[key] = at
            if now - at > grace_s:
                out.append(key)
        return out

    def at(self, key: bytes) -> float | None:
        return self._at.get(key)


Call = Callable[[str, str, dict, float], Awaitable[dict]]


class Reaper:
    """The driver: proposes the reapable keys this node is first primary of, and serves
    `reap_check` / `reap`."""

    def __init__(
        self,
        node_id: str,
        *,
        replica,
        index: TombstoneIndex,
        policy: ReapPolicy,
        call: Call,
        primaries: Callable[[bytes], list[str]],
        ring_ok: Callable[[int | None], bool],
        ring_version: Callable[[], int],
        alive: Callable[[str], bool],
        synced_at: Callable[[bytes, str], float | None],
        wall_clock: Callable[[], float],
        metrics: dict,
        peer_timeout_s: float = 1.0,
    ):
        self.node_id = node_id
        self.replica = replica
        self.index = index
        self.policy = policy
        self._call = call
        self.primaries = primaries
        self.ring_ok = ring_ok
        self.ring_version = ring_version
        self.alive = alive
        self.synced_at = synced_at
        self.wall_clock = wall_clock
        self.metrics = metrics
        self.peer_timeout_s = peer_timeout_s

    def _count(self, name: str, by: float = 1) -> None:
        self.metrics[name] = self.metrics.get(name, 0) + by

    # --- serving side ----------------------------------------------------------------------
    async def handle(self, method: str, payload: dict) -> dict:
        items = payload["items"]
        if not isinstance(items, list) or len(items) > self.policy.batch:
            raise ValueError(f"items must be a list of at most {self.policy.batch}")
        decoded = [(unb64(k), versions.decode_object(unb64(o))) for k, o in items]
        if method == "reap_check":
            ok_ring = self.ring_ok(payload.get("ring_version"))
            return {
                "answers": [
                    replica_answer(
                        self.replica.fetch(key),
                        obj,
                        hinted=self.replica.hints.has_key(key),
                        ok_ring=ok_ring and self.node_id in self.primaries(key),
                    )
                    for key, obj in decoded
                ]
            }
        if method == "reap":
            return {"reaped": await self.reap_local(decoded)}
        raise RemoteError("unknown_method", f"no peer method {method!r}")

    async def reap_local(self, items: list[tuple[bytes, VersionedObject]]) -> int:
        reaped = 0
        for key, obj in items:
            if await self.replica.reap_if_unchanged(key, obj):
                reaped += 1
        self.index.reaped += reaped
        self._count("tombstones_reaped", reaped)
        return reaped

    # --- proposing side --------------------------------------------------------------------
    async def call(self, node: str, method: str, payload: dict) -> dict:
        deadline = asyncio.get_running_loop().time() + self.peer_timeout_s * 2
        return await self._call(node, method, payload, deadline)

    def candidates(self) -> list[tuple[bytes, VersionedObject, list[str]]]:
        """Keys whose local tombstone this node may propose now (conditions 1 and 2)."""
        if not self.ring_ok(None):
            return []
        now = self.wall_clock()
        out = []
        for key in self.index.due(now, self.policy.grace_s, self.policy.max_keys_per_pass):
            obj = self.replica.fetch(key)
            at = tombstone_time(obj)
            if at is None:  # changed since it was indexed
                self.index.update(key, None)
                continue
            primaries = self.primaries(key)
            if self.replica.hints.has_key(key):
                continue
            if may_propose(at, now=now, grace_s=self.policy.grace_s, primaries=primaries, self_id=self.node_id,
                           alive=self.alive, synced_at=lambda peer, key=key: self.synced_at(key, peer)):
                out.append((key, obj, primaries))
        return out

    async def run_pass(self) -> int:
        """One pass: confirm and reap what can be; returns keys reaped here."""
        reaped = 0
        found = self.candidates()
        for start in range(0, len(found), self.policy.batch):
            reaped += await self._reap_batch(found[start : start + self.policy.batch])
            await asyncio.sleep(len(found[start : start + self.policy.batch]) / self.policy.rate_per_s)
        return reaped

    async def _reap_batch(self, batch: list[tuple[bytes, VersionedObject, list[str]]]) -> int:
        version = self.ring_version()
        peers = sorted({p for _, _, primaries in batch for p in primaries if p != self.node_id})
        asked: dict[str, list[int]] = {p: [i for i, (_, _, ps) in enumerate(batch) if p in ps] for p in peers}
        ok = [True] * len(batch)

        def items(indices):
            return [[b64(batch[i][0]), b64(versions.encode_object(batch[i][1]))] for i in indices]

        async def check(peer: str) -> None:
            indices = asked[peer]
            try:
                reply = await self.call(peer, "reap_check", {"items": items(indices), "ring_version": version})
                answers = reply["answers"]
                if len(answers) != len(indices):
                    raise ValueError("answer count")
            except (PeerUnreachable, RemoteError, KeyError, TypeError, ValueError):
                answers = [DIFFERS] * len(indices)
            for i, answer in zip(indices, answers):
                if not confirmed([answer]):
                    ok[i] = False

        await asyncio.gather(*(check(p) for p in peers))
        chosen = [i for i in range(len(batch)) if ok[i]]
        if not chosen:
            return 0
        # A reap that fails anywhere leaves a tombstone there, which anti-entropy copies back
        # to the others and a later pass reaps: harmless.
        async def reap(peer: str) -> None:
            indices = [i for i in asked[peer] if ok[i]]
            if indices:
                try:
                    await self.call(peer, "reap", {"items": items(indices)})
                except (PeerUnreachable, RemoteError):
                    self._count("reap_failures")

        await asyncio.gather(*(reap(p) for p in peers))
        return await self.reap_local([(batch[i][0], batch[i][1]) for i in chosen])

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            try:
                await self.run_pass()
            except (PeerUnreachable, RemoteError):
                self._count("reap_failures")

    def status(self) -> dict:
        return {
            "enabled": self.policy.enabled,
            "grace_s": self.policy.grace_s,
            "held": len(self.index),
            "reaped": self.index.reaped,
        }


__all__ = [
    "ABSENT", "DEFAULT_GRACE_S", "DIFFERS", "GRACE_ENV", "ReapPolicy", "Reaper", "SAME", "TombstoneIndex",
    "confirmed", "may_propose", "replica_answer", "tombstone_time",
]
