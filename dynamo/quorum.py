"""Quorum accounting for one request, with no I/O (Riak's `riak_kv_get_core` idea).

`plan_targets` picks where a request goes: each primary of the preference list that is
up, and for each primary that is down the next up fallback (sloppy quorum), which keeps
the write with a hint naming that primary. Without sloppy quorum a down primary is
simply missing.

    >>> plan_targets(["a", "b", "c"], ["d", "e"], up={"a", "c", "d", "e"}, sloppy=True)
    [Target(node='a', hint_for=None), Target(node='c', hint_for=None), Target(node='d', hint_for='b')]

`WriteTally` and `ReadTally` count replies as they arrive and say when the request can
answer (`done`) and whether it succeeded; `ReadTally.repairs()` names the replicas that
answered something older than the reconciled object (or nothing at all).

    >>> t = WriteTally(w=2, planned=3); t.ack("a"); t.fail("b"); t.done, t.ok
    (False, False)
    >>> t.ack("c"); t.done, t.ok
    (True, True)
"""
from __future__ import annotations

import dataclasses
from typing import Container, Iterable

from . import versions
from .versions import VersionedObject


@dataclasses.dataclass(frozen=True)
class Target:
    node: str
    hint_for: str | None = None  # the primary this fallback stands in for


def plan_targets(
    preference_list: list[str], fallbacks: list[str], *, up: Container[str], sloppy: bool
) -> list[Target]:
    """Primaries that are up, in ring order, then one fallback per down primary."""
    targets = [Target(node) for node in preference_list if node in up]
    if sloppy:
        spare = (node for node in fallbacks if node in up)
        for primary in preference_list:
            if primary not in up:
                fallback = next(spare, None)
                if fallback is None:
                    break
                targets.append(Target(fallback, primary))
    return targets


def next_fallback(fallbacks: list[str], used: Iterable[str], up: Container[str]) -> str | None:
    """The first fallback that is up and not already part of this request."""
    used = set(used)
    for node in fallbacks:
        if node not in used and node in up:
            return node
    return None


class WriteTally:
    """Acks for one write: succeeded once `w` nodes acknowledged; failed once that cannot happen."""

    def __init__(self, w: int, planned: int):
        if w < 1:
            raise ValueError(f"w must be at least 1, not {w}")
        self.w = w
        self.planned = planned  # replicas still able to answer (grows when a fallback is added)
        self.acked: list[str] = []
        self.failed: list[str] = []

    def ack(self, node: str) -> None:
        if node not in self.acked:
            self.acked.append(node)

    def fail(self, node: str) -> None:
        self.failed.append(node)

    def add_replacement(self) -> None:
        self.planned += 1

    @property
    def ok(self) -> bool:
        return len(self.acked) >= self.w

    @property
    def done(self) -> bool:
        return self.ok or len(self.acked) + (self.planned - len(self.acked) - len(self.failed)) < self.w


class ReadTally:
    """Replies for one read: `done` after `r` replies (a not-found counts as a reply)."""

    def __init__(self, r: int, planned: int, *, lww: bool = False, wait_all: bool = False):
        if r < 1:
            raise ValueError(f"r must be at least 1, not {r}")
        self.r = r
        self.wait_all = wait_all  # done only when every planned replica answered or failed
        self.planned = planned
        self.lww = lww
        self.replies: dict[str, VersionedObject | None] = {}
        self.failed: list[str] = []
        # Replicas usually hold byte-identical copies (the versioning replica's encoding is
        # stored as is): equal bytes are decoded once and merged once (merge is idempotent).
        self._decoded: dict[bytes, VersionedObject] = {}
        self._answers = 0  # replies taken, to know when `reconciled` must merge again
        self._merged: tuple[int, VersionedObject | None] | None = None

    def reply(self, node: str, obj: VersionedObject | None) -> None:
        self.replies[node] = obj
        self._answers += 1

    def reply_encoded(self, node: str, raw: bytes | None) -> None:
        """`reply` with the object in `versions.encode_object` form (ValueError if malformed)."""
        if raw is None:
            self.reply(node, None)
            return
        obj = self._decoded.get(raw)
        if obj is None:
            obj = self._decoded[raw] = versions.decode_object(raw)
        self.reply(node, obj)

    def fail(self, node: str) -> None:
        self.failed.append(node)

    def add_replacement(self) -> None:
        self.planned += 1

    @property
    def ok(self) -> bool:
        return len(self.replies) >= self.r

    @property
    def done(self) -> bool:
        outstanding = self.planned - len(self.replies) - len(self.failed)
        if self.wait_all:
            return outstanding <= 0
        return self.ok or len(self.replies) + outstanding < self.r

    def reconciled(self) -> VersionedObject | None:
        """The merge of every reply so far (merged again only after a new reply)."""
        if self._merged is None or self._merged[0] != self._answers:
            distinct = {id(obj): obj for obj in self.replies.values() if obj is not None}
            self._merged = (self._answers, versions.merge_all(distinct.values(), lww=self.lww))
        return self._merged[1]

    def repairs(self, exclude: Container[str] = ()) -> list[str]:
        """Nodes whose reply differs from the reconciled object (stale or missing)."""
        merged = self.reconciled()
        if merged is None:
            return []
        return sorted(
            node for node, obj in self.replies.items() if node not in exclude and obj is not merged and not merged.same_as(obj)
        )
