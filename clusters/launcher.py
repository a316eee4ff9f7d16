"""Start, hurt and stop a whole capkv cluster on this machine: what `capkv up` and the
integration tests share.

Every node is a child process, `python -m api.cli serve --node ID ...`, so a test can do
to it what happens to real servers: SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restart on the same
data. The API is plain synchronous code (call it from threads or `asyncio.to_thread`):

    with LocalCluster("clusters/local-3.toml", mode="cp", data_dir=tmp) as cluster:
        leader = cluster.leader()
        cluster.kill(leader)                 # SIGKILL, like a crash
        new_leader = cluster.leader(timeout=10)
        cluster.restart(leader)              # same data dir; waits until it is healthy
    # leaving the block stops every node (SIGTERM, then SIGKILL after a grace period)

Layout under `data_dir`: `cluster.secret` (generated when the cluster file has none; the
children get its path with `--secret-file`, so the secret never shows in `ps`), one
directory per node (`<data_dir>/<node id>/`, the node's own), and node logs in `log_dir`
(default `<data_dir>/logs/<node id>.log`, appended across restarts) unless a `log_sink`
streams them line by line, prefixed with the node id (what `capkv up` does).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .spec import ClusterSpec, load_spec, resolve_secret, secret_path

MODES = ("cp", "ap")
# SIGTERM gets this long to finish in-flight requests and close files before SIGKILL.
STOP_GRACE_SECONDS = 10.0
# Each probe of a node's HTTP API waits at most this long: a paused node must not stall
# a wait loop that has other nodes to look at.
PROBE_TIMEOUT_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.1
# How much of a node's log a startup failure quotes.
LOG_TAIL_BYTES = 4000
# Project root: lets children import capkv when it runs from a checkout (not installed).
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class ClusterError(RuntimeError):
    """The cluster did not do what was asked (a node failed to start, no leader, ...)."""


class ClusterTimeout(ClusterError, TimeoutError):
    """A wait ran out of time."""


@dataclasses.dataclass
class NodeHandle:
    """One node of a LocalCluster: where it listens and its current process (or None)."""

    id: str
    client_url: str
    peer_address: str
    process: subprocess.Popen | None = None
    paused: bool = False
    log_path: Path | None = None
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """The process exists and has not exited (it may be paused)."""
        return self.process is not None and self.process.poll() is None

    @property
    def serving(self) -> bool:
        """Running and not paused: expected to answer requests."""
        return self.running and not self.paused


class LocalCluster:
    """A cluster of local child processes. See the module docstring.

    `extra_args` go to every `capkv serve` (e.g. `("--replicas", "3")`);
    `node_args` adds per-node ones. `env` adds environment variables for the children.
    """

    def __init__(
        self,
        cluster_file: str | os.PathLike,
        mode: str = "cp",
        data_dir: str | os.PathLike | None = None,
        engine: str = "lsm",
        sync: str = "always",
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike | None = None,
        *,
        log_sink: Callable[[str, str], None] | None = None,
        node_args: dict[str, Sequence[str]] | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        stop_grace: float = STOP_GRACE_SECONDS,
    ) -> None:
        if mode not in MODES and not any(a.startswith("--service-factory") for a in extra_args):
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.cluster_file = Path(cluster_file).resolve()
        self.spec: ClusterSpec = load_spec(self.cluster_file)
        self.mode = mode
        self.data_dir = Path(data_dir if data_dir is not None else "capkv-data").resolve()
        self.engine = engine
        self.sync = sync
        self.extra_args = tuple(extra_args)
        self.node_args = {k: tuple(v) for k, v in (node_args or {}).items()}
        for node_id in self.node_args:
            self.spec.node(node_id)  # unknown id: SpecError naming the known ones
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else self.data_dir / "logs"
        self.log_sink = log_sink
        self.env = dict(env or {})
        self.python = python
        self.stop_grace = stop_grace
        self.nodes: dict[str, NodeHandle] = {
            n.id: NodeHandle(n.id, n.client_url, n.peer_address) for n in self.spec.nodes
        }
        self._log_files: dict[str, object] = {}
        self._log_threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._secret_file: Path | None = None
        _live_clusters.add(self)

    # --- views --------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.client_url for n in self.nodes.values()]

    def url(self, node_id: str) -> str:
        return self._node(node_id).client_url

    def __repr__(self) -> str:
        states = ", ".join(f"{n.id}:{'paused' if n.paused else 'up' if n.running else 'down'}" for n in self.nodes.values())
        return f"<LocalCluster {self.spec.name} mode={self.mode} {states}>"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        """Spawn every node not running yet and wait until all are healthy (cp: a leader
        exists). On failure every node is stopped and ClusterError quotes the logs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Resolve the secret once here, so nodes never race to create it.
        resolve_secret(self.spec, self.data_dir)
        self._secret_file = secret_path(self.data_dir) if not self.spec.secret else None
        try:
            for node_id, node in self.nodes.items():
                if not node.running:
                    self._spawn(node)
            self.wait_healthy(timeout=timeout)
            if self.mode == "cp":
                self.leader(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node: SIGTERM (and SIGCONT for paused ones), SIGKILL after the grace
        period. Idempotent; safe to call after partial starts and from atexit."""
        with self._lock:
            running = [n for n in self.nodes.values() if n.running]
            for node in running:
                self._signal(node, signal.SIGTERM)
                self._signal(node, signal.SIGCONT)
                node.paused = False
            deadline = time.monotonic() + self.stop_grace
            for node in running:
                self._wait_exit(node, deadline)
            self._close_logs()

    def kill(self, node_id: str) -> None:
        """SIGKILL the node (a crash: no flush, no goodbye) and reap it."""
        node = self._node(node_id)
        with self._lock:
            if not node.running:
                raise ClusterError(f"node {node_id} is not running")
            self._signal(node, signal.SIGKILL)
            node.process.wait()
            node.paused = False

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the process freezes with its sockets open (a GC pause, a hung VM)."""
        node = self._node(node_id)
        with self._lock:
            if not node.running:
                raise ClusterError(f"node {node_id} is not running")
            self._signal(node, signal.SIGSTOP)
            node.paused = True

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node."""
        node = self._node(node_id)
        with self._lock:
            if not node.running:
                raise ClusterError(f"node {node_id} is not running")
            self._signal(node, signal.SIGCONT)
            node.paused = False

    def stop_node(self, node_id: str, timeout: float | None = None) -> int | None:
        """SIGTERM the node and wait (SIGKILL after the grace period); returns its exit code."""
        node = self._node(node_id)
        with self._lock:
            if not node.running:
                return node.process.returncode if node.process is not None else None
            self._signal(node, signal.SIGTERM)
            self._signal(node, signal.SIGCONT)
            node.paused = False
            self._wait_exit(node, time.monotonic() + (self.stop_grace if timeout is None else timeout))
            return node.process.returncode

    def restart(self, node_id: str, wait: bool = True, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again on the same data dir (and wait until healthy)."""
        node = self._node(node_id)
        with self._lock:
            if node.running:
                raise ClusterError(f"node {node_id} is still running (pid {node.pid}); stop or kill it first")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            node.restarts += 1
            self._spawn(node)
        if wait:
            self.wait_healthy([node_id], timeout=timeout)

    def __enter__(self) -> "LocalCluster":
        if not any(n.running for n in self.nodes.values()):
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- waiting ------------------------------------------------------------------------

    def wait_healthy(self, node_ids: Iterable[str] | None = None, timeout: float = 30.0, *,
                     ids: Iterable[str] | None = None) -> None:  # fmt: skip
        """Wait until `GET /healthz` answers 200 on each node (default: every node;
        `ids` is an alias of `node_ids`).

        Raises ClusterError at once when a node's process exits (quoting its log), and
        ClusterTimeout naming the nodes still unhealthy and their last answer.
        """
        if node_ids is None:
            node_ids = ids
        if isinstance(node_ids, str):
            node_ids = [node_ids]
        pending = {nid: self._node(nid) for nid in (node_ids if node_ids is not None else self.nodes)}
        last: dict[str, str] = {nid: "no answer yet" for nid in pending}
        deadline = time.monotonic() + timeout
        while pending:
            for nid, node in list(pending.items()):
                if not node.running:
                    raise ClusterError(
                        f"node {nid} is not running (exit code "
                        f"{node.process.returncode if node.process else None}); log tail:\n{self.log_tail(nid)}"
                    )
                if node.paused:
                    last[nid] = "paused"
                    continue
                status, body = _http_get(node.client_url + "/healthz", PROBE_TIMEOUT_SECONDS)
                if status == 200:
                    del pending[nid]
                else:
                    last[nid] = f"{status} {body[:200]}" if status else body
            if not pending:
                return
            if time.monotonic() >= deadline:
                detail = "; ".join(f"{nid}: {last[nid]}" for nid in pending)
                raise ClusterTimeout(f"nodes not healthy after {timeout:.0f}s: {detail}")
            time.sleep(POLL_INTERVAL_SECONDS)

    def status(self, node_id: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> dict | None:
        """`GET /v1/cluster` from one node, or None when it does not answer 200."""
        status, body = _http_get(self._node(node_id).client_url + "/v1/cluster", timeout)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def leader(self, timeout: float = 10.0) -> str:
        """The id of the node that leads now (cp), as `GET /v1/cluster` says.

        Every running, unpaused node is asked. The candidate named by most of them (then
        the one with the highest term) wins, and only if it also names itself: a follower
        may still name a leader that was just killed, and a deposed leader may still
        believe in itself for a while.
        """
        deadline = time.monotonic() + timeout
        seen = "no node answered"
        while True:
            votes: dict[str, int] = {}
            terms: dict[str, int] = {}
            reports: dict[str, dict] = {}
            for node in self.nodes.values():
                if not node.serving:
                    continue
                report = self.status(node.id)
                if report is None:
                    continue
                reports[node.id] = report
                named = report.get("leader")
                seen = f"{node.id} says leader={named!r}"
                if named:
                    votes[named] = votes.get(named, 0) + 1
                    term = report.get("term")
                    if isinstance(term, int):
                        terms[named] = max(terms.get(named, -1), term)
            for candidate in sorted(votes, key=lambda c: (-votes[c], -terms.get(c, -1), c)):
                node = self.nodes.get(candidate)
                if node is None or not node.serving:
                    continue
                own = reports.get(candidate) or self.status(candidate)
                if own is not None and own.get("leader") == candidate:
                    return candidate
            if time.monotonic() >= deadline:
                raise ClusterTimeout(f"no leader after {timeout:.0f}s ({seen})")
            time.sleep(POLL_INTERVAL_SECONDS)

    def _check(self) -> None:
        """Invariants of the handles: a paused node is running; ports and ids are unique."""
        for node in self.nodes.values():
            assert not node.paused or node.running, f"{node.id} is marked paused but not running"
            assert node.id in self.spec.node_ids
        urls = [n.client_url for n in self.nodes.values()]
        assert len(set(urls)) == len(urls)

    def log_tail(self, node_id: str, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of a node's log file ('' when logs are streamed instead)."""
        node = self._node(node_id)
        if node.log_path is None or not node.log_path.exists():
            return ""
        with open(node.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")

    # --- internals ----------------------------------------------------------------------

    def _node(self, node_id: str) -> NodeHandle:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ClusterError(f"no node {node_id!r}; this cluster has {', '.join(self.nodes)}") from None

    def command(self, node_id: str) -> list[str]:
        """The argv that starts `node_id` (for logs and for people reproducing a test)."""
        args = [
            self.python, "-m", "api.cli", "serve",
            "--mode", self.mode,
            "--cluster", str(self.cluster_file),
            "--node", node_id,
            "--data-dir", str(self.data_dir),
            "--engine", self.engine,
            "--sync", self.sync,
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self._secret_file is not None:
            args += ["--secret-file", str(self._secret_file)]
        return args + list(self.extra_args) + list(self.node_args.get(node_id, ()))

    def _spawn(self, node: NodeHandle) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        argv = self.command(node.id)
        if self.log_sink is not None:
            stdout = subprocess.PIPE
        else:
            node.log_path = self.log_dir / f"{node.id}.log"
            old = self._log_files.pop(node.id, None)
            if old is not None:
                old.close()
            stdout = open(node.log_path, "ab")
            stdout.write(f"--- capkv launcher: starting {node.id}: {' '.join(argv)}\n".encode())
            stdout.flush()
            self._log_files[node.id] = stdout
        node.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.data_dir),
            # Own process group: a Ctrl-C at the terminal reaches `capkv up`, which then
            # stops the nodes in order, instead of every child dying at once.
            start_new_session=True,
        )
        node.paused = False
        if self.log_sink is not None:
            thread = threading.Thread(
                target=_pump_lines, args=(node.id, node.process.stdout, self.log_sink), daemon=True,
                name=f"capkv-log-{node.id}",
            )
            thread.start()
            self._log_threads.append(thread)

    def _signal(self, node: NodeHandle, signum: int) -> None:
        try:
            node.process.send_signal(signum)
        except (ProcessLookupError, AttributeError):
            pass

    def _wait_exit(self, node: NodeHandle, deadline: float) -> None:
        try:
            node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._signal(node, signal.SIGKILL)
            node.process.wait()

    def _close_logs(self) -> None:
        for f in self._log_files.values():
            try:
                f.close()
            except OSError:
                pass
        self._log_files.clear()
        for thread in self._log_threads:
            thread.join(timeout=2.0)
        self._log_threads = [t for t in self._log_threads if t.is_alive()]


def _pump_lines(node_id: str, stream, sink: Callable[[str, str], None]) -> None:
    for raw in iter(stream.readline, b""):
        sink(node_id, raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def _http_get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; (0, reason) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(65536).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        return 0, f"{type(exc).__name__}: {exc}"


# Children must not outlive a test run that forgot to stop them.
_live_clusters: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for cluster in list(_live_clusters):
        try:
            cluster.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


__all__ = ["ClusterError", "ClusterTimeout", "LocalCluster", "NodeHandle", "MODES"]
