"""Siblings and their reconciliation with dotted version vectors (Riak 2.0's DVV merge;
Preguiça et al., "Dotted Version Vectors", 2010).

A stored object is a clock (everything this replica has seen of the key) and its
siblings. Each sibling keeps its *dot*: the one event (actor, counter) that wrote it. A
sibling is dropped exactly when some history that saw its dot no longer holds it, which
is why siblings stay bounded by the number of truly concurrent writers and a resolved
sibling never comes back. A tombstone is a sibling whose value is None.

    write "a" through n1 (no context)    -> clock {n1:1}        siblings [(n1,1) "a"]
    write "b" through n2 (no context)    -> clock {n1:1, n2:1}  siblings [(n1,1) "a", (n2,1) "b"]
    write "c" with context {n1:1, n2:1}  -> clock {n1:2, n2:1}  siblings [(n1,2) "c"]
    delete with context {n1:2, n2:1}     -> clock {n1:3, n2:1}  siblings [(n1,3) tombstone]

`merge(a, b)` (replication, read repair, handoff) keeps a sibling when both sides hold it or
the other side never saw its dot; it is commutative, associative and idempotent, so a
replayed or duplicated message changes nothing.

`lww` mode keeps only the sibling with the greatest (timestamp, actor, counter) after every
write and merge: concurrent writes are lost, by design, and never returned as siblings.

Object codec (`encode_object`): b"DV" 0x01, clock (count, then per actor: len, utf-8,
counter, float64 timestamp), sibling count, then per sibling: actor index into the clock's
sorted actors, counter, float64 timestamp, flag (0 tombstone, 1 value), value length and
bytes. Varints are unsigned LEB128; floats are big-endian IEEE 754.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Iterable

from .vclock import PrunePolicy, VClock, _get_varint, _put_varint

OBJECT_MAGIC = b"DV\x01"
_F64 = struct.Struct(">d")


@dataclasses.dataclass(frozen=True, order=True)
class Dot:
    """The event that made a sibling: the `counter`-th write coordinated by `actor`."""

    actor: str
    counter: int


@dataclasses.dataclass(frozen=True)
class Sibling:
    dot: Dot
    value: bytes | None  # None: a tombstone
    timestamp: float  # the coordinator's wall clock at the write (used by lww only)

    @property
    def is_tombstone(self) -> bool:
        return self.value is None


@dataclasses.dataclass(frozen=True)
class VersionedObject:
    clock: VClock
    siblings: tuple[Sibling, ...]

    @property
    def live_values(self) -> list[bytes]:
        """Values of the non-tombstone siblings, oldest write first, duplicates shown once."""
        seen: set[bytes] = set()
        out = []
        for sibling in sorted(self.siblings, key=lambda s: (s.timestamp, s.dot)):
            if sibling.value is not None and sibling.value not in seen:
                seen.add(sibling.value)
                out.append(sibling.value)
        return out

    @property
    def is_deleted(self) -> bool:
        return all(s.is_tombstone for s in self.siblings)

    def dots(self) -> set[Dot]:
        return {s.dot for s in self.siblings}

    def same_as(self, other: "VersionedObject | None") -> bool:
        """True when `other` holds the same history and siblings (nothing to repair)."""
        return other is not None and self.clock == other.clock and self.dots() == other.dots()

    def size_bytes(self) -> int:
        return sum(len(s.value or b"") + 24 for s in self.siblings) + 16 * len(self.clock)

    def _check(self) -> None:
        dots = [s.dot for s in self.siblings]
        assert len(dots) == len(set(dots)), f"duplicate dots {dots}"
        for sibling in self.siblings:
            assert self.clock.covers(sibling.dot.actor, sibling.dot.counter), f"clock {self.clock} misses {sibling.dot}"
        assert list(self.siblings) == sorted(self.siblings, key=lambda s: s.dot), "siblings out of order"


def _ordered(siblings: Iterable[Sibling]) -> tuple[Sibling, ...]:
    return tuple(sorted(siblings, key=lambda s: s.dot))


def lww_winner(siblings: Iterable[Sibling]) -> Sibling:
    """The sibling last-write-wins keeps: greatest timestamp, ties broken by dot."""
    return max(siblings, key=lambda s: (s.timestamp, s.dot.actor, s.dot.counter))


def _resolve(obj: VersionedObject, lww: bool) -> VersionedObject:
    if lww and len(obj.siblings) > 1:
        return VersionedObject(obj.clock, (lww_winner(obj.siblings),))
    return obj


def new_write(
    local: VersionedObject | None,
    context: VClock,
    value: bytes | None,
    actor: str,
    now: float,
    *,
    lww: bool = False,
    prune: PrunePolicy | None = None,
) -> VersionedObject:
    """The object after a client write coordinated by `actor` at this replica.

    The new sibling gets the dot (actor, n+1) where n is the actor's counter in the merge of
    the local clock and the context; it supersedes exactly the local siblings whose dots the
    context covers. `value=None` writes a tombstone.

        >>> obj = new_write(None, VClock(), b"a", "n1.x", 1.0)
        >>> obj = new_write(obj, VClock(), b"b", "n1.x", 2.0)       # no context: a sibling
        >>> obj.live_values
        [b'a', b'b']
        >>> new_write(obj, obj.clock, b"c", "n1.x", 3.0).live_values  # with it: replaces both
        [b'c']
    """
    # Context entries carry no time: stamp them now so pruning treats them as young.
    context = VClock({a: (c, now) for a, (c, _) in context.items()})
    base = context if local is None else local.clock.merge(context)
    clock = base.increment(actor, now)
    dot = Dot(actor, clock.get(actor))
    kept = [] if local is None else [s for s in local.siblings if not context.covers(s.dot.actor, s.dot.counter)]
    obj = VersionedObject(clock, _ordered(kept + [Sibling(dot, value, now)]))
    obj = _resolve(obj, lww)
    if prune is not None:
        # Never prune the minting actor: its next dot must count on from this one.
        keep = {s.dot.actor for s in obj.siblings} | {actor}
        obj = VersionedObject(obj.clock.prune(now, prune, keep=keep), obj.siblings)
    return obj


def merge(a: VersionedObject | None, b: VersionedObject | None, *, lww: bool = False) -> VersionedObject | None:
    """Reconcile two replicas' objects (either may be None: the replica had nothing).

        a: clock {n1:2}, [(n1,2) "c"]     b: clock {n1:1, n2:1}, [(n1,1) "a", (n2,1) "b"]
        merge -> clock {n1:2, n2:1}, [(n1,2) "c"]   (a saw both of b's dots and replaced them)
    """
    if a is None:
        return b
    if b is None:
        return a
    a_dots, b_dots = a.dots(), b.dots()
    kept = [s for s in a.siblings if s.dot in b_dots or not b.clock.covers(s.dot.actor, s.dot.counter)]
    kept += [s for s in b.siblings if s.dot not in a_dots and not a.clock.covers(s.dot.actor, s.dot.counter)]
    return _resolve(VersionedObject(a.clock.merge(b.clock), _ordered(kept)), lww)


def merge_all(objects: Iterable[VersionedObject | None], *, lww: bool = False) -> VersionedObject | None:
    result = None
    for obj in objects:
        result = merge(result, obj, lww=lww)
    return result


# --- codec -------------------------------------------------------------------------------


def encode_object(obj: VersionedObject) -> bytes:
    out = bytearray(OBJECT_MAGIC)
    actors = sorted(set(obj.clock.actors()) | {s.dot.actor for s in obj.siblings})
    index = {actor: i for i, actor in enumerate(actors)}
    _put_varint(out, len(actors))
    for actor in actors:
        raw = actor.encode()
        _put_varint(out, len(raw))
        out += raw
        _put_varint(out, obj.clock.get(actor))
        out += _F64.pack(obj.clock.timestamp(actor) or 0.0)
    _put_varint(out, len(obj.siblings))
    for sibling in obj.siblings:
        _put_varint(out, index[sibling.dot.actor])
        _put_varint(out, sibling.dot.counter)
        out += _F64.pack(sibling.timestamp)
        if sibling.value is None:
            out.append(0)
        else:
            out.append(1)
            _put_varint(out, len(sibling.value))
            out += sibling.value
    return bytes(out)


def decode_object(data: bytes) -> VersionedObject:
    """Inverse of `encode_object`; `ValueError` on anything malformed."""
    if not data.startswith(OBJECT_MAGIC):
        raise ValueError("not a versioned object (bad magic)")
    pos = len(OBJECT_MAGIC)
    count, pos = _get_varint(data, pos)
    actors: list[str] = []
    entries: dict[str, tuple[int, float]] = {}
    for _ in range(count):
        length, pos = _get_varint(data, pos)
        actor = data[pos : pos + length].decode()
        pos += length
        counter, pos = _get_varint(data, pos)
        (ts,) = _F64.unpack_from(data, pos)
        pos += 8
        actors.append(actor)
        if counter:
            entries[actor] = (counter, ts)
    nsib, pos = _get_varint(data, pos)
    siblings = []
    for _ in range(nsib):
        i, pos = _get_varint(data, pos)
        counter, pos = _get_varint(data, pos)
        (ts,) = _F64.unpack_from(data, pos)
        pos += 8
        flag = data[pos]
        pos += 1
        value = None
        if flag:
            length, pos = _get_varint(data, pos)
            value = bytes(data[pos : pos + length])
            if len(value) != length:
                raise ValueError("truncated value")
            pos += length
        siblings.append(Sibling(Dot(actors[i], counter), value, ts))
    if pos != len(data):
        raise ValueError("trailing bytes after the object")
    return VersionedObject(VClock(entries), tuple(siblings))
