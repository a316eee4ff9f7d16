"""The pure state machine's txn, leases, watch history and compaction (no Raft, no clock)."""
from __future__ import annotations

import pytest

from api.service import Compacted
from consensus.service import Lessor
from consensus.state_machine import (
    KVStateMachine,
    make_compact,
    make_lease,
    make_put,
    make_txn,
    txn_problem,
)
from engines import open_engine

from .test_state_machine import Log


@pytest.fixture
def sm():
    return KVStateMachine(open_engine("memory"))


@pytest.fixture
def log(sm):
    return Log(sm)


def put(key, value, lease=0, prev=False):
    return {"op": "put", "key": key, "value": value, "lease": lease, "prev": prev}


def cmp(key, target, op, value, end=None):
    return {"key": key, "target": target, "op": op, "value": value, "end": end}


def test_txn_writes_every_key_at_one_revision_with_one_event_row(sm, log):
    seen = []
    sm.listener = lambda revision, events, leases: seen.append((revision, [(e.type, e.kv.key) for e in events]))
    log(make_put(b"a", b"1"))
    result = log(make_txn([cmp(b"a", "value", "==", b"1")],
                          [put(b"a", b"2", prev=True), put(b"b", b"x"), {"op": "delete", "key": b"zz", "end": None}],
                          [put(b"never", b"!")]))  # fmt: skip
    assert result["succeeded"] and result["revision"] == 3 == sm.revision
    assert result["responses"][0]["prev"]["value"] == b"1"
    assert sm.get(b"a")[0].mod_revision == sm.get(b"b")[0].mod_revision == 3
    assert sm.get(b"never")[0] is None
    assert seen[-1] == (3, [("put", b"a"), ("put", b"b")])
    found, last, complete = sm.events(b"a", b"c", 3, 100)
    assert complete and [(r, [e.kv.key for e in es]) for r, es in found] == [(3, [b"a", b"b"])]


def test_failed_compare_runs_the_failure_branch_and_reads_see_earlier_writes(sm, log):
    log(make_put(b"a", b"1"))
    for target, value in (("version", 2), ("create_revision", 3), ("mod_revision", 9), ("lease", 5), ("value", b"0")):
        result = log(make_txn([cmp(b"a", target, "==", value)], [put(b"s", b"1")],
                              [put(b"f", b"1"), {"op": "get", "key": b"f", "end": None}]))  # fmt: skip
        assert not result["succeeded"], target
        assert result["responses"][1]["items"][0]["value"] == b"1", "the get sees the put before it"
    assert sm.get(b"s")[0] is None
    # a range compare holds only if it holds for every key in it; an empty range acts as one absent key
    log(make_put(b"r/1", b"5"))
    log(make_put(b"r/2", b"7"))
    assert log(make_txn([cmp(b"r/", "version", "==", 1, end=b"r0")], [], []))["succeeded"]
    assert not log(make_txn([cmp(b"r/", "value", "==", b"5", end=b"r0")], [], []))["succeeded"]
    assert log(make_txn([cmp(b"x/", "version", "==", 0, end=b"x0")], [], []))["succeeded"]
    assert not log(make_txn([cmp(b"x", "value", "!=", b"5")], [], []))["succeeded"], "value compare on absent key"


def test_read_only_txn_and_nested_txn(sm, log):
    log(make_put(b"a", b"1"))
    before = sm.revision
    result = log(make_txn([], [{"op": "get", "key": b"a", "end": None}], []))
    assert result["revision"] == before == sm.revision and result["responses"][0]["count"] == 1
    nested = {"op": "txn", "compare": [cmp(b"a", "value", "==", b"1")], "success": [put(b"n", b"1")], "failure": []}
    result = log(make_txn([], [put(b"m", b"1"), nested], []))
    assert result["revision"] == before + 1 and sm.get(b"n")[0].mod_revision == sm.get(b"m")[0].mod_revision


def test_duplicate_keys_in_a_branch_are_refused_and_change_nothing(sm, log):
    bad = [
        [put(b"a", b"1"), put(b"a", b"2")],
        [put(b"a/1", b"1"), {"op": "delete", "key": b"a/", "end": b"a0"}],
        [put(b"a", b"1"), {"op": "txn", "compare": [], "success": [put(b"a", b"2")], "failure": []}],
    ]
    for ops in bad:
        assert txn_problem({"success": ops}) == "duplicate key given in txn request"
        result = log(make_txn([], ops, []))
        assert result["error"] == "invalid_txn" and sm.revision == 1
    assert txn_problem({"success": [put(b"a", b"1")], "failure": [put(b"a", b"2")]}) is None


def test_lease_revoke_deletes_its_keys_at_one_revision_with_events(sm, log):
    seen = []
    sm.listener = lambda revision, events, leases: seen.append((revision, events, leases))
    assert log(make_lease("lease_grant", 7, ttl=10))["ttl"] == 10
    assert log(make_lease("lease_grant", 7, ttl=10))["error"] == "lease_exists"
    assert log(make_put(b"k1", b"1", lease=9))["error"] == "lease_not_found"
    log(make_put(b"k1", b"1", lease=7))
    log(make_put(b"k2", b"2", lease=7))
    log(make_put(b"k3", b"3", lease=7))
    log(make_put(b"k3", b"3"))  # moved off the lease
    assert sm.lease_keys(7) == [b"k1", b"k2"]
    result = log(make_lease("lease_revoke", 7))
    assert result["deleted"] == 2 and result["revision"] == sm.revision
    revision, events, leases = seen[-1]
    assert revision == sm.revision and [(e.type, e.kv.key) for e in events] == [("delete", b"k1"), ("delete", b"k2")]
    assert leases == [("gone", 7, 0, log.index)]
    assert sm.get(b"k3")[0] is not None and sm.lease(7) is None
    assert log(make_lease("lease_revoke", 7))["error"] == "lease_not_found"


