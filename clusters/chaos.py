"""`capkv chaos --mode cp|ap`: run a workload under faults, heal, check the history, judge.

    capkv chaos --mode cp --time 30                   # 3 nodes, partitions, kills, pauses
    capkv chaos --mode ap --faults partition,kill --clients 6 --seed 42
    capkv chaos --mode ap --conflicts lww             # lost writes are counted, not failed

What it does, in order:

1. starts a local cluster on free ports in a temp dir, its peer traffic through cuttable
   proxies (`clusters.nemesis.ProxiedCluster`), or with `--network netns` (root only) each
   node in its own network namespace, where a partition is real packet loss;
2. runs `--clients` concurrent clients for `--time` seconds, each recording every
   operation (invocation, completion, outcome) in one history (JSON lines,
   tests/checkers/history.py's format), while the nemesis injects a seeded schedule of
   faults (`clusters.nemesis.plan`) and shows each one took (a partitioned node really
   cannot reach its peers);
3. heals everything, then checks what the mode promises:
   - cp: the history is linearizable (Wing-Gong search, tests/checkers/linearizability.py)
     and the majority side kept serving during every partition;
   - ap: no acknowledged write is lost, no replaced sibling comes back, and every replica
     of every key holds the same siblings within `--converge` seconds of the heal
     (tests/checkers/ap_checker.py). Anti-entropy is not implemented in dynamo/ yet, so
     convergence is driven by read repair: the check reads each key at R=N until its
     replicas agree (what a client reading after the heal would trigger).
4. prints a verdict with counts (operations, faults, anomalies) and where the history and
   the fault log are saved; exits 0 only when the promise held and every fault was shown.

The checkers and the cp workload live under tests/ for now and are imported when a run
starts (so `capkv` works without them until the first `capkv chaos`).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from .nemesis import FAULT_KINDS, NETWORKS, Nemesis, create_cluster, http_call, namespaces_available, plan
from .launcher import LocalCluster
from .spec import resolve_secret
from .checkers.history import HistoryFull
from .workload import NodeClient, Workload, WorkloadConfig, kv_path

DEFAULT_FAULTS = ("partition", "kill", "pause")
# Keys the workload uses: few, so that clients really contend on them.
DEFAULT_KEYS = 5
MAX_CLIENTS = 64
MAX_TIME_SECONDS = 24 * 3600
# After the heal, the replicas of every key must agree within this long (ap).
DEFAULT_CONVERGE_SECONDS = 30.0
# Each request waits at most this long on the server (short: faults show as outcomes).
REQUEST_TIMEOUT_MS = 1000
CLIENT_SLACK_MS = 1000
# A client pauses this long between operations so that 2 cores are not all client.
THINK_MS = 5.0


# --- the ap workload ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class APWorkloadConfig:
    clients: int = 4
    keys: tuple[str, ...] = tuple(f"k{i}" for i in range(DEFAULT_KEYS))
    key_prefix: str = "chaos/"
    duration: float = 30.0
    timeout_ms: int = REQUEST_TIMEOUT_MS
    client_slack_ms: int = CLIENT_SLACK_MS
    # Operation mix: read-modify-write (read, then write with its context), plain read,
    # blind write (no context: a sibling of whatever is stored).
    update_weight: float = 0.5
    read_weight: float = 0.3
    blind_weight: float = 0.2
    max_ops_per_client: int = 50_000
    think_ms: float = THINK_MS
    seed: int = 0


class APWorkload(Workload):
    """Concurrent clients for an ap cluster, recording reads (with every sibling) and
    writes (with the read whose context they carry), per clusters/checkers/ap_checker.py.

    An ap 503 means fewer than W replicas acknowledged, but the write may exist on those
    that took it (Dynamo's and Riak's behaviour): it is recorded `unknown`, not `fail`.
    Only a refused connection is a `fail`.
    """

    # An update is a read and then a write: two requests per step when joining.
    requests_per_step = 2

    def _client(self, number: int) -> None:
        config = self.config
        rng = random.Random(f"{config.seed}-ap-{number}")
        client = NodeClient(timeout=(config.timeout_ms + config.client_slack_ms) / 1000)
        weights = [config.update_weight, config.read_weight, config.blind_weight]
        try:
            for sequence in range(config.max_ops_per_client):
                if self._stop.is_set() or time.monotonic() >= self._deadline:
                    return
                key = config.key_prefix + rng.choice(config.keys)
                kind = rng.choices(["update", "read", "blind"], weights)[0]
                value = f"c{number}-{sequence}"
                if kind == "blind":
                    self._write(client, rng, number, key, value, None)
                else:
                    seen = self._read(client, rng, number, key)
                    if kind == "update" and seen is not None:
                        self._write(client, rng, number, key, value, seen)
                if config.think_ms:
                    time.sleep(config.think_ms / 1000)
        except HistoryFull:
            return
        finally:
            client.close()

    def _read(self, client, rng: random.Random, number: int, key: str) -> tuple[int, str | None] | None:
        """GET at the default R; returns (read op id, context) when it answered."""

        pending = self.recorder.invoke(number, "read", key)
        url, response, error = self._send(client, rng, "GET", kv_path(key, timeout_ms=self.config.timeout_ms))
        if error:
            self._finish(pending, "read", "fail" if error[0] == "refused" else "unknown", url, error[0], error=error[1])
            return None
        body = response.body or {}
        if response.status in (200, 404):
            siblings = [_text(s) for s in body.get("siblings", [])] if response.status == 200 else []
            context = body.get("context")
            if context is None and isinstance(body.get("error"), dict):
                context = body["error"].get("context")
            self._finish(pending, "read", "ok", url, str(response.status), value=siblings[0] if siblings else None,
                         siblings=siblings, context=context)  # fmt: skip
            return pending.id, context
        if response.status not in (503, 504):
            self._unexpected(f"GET {key} at {url}: {response.status} {body}")
        self._finish(pending, "read", "fail" if response.status == 503 else "unknown", url, str(response.status),
                     error=_code(body))  # fmt: skip
        return None

    def _write(self, client, rng: random.Random, number: int, key: str, value: str, seen: tuple[int, str | None] | None) -> None:

        pending = self.recorder.invoke(number, "write", key, value=value)
        read_id, context = seen if seen is not None else (None, None)
        path = kv_path(key, timeout_ms=self.config.timeout_ms, request_id=uuid.uuid4().hex, context=context)
        url, response, error = self._send(client, rng, "PUT", path, value.encode())
        if error:
            self._finish(pending, "write", "fail" if error[0] == "refused" else "unknown", url, error[0],
                         error=error[1], read=read_id)  # fmt: skip
            return
        body = response.body or {}
        if response.status == 200:
            self._finish(pending, "write", "ok", url, "200", read=read_id)
            return
        if response.status not in (503, 504):
            self._unexpected(f"PUT {key} at {url}: {response.status} {body}")
        self._finish(pending, "write", "unknown", url, str(response.status), error=_code(body), read=read_id)



def _text(sibling: dict) -> str:
    if "value" in sibling:
        return sibling["value"]
    return base64.b64decode(sibling.get("value_base64", "")).decode("utf-8", "replace")


def _code(body: dict | None) -> str | None:
    error = (body or {}).get("error")
    return error.get("code") if isinstance(error, dict) else None


# --- replica-local reads (ap) ---------------------------------------------------------------------


def fetch_replica(cluster: LocalCluster, node: str, key: str, secret: str, timeout: float = 2.0) -> list[str] | None:
    """The live values `node`'s own replica holds for `key` (None: nothing stored), read
    with the peer `fetch` call straight at its real peer port (not through a proxy)."""
    from dynamo.transport import AUTH_HEADER, b64, sign, unb64
    from dynamo.versions import decode_object

    body = json.dumps({"key": b64(key.encode())}, separators=(",", ":")).encode()
    import urllib.request

    request = urllib.request.Request(f"http://{cluster.nodes[node].peer_address}/peer/fetch", data=body, method="POST",
                                     headers={AUTH_HEADER: sign(secret, "fetch", body),
                                              "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    if reply.get("object") is None:
        return None
    obj = decode_object(unb64(reply["object"]))
    return sorted(v.decode("utf-8", "replace") for v in obj.live_values)


def preference_list(cluster: LocalCluster, key: str) -> list[str]:
    status, body = http_call(cluster.url(next(iter(cluster.nodes))) + "/v1/cluster/preflist/"
                             + urllib.parse.quote(key, safe=""))  # fmt: skip
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"preflist of {key!r}: {status} {body}")
    return list(body["preference_list"])


def _quorum_read(url: str, key: str, n: int) -> list[str] | None:
    status, body = http_call(url + "/v1/kv/" + urllib.parse.quote(key, safe="") + f"?r={n}&timeout_ms=3000", timeout=5)
    if status == 404:
        return []
    if status == 200 and isinstance(body, dict):
        return sorted(_text(s) for s in body.get("siblings", []))
    return None


def converge_ap(cluster: LocalCluster, keys: Sequence[str], n: int, within: float,
                log: Callable[[str], None]) -> tuple[dict, dict, float | None]:  # fmt: skip
    """Read every key at R=N (read repair) until each key's primaries hold the same values;
    returns (final values by key, per-replica values by key, seconds it took or None)."""
    secret = resolve_secret(cluster.spec, cluster.data_dir)
    started = time.monotonic()
    preflists = {key: preference_list(cluster, key)[:n] for key in keys}
    urls = cluster.urls
    final: dict[str, list[str]] = {}
    replicas: dict[str, dict[str, list[str] | None]] = {}
    pending = list(keys)
    round_number = 0
    while True:
        for key in list(pending):
            values = _quorum_read(urls[round_number % len(urls)], key, n)
            if values is None:
                continue
            final[key] = values
            held: dict[str, list[str] | None] = {}
            for node in preflists[key]:
                try:
                    held[node] = fetch_replica(cluster, node, key, secret)
                except OSError as error:
                    held[node] = [f"<unreachable: {error}>"]
            replicas[key] = held
            if all((v or []) == values for v in held.values()):
                pending.remove(key)
        elapsed = time.monotonic() - started
        if not pending:
            return final, replicas, elapsed
        if elapsed >= within:
            log(f"  replicas of {len(pending)} keys still differ after {within:.0f}s")
            return final, replicas, None
        round_number += 1
        time.sleep(0.5)


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    ok: bool
    operations: int
    outcomes: dict[str, int]
    faults: dict[str, int]
    faults_unshown: int
    anomalies: int
    history_path: str
    faults_path: str
    summary: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkv chaos",
        description="Run a read/write workload against a local cluster under faults, heal, and check the history.",
    )
    parser.add_argument("--mode", choices=("cp", "ap"), required=True)
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                        help=f"comma-separated, some of {', '.join(FAULT_KINDS)} (default: {','.join(DEFAULT_FAULTS)})")
    parser.add_argument("--time", type=float, default=60.0, help="seconds of workload under faults (default 60)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and the workload (default: random)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    parser.add_argument("--keys", type=int, default=DEFAULT_KEYS, help=f"keys the clients share (default {DEFAULT_KEYS})")
    parser.add_argument("--conflicts", choices=("vclock", "lww"), default="vclock", help="ap only (default vclock)")
    parser.add_argument("--engine", choices=("memory", "hash", "lsm"), default="lsm")
    parser.add_argument("--sync", choices=("always", "batch", "never"), default="always")
    parser.add_argument("--converge", type=float, default=DEFAULT_CONVERGE_SECONDS,
                        help=f"ap: seconds the replicas get to agree after the heal (default {DEFAULT_CONVERGE_SECONDS:.0f})")
    parser.add_argument("--network", choices=NETWORKS, default="proxy",
                        help="proxy: per-link TCP proxies on loopback (default); netns: a network namespace per "
                             "node, partitions are real packet loss (root only)")
    parser.add_argument("--out", help="directory for the history, fault log and node logs (default: a new temp dir)")
    return parser


class ChaosUsageError(ValueError):
    """A bad command line: the message says what to change."""


def _validate(args: argparse.Namespace) -> list[str]:
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULT_KINDS]
    if not faults or unknown:
        raise ChaosUsageError(f"--faults must be some of {', '.join(FAULT_KINDS)}, not {args.faults!r}")
    if not 0 < args.time <= MAX_TIME_SECONDS:
        raise ChaosUsageError(f"--time must be between 0 and {MAX_TIME_SECONDS} seconds, not {args.time}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise ChaosUsageError(f"--clients must be between 1 and {MAX_CLIENTS}, not {args.clients}")
    if not 3 <= args.nodes <= 9:
        raise ChaosUsageError(f"--nodes must be between 3 and 9 (a majority must survive a fault), not {args.nodes}")
    if not 1 <= args.keys <= 1000:
        raise ChaosUsageError(f"--keys must be between 1 and 1000, not {args.keys}")
    if args.mode == "cp" and args.conflicts != "vclock":
        raise ChaosUsageError("--conflicts applies to --mode ap only")
    if args.network == "netns":
        reason = namespaces_available()
        if reason:
            raise ChaosUsageError(f"--network netns: {reason}; use --network proxy")
        if "delay" in faults:
            raise ChaosUsageError("the delay fault needs --network proxy")
    if args.converge <= 0:
        raise ChaosUsageError("--converge must be positive")
    return faults


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> RunResult:
    faults = _validate(args)
    from clusters.checkers import history as history_module

    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"capkv-chaos-{args.mode}-"))
    base.mkdir(parents=True, exist_ok=True)
    history_path = base / "history.jsonl"
    faults_path = base / "faults.jsonl"
    keys = tuple(f"k{i}" for i in range(args.keys))
    extra = ("--conflicts", args.conflicts) if args.mode == "ap" else ()
    out(f"capkv chaos: mode {args.mode}, {args.nodes} nodes, {args.clients} clients, {args.time:g}s, "
        f"faults {','.join(faults)}, seed {seed}, network {args.network}" + (f", conflicts {args.conflicts}" if args.mode == "ap" else ""))
    out(f"  working in {base}")
    cluster = create_cluster(args.network, base, nodes=args.nodes, mode=args.mode, engine=args.engine, sync=args.sync,
                             extra_args=extra, name=f"chaos-{args.mode}")  # fmt: skip
    try:
        nemesis = Nemesis(cluster)
        schedule = plan(faults, args.time, list(cluster.nodes), random.Random(seed))
        recorder = history_module.HistoryRecorder()
        if args.mode == "cp":

            workload = Workload(cluster.urls, recorder, WorkloadConfig(
                clients=args.clients, keys=keys, key_prefix="chaos/", duration=args.time, timeout_ms=REQUEST_TIMEOUT_MS,
                client_slack_ms=CLIENT_SLACK_MS, think_ms=THINK_MS, seed=seed))  # fmt: skip
        else:
            workload = APWorkload(cluster.urls, recorder, APWorkloadConfig(
                clients=args.clients, keys=keys, duration=args.time, seed=seed))  # fmt: skip
        out(f"  {len(schedule)} faults planned: " + ", ".join(f"{f.kind}({'|'.join(f.targets)})@{f.at:g}s" for f in schedule))
        stop = threading.Event()
        started = nemesis.clock()
        nemesis_thread = threading.Thread(target=nemesis.run, args=(schedule, started, stop), name="nemesis", daemon=True)
        workload.start()
        nemesis_thread.start()
        try:
            workload.join()
        finally:
            stop.set()
            nemesis_thread.join(120)
        nemesis.heal_all()
        cluster.wait_healthy(timeout=60)
        ops = recorder.history()
        history_module.save(ops, history_path)
        nemesis.save(faults_path)
        outcomes = Counter(op.outcome for op in ops)
        fault_counts = Counter(e.fault for e in nemesis.events if e.fault in FAULT_KINDS)
        unshown = nemesis.unshown()
        out(f"  workload done: {len(ops)} operations ({outcomes['ok']} ok, {outcomes['fail']} fail, "
            f"{outcomes['unknown']} unknown); faults: " + (", ".join(f"{k} {v}" for k, v in sorted(fault_counts.items())) or "none"))
        for event in unshown:
            out(f"  fault NOT shown: {event.fault} {event.targets}: {event.evidence}")
        unexpected = list(workload.unexpected)
        for line in unexpected[:10]:
            out(f"  unexpected answer: {line}")

        if args.mode == "cp":
            from clusters.checkers import linearizability

            out("  checking linearizability ...")
            verdict = linearizability.check(ops)
            anomalies = len(verdict.explanations) + len(unexpected)
            promise = verdict.valid is True
            summary = str(verdict)
            if verdict.valid is None:
                summary += "\n  (the search gave up: the verdict is inconclusive; try fewer clients or a shorter run)"
        else:
            from clusters.checkers import ap_checker

            out("  healed; reading every key at R=N until the replicas agree ...")
            written = sorted({op.key for op in ops})
            status = cluster.status(next(iter(cluster.nodes)), timeout=5.0) or {}
            replicas_per_key = int(status.get("n") or min(3, args.nodes))
            final, replicas, seconds = converge_ap(cluster, written, replicas_per_key, args.converge, out)
            final_path = base / "final.json"
            final_path.write_text(json.dumps({"final": final, "replicas": replicas}, indent=1, sort_keys=True))
            out(f"  what each key and replica held after the heal: {final_path}")
            verdict = ap_checker.check(ops, final, replicas, lww=args.conflicts == "lww", convergence_seconds=seconds)
            anomalies = verdict.anomalies + len(unexpected)
            promise = verdict.valid
            summary = str(verdict)
        injected = sum(fault_counts.values())
        ok = promise and not unshown and not unexpected and injected > 0
        verdict_line = "PASS" if ok else "FAIL"
        reasons = []
        if not promise:
            reasons.append("the history breaks the promise" if anomalies else "the check was inconclusive")
        if unshown:
            reasons.append(f"{len(unshown)} fault(s) not shown to have happened")
        if unexpected:
            reasons.append(f"{len(unexpected)} answers the API does not allow")
        if injected == 0:
            reasons.append("no fault was injected (run longer)")
        out("")
        out(summary)
        out("")
        if args.mode == "cp":
            promise_text = "linearizable, and the majority kept serving"
        elif args.conflicts == "lww":
            promise_text = (f"replicas converged; last-write-wins silently dropped {verdict.lost} of "
                            f"{verdict.acknowledged_writes} acknowledged writes, as lww does")
        else:
            promise_text = "nothing acknowledged lost, replicas converged"
        out(f"verdict: {verdict_line} ({promise_text if ok else '; '.join(reasons)})")
        out(f"  operations: {len(ops)}  faults: {injected} ({len(unshown)} not shown)  anomalies: {anomalies}")
        out(f"  history: {history_path}")
        out(f"  fault log: {faults_path}")
        out(f"  node logs: {cluster.log_dir}")
        return RunResult(ok, len(ops), dict(outcomes), dict(fault_counts), len(unshown), anomalies,
                         str(history_path), str(faults_path), summary)  # fmt: skip
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """Exit 0: the promise held and every fault was shown; 1: it did not; 2: bad arguments."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        result = run(args, out)
    except ChaosUsageError as error:
        out(f"capkv chaos: {error}")
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
