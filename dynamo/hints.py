"""Hints: the promise a fallback made to hand a key back to the primary it stood in for
(Dynamo §4.6 hinted handoff; limits after Cassandra's hints and Voldemort's slop store).

A fallback stores the hinted object in its own data like any replica (so reads during the
failure find it) and records a hint `(owner, key)` in the same engine, in the same atomic
batch. When the owner answers again, the handoff loop sends the key's *current* local
object (a merge at the owner, so replay is idempotent) and removes the hint if no newer
write changed it meanwhile (`seq`).

Bounds, each checked when a hint is recorded: `max_hints` hints, `max_bytes` of hinted
objects, and `max_age_s` since the hint last changed. A hint over the count or byte cap
is refused (the fallback then refuses the write, so an ack always means "will be handed
off"); a hint older than `max_age_s` is dropped by `expire()` and counted. `max_age_s`
must stay below the tombstone grace period (`TOMBSTONE_GRACE_S` by default; `APOptions`
checks the configured grace against `max_age_s` plus the expiry period), so a hint can
never carry a value past the life of a tombstone that deleted it (tombstones.py).

Engine layout: key b"h:" + owner + b"\\x00" + key, value `>dQI` (updated_at, seq, bytes).

    >>> log = HintLog(open_engine("memory"), HintPolicy())
    >>> ops = log.record("n3", b"k", 10, now=0.0); log.count, log.owners()
    (1, ['n3'])
"""
from __future__ import annotations

import dataclasses
import struct

from engines import Engine

HINT_PREFIX = b"h:"
_HINT_VALUE = struct.Struct(">dQI")
# The default tombstone grace period (Cassandra's gc_grace_seconds); see tombstones.py.
TOMBSTONE_GRACE_S = 10 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class HintPolicy:
    max_hints: int = 100_000  # hints held by this node (each is an index entry in memory)
    max_bytes: int = 256 * 1024 * 1024  # hinted object bytes (the disk a long outage may use)
    max_age_s: float = 3 * 3600.0  # Cassandra's max_hint_window: older hints are dropped
    replay_rate_per_s: float = 500.0  # keys handed off per second, so replay cannot starve clients
    replay_batch: int = 64  # keys sent per handoff round to one owner

    def __post_init__(self) -> None:
        if self.max_hints < 1 or self.max_bytes < 1 or self.replay_batch < 1 or self.replay_rate_per_s <= 0:
            raise ValueError("hint limits must be positive")
        if not 0 < self.max_age_s < TOMBSTONE_GRACE_S:
            raise ValueError("max_age_s must be positive and below the tombstone grace period")


@dataclasses.dataclass(frozen=True)
class Hint:
    owner: str
    key: bytes
    updated_at: float
    seq: int
    size: int


class HintsFull(Exception):
    """The hint would go over `max_hints` or `max_bytes`; the write is refused here."""


def _hint_key(owner: str, key: bytes) -> bytes:
    return HINT_PREFIX + owner.encode() + b"\x00" + key


