"""Snapshot files: written off the apply thread, refused whole when damaged, installed once."""
from __future__ import annotations

import os
import time

import pytest

from consensus import snapshot as snapshot_file
from consensus.raft_node import SERIALIZER_STATE, _Snapshots
from consensus.state_machine import KVStateMachine, make_delete, make_put
from engines import open_engine


def store_with_data():
    sm = KVStateMachine(open_engine("memory"))
    index = 1
    for i in range(50):
        index += 1
        sm.apply(make_put(b"k%02d" % (i % 20), b"v%d" % i, request_id=f"r{i}"), index)
    index += 1
    sm.apply(make_delete(b"k00"), index)
    return sm, index


def write(snapshots: _Snapshots, tmp_file: str, index: int):
    raft_data = ((b"\x00cmd", index, 3), (b"\x00cmd", index - 1, 3), [])
    snapshots.serialize(tmp_file, raft_data)
    deadline = time.monotonic() + 10
    while (status := snapshots.checker()) == SERIALIZER_STATE.SERIALIZING:  # the first call starts the writer
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return status


def test_a_snapshot_rebuilds_an_empty_store(tmp_path):
    sm, index = store_with_data()
    path = str(tmp_path / "snapshot")
    snapshots = _Snapshots(path, sm, durable=True)
    assert write(snapshots, path + ".tmp", index) == SERIALIZER_STATE.SUCCESS
    assert snapshots.checker() == SERIALIZER_STATE.NOT_SERIALIZING, "success is reported once"
    assert snapshots.written == 1
    empty = KVStateMachine(open_engine("memory"))
    last, prev, cluster = _Snapshots(path, empty, durable=True).deserialize(path)
    assert last == (b"\x00cmd", index, 3) and prev[1] == index - 1
    empty._check()
    assert empty.applied_index == index and empty.revision == sm.revision
    assert [(kv.key, kv.value) for kv in empty.range(b"\x00", b"\x00")[0]] == [
        (kv.key, kv.value) for kv in sm.range(b"\x00", b"\x00")[0]
    ]
    assert empty.get(b"k00", revision=sm.revision - 1)[0] is not None, "history came along"


def test_a_store_already_past_the_snapshot_is_left_alone(tmp_path):
    sm, index = store_with_data()
    path = str(tmp_path / "snapshot")
    write(_Snapshots(path, sm, durable=False), path + ".tmp", index - 5)
    before = sm.revision
    snapshots = _Snapshots(path, sm, durable=False)
    snapshots.deserialize(path)
    assert snapshots.skipped_installs == 1 and sm.revision == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_snapshot_is_refused_before_anything_changes(tmp_path, damage):
    sm, index = store_with_data()
    path = str(tmp_path / "snapshot")
    write(_Snapshots(path, sm, durable=False), path + ".tmp", index)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) - 20]
    else:
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    target = KVStateMachine(open_engine("memory"))
    target.apply(make_put(b"mine", b"kept"), 2)
    with pytest.raises(snapshot_file.CorruptSnapshot):
        _Snapshots(path, target, durable=False).deserialize(path)
    assert target.get(b"mine")[0].value == b"kept" and target.applied_index == 2


def test_the_first_snapshot_never_leaves_pysyncobjs_placeholder_behind(tmp_path):
    sm, index = store_with_data()
    path = str(tmp_path / "snapshot")
    snapshots = _Snapshots(path, sm, durable=False)
    raft_data = ((b"\x00", index, 1), (b"\x00", index - 1, 1), [])
    snapshots.serialize(path + ".tmp", raft_data)
    os.replace(path + ".tmp", path)  # what pysyncobj does right after serialize() returns
    while snapshots.checker() == SERIALIZER_STATE.SERIALIZING:
        time.sleep(0.01)
    assert snapshot_file.verify(path)["index"] == index
