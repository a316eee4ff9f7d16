"""Each engine against a `dict`, driven by hypothesis' RuleBasedStateMachine.

Rules put, delete, write a batch (sometimes with one bad op, which must change nothing),
get and scan (random bounds, direction and limit) and, for engines with files, close and
reopen, tear the last record off the active log (as a crash mid-append would) and reopen,
and call the engine's own `flush()` / `compact()` / `merge()` when it has them.
After every step `engine._check()` asserts the engine's own invariants. Files are small
(`SMALL_FILE_OPTIONS`) so a few dozen steps already flush, rotate and compact.

A failure prints the shortest sequence of steps that shows it, e.g.

    state = EngineMachine()
    state.put(key=b'a', value=b'')
    state.reopen()
    state.get(key=b'a')      # AssertionError: b'' != None

The default run is small (a few seconds per engine); `-m slow` runs many more examples.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from engines import ENGINE_KINDS, InvalidArgument, open_engine

from .conftest import engine_files, engine_options, maintenance_methods, model_scan, require_engine, tail_cuts

# A small pool of keys (with prefixes of one another, 0x00 and 0xff) so that steps hit the
# same keys again; plus arbitrary keys now and then.
KEY_POOL = [b"a", b"aa", b"ab", b"abc", b"b", b"\x00", b"\x00\x00", b"\xff", b"\xff\x00", b"k1", b"k2", b"k10", b"z"]
keys = st.one_of(st.sampled_from(KEY_POOL), st.binary(min_size=1, max_size=8))
values = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=64, max_size=600),
    st.just(b""),
    # large values fill small memtables and data files within a few steps
    st.integers(min_value=1, max_value=8).map(lambda n: bytes([n]) * (n * 1000)),
)
bounds = st.one_of(st.none(), keys)
ops = st.one_of(
    st.tuples(st.just("put"), keys, values),
    st.tuples(st.just("delete"), keys, st.none()),
)
bad_ops = st.sampled_from(
    [("put", b"", b"v"), ("put", "str", b"v"), ("put", b"k", None), ("delete", b"k", b"v"), ("merge", b"k", b"v"), ("put", b"k")]
)


def file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for name in engine_files(path):
        try:
            sizes[name] = os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:
            pass  # a temporary file of background work, gone meanwhile
    return sizes


def make_machine(kind: str) -> type[RuleBasedStateMachine]:
    persistent = kind != "memory"

    class EngineMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.path = tempfile.mkdtemp(prefix=f"capkv-sm-{kind}-") if persistent else None
            self.options = engine_options(kind, small_files=True, sync="never")
            self.engine = open_engine(kind, self.path, **self.options)
            self.model: dict[bytes, bytes] = {}
            self.settled_cuts = 0

        def teardown(self) -> None:
            try:
                self.engine.close()
            finally:
                if self.path:
                    shutil.rmtree(self.path, ignore_errors=True)

        @rule(key=keys, value=values)
        def put(self, key, value):
            self.engine.put(key, value)
            self.model[key] = value

        @rule(key=keys)
        def delete(self, key):
            self.engine.delete(key)
            self.model.pop(key, None)

        @rule(batch=st.lists(ops, max_size=12))
        def batch(self, batch):
            self.engine.write(batch)
            for op, key, value in batch:
                if op == "put":
                    self.model[key] = value
                else:
                    self.model.pop(key, None)

        @rule(batch=st.lists(ops, max_size=6), bad=bad_ops, data=st.data())
        def batch_with_bad_op(self, batch, bad, data):
            position = data.draw(st.integers(min_value=0, max_value=len(batch)))
            batch = batch[:position] + [bad] + batch[position:]
            with pytest.raises((InvalidArgument, TypeError)):
                self.engine.write(batch)
            # the model is unchanged; the next get/scan/invariant checks the engine is too

        @rule(key=keys)
        def get(self, key):
            assert self.engine.get(key) == self.model.get(key)

        @rule(
            start=bounds,
            end=bounds,
            reverse=st.booleans(),
            limit=st.one_of(st.none(), st.integers(min_value=0, max_value=20)),
        )
        def scan(self, start, end, reverse, limit):
            got = list(self.engine.scan(start, end, reverse=reverse, limit=limit))
            assert got == model_scan(self.model, start, end, reverse, limit)

        @precondition(lambda self: persistent)
        @rule()
        def reopen(self):
            self.engine.close()
            self.engine = open_engine(kind, self.path, **self.options)
            assert list(self.engine.scan()) == model_scan(self.model)

        @precondition(lambda self: persistent)
        @rule(value=values, cut=st.integers(min_value=1, max_value=1 << 16))
        def torn_tail(self, value, cut):
            """Write one more record, then close and cut up to its whole length off the end
            of the file it went to (the active log), as a crash during the append would.
            The engine must come back with exactly the state before that write.

            When background work (a rotation, a merge, a flush) changed the files around the
            write, which file holds the record is not certain: then nothing is cut, or the
            engine may come back with or without the write."""
            key = b"\xfe-last-write"
            previous = self.model.get(key)  # an earlier torn_tail may have kept its write
            self.engine.sync()
            before = file_sizes(self.path)
            self.engine.put(key, value)
            self.engine.sync()
            after = file_sizes(self.path)
            self.engine.close()
            closed = file_sizes(self.path)
            grown = [name for name in after if name in before and after[name] > before[name]]
            # settled: one file grew, no file went away, and closing did not touch that file
            settled = (
                len(grown) == 1
                and set(before) <= set(after) <= set(closed)
                and closed[grown[0]] == after[grown[0]]
            )
            self.settled_cuts += settled
            if settled:
                name = grown[0]
                record = after[name] - before[name]
                os.truncate(os.path.join(self.path, name), closed[name] - min(cut, record))
            self.engine = open_engine(kind, self.path, **self.options)
            without_write = dict(self.model)
            if previous is None:
                without_write.pop(key, None)
            else:
                without_write[key] = previous
            with_write = {**self.model, key: value}
            got = dict(self.engine.scan())
            if settled:
                assert got == without_write, "after a torn tail: not exactly the state before the torn write"
                if cut < record:
                    assert tail_cuts(self.engine.stats()) >= 1, "a torn tail was cut but stats() does not count it"
            else:
                assert got in (without_write, with_write), "after a reopen: not the state before or after the last write"
            self.model = got

        @precondition(lambda self: bool(maintenance_methods(self.engine)))
        @rule(data=st.data())
        def maintenance(self, data):
            methods = maintenance_methods(self.engine)
            method = data.draw(st.sampled_from(methods), label="method")
            method()

        @invariant()
        def engine_invariants_hold(self):
            self.engine._check()

        @invariant()
        def full_scan_matches(self):
            # cheap while the model is small; catches what single-key rules miss
            if len(self.model) <= 200:
                assert list(self.engine.scan()) == model_scan(self.model)

    EngineMachine.__name__ = EngineMachine.__qualname__ = f"{kind.capitalize()}EngineMachine"
    return EngineMachine


QUICK = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
THOROUGH = settings(
    max_examples=400,
    stateful_step_count=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("engine_kind", ENGINE_KINDS)
def test_engine_matches_a_dict(engine_kind):
    require_engine(engine_kind)
    run_state_machine_as_test(make_machine(engine_kind), settings=QUICK)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("engine_kind", ENGINE_KINDS)
def test_engine_matches_a_dict_many_examples(engine_kind):
    require_engine(engine_kind)
    run_state_machine_as_test(make_machine(engine_kind), settings=THOROUGH)
