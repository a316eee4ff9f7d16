"""`capkv chaos`: a short run of each mode under partitions, kills and pauses must pass,
with every fault shown to have happened; a long run is one flag away (`-m slow`).

The verdict is the checkers' (linearizability for cp, tests/checkers/ap_checker.py for
ap); these tests check that the command runs them on a real history, reports counts and
where the files are, and exits 0 only then.
"""
from __future__ import annotations

import json
import re

import pytest

from clusters import chaos
from clusters.checkers import history
from tests.integration.conftest import require_service

SHORT_SECONDS = 25


def _run(tmp_path, *argv):
    lines: list[str] = []
    code = chaos.main([*argv, "--out", str(tmp_path / "run")], out=lines.append)
    text = "\n".join(lines)
    return code, text


def _counts(text: str) -> dict[str, int]:
    match = re.search(r"operations: (\d+)\s+faults: (\d+) \((\d+) not shown\)\s+anomalies: (\d+)", text)
    assert match, text
    return dict(zip(("operations", "faults", "unshown", "anomalies"), map(int, match.groups())))


def _check_files(tmp_path, text: str) -> list[history.Op]:
    ops = history.load(tmp_path / "run" / "history.jsonl")
    assert f"history: {tmp_path / 'run' / 'history.jsonl'}" in text
    events = [json.loads(line) for line in (tmp_path / "run" / "faults.jsonl").read_text().splitlines()]
    kinds = {e["fault"] for e in events}
    assert {"partition", "heal"} <= kinds and ("kill" in kinds or "pause" in kinds), kinds
    assert all(e["shown"] is not False for e in events), [e for e in events if e["shown"] is False]
    return ops


@pytest.mark.parametrize("mode", ["cp", "ap"])
def test_a_short_run_keeps_the_promise(tmp_path, mode):
    require_service(mode)
    code, text = _run(tmp_path, "--mode", mode, "--time", str(SHORT_SECONDS), "--clients", "4", "--seed", "11",
                      "--engine", "lsm", "--sync", "never")
    assert code == 0, text
    counts = _counts(text)
    ops = _check_files(tmp_path, text)
    assert counts["operations"] == len(ops) > 200
    assert counts["faults"] >= 3 and counts["unshown"] == 0 and counts["anomalies"] == 0
    assert "verdict: PASS" in text
    # The faults bit: some operations were refused or left in doubt.
    assert any(op.outcome != "ok" for op in ops)
    if mode == "cp":
        assert "linearizable:" in text
    else:
        assert "lost acknowledged writes: 0" in text and "converged" in text
        _the_ap_check_would_see_a_lost_write(tmp_path, ops)


def _the_ap_check_would_see_a_lost_write(tmp_path, ops):
    """The recorded history and final state are rich enough to fail: drop the value an
    acknowledged write left behind, and the checker reports it lost."""
    from clusters.checkers import ap_checker

    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    final = saved["final"]
    assert ap_checker.check(ops, final).valid
    acknowledged = {(op.key, op.value) for op in ops if op.op == "write" and op.outcome == "ok"}
    key, value = next((k, v) for k, values in sorted(final.items()) for v in values if (k, v) in acknowledged)
    doctored = {**final, key: [v for v in final[key] if v != value]}
    verdict = ap_checker.check(ops, doctored)
    assert verdict.lost >= 1 and not verdict.valid


def test_bad_arguments_exit_2_before_starting_a_cluster(tmp_path):
    lines: list[str] = []
    assert chaos.main(["--mode", "cp", "--faults", "flood"], out=lines.append) == 2
    assert "--faults must be some of" in lines[0]
    assert chaos.main(["--mode", "ap", "--clients", "0"], out=lines.append) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["cp", "ap"])
def test_a_long_run_keeps_the_promise(tmp_path, mode):
    require_service(mode)
    code, text = _run(tmp_path, "--mode", mode, "--time", "300", "--clients", "5", "--faults", "partition,kill,pause,delay")
    assert code == 0, text
    counts = _counts(text)
    assert counts["faults"] >= 20 and counts["anomalies"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cp", "ap"])
def test_a_run_over_network_namespaces_keeps_the_promise(tmp_path, mode):
    from clusters.nemesis import namespaces_available

    reason = namespaces_available()
    if reason:
        pytest.skip(reason)
    require_service(mode)
    code, text = _run(tmp_path, "--mode", mode, "--time", "40", "--network", "netns", "--seed", "3")
    assert code == 0, text
    assert _counts(text)["unshown"] == 0
