"""Concurrent recording clients for real-process tests: load a cp cluster, keep a history.

Each client is a thread with its own HTTP connections. It picks a random key of a few and
a random node for every operation, sends it with a short server-side `timeout_ms`, and
records the operation (invocation, completion, outcome) in a shared `HistoryRecorder`:

    recorder = HistoryRecorder()
    workload = Workload(cluster.urls, recorder, WorkloadConfig(clients=5, duration=20))
    workload.start()
    ... kill, pause, restart nodes ...
    workload.join()
    verdict = linearizability.check(recorder.history())

How an HTTP answer becomes an outcome (API.md, cp section):

| answer | read | write / cas / delete |
|---|---|---|
| 200 | ok, the value | ok |
| 404 | ok, absent | (delete: ok, nothing deleted) |
| 412 | - | cas: ok, compare failed (`result.succeeded = false`) |
| 503, connection refused | fail | fail: definitely not applied |
| 504, client timeout, connection lost mid-request, 5xx | unknown | unknown: may apply later |

Every write writes a value no other write writes (`c<client>-<n>`), so a read names the
write it saw. A cas is "read the key, then `PUT ?if_mod_revision=<its mod_revision>`":
both are recorded, the cas with `expected` = the value read.

Bounds: `duration` seconds, `max_ops_per_client` operations per client; every request
waits at most `timeout_ms` on the server and `timeout_ms + client_slack_ms` on the socket.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import random
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from typing import Any, Callable, Sequence

from clusters.checkers.history import HistoryFull, HistoryRecorder


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    clients: int = 5
    keys: tuple[str, ...] = ("k0", "k1", "k2")
    # Prepended to every key, so that runs against one cluster do not see each other.
    key_prefix: str = "history/"
    duration: float = 20.0
    # The server gives up after this long (504/503); short, so faults show as outcomes.
    timeout_ms: int = 1000
    # The socket gives up this much later than the server should have answered.
    client_slack_ms: int = 1000
    # Operation mix (relative weights).
    read_weight: float = 0.45
    write_weight: float = 0.25
    cas_weight: float = 0.25
    delete_weight: float = 0.05
    max_ops_per_client: int = 50_000
    # A pause between operations of one client, so 2 cores are not all client.
    think_ms: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients < 1 or not self.keys or self.duration <= 0 or self.timeout_ms < 1:
            raise ValueError("a workload needs a client, a key, a duration and a timeout")


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any] | None


class RequestFailed(Exception):
    """The request certainly never reached a server (the connection was refused)."""


class RequestLost(Exception):
    """The request may have reached a server; no answer came back in time."""


class NodeClient:
    """Keep-alive HTTP to capkv nodes, one connection per node, for one thread at a time.

    `request` returns a `Response` for any HTTP answer; raises `RequestFailed` when the
    connection could not be opened (nothing sent) and `RequestLost` when it broke or timed
    out after sending (the server may act on it).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._connections: dict[str, http.client.HTTPConnection] = {}

    def request(self, base_url: str, method: str, path: str, body: bytes | None = None, timeout: float | None = None,
                _fresh_retry: bool = True) -> Response:
        """One request. A kept-alive connection that the server closed (it restarted, or
        idled us out) fails on first use; that is retried once on a new connection, so
        callers must only send idempotent requests (reads, or writes with a request_id)."""
        connection = self._connections.get(base_url)
        wait = self.timeout if timeout is None else timeout
        if connection is None:
            parts = urllib.parse.urlsplit(base_url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=wait)
            self._connections[base_url] = connection
        connection.timeout = wait
        reused = connection.sock is not None
        if not reused:
            try:
                connection.connect()
            except OSError as error:
                self._drop(base_url)
                raise RequestFailed(f"{base_url}: {error}") from None
        connection.sock.settimeout(wait)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
            answer = connection.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as error:
            self._drop(base_url)
            stale = isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
            if reused and stale and _fresh_retry:
                try:
                    return self.request(base_url, method, path, body, timeout, _fresh_retry=False)
                except RequestFailed as again:
                    # The first attempt may still have reached the old process.
                    raise RequestLost(f"{method} {base_url}{path}: {error}; then {again}") from None
            raise RequestLost(f"{method} {base_url}{path}: {type(error).__name__}: {error}") from None
        if answer.getheader("Connection", "").lower() == "close":
            self._drop(base_url)
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = {"raw": data[:200].decode("utf-8", "replace")}
        return Response(answer.status, parsed if isinstance(parsed, dict) else {"raw": parsed})

    def _drop(self, base_url: str) -> None:
        connection = self._connections.pop(base_url, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for url in list(self._connections):
            self._drop(url)

    # Conveniences for tests (no history).

    def get(self, base_url: str, key: str, **params: Any) -> Response:
        return self.request(base_url, "GET", kv_path(key, **params))

    def put(self, base_url: str, key: str, value: str | bytes, **params: Any) -> Response:
        body = value.encode() if isinstance(value, str) else value
        return self.request(base_url, "PUT", kv_path(key, **params), body)

    def delete(self, base_url: str, key: str, **params: Any) -> Response:
        return self.request(base_url, "DELETE", kv_path(key, **params))

    def cluster(self, base_url: str) -> Response:
        return self.request(base_url, "GET", "/v1/cluster")


def kv_path(key: str, **params: Any) -> str:
    path = "/v1/kv/" + urllib.parse.quote(key, safe="")
    params = {name: value for name, value in params.items() if value is not None}
    return path + ("?" + urllib.parse.urlencode(params) if params else "")


def value_of(body: dict[str, Any] | None) -> str | None:
    """The value of a GET answer as text (values here are ASCII; base64 is decoded)."""
    if not body:
        return None
    if "value" in body:
        return body["value"]
    if "value_base64" in body:
        import base64

        return base64.b64decode(body["value_base64"]).decode("utf-8", "replace")
    return None


class Workload:
    """`config.clients` threads of random reads, writes, cas and deletes. See the module docstring.

    `urls` is the list of node client URLs (or a callable returning it, read before each
    operation, for tests that change the cluster). `counts` tallies (op, outcome) and
    `statuses` the HTTP statuses and errors seen, for assertions and reports.
    """

    # Requests a client may have outstanding per step of its loop (a cas reads, then writes
    # only when the read answered), for the bound on `join()`.
    requests_per_step = 1

    def __init__(
        self,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        recorder: HistoryRecorder,
        config: WorkloadConfig = WorkloadConfig(),
    ):
        self.urls = urls if callable(urls) else (lambda fixed=tuple(urls): fixed)
        self.recorder = recorder
        self.config = config
        self.counts: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[str] = Counter()
        self.unexpected: list[str] = []  # answers the API does not allow (a 500, a bad body)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> "Workload":
        self._deadline = time.monotonic() + self.config.duration
        for number in range(self.config.clients):
            thread = threading.Thread(target=self._client, args=(number,), name=f"workload-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the clients to finish (after `duration`, or `stop()`); bounded by the
        duration plus one request's worst case unless `timeout` says otherwise."""
        limit = timeout
        if limit is None:
            request_s = (self.config.timeout_ms + self.config.client_slack_ms) / 1000
            limit = max(0.0, self._deadline - time.monotonic()) + self.requests_per_step * request_s + 5
        end = time.monotonic() + limit
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"workload clients still running: {alive}")

    def run(self) -> None:
        self.start()
        self.join()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def summary(self) -> str:
        with self._lock:
            ops = ", ".join(f"{op} {outcome}: {n}" for (op, outcome), n in sorted(self.counts.items()))
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{ops}\nanswers: {statuses}"

    # --- one client ---------------------------------------------------------------------

    def _client(self, number: int) -> None:
        config = self.config
        rng = random.Random(f"{config.seed}-{number}")
        client = NodeClient(timeout=(config.timeout_ms + config.client_slack_ms) / 1000)
        weights = [config.read_weight, config.write_weight, config.cas_weight, config.delete_weight]
        try:
            for sequence in range(config.max_ops_per_client):
                if self._stop.is_set() or time.monotonic() >= self._deadline:
                    return
                key = config.key_prefix + rng.choice(config.keys)
                kind = rng.choices(["read", "write", "cas", "delete"], weights)[0]
                value = f"c{number}-{sequence}"
                if kind == "read":
                    self._read(client, rng, number, key)
                elif kind == "write":
                    self._write(client, rng, number, key, value)
                elif kind == "cas":
                    seen = self._read(client, rng, number, key)
                    if seen is not None and isinstance(seen[1], int):
                        current, mod_revision = seen
                        self._cas(client, rng, number, key, value, current, mod_revision)
                else:
                    self._delete(client, rng, number, key)
                if config.think_ms:
                    time.sleep(config.think_ms / 1000)
        except HistoryFull:
            return
        except Exception as error:  # a bug here must not pass for a quiet client
            self._unexpected(f"client {number} crashed: {traceback.format_exc()}")
            raise error
        finally:
            client.close()

    def _send(self, client: NodeClient, rng: random.Random, method: str, path: str, body: bytes | None = None):
        url = rng.choice(list(self.urls()))
        try:
            return url, client.request(url, method, path, body), None
        except RequestFailed as error:
            return url, None, ("refused", str(error))
        except RequestLost as error:
            return url, None, ("lost", str(error))

    def _finish(self, pending, kind: str, outcome: str, url: str, status: str, value: str | None = None, **result: Any) -> None:
        result = {name: v for name, v in result.items() if v is not None}
        result["node"] = url
        result["status"] = status
        self.recorder.complete(pending, outcome, value=value, result=result)
        with self._lock:
            self.counts[(kind, outcome)] += 1
            self.statuses[status] += 1

    def _unexpected(self, what: str) -> None:
        with self._lock:
            if len(self.unexpected) < 100:
                self.unexpected.append(what)

    def _read(self, client: NodeClient, rng: random.Random, number: int, key: str) -> tuple[str | None, int] | None:
        """A linearizable GET; returns (value, mod_revision) when it answered."""
        pending = self.recorder.invoke(number, "read", key)
        url, response, error = self._send(client, rng, "GET", kv_path(key, timeout_ms=self.config.timeout_ms))
        if error:
            self._finish(pending, "read", "fail" if error[0] == "refused" else "unknown", url, error[0], error=error[1])
            return None
        body = response.body or {}
        if response.status == 200:
            value = value_of(body)
            self._finish(pending, "read", "ok", url, "200", value=value,
                         mod_revision=body.get("mod_revision"), revision=body.get("revision"))
            if value is None:
                self._unexpected(f"GET {key} at {url}: 200 without a value: {body}")
                return None
            return value, body.get("mod_revision")
        if response.status == 404:
            self._finish(pending, "read", "ok", url, "404", value=None, revision=_revision_of_error(body))
            return None, 0
        outcome = "fail" if response.status == 503 else "unknown"
        if response.status not in (503, 504):
            self._unexpected(f"GET {key} at {url}: {response.status} {body}")
        self._finish(pending, "read", outcome, url, str(response.status), error=_code(body))
        return None

    def _write(self, client: NodeClient, rng: random.Random, number: int, key: str, value: str) -> None:
        pending = self.recorder.invoke(number, "write", key, value=value)
        path = kv_path(key, timeout_ms=self.config.timeout_ms, request_id=uuid.uuid4().hex)
        url, response, error = self._send(client, rng, "PUT", path, value.encode())
        self._finish_write(pending, "write", key, url, response, error)

    def _cas(self, client: NodeClient, rng: random.Random, number: int, key: str, value: str,
             expected: str | None, mod_revision: int) -> None:
        pending = self.recorder.invoke(number, "cas", key, value=value, expected=expected)
        path = kv_path(key, timeout_ms=self.config.timeout_ms, request_id=uuid.uuid4().hex, if_mod_revision=mod_revision)
        url, response, error = self._send(client, rng, "PUT", path, value.encode())
        if response is not None and response.status == 412:
            body = response.body or {}
            details = body.get("error") or {}
            self._finish(pending, "cas", "ok", url, "412", succeeded=False,
                         mod_revision=details.get("mod_revision"), revision=_revision_of_error(body))
            return
        self._finish_write(pending, "cas", key, url, response, error)

    def _delete(self, client: NodeClient, rng: random.Random, number: int, key: str) -> None:
        pending = self.recorder.invoke(number, "delete", key)
        path = kv_path(key, timeout_ms=self.config.timeout_ms, request_id=uuid.uuid4().hex)
        url, response, error = self._send(client, rng, "DELETE", path)
        if response is not None and response.status == 200:
            body = response.body or {}
            deleted = body.get("deleted")
            self._finish(pending, "delete", "ok", url, "200",
                         deleted=deleted if isinstance(deleted, int) else None, revision=body.get("revision"))
            return
        if response is not None and response.status == 404:
            self._finish(pending, "delete", "ok", url, "404", deleted=0)
            return
        self._finish_write(pending, "delete", key, url, response, error)

    def _finish_write(self, pending, kind: str, key: str, url: str, response: Response | None, error) -> None:
        if error:
            self._finish(pending, kind, "fail" if error[0] == "refused" else "unknown", url, error[0], error=error[1])
            return
        body = response.body or {}
        if response.status == 200:
            self._finish(pending, kind, "ok", url, "200", revision=body.get("revision"))
            return
        if response.status == 503:
            self._finish(pending, kind, "fail", url, "503", error=_code(body))
            return
        if response.status != 504:
            self._unexpected(f"{kind} {key} at {url}: {response.status} {body}")
        self._finish(pending, kind, "unknown", url, str(response.status), error=_code(body))


def _code(body: dict[str, Any]) -> str | None:
    error = body.get("error") if body else None
    return error.get("code") if isinstance(error, dict) else None


def _revision_of_error(body: dict[str, Any]) -> int | None:
    error = body.get("error") if body else None
    revision = error.get("revision") if isinstance(error, dict) else None
    return revision if isinstance(revision, int) else None


# --- waiting for a cp cluster ------------------------------------------------------------------


def wait_for_write(cluster, timeout: float = 15.0, nodes: Sequence[str] | None = None, key: str = "probe/write") -> tuple[str, float]:
    """Write through each node of `nodes` (default: all serving) in turn until one answers
    200; returns (node id, seconds waited). `TimeoutError` with the last answers otherwise."""
    client = NodeClient(timeout=2.0)
    started = time.monotonic()
    last: dict[str, str] = {}
    try:
        while time.monotonic() - started < timeout:
            candidates = nodes if nodes is not None else [n for n, handle in cluster.nodes.items() if handle.serving]
            for node_id in candidates:
                try:
                    response = client.put(cluster.url(node_id), key, f"probe-{time.monotonic()}", timeout_ms=500)
                except (RequestFailed, RequestLost) as error:
                    last[node_id] = str(error)
                    continue
                if response.status == 200:
                    return node_id, time.monotonic() - started
                last[node_id] = f"{response.status} {response.body}"
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"no write succeeded within {timeout}s: {last}")
