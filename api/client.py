"""Python clients for capkv's HTTP API: `Client` (blocking, http.client) and `AsyncClient`
(asyncio, aiohttp). Both take several endpoints and fail over between them.

    client = Client(["http://127.0.0.1:2379", "http://127.0.0.1:22379", "http://127.0.0.1:32379"])
    client.put("config/db", b"postgres://...")          # cp: {"key", "revision", "created"}
    entry = client.get("config/db")                      # Entry(value=b"...", mod_revision=2, ...)
    client.put("config/db", b"new", if_mod_revision=entry.mod_revision)   # compare-and-swap
    # ap mode:
    found = client.get_ap("cart")                        # APEntry(siblings=[...], context="...")
    client.put("cart", merge(found.siblings), context=found.context)

When to try another endpoint (`retry_decision`, pure):

- connection refused, or 503 `unavailable`: the request was definitely not applied, so
  any request moves on to the next endpoint;
- a timeout, a dropped connection after the request went out, or 504 `outcome_unknown`:
  a read moves on; a write moves on only with a `request_id`, which makes the retry apply
  at most once. Every write gets a fresh request_id unless the caller gives one (or
  passes `request_id=False`), so retries are safe by default; without one the client
  raises `OutcomeUnknown` and lets the caller decide.

cp extras: `txn`, `lease_grant|keepalive|info|revoke`, `leases`, `compact`, and `watch`,
a generator of events that reconnects to the next endpoint from the last revision seen
+ 1 when its stream drops (a node killed, a leader changed), so nothing is missed:

    for event in client.watch(prefix="config/", start_revision=1):
        ...

Attempts are bounded (`max_attempts`, default two rounds over the endpoints) with a short
backoff between rounds. Errors are typed after API.md's codes (`KeyNotFound`,
`PreconditionFailed`, ...); each carries `status`, `code`, `message` and `details`.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import threading
import time
import urllib.parse
import uuid
from typing import Any, Iterable, Mapping

DEFAULT_TIMEOUT = 5.0  # seconds; sent as timeout_ms on kv requests
# Between rounds over all endpoints: 50 ms, 100 ms, ... capped, so a cluster electing a
# leader gets a moment and a dead cluster fails fast.
BACKOFF_BASE_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 1.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


# --- errors ---------------------------------------------------------------------------------------


class CapkvError(Exception):
    """An error answer from capkv (or no answer at all: status 0)."""

    status = 0
    code = "error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 endpoint: str | None = None, **details: Any):  # fmt: skip
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.endpoint = endpoint
        self.details = details

    def __str__(self) -> str:
        where = f" from {self.endpoint}" if self.endpoint else ""
        return f"{self.code} ({self.status}){where}: {self.message}"


class InvalidRequest(CapkvError):
    status, code = 400, "invalid_request"


class NotFound(CapkvError):
    status, code = 404, "not_found"


class KeyNotFound(NotFound):
    code = "key_not_found"


class MethodNotAllowed(CapkvError):
    status, code = 405, "method_not_allowed"


class Compacted(CapkvError):
    status, code = 410, "compacted"


class PreconditionFailed(CapkvError):
    status, code = 412, "precondition_failed"


class ValueTooLarge(CapkvError):
    status, code = 413, "value_too_large"


class NotSupportedInMode(CapkvError):
    status, code = 501, "not_supported_in_mode"


class NotImplementedYet(CapkvError):
    status, code = 501, "not_implemented"


class ServerError(CapkvError):
    status, code = 500, "internal"


class Unavailable(CapkvError):
    """503, or no endpoint could be reached: definitely not applied; safe to retry."""

    status, code = 503, "unavailable"


class ConnectionFailed(Unavailable):
    """No endpoint accepted a connection (status 0)."""

    status, code = 0, "connection_failed"


class OutcomeUnknown(CapkvError):
    """504, or the connection dropped after a write went out: it may have been applied."""

    status, code = 504, "outcome_unknown"


_BY_CODE = {cls.code: cls for cls in (KeyNotFound, Compacted, PreconditionFailed, ValueTooLarge, NotSupportedInMode,
                                      NotImplementedYet, Unavailable, OutcomeUnknown, MethodNotAllowed)}  # fmt: skip
_BY_STATUS = {400: InvalidRequest, 404: NotFound, 405: MethodNotAllowed, 410: Compacted, 412: PreconditionFailed,
              413: ValueTooLarge, 501: NotSupportedInMode, 503: Unavailable, 504: OutcomeUnknown}  # fmt: skip


def error_from_response(status: int, payload: Any, endpoint: str | None = None) -> CapkvError:
    """The typed exception for an error answer (API.md's `{"error": {...}}`)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {"code": f"http_{status}", "message": f"HTTP {status}"}
    code = str(error.get("code", f"http_{status}"))
    message = str(error.get("message", f"HTTP {status}"))
    details = {k: v for k, v in error.items() if k not in ("code", "message", "status", "endpoint")}
    cls = _BY_CODE.get(code) or (InvalidRequest if code.startswith("invalid_") else None) or _BY_STATUS.get(status)
    cls = cls or (ServerError if status >= 500 else CapkvError)
    return cls(message, status=status, code=code, endpoint=endpoint, **details)


# --- results --------------------------------------------------------------------------------------


def decode_value(item: Mapping[str, Any], name: str = "value") -> bytes | None:
    """API.md's value rule, reversed: `value` (text) or `value_base64`."""
    if name in item and item[name] is not None:
        return str(item[name]).encode("utf-8")
    if f"{name}_base64" in item:
        return base64.b64decode(item[f"{name}_base64"])
    return None


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cp key as read: value bytes and etcd-style revisions."""

    key: bytes
    value: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0
    revision: int = 0  # the store revision the read saw

    @classmethod
    def from_json(cls, item: Mapping[str, Any], revision: int = 0) -> "Entry":
        return cls(
            key=decode_value(item, "key") or b"",
            value=decode_value(item),
            create_revision=int(item.get("create_revision", 0)),
            mod_revision=int(item.get("mod_revision", 0)),
            version=int(item.get("version", 0)),
            lease=int(item.get("lease", 0) or 0),
            revision=int(item.get("revision", revision) or 0),
        )


@dataclasses.dataclass(frozen=True)
class APEntry:
    """An ap key as read: its siblings (empty when absent) and the context covering them."""

    key: bytes
    siblings: list[bytes]
    context: str

    @property
    def value(self) -> bytes | None:
        """The value when there is exactly one sibling, else None."""
        return self.siblings[0] if len(self.siblings) == 1 else None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> "APEntry":
        return cls(
            key=decode_value(item, "key") or b"",
            siblings=[decode_value(s) or b"" for s in item.get("siblings", [])],
            context=str(item.get("context", "")),
        )


# --- the shared, pure part ------------------------------------------------------------------------


# What happened to one attempt, as `retry_decision` sees it.
REFUSED = "refused"  # no connection: nothing was sent
LOST = "lost"  # sent, then timeout or reset: no answer
ANSWERED = "answered"


def retry_decision(outcome: str, status: int, *, write: bool, has_request_id: bool) -> bool:
    """True when the request may go to the next endpoint.

        >>> retry_decision(REFUSED, 0, write=True, has_request_id=False)
        True
        >>> retry_decision(LOST, 0, write=True, has_request_id=False)
        False
        >>> retry_decision(ANSWERED, 504, write=True, has_request_id=True)
        True
        >>> retry_decision(ANSWERED, 412, write=True, has_request_id=True)
        False
    """
    if outcome == REFUSED:
        return True
    if outcome == LOST:
        return not write or has_request_id
    if status == 503:
        return True
    if status == 504:
        return not write or has_request_id
    return False


def key_path(key: str | bytes, route: str = "/v1/kv/") -> str:
    """`/v1/kv/<key>` with every byte that is not unreserved percent-encoded (so `/`,
    `.` segments and spaces arrive exactly as given)."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return route + urllib.parse.quote(raw, safe="")


def _query_string(query: Mapping[str, Any] | None) -> str:
    if not query:
        return ""
    items = []
    for name, value in query.items():
        if value is None or value is False:
            continue
        items.append((name, "true" if value is True else str(value)))
    return ("?" + urllib.parse.urlencode(items, quote_via=urllib.parse.quote)) if items else ""


class _Plan:
    """One logical request across endpoints: which to try next, when to give up."""

    def __init__(self, endpoints: list[str], start: int, max_attempts: int):
        self.endpoints = endpoints
        self.start = start
        self.max_attempts = max_attempts
        self.attempt = 0

    def next(self) -> tuple[str, float] | None:
        """(endpoint, seconds to wait first) or None when attempts are used up."""
        if self.attempt >= self.max_attempts:
            return None
        n = len(self.endpoints)
        index = (self.start + self.attempt) % n
        delay = 0.0
        if self.attempt and self.attempt % n == 0:
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (self.attempt // n - 1))
        self.attempt += 1
        return self.endpoints[index], delay


class _Base:
    def __init__(self, endpoints: str | Iterable[str], *, timeout: float = DEFAULT_TIMEOUT, max_attempts: int | None = None):
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = [e.strip().rstrip("/") for e in endpoints if e and e.strip()]
        if not self.endpoints:
            raise ValueError("give at least one endpoint, like http://127.0.0.1:2379")
        for e in self.endpoints:
            parts = urllib.parse.urlsplit(e)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"endpoint {e!r} must be http://host:port")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        # The socket waits a little longer than the server's own bound (timeout_ms plus
        # its grace), so a slow answer arrives as the server's 503/504, not as a lost reply.
        self.socket_timeout = timeout + 2.0
        self.max_attempts = max_attempts if max_attempts is not None else max(3, 2 * len(self.endpoints))
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._preferred = 0  # the endpoint that answered last: start there next time

    key_path = staticmethod(key_path)

    def _prepare(self, method: str, query: Mapping[str, Any] | None, write: bool, request_id) -> tuple[dict, bool]:
        query = dict(query or {})
        if write and request_id is not False and method in ("PUT", "DELETE", "POST"):
            query.setdefault("request_id", request_id or uuid.uuid4().hex)
        return query, "request_id" in query

    def _remember(self, endpoint: str) -> None:
        self._preferred = self.endpoints.index(endpoint)

    # Builders shared by both clients: (method, path, query, body, headers, write)
    def _timeout_ms(self, timeout_ms: int | None) -> int:
        return timeout_ms if timeout_ms is not None else int(self.timeout * 1000)

    def _get_args(self, key, consistency, revision, r, timeout_ms):
        return {"consistency": consistency, "revision": revision, "r": r, "timeout_ms": self._timeout_ms(timeout_ms)}

    def _put_args(self, lease, if_mod_revision, prev, context, w, timeout_ms):
        query = {"lease": lease or None, "if_mod_revision": if_mod_revision, "prev": prev or None, "w": w,
                 "timeout_ms": self._timeout_ms(timeout_ms)}  # fmt: skip
        headers = {"X-Capkv-Context": context} if context else None
        return query, headers


JSON_HEADERS = {"Content-Type": "application/json"}
# A watch stream shows a progress event at least every 10 s; silence for longer than
# this means the connection is dead, and the watch reconnects.
WATCH_IDLE_TIMEOUT_SECONDS = 25.0
MAX_WATCH_LINE_BYTES = 8 * 1024 * 1024


class _WatchLost(Exception):
    """The watch stream ended without the server canceling it: reconnect."""


class WatchPlan:
    """Where a watch resumes: the revision after the last event it delivered (pure).

        >>> plan = WatchPlan("k", None, 5, False, None)
        >>> plan.saw({"type": "put", "mod_revision": 7}); plan.start_revision
        8
        >>> plan.target()
        '/v1/watch/k?start_revision=8'
    """

    def __init__(self, key, prefix, start_revision: int | None, prev: bool, progress_ms: int | None):
        if (key is None) == (prefix is None):
            raise ValueError("watch a key or a prefix: give exactly one of key and prefix")
        self.key = key
        self.prefix = prefix
        self.start_revision = start_revision
        self.prev = prev
        self.progress_ms = progress_ms

    def saw(self, event: Mapping[str, Any]) -> None:
        if event.get("type") in ("put", "delete"):
            self.start_revision = int(event["mod_revision"]) + 1
        elif event.get("type") == "progress" and self.start_revision is None:
            # Nothing seen yet: resume after what the store had when we were told.
            self.start_revision = int(event["revision"]) + 1

    def target(self) -> str:
        query: dict[str, Any] = {"start_revision": self.start_revision, "prev": self.prev or None,
                                 "progress_ms": self.progress_ms}  # fmt: skip
        if self.prefix is not None:
            prefix = self.prefix.decode("utf-8") if isinstance(self.prefix, bytes) else self.prefix
            items = [("prefix", prefix)] + [(k, "true" if v is True else str(v)) for k, v in query.items() if v is not None]
            return "/v1/watch?" + urllib.parse.urlencode(items, quote_via=urllib.parse.quote)
        return key_path(self.key, "/v1/watch/") + _query_string(query)


def _check_canceled(event: Mapping[str, Any], endpoint: str) -> None:
    """A canceled watch: compacted history is final; anything else (node stopping, too
    slow) is worth resuming elsewhere from the last revision seen + 1."""
    if event.get("type") != "canceled":
        return
    if event.get("compact_revision"):
        raise Compacted(f"the watch needs history that was compacted ({event.get('reason', '')})", endpoint=endpoint,
                        compact_revision=event["compact_revision"])  # fmt: skip
    raise _WatchLost(f"the server canceled the watch: {event.get('reason', '')}")


def _txn_request(compare, success, failure, timeout_ms: int) -> tuple[bytes, dict]:
    body = {"compare": list(compare or []), "success": list(success or []), "failure": list(failure or [])}
    return json.dumps(body).encode(), {"timeout_ms": timeout_ms}


def _lease_body(ttl: int, lease_id: int | None) -> bytes:
    body: dict[str, Any] = {"ttl": int(ttl)}
    if lease_id:
        body["id"] = int(lease_id)
    return json.dumps(body).encode()



# --- sync client ----------------------------------------------------------------------------------


class Client(_Base):
    """Blocking client over http.client; safe to share between threads (each thread
    keeps its own connection per endpoint alive)."""

    def __init__(self, endpoints, *, timeout: float = DEFAULT_TIMEOUT, max_attempts: int | None = None):
        super().__init__(endpoints, timeout=timeout, max_attempts=max_attempts)
        self._local = threading.local()

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, write: bool = False, request_id: str | bool | None = None,
                allow_statuses: tuple[int, ...] = ()) -> Any:  # fmt: skip
        """Send one request with failover; the decoded JSON (or bytes for non-JSON) of a
        2xx answer or one in `allow_statuses`, else the typed error."""
        status, payload, _ = self.request_full(method, path, query=query, body=body, headers=headers, write=write,
                                                request_id=request_id, allow_statuses=allow_statuses)  # fmt: skip
        return payload

    def request_full(self, method, path, *, query=None, body=None, headers=None, write=False, request_id=None,
                     allow_statuses=()) -> tuple[int, Any, dict]:  # fmt: skip
        query, has_id = self._prepare(method, query, write, request_id)
        target = path + _query_string(query)
        plan = _Plan(self.endpoints, self._preferred, self.max_attempts)
        last_error: CapkvError | None = None
        while (step := plan.next()) is not None:
            endpoint, delay = step
            if delay:
                time.sleep(delay)
            outcome, status, payload, response_headers = self._attempt(
                endpoint, method, target, body, headers, retry_safe=not write or has_id
            )
            if outcome == ANSWERED and (200 <= status < 300 or status in allow_statuses):
                self._remember(endpoint)
                return status, payload, response_headers
            last_error = _error_for(outcome, status, payload, endpoint, write)
            if not retry_decision(outcome, status, write=write, has_request_id=has_id):
                raise last_error
        assert last_error is not None
        raise last_error

    def _attempt(self, endpoint: str, method: str, target: str, body: bytes | None, headers, *,
                 retry_safe: bool = True) -> tuple[str, int, Any, dict]:  # fmt: skip
        """One request to one endpoint, on this thread's kept-alive connection when there
        is one. A kept-alive connection the server has since closed fails as soon as it
        is used; the request is then sent once more on a fresh connection, but only when
        that is safe (`retry_safe`: a read, or a write with a request_id). A write without
        one never rides a reused connection, so its failure always means what it says."""
        pool = self._pool()
        conn = pool.pop(endpoint, None) if retry_safe else None
        reused = conn is not None
        if conn is None:
            parts = urllib.parse.urlsplit(endpoint)
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.socket_timeout)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                return REFUSED, 0, str(exc), {}
        try:
            conn.request(method, target, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
            if reused and stale:
                return self._attempt(endpoint, method, target, body, headers, retry_safe=False)
            return LOST, 0, f"{type(exc).__name__}: {exc}", {}
        response_headers = {k.lower(): v for k, v in response.getheaders()}
        if retry_safe and not response.will_close and response.isclosed():
            pool[endpoint] = conn  # fully read: the connection can carry the next request
        else:
            conn.close()
        return ANSWERED, response.status, _decode(data, response_headers.get("content-type", "")), response_headers

    def _pool(self) -> dict[str, http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def close(self) -> None:
        """Close this thread's kept-alive connections (others close when collected)."""
        pool = self._pool()
        while pool:
            pool.popitem()[1].close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- kv, cp ---

    def get(self, key: str | bytes, *, consistency: str | None = None, revision: int | None = None,
            timeout_ms: int | None = None) -> Entry | None:  # fmt: skip
        """A cp key, or None when absent."""
        try:
            payload = self.request("GET", key_path(key), query=self._get_args(key, consistency, revision, None, timeout_ms))
        except KeyNotFound:
            return None
        return Entry.from_json(payload)

    def range(self, prefix: str | bytes = "", *, limit: int | None = None, start_after: str | None = None,
              keys_only: bool = False, revision: int | None = None, consistency: str | None = None) -> dict:  # fmt: skip
        """One page: {"revision", "items": [Entry], "more", "count"} (cp) or {"items": [APEntry], "partial", "more"} (ap)."""
        prefix_text = prefix.decode("utf-8") if isinstance(prefix, bytes) else prefix
        payload = self.request("GET", "/v1/kv", query={"prefix": prefix_text, "limit": limit, "start_after": start_after,
                                                       "keys_only": keys_only or None, "revision": revision,
                                                       "consistency": consistency,
                                                       "timeout_ms": self._timeout_ms(None)})  # fmt: skip
        return _range_result(payload)

    def put(self, key: str | bytes, value: bytes | str, *, lease: int | None = None, if_mod_revision: int | None = None,
            prev: bool = False, context: str | None = None, w: int | None = None, request_id: str | bool | None = None,
            timeout_ms: int | None = None) -> dict:  # fmt: skip
        """Write a key (both modes); the JSON answer: cp {key, revision, created, prev?}, ap {key, context}."""
        query, headers = self._put_args(lease, if_mod_revision, prev, context, w, timeout_ms)
        body = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return self.request("PUT", key_path(key), query=query, body=body, headers=headers, write=True, request_id=request_id)

    def delete(self, key: str | bytes, *, prefix: bool = False, if_mod_revision: int | None = None, prev: bool = False,
               context: str | None = None, w: int | None = None, request_id: str | bool | None = None,
               timeout_ms: int | None = None) -> dict:  # fmt: skip
        query, headers = self._put_args(None, if_mod_revision, prev, context, w, timeout_ms)
        if prefix:
            query["prefix"] = True
        return self.request("DELETE", key_path(key), query=query, headers=headers, write=True, request_id=request_id)

    # --- kv, ap ---

    def get_ap(self, key: str | bytes, *, r: int | None = None, timeout_ms: int | None = None) -> APEntry:
        """An ap key: siblings (empty when absent or deleted) and the context to write back."""
        try:
            payload = self.request("GET", key_path(key), query={"r": r, "timeout_ms": self._timeout_ms(timeout_ms)})
        except KeyNotFound as exc:
            return APEntry(key=key.encode() if isinstance(key, str) else key, siblings=[], context=str(exc.details.get("context", "")))
        return APEntry.from_json(payload)

    # --- cluster ---

    def cluster(self) -> dict:
        return self.request("GET", "/v1/cluster")

    def preflist(self, key: str | bytes) -> dict:
        return self.request("GET", key_path(key, "/v1/cluster/preflist/"))

    def add_member(self, member_id: str, client_url: str, peer_address: str) -> dict:
        body = json.dumps({"id": member_id, "client_url": client_url, "peer_address": peer_address}).encode()
        return self.request("POST", "/v1/cluster/members", body=body, headers={"Content-Type": "application/json"})

    def remove_member(self, member_id: str) -> dict:
        return self.request("DELETE", "/v1/cluster/members/" + urllib.parse.quote(member_id, safe=""))

    # --- cp: transactions, leases, compaction (CPExtras) ---

    def txn(self, compare: list | None = None, success: list | None = None, failure: list | None = None, *,
            request_id: str | bool | None = None, timeout_ms: int | None = None) -> dict:  # fmt: skip
        """An atomic txn (POST /v1/txn, the JSON of API.md): {succeeded, revision, responses}.

            client.txn([{"key": "lock", "target": "version", "op": "==", "value": 0}],
                       [{"op": "put", "key": "lock", "value": "me"}])
        """
        body, query = _txn_request(compare, success, failure, self._timeout_ms(timeout_ms))
        return self.request("POST", "/v1/txn", query=query, body=body, headers=JSON_HEADERS, write=True,
                            request_id=request_id)  # fmt: skip

    def lease_grant(self, ttl: int, *, lease_id: int | None = None) -> dict:
        """{id, ttl}. A grant is not idempotent: it is not retried once sent."""
        return self.request("POST", "/v1/leases", body=_lease_body(ttl, lease_id), headers=JSON_HEADERS,
                            write=True, request_id=False)  # fmt: skip

    def lease_keepalive(self, lease_id: int) -> dict:
        """{id, ttl, granted_ttl}; NotFound (lease_not_found) once the lease is gone."""
        return self.request("POST", f"/v1/leases/{int(lease_id)}/keepalive", write=True, request_id=False)

    def lease_info(self, lease_id: int) -> dict:
        """{id, ttl, granted_ttl, keys}; NotFound (lease_not_found) when it does not exist."""
        return self.request("GET", f"/v1/leases/{int(lease_id)}")

    def lease_revoke(self, lease_id: int) -> dict:
        return self.request("DELETE", f"/v1/leases/{int(lease_id)}", write=True, request_id=False)

    def leases(self) -> list[dict]:
        return self.request("GET", "/v1/leases")["leases"]

    def compact(self, revision: int) -> dict:
        body = json.dumps({"revision": int(revision)}).encode()
        return self.request("POST", "/v1/compact", body=body, headers=JSON_HEADERS, write=True, request_id=False)

    # --- cp: watch ---

    def watch(self, key: str | bytes | None = None, *, prefix: str | bytes | None = None, start_revision: int | None = None,
              prev: bool = False, progress_ms: int | None = None, reconnect: bool = True,
              idle_timeout: float = WATCH_IDLE_TIMEOUT_SECONDS):  # fmt: skip
        """Events as they come (dicts as API.md shows them, progress events included), from
        `start_revision` if given. When the connection drops (a node dies, a leader
        changes) or the server cancels the watch (node stopping, this watcher too slow),
        it reconnects to the next endpoint from the last revision seen + 1, so nothing is
        missed or repeated; `reconnect=False` raises `Unavailable` instead. Raises
        `Compacted` when the history it needs is gone. Close the generator to stop.

            for event in client.watch(prefix="config/", start_revision=1):
                print(event["type"], event.get("key"))
        """
        plan = WatchPlan(key, prefix, start_revision, prev, progress_ms)
        failures = 0
        index = self._preferred
        while True:
            endpoint = self.endpoints[index % len(self.endpoints)]
            try:
                for event in self._watch_once(endpoint, plan.target(), idle_timeout):
                    _check_canceled(event, endpoint)
                    failures = 0
                    plan.saw(event)
                    yield event
            except (OSError, http.client.HTTPException, _WatchLost) as exc:
                if not reconnect:
                    raise Unavailable(f"the watch on {endpoint} ended: {exc}", status=0, endpoint=endpoint) from None
                failures += 1
                if failures > self.max_attempts:
                    raise Unavailable(f"no endpoint keeps a watch open ({exc})", status=0, endpoint=endpoint) from None
                index += 1
                if failures % len(self.endpoints) == 0:
                    time.sleep(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (failures // len(self.endpoints))))

    def _watch_once(self, endpoint: str, target: str, idle_timeout: float):
        parts = urllib.parse.urlsplit(endpoint)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.socket_timeout)
        try:
            conn.request("GET", target, headers={"Accept": "application/x-ndjson"})
            response = conn.getresponse()
            if response.status != 200:
                data = response.read(MAX_RESPONSE_BYTES)
                error = error_from_response(response.status, _decode(data, response.getheader("content-type", "")), endpoint)
                if response.status == 503:
                    raise _WatchLost(str(error))
                raise error
            conn.sock.settimeout(idle_timeout)
            while True:
                line = response.readline(MAX_WATCH_LINE_BYTES)
                if not line:
                    raise _WatchLost("the server closed the stream")
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    def health(self, endpoint: str | None = None) -> bool:
        """True when `endpoint` (default: any) answers /healthz with 200."""
        endpoints = [endpoint] if endpoint else self.endpoints
        for e in endpoints:
            outcome, status, _, _ = self._attempt(e.rstrip("/"), "GET", "/healthz", None, None)
            if outcome == ANSWERED and status == 200:
                return True
        return False


# --- async client ---------------------------------------------------------------------------------


class AsyncClient(_Base):
    """asyncio client over aiohttp. Use as `async with AsyncClient(endpoints) as c:` (or
    call `close()`)."""

    def __init__(self, endpoints, *, timeout: float = DEFAULT_TIMEOUT, max_attempts: int | None = None):
        super().__init__(endpoints, timeout=timeout, max_attempts=max_attempts)
        self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.socket_timeout))
        return self._session

    async def request(self, method, path, *, query=None, body=None, headers=None, write=False, request_id=None,
                      allow_statuses=()) -> Any:  # fmt: skip
        status, payload, _ = await self.request_full(method, path, query=query, body=body, headers=headers, write=write,
                                                      request_id=request_id, allow_statuses=allow_statuses)  # fmt: skip
        return payload

    async def request_full(self, method, path, *, query=None, body=None, headers=None, write=False, request_id=None,
                           allow_statuses=()) -> tuple[int, Any, dict]:  # fmt: skip
        query, has_id = self._prepare(method, query, write, request_id)
        target = path + _query_string(query)
        plan = _Plan(self.endpoints, self._preferred, self.max_attempts)
        last_error: CapkvError | None = None
        while (step := plan.next()) is not None:
            endpoint, delay = step
            if delay:
                await asyncio.sleep(delay)
            outcome, status, payload, response_headers = await self._attempt(endpoint, method, target, body, headers)
            if outcome == ANSWERED and (200 <= status < 300 or status in allow_statuses):
                self._remember(endpoint)
                return status, payload, response_headers
            last_error = _error_for(outcome, status, payload, endpoint, write)
            if not retry_decision(outcome, status, write=write, has_request_id=has_id):
                raise last_error
        assert last_error is not None
        raise last_error

    async def _attempt(self, endpoint, method, target, body, headers) -> tuple[str, int, Any, dict]:
        import aiohttp
        from yarl import URL

        session = self._get_session()
        url = URL(endpoint + target, encoded=True)
        try:
            async with session.request(method, url, data=body, headers=dict(headers or {})) as response:
                data = await response.content.read(MAX_RESPONSE_BYTES)
                response_headers = {k.lower(): v for k, v in response.headers.items()}
                return ANSWERED, response.status, _decode(data, response_headers.get("content-type", "")), response_headers
        except aiohttp.ClientConnectorError as exc:
            return REFUSED, 0, str(exc), {}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return LOST, 0, f"{type(exc).__name__}: {exc}", {}

    async def get(self, key, *, consistency=None, revision=None, timeout_ms=None) -> Entry | None:
        try:
            payload = await self.request("GET", key_path(key), query=self._get_args(key, consistency, revision, None, timeout_ms))
        except KeyNotFound:
            return None
        return Entry.from_json(payload)

    async def range(self, prefix="", *, limit=None, start_after=None, keys_only=False, revision=None, consistency=None) -> dict:
        prefix_text = prefix.decode("utf-8") if isinstance(prefix, bytes) else prefix
        payload = await self.request("GET", "/v1/kv", query={"prefix": prefix_text, "limit": limit, "start_after": start_after,
                                                             "keys_only": keys_only or None, "revision": revision,
                                                             "consistency": consistency,
                                                       "timeout_ms": self._timeout_ms(None)})  # fmt: skip
        return _range_result(payload)

    async def put(self, key, value, *, lease=None, if_mod_revision=None, prev=False, context=None, w=None,
                  request_id=None, timeout_ms=None) -> dict:  # fmt: skip
        query, headers = self._put_args(lease, if_mod_revision, prev, context, w, timeout_ms)
        body = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return await self.request("PUT", key_path(key), query=query, body=body, headers=headers, write=True,
                                  request_id=request_id)  # fmt: skip

    async def delete(self, key, *, prefix=False, if_mod_revision=None, prev=False, context=None, w=None,
                     request_id=None, timeout_ms=None) -> dict:  # fmt: skip
        query, headers = self._put_args(None, if_mod_revision, prev, context, w, timeout_ms)
        if prefix:
            query["prefix"] = True
        return await self.request("DELETE", key_path(key), query=query, headers=headers, write=True, request_id=request_id)

    async def get_ap(self, key, *, r=None, timeout_ms=None) -> APEntry:
        try:
            payload = await self.request("GET", key_path(key), query={"r": r, "timeout_ms": self._timeout_ms(timeout_ms)})
        except KeyNotFound as exc:
            return APEntry(key=key.encode() if isinstance(key, str) else key, siblings=[], context=str(exc.details.get("context", "")))
        return APEntry.from_json(payload)

    async def cluster(self) -> dict:
        return await self.request("GET", "/v1/cluster")

    async def preflist(self, key) -> dict:
        return await self.request("GET", key_path(key, "/v1/cluster/preflist/"))

    async def add_member(self, member_id: str, client_url: str, peer_address: str) -> dict:
        body = json.dumps({"id": member_id, "client_url": client_url, "peer_address": peer_address}).encode()
        return await self.request("POST", "/v1/cluster/members", body=body, headers={"Content-Type": "application/json"})

    async def remove_member(self, member_id: str) -> dict:
        return await self.request("DELETE", "/v1/cluster/members/" + urllib.parse.quote(member_id, safe=""))


    async def txn(self, compare=None, success=None, failure=None, *, request_id=None, timeout_ms=None) -> dict:
        body, query = _txn_request(compare, success, failure, self._timeout_ms(timeout_ms))
        return await self.request("POST", "/v1/txn", query=query, body=body, headers=JSON_HEADERS, write=True,
                                  request_id=request_id)  # fmt: skip

    async def lease_grant(self, ttl: int, *, lease_id: int | None = None) -> dict:
        return await self.request("POST", "/v1/leases", body=_lease_body(ttl, lease_id), headers=JSON_HEADERS,
                                  write=True, request_id=False)  # fmt: skip

    async def lease_keepalive(self, lease_id: int) -> dict:
        return await self.request("POST", f"/v1/leases/{int(lease_id)}/keepalive", write=True, request_id=False)

    async def lease_info(self, lease_id: int) -> dict:
        return await self.request("GET", f"/v1/leases/{int(lease_id)}")

    async def lease_revoke(self, lease_id: int) -> dict:
        return await self.request("DELETE", f"/v1/leases/{int(lease_id)}", write=True, request_id=False)

    async def leases(self) -> list[dict]:
        return (await self.request("GET", "/v1/leases"))["leases"]

    async def compact(self, revision: int) -> dict:
        body = json.dumps({"revision": int(revision)}).encode()
        return await self.request("POST", "/v1/compact", body=body, headers=JSON_HEADERS, write=True, request_id=False)

    async def watch(self, key=None, *, prefix=None, start_revision=None, prev=False, progress_ms=None, reconnect=True,
                    idle_timeout: float = WATCH_IDLE_TIMEOUT_SECONDS):  # fmt: skip
        """As `Client.watch`, an async generator: reconnects to the next endpoint from the
        last revision seen + 1 when a stream drops."""
        import aiohttp

        plan = WatchPlan(key, prefix, start_revision, prev, progress_ms)
        session = self._get_session()
        failures = 0
        index = self._preferred
        while True:
            endpoint = self.endpoints[index % len(self.endpoints)]
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.socket_timeout, sock_read=idle_timeout)
                async with session.get(endpoint + plan.target(), headers={"Accept": "application/x-ndjson"},
                                       timeout=timeout) as response:  # fmt: skip
                    if response.status != 200:
                        data = await response.content.read(MAX_RESPONSE_BYTES)
                        error = error_from_response(response.status, _decode(data, response.headers.get("content-type", "")),
                                                    endpoint)  # fmt: skip
                        if response.status != 503:
                            raise error
                        raise _WatchLost(str(error))
                    while True:
                        line = await response.content.readline()
                        if not line:
                            raise _WatchLost("the server closed the stream")
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        _check_canceled(event, endpoint)
                        failures = 0
                        plan.saw(event)
                        yield event
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, _WatchLost) as exc:
                if not reconnect:
                    raise Unavailable(f"the watch on {endpoint} ended: {exc}", status=0, endpoint=endpoint) from None
                failures += 1
                if failures > self.max_attempts:
                    raise Unavailable(f"no endpoint keeps a watch open ({exc})", status=0, endpoint=endpoint) from None
                index += 1
                if failures % len(self.endpoints) == 0:
                    await asyncio.sleep(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (failures // len(self.endpoints))))


# --- helpers ----------------------------------------------------------------------------------------


def _decode(data: bytes, content_type: str) -> Any:
    if "json" in content_type:
        try:
            return json.loads(data)
        except ValueError:
            return data
    return data


def _error_for(outcome: str, status: int, payload: Any, endpoint: str, write: bool) -> CapkvError:
    if outcome == REFUSED:
        return ConnectionFailed(f"cannot connect to {endpoint}: {payload}", endpoint=endpoint)
    if outcome == LOST:
        if write:
            return OutcomeUnknown(f"no answer from {endpoint} after the write was sent ({payload}); it may have been "
                                  "applied: retry with the same request_id", status=0, endpoint=endpoint)  # fmt: skip
        return Unavailable(f"no answer from {endpoint} ({payload})", status=0, endpoint=endpoint)
    return error_from_response(status, payload, endpoint)


def _range_result(payload: dict) -> dict:
    out = dict(payload)
    items = payload.get("items", [])
    if items and "siblings" in items[0]:
        out["items"] = [APEntry.from_json(i) for i in items]
    else:
        out["items"] = [Entry.from_json(i, payload.get("revision", 0)) for i in items]
    return out


__all__ = [
    "APEntry", "AsyncClient", "CapkvError", "Client", "Compacted", "ConnectionFailed", "Entry", "InvalidRequest",
    "KeyNotFound", "MethodNotAllowed", "NotFound", "NotImplementedYet", "NotSupportedInMode", "OutcomeUnknown",
    "PreconditionFailed", "ServerError", "Unavailable", "ValueTooLarge", "error_from_response", "key_path",
    "retry_decision", "WatchPlan",
]  # fmt: skip
