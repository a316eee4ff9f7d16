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


# --- the member list on disk -----------------------------------------------------------------
# A node keeps the newest member list it knows (with its gossip ring version) in its data
# directory, so a ring change survives a restart of the whole cluster; the cluster file
# stays the seed (version 0) and a stored list is used only when its version is higher.
RING_FILE = "ap-members.json"
_RING_FORMAT = 1


def save_ring(path: str, version: int, members: list[dict]) -> None:
    """Replace the file at `path` atomically and durably: write a temp file, fsync it,
    rename it over `path`, fsync the directory."""
    import json
    import os

    body = json.dumps({"format": _RING_FORMAT, "ring_version": int(version),
                       "members": sorted(members, key=lambda m: m["id"])}, sort_keys=True).encode()
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_ring(path: str) -> tuple[int, list[dict]] | None:
    """(ring version, members) from `path`, or None when there is no file. Raises
    ValueError on a file that does not parse (a half-written file cannot exist: see
    `save_ring`), rather than silently starting from an older member list."""
    import json

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.get("format") != _RING_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        members = [{"id": str(m["id"]), "client_url": str(m["client_url"]), "peer_address": str(m["peer_address"])}
                   for m in data["members"]]
        return int(data["ring_version"]), members
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a member list ({exc}); remove it to start from the cluster file") from None
