"""`capkv demo partition`: the narrated facts a newcomer reads are the facts that happened.

Each test runs the demo end to end (a real 3-node cluster, a real cut through the proxies)
and checks its exit code, the facts it recorded (`--json`) and the lines it printed.
"""
from __future__ import annotations

import json

import pytest

from clusters import demo
from tests.integration.conftest import require_service


def _run(tmp_path, *argv):
    lines: list[str] = []
    facts_path = tmp_path / "facts.json"
    code = demo.main(["partition", *argv, "--json", str(facts_path)], out=lines.append)
    return code, json.loads(facts_path.read_text()), "\n".join(lines)


def test_cp_minority_refuses_and_everyone_agrees_after_the_heal(tmp_path):
    require_service("cp")
    code, facts, text = _run(tmp_path, "--mode", "cp")
    assert code == 0, text
    assert facts["minority_write_status"] in (503, 504) and facts["minority_read_status"] in (503, 504)
    assert facts["majority_served"] and facts["consistent_after_heal"]
    refusal = next(line for line in text.splitlines() if line.startswith("3. write"))
    assert "PUT 'from-n1' -> 50" in refusal and "PUT 'from-n2' -> 200 ok" in refusal
    healed = next(line for line in text.splitlines() if line.startswith("5. heal"))
    assert healed.count("'from-n2'") == 2 and "from-n1" not in healed


def test_ap_both_sides_accept_and_the_heal_shows_siblings(tmp_path):
    require_service("ap")
    code, facts, text = _run(tmp_path, "--mode", "ap")
    assert code == 0, text
    assert facts["both_accepted"] and facts["diverged"]
    assert facts["final_values"] == ["from-n1", "from-n2"] and facts["final_values_n1"] == ["from-n1", "from-n2"]
    assert facts["resolved"]
    assert "(2 siblings)" in " ".join(text.split())  # the column may wrap it


def test_ap_lww_silently_keeps_one_write(tmp_path):
    require_service("ap")
    code, facts, text = _run(tmp_path, "--mode", "ap", "--conflicts", "lww")
    assert code == 0, text
    assert facts["both_accepted"] and len(facts["final_values"]) == 1
    assert facts["lost"] == sorted({"from-n1", "from-n2"} - set(facts["final_values"]))
    assert "silently dropped" in text


def test_bad_arguments_exit_2_without_starting_anything():
    lines: list[str] = []
    assert demo.main(["partition", "--mode", "cp", "--conflicts", "lww"], out=lines.append) == 2
    assert "ap only" in lines[0]
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["partition", "--mode", "xp"])
