"""Did an ap (Dynamo-style) cluster keep its promise? Lost writes, resurrections, convergence.

The ap mode does not promise linearizability. It promises that, once the faults are
healed and the replicas have exchanged what they hold, nothing acknowledged is lost:
every write acknowledged by W replicas with W + R > N is still visible, as itself or
through a write that causally replaced it, and every replica of a key holds the same
siblings. This module checks exactly that on a history (tests/checkers/history.py format)
plus what the cluster holds after the heal.

What an ap history carries beyond the common format (in `result`):

- read: `siblings`: every value the read returned (`value` holds the first, for people);
  `[]` for a 404.
- write: `read`: the id of the read whose causal context the write sent (absent or null:
  a blind write, concurrent with whatever is stored).

Causality comes from the contexts: a write `w2` made with the context of read `r`
replaces every write whose value `r` returned, and, transitively, what those replaced.
Those are the only writes the store may drop. So for each key, with F the values it
holds after the heal:

- lost: an acknowledged write `w` such that neither `w` nor any write that (transitively)
  replaced it has its value in F. With `--conflicts lww` this is expected (the store keeps
  the write with the latest timestamp and drops concurrent ones): lost writes are counted
  and reported, not failed.
- resurrected (vclock only): a value in F whose write was replaced by an *acknowledged*
  write: a resolved sibling came back. This is also what keeps siblings bounded: F can
  only hold writes no acknowledged write replaced.
- phantom: a read or final value that no write of the history wrote (and not `initial`).
- divergent: replicas of a key that, after the convergence wait, hold different siblings.

Example (vclock): c1 reads k -> [] and writes 'a' with that context (ok); c2 writes 'b'
blind (ok); c1 reads k -> ['a', 'b'] and writes 'c' with that context (ok). Then F must
be ['c']: 'a' and 'b' were replaced by 'c'. F = ['a', 'c'] is a resurrection;
F = ['b'] loses 'c' (and 'a', replaced only by 'c').
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from .history import Op

# How many examples of each anomaly a verdict keeps (counts are always complete).
MAX_EXAMPLES = 20


@dataclasses.dataclass
class APVerdict:
    """Counts and examples; `valid` is the mode's promise (lww losses do not count against it)."""

    operations: int = 0
    reads: int = 0
    writes: int = 0
    acknowledged_writes: int = 0
    keys: int = 0
    lost: int = 0
    lost_examples: list[str] = dataclasses.field(default_factory=list)
    lww: bool = False
    resurrected: int = 0
    resurrected_examples: list[str] = dataclasses.field(default_factory=list)
    phantoms: int = 0
    phantom_examples: list[str] = dataclasses.field(default_factory=list)
    divergent: int = 0
    divergent_examples: list[str] = dataclasses.field(default_factory=list)
    missing_final: list[str] = dataclasses.field(default_factory=list)  # keys with no final read
    max_siblings_read: int = 0
    max_siblings_final: int = 0
    convergence_seconds: float | None = None

    @property
    def anomalies(self) -> int:
        """Everything that breaks the promise (lww's lost writes excluded)."""
        lost = 0 if self.lww else self.lost
        return lost + self.resurrected + self.phantoms + self.divergent + len(self.missing_final)

    @property
    def valid(self) -> bool:
        return self.anomalies == 0

    def __str__(self) -> str:
        lines = [
            f"{'valid' if self.valid else 'INVALID'}: {self.operations} operations ({self.reads} reads, {self.writes} "
            f"writes, {self.acknowledged_writes} acknowledged) on {self.keys} keys",
            f"lost acknowledged writes: {self.lost}" + (" (lww: expected, reported not failed)" if self.lww and self.lost else ""),
            f"resurrected: {self.resurrected}, phantom values: {self.phantoms}, divergent keys: {self.divergent}",
            f"siblings: at most {self.max_siblings_read} in a read, {self.max_siblings_final} after the heal",
        ]
        if self.convergence_seconds is not None:
            lines.append(f"replicas converged {self.convergence_seconds:.1f}s after the heal")
        if self.missing_final:
            lines.append(f"no final read for keys: {', '.join(self.missing_final[:MAX_EXAMPLES])}")
        # Under lww losses are expected and can be many: a few examples are enough.
        lost_examples = self.lost_examples[:5] if self.lww else self.lost_examples
        for title, examples in (("lost", lost_examples), ("resurrected", self.resurrected_examples),
                                ("phantom", self.phantom_examples), ("divergent", self.divergent_examples)):  # fmt: skip
            lines.extend(f"  {title}: {e}" for e in examples)
        return "\n".join(lines)


def siblings_of(op: Op) -> list[str]:
    """The values a read returned (its `result.siblings`, else its single `value`)."""
    if op.result and isinstance(op.result.get("siblings"), list):
        return [v for v in op.result["siblings"] if isinstance(v, str)]
    return [] if op.value is None else [op.value]


