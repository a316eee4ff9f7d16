"""Vector clocks: the causal history of one key (Dynamo §4.4, Riak's `vclock.erl`).

A clock maps an *actor* (a replica's identity, here `"<node>.<epoch>"`) to the number of
events that actor coordinated on this key, and the wall time of its latest one (used only
to prune). Comparison uses counters alone:

    >>> a = VClock.of({"n1.x": 2, "n2.y": 1}); b = VClock.of({"n1.x": 1})
    >>> a.descends(b), b.descends(a), compare(a, b)
    (True, False, 'after')
    >>> compare(VClock.of({"n1.x": 1}), VClock.of({"n2.y": 1}))
    'concurrent'

Pruning (Riak's four knobs, in seconds): while the clock has more than `small` entries and
its oldest entry is not younger than `young`, drop that oldest entry if the clock is longer
than `big` or the entry is older than `old`. Entries are ordered by (timestamp, actor) so
every replica prunes the same way. Pruning loses information: a dropped entry makes a
later write look concurrent instead of newer, which gives a false sibling, never a lost
write. Actors named in `keep` (the dots of live siblings) are never dropped.

The client's *context* is the counters of a clock, opaque to the client:
urlsafe base64 (no padding) of `0x01, count, (len, actor utf-8, counter)*` with unsigned
LEB128 varints. `decode_context` raises `ValueError` for anything else.
"""
from __future__ import annotations

import base64
import dataclasses
from typing import Iterable, Mapping

CONTEXT_VERSION = 1
# A context names at most this many actors and is at most this long: bounds what a client
# can make a node decode and merge.
MAX_CONTEXT_ACTORS = 1024
MAX_CONTEXT_CHARS = 64 * 1024


@dataclasses.dataclass(frozen=True)
class PrunePolicy:
    """Riak's defaults (riak_kv bucket props), in seconds (Riak's docs say ms; its code uses s)."""

    small: int = 50  # never prune a clock this short
    big: int = 50  # always prune a clock longer than this (oldest first)
    young_s: float = 20.0  # never prune an entry younger than this
    old_s: float = 86400.0  # prune entries older than this once the clock is over `small`

    def __post_init__(self) -> None:
        if not (1 <= self.small <= self.big):
            raise ValueError(f"need 1 <= small <= big, got small={self.small} big={self.big}")
        if not (0 <= self.young_s <= self.old_s):
            raise ValueError(f"need 0 <= young_s <= old_s, got {self.young_s}, {self.old_s}")


