"""Linearizability of a cp cluster under faults, checked from recorded client histories.

Several clients read, write and compare-and-swap a few keys through random nodes while the
leader is SIGKILLed and restarted, a node (the leader, in one round) is frozen with
SIGSTOP and thawed, or the leader is cut off from its peers by a partition while clients
still reach it. Every operation is recorded (invocation, completion, outcome) and the
history is checked key by key with `clusters.checkers.linearizability`, and for global
revision order with `clusters.checkers.revisions`. The history is saved (to
$CAPKV_HISTORY_DIR, else the test's tmp dir) and its path printed with the fault log;
to look at one again:

    python -m clusters.checkers.linearizability PATH.jsonl

The default runs take ~30 s of workload each; the `slow` ones run for minutes (fixed,
random and planned schedules; `CAPKV_NEMESIS_SEED` replays a random one).

The first tests run the workload against an in-process register server (correct, with
refusals and unknown outcomes, lying about failures, serving stale reads), so that the
recording and the checker are known to catch what they should, end to end, before they
judge the real cluster.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clusters.checkers import linearizability
from clusters.checkers.history import HistoryRecorder, save
from clusters.checkers.revisions import check_revisions
from clusters.workload import Workload, WorkloadConfig, wait_for_write

# Where failing histories go (kept after the run); default: the test's tmp_path.
HISTORY_DIR_ENV = "CAPKV_HISTORY_DIR"
AFTERMATH_SECONDS = 3.0


# --- an in-process register server, to test the workload and the checker together ----------


class RegisterServer:
    """GET/PUT/DELETE /v1/kv/{key} with revisions and if_mod_revision, on one lock (so it is
    linearizable), or with `stale_reads`: GETs answered from a copy refreshed every
    `lag` seconds, as a follower serving reads without a barrier would.

    `trouble` is the fraction of requests answered 503 (not applied) or 504 (applied or
    not, at random); with `lie`, a 503 write is applied anyway (what a service that
    mistakes "unknown" for "failed" does)."""

    def __init__(self, stale_reads: bool = False, lag: float = 0.05, trouble: float = 0.0, lie: bool = False):
        self.lock = threading.Lock()
        self.data: dict[str, tuple[str, int]] = {}
        self.snapshot: dict[str, tuple[str, int]] = {}
        self.revision = 1
        self.stale_reads = stale_reads
        self.lag = lag
        self.trouble = trouble
        self.lie = lie
        self.rng = random.Random(7)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True)]
        if stale_reads:
            self._threads.append(threading.Thread(target=self._refresh, daemon=True))

    def __enter__(self) -> "RegisterServer":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(5)

    def _refresh(self) -> None:
        while not self._stop.wait(self.lag):
            with self.lock:
                self.snapshot = dict(self.data)

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _parse(self):
                parts = urllib.parse.urlsplit(self.path)
                key = urllib.parse.unquote(parts.path[len("/v1/kv/"):])
                return key, dict(urllib.parse.parse_qsl(parts.query))

            def _trouble(self) -> int | None:
                """503 or 504 for a `trouble` fraction of requests (drawn under the lock)."""
                if outer.rng.random() >= outer.trouble:
                    return None
                return outer.rng.choice((503, 504))

            def _refuse(self, status: int) -> None:
                code = "unavailable" if status == 503 else "outcome_unknown"
                self._answer(status, {"error": {"code": code, "message": "trouble"}})

            def do_GET(self) -> None:
                key, _ = self._parse()
                with outer.lock:
                    trouble = self._trouble()
                if trouble:
                    self._refuse(trouble)
                    return
                with outer.lock:
                    source = outer.snapshot if outer.stale_reads else outer.data
                    found, revision = source.get(key), outer.revision
                if found is None:
                    self._answer(404, {"error": {"code": "key_not_found", "message": "no such key"}})
                else:
                    self._answer(200, {"key": key, "value": found[0], "mod_revision": found[1], "revision": revision})

            def do_PUT(self) -> None:
                key, params = self._parse()
                value = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                with outer.lock:
                    trouble = self._trouble()
                    apply = trouble is None or (trouble == 504 and outer.rng.random() < 0.5) or (trouble == 503 and outer.lie)
                    current = outer.data.get(key, (None, 0))[1]
                    if "if_mod_revision" in params and int(params["if_mod_revision"]) != current:
                        if trouble:
                            self._refuse(trouble)
                        else:
                            self._answer(412, {"error": {"code": "precondition_failed", "message": "no", "mod_revision": current}})
                        return
                    if apply:
                        outer.revision += 1
                        outer.data[key] = (value, outer.revision)
                    if trouble:
                        self._refuse(trouble)
                    else:
                        self._answer(200, {"key": key, "revision": outer.revision, "created": current == 0})

            def do_DELETE(self) -> None:
                key, _ = self._parse()
                with outer.lock:
                    deleted = int(outer.data.pop(key, None) is not None)
                    outer.revision += deleted
                    self._answer(200, {"deleted": deleted, "revision": outer.revision})

        return Handler


def _run_against(server: RegisterServer, seconds: float) -> tuple[list, Workload]:
    """Run the real workload against `server`; the history and the workload (for its counts)."""
    recorder = HistoryRecorder()
    config = WorkloadConfig(clients=4, keys=("a", "b"), duration=seconds, timeout_ms=500)
    workload = Workload([server.url], recorder, config)
    workload.run()
    return recorder.history(), workload


def test_workload_against_a_linearizable_register_passes_every_check():
    with RegisterServer() as server:
        ops, workload = _run_against(server, 1.5)
    assert workload.unexpected == []
    kinds = {(op.op, op.outcome) for op in ops}
    assert {("read", "ok"), ("write", "ok"), ("cas", "ok"), ("delete", "ok")} <= kinds, workload.summary()
    assert any(op.op == "cas" and not op.succeeded for op in ops), "no contention: the cas path is untested"
    verdict = linearizability.check(ops)
    assert verdict.result == linearizability.LINEARIZABLE, str(verdict)
    assert check_revisions(ops) == []


def test_workload_records_refusals_and_unknown_outcomes_so_the_history_stays_linearizable():
    # Every kind of op should meet every kind of trouble. The server's draws interleave
    # with the client threads, so one 4 s run (about 50 cas, each answered 503 or 504 with
    # probability 0.15) has missed cas/504 in a run of ten 503s: up to three runs, until
    # every outcome was seen, each history checked.
    wanted = {("write", "fail"), ("write", "unknown"), ("cas", "unknown"), ("read", "fail")}
    outcomes: set = set()
    summaries = []
    for _ in range(3):
        with RegisterServer(trouble=0.3) as server:
            ops, workload = _run_against(server, 4.0)
        outcomes |= {(op.op, op.outcome) for op in ops}
        summaries.append(workload.summary())
        verdict = linearizability.check(ops)
        assert verdict.result == linearizability.LINEARIZABLE, str(verdict)
        if wanted <= outcomes:
            break
    assert wanted <= outcomes, summaries


def test_workload_and_checker_catch_a_write_that_was_refused_but_applied():
    with RegisterServer(trouble=0.3, lie=True) as server:
        ops, _ = _run_against(server, 1.5)
    verdict = linearizability.check(ops)
    assert verdict.result == linearizability.NOT_LINEARIZABLE, str(verdict)


def test_workload_and_checker_catch_stale_reads():
    with RegisterServer(stale_reads=True, lag=0.1) as server:
        ops, _ = _run_against(server, 1.5)
    verdict = linearizability.check(ops)
    assert verdict.result == linearizability.NOT_LINEARIZABLE, str(verdict)
    assert verdict.explanations[0].op.op in ("read", "cas")


# --- the real cluster --------------------------------------------------------------------------


def _save_history(ops, tmp_path: Path, name: str) -> Path:
    directory = Path(os.environ.get(HISTORY_DIR_ENV) or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return Path(save(ops, directory / f"{name}-{int(time.time())}.jsonl"))


def _nemesis(cluster, rounds: int, period: float, rng: random.Random, log: list[tuple[float, str]]) -> None:
    """Each round: SIGKILL the leader and restart it; then SIGSTOP a node and SIGCONT it:
    the leader on even rounds (a deposed leader that wakes up still believes it leads:
    the case pysyncobj gets wrong for up to `leaderFallbackTimeout`), a random node on odd
    ones. Logged with monotonic times, to read next to the history."""

    def note(text: str) -> None:
        log.append((time.monotonic(), text))

    for round_number in range(rounds):
        time.sleep(period * 0.15)
        leader = cluster.leader(timeout=10)
        note(f"kill -9 leader {leader}")
        cluster.kill(leader)
        time.sleep(period * 0.2)
        note(f"restart {leader}")
        cluster.restart(leader, wait=True, timeout=30)
        note(f"{leader} healthy again")
        time.sleep(period * 0.1)
        frozen = cluster.leader(timeout=10) if round_number % 2 == 0 else rng.choice(sorted(cluster.nodes))
        note(f"SIGSTOP {frozen}" + (" (the leader)" if round_number % 2 == 0 else ""))
        cluster.pause(frozen)
        time.sleep(period * 0.25)
        note(f"SIGCONT {frozen}")
        cluster.resume(frozen)
        time.sleep(period * 0.15)


def _random_nemesis(cluster, duration: float, rng: random.Random, log: list[tuple[float, str]]) -> None:
    """Random faults for `duration` seconds: kill the leader or any node (down for 0.5-4 s),
    freeze the leader briefly (around the election timeout, 0.2-2 s) or any node for
    longer (2-6 s), or kill two nodes at once (no quorum for 1-3 s). Every node is running
    and thawed when it returns."""

    def note(text: str) -> None:
        log.append((time.monotonic(), text))

    def leader_or_any() -> str:
        try:
            return cluster.leader(timeout=5)
        except Exception:  # no leader right now: hurt someone anyway
            return rng.choice(sorted(cluster.nodes))

    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            fault = rng.choice(["kill leader", "kill node", "pause leader", "pause node", "kill two"])
            if fault in ("kill leader", "kill node", "kill two"):
                if fault == "kill two":
                    victims = rng.sample(sorted(cluster.nodes), 2)
                else:
                    victims = [leader_or_any() if fault == "kill leader" else rng.choice(sorted(cluster.nodes))]
                note(f"{fault}: kill -9 {' '.join(victims)}")
                for victim in victims:
                    cluster.kill(victim)
                time.sleep(rng.uniform(1.0, 3.0) if fault == "kill two" else rng.uniform(0.5, 4.0))
                for victim in victims:
                    note(f"restart {victim}")
                    cluster.restart(victim, wait=False)
                cluster.wait_healthy(victims, timeout=30)
                note(f"{' '.join(victims)} healthy again")
            else:
                victim = leader_or_any() if fault == "pause leader" else rng.choice(sorted(cluster.nodes))
                pause = rng.uniform(0.2, 2.0) if fault == "pause leader" else rng.uniform(2.0, 6.0)
                note(f"{fault}: SIGSTOP {victim} for {pause:.1f} s")
                cluster.pause(victim)
                time.sleep(pause)
                note(f"SIGCONT {victim}")
                cluster.resume(victim)
            time.sleep(rng.uniform(0.5, 3.0))
    finally:
        for node_id, node in cluster.nodes.items():
            if node.paused:
                cluster.resume(node_id)
            elif not node.running:
                cluster.restart(node_id, wait=False)


def _history_under_faults(cluster, tmp_path: Path, duration: float, rounds: int, seed: int) -> None:
    """`rounds` > 0: the fixed schedule of `_nemesis`; 0: `_random_nemesis` for `duration`."""
    wait_for_write(cluster)
    recorder = HistoryRecorder()
    # The workload runs until the faults are over and then AFTERMATH_SECONDS more (to see
    # the cluster serve again); its own duration is only a bound.
    config = WorkloadConfig(clients=5, keys=("k0", "k1", "k2"), duration=duration * 2 + 60, timeout_ms=1000, seed=seed)
    workload = Workload(cluster.urls, recorder, config)
    log: list[tuple[float, str]] = []
    workload.start()
    try:
        if rounds:
            _nemesis(cluster, rounds, duration / rounds, random.Random(seed), log)
        else:
            _random_nemesis(cluster, duration, random.Random(seed), log)
        time.sleep(AFTERMATH_SECONDS)
    finally:
        workload.stop()
        workload.join()
    _judge(recorder.history(), workload, log, tmp_path, seed)


def _judge(ops, workload: Workload, log: list[tuple[float, str]], tmp_path: Path, seed) -> None:
    """Save the history, check it, and fail with everything a person needs to look into it."""
    path = _save_history(ops, tmp_path, "cp-history")
    faults = "\n".join(f"  {at:.3f} {text}" for at, text in log)
    report = f"seed: {seed} (CAPKV_NEMESIS_SEED)\nhistory: {path}\nfaults (monotonic seconds, as in the history):\n{faults}\nworkload:\n{workload.summary()}"
    print(report)
    verdict = linearizability.check(ops)
    print(verdict)
    assert verdict.result != linearizability.NOT_LINEARIZABLE, f"{verdict}\n{report}"
    problems = check_revisions(ops)
    assert problems == [], "\n".join(problems) + "\n" + report
    assert workload.unexpected == [], "\n".join(workload.unexpected) + "\n" + report
    ok = [op for op in ops if op.outcome == "ok"]
    assert len(ok) > 50, f"too little got through to judge anything\n{report}"
    assert any(op.op != "read" for op in ok) and any(op.op == "read" for op in ok), report
    # The cluster served again after the last fault.
    last_fault = log[-1][0]
    assert any(op.invoke > last_fault for op in ok), f"nothing succeeded after the last fault\n{report}"
    assert verdict.result == linearizability.LINEARIZABLE, f"the checker gave up: {verdict}\n{report}"


def test_history_is_linearizable_through_leader_kill_and_pause(cp_cluster, tmp_path):
    _history_under_faults(cp_cluster(sync="always"), tmp_path, duration=24.0, rounds=2, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_history_is_linearizable_through_repeated_faults(cp_cluster, tmp_path):
    _history_under_faults(cp_cluster(sync="always"), tmp_path, duration=300.0, rounds=20, seed=int(time.time()))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_history_is_linearizable_through_random_faults(cp_cluster, tmp_path):
    seed = int(os.environ.get("CAPKV_NEMESIS_SEED") or time.time())
    _history_under_faults(cp_cluster(sync="always"), tmp_path, duration=240.0, rounds=0, seed=seed)



def _partition_nemesis(cluster, nemesis, rounds: int, rng: random.Random, log: list[tuple[float, str]]) -> None:
    """Cut the leader off from the other nodes (clients still reach it: the deposed leader
    must not answer from its old state), heal; then cut off a random follower, heal."""

    def note(text: str) -> None:
        log.append((time.monotonic(), text))

    for _ in range(rounds):
        time.sleep(2.0)
        leader = cluster.leader(timeout=10)
        others = sorted(n for n in cluster.nodes if n != leader)
        note(f"partition {leader} | {' '.join(others)} (the leader alone)")
        nemesis.partition([[leader], others])
        time.sleep(rng.uniform(4.0, 6.0))
        note("heal")
        nemesis.heal()
        time.sleep(2.0)
        loner = rng.choice(sorted(n for n in cluster.nodes if n != cluster.leader(timeout=10)))
        note(f"partition {loner} | the rest (a follower alone)")
        nemesis.partition([[loner], sorted(n for n in cluster.nodes if n != loner)])
        time.sleep(rng.uniform(2.0, 4.0))
        note("heal")
        nemesis.heal()


def _history_under_partitions(tmp_path: Path, rounds: int, seed: int, planned_seconds: float = 0.0) -> None:
    from clusters.nemesis import Nemesis, ProxiedCluster, plan

    cluster = ProxiedCluster.create(tmp_path / "proxied", nodes=3, mode="cp", sync="always")
    try:
        wait_for_write(cluster)
        nemesis = Nemesis(cluster)
        recorder = HistoryRecorder()
        bound = rounds * 20 + planned_seconds * 2 + 60
        config = WorkloadConfig(clients=5, keys=("k0", "k1", "k2"), duration=bound, timeout_ms=1000, seed=seed)
        workload = Workload(cluster.urls, recorder, config)
        log: list[tuple[float, str]] = []
        workload.start()
        try:
            _partition_nemesis(cluster, nemesis, rounds, random.Random(seed), log)
            if planned_seconds:
                schedule = plan(["partition", "kill", "pause", "delay"], planned_seconds, sorted(cluster.nodes), random.Random(seed))
                started = time.monotonic()
                log.extend((started + f.at, f"planned: {f.kind} {' | '.join(f.targets)} for {f.duration:.1f} s") for f in schedule)
                nemesis.run(schedule, started, prove=False)
                nemesis.heal_all()
                log.append((time.monotonic(), "planned faults over, all healed"))
            time.sleep(AFTERMATH_SECONDS)
        finally:
            workload.stop()
            workload.join()
            nemesis.heal_all()
        errors = [e for e in nemesis.events if e.fault == "error"]
        assert not errors, f"the nemesis failed: {errors}"
        _judge(recorder.history(), workload, sorted(log), tmp_path, seed)
    finally:
        cluster.stop()


def test_history_is_linearizable_when_the_leader_is_partitioned_away(tmp_path):
    _history_under_partitions(tmp_path, rounds=2, seed=2)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_history_is_linearizable_through_partitions_kills_pauses_and_delays(tmp_path):
    seed = int(os.environ.get("CAPKV_NEMESIS_SEED") or time.time())
    _history_under_partitions(tmp_path, rounds=3, seed=seed, planned_seconds=180.0)