def test_lease_expiry_is_ignored_after_a_keepalive(sm, log):
    log(make_lease("lease_grant", 5, ttl=3))
    granted_at = log.index
    log(make_put(b"x", b"1", lease=5))
    log(make_lease("lease_keepalive", 5))
    stale = log(make_lease("lease_expire", 5, refresh=granted_at))
    assert stale == {"revision": sm.revision, "expired": False} and sm.get(b"x")[0] is not None
    result = log(make_lease("lease_expire", 5, refresh=sm.lease(5)["refresh"]))
    assert result["expired"] and sm.get(b"x")[0] is None


def test_lessor_never_shortens_a_lease_on_promotion():
    lessor = Lessor()
    lessor.apply([("refresh", 1, 10, 3), ("refresh", 2, 5, 4)], now=100.0)
    assert lessor.due(104.0, 10) == []
    lessor.promote(now=104.0, grace=2.0)
    assert lessor.deadlines[1][0] == 110.0, "a later deadline is kept"
    assert lessor.deadlines[2][0] == 106.0, "one due soon gets the grace"
    assert lessor.due(106.5, 10) == [(2, 4)]
    assert lessor.ttl_left(1, 105.0, 10) == 5
    lessor.apply([("gone", 2, 0, 5)], now=106.6)
    assert lessor.due(200.0, 10) == [(1, 3)]
    lessor._check()


def test_compaction_drops_history_and_refuses_old_reads_and_watches(sm, log):
    revisions = [log(make_put(b"c", b"%d" % i))["revision"] for i in range(5)]
    log(make_put(b"gone", b"1"))
    log({"v": 1, "op": "delete", "key": b"gone", "end": None, "request_id": None})
    rows_before = sum(1 for _ in sm.engine.scan())
    assert log(make_compact(sm.revision + 1))["error"] == "invalid_revision"
    assert log(make_compact(revisions[2]))["compact_revision"] == revisions[2]
    assert sm.compact_revision == revisions[2]
    assert sum(1 for _ in sm.engine.scan()) < rows_before, "old versions are physically gone"
    with pytest.raises(Compacted):
        sm.get(b"c", revisions[1])
    assert sm.get(b"c", revisions[2])[0].value == b"2"
    assert sm.get(b"c", revisions[4])[0].value == b"4"
    with pytest.raises(Compacted):
        sm.events(b"c", None, revisions[1], 10)
    found, _, _ = sm.events(b"c", None, revisions[2], 10)
    assert [r for r, _ in found] == revisions[2:]
    assert log(make_compact(revisions[2]))["error"] == "compacted"


def test_compaction_waits_for_a_snapshot_being_written(sm, log):
    for i in range(4):
        log(make_put(b"c", b"%d" % i))
    source = sm.capture_snapshot()
    log(make_compact(sm.revision))
    rows = list(source.rows())
    assert sum(1 for k, _ in rows if k.startswith(b"h")) == 4, "the snapshot still reads every version"
    source.done()
    log(make_put(b"other", b"1"))  # the next apply does the deferred physical compaction
    assert sum(1 for k, _ in sm.engine.scan(b"h", b"h\xff")) == 2


def test_snapshot_carries_leases_and_attachments(sm, log):
    log(make_lease("lease_grant", 11, ttl=30))
    log(make_put(b"a", b"1", lease=11))
    source = sm.capture_snapshot()
    rows = list(source.rows())
    source.done()
    other = KVStateMachine(open_engine("memory"))
    other.install_snapshot(log.index, sm.revision, sm.compact_revision, iter(rows))
    assert other.lease(11)["ttl"] == 30 and other.lease_keys(11) == [b"a"]
    other._check()


def test_physical_compaction_is_incremental_and_ends_where_a_full_one_would():
    from consensus.state_machine import StateMachineLimits

    small = KVStateMachine(open_engine("memory"), StateMachineLimits(compact_rows_per_apply=3))
    full = KVStateMachine(open_engine("memory"))
    logs = [Log(small), Log(full)]
    for each in logs:
        for i in range(6):
            for k in (b"a", b"b", b"c", b"d"):
                each(make_put(k, b"%d" % i))
        each({"v": 1, "op": "delete", "key": b"d", "end": None, "request_id": None})
        each(make_compact(each.sm.revision - 1))
    assert list(small.engine.scan(b"h", b"h\xff")) != list(full.engine.scan(b"h", b"h\xff")), "not done in one apply"
    for _ in range(10):
        logs[0](make_put(b"z", b"1"))
        logs[1](make_put(b"z", b"1"))
    assert list(small.engine.scan()) == list(full.engine.scan())
    assert small.get(b"a", small.compact_revision)[0].value == b"5"
