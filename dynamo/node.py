"""The replica: one node's local copy of the keys it holds, in an engine.

Every peer request ends here: `coordinate` (make a new version of a key: the only place a
dot is minted), `store` (merge a version from elsewhere: replication, read repair,
handoff), `fetch` and `scan`. A read-modify-write of one key holds that key's lock, so
two requests never interleave on it; with `offload=True` engine writes run on a worker
thread (`commit.CommitQueue`) so an fsync does not block the event loop, and the writes
waiting at one moment go to the engine as one batch, so they share one fsync.

Engine layout (one engine per node): b"d:" + key -> `versions.encode_object`;
b"h:" ... hints (`hints.py`); b"m:actor" -> this node's current actor id.

Actor epochs (the fix for Riak's "doomstone", riak_kv#679): a dot (actor, n) must never
name two different writes. A node mints n = (its counter in the local clock) + 1, which
is safe only while its local copy of the key has never been deleted. So the actor is
`"<node>.<epoch>"` with a random epoch, and the node takes a fresh epoch (which has
minted nothing anywhere) whenever its local copies may have lost a version it minted:
before it deletes a local copy whose clock names its current actor (after a handoff),
and at every start (a crash with `sync` "never" or "batch" loses the last writes, a wiped
data directory loses all). Restarts and handoffs therefore add actors to clocks, which
pruning bounds.

    >>> r = Replica("n1", open_engine("memory"), rng=random.Random(1))
    >>> obj = asyncio.run(r.coordinate(b"k", b"v", VClock(), hint_for=None, now=1.0))
    >>> obj.live_values, obj.siblings[0].dot.actor == r.actor
    ([b'v'], True)
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import random

from engines import Engine

from . import versions
from .commit import CommitQueue
from .hints import HintLog, HintPolicy, HintsFull
from .vclock import PrunePolicy, VClock
from .versions import VersionedObject

DATA_PREFIX = b"d:"
ACTOR_KEY = b"m:actor"


class TooManySiblings(Exception):
    """A client write would leave more than `max_siblings` siblings; nothing was written."""


@dataclasses.dataclass(frozen=True)
class ReplicaLimits:
    # Riak's max_siblings: beyond this a client write is refused until someone resolves the
    # key (read, then write with the context). Merges from peers are never refused.
    max_siblings: int = 100
    # A scan (coverage read) returns at most this many keys / bytes per call.
    max_scan_keys: int = 10_000
    max_scan_bytes: int = 32 * 1024 * 1024


def data_key(key: bytes) -> bytes:
    return DATA_PREFIX + key


def _prefix_end(prefix: bytes) -> bytes | None:
    chars = bytearray(prefix)
    while chars:
        if chars[-1] < 0xFF:
            chars[-1] += 1
            return bytes(chars)
        chars.pop()
    return None


class KeyLocks:
    """Mutual exclusion per key, first come first served. A key has an entry only while
    someone holds it (with its waiters), so memory follows the keys in use.

        async with locks.hold(b"k"):   # read-modify-write of b"k"
            ...

    (An `asyncio.Lock` per key behind an `asynccontextmanager` cost a generator, a lock
    and two dict updates per request; uncontended, this is one dict insert and delete.)"""

    def __init__(self) -> None:
        self._held: dict[bytes, collections.deque[asyncio.Future]] = {}

    def hold(self, key: bytes) -> "_Held":
        return _Held(self, key)

    def __len__(self) -> int:
        return len(self._held)

    async def acquire(self, key: bytes) -> None:
        waiters = self._held.get(key)
        if waiters is None:
            self._held[key] = collections.deque()
            return
        turn = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release(key)  # the lock was handed to us just as we were cancelled
            elif turn in waiters:  # (a release may already have dropped it)
                waiters.remove(turn)
            raise

    def release(self, key: bytes) -> None:
        waiters = self._held[key]
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the key passes to that waiter, still held
                return
        del self._held[key]


class _Held:
    __slots__ = ("locks", "key")

    def __init__(self, locks: KeyLocks, key: bytes):
        self.locks, self.key = locks, key

    async def __aenter__(self) -> None:
        await self.locks.acquire(self.key)

    async def __aexit__(self, *exc) -> None:
        self.locks.release(self.key)


class Replica:
    def __init__(
        self,
        node_id: str,
        engine: Engine,
        *,
        rng: random.Random | None = None,
        lww: bool = False,
        prune: PrunePolicy = PrunePolicy(),
        hint_policy: HintPolicy = HintPolicy(),
        limits: ReplicaLimits = ReplicaLimits(),
        offload: bool = False,
    ):
        self.node_id = node_id
        self.engine = engine
        self.rng = rng or random.Random()
        self.lww = lww
        self.prune = prune
        self.limits = limits
        self.offload = offload
        self._commits = CommitQueue(engine)
        self.hints = HintLog(engine, hint_policy)
        # Called as on_change(key, object or None) after every engine write of a key's
        # data, in the event loop (anti-entropy keeps its Merkle trees up to date with it).
        self.on_change = None
        self._locks = KeyLocks()
        # A fresh actor at every start: with sync "never" or "batch" a crash may have lost
        # the last versions this node minted, and with them the counters it had reached.
        self.actor = self._start_actor()
        self.epochs_started = 0

    # --- actors ------------------------------------------------------------------------
    def _new_actor(self) -> str:
        # 64 random bits: two epochs of one node must never meet, across any number of restarts.
        actor = f"{self.node_id}.{self.rng.getrandbits(64):016x}"
        self.engine.put(ACTOR_KEY, actor.encode())
        self.engine.sync()
        self.actor = actor
        return actor

    def close(self) -> None:
        """Stop the group-commit worker (after the writes already handed to it)."""
        self._commits.close()

    def _start_actor(self) -> str:
        return self._new_actor()

    def new_epoch(self) -> str:
        """Take a fresh actor id (durably) before deleting any local copy."""
        self.epochs_started += 1
        return self._new_actor()

    # --- locking and engine writes -------------------------------------------------------
    def _key_lock(self, key: bytes) -> "_Held":
        return self._locks.hold(key)

    async def _write(self, batch: list[tuple]) -> None:
        if self.offload:
            # Group commit: concurrent writes of this node share one engine write + fsync.
            await self._commits.write(batch)
        else:
            self.engine.write(batch)

    # --- reads ---------------------------------------------------------------------------
    def fetch(self, key: bytes) -> VersionedObject | None:
        raw = self.engine.get(data_key(key))
        return None if raw is None else versions.decode_object(raw)

    def fetch_encoded(self, key: bytes) -> bytes | None:
        """The stored object as `versions.encode_object` wrote it (a peer `fetch` sends
        these bytes on without decoding them)."""
        return self.engine.get(data_key(key))

    def scan(self, prefix: bytes, *, start_after: bytes | None = None, limit: int | None = None):
        """`(items, more)`: up to `limit` (key, object) under `prefix` in key order."""
        limit = min(limit or self.limits.max_scan_keys, self.limits.max_scan_keys)
        start = data_key(prefix if start_after is None else max(prefix, start_after + b"\x00"))
        end_key = _prefix_end(prefix)
        end = data_key(end_key) if end_key is not None else _prefix_end(DATA_PREFIX)
        items, size = [], 0
        for raw_key, raw_value in self.engine.scan(start, end):
            if len(items) >= limit or size >= self.limits.max_scan_bytes:
                return items, True
            items.append((raw_key[len(DATA_PREFIX) :], versions.decode_object(raw_value)))
            size += len(raw_key) + len(raw_value)
        return items, False

    def items(self):
        """Every (key, object) stored here, in key order (anti-entropy rebuilds from it)."""
        for raw_key, raw_value in self.engine.scan(DATA_PREFIX, _prefix_end(DATA_PREFIX)):
            yield raw_key[len(DATA_PREFIX) :], versions.decode_object(raw_value)

    def keys(self):
        """Every key stored here (for rebalancing); a generator over the engine scan."""
        for raw_key, _ in self.engine.scan(DATA_PREFIX, _prefix_end(DATA_PREFIX)):
            yield raw_key[len(DATA_PREFIX) :]

    # --- writes --------------------------------------------------------------------------
    async def coordinate(
        self, key: bytes, value: bytes | None, context: VClock, *, hint_for: str | None, now: float
    ) -> VersionedObject:
        """Mint the new version of `key` for a client write (value None: delete) and keep it.

        Raises `TooManySiblings` or `HintsFull` and stores nothing when over a limit."""
        obj, _ = await self.coordinate_encoded(key, value, context, hint_for=hint_for, now=now)
        return obj

    async def coordinate_encoded(
        self, key: bytes, value: bytes | None, context: VClock, *, hint_for: str | None, now: float
    ) -> tuple[VersionedObject, bytes]:
        """`coordinate`, also returning the bytes stored (sent on to the other replicas as is)."""
        async with self._key_lock(key):
            local = self.fetch(key)
            obj = versions.new_write(local, context, value, self.actor, now, lww=self.lww, prune=self.prune)
            if len(obj.siblings) > self.limits.max_siblings:
                raise TooManySiblings(
                    f"the key would have {len(obj.siblings)} siblings; the limit is {self.limits.max_siblings}: "
                    "read it and write the resolved value with the read's context"
                )
            raw = await self._persist(key, obj, hint_for, now)
            return obj, raw

    async def store(
        self, key: bytes, incoming: VersionedObject, *, hint_for: str | None, now: float, encoded: bytes | None = None
    ) -> VersionedObject:
        """Merge a version from a peer; returns what is stored now. Idempotent. `encoded`:
        `incoming` as the peer sent it, stored as is when the merge leaves it unchanged
        (the usual case: a new version that descends the local one)."""
        async with self._key_lock(key):
            local = self.fetch(key)
            obj = versions.merge(local, incoming, lww=self.lww)
            # Prune here too (a merge re-adds what the versioning replica pruned), but never
            # our own actor: our next dot must count on from everything we ever minted.
            keep = {s.dot.actor for s in obj.siblings} | {self.actor}
            obj = versions.VersionedObject(obj.clock.prune(now, self.prune, keep=keep), obj.siblings)
            if obj.same_as(local) and hint_for is None:
                return obj
            if encoded is not None and not versions.identical(obj, incoming):
                encoded = None
            await self._persist(key, obj, hint_for, now, encoded)
            return obj

    async def _persist(
        self, key: bytes, obj: VersionedObject, hint_for: str | None, now: float, raw: bytes | None = None
    ) -> bytes:
        """Write `obj` (its encoding `raw` when known) and the hint; returns the bytes stored."""
        if raw is None:
            raw = versions.encode_object(obj)
        batch = [("put", data_key(key), raw)]
        if hint_for is not None and hint_for != self.node_id:
            batch += self.hints.record(hint_for, key, len(raw), now)  # may raise HintsFull
        await self._write(batch)
        if self.on_change is not None:
            self.on_change(key, obj)
        return raw

    async def drop_if_unowned(self, key: bytes, still_owner: bool) -> bool:
        """Delete the local copy of a key this node no longer needs (handed off, not a
        primary, no hint left). Takes a new epoch first. True when deleted."""
        async with self._key_lock(key):
            local = self.fetch(key)
            if still_owner or self.hints.has_key(key) or local is None:
                return False
            await self._delete_local(key, local)
            return True

    async def _delete_local(self, key: bytes, local: VersionedObject, other_ops: list = ()) -> None:
        """Delete this node's copy of `key` (held under its key lock), in one engine batch
        after `other_ops`. Only an actor that minted on this key could mint a colliding dot
        later, so when `local` names this node's actor a new epoch is taken first."""
        if local.clock.get(self.actor):
            self.new_epoch()
        await self._write(list(other_ops) + [("delete", data_key(key), None)])
        if self.on_change is not None:
            self.on_change(key, None)

    def _check(self) -> None:
        """Every stored object decodes and holds its invariants; the hint index matches the
        engine; the actor id is the stored one."""
        assert self.engine.get(ACTOR_KEY) == self.actor.encode(), "actor id not stored"
        for raw_key, raw_value in self.engine.scan(DATA_PREFIX, _prefix_end(DATA_PREFIX)):
            obj = versions.decode_object(raw_value)
            obj._check()
            assert len(obj.siblings) >= 1, f"empty object stored for {raw_key!r}"
        self.hints._check()

    async def write_ops(self, ops: list[tuple]) -> None:
        if ops:
            await self._write(ops)

    async def reap_if_unchanged(self, key: bytes, tombstone: VersionedObject) -> bool:
        """Delete the local copy of `key` if it is still exactly `tombstone` (tombstone
        reaping, dynamo/tombstones.py): a write that landed meanwhile survives. Takes a new
        epoch first when the tombstone's clock names this node's actor, as for a handoff
        drop. True when deleted."""
        async with self._key_lock(key):
            local = self.fetch(key)
            if local is None or not local.is_deleted or not local.same_as(tombstone):
                return False
            await self._delete_local(key, local)
            return True

    async def forget_hint_and_drop(self, key: bytes, take_hint_ops, still_owner: bool) -> bool:
        """Under the key's lock: `take_hint_ops()` (removes a delivered hint of `key` from
        the index and returns its engine ops), then write those ops and, in the same batch,
        the delete of the local copy if it is no longer needed (as `drop_if_unowned`): a
        crash between the two would leave a copy without a hint that nothing ever hands
        off or drops. True when the copy was deleted."""
        async with self._key_lock(key):
            hint_ops = take_hint_ops()
            local = self.fetch(key)
            if still_owner or self.hints.has_key(key) or local is None:
                if hint_ops:
                    await self._write(hint_ops)
                return False
            await self._delete_local(key, local, hint_ops)
            return True


__all__ = ["Replica", "ReplicaLimits", "TooManySiblings", "HintsFull", "data_key"]