class VClock:
    """An immutable vector clock: actor -> (counter, timestamp). Counters are >= 1."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, tuple[int, float]] | None = None):
        self._entries: dict[str, tuple[int, float]] = dict(entries or {})

    @classmethod
    def of(cls, counters: Mapping[str, int], timestamp: float = 0.0) -> "VClock":
        return cls({actor: (counter, timestamp) for actor, counter in counters.items() if counter > 0})

    # --- reading ---------------------------------------------------------------------
    def get(self, actor: str) -> int:
        entry = self._entries.get(actor)
        return entry[0] if entry else 0

    def timestamp(self, actor: str) -> float | None:
        entry = self._entries.get(actor)
        return entry[1] if entry else None

    def counters(self) -> dict[str, int]:
        return {actor: entry[0] for actor, entry in self._entries.items()}

    def items(self):
        return self._entries.items()

    def actors(self) -> list[str]:
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VClock):
            return False
        # equal entries (timestamps too: the usual case of two copies of one version) are
        # equal clocks without building the counter maps
        return self._entries == other._entries or self.counters() == other.counters()

    def __hash__(self) -> int:
        return hash(frozenset(self.counters().items()))

    def __repr__(self) -> str:
        return "VClock(" + ", ".join(f"{a}:{c}" for a, (c, _) in sorted(self._entries.items())) + ")"

    def covers(self, actor: str, counter: int) -> bool:
        """True when the event `counter` of `actor` is in this history (the dot is seen)."""
        return self.get(actor) >= counter

    def descends(self, other: "VClock") -> bool:
        """True when this history contains all of `other`'s (equal clocks descend each other)."""
        return all(self.get(actor) >= counter for actor, (counter, _) in other._entries.items())

    # --- new clocks ----------------------------------------------------------------------
    def merge(self, *others: "VClock") -> "VClock":
        """The least clock that descends all: per actor the larger counter (and its time)."""
        entries = dict(self._entries)
        for other in others:
            for actor, (counter, ts) in other._entries.items():
                mine = entries.get(actor)
                if mine is None or counter > mine[0] or (counter == mine[0] and ts > mine[1]):
                    entries[actor] = (counter, ts)
        return VClock(entries)

    def increment(self, actor: str, now: float) -> "VClock":
        entries = dict(self._entries)
        entries[actor] = (self.get(actor) + 1, now)
        return VClock(entries)

    def prune(self, now: float, policy: PrunePolicy, keep: Iterable[str] = ()) -> "VClock":
        """Drop old entries as the module docstring says; never the actors in `keep`."""
        if len(self._entries) <= policy.small:
            return self
        keep = set(keep)
        entries = dict(self._entries)
        candidates = sorted((ts, actor) for actor, (_, ts) in entries.items() if actor not in keep)
        for ts, actor in candidates:
            if len(entries) <= policy.small or now - ts < policy.young_s:
                break
            if len(entries) > policy.big or now - ts > policy.old_s:
                del entries[actor]
            else:
                break
        return VClock(entries)


def compare(a: VClock, b: VClock) -> str:
    """'equal', 'after' (a descends b), 'before' (b descends a) or 'concurrent'."""
    ab, ba = a.descends(b), b.descends(a)
    if ab and ba:
        return "equal"
    if ab:
        return "after"
    if ba:
        return "before"
    return "concurrent"


# --- the opaque context -------------------------------------------------------------------


def _put_varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ValueError("varints are unsigned")
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_context(clock: VClock) -> str:
    """`VClock.of({"n1.ab": 2})` -> a short urlsafe string; the same clock gives the same string."""
    out = bytearray([CONTEXT_VERSION])
    counters = clock.counters()
    _put_varint(out, len(counters))
    for actor in sorted(counters):
        raw = actor.encode()
        _put_varint(out, len(raw))
        out += raw
        _put_varint(out, counters[actor])
    return base64.urlsafe_b64encode(bytes(out)).rstrip(b"=").decode("ascii")


def decode_context(text: str | None) -> VClock:
    """The clock a context names (empty for None or ""); `ValueError` when it does not decode."""
    if not text:
        return VClock()
    if not isinstance(text, str) or len(text) > MAX_CONTEXT_CHARS:
        raise ValueError("context is too long or not a string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"context is not urlsafe base64: {exc}") from None
    if not raw or raw[0] != CONTEXT_VERSION:
        raise ValueError("context has an unknown format version")
    count, pos = _get_varint(raw, 1)
    if count > MAX_CONTEXT_ACTORS:
        raise ValueError(f"context names {count} actors; the limit is {MAX_CONTEXT_ACTORS}")
    counters: dict[str, int] = {}
    for _ in range(count):
        length, pos = _get_varint(raw, pos)
        if pos + length > len(raw):
            raise ValueError("truncated actor in context")
        try:
            actor = raw[pos : pos + length].decode()
        except UnicodeDecodeError:
            raise ValueError("actor in context is not UTF-8") from None
        pos += length
        counter, pos = _get_varint(raw, pos)
        if counter < 1 or actor in counters or not actor:
            raise ValueError("context has an empty actor, a zero counter or a repeated actor")
        counters[actor] = counter
    if pos != len(raw):
        raise ValueError("trailing bytes after the context")
    return VClock.of(counters)
