"""Cluster files: which nodes make a cluster, where each listens, and the shared secret.

A cluster file is TOML. The mode (`cp` or `ap`) is not in it: the same file starts either
way (`capkv up --mode cp|ap`), so the same curl commands can be compared.

    [cluster]
    name = "local-3"
    # secret = "..."        # optional; without it one is generated on first use and kept
    #                       # in <data-dir>/cluster.secret (mode 0600), so this file can
    #                       # stay read-only and be shared.

    [[nodes]]
    id = "n1"
    client_url = "http://127.0.0.1:2379"     # the HTTP API (API.md)
    peer_address = "127.0.0.1:2380"          # node-to-node traffic (Raft in cp, RPC in ap)

    [ap]                                     # optional defaults for ap mode; flags override
    replicas = 3
    read_quorum = 2
    write_quorum = 2

Loading validates everything up front and says what to fix:

    >>> parse_spec('[[nodes]]\\nid = "n1"\\n', source="c.toml")
    Traceback (most recent call last):
    ...
    clusters.spec.SpecError: c.toml: node 'n1' (nodes #1) has no client_url: add client_url = "http://127.0.0.1:2379"
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
import socket
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from api.service import Member

PACKAGED_CLUSTERS = ("local-3", "local-5")
SECRET_FILE_NAME = "cluster.secret"
# Node ids name directories and log files and appear in metrics: keep them plain.
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A cluster larger than this is a typo (or a job for a different tool): Raft and the
# ring both slow down with every member, and the launcher starts one process per node.
MAX_NODES = 64
MIN_SECRET_CHARS = 16

_CLUSTER_KEYS = {"name", "secret"}
_NODE_KEYS = {"id", "client_url", "peer_address"}
_AP_KEYS = {
    "replicas": int,
    "read_quorum": int,
    "write_quorum": int,
    "vnodes": int,
    "conflicts": str,
    "hinted_handoff": bool,
}


class SpecError(ValueError):
    """A cluster file (or a request about one) is wrong; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node of a cluster file."""

    id: str
    client_url: str  # http://host:port, no path
    peer_address: str  # host:port

    @property
    def client_host(self) -> str:
        return urllib.parse.urlsplit(self.client_url).hostname or ""

    @property
    def client_port(self) -> int:
        return int(urllib.parse.urlsplit(self.client_url).port or 0)

    @property
    def peer_host(self) -> str:
        return _split_host_port(self.peer_address)[0]

    @property
    def peer_port(self) -> int:
        return _split_host_port(self.peer_address)[1]

    def to_member(self) -> Member:
        return Member(id=self.id, client_url=self.client_url, peer_address=self.peer_address)


@dataclasses.dataclass(frozen=True)
class APSettings:
    """ap-mode defaults a cluster file may carry; `None` leaves the service's default."""

    replicas: int | None = None
    read_quorum: int | None = None
    write_quorum: int | None = None
    vnodes: int | None = None
    conflicts: str | None = None
    hinted_handoff: bool | None = None

    def as_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """A parsed, validated cluster file."""

    name: str
    nodes: tuple[NodeSpec, ...]
    secret: str | None = None
    ap: APSettings = dataclasses.field(default_factory=APSettings)
    source: str = "<string>"  # the file it came from, for messages

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    @property
    def endpoints(self) -> list[str]:
        return [n.client_url for n in self.nodes]

    def node(self, node_id: str) -> NodeSpec:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise SpecError(
            f"{self.source}: no node {node_id!r} in this cluster file; it defines {', '.join(self.node_ids)}"
        )

    def members(self) -> tuple[Member, ...]:
        return tuple(n.to_member() for n in self.nodes)


