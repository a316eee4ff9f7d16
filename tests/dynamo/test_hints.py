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


from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule


class HintLogMachine(RuleBasedStateMachine):
    """The hint log against a dict model, with reopens (the index is rebuilt from the engine)."""

    owners = st.sampled_from(["n1", "n2", "n3"])
    keys = st.sampled_from([b"a", b"b", b"c", b"d\x00e"])

    def __init__(self):
        super().__init__()
        self.engine = open_engine("memory")
        self.policy = HintPolicy(max_hints=6, max_bytes=400, max_age_s=100)
        self.log = HintLog(self.engine, self.policy)
        self.model: dict[tuple[str, bytes], tuple[float, int]] = {}  # -> (updated_at, size)
        self.now = 0.0

    @rule(owner=owners, key=keys, size=st.integers(1, 150))
    def record(self, owner, key, size):
        grown = dict(self.model)
        grown[(owner, key)] = (self.now, size)
        fits = len(grown) <= self.policy.max_hints and sum(s for _, s in grown.values()) <= self.policy.max_bytes
        try:
            self.engine.write(self.log.record(owner, key, size, self.now))
            assert fits
            self.model = grown
        except HintsFull:
            assert not fits

    @rule(owner=owners)
    def deliver_oldest(self, owner):
        for hint in self.log.pending_for(owner, 1):
            self.engine.write(self.log.remove_if_unchanged(hint))
            del self.model[(owner, hint.key)]

    @rule(seconds=st.floats(0, 80))
    def time_passes(self, seconds):
        self.now += seconds
        self.engine.write(self.log.expire(self.now))
        self.model = {k: v for k, v in self.model.items() if self.now - v[0] <= self.policy.max_age_s}

    @rule()
    def reopen(self):
        self.log = HintLog(self.engine, self.policy)

    @invariant()
    def matches_the_model(self):
        self.log._check()
        assert self.log.count == len(self.model)
        assert self.log.bytes == sum(size for _, size in self.model.values())
        assert self.log.owners() == sorted({o for o, _ in self.model})


HintLogMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_hint_log_state_machine = HintLogMachine.TestCase
