"""Cluster files: parsing, validation messages that say what to fix, secrets, writing."""
from __future__ import annotations

import os
import stat

import pytest

from clusters.spec import (
    SpecError,
    find_cluster_file,
    load_spec,
    packaged_cluster_file,
    parse_spec,
    resolve_secret,
    secret_path,
    write_cluster_file,
)

NODE = '[[nodes]]\nid = "{id}"\nclient_url = "{url}"\npeer_address = "{peer}"\n'


def nodes(*triples) -> str:
    return "".join(NODE.format(id=i, url=u, peer=p) for i, u, p in triples)


def test_packaged_files_have_the_documented_ports():
    local3 = load_spec(packaged_cluster_file("local-3"))
    assert [(n.id, n.client_url, n.peer_address) for n in local3.nodes] == [
        ("n1", "http://127.0.0.1:2379", "127.0.0.1:2380"),
        ("n2", "http://127.0.0.1:22379", "127.0.0.1:22380"),
        ("n3", "http://127.0.0.1:32379", "127.0.0.1:32380"),
    ]
    local5 = load_spec(find_cluster_file("local-5"))
    assert [n.client_port for n in local5.nodes] == [2379, 22379, 32379, 42379, 52379]
    assert [n.peer_port for n in local5.nodes] == [2380, 22380, 32380, 42380, 52380]
    assert local3.secret is None and local5.secret is None  # generated per data dir, never shipped


def test_parse_full_file_with_ap_settings():
    spec = parse_spec(
        '[cluster]\nname = "x"\nsecret = "0123456789abcdef0123"\n[ap]\nreplicas = 2\nconflicts = "lww"\n'
        + nodes(("a", "http://127.0.0.1:1000", "127.0.0.1:1001"), ("b", "http://localhost:1002/", "localhost:1003"))
    )
    assert spec.name == "x" and spec.secret == "0123456789abcdef0123"
    assert spec.node("b").client_url == "http://localhost:1002"
    assert spec.node("b").client_port == 1002 and spec.node("b").peer_host == "localhost"
    assert spec.ap.as_overrides() == {"replicas": 2, "conflicts": "lww"}
    assert [m.id for m in spec.members()] == ["a", "b"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "no nodes"),
        ("[[nodes]\n", "not valid TOML"),
        (nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2"), ("n1", "http://127.0.0.1:3", "127.0.0.1:4")), "duplicate id"),
        (nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2"), ("n2", "http://127.0.0.1:1", "127.0.0.1:4")), "already used by n1"),
        (nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:1")), "already used by n1 client_url"),
        (nodes(("n1", "127.0.0.1:1", "127.0.0.1:2")), "must start with http://"),
        (nodes(("n1", "http://127.0.0.1", "127.0.0.1:2")), "explicit port"),
        (nodes(("n1", "http://127.0.0.1:1/v1", "127.0.0.1:2")), "no path"),
        (nodes(("n1", "http://127.0.0.1:99999", "127.0.0.1:2")), "bad port"),
        (nodes(("n1", "http://127.0.0.1:1", "127.0.0.1")), "host:port"),
        (nodes(("n1", "http://127.0.0.1:1", "0.0.0.0:2")), "not a wildcard"),
        (nodes(("bad id", "http://127.0.0.1:1", "127.0.0.1:2")), "id must be"),
        ('[[nodes]]\nid = "n1"\n', 'add client_url = "http://127.0.0.1:2379"'),
        ('[[nodes]]\nid = "n1"\nclient_url = "http://127.0.0.1:1"\n', "has no peer_address"),
        ('[[nodes]]\nid = "n1"\nclient_url = "http://127.0.0.1:1"\npeer_address = "127.0.0.1:2"\nclient_ur = "x"\n', "unknown key(s) client_ur"),
        ('[cluster]\nsecret = "short"\n' + nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2")), "at least 16"),
        ('[ap]\nreplicas = 0\n' + nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2")), "at least 1"),
        ('[ap]\nconflicts = "newest"\n' + nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2")), "vclock"),
        ('[clusterr]\n' + nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2")), "unknown table"),
    ],
)
def test_bad_files_say_what_to_fix(text, fragment):
    with pytest.raises(SpecError) as excinfo:
        parse_spec(text, source="my.toml")
    assert fragment in str(excinfo.value)
    assert str(excinfo.value).startswith("my.toml")


def test_unknown_node_names_the_known_ones():
    spec = load_spec(packaged_cluster_file())
    with pytest.raises(SpecError, match="n1, n2, n3"):
        spec.node("n9")


def test_missing_file_and_unknown_packaged_name():
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/c.toml")
    with pytest.raises(SpecError, match="local-3, local-5"):
        find_cluster_file("local-7")


def test_secret_is_generated_once_private_and_shared(tmp_path):
    spec = load_spec(packaged_cluster_file())
    first = resolve_secret(spec, tmp_path / "data")
    assert len(first) >= 32
    assert resolve_secret(spec, tmp_path / "data") == first
    mode = stat.S_IMODE(os.stat(secret_path(tmp_path / "data")).st_mode)
    assert mode == 0o600
    assert resolve_secret(spec, tmp_path / "other") != first  # another data dir, another cluster


def test_secret_from_the_file_wins(tmp_path):
    spec = parse_spec('[cluster]\nsecret = "a-long-enough-secret"\n' + nodes(("n1", "http://127.0.0.1:1", "127.0.0.1:2")))
    assert resolve_secret(spec, tmp_path) == "a-long-enough-secret"
    assert not secret_path(tmp_path).exists()


def test_write_cluster_file_round_trips(tmp_path):
    spec = write_cluster_file(tmp_path / "c.toml", 5, name="t")
    again = load_spec(tmp_path / "c.toml")
    assert again.nodes == spec.nodes and again.name == "t"
    ports = [n.client_port for n in spec.nodes] + [n.peer_port for n in spec.nodes]
    assert len(set(ports)) == 10
    fixed = write_cluster_file(tmp_path / "d.toml", 2, ports=[(7001, 7002), (7003, 7004)])
    assert [n.client_url for n in fixed.nodes] == ["http://127.0.0.1:7001", "http://127.0.0.1:7003"]
    with pytest.raises(SpecError):
        write_cluster_file(tmp_path / "e.toml", 2, ports=[(7001, 7002)])
