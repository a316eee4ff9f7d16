"""The history format: what a recorder writes is what `load` reads back, bad lines are named."""
from __future__ import annotations

import threading

import pytest

from clusters.checkers.history import HistoryFormatError, HistoryFull, HistoryRecorder, Op, load, parse_lines, save


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def test_recorder_records_times_outcomes_and_read_values():
    recorder = HistoryRecorder(clock=FakeClock())
    write = recorder.invoke(1, "write", "k", value="a")
    read = recorder.invoke(2, "read", "k")
    recorder.complete(read, "ok", value="a", result={"mod_revision": 3})
    recorder.complete(write, "ok", result={"revision": 3})
    ops = recorder.history()
    assert [(op.id, op.op, op.value) for op in ops] == [(0, "write", "a"), (1, "read", "a")]
    assert ops[0].invoke < ops[1].invoke < ops[1].complete < ops[0].complete
    assert ops[1].result == {"mod_revision": 3}
    recorder._check()


def test_operations_never_completed_come_out_unknown_with_no_completion():
    recorder = HistoryRecorder()
    recorder.invoke(1, "cas", "k", value="b", expected="a")
    (op,) = recorder.history()
    assert op.outcome == "unknown" and op.complete is None and op.expected == "a"


def test_an_operation_completes_once():
    recorder = HistoryRecorder()
    pending = recorder.invoke(1, "write", "k", value="a")
    recorder.complete(pending, "ok")
    with pytest.raises(ValueError):
        recorder.complete(pending, "fail")
    assert [op.outcome for op in recorder.history()] == ["ok"]


def test_recorder_is_bounded():
    recorder = HistoryRecorder(max_ops=2)
    recorder.invoke(1, "read", "k")
    recorder.invoke(1, "read", "k")
    with pytest.raises(HistoryFull):
        recorder.invoke(1, "read", "k")
    assert len(recorder.history()) == 2


def test_recorder_from_many_threads_keeps_every_operation_once():
    recorder = HistoryRecorder()

    def client(number: int) -> None:
        for sequence in range(200):
            pending = recorder.invoke(number, "write", f"k{sequence % 3}", value=f"c{number}-{sequence}")
            recorder.complete(pending, "ok")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ops = recorder.history()
    recorder._check()
    assert len(ops) == 1600
    assert len({op.value for op in ops}) == 1600
    assert [op.id for op in ops] == list(range(1600))
    assert all(a.invoke <= b.invoke for a, b in zip(ops, ops[1:]))


def test_save_then_load_gives_the_same_history(tmp_path):
    ops = [
        Op(0, 1, "write", "k", "a", invoke=1.0, complete=1.5, outcome="ok", result={"revision": 2}),
        Op(1, 2, "cas", "k", "b", expected=None, invoke=1.2, complete=None, outcome="unknown"),
        Op(2, "c3", "read", "k/x", None, invoke=1.3, complete=1.4, outcome="ok"),
        Op(3, 1, "delete", "k", invoke=2.0, complete=2.1, outcome="fail", result={"status": 503}),
    ]
    path = save(ops, tmp_path / "h.jsonl")
    assert load(path) == ops
    assert len((tmp_path / "h.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "not JSON"),
        ('{"id": 0, "client": 1, "op": "increment", "key": "k", "invoke": 1, "complete": 2, "outcome": "ok"}', "op must be"),
        ('{"id": 0, "client": 1, "op": "read", "key": "k", "invoke": 2, "complete": 1, "outcome": "ok"}', "before it was invoked"),
        ('{"id": 0, "client": 1, "op": "write", "key": "k", "invoke": 1, "complete": 2, "outcome": "ok"}', "needs the value"),
        ('{"id": 0, "client": 1, "op": "read", "key": "k", "invoke": 1, "complete": null, "outcome": "ok"}', "must have completed"),
        ('{"id": 0, "client": 1, "op": "read", "key": "k", "invoke": 1, "outcome": "ok", "colour": 1}', "unknown fields"),
        ('{"id": 0, "client": 1, "op": "read", "invoke": 1, "complete": 2, "outcome": "ok"}', "missing field 'key'"),
        ('{"id": 0, "client": 1, "op": "read", "key": "k", "invoke": 1, "complete": 2, "outcome": "maybe"}', "outcome must be"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(line, words):
    good = '{"id": 9, "client": 1, "op": "read", "key": "k", "invoke": 0, "complete": 0.5, "outcome": "ok"}'
    with pytest.raises(HistoryFormatError) as error:
        list(parse_lines([good, line]))
    assert error.value.line == 2
    assert words in str(error.value)


def test_duplicate_ids_are_refused():
    line = '{"id": 0, "client": 1, "op": "read", "key": "k", "invoke": 0, "complete": 0.5, "outcome": "ok"}'
    with pytest.raises(HistoryFormatError, match="duplicate id 0"):
        list(parse_lines([line, line]))
