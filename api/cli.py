"""`capkv`: run a node, run a local cluster, and talk to a cluster.

    capkv up                                   # cp mode, clusters/local-3.toml, lsm, ./capkv-data
    capkv up --mode ap --cluster local-5
    capkv put greeting hello                   # against the local-3 endpoints by default
    echo -n hello | capkv put greeting -
    capkv get greeting                         # -o json for scripts
    capkv ls config/                           # keys under a prefix
    capkv del config/ --prefix
    capkv cluster
    capkv watch config/ --prefix --rev 1       # cp: events as they come (Ctrl-C stops)
    capkv txn transfer.json                    # cp: an atomic txn from a JSON file (- for stdin)
    capkv lease grant 30; capkv lease keepalive 7587869960372000001; capkv lease ls
    capkv member ls; capkv member add n4 http://127.0.0.1:42379 127.0.0.1:42380
    capkv compact 100                          # cp: drop history below revision 100
    capkv serve --mode cp --cluster c.toml --node n1 --data-dir /var/lib/capkv

Exit codes (scripts can rely on them):

    0  success
    1  the key was not found (or a lease), a compare (--if-mod-revision) did not hold,
       or a txn took its failure branch
    2  usage error: a bad flag, cluster file or argument, or a request the server refused
       as invalid (400, 413, 501)
    3  unavailable or outcome unknown: no node answered, no quorum/leader (503), or a
       write that may or may not have been applied (504)
    4  any other server error
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_ERROR = 4

ENGINES = ("lsm", "hash", "memory")
SYNC_MODES = ("always", "batch", "never")
ENV_ENDPOINTS = "CAPKV_ENDPOINTS"
# How often a served node checks that the process that launched it is still there.
PARENT_CHECK_SECONDS = 1.0

log = logging.getLogger("capkv.cli")


class UsageError(Exception):
    """A bad flag, file or argument; the message says what to fix (exit code 2)."""


# --- argument parsing -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, not {value}")
    return value


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "yes", "1"):
        return True
    if text.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


def _add_node_options(p: argparse.ArgumentParser, *, for_up: bool) -> None:
    p.add_argument("--engine", choices=ENGINES, default="lsm", help="storage engine (default: lsm)")
    p.add_argument("--sync", choices=SYNC_MODES, default="always",
                   help="always: fsync before acknowledging; batch: every few ms; never: leave it to the OS (default: always)")
    p.add_argument("--data-dir", default="./capkv-data",
                   help="the cluster's data directory; each node uses <data-dir>/<node id> (default: ./capkv-data)")
    p.add_argument("--max-value-bytes", type=_positive_int, default=None, help="largest value accepted (default: 1 MiB)")
    ap = p.add_argument_group("ap mode (defaults from the cluster file's [ap] table, else N=3 R=2 W=2)")
    ap.add_argument("--replicas", type=_positive_int, help="N: copies of each key")
    ap.add_argument("--read-quorum", type=_positive_int, help="R: replies a read waits for")
    ap.add_argument("--write-quorum", type=_positive_int, help="W: acknowledgements a write waits for")
    ap.add_argument("--vnodes", type=_positive_int, help="virtual nodes per node on the ring (default 150)")
    ap.add_argument("--conflicts", choices=("vclock", "lww"), help="vclock: keep concurrent writes as siblings; lww: last write wins")
    ap.add_argument("--hinted-handoff", type=_on_off, metavar="on|off", help="sloppy quorum with hints (default on)")
    if not for_up:
        ap.add_argument("--join", metavar="URL", help="ap: join a running cluster through this node's client URL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkv",
        description="capkv: a distributed key-value store with a Raft (cp) mode and a Dynamo-style (ap) mode.",
        epilog="Examples:\n" + __doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one node of a cluster", formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--mode", choices=("cp", "ap"), required=True, help="cp: Raft, linearizable; ap: Dynamo-style")
    serve.add_argument("--cluster", required=True, help="cluster file (a path, or local-3 / local-5)")
    serve.add_argument("--node", required=True, help="this node's id in the cluster file")
    _add_node_options(serve, for_up=False)
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # For the launcher and tests; not for people.
    serve.add_argument("--secret-file", help=argparse.SUPPRESS)
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--service-factory", help=argparse.SUPPRESS)
    serve.add_argument("--peer-route", action="append", default=[], help=argparse.SUPPRESS)

    up = sub.add_parser("up", help="start a whole local cluster and stream its logs (Ctrl-C stops it)")
    up.add_argument("--mode", choices=("cp", "ap"), default="cp", help="default: cp")
    up.add_argument("--cluster", default=None, help="cluster file (a path, or local-3 / local-5; default: local-3)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the cluster to serve (default 60)")
    up.add_argument("--service-factory", help=argparse.SUPPRESS)  # tests: fake services
    _add_node_options(up, for_up=True)

    # Run by their own modules (`clusters/chaos.py`, `clusters/demo.py`); listed here for --help.
    sub.add_parser("chaos", help="run a workload under faults (kill, pause, partition) and check the history", add_help=False)
    sub.add_parser("demo", help="`capkv demo partition --mode cp|ap`: see the CAP trade-off narrated", add_help=False)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--endpoints", default=None,
                       help=f"comma-separated client URLs (default: ${ENV_ENDPOINTS}, else the local-3 endpoints)")
        p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="text for people, json for scripts")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
        return p

    get = client_parser("get", "read a key")
    get.add_argument("key")
    get.add_argument("--consistency", choices=("linearizable", "serializable"), default=None, help="cp only")
    get.add_argument("--revision", type=_positive_int, default=None, help="cp only: read as of this revision")
    get.add_argument("-r", "--read-quorum", dest="r", type=_positive_int, default=None, help="ap only: R for this read")

    put = client_parser("put", "write a key ('-' reads the value from stdin)")
    put.add_argument("key")
    put.add_argument("value", help="the value, or - to read it from stdin")
    put.add_argument("--if-mod-revision", type=int, default=None, help="cp: only if the key's mod_revision is this (0: only if absent)")
    put.add_argument("--lease", type=int, default=None, help="cp: attach to this lease")
    put.add_argument("--context", default=None, help="ap: the context from `capkv get` (supersedes what it saw)")
    put.add_argument("-w", "--write-quorum", dest="w", type=_positive_int, default=None, help="ap only: W for this write")

    delete = client_parser("del", "delete a key (or, with --prefix, every key under it)")
    delete.add_argument("key")
    delete.add_argument("--prefix", action="store_true", help="cp: delete every key starting with KEY")
    delete.add_argument("--if-mod-revision", type=int, default=None, help="cp: only if the key's mod_revision is this")
    delete.add_argument("--context", default=None, help="ap: the context from `capkv get`")

    ls = client_parser("ls", "list keys under a prefix")
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument("--limit", type=_positive_int, default=None, help="at most this many keys")
    ls.add_argument("--keys-only", action="store_true", help="cp: keys without values")

    client_parser("cluster", "show the cluster's members, leader or ring")

    watch = client_parser("watch", "cp: print events on a key (or, with --prefix, under it) as they come")
    watch.add_argument("key")
    watch.add_argument("--prefix", action="store_true", help="watch every key starting with KEY")
    watch.add_argument("--rev", type=_positive_int, default=None,
                       help="replay history from this revision first (410 when it was compacted)")
    watch.add_argument("--prev", action="store_true", help="show each event's previous value")
    watch.add_argument("--progress", action="store_true", help="also print the progress events of an idle watch")
    watch.add_argument("--max-events", type=_positive_int, default=None, help="stop after this many events")

    txn = client_parser("txn", "cp: run an atomic txn from a JSON file ('-' or nothing: stdin)")
    txn.add_argument("file", nargs="?", default="-",
                     help='{"compare": [...], "success": [...], "failure": [...]} as POST /v1/txn takes it')

    lease = client_parser("lease", "cp: grant, keep alive, revoke and list leases")
    lease_sub = lease.add_subparsers(dest="lease_command", metavar="grant|keepalive|revoke|ls|info", required=True)
    grant = lease_sub.add_parser("grant", help="grant a lease of TTL seconds; prints its id")
    grant.add_argument("ttl", type=_positive_int)
    keepalive = lease_sub.add_parser("keepalive", help="keep a lease alive (every ttl/3 until Ctrl-C, or --once)")
    keepalive.add_argument("id", type=_positive_int)
    keepalive.add_argument("--once", action="store_true", help="refresh once and exit")
    revoke = lease_sub.add_parser("revoke", help="revoke a lease: its keys are deleted")
    revoke.add_argument("id", type=_positive_int)
    info = lease_sub.add_parser("info", help="a lease's time left and keys")
    info.add_argument("id", type=_positive_int)
    lease_sub.add_parser("ls", help="list the leases")
    for p in lease_sub.choices.values():
        _client_options(p)

    member = client_parser("member", "list, add or remove cluster members (one change at a time)")
    member_sub = member.add_subparsers(dest="member_command", metavar="ls|add|remove", required=True)
    member_add = member_sub.add_parser("add", help="add a member")
    member_add.add_argument("id")
    member_add.add_argument("client_url", help="its client URL, like http://127.0.0.1:42379")
    member_add.add_argument("peer_address", help="its peer host:port, like 127.0.0.1:42380")
    member_remove = member_sub.add_parser("remove", help="remove a member")
    member_remove.add_argument("id")
    member_sub.add_parser("ls", help="list the members")
    for p in member_sub.choices.values():
        _client_options(p)

    compact = client_parser("compact", "cp: drop history and old revisions below REV")
    compact.add_argument("rev", type=_positive_int)
    return parser


def _client_options(p: argparse.ArgumentParser) -> None:
    """The client flags again on a sub-subcommand, so they work after it too
    (`capkv lease ls -o json`); SUPPRESS keeps the value given before it."""
    p.add_argument("--endpoints", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", choices=("text", "json"), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("chaos", "demo"):
        # Their flags are their own: hand over the rest of the command line whole.
        if argv[0] == "chaos":
            from clusters.chaos import main as chaos_main

            return chaos_main(argv[1:])
        from clusters.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "up":
            return cmd_up(args)
        return run_client_command(args)
    except UsageError as exc:
        print(f"capkv {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


# --- serve ----------------------------------------------------------------------------------------


def build_node_config(args: argparse.Namespace):
    """NodeConfig from `serve` flags and the cluster file (UsageError says what to fix)."""
    from api.service import NodeConfig
    from clusters.spec import SpecError, find_cluster_file, load_spec, read_secret_file, resolve_secret

    try:
        spec = load_spec(find_cluster_file(args.cluster))
        node = spec.node(args.node)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    data_root = Path(args.data_dir).resolve()
    try:
        if args.secret_file:
            secret = read_secret_file(args.secret_file)
        else:
            secret = resolve_secret(spec, data_root)
    except FileNotFoundError:
        raise UsageError(f"secret file {args.secret_file!r} does not exist") from None
    except (SpecError, OSError) as exc:
        raise UsageError(str(exc)) from None
    ap = spec.ap.as_overrides()
    for flag, field in (("replicas", "replicas"), ("read_quorum", "read_quorum"), ("write_quorum", "write_quorum"),
                        ("vnodes", "vnodes"), ("conflicts", "conflicts"), ("hinted_handoff", "hinted_handoff")):  # fmt: skip
        value = getattr(args, flag, None)
        if value is not None:
            ap[field] = value
    n = ap.get("replicas", 3)
    for name in ("read_quorum", "write_quorum"):
        if ap.get(name, 2) > n:
            raise UsageError(f"--{name.replace('_', '-')} {ap.get(name, 2)} is more than --replicas {n}; a quorum is at most N")
    peer_routes = []
    for route in args.peer_route:
        member_id, sep, address = route.partition("=")
        if not sep:
            raise UsageError(f"--peer-route {route!r} must be ID=HOST:PORT")
        spec.node(member_id)
        peer_routes.append((member_id, address))
    node_dir = data_root / node.id
    try:
        node_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the data directory {str(node_dir)!r}: {exc}") from None
    kwargs: dict[str, Any] = dict(
        node_id=node.id, members=spec.members(), secret=secret, data_dir=str(node_dir),
        engine=args.engine, sync=args.sync, join=getattr(args, "join", None), peer_routes=tuple(peer_routes), **ap,
    )  # fmt: skip
    if args.max_value_bytes is not None:
        kwargs["max_value_bytes"] = args.max_value_bytes
    return NodeConfig(**kwargs), node


def load_factory(mode: str, dotted: str | None) -> Callable:
    """The `create_service` of the mode's package, or `module:function` for tests."""
    if dotted:
        module_name, sep, func = dotted.partition(":")
        if not sep:
            raise UsageError("--service-factory must be module:function")
        return getattr(importlib.import_module(module_name), func)
    package = {"cp": "consensus.service", "ap": "dynamo.service"}[mode]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise UsageError(f"{mode} mode is not available in this build ({package}: {exc})") from None
    return module.create_service


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.node} %(name)s: %(message)s")  # fmt: skip
    config, node = build_node_config(args)
    factory = load_factory(args.mode, args.service_factory)
    _check_port_free(node.client_host, node.client_port, f"{node.id}'s client_url {node.client_url}")
    try:
        return asyncio.run(_serve(config, factory, node.client_host, node.client_port, args.parent_pid, args.mode))
    except KeyboardInterrupt:
        return EXIT_OK