def replaced_by(ops: Sequence[Op]) -> dict[int, set[int]]:
    """For each write id, the ids of the writes that directly replaced it (through the
    context of a read that returned its value). Only writes of the same key count."""
    by_id = {op.id: op for op in ops}
    writer_of: dict[tuple[str, str], int] = {}
    for op in ops:
        if op.op == "write":
            writer_of[(op.key, op.value)] = op.id
    edges: dict[int, set[int]] = defaultdict(set)
    for op in ops:
        if op.op != "write" or not op.result:
            continue
        read = by_id.get(op.result.get("read"))
        if read is None or read.op != "read" or read.key != op.key or read.outcome != "ok":
            continue
        for value in siblings_of(read):
            earlier = writer_of.get((op.key, value))
            if earlier is not None and earlier != op.id:
                edges[earlier].add(op.id)
    return edges


def _descendants(start: int, edges: Mapping[int, set[int]]) -> set[int]:
    seen: set[int] = set()
    stack = [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def check(
    ops: Iterable[Op],
    final: Mapping[str, Sequence[str]],
    replicas: Mapping[str, Mapping[str, Sequence[str] | None]] | None = None,
    *,
    lww: bool = False,
    initial: Mapping[str, Sequence[str]] | None = None,
    convergence_seconds: float | None = None,
) -> APVerdict:
    """Check an ap history against what the cluster holds after the heal.

    `final`: key -> values a quorum read returned after the heal (every key the history
    wrote must be there). `replicas`: key -> {node: values held by that replica alone, or
    None when it holds nothing}, taken after the convergence wait, for the divergence
    check (omit to skip it). `initial`: values keys held before the history.

        >>> from clusters.checkers.history import Op
        >>> w = Op(0, 1, "write", "k", "a", invoke=0.0, complete=1.0, outcome="ok")
        >>> check([w], {"k": []}).lost
        1
        >>> check([w], {"k": ["a"]}, {"k": {"n1": ["a"], "n2": ["a"]}}).valid
        True
    """
    ops = list(ops)
    verdict = APVerdict(operations=len(ops), lww=lww, convergence_seconds=convergence_seconds)
    initial = initial or {}
    edges = replaced_by(ops)
    by_id = {op.id: op for op in ops}
    written: dict[str, set[str]] = defaultdict(set)
    for key, values in initial.items():
        written[key].update(values)
    keys = set(final)
    for op in ops:
        keys.add(op.key)
        if op.op == "write":
            verdict.writes += 1
            written[op.key].add(op.value)
            if op.outcome == "ok":
                verdict.acknowledged_writes += 1
        elif op.op == "read":
            verdict.reads += 1
            if op.outcome == "ok":
                verdict.max_siblings_read = max(verdict.max_siblings_read, len(siblings_of(op)))
    verdict.keys = len(keys)

    for op in ops:
        if op.op == "read" and op.outcome == "ok":
            for value in siblings_of(op):
                if value not in written[op.key]:
                    verdict.phantoms += 1
                    _note(verdict.phantom_examples, f"{op.describe()} returned {value!r}, which no write wrote")

    for key in sorted(keys):
        if key not in final:
            if any(op.key == key and op.op == "write" for op in ops):
                verdict.missing_final.append(key)
            continue
        held = set(final[key])
        verdict.max_siblings_final = max(verdict.max_siblings_final, len(held))
        for value in sorted(held - written[key]):
            verdict.phantoms += 1
            _note(verdict.phantom_examples, f"key {key!r} holds {value!r} after the heal, which no write wrote")

    writer_of = {(op.key, op.value): op for op in ops if op.op == "write"}
    for op in ops:
        if op.op != "write" or op.key not in final:
            continue
        held = set(final[op.key])
        later = _descendants(op.id, edges)
        if op.outcome == "ok" and op.value not in held and not any(by_id[d].value in held for d in later):
            verdict.lost += 1
            _note(verdict.lost_examples, f"{op.describe()}: after the heal {op.key!r} holds "
                  f"{sorted(held)}, neither it nor a write that replaced it")  # fmt: skip
    if not lww:
        for key, values in final.items():
            for value in values:
                write = writer_of.get((key, value))
                if write is None:
                    continue
                acked = sorted(d for d in _descendants(write.id, edges) if by_id[d].outcome == "ok")
                if acked:
                    verdict.resurrected += 1
                    _note(verdict.resurrected_examples, f"{key!r} holds {value!r} after the heal, but "
                          f"{by_id[acked[0]].describe()} replaced it")  # fmt: skip

    for key, held_by in sorted((replicas or {}).items()):
        states = {node: (None if values is None else tuple(sorted(values))) for node, values in held_by.items()}
        if len(set(states.values())) > 1:
            verdict.divergent += 1
            _note(verdict.divergent_examples, f"{key!r}: " + ", ".join(f"{n}={list(v) if v is not None else None}"
                                                                       for n, v in sorted(states.items())))  # fmt: skip
    return verdict


def _note(examples: list[str], text: str) -> None:
    if len(examples) < MAX_EXAMPLES:
        examples.append(text)


__all__ = ["APVerdict", "check", "replaced_by", "siblings_of"]
