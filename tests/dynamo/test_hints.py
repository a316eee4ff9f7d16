"""The hint log: limits, persistence in the engine, replay bookkeeping."""
import pytest

from dynamo.hints import HintLog, HintPolicy, HintsFull
from engines import open_engine


def test_hints_survive_reopen_of_the_index():
    engine = open_engine("memory")
    log = HintLog(engine, HintPolicy())
    engine.write(log.record("n2", b"k1", 100, now=1.0) + log.record("n3", b"k1", 100, now=2.0))
    again = HintLog(engine, HintPolicy())
    assert again.count == 2 and again.bytes == 200 and again.owners() == ["n2", "n3"]
    again._check()


def test_count_and_byte_caps_refuse_and_change_nothing():
    engine = open_engine("memory")
    log = HintLog(engine, HintPolicy(max_hints=2, max_bytes=250))
    engine.write(log.record("n2", b"a", 100, now=0.0))
    engine.write(log.record("n2", b"b", 100, now=0.0))
    with pytest.raises(HintsFull):
        log.record("n2", b"c", 1, now=0.0)
    with pytest.raises(HintsFull):
        log.record("n2", b"a", 151, now=0.0)  # growing an existing hint over the byte cap
    assert log.count == 2 and log.bytes == 200
    log._check()


def test_remove_only_if_not_rehinted_meanwhile():
    engine = open_engine("memory")
    log = HintLog(engine, HintPolicy())
    engine.write(log.record("n2", b"k", 10, now=0.0))
    replaying = log.pending_for("n2", 10)[0]
    engine.write(log.record("n2", b"k", 12, now=1.0))  # a newer write while replay was in flight
    assert log.remove_if_unchanged(replaying) == []
    assert log.count == 1
    engine.write(log.remove_if_unchanged(log.pending_for("n2", 10)[0]))
    assert log.count == 0 and not log.has_key(b"k")
    log._check()


def test_old_hints_expire_and_are_counted():
    engine = open_engine("memory")
    log = HintLog(engine, HintPolicy(max_age_s=60))
    engine.write(log.record("n2", b"old", 10, now=0.0) + log.record("n2", b"new", 10, now=100.0))
    engine.write(log.expire(now=120.0))
    assert [h.key for h in log.pending_for("n2", 10)] == [b"new"] and log.dropped == 1
    log._check()


def test_hint_age_must_stay_below_tombstone_grace():
    with pytest.raises(ValueError):
        HintPolicy(max_age_s=1e9)
