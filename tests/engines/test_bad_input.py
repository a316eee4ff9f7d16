"""Bad input from the caller gets a clear exception (InvalidArgument or TypeError) and
changes nothing, in memory and on disk. The modes above pass user keys straight through,
so these are the errors a user of the HTTP API ultimately sees.

    >>> engine.put("text", b"v")
    TypeError: key must be bytes, not str
"""
from __future__ import annotations

import pytest

from engines import ENGINE_KINDS, InvalidArgument, open_engine

from .conftest import model_scan, require_engine

BAD_INPUT = (InvalidArgument, TypeError)

NOT_BYTES = ["text", 7, None, 1.5, ["b"], object()]

SMALL_LIMITS = {"max_key_bytes": 16, "max_value_bytes": 64}


def seed(engine) -> dict[bytes, bytes]:
    model = {b"a": b"1", b"b": b"2", b"c": b""}
    for key, value in model.items():
        engine.put(key, value)
    return model


def assert_unchanged(engine, model: dict, opener=None) -> None:
    assert list(engine.scan()) == model_scan(model)
    engine._check()
    if opener is not None and opener.path is not None:
        engine.close()
        reopened = opener(**SMALL_LIMITS)
        assert list(reopened.scan()) == model_scan(model)
        reopened.close()


@pytest.mark.parametrize("bad", NOT_BYTES, ids=repr)
def test_keys_that_are_not_bytes(opener, bad):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    for call in (
        lambda: engine.put(bad, b"v"),
        lambda: engine.get(bad),
        lambda: engine.delete(bad),
        lambda: engine.write([("put", bad, b"v")]),
        lambda: engine.write([("delete", bad, None)]),
    ):
        with pytest.raises(BAD_INPUT) as info:
            call()
        assert "key" in str(info.value)
    assert_unchanged(engine, model, opener)


@pytest.mark.parametrize("bad", NOT_BYTES, ids=repr)
def test_values_that_are_not_bytes(opener, bad):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    with pytest.raises(BAD_INPUT, match="value"):
        engine.put(b"a", bad)
    with pytest.raises(BAD_INPUT):
        engine.write([("put", b"new", b"ok"), ("put", b"b", bad)])
    assert_unchanged(engine, model, opener)


def test_empty_key(opener):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    for call in (
        lambda: engine.put(b"", b"v"),
        lambda: engine.get(b""),
        lambda: engine.delete(b""),
        lambda: engine.write([("put", b"x", b"v"), ("put", b"", b"v")]),
    ):
        with pytest.raises(InvalidArgument, match="empty"):
            call()
    assert_unchanged(engine, model, opener)


def test_key_and_value_size_limits(opener):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    # exactly at the limit is fine
    engine.put(b"k" * 16, b"v" * 64)
    model[b"k" * 16] = b"v" * 64
    with pytest.raises(InvalidArgument, match="max_key_bytes"):
        engine.put(b"k" * 17, b"v")
    with pytest.raises(InvalidArgument, match="max_key_bytes"):
        engine.get(b"k" * 17)
    with pytest.raises(InvalidArgument, match="max_value_bytes"):
        engine.put(b"a", b"v" * 65)
    with pytest.raises(InvalidArgument, match="max_value_bytes"):
        engine.write([("put", b"new", b"x"), ("put", b"b", b"v" * 65)])
    assert_unchanged(engine, model, opener)


def test_default_limits_refuse_oversized_keys(engine):
    limit = engine.options.max_key_bytes
    engine.put(b"k" * limit, b"v")
    with pytest.raises(InvalidArgument):
        engine.put(b"k" * (limit + 1), b"v")
    assert [k for k, _ in engine.scan()] == [b"k" * limit]


@pytest.mark.parametrize(
    "batch",
    [
        "put a b",
        b"put",
        42,
        None,
        [("put", b"k")],
        [("get", b"k", None)],
        [("PUT", b"k", b"v")],
        [("delete", b"k", b"not-none")],
        [{"op": "put", "key": b"k", "value": b"v"}],
    ],
    ids=repr,
)
def test_bad_batches(opener, batch):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    with pytest.raises(BAD_INPUT):
        engine.write(batch)
    assert_unchanged(engine, model, opener)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (("a",), {}),
        ((None, "z"), {}),
        ((1,), {}),
        ((), {"limit": -1}),
        ((), {"limit": "10"}),
        ((), {"limit": 2.5}),
        ((), {"limit": True}),
    ],
    ids=repr,
)
def test_bad_scan_arguments(opener, args, kwargs):
    engine = opener(**SMALL_LIMITS)
    model = seed(engine)
    # the error comes when scan() is called, not later on first next()
    with pytest.raises(BAD_INPUT):
        engine.scan(*args, **kwargs)
    assert_unchanged(engine, model, opener)


def test_unknown_engine_kind():
    with pytest.raises(InvalidArgument, match="unknown engine"):
        open_engine("btree-of-dreams", "/nonexistent")


@pytest.mark.parametrize("kind_name", ENGINE_KINDS)
def test_unknown_option(kind_name, tmp_path):
    require_engine(kind_name)
    path = None if kind_name == "memory" else str(tmp_path / "data")
    with pytest.raises(InvalidArgument, match="no_such_option"):
        open_engine(kind_name, path, no_such_option=1)


@pytest.mark.parametrize(
    "options",
    [{"sync": "sometimes"}, {"max_key_bytes": 0}, {"max_value_bytes": -1}, {"max_batch_ops": 0}, {"sync_interval_ms": 0}],
    ids=repr,
)
@pytest.mark.parametrize("kind_name", ENGINE_KINDS)
def test_bad_option_values(kind_name, options, tmp_path):
    require_engine(kind_name)
    path = None if kind_name == "memory" else str(tmp_path / "data")
    with pytest.raises(InvalidArgument):
        open_engine(kind_name, path, **options)


@pytest.mark.parametrize("kind_name", [k for k in ENGINE_KINDS if k != "memory"])
def test_persistent_engine_needs_a_path(kind_name):
    require_engine(kind_name)
    with pytest.raises(InvalidArgument, match="path"):
        open_engine(kind_name, None)


def test_path_that_is_a_file(persistent_kind, tmp_path):
    """Opening a directory path that is an ordinary file fails clearly and leaves it alone."""
    target = tmp_path / "not-a-dir"
    target.write_bytes(b"precious")
    with pytest.raises((InvalidArgument, OSError)):
        open_engine(persistent_kind, str(target))
    assert target.read_bytes() == b"precious"