# --- parsing ---------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike) -> ClusterSpec:
    """Read and validate the cluster file at `path` (SpecError says what is wrong)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"cluster file {str(path)!r} does not exist; packaged ones: {', '.join(PACKAGED_CLUSTERS)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read cluster file {str(path)!r}: {exc}") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<string>") -> ClusterSpec:
    """Parse cluster-file TOML text; see the module docstring for the format."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None

    unknown = set(data) - {"cluster", "nodes", "ap"}
    if unknown:
        raise SpecError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; allowed: [cluster], [[nodes]], [ap]")

    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise SpecError(f"{source}: [cluster] must be a table")
    _reject_unknown(cluster, _CLUSTER_KEYS, f"{source}: [cluster]")
    name = cluster.get("name", Path(source).stem if source != "<string>" else "capkv")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{source}: [cluster] name must be a non-empty string")
    secret = cluster.get("secret")
    if secret is not None:
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
            raise SpecError(
                f"{source}: [cluster] secret must be a string of at least {MIN_SECRET_CHARS} characters "
                "(or leave it out and one is generated in the data dir)"
            )

    raw_nodes = data.get("nodes")
    if raw_nodes is None:
        raise SpecError(f'{source}: no nodes; add one [[nodes]] table per node with id, client_url, peer_address')
    if not isinstance(raw_nodes, list) or not all(isinstance(n, dict) for n in raw_nodes):
        raise SpecError(f"{source}: nodes must be [[nodes]] tables")
    if not raw_nodes:
        raise SpecError(f"{source}: no nodes; add at least one [[nodes]] table")
    if len(raw_nodes) > MAX_NODES:
        raise SpecError(f"{source}: {len(raw_nodes)} nodes; at most {MAX_NODES} are supported")

    nodes: list[NodeSpec] = []
    seen_ids: set[str] = set()
    seen_addresses: dict[tuple[str, int], str] = {}
    for index, raw in enumerate(raw_nodes, start=1):
        where = f"{source}: nodes #{index}"
        _reject_unknown(raw, _NODE_KEYS, where)
        node_id = raw.get("id")
        if not isinstance(node_id, str) or not NODE_ID_PATTERN.match(node_id):
            raise SpecError(
                f"{where}: id must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, "
                f"not {node_id!r}"
            )
        where = f"{source}: node {node_id!r} (nodes #{index})"
        if node_id in seen_ids:
            raise SpecError(f"{where}: duplicate id {node_id!r}; every node needs its own id")
        seen_ids.add(node_id)
        for field, example in (("client_url", "http://127.0.0.1:2379"), ("peer_address", "127.0.0.1:2380")):
            if field not in raw:
                raise SpecError(f'{where} has no {field}: add {field} = "{example}"')
            if not isinstance(raw[field], str):
                raise SpecError(f'{where}: {field} must be a string like "{example}"')
        client_url = check_client_url(raw["client_url"], where)
        peer_address = check_peer_address(raw["peer_address"], where)
        node = NodeSpec(node_id, client_url, peer_address)
        for label, address in (
            ("client_url", (node.client_host, node.client_port)),
            ("peer_address", (node.peer_host, node.peer_port)),
        ):
            other = seen_addresses.get(address)
            if other is not None:
                raise SpecError(
                    f"{where}: {label} port {address[0]}:{address[1]} is already used by {other}; "
                    "give every client and peer address its own port"
                )
            seen_addresses[address] = f"{node_id} {label}"
        nodes.append(node)

    ap_raw = data.get("ap", {})
    if not isinstance(ap_raw, dict):
        raise SpecError(f"{source}: [ap] must be a table")
    _reject_unknown(ap_raw, set(_AP_KEYS), f"{source}: [ap]")
    for key, kind in _AP_KEYS.items():
        if key in ap_raw and (not isinstance(ap_raw[key], kind) or (kind is int and isinstance(ap_raw[key], bool))):
            raise SpecError(f"{source}: [ap] {key} must be {'an integer' if kind is int else kind.__name__}")
        if kind is int and key in ap_raw and ap_raw[key] < 1:
            raise SpecError(f"{source}: [ap] {key} must be at least 1, not {ap_raw[key]}")
    if "conflicts" in ap_raw and ap_raw["conflicts"] not in ("vclock", "lww"):
        raise SpecError(f"{source}: [ap] conflicts must be \"vclock\" or \"lww\", not {ap_raw['conflicts']!r}")
    ap = APSettings(**ap_raw)
    return ClusterSpec(name=name, nodes=tuple(nodes), secret=secret, ap=ap, source=source)


