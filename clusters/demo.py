"""`capkv demo partition --mode cp|ap [--conflicts lww]`: the CAP trade-off, live.

Starts a 3-node cluster on free local ports (a temp dir, peer traffic through cuttable
proxies), writes a key, cuts {n1} off from {n2, n3}, writes and reads the key on both
sides, heals, reads again, and narrates each step side by side:

    cp: the minority (n1) refuses, the majority (n2, n3) serves, and after the heal
        everyone agrees on the majority's value: consistent, not always available.
    ap: both sides accept; after the heal a read returns both values as siblings for the
        client to resolve (with --conflicts lww the cluster silently keeps one and the
        other write is gone): available, not consistent.

The exit code is 0 when the cluster behaved as its mode promises, 1 when it did not, and
2 for bad arguments. Runnable as `python -m clusters.demo partition --mode cp`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import textwrap
import time
import urllib.parse
from typing import Any, Callable, Sequence

from .launcher import LocalCluster
from .nemesis import NETWORKS, FaultNotShown, Nemesis, create_cluster, http_call

KEY = "greeting"
# How long the demo waits for the cluster to notice a cut or a heal before it gives up.
SETTLE_TIMEOUT_SECONDS = 20.0
REQUEST_TIMEOUT_MS = 2000
COLUMN = 36


@dataclasses.dataclass
class Step:
    """One line of the story: what was done, and what each side saw."""

    what: str
    left: str = ""  # n1, the side that ends up alone
    right: str = ""  # n2, with n3: the majority


class Story:
    """Collects steps and facts, prints them as they happen."""

    def __init__(self, out: Callable[[str], None]):
        self.out = out
        self.steps: list[Step] = []
        self.facts: dict[str, Any] = {}

    def say(self, text: str) -> None:
        self.out(textwrap.fill(text, width=2 * COLUMN + 24))

    def header(self) -> None:
        self.out(f"{'':22}  {'n1 (will be cut off)':<{COLUMN}}  {'n2 (with n3: the majority)'}")
        self.out(f"{'':22}  {'-' * COLUMN}  {'-' * COLUMN}")

    def step(self, what: str, left: str = "", right: str = "") -> None:
        step = Step(what, left, right)
        self.steps.append(step)
        lefts = textwrap.wrap(left, COLUMN) or [""]
        rights = textwrap.wrap(right, COLUMN) or [""]
        for index in range(max(len(lefts), len(rights))):
            label = what if index == 0 else ""
            l = lefts[index] if index < len(lefts) else ""
            r = rights[index] if index < len(rights) else ""
            self.out(f"{label:<22}  {l:<{COLUMN}}  {r:<{COLUMN}}".rstrip())


def _kv(url: str, method: str = "GET", value: str | None = None, context: str | None = None,
        **params: Any) -> tuple[int, dict | str]:  # fmt: skip
    params = {k: v for k, v in params.items() if v is not None}
    params.setdefault("timeout_ms", REQUEST_TIMEOUT_MS)
    if context:
        params["context"] = context
    path = f"/v1/kv/{urllib.parse.quote(KEY, safe='')}?" + urllib.parse.urlencode(params)
    body = value.encode() if value is not None else None
    return http_call(url + path, method, body, timeout=REQUEST_TIMEOUT_MS / 1000 + 3)


def _error(status: int, body: dict | str) -> str:
    if status == 0:
        return f"no answer ({body})"
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    return f"{status} {code or ''}".strip()


def _values(body: dict | str) -> list[str]:
    if not isinstance(body, dict):
        return []
    if "siblings" in body:
        return sorted(s.get("value", "<binary>") for s in body["siblings"])
    return [body["value"]] if "value" in body else []


def _shown(values: list[str]) -> str:
    return " + ".join(repr(v) for v in values) if values else "nothing"


def _cut_note(evidence: dict) -> str:
    if "cut_link_refusals" in evidence:
        return f"{evidence['cut_link_refusals']} peer connections refused"
    return "packets to n2 vanish: a connect times out"


def _wait(predicate: Callable[[], bool], timeout: float = SETTLE_TIMEOUT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# --- the story, one sequence for both modes ------------------------------------------------------


class Script:
    """What a mode does differently in the one story `run_partition` tells: how it waits
    and what it checks. The steps and their order are the same for both modes:

        1. write 'hello' on n2, read it on n1    2. cut {n1} off {n2, n3}
        3-4. write and read on both sides        5. heal and read (6. ap: resolve)
        then the verdict: did the cluster behave as its mode promises?
    """

    intro = ""

    def replicated(self, n1: str) -> None:
        """Return once n1 holds the first write (if the mode lets n1 read it at all)."""

    def cut_seen(self, note: str) -> str:
        return f"cut: {note}"

    def during_cut(self, n1: str, n2: str, story: Story) -> None:
        raise NotImplementedError

    def after_heal(self, cluster: LocalCluster, n1: str, n2: str, story: Story) -> None:
        raise NotImplementedError

    def verdict(self, story: Story) -> bool:
        raise NotImplementedError


def run_partition(cluster: LocalCluster, nemesis: Nemesis, story: Story, script: Script) -> bool:
    n1, n2 = cluster.url("n1"), cluster.url("n2")
    story.say(script.intro)
    story.out("")
    story.header()
    status, body = _kv(n2, "PUT", "hello")
    if status != 200:
        story.step("1. write 'hello'", "", _error(status, body))
        return False
    script.replicated(n1)
    story.step("1. write 'hello'", f"GET -> {_shown(_values(_kv(n1)[1]))} (replicated here too)", "PUT -> 200 ok")

    nemesis.partition([["n1"], ["n2", "n3"]])
    try:
        evidence = nemesis.prove_partition(timeout=SETTLE_TIMEOUT_SECONDS)
    except FaultNotShown as error:
        story.step("2. cut n1 off", str(error)[:200], "")
        return False
    story.step("2. cut n1 off", script.cut_seen(_cut_note(evidence.evidence)), "n3 still reachable")

    script.during_cut(n1, n2, story)
    nemesis.heal()
    script.after_heal(cluster, n1, n2, story)
    story.out("")
    return script.verdict(story)


# --- cp --------------------------------------------------------------------------------------


class CPScript(Script):
    intro = ("cp mode: Raft. A write needs a majority (2 of 3); a read is linearizable: it "
             "checks with a majority that it is not stale.")

    def replicated(self, n1: str) -> None:
        _wait(lambda: _kv(n1, consistency="serializable")[0] == 200, 10)

    def during_cut(self, n1: str, n2: str, story: Story) -> None:
        self.left_status, left_body = _kv(n1, "PUT", "from-n1")
        self.right_status, right_body = _kv(n2, "PUT", "from-n2")
        why = "gave up: no majority answered in time" if self.left_status == 504 else "refused: no majority here"
        story.step("3. write", f"PUT 'from-n1' -> {_error(self.left_status, left_body)}: {why}",
                   f"PUT 'from-n2' -> {self.right_status} ok" if self.right_status == 200
                   else _error(self.right_status, right_body))  # fmt: skip
        self.left_read = _kv(n1)
        self.right_read = _kv(n2)
        story.step("4. read", f"GET -> {_error(*self.left_read)}: refused rather than risk a stale answer",
                   f"GET -> {_shown(_values(self.right_read[1]))}" if self.right_read[0] == 200
                   else _error(*self.right_read))  # fmt: skip
        stale = _kv(n1, consistency="serializable")
        story.step("   (serializable)", f"GET ?consistency=serializable -> {_shown(_values(stale[1]))}: "
                   "n1's own copy, stale, on request only", "")

    def after_heal(self, cluster: LocalCluster, n1: str, n2: str, story: Story) -> None:
        _wait(lambda: _kv(n1)[0] == 200)
        self.after = {"n1": _kv(n1), "n2": _kv(n2)}
        story.step("5. heal, read", f"GET -> {_shown(_values(self.after['n1'][1]))}",
                   f"GET -> {_shown(_values(self.after['n2'][1]))}")

    def verdict(self, story: Story) -> bool:
        left_status, left_read, right_read = self.left_status, self.left_read, self.right_read
        minority_refused = left_status in (503, 504) and left_read[0] in (503, 504)
        majority_served = self.right_status == 200 and right_read[0] == 200 and _values(right_read[1]) == ["from-n2"]
        consistent = all(s == 200 and _values(b) == ["from-n2"] for s, b in self.after.values())
        story.facts.update(minority_refused=minority_refused, majority_served=majority_served,
                           consistent_after_heal=consistent, minority_write_status=left_status,
                           minority_read_status=left_read[0])  # fmt: skip
        if minority_refused and majority_served and consistent:
            story.say("What happened: n1, alone, refused both the write and the read (it cannot tell whether it is "
                      "stale), while n2 and n3 kept serving. After the heal every node agrees on 'from-n2'; n1's "
                      "refused write never happened. Consistent, but not available on the minority side: CP.")
            return True
        story.say(f"Unexpected for cp: {story.facts}")
        return False


# --- ap --------------------------------------------------------------------------------------


def _all_alive(cluster: LocalCluster) -> bool:
    for node in cluster.nodes:
        status, body = http_call(cluster.url(node) + "/v1/cluster")
        if status != 200 or any(m.get("status") != "alive" for m in body.get("members", [])):
            return False
    return True


class APScript(Script):
    def __init__(self, lww: bool):
        self.lww = lww
        how = "last write wins by timestamp (--conflicts lww)" if lww else "vector clocks keep concurrent writes as siblings"
        self.intro = f"ap mode: Dynamo-style. N=3 copies of each key, R=2, W=2; {how}. Any node coordinates any request."

    def cut_seen(self, note: str) -> str:
        return f"cut: sees n2, n3 down ({note})"

    def during_cut(self, n1: str, n2: str, story: Story) -> None:
        # Each side reads (to get the causal context) and writes over what it read. n1 alone
        # holds one copy, so these requests ask for one reply (r=1, w=1): with W=2 it would
        # refuse, because a 3-node cluster has no spare node to stand in (sloppy quorum).
        left_seen = _kv(n1, r=1)
        right_seen = _kv(n2, r=1)
        left_context = left_seen[1].get("context") if isinstance(left_seen[1], dict) else None
        right_context = right_seen[1].get("context") if isinstance(right_seen[1], dict) else None
        self.left_status, left_body = _kv(n1, "PUT", "from-n1", context=left_context, w=1)
        self.right_status, right_body = _kv(n2, "PUT", "from-n2", context=right_context, w=1)
        story.step("3. read, write w=1", f"saw {_shown(_values(left_seen[1]))}; PUT 'from-n1' -> "
                   + ("200 ok, accepted" if self.left_status == 200 else _error(self.left_status, left_body)),
                   f"saw {_shown(_values(right_seen[1]))}; PUT 'from-n2' -> "
                   + ("200 ok, accepted" if self.right_status == 200 else _error(self.right_status, right_body)))  # fmt: skip
        self.left_read, self.right_read = _kv(n1, r=1), _kv(n2, r=1)
        story.step("4. read r=1", f"GET -> {_shown(_values(self.left_read[1]))}",
                   f"GET -> {_shown(_values(self.right_read[1]))}")

    def after_heal(self, cluster: LocalCluster, n1: str, n2: str, story: Story) -> None:
        self.healed = _wait(lambda: _all_alive(cluster))
        final = _kv(n2, r=3)
        final_n1 = _kv(n1, r=3)
        self.values = values = _values(final[1])
        story.step("5. heal, read r=3", f"GET -> {_shown(_values(final_n1[1]))}",
                   f"GET -> {_shown(values)}" + (f" ({len(values)} siblings)" if len(values) > 1 else ""))  # fmt: skip
        self.both_accepted = self.left_status == 200 and self.right_status == 200
        self.diverged = _values(self.left_read[1]) == ["from-n1"] and _values(self.right_read[1]) == ["from-n2"]
        story.facts.update(both_accepted=self.both_accepted, diverged=self.diverged, healed=self.healed,
                           final_values=values, final_values_n1=_values(final_n1[1]))  # fmt: skip
        if not self.lww and values == ["from-n1", "from-n2"]:
            context = final[1].get("context")
            status, _ = _kv(n2, "PUT", "from-n1 and from-n2", context=context)
            resolved = _kv(n1, r=3)
            story.step("6. resolve", f"GET -> {_shown(_values(resolved[1]))}",
                       f"PUT 'from-n1 and from-n2' with the context -> {status}")
            story.facts["resolved"] = _values(resolved[1]) == ["from-n1 and from-n2"]

    def verdict(self, story: Story) -> bool:
        values = self.values
        if not (self.both_accepted and self.diverged and self.healed):
            story.say(f"Unexpected for ap: {story.facts}")
            return False
        if self.lww:
            kept = values[0] if len(values) == 1 else None
            lost = {"from-n1", "from-n2"} - {kept}
            story.facts["lost"] = sorted(lost)
            if kept in ("from-n1", "from-n2") and len(lost) == 1:
                story.say(f"What happened: both sides accepted a write while they could not talk. After the heal the "
                          f"cluster kept {kept!r}, the one with the later timestamp, and silently dropped "
                          f"{sorted(lost)[0]!r}, although that write was acknowledged. Available, not consistent: "
                          "AP, with last-write-wins losing a write.")
                return True
            story.say(f"Unexpected for ap with lww: after the heal the key holds {_shown(values)}")
            return False
        if values == ["from-n1", "from-n2"] and story.facts.get("resolved"):
            story.say("What happened: both sides accepted a write while they could not talk, and each side read "
                      "its own. After the heal a read returns both as siblings: nothing acknowledged was lost, and "
                      "the client decides (here by writing a merge with the context it read). Available, not "
                      "consistent: AP. (The writes during the cut asked for w=1: n1 alone holds one of the "
                      "three copies; with the default W=2 it would answer 503, since a 3-node cluster has "
                      "no spare node to stand in for the unreachable ones.)")
            return True
        story.say(f"Unexpected for ap: after the heal the key holds {_shown(values)}")
        return False


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capkv demo", description="See the CAP trade-off on a local 3-node cluster.")
    sub = parser.add_subparsers(dest="demo", required=True)
    partition = sub.add_parser("partition", help="cut {n1} off from {n2, n3}, write on both sides, heal, read")
    partition.add_argument("--mode", choices=("cp", "ap"), required=True)
    partition.add_argument("--conflicts", choices=("vclock", "lww"), default="vclock",
                           help="ap only: vclock keeps concurrent writes as siblings (default); lww keeps the latest")
    partition.add_argument("--engine", default="memory", choices=("memory", "hash", "lsm"))
    partition.add_argument("--network", choices=NETWORKS, default="proxy",
                           help="proxy: cuttable TCP proxies on loopback (default); netns: a network namespace "
                                "per node, the cut drops packets (root only)")
    partition.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) and print where it is")
    partition.add_argument("--json", dest="json_path", help="also write the facts the demo checked to this file")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    if args.mode == "cp" and args.conflicts != "vclock":
        out("capkv demo: --conflicts applies to --mode ap only")
        return 2
    base = tempfile.mkdtemp(prefix=f"capkv-demo-{args.mode}-")
    story = Story(out)
    extra = ("--conflicts", args.conflicts) if args.mode == "ap" else ()
    how = "peer traffic through cuttable proxies" if args.network == "proxy" else "each in its own network namespace"
    out(f"Starting a 3-node {args.mode} cluster on this machine (n1, n2, n3; {how})...")
    cluster = None
    ok = False
    try:
        cluster = create_cluster(args.network, base, nodes=3, mode=args.mode, engine=args.engine, sync="never",
                                 extra_args=extra, name=f"demo-{args.mode}")  # fmt: skip
        nemesis = Nemesis(cluster)
        script = CPScript() if args.mode == "cp" else APScript(lww=args.conflicts == "lww")
        ok = run_partition(cluster, nemesis, story, script)
    except Exception as error:  # noqa: BLE001 - the demo reports and exits non-zero
        out(f"capkv demo: {type(error).__name__}: {error}")
        ok = False
    finally:
        if cluster is not None:
            cluster.stop()
        if args.keep or not ok:
            out(f"(logs and data kept in {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)
    story.facts["ok"] = ok
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(story.facts, f, indent=2, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
