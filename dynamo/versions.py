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

import struct
from typing import Iterable, NamedTuple

from .vclock import PrunePolicy, VClock, _get_varint, _put_varint

OBJECT_MAGIC = b"DV\x01"
_F64 = struct.Struct(">d")


# Dot, Sibling and VersionedObject are immutable records made several times per request
# (every decode, write and merge): NamedTuples, which build in a fraction of the time of
# frozen dataclasses (those set each field through object.__setattr__). Equality, hashing
# and Dot's (actor, counter) order are the same.
class Dot(NamedTuple):
    """The event that made a sibling: the `counter`-th write coordinated by `actor`."""

    actor: str
    counter: int


class Sibling(NamedTuple):
    dot: Dot
    value: bytes | None  # None: a tombstone
    timestamp: float  # the coordinator's wall clock at the write (used by lww only)

    @property
    def is_tombstone(self) -> bool:
        return self.value is None


class VersionedObject(NamedTuple):
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


def identical(a: VersionedObject, b: VersionedObject) -> bool:
    """True when `a` and `b` encode to the same bytes (clock timestamps, sibling values and
    times included; `same_as` compares only counters and dots)."""
    return a is b or (a.clock._entries == b.clock._entries and a.siblings == b.siblings)


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


# Every object is encoded and decoded several times per request (replica read, reply,
# merge at the next replica), so the codec is written for speed: varints below 128 (all
# counts, lengths under 128 bytes, counters under 128) take one table lookup, and the
# float64 timestamps one struct call. The bytes are exactly those of the format above.
_BYTE = [bytes((i,)) for i in range(128)]
_U8 = struct.Struct(">B")
_F64_U8 = struct.Struct(">dB")


def _varint(n: int) -> bytes:
    if n < 128:
        if n < 0:
            raise ValueError("varints are unsigned")
        return _BYTE[n]
    out = bytearray()
    _put_varint(out, n)
    return bytes(out)


def encode_object(obj: VersionedObject) -> bytes:
    entries = obj.clock._entries
    actors = sorted(entries.keys() | {s.dot.actor for s in obj.siblings})
    parts = [OBJECT_MAGIC, _varint(len(actors))]
    append = parts.append
    for actor in actors:
        raw = actor.encode()
        entry = entries.get(actor)
        append(_varint(len(raw)))
        append(raw)
        if entry is None:
            append(_BYTE[0])
            append(_F64.pack(0.0))
        else:
            append(_varint(entry[0]))
            append(_F64.pack(entry[1] or 0.0))
    siblings = obj.siblings
    append(_varint(len(siblings)))
    index = {actor: i for i, actor in enumerate(actors)} if len(actors) > 1 else None
    for sibling in siblings:
        dot = sibling.dot
        append(_varint(index[dot.actor] if index is not None else 0))
        append(_varint(dot.counter))
        value = sibling.value
        if value is None:
            append(_F64_U8.pack(sibling.timestamp, 0))
        else:
            append(_F64_U8.pack(sibling.timestamp, 1))
            append(_varint(len(value)))
            append(value)
    return b"".join(parts)


def decode_object(data: bytes) -> VersionedObject:
    """Inverse of `encode_object`; `ValueError` on anything malformed."""
    if type(data) is not bytes:
        data = bytes(data)
    if not data.startswith(OBJECT_MAGIC):
        raise ValueError("not a versioned object (bad magic)")
    try:
        return _decode_object(data)
    except (IndexError, struct.error) as exc:
        raise ValueError(f"truncated or malformed object: {exc}") from None


def _decode_object(data: bytes) -> VersionedObject:
    pos = len(OBJECT_MAGIC)
    count = data[pos]
    if count < 128:
        pos += 1
    else:
        count, pos = _get_varint(data, pos)
    actors: list[str] = []
    entries: dict[str, tuple[int, float]] = {}
    unpack_f64 = _F64.unpack_from
    for _ in range(count):
        length = data[pos]
        if length < 128:
            pos += 1
        else:
            length, pos = _get_varint(data, pos)
        actor = data[pos : pos + length].decode()
        pos += length
        counter = data[pos]
        if counter < 128:
            pos += 1
        else:
            counter, pos = _get_varint(data, pos)
        (ts,) = unpack_f64(data, pos)
        pos += 8
        actors.append(actor)
        if counter:
            entries[actor] = (counter, ts)
    nsib = data[pos]
    if nsib < 128:
        pos += 1
    else:
        nsib, pos = _get_varint(data, pos)
    siblings = []
    for _ in range(nsib):
        i = data[pos]
        if i < 128:
            pos += 1
        else:
            i, pos = _get_varint(data, pos)
        counter = data[pos]
        if counter < 128:
            pos += 1
        else:
            counter, pos = _get_varint(data, pos)
        ts, flag = _F64_U8.unpack_from(data, pos)
        pos += 9
        value = None
        if flag:
            length = data[pos]
            if length < 128:
                pos += 1
            elif data[pos + 1] < 128:  # values of 128 bytes to 16 KiB: two bytes, in line
                length = (length & 0x7F) | (data[pos + 1] << 7)
                pos += 2
            else:
                length, pos = _get_varint(data, pos)
            value = data[pos : pos + length]
            if len(value) != length:
                raise ValueError("truncated value")
            pos += length
        siblings.append(Sibling(Dot(actors[i], counter), value, ts))
    if pos != len(data):
        raise ValueError("trailing bytes after the object")
    clock = VClock.__new__(VClock)
    clock._entries = entries
    return VersionedObject(clock, tuple(siblings))