class HintLog:
    """The hints of one node, indexed in memory and stored in its engine."""

    def __init__(self, engine: Engine, policy: HintPolicy):
        self.engine = engine
        self.policy = policy
        self._hints: dict[tuple[str, bytes], Hint] = {}
        self._by_key: dict[bytes, set[str]] = {}
        self.bytes = 0
        self._seq = 0
        self.dropped = 0  # expired hints (their keys rely on read repair from now on)
        for raw_key, raw_value in engine.scan(HINT_PREFIX, HINT_PREFIX[:-1] + b";"):
            owner, _, key = raw_key[len(HINT_PREFIX) :].partition(b"\x00")
            updated_at, seq, size = _HINT_VALUE.unpack(raw_value)
            self._index(Hint(owner.decode(), key, updated_at, seq, size))
            self._seq = max(self._seq, seq)

    @property
    def count(self) -> int:
        return len(self._hints)

    def _index(self, hint: Hint) -> None:
        old = self._hints.get((hint.owner, hint.key))
        if old is not None:
            self.bytes -= old.size
        self._hints[(hint.owner, hint.key)] = hint
        self._by_key.setdefault(hint.key, set()).add(hint.owner)
        self.bytes += hint.size

    def _unindex(self, hint: Hint) -> None:
        del self._hints[(hint.owner, hint.key)]
        owners = self._by_key[hint.key]
        owners.discard(hint.owner)
        if not owners:
            del self._by_key[hint.key]
        self.bytes -= hint.size

    def record(self, owner: str, key: bytes, size: int, now: float) -> list[tuple]:
        """Index a hint and return the engine op that stores it (write it in the same batch
        as the object). Raises `HintsFull` and changes nothing when over a cap."""
        old = self._hints.get((owner, key))
        grow_count = 0 if old else 1
        grow_bytes = size - (old.size if old else 0)
        if self.count + grow_count > self.policy.max_hints:
            raise HintsFull(f"{self.count} hints held; the limit is {self.policy.max_hints} (max_hints)")
        if self.bytes + grow_bytes > self.policy.max_bytes:
            raise HintsFull(f"{self.bytes} hinted bytes held; the limit is {self.policy.max_bytes} (max_bytes)")
        self._seq += 1
        hint = Hint(owner, key, now, self._seq, size)
        self._index(hint)
        return [("put", _hint_key(owner, key), _HINT_VALUE.pack(now, hint.seq, size))]

    def owners(self) -> list[str]:
        return sorted({owner for owner, _ in self._hints})

    def pending_for(self, owner: str, limit: int) -> list[Hint]:
        """Up to `limit` hints for `owner`, oldest first."""
        hints = [h for (o, _), h in self._hints.items() if o == owner]
        hints.sort(key=lambda h: (h.updated_at, h.seq))
        return hints[:limit]

    def has_key(self, key: bytes) -> bool:
        return key in self._by_key

    def owners_of(self, key: bytes) -> set[str]:
        return set(self._by_key.get(key, ()))

    def remove_if_unchanged(self, hint: Hint) -> list[tuple]:
        """Ops deleting `hint` if no newer write re-hinted the key since it was read."""
        current = self._hints.get((hint.owner, hint.key))
        if current is None or current.seq != hint.seq:
            return []
        self._unindex(current)
        return [("delete", _hint_key(hint.owner, hint.key), None)]

    def forget_owner(self, owner: str) -> list[tuple]:
        """Ops dropping every hint for a node that left the cluster."""
        return self.forget_owner_keys(owner)[0]

    def forget_owner_keys(self, owner: str) -> tuple[list[tuple], list[bytes]]:
        """`forget_owner`, and the keys whose hints it dropped."""
        ops, keys = [], []
        for hint in [h for (o, _), h in self._hints.items() if o == owner]:
            self._unindex(hint)
            ops.append(("delete", _hint_key(hint.owner, hint.key), None))
            keys.append(hint.key)
        return ops, keys

    def expire(self, now: float) -> list[tuple]:
        """Ops dropping hints older than `max_age_s` (counted in `dropped`)."""
        return self.expire_keys(now)[0]

    def expire_keys(self, now: float) -> tuple[list[tuple], list[bytes]]:
        """`expire`, and the keys whose hints it dropped (the fallback then drops its own
        copy of each it does not replicate: a copy nobody will hand off must not linger,
        or it could bring back what a reaped tombstone deleted)."""
        ops, keys = [], []
        for hint in [h for h in self._hints.values() if now - h.updated_at > self.policy.max_age_s]:
            self._unindex(hint)
            self.dropped += 1
            ops.append(("delete", _hint_key(hint.owner, hint.key), None))
            keys.append(hint.key)
        return ops, keys

    def _check(self) -> None:
        assert self.count <= self.policy.max_hints
        assert self.bytes == sum(h.size for h in self._hints.values())
        assert {k for _, k in self._hints} == set(self._by_key)
        stored = {}
        for raw_key, raw_value in self.engine.scan(HINT_PREFIX, HINT_PREFIX[:-1] + b";"):
            owner, _, key = raw_key[len(HINT_PREFIX) :].partition(b"\x00")
            stored[(owner.decode(), key)] = _HINT_VALUE.unpack(raw_value)[1]
        assert stored == {k: h.seq for k, h in self._hints.items()}, "hint index and engine differ"
