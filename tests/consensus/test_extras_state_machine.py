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


# --- a retried txn (same request id) ---------------------------------------------------------


def get(key, end=None):
    return {"op": "get", "key": key, "end": end}


def test_retried_txn_returns_the_first_result_whole_and_applies_once(sm, log):
    seen = []
    sm.listener = lambda revision, events, leases: seen.append(revision)
    log(make_put(b"a", b"old\x00\xff"))  # not UTF-8: values travel as bytes, not text
    txn = make_txn([cmp(b"a", "value", "==", b"old\x00\xff")],
                   [get(b"a"), put(b"a", b"new", prev=True), put(b"b", b"x"), get(b"a", b"c"),
                    {"op": "txn", "compare": [], "success": [get(b"b")], "failure": []}],
                   [], request_id="t1")  # fmt: skip
    first = log(txn)
    assert first["succeeded"] and [len(r["items"]) for r in first["responses"] if r["op"] == "get"] == [1, 2]
    assert first["responses"][0]["items"][0]["value"] == b"old\x00\xff", "a get before the put sees the old value"
    revision, events_before = sm.revision, len(seen)
    log(make_put(b"a", b"later"))  # the store moves on; the retry still answers as the first attempt
    again = log(txn)
    assert again == {**first, "duplicate": True}
    assert sm.revision == revision + 1 and len(seen) == events_before + 1, "the retry applied nothing"
    assert sm.get(b"a")[0].version == 3 and sm.get(b"b")[0].version == 1
    reopened = KVStateMachine(sm.engine)  # the result is in the request-id row, not only in memory
    assert Log(reopened, log.index + 1)(txn) == again
    source = sm.capture_snapshot()  # ...and in snapshots
    rows = list(source.rows())
    source.done()
    other = KVStateMachine(open_engine("memory"))
    other.install_snapshot(log.index, sm.revision, sm.compact_revision, iter(rows))
    assert Log(other, log.index + 1)(txn) == again


def test_retried_txn_whose_result_was_too_large_to_keep_says_where_it_applied():
    from consensus.state_machine import StateMachineLimits

    sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_request_result_bytes=2_000,
                                                                  max_request_results_bytes=5_000))  # fmt: skip
    log = Log(sm)
    log(make_put(b"big", b"v" * 3_000))
    big = make_txn([], [put(b"x", b"1"), get(b"big")], [], request_id="big")
    first = log(big)
    assert first["responses"][1]["items"][0]["value"] == b"v" * 3_000
    refused = log(big)
    assert refused["error"] == "responses_unavailable" and refused["revision"] == first["revision"]
    assert f"applied at revision {first['revision']}" in refused["message"] and refused["succeeded"] is True
    assert sm.get(b"x")[0].version == 1, "applied once"
    # Results that fit are kept until all of them pass the budget; then the oldest are cut down.
    log(make_put(b"mid", b"m" * 1_000))
    small = [make_txn([], [put(b"s%d" % i, b"1"), get(b"mid")], [], request_id=f"s{i}") for i in range(4)]
    firsts = [log(txn) for txn in small]
    assert len(sm._requests.kept) == 3 and sm._requests.kept_bytes <= 5_000
    assert log(small[0])["error"] == "responses_unavailable"
    for txn, first in zip(small[1:], firsts[1:]):
        assert log(txn) == {**first, "duplicate": True}
    reopened = KVStateMachine(sm.engine)
    assert reopened._requests.kept == sm._requests.kept
    # A txn without gets or previous values loses nothing when cut down: it is always answered.
    plain = make_txn([], [put(b"p", b"1"), {"op": "delete", "key": b"zz", "end": None}], [], request_id="plain")
    first_plain = log(plain)
    assert log(plain) == {**first_plain, "duplicate": True}


# --- a lease's keys are bounded, so its revoke (one revision) is too ---------------------------


