"""The pure state machine: revisions, CAS, request ids, ranges, history, errors as values."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from api.service import Compacted, InvalidRequest
from consensus.state_machine import (
    KVStateMachine,
    StateMachineLimits,
    make_barrier,
    make_delete,
    make_put,
)
from engines import open_engine


class Log:
    """Feeds commands with consecutive Raft indexes, as pysyncobj does."""

    def __init__(self, sm: KVStateMachine, first_index: int = 2):
        self.sm = sm
        self.index = first_index - 1

    def __call__(self, command):
        self.index += 1
        result = self.sm.apply(command, self.index)
        self.sm._check()
        return result


@pytest.fixture
def sm():
    return KVStateMachine(open_engine("memory"))


@pytest.fixture
def log(sm):
    return Log(sm)


def test_revisions_follow_etcd(sm, log):
    assert sm.revision == 1
    assert log(make_put(b"a", b"1")) == {"revision": 2, "created": True, "prev": None}
    assert log(make_put(b"a", b"2"))["revision"] == 3
    kv, revision = sm.get(b"a")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version, revision) == (b"2", 2, 3, 2, 3)
    assert log(make_put(b"b", b"x"))["revision"] == 4
    kv, _ = sm.get(b"a")
    assert kv.mod_revision == 3, "a write to another key leaves a's revisions alone"


def test_delete_resets_version_and_create_revision(sm, log):
    log(make_put(b"a", b"1"))
    log(make_put(b"a", b"2"))
    assert log(make_delete(b"a"))["deleted"] == 1
    assert sm.get(b"a")[0] is None
    log(make_put(b"a", b"3"))
    kv, revision = sm.get(b"a")
    assert (kv.version, kv.create_revision, kv.mod_revision) == (1, revision, revision)


def test_delete_of_missing_key_keeps_the_revision(sm, log):
    log(make_put(b"a", b"1"))
    result = log(make_delete(b"zzz"))
    assert result["deleted"] == 0 and result["revision"] == 2 == sm.revision


def test_compare_and_swap(sm, log):
    assert log(make_put(b"a", b"1", if_mod_revision=0))["created"], "0 means only if absent"
    failed = log(make_put(b"a", b"2", if_mod_revision=0))
    assert failed["error"] == "precondition_failed" and failed["mod_revision"] == 2
    assert sm.get(b"a")[0].value == b"1" and sm.revision == 2, "a failed compare writes nothing"
    assert log(make_put(b"a", b"3", if_mod_revision=2))["revision"] == 3
    assert log(make_delete(b"a", if_mod_revision=2))["error"] == "precondition_failed"
    assert log(make_delete(b"a", if_mod_revision=3))["deleted"] == 1
    assert log(make_delete(b"a", if_mod_revision=0))["deleted"] == 0


def test_prev_returns_the_previous_value(sm, log):
    log(make_put(b"a", b"1"))
    result = log(make_put(b"a", b"2", prev=True))
    assert result["prev"]["value"] == b"1" and result["prev"]["version"] == 1
    deleted = log(make_delete(b"a", prev=True))
    assert [p["value"] for p in deleted["prev"]] == [b"2"]


def test_request_id_applies_once_and_returns_the_first_result(sm, log):
    first = log(make_put(b"a", b"1", request_id="r1"))
    again = log(make_put(b"a", b"1", request_id="r1"))
    assert again["revision"] == first["revision"] and again["duplicate"]
    assert sm.revision == 2 and sm.get(b"a")[0].version == 1
    # A failed compare is remembered too: the retry answers the same, even if it would now hold.
    log(make_put(b"b", b"1"))
    cas = log(make_put(b"b", b"2", if_mod_revision=99, request_id="r2"))
    assert cas["error"] == "precondition_failed"
    assert log(make_put(b"b", b"2", if_mod_revision=99, request_id="r2"))["error"] == "precondition_failed"
    # A different write under a used id is refused rather than silently dropped.
    reused = log(make_put(b"c", b"1", request_id="r1"))
    assert reused["error"] == "invalid_request_id" and sm.get(b"c")[0] is None


def test_retried_write_with_prev_gets_prev_from_history(sm, log):
    log(make_put(b"a", b"old"))
    first = log(make_put(b"a", b"new", prev=True, request_id="r"))
    log(make_put(b"a", b"newer"))
    again = log(make_put(b"a", b"new", prev=True, request_id="r"))
    assert again["prev"]["value"] == first["prev"]["value"] == b"old"


def test_request_ids_are_bounded_by_count_and_age():
    sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_request_ids=3, request_id_max_age_entries=10))
    log = Log(sm)
    for i in range(5):
        log(make_put(b"k", b"%d" % i, request_id=f"r{i}"))
    assert list(sm._requests.entries) == ["r2", "r3", "r4"]
    assert log(make_put(b"k", b"0", request_id="r0")).get("duplicate") is None, "r0 was forgotten"
    for _ in range(12):
        log(make_barrier())
    log(make_put(b"z", b"1", request_id="late"))
    assert list(sm._requests.entries) == ["late"], "ids older than 10 entries are forgotten"


def test_request_ids_survive_reopening_the_engine(tmp_path):
    engine = open_engine("memory")
    sm = KVStateMachine(engine)
    log = Log(sm)
    log(make_put(b"a", b"1", request_id="r1"))
    reopened = KVStateMachine(engine)
    assert reopened.applied_index == sm.applied_index and reopened.revision == 2
    assert Log(reopened, sm.applied_index + 1)(make_put(b"a", b"1", request_id="r1"))["duplicate"]


def test_entries_at_or_below_the_applied_index_are_skipped(sm):
    sm.apply(make_put(b"a", b"1"), 5)
    assert sm.apply(make_put(b"a", b"2"), 5)["error"] == "already_applied"
    assert sm.apply(make_put(b"a", b"2"), 3)["error"] == "already_applied"
    assert sm.get(b"a")[0].value == b"1" and sm.revision == 2


def test_range_delete_and_prefix_reads(sm, log):
    for key in (b"a", b"app/1", b"app/2", b"app/3", b"b"):
        log(make_put(key, b"v"))
    items, revision, more, count = sm.range(b"app/", b"app0")
    assert [kv.key for kv in items] == [b"app/1", b"app/2", b"app/3"] and count == 3 and not more
    items, _, more, count = sm.range(b"app/", b"app0", limit=2)
    assert len(items) == 2 and more and count == 3
    items, _, _, count = sm.range(b"app/", b"app0", count_only=True)
    assert items == [] and count == 3
    items, _, _, _ = sm.range(b"app/", b"app0", keys_only=True)
    assert all(kv.value is None for kv in items)
    everything, _, _, _ = sm.range(b"\x00", b"\x00")
    assert len(everything) == 5
    result = log(make_delete(b"app/", b"app0"))
    assert result["deleted"] == 3 and result["revision"] == revision + 1
    assert [kv.key for kv in sm.range(b"\x00", b"\x00")[0]] == [b"a", b"b"]


def test_reads_at_old_revisions(sm, log):
    log(make_put(b"a", b"1"))  # 2
    log(make_put(b"b", b"1"))  # 3
    log(make_put(b"a", b"2"))  # 4
    log(make_delete(b"b"))  # 5
    assert sm.get(b"a", revision=2)[0].value == b"1"
    assert sm.get(b"a", revision=3)[0].value == b"1"
    assert sm.get(b"a", revision=4)[0].value == b"2"
    assert sm.get(b"b", revision=4)[0].value == b"1"
    assert sm.get(b"b", revision=5)[0] is None
    assert sm.get(b"a", revision=1)[0] is None
    items, _, _, _ = sm.range(b"\x00", b"\x00", revision=3)
    assert [(kv.key, kv.value) for kv in items] == [(b"a", b"1"), (b"b", b"1")]
    with pytest.raises(InvalidRequest):
        sm.get(b"a", revision=6)
    sm.compact_revision = 3  # compaction comes later; the read path already honours it
    with pytest.raises(Compacted):
        sm.get(b"a", revision=2)


def test_keys_with_nul_bytes_keep_their_order(sm, log):
    keys = [b"a", b"a\x00", b"a\x00\x00", b"a\x00b", b"a\x01", b"ab"]
    for key in reversed(keys):
        log(make_put(key, key))
    assert [kv.key for kv in sm.range(b"\x00", b"\x00")[0]] == keys
    log(make_put(b"a\x00", b"again"))
    # Puts went ab@2, a\x01@3, a\x00b@4, a\x00\x00@5, a\x00@6, a@7, a\x00@8: the history
    # of a\x00 must not pick up the rows of a\x00\x00 or a\x00b.
    assert sm.get(b"a\x00", revision=5)[0] is None
    assert sm.get(b"a\x00", revision=7)[0].value == b"a\x00"
    assert sm.get(b"a\x00", revision=8)[0].value == b"again"
    assert sm.get(b"a", revision=6)[0] is None


@pytest.mark.parametrize(
    "command",
    [
        None,
        "put",
        {"op": "put"},
        {"v": 99, "op": "put"},
        {"v": 1, "op": "frobnicate"},
        {"v": 1, "op": "put", "key": "text", "value": b"1"},
        {"v": 1, "op": "put", "key": b"", "value": b"1"},
        {"v": 1, "op": "put", "key": b"a", "value": 5},
        {"v": 1, "op": "put", "key": b"a", "value": b"1", "if_mod_revision": -1},
        {"v": 1, "op": "put", "key": b"a", "value": b"1", "lease": 7},
        {"v": 1, "op": "put", "key": b"a", "value": b"1", "request_id": 12},
        {"v": 1, "op": "delete", "key": b"a", "end": b"z", "if_mod_revision": 3},
    ],
)
def test_bad_commands_return_errors_and_change_nothing(sm, command):
    result = sm.apply(command, 2)
    assert isinstance(result, dict) and "error" in result
    assert sm.revision == 1 and sm.range(b"\x00", b"\x00")[3] == 0 and sm.failed is None


def test_an_engine_failure_is_an_error_value_and_marks_the_replica_failed(sm):
    sm.engine.close()
    result = sm.apply(make_put(b"a", b"1"), 2)
    assert result["error"] == "replica_failed" and sm.failed
    assert sm.apply(make_put(b"a", b"1"), 3)["error"] == "replica_failed"


def test_range_delete_is_bounded():
    sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_delete_keys=3))
    log = Log(sm)
    for i in range(5):
        log(make_put(b"k%d" % i, b"v"))
    assert log(make_delete(b"k", b"l"))["error"] == "too_many_keys"
    assert sm.range(b"k", b"l")[3] == 5


def test_snapshot_round_trip_rebuilds_the_store(sm, log):
    for i in range(20):
        log(make_put(b"k%02d" % (i % 7), b"%d" % i, request_id=f"r{i}"))
    log(make_delete(b"k03"))
    source = sm.capture_snapshot()
    log(make_put(b"after", b"snapshot"))  # applies go on while the rows are read
    rows = list(source.rows())
    other = KVStateMachine(open_engine("memory"))
    other.install_snapshot(sm.applied_index - 1, source.revision, source.compact_revision, rows)
    other._check()
    assert other.revision == source.revision
    assert other.get(b"after")[0] is None
    before = [(kv.key, kv.value, kv.mod_revision, kv.version) for kv in sm.range(b"\x00", b"\x00", revision=source.revision)[0]]
    assert [(kv.key, kv.value, kv.mod_revision, kv.version) for kv in other.range(b"\x00", b"\x00")[0]] == before
    assert other.get(b"k01", revision=5)[0] == sm.get(b"k01", revision=5)[0]
    assert Log(other, other.applied_index + 1)(make_put(b"k05", b"19", request_id="r19"))["duplicate"]


# --- a model test: the state machine against a dict with revisions ----------------------------


class StoreModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_request_ids=5))
        self.log = Log(self.sm)
        self.revision = 1
        self.live: dict[bytes, tuple[bytes, int, int, int]] = {}  # key -> value, create, mod, version
        self.snapshots: dict[int, dict] = {1: {}}

    keys = st.sampled_from([b"a", b"b", b"b/1", b"b/2", b"c\x00"])

    @rule(key=keys, value=st.binary(max_size=4), cas=st.one_of(st.none(), st.integers(0, 12)))
    def put(self, key, value, cas):
        result = self.log(make_put(key, value, if_mod_revision=cas))
        current = self.live.get(key)
        current_mod = current[2] if current else 0
        if cas is not None and cas != current_mod:
            assert result["error"] == "precondition_failed" and result["mod_revision"] == current_mod
            return
        self.revision += 1
        assert result["revision"] == self.revision and result["created"] == (current is None)
        self.live[key] = (value, current[1] if current else self.revision, self.revision, (current[3] + 1) if current else 1)
        self.snapshots[self.revision] = dict(self.live)

    @rule(key=keys, prefix=st.booleans())
    def delete(self, key, prefix):
        end = key + b"\xff" if prefix else None
        result = self.log(make_delete(key, end))
        victims = [k for k in self.live if (k == key if end is None else key <= k < end)]
        assert result["deleted"] == len(victims)
        if victims:
            self.revision += 1
            for k in victims:
                del self.live[k]
            self.snapshots[self.revision] = dict(self.live)
        assert result["revision"] == self.revision

    @rule(data=st.data())
    def read_history(self, data):
        revision = data.draw(st.sampled_from(sorted(self.snapshots)))
        expected = self.snapshots[revision]
        items = self.sm.range(b"\x00", b"\x00", revision=revision)[0]
        assert {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in items} == expected

    @invariant()
    def current_matches(self):
        items, revision, _, count = self.sm.range(b"\x00", b"\x00")
        assert revision == self.revision and count == len(self.live)
        assert {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in items} == self.live


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
