"""The member list a node keeps in its data directory (dynamo/membership.py)."""
import os

import pytest

from dynamo.membership import load_ring, save_ring

MEMBERS = [{"id": n, "client_url": f"http://{n}", "peer_address": f"{n}:1"} for n in ("n2", "n1")]


def test_a_saved_member_list_loads_back_and_a_missing_file_is_none(tmp_path):
    path = str(tmp_path / "ap-members.json")
    assert load_ring(path) is None
    save_ring(path, 3, MEMBERS)
    version, members = load_ring(path)
    assert version == 3 and [m["id"] for m in members] == ["n1", "n2"]
    save_ring(path, 4, MEMBERS[:1])
    assert load_ring(path) == (4, MEMBERS[:1])
    assert os.listdir(tmp_path) == ["ap-members.json"]  # no temp file left behind


def test_a_damaged_member_list_is_an_error_not_a_silent_fallback(tmp_path):
    path = tmp_path / "ap-members.json"
    path.write_bytes(b'{"format": 1, "ring_version": 2, "members": [{"id": "n1"}]}')
    with pytest.raises(ValueError, match="remove it"):
        load_ring(str(path))
    path.write_bytes(b"not json")
    with pytest.raises(ValueError):
        load_ring(str(path))