def test_a_lease_holds_at_most_max_lease_keys_and_its_revoke_deletes_them_at_one_revision():
    from consensus.state_machine import StateMachineLimits

    sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_lease_keys=5))
    log = Log(sm)
    seen = []
    sm.listener = lambda revision, events, leases: seen.append((revision, events))
    log(make_lease("lease_grant", 7, ttl=10))
    for i in range(5):
        log(make_put(b"k%d" % i, b"v", lease=7))
    log(make_put(b"k0", b"again", lease=7))  # already attached: does not count twice
    revision = sm.revision
    refused = log(make_put(b"k5", b"v", lease=7))
    assert refused["error"] == "too_many_keys" and "lease 7 has 5 keys" in refused["message"]
    txn = log(make_txn([], [put(b"free", b"1"), put(b"k5", b"v", lease=7)], []))
    assert txn["error"] == "too_many_keys" and sm.get(b"free")[0] is None and sm.revision == revision
    log(make_put(b"k0", b"off the lease"))  # moving a key off the lease frees its place...
    log(make_put(b"k5", b"v", lease=7))
    log({"v": 1, "op": "delete", "key": b"k1", "end": None, "request_id": None})  # ...and so does deleting it
    log(make_txn([], [put(b"k6", b"v", lease=7)], []))
    assert log(make_put(b"k7", b"v", lease=7))["error"] == "too_many_keys"
    assert KVStateMachine(sm.engine)._lease_key_counts == {7: 5}, "the count is rebuilt from the engine"
    result = log(make_lease("lease_revoke", 7))
    assert result["deleted"] == 5 and sm._lease_key_counts == {}
    revision, events = seen[-1]
    assert revision == result["revision"] and sorted(e.kv.key for e in events) == [b"k2", b"k3", b"k4", b"k5", b"k6"]
    assert {e.type for e in events} == {"delete"} and sm.get(b"k0")[0].value == b"off the lease"


async def test_a_watcher_gets_every_delete_of_a_revoked_lease_in_one_revision():
    import asyncio

    from consensus.state_machine import StateMachineLimits
    from consensus.watch import WatchHub, WatchLimits

    keys = 2_000
    sm = KVStateMachine(open_engine("memory"), StateMachineLimits(max_lease_keys=keys))
    hub = WatchHub(asyncio.get_running_loop(), sm, WatchLimits(queue_batches=2, replay_batch_events=100))
    sm.listener = hub.on_apply
    index = 1
    for command in [make_lease("lease_grant", 9, ttl=10)] + [make_put(b"l/%05d" % i, b"v", lease=9) for i in range(keys)]:
        index += 1
        assert "error" not in sm.apply(command, index)
    assert sm.apply(make_put(b"l/over", b"v", lease=9), index + 1)["error"] == "too_many_keys"
    watch = hub.watch(b"l/", b"l0", start_revision=None, prev=True, progress_interval=60)
    first = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.05)  # registered, replayed (nothing yet), following live events
    revoked = sm.apply(make_lease("lease_revoke", 9), index + 2)
    batch = await asyncio.wait_for(first, 10)
    assert batch.revision == revoked["revision"] and not batch.canceled
    assert len(batch.events) == keys and {e.type for e in batch.events} == {"delete"}
    assert all(e.prev is not None and e.prev.value == b"v" for e in batch.events)
    await watch.aclose()
    sm._check()


@pytest.mark.slow
def test_revoking_a_lease_with_the_most_keys_allowed_is_one_bounded_apply():
    import time
    import tracemalloc

    sm = KVStateMachine(open_engine("memory"))
    keys = sm.limits.max_lease_keys
    sm.apply(make_lease("lease_grant", 3, ttl=10), 2)
    for i in range(keys):
        sm.apply(make_put(b"l/%06d" % i, b"x" * 100, lease=3), 3 + i)
    assert sm.apply(make_put(b"l/over", b"x", lease=3), 3 + keys)["error"] == "too_many_keys"
    seen = []
    sm.listener = lambda revision, events, leases: seen.append(len(events))
    tracemalloc.start()
    started = time.process_time()
    result = sm.apply(make_lease("lease_revoke", 3), 4 + keys)
    cpu_s = time.process_time() - started
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"revoke of {keys} keys: {cpu_s:.2f} s CPU (traced), peak {peak_bytes / 2**20:.1f} MiB")
    assert result["deleted"] == keys and seen == [keys]
    assert peak_bytes < 64 * 2**20, "the apply's structures are a few KiB per key at most"