async def _serve(config, factory, host: str, port: int, parent_pid: int | None, mode: str) -> int:
    from aiohttp import web

    from api.app import make_app, server_kwargs
    from api.routes.common import LIMITS_KEY

    service = factory(config)
    app = make_app(service, config, tune_gc=True)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_kwargs(app[LIMITS_KEY]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    await runner.setup()  # starts the service (cleanup_ctx)
    try:
        site = web.TCPSite(runner, host.strip("[]"), port, reuse_address=True)
        await site.start()
        log.info("capkv %s node %s serving http://%s:%d (data %s, engine %s, sync %s)",
                 mode, config.node_id, host, port, config.data_dir, config.engine, config.sync)  # fmt: skip
        await stop.wait()
        log.info("stopping")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await runner.cleanup()  # stops the service
    log.info("stopped")
    return EXIT_OK


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop when the launcher that started us is gone, so no node outlives its test."""
    while not stop.is_set():
        await asyncio.sleep(PARENT_CHECK_SECONDS)
        if os.getppid() != parent_pid:
            log.warning("launcher (pid %d) is gone; stopping", parent_pid)
            stop.set()


def _check_port_free(host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {what}: {exc.strerror or exc}; is another capkv (or etcd) running there? "
                "Stop it, or use a cluster file with other ports"
            ) from None


# --- up -------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from clusters.launcher import ClusterError, LocalCluster
    from clusters.spec import SpecError, find_cluster_file, load_spec

    try:
        cluster_file = find_cluster_file(args.cluster)
        spec = load_spec(cluster_file)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    for node in spec.nodes:
        _check_port_free(node.client_host, node.client_port, f"{node.id}'s client_url {node.client_url}")
        _check_port_free(node.peer_host, node.peer_port, f"{node.id}'s peer_address {node.peer_address}")

    extra: list[str] = []
    for flag in ("max_value_bytes", "replicas", "read_quorum", "write_quorum", "vnodes", "conflicts"):
        value = getattr(args, flag)
        if value is not None:
            extra += ["--" + flag.replace("_", "-"), str(value)]
    if args.hinted_handoff is not None:
        extra += ["--hinted-handoff", "on" if args.hinted_handoff else "off"]
    if args.service_factory:
        extra += ["--service-factory", args.service_factory]

    print_lock = threading.Lock()
    width = max(len(n.id) for n in spec.nodes)

    def sink(node_id: str, line: str) -> None:
        with print_lock:
            print(f"{node_id:>{width}} | {line}", flush=True)

    def say(text: str) -> None:
        with print_lock:
            print(text, flush=True)

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    cluster = LocalCluster(cluster_file, mode=args.mode, data_dir=args.data_dir, engine=args.engine, sync=args.sync,
                           extra_args=extra, log_sink=sink)  # fmt: skip
    say(f"capkv: starting {len(spec.nodes)} {args.mode} nodes of {spec.name} (engine {args.engine}, sync {args.sync}, "
        f"data in {cluster.data_dir})")  # fmt: skip
    try:
        starter = threading.Thread(target=_start_into, args=(cluster, args.timeout, stop), daemon=True)
        starter.start()
        while starter.is_alive():
            starter.join(0.2)
            if stop.is_set():
                say("capkv: interrupted while starting; stopping the nodes")
                cluster.stop()
                return EXIT_UNAVAILABLE
        if getattr(starter, "error", None) is not None:
            raise starter.error
        leader = None
        if args.mode == "cp":
            try:
                leader = cluster.leader(timeout=5)
            except ClusterError:
                leader = None
        say(_banner(cluster, args.mode, leader))
        reported: set[str] = set()
        while not stop.wait(0.5):
            for node in cluster.nodes.values():
                if node.process is not None and not node.running and node.id not in reported:
                    reported.add(node.id)
                    say(f"capkv: node {node.id} exited with code {node.process.returncode}")
        say("capkv: stopping every node")
        cluster.stop()
        say("capkv: stopped")
        return EXIT_OK
    except ClusterError as exc:
        say(f"capkv up: the cluster did not start: {exc}")
        cluster.stop()
        return EXIT_UNAVAILABLE
    finally:
        cluster.stop()


def _start_into(cluster, timeout: float, stop: threading.Event) -> None:
    thread = threading.current_thread()
    try:
        cluster.start(timeout=timeout)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        thread.error = exc  # type: ignore[attr-defined]


def _banner(cluster, mode: str, leader: str | None) -> str:
    lines = [f"capkv: {mode} cluster {cluster.spec.name} is up:"]
    for node in cluster.nodes.values():
        role = " (leader)" if node.id == leader else ""
        lines.append(f"  {node.id}  {node.client_url}{role}")
    first, second = cluster.urls[0], cluster.urls[min(1, len(cluster.urls) - 1)]
    lines += [
        "try:",
        f"  curl -X PUT --data-binary hello {first}/v1/kv/greeting",
        f"  curl {second}/v1/kv/greeting",
        f"  curl {first}/v1/cluster",
        "Ctrl-C (or SIGTERM) stops every node.",
    ]
    return "\n".join(lines)


# --- client commands ------------------------------------------------------------------------------


def default_endpoints() -> list[str]:
    env = os.environ.get(ENV_ENDPOINTS)
    if env:
        return _split_endpoints(env)
    from clusters.spec import load_spec, packaged_cluster_file

    return load_spec(packaged_cluster_file("local-3")).endpoints


def _split_endpoints(text: str) -> list[str]:
    endpoints = [e.strip().rstrip("/") for e in text.split(",") if e.strip()]
    if not endpoints:
        raise UsageError("--endpoints is empty; give client URLs like http://127.0.0.1:2379")
    for e in endpoints:
        if not e.startswith(("http://", "https://")):
            raise UsageError(f"endpoint {e!r} must start with http://")
    return endpoints


def run_client_command(args: argparse.Namespace) -> int:
    from api.client import CapkvError, Client, ConnectionFailed, KeyNotFound, PreconditionFailed

    endpoints = _split_endpoints(args.endpoints) if args.endpoints else default_endpoints()
    client = Client(endpoints, timeout=args.timeout)
    out = _Output(args.output)
    try:
        if args.command == "get":
            return _cmd_get(client, args, out)
        if args.command == "put":
            return _cmd_put(client, args, out)
        if args.command == "del":
            return _cmd_del(client, args, out)
        if args.command == "ls":
            return _cmd_ls(client, args, out)
        if args.command == "cluster":
            out.emit(client.cluster(), _format_cluster)
            return EXIT_OK
        if args.command == "watch":
            return _cmd_watch(client, args, out)
        if args.command == "txn":
            return _cmd_txn(client, args, out)
        if args.command == "lease":
            return _cmd_lease(client, args, out)
        if args.command == "member":
            return _cmd_member(client, args, out)
        if args.command == "compact":
            out.emit(client.compact(args.rev), lambda p: f"compacted below revision {p['compact_revision']} "
                                                       f"(store at revision {p['revision']})")  # fmt: skip
            return EXIT_OK
        raise UsageError(f"unknown command {args.command}")
    except KeyNotFound as exc:
        out.error(exc)
        return EXIT_NOT_FOUND
    except PreconditionFailed as exc:
        out.error(exc)
        return EXIT_NOT_FOUND
    except ConnectionFailed as exc:
        out.error(exc)
        return EXIT_UNAVAILABLE
    except CapkvError as exc:
        out.error(exc)
        if exc.status in (400, 405, 413, 501):
            return EXIT_USAGE
        if exc.status in (503, 504):
            return EXIT_UNAVAILABLE
        if exc.status == 404:
            return EXIT_NOT_FOUND
        return EXIT_ERROR


class _Output:
    def __init__(self, fmt: str):
        self.fmt = fmt

    def emit(self, payload: dict, human: Callable[[dict], str]) -> None:
        if self.fmt == "json":
            print(json.dumps(payload, indent=None, sort_keys=True))
        else:
            print(human(payload))

    def error(self, exc) -> None:
        if self.fmt == "json":
            print(json.dumps({"error": {"status": exc.status, "code": exc.code, "message": exc.message, **exc.details}},
                             sort_keys=True))  # fmt: skip
        print(f"capkv: {exc.message} ({exc.code}{', HTTP ' + str(exc.status) if exc.status else ''})", file=sys.stderr)


def _text_of(item: dict, name: str = "value") -> str:
    if name in item:
        return str(item[name])
    if f"{name}_base64" in item:
        return f"<{len(base64.b64decode(item[name + '_base64']))} bytes, base64 {item[name + '_base64']}>"
    return ""


def _cmd_get(client, args, out: _Output) -> int:
    query: dict[str, Any] = {"timeout_ms": int(args.timeout * 1000)}
    if args.consistency:
        query["consistency"] = args.consistency
    if args.revision:
        query["revision"] = args.revision
    if args.r:
        query["r"] = args.r
    payload = client.request("GET", client.key_path(args.key), query=query)
    out.emit(payload, _format_get)
    return EXIT_OK


def _format_get(p: dict) -> str:
    if "siblings" in p:  # ap
        if len(p["siblings"]) == 1:
            lines = [_text_of(p)]
        else:
            lines = [f"{len(p['siblings'])} siblings (concurrent writes; resolve with put --context):"]
            lines += [f"  [{i + 1}] {_text_of(s)}" for i, s in enumerate(p["siblings"])]
        lines.append(f"context: {p['context']}")
        return "\n".join(lines)
    meta = f"(mod_revision {p['mod_revision']}, create_revision {p['create_revision']}, version {p['version']}"
    meta += f", lease {p['lease']})" if p.get("lease") else ")"
    return f"{_text_of(p)}\n{meta}"


def _cmd_put(client, args, out: _Output) -> int:
    if args.value == "-":
        value = sys.stdin.buffer.read()
    else:
        value = args.value.encode("utf-8")
    query: dict[str, Any] = {"timeout_ms": int(args.timeout * 1000)}
    if args.if_mod_revision is not None:
        query["if_mod_revision"] = args.if_mod_revision
    if args.lease is not None:
        query["lease"] = args.lease
    if args.w is not None:
        query["w"] = args.w
    headers = {"X-Capkv-Context": args.context} if args.context else None
    payload = client.request("PUT", client.key_path(args.key), query=query, body=value, headers=headers, write=True)
    out.emit(payload, lambda p: f"OK revision {p['revision']}{' (created)' if p.get('created') else ''}"
             if "revision" in p else f"OK\ncontext: {p.get('context')}")  # fmt: skip
    return EXIT_OK


def _cmd_del(client, args, out: _Output) -> int:
    query: dict[str, Any] = {"timeout_ms": int(args.timeout * 1000)}
    if args.prefix:
        query["prefix"] = "true"
    if args.if_mod_revision is not None:
        query["if_mod_revision"] = args.if_mod_revision
    headers = {"X-Capkv-Context": args.context} if args.context else None
    payload = client.request("DELETE", client.key_path(args.key), query=query, headers=headers, write=True)
    out.emit(payload, lambda p: f"deleted {p['deleted']} (revision {p['revision']})"
             if "deleted" in p else f"deleted (tombstone written)\ncontext: {p.get('context')}")  # fmt: skip
    return EXIT_OK


def _cmd_ls(client, args, out: _Output) -> int:
    query: dict[str, Any] = {"prefix": args.prefix, "timeout_ms": int(args.timeout * 1000)}
    if args.limit:
        query["limit"] = args.limit
    if args.keys_only:
        query["keys_only"] = "true"
    payload = client.request("GET", "/v1/kv", query=query)
    out.emit(payload, _format_ls)
    return EXIT_OK


def _format_ls(p: dict) -> str:
    lines = []
    for item in p.get("items", []):
        key = _text_of(item, "key")
        if "siblings" in item:
            values = [_text_of(s) for s in item["siblings"]]
            shown = values[0] if len(values) == 1 else f"{len(values)} siblings: " + " | ".join(values)
            lines.append(f"{key}\t{shown}")
        elif "value" in item or "value_base64" in item:
            lines.append(f"{key}\t{_text_of(item)}")
        else:
            lines.append(key)
    if not lines:
        lines.append("(no keys)")
    if p.get("more"):
        lines.append("... more keys: use --limit, or -o json and page with start_after")
    if p.get("partial"):
        lines.append("(partial: some ranges of the ring did not answer)")
    return "\n".join(lines)


def _cmd_watch(client, args, out: _Output) -> int:
    """Print events as they come, flushed at once (so `capkv watch ... | grep` works)."""
    target = {"prefix": args.key} if args.prefix else {"key": args.key}
    seen = 0
    try:
        for event in client.watch(start_revision=args.rev, prev=args.prev, **target):
            if event.get("type") == "progress" and not args.progress:
                continue
            if out.fmt == "json":
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(_format_event(event), flush=True)
            seen += event.get("type") in ("put", "delete")
            if args.max_events and seen >= args.max_events:
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _format_event(e: dict) -> str:
    kind = e.get("type")
    if kind == "progress":
        return f"PROGRESS revision {e.get('revision')}"
    if kind == "canceled":
        extra = f", compact_revision {e['compact_revision']}" if e.get("compact_revision") else ""
        return f"CANCELED {e.get('reason', '')} (revision {e.get('revision')}{extra})"
    line = f"{kind.upper()} {_text_of(e, 'key')}"
    if kind == "put":
        line += f" = {_text_of(e)}"
    line += f"  (revision {e.get('mod_revision')})"
    if e.get("prev"):
        line += f"  prev: {_text_of(e['prev'])}"
    return line


def _cmd_txn(client, args, out: _Output) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{args.file} is not JSON ({exc}); give {{\"compare\": [...], \"success\": [...], "
                         f"\"failure\": [...]}}") from None
    if not isinstance(body, dict):
        raise UsageError("the txn must be a JSON object with compare, success and failure")
    payload = client.request("POST", "/v1/txn", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                             write=True, query={"timeout_ms": int(args.timeout * 1000)})  # fmt: skip
    out.emit(payload, _format_txn)
    return EXIT_OK if payload.get("succeeded") else EXIT_NOT_FOUND


def _format_txn(p: dict, indent: str = "") -> str:
    lines = [f"{indent}{'SUCCEEDED' if p.get('succeeded') else 'FAILED (failure branch)'} at revision {p.get('revision')}"]
    for r in p.get("responses", []):
        if r["op"] == "get":
            lines.append(f"{indent}  get: {r['count']} key(s)")
            lines += [f"{indent}    {_text_of(i, 'key')}\t{_text_of(i)}" for i in r.get("items", [])]
        elif r["op"] == "put":
            lines.append(f"{indent}  put: OK revision {r['revision']}{' (created)' if r.get('created') else ''}")
        elif r["op"] == "delete":
            lines.append(f"{indent}  delete: {r['deleted']} deleted")
        else:
            lines.append(_format_txn(r, indent + "  "))
    return "\n".join(lines)


def _cmd_lease(client, args, out: _Output) -> int:
    import time as _time

    command = args.lease_command
    if command == "grant":
        out.emit(client.lease_grant(args.ttl), lambda p: f"lease {p['id']} granted with TTL {p['ttl']}s")
    elif command == "revoke":
        out.emit(client.lease_revoke(args.id), lambda p: f"lease {p['id']} revoked (revision {p['revision']})")
    elif command == "info":
        out.emit(client.lease_info(args.id), lambda p: f"lease {p['id']}: {p['ttl']}s left of {p['granted_ttl']}s; "
                                                       f"keys: {', '.join(p.get('keys', [])) or '(none)'}")  # fmt: skip
    elif command == "ls":
        leases = client.leases()
        out.emit({"leases": leases}, lambda p: "\n".join(f"{l['id']}\t{l['ttl']}s left of {l['granted_ttl']}s"
                                                         for l in p["leases"]) or "(no leases)")  # fmt: skip
    else:
        try:
            while True:
                answer = client.lease_keepalive(args.id)
                out.emit(answer, lambda p: f"lease {p['id']} kept alive, TTL {p['ttl']}s")
                sys.stdout.flush()
                if args.once:
                    break
                _time.sleep(max(0.5, answer.get("ttl", 3) / 3))
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def _cmd_member(client, args, out: _Output) -> int:
    command = args.member_command
    if command == "ls":
        out.emit(client.cluster(), _format_cluster)
    elif command == "add":
        out.emit(client.add_member(args.id, args.client_url, args.peer_address),
                 lambda p: f"member {args.id} added: {json.dumps(p, sort_keys=True)}")  # fmt: skip
    else:
        out.emit(client.remove_member(args.id), lambda p: f"member {args.id} removed: {json.dumps(p, sort_keys=True)}")
    return EXIT_OK


def _format_cluster(p: dict) -> str:
    lines = []
    if p.get("mode") == "cp":
        lines.append(f"cp cluster: leader {p.get('leader') or '(none)'}, term {p.get('term')}, revision {p.get('revision')}, "
                     f"answered by {p.get('node')}")  # fmt: skip
        for m in p.get("members", []):
            reach = "" if m.get("reachable", True) else "  UNREACHABLE"
            lines.append(f"  {m.get('id'):<6} {m.get('role', ''):<10} {m.get('client_url', '')}{reach}")
    else:
        lines.append(f"ap cluster: N={p.get('n')} R={p.get('r')} W={p.get('w')}, hints pending {p.get('hints_pending')}, "
                     f"answered by {p.get('node')}")  # fmt: skip
        for m in p.get("members", []):
            ownership = m.get("ownership")
            owned = f"{ownership * 100:.1f}%" if isinstance(ownership, (int, float)) else "?"
            lines.append(f"  {m.get('id'):<6} {m.get('status', ''):<8} {m.get('client_url', '')}  owns {owned}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
