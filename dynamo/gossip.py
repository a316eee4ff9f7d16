"""Gossip of membership and liveness, with a heartbeat-age failure detector and SWIM-style
refutation (Dynamo §4.8; Cassandra's gossiper; Das et al., "SWIM", 2002).

Every node keeps a *view*: for each member, the highest `(incarnation, heartbeat)` it has
heard of and whether someone suspects it; plus the *ring*: the member list with a version.
Each round a node bumps its own heartbeat and swaps views with a few random peers (push
and pull); `merge` keeps, per member, the newer entry, and the ring with the higher version.

Liveness is decided locally, from how long ago a member's heartbeat last went up here:
under `suspect_after_s` it is `alive`, under `down_after_s` `suspect`, else `down`. A node
that decides a peer is suspect marks the peer's entry suspect (same incarnation) and that
mark spreads; the peer, when it hears it, *refutes*: it takes incarnation + 1, which beats
every suspect mark of the older incarnation. So a node wrongly suspected (a slow link,
a long pause) clears itself within a round or two of being heard again.

    >>> MEMBERS = [{"id": n, "client_url": "http://" + n, "peer_address": n + ":1"} for n in ("n1", "n2")]
    >>> g = GossipState("n1", MEMBERS, now=0.0, incarnation=1)
    >>> h = GossipState("n2", MEMBERS, now=0.0, incarnation=1)
    >>> g.tick(1.0); h.merge(g.digest(), now=1.0)   # False: the member list did not change
    False
    >>> h.status("n1", now=1.0)
    'alive'
    >>> h.status("n1", now=4.0), h.status("n1", now=20.0)      # no news for 3 s, then 19 s
    ('suspect', 'down')
    >>> h.mark_suspects(now=4.0)
    ['n1']
    >>> g.merge(h.digest(), now=4.5)                 # n1 hears it is suspected ...
    False
    >>> g.incarnation                                            # and refutes
    2

Time, randomness and members come in as arguments; nothing here does I/O.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Iterable, Sequence

ALIVE, SUSPECT, DOWN = "alive", "suspect", "down"
# A gossip message holds at most this many members (bounds what a peer can make us hold).
MAX_MEMBERS = 1024


@dataclasses.dataclass(frozen=True)
class GossipPolicy:
    interval_s: float = 0.5  # a round this often (Dynamo and Cassandra: 1 s)
    fanout: int = 2  # peers per round
    suspect_after_s: float = 3.0  # no heartbeat heard for this long: suspect
    down_after_s: float = 8.0  # ... and for this long: down
    # ... and, in a big cluster where news of a heartbeat takes several rounds to arrive,
    # for this many times the member's usual gap between heartbeats heard here (an
    # exponential average): the simple form of Cassandra's phi accrual, so a slow path
    # does not read as a failure.
    suspect_gaps: float = 4.0
    down_gaps: float = 10.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.fanout < 1:
            raise ValueError("interval_s must be positive and fanout at least 1")
        if not 0 < self.suspect_after_s < self.down_after_s or not 0 < self.suspect_gaps < self.down_gaps:
            raise ValueError("need 0 < suspect_after_s < down_after_s and 0 < suspect_gaps < down_gaps")


@dataclasses.dataclass(frozen=True)
class Heard:
    incarnation: int
    heartbeat: int
    suspect: bool = False  # someone suspects this incarnation

    def newer_than(self, other: "Heard") -> bool:
        return (self.incarnation, self.heartbeat) > (other.incarnation, other.heartbeat)


def merge_heard(a: Heard, b: Heard) -> Heard:
    """Higher incarnation wins; within one, the higher heartbeat, and a suspect mark sticks
    until the member refutes it with a new incarnation. Commutative, associative, idempotent."""
    if a.incarnation != b.incarnation:
        return a if a.incarnation > b.incarnation else b
    return Heard(a.incarnation, max(a.heartbeat, b.heartbeat), a.suspect or b.suspect)


def ring_digest(members: Sequence[dict]) -> str:
    text = "|".join(f"{m['id']},{m['client_url']},{m['peer_address']}" for m in sorted(members, key=lambda m: m["id"]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class GossipState:
    """One node's view. `members` are dicts {id, client_url, peer_address}."""

    def __init__(self, self_id: str, members: Iterable[dict], *, now: float, incarnation: int,
                 policy: GossipPolicy = GossipPolicy()):
        self.self_id = self_id
        self.policy = policy
        self.ring_version = 0  # 0: the cluster file; every membership change adds one
        self.members: dict[str, dict] = {}
        self.heard: dict[str, Heard] = {}
        self.last_heard: dict[str, float] = {}  # local time this node last saw the entry go up
        self.gap: dict[str, float] = {}  # average time between those, per member
        # member -> the highest ring version whose transfers it has finished ("rebalanced
        # through V"); merged by max, so it only grows. Reads consult the old owners until
        # every member that held data under the old ring reports the current version.
        self.rebalanced: dict[str, int] = {}
        self._set_members(list(members), now)
        self.heard[self_id] = Heard(incarnation, 0)
        self.refutations = 0

    @property
    def incarnation(self) -> int:
        return self.heard[self.self_id].incarnation

    def _set_members(self, members: list[dict], now: float) -> None:
        self.members = {m["id"]: dict(m) for m in members}
        for node in self.members:
            self.heard.setdefault(node, Heard(0, 0))
            self.last_heard.setdefault(node, now)  # a newcomer gets a full grace period
            self.gap.setdefault(node, self.policy.interval_s)
        for node in list(self.heard):
            if node not in self.members and node != self.self_id:
                del self.heard[node]
                self.last_heard.pop(node, None)
                self.gap.pop(node, None)
        # Departed members keep their entry (their leave's progress still spreads), within a bound.
        for node in self.members:
            self.rebalanced.setdefault(node, 0)
        if len(self.rebalanced) > MAX_MEMBERS:
            self.rebalanced = {n: v for n, v in self.rebalanced.items() if n in self.members or n == self.self_id}

    # --- our own changes ----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """A new round: our heartbeat goes up."""
        mine = self.heard[self.self_id]
        self.heard[self.self_id] = Heard(mine.incarnation, mine.heartbeat + 1)
        self.last_heard[self.self_id] = now

    def change_members(self, members: list[dict], now: float) -> None:
        """An operator's add or remove, made here: a new ring version that gossip spreads."""
        self.ring_version += 1
        self._set_members(members, now)

    def set_rebalanced(self, version: int) -> None:
        """This node has sent every key it no longer replicates on ring `version`."""
        self.rebalanced[self.self_id] = max(self.rebalanced.get(self.self_id, 0), int(version))

    def waiting_for(self, nodes: Iterable[str]) -> list[str]:
        """Which of `nodes` have not reported the current ring version rebalanced."""
        return sorted(n for n in nodes if self.rebalanced.get(n, 0) < self.ring_version)

    def mark_suspects(self, now: float) -> list[str]:
        """Mark every member we consider suspect or down; returns them."""
        marked = []
        for node in self.members:
            if node != self.self_id and self.status(node, now) != ALIVE:
                heard = self.heard[node]
                if not heard.suspect:
                    self.heard[node] = Heard(heard.incarnation, heard.heartbeat, True)
                marked.append(node)
        return marked

    # --- what we think ------------------------------------------------------------------
    def status(self, node: str, now: float) -> str:
        if node == self.self_id:
            return ALIVE
        if node not in self.members:
            return DOWN
        age = now - self.last_heard.get(node, now)
        gap = self.gap.get(node, self.policy.interval_s)
        if age >= max(self.policy.down_after_s, self.policy.down_gaps * gap):
            return DOWN
        if age >= max(self.policy.suspect_after_s, self.policy.suspect_gaps * gap) or self.heard[node].suspect:
            return SUSPECT
        return ALIVE

    def pick_peers(self, rng: random.Random) -> list[str]:
        """`fanout` random other members (down ones included: that is how we learn they are back)."""
        others = sorted(n for n in self.members if n != self.self_id)
        return rng.sample(others, min(self.policy.fanout, len(others)))

    # --- the wire -----------------------------------------------------------------------
    def digest(self) -> dict:
        return {
            "from": self.self_id,
            "ring": {"version": self.ring_version, "members": [self.members[n] for n in sorted(self.members)]},
            "nodes": {n: [h.incarnation, h.heartbeat, int(h.suspect)] for n, h in sorted(self.heard.items())},
            "rebalanced": dict(sorted(self.rebalanced.items())),
        }

    def merge(self, digest: dict, now: float) -> bool:
        """Take in a peer's view; returns True when the ring (member list) changed.
        Raises ValueError on a malformed digest, before changing anything."""
        ring, nodes = digest["ring"], digest["nodes"]
        version, members = int(ring["version"]), ring["members"]
        if not isinstance(members, list) or not isinstance(nodes, dict) or len(members) > MAX_MEMBERS or len(nodes) > MAX_MEMBERS:
            raise ValueError("a gossip digest has a member list and a node map, each of at most 1024")
        members = [{"id": str(m["id"]), "client_url": str(m["client_url"]), "peer_address": str(m["peer_address"])} for m in members]
        incoming = {str(n): Heard(int(v[0]), int(v[1]), bool(v[2])) for n, v in nodes.items()}
        rebalanced = digest.get("rebalanced") or {}  # absent from older nodes' digests
        if not isinstance(rebalanced, dict) or len(rebalanced) > MAX_MEMBERS:
            raise ValueError("rebalanced must be a map of at most 1024 members")
        rebalanced = {str(n): int(v) for n, v in rebalanced.items()}
        changed = False
        # The cluster file (version 0) never overrides; a higher version always does; two
        # different changes with one version (made at two nodes at once) settle on one.
        if version > self.ring_version or (
            version == self.ring_version and version > 0 and ring_digest(members) > ring_digest(list(self.members.values()))
        ):
            if {m["id"] for m in members} != set(self.members) or ring_digest(members) != ring_digest(list(self.members.values())):
                changed = True
            self.ring_version = version
            self._set_members(members, now)
        for node, theirs in incoming.items():
            if node not in self.members and node != self.self_id:
                continue
            mine = self.heard.get(node, Heard(0, 0))
            if node == self.self_id:
                if theirs.incarnation >= mine.incarnation and theirs.suspect:
                    self.heard[node] = Heard(theirs.incarnation + 1, mine.heartbeat)  # refute
                    self.refutations += 1
                elif theirs.incarnation > mine.incarnation:
                    # an older life of ours still circulates with a higher number: jump past it
                    self.heard[node] = Heard(theirs.incarnation + 1, mine.heartbeat)
                continue
            merged = merge_heard(mine, theirs)
            if merged.newer_than(mine):
                # a long silence (a pause, a partition) is not a usual gap: cap what it teaches
                gap = min(now - self.last_heard.get(node, now), self.policy.suspect_after_s)
                self.gap[node] = 0.8 * self.gap.get(node, self.policy.interval_s) + 0.2 * gap
                self.last_heard[node] = now
            self.heard[node] = merged
        for node, version in rebalanced.items():
            if node in self.rebalanced or node in self.members:
                self.rebalanced[node] = max(self.rebalanced.get(node, 0), version)
        return changed

    def _check(self) -> None:
        assert self.self_id in self.heard
        assert set(self.heard) <= set(self.members) | {self.self_id}
        assert set(self.members) <= set(self.heard)
        assert not self.heard[self.self_id].suspect
        assert set(self.members) <= set(self.rebalanced) and len(self.rebalanced) <= MAX_MEMBERS + len(self.members)


__all__ = ["ALIVE", "SUSPECT", "DOWN", "GossipPolicy", "GossipState", "Heard", "merge_heard", "ring_digest"]