def _reject_unknown(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def check_client_url(url: str, where: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise SpecError(f'{where}: client_url {url!r} must start with http:// (like "http://127.0.0.1:2379")')
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise SpecError(f"{where}: client_url {url!r} must be just http://host:port, with no path or query")
    try:
        port = parts.port
    except ValueError:
        raise SpecError(f"{where}: client_url {url!r} has a bad port; use 1-65535") from None
    if not parts.hostname:
        raise SpecError(f"{where}: client_url {url!r} has no host")
    if port is None:
        raise SpecError(f"{where}: client_url {url!r} needs an explicit port, like http://{parts.hostname}:2379")
    if port == 0:
        raise SpecError(f"{where}: client_url {url!r} needs a real port, not 0")
    return f"http://{_format_host(parts.hostname)}:{port}"


def check_peer_address(address: str, where: str) -> str:
    try:
        host, port = _split_host_port(address)
    except ValueError as exc:
        raise SpecError(f"{where}: peer_address {address!r} {exc}") from None
    if host in ("0.0.0.0", "::"):
        raise SpecError(
            f"{where}: peer_address {address!r} must name the interface to bind, not a wildcard: "
            "peer traffic is for cluster members only"
        )
    return f"{_format_host(host)}:{port}"


def _split_host_port(address: str) -> tuple[str, int]:
    if "://" in address or "/" in address:
        raise ValueError('must be host:port, like "127.0.0.1:2380", with no scheme or path')
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
    else:
        host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError('must be host:port, like "127.0.0.1:2380"')
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("has a bad port; use 1-65535")
    return host, int(port_text)


def _format_host(host: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    return host


# --- secrets ---------------------------------------------------------------------------------


def secret_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / SECRET_FILE_NAME


def resolve_secret(spec: ClusterSpec, data_dir: str | os.PathLike) -> str:
    """The cluster's peer secret: the file's, else `<data_dir>/cluster.secret`, generated
    (random, mode 0600) the first time. Every node of a local cluster shares the data dir,
    so they all read the same one.

        >>> import tempfile; d = tempfile.mkdtemp()
        >>> spec = parse_spec('[[nodes]]\\nid="n1"\\nclient_url="http://127.0.0.1:1"\\npeer_address="127.0.0.1:2"')
        >>> resolve_secret(spec, d) == resolve_secret(spec, d)
        True
    """
    if spec.secret:
        return spec.secret
    path = secret_path(data_dir)
    try:
        return read_secret_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # O_EXCL: when two nodes race to create it, one wins and the other reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret_file(path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value


def read_secret_file(path: str | os.PathLike) -> str:
    """Read a secret file (FileNotFoundError when absent; SpecError when unusable)."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if len(text) < MIN_SECRET_CHARS:
        raise SpecError(f"secret file {str(path)!r} holds fewer than {MIN_SECRET_CHARS} characters; delete it to regenerate")
    return text


# --- writing cluster files -------------------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free on `host` a moment ago (bound, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def render_spec(name: str, nodes: Iterable[NodeSpec], secret: str | None = None) -> str:
    """TOML text for a cluster file (the inverse of `parse_spec`)."""
    lines = ["[cluster]", f"name = {_toml_string(name)}"]
    if secret:
        lines.append(f"secret = {_toml_string(secret)}")
    for node in nodes:
        lines += [
            "",
            "[[nodes]]",
            f"id = {_toml_string(node.id)}",
            f"client_url = {_toml_string(node.client_url)}",
            f"peer_address = {_toml_string(node.peer_address)}",
        ]
    return "\n".join(lines) + "\n"


def write_cluster_file(
    path: str | os.PathLike,
    count: int,
    *,
    host: str = "127.0.0.1",
    ports: Iterable[tuple[int, int]] | None = None,
    name: str = "test",
    secret: str | None = None,
) -> ClusterSpec:
    """Write a cluster file for `count` nodes n1..nN and return its spec.

    `ports` gives (client_port, peer_port) per node; by default free ports are picked.

        >>> import tempfile, os; p = os.path.join(tempfile.mkdtemp(), "c.toml")
        >>> len(write_cluster_file(p, 3).nodes)
        3
    """
    if not 1 <= count <= MAX_NODES:
        raise SpecError(f"a cluster has 1 to {MAX_NODES} nodes, not {count}")
    if ports is None:
        flat = free_ports(2 * count, host)
        pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(count)]
    else:
        pairs = list(ports)
        if len(pairs) != count:
            raise SpecError(f"ports has {len(pairs)} (client, peer) pairs for {count} nodes")
    nodes = [
        NodeSpec(f"n{i + 1}", f"http://{_format_host(host)}:{client}", f"{_format_host(host)}:{peer}")
        for i, (client, peer) in enumerate(pairs)
    ]
    text = render_spec(name, nodes, secret)
    spec = parse_spec(text, source=str(path))  # validates what we are about to write
    Path(path).write_text(text, encoding="utf-8")
    return spec


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- packaged files --------------------------------------------------------------------------


def packaged_cluster_file(name: str = "local-3") -> Path:
    """The path of a cluster file shipped with capkv (`local-3`, `local-5`)."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in PACKAGED_CLUSTERS:
        raise SpecError(f"no packaged cluster {name!r}; choose one of {', '.join(PACKAGED_CLUSTERS)}")
    return Path(__file__).resolve().parent / f"{stem}.toml"


def find_cluster_file(name_or_path: str | os.PathLike | None) -> Path:
    """A path as given when it exists, else a packaged cluster by name; None: local-3."""
    if name_or_path is None:
        return packaged_cluster_file("local-3")
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    if str(path) == path.name and stem in PACKAGED_CLUSTERS:
        return packaged_cluster_file(stem)
    raise SpecError(
        f"cluster file {str(name_or_path)!r} does not exist; give a path or one of {', '.join(PACKAGED_CLUSTERS)}"
    )


__all__ = [
    "APSettings",
    "ClusterSpec",
    "NodeSpec",
    "SpecError",
    "find_cluster_file",
    "free_ports",
    "load_spec",
    "packaged_cluster_file",
    "parse_spec",
    "read_secret_file",
    "render_spec",
    "resolve_secret",
    "secret_path",
    "write_cluster_file",
]
