"""Local failure detection, good enough for sloppy quorum (Dynamo §4.8.3: a node is
down for me when it does not answer me; there is no global view yet, gossip comes later).

A peer is `alive` until a request to it fails (refused, timed out, or an error reply from
its transport). One failure makes it `suspect`, `down_after` failures in a row make it
`down`. Both are left out of new requests' targets and probed every `probe_interval_s`
until one probe (or any request) succeeds, which makes it `alive` again.

    >>> fd = FailureDetector(["n1", "n2"], "n1")
    >>> fd.record_failure("n2", now=10.0); fd.status("n2"), fd.due_probes(10.0), fd.due_probes(10.5)
    ('suspect', [], ['n2'])
    >>> fd.record_success("n2", now=10.6), fd.status("n2")   # True: it came back
    (True, 'alive')
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

ALIVE, SUSPECT, DOWN = "alive", "suspect", "down"


@dataclasses.dataclass
class PeerState:
    status: str = ALIVE
    failures: int = 0  # in a row
    next_probe: float = 0.0
    last_change: float = 0.0


class FailureDetector:
    def __init__(self, nodes: Iterable[str], self_id: str, *, down_after: int = 3, probe_interval_s: float = 0.5):
        if down_after < 1 or probe_interval_s <= 0:
            raise ValueError("down_after must be >= 1 and probe_interval_s > 0")
        self.self_id = self_id
        self.down_after = down_after
        self.probe_interval_s = probe_interval_s
        self._peers: dict[str, PeerState] = {}
        self.set_members(nodes)

    def set_members(self, nodes: Iterable[str]) -> None:
        nodes = set(nodes)
        self._peers = {n: self._peers.get(n, PeerState()) for n in nodes if n != self.self_id}

    def status(self, node: str) -> str:
        if node == self.self_id:
            return ALIVE
        state = self._peers.get(node)
        return state.status if state else DOWN

    def up(self) -> set[str]:
        return {self.self_id} | {n for n, s in self._peers.items() if s.status == ALIVE}

    def record_success(self, node: str, now: float) -> bool:
        """Returns True when this revived a peer that was not alive (handoff may start)."""
        state = self._peers.get(node)
        if state is None:
            return False
        revived = state.status != ALIVE
        state.status, state.failures = ALIVE, 0
        if revived:
            state.last_change = now
        return revived

    def record_failure(self, node: str, now: float) -> None:
        state = self._peers.get(node)
        if state is None:
            return
        state.failures += 1
        status = DOWN if state.failures >= self.down_after else SUSPECT
        if status != state.status:
            state.last_change = now
        state.status = status
        state.next_probe = now + self.probe_interval_s

    def due_probes(self, now: float) -> list[str]:
        return sorted(n for n, s in self._peers.items() if s.status != ALIVE and s.next_probe <= now)

    def _check(self) -> None:
        assert self.self_id not in self._peers
        for state in self._peers.values():
            assert state.status in (ALIVE, SUSPECT, DOWN)
            assert (state.status == ALIVE) == (state.failures == 0)


class CombinedDetector:
    """The request-failure detector above, joined with gossip's heartbeat view: a peer is
    alive only when both say so, suspect or down when either does (the worse one wins).
    Same interface as `FailureDetector`, so the coordinator does not know the difference.

        >>> fd = FailureDetector(["n1", "n2"], "n1")
        >>> both = CombinedDetector(fd, lambda node: "suspect" if node == "n2" else "alive")
        >>> both.status("n2"), sorted(both.up())
        ('suspect', ['n1'])
    """

    _RANK = {ALIVE: 0, SUSPECT: 1, DOWN: 2}

    def __init__(self, requests: FailureDetector, gossip_status):
        self.requests = requests
        self.gossip_status = gossip_status
        self.self_id = requests.self_id

    def status(self, node: str) -> str:
        if node == self.self_id:
            return ALIVE
        a, b = self.requests.status(node), self.gossip_status(node)
        return a if self._RANK[a] >= self._RANK[b] else b

    def up(self) -> set[str]:
        return {self.self_id} | {n for n in self.requests._peers if self.status(n) == ALIVE}

    def record_success(self, node: str, now: float) -> bool:
        return self.requests.record_success(node, now)

    def record_failure(self, node: str, now: float) -> None:
        self.requests.record_failure(node, now)

    def due_probes(self, now: float) -> list[str]:
        return self.requests.due_probes(now)

    def set_members(self, nodes) -> None:
        self.requests.set_members(nodes)

    def _check(self) -> None:
        self.requests._check()
