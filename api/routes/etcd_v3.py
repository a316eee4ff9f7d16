"""etcd 3.4's v3 JSON gateway over the cp service, so etcd's curl examples and gateway
clients (etcd3gw, Patroni's etcd3 store) work unchanged against any capkv node.

    POST /v3/kv/range        {"key": "Zm9v"}
      -> {"header": {"cluster_id": "...", "member_id": "...", "revision": "12", "raft_term": "2"},
          "kvs": [{"key": "Zm9v", "create_revision": "2", "mod_revision": "3", "version": "2",
                   "value": "YmFy"}], "count": "1"}

Served under `/v3/` and `/v3beta/` (etcd 3.4 answers both; `/v3alpha/` is a 404 there):
kv/range|put|deleterange|txn|compaction, lease/grant|revoke|keepalive|timetolive|leases
with etcd's `kv/lease/revoke|timetolive|leases` aliases, watch, cluster/member/list and
maintenance/status. Wire rules and error mapping live in `api/etcd_wire.py`.

What the service does not offer, the gateway does over its results: sort and
min/max revision filters on ranges; `ignore_value`/`ignore_lease` on put (a read, then a
compare-and-swap on the key's mod_revision, retried a bounded number of times).

Ids etcd shows (cluster_id, member_id, a member's ID, the leader) are stable 64-bit
hashes of the cluster's member ids and of each node id (`etcd_wire.node_number`).
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from api import etcd_wire as wire
from api.etcd_wire import EtcdError
from api.routes.common import CONFIG_KEY, limits_of, service_of
from api.routes.cp_only import read_at_most
from api.routes.kv import bounded
from api.routes.meta import ETCD_SERVER_VERSION
from api.routes.watch import Stream, WatchFeed, next_item
from api.service import Compacted, NotFound, PreconditionFailed, ServiceError

PREFIXES = ("/v3", "/v3beta")
JSON_HEADERS = {"Content-Type": "application/json", "Grpc-Metadata-Content-Type": "application/grpc"}
# A request body read whole (every gateway request is small JSON; values up to the
# node's max value size, base64-encoded).
def _max_body(request: web.Request) -> int:
    return limits_of(request).max_value_bytes * 4 // 3 + 64 * 1024


# Concatenated requests in one keepalive or watch body.
MAX_DOCUMENTS_PER_BODY = 64
# Watchers on one /v3/watch stream.
MAX_WATCHERS_PER_STREAM = 64
# Messages waiting between the stream's watchers and the response.
WATCH_QUEUE_MESSAGES = 64
# ignore_value / ignore_lease: compare-and-swap attempts before giving up under contention.
IGNORE_CAS_ATTEMPTS = 8
# How long a stream's cached raft term may be stale.
TERM_CACHE_SECONDS = 1.0
# etcd's progress_notify interval is 10 min by default; capkv watches report idleness
# every 10 s, and the gateway passes that on to watchers that asked for it.
PROGRESS_NOTIFY_SECONDS = 10.0


class Headers:
    """Builds response headers. The raft term comes from the service's status, cached
    for a second (a watch stream renders many); the store's current revision is read
    fresh whenever a header needs it."""

    def __init__(self, request: web.Request):
        self.service = service_of(request)
        config = request.app[CONFIG_KEY]
        self.cluster_id = wire.node_number("capkv-cluster:" + ",".join(sorted(m.id for m in config.members)))
        self.member_id = wire.node_number(self.service.node_id)
        self._status: dict | None = None
        self._at = 0.0

    async def status(self, fresh: bool = False) -> dict:
        now = time.monotonic()
        if fresh or self._status is None or now - self._at > TERM_CACHE_SECONDS:
            self._status = await self.service.status()
            self._at = now
        return self._status

    async def render(self, revision: int | None = None) -> dict:
        """A header; `revision` None takes the store's current revision, 0 leaves it out."""
        status = await self.status(fresh=revision is None)
        if revision is None:
            revision = int(status.get("revision") or 0)
        header = wire.Header(self.cluster_id, self.member_id, int(status.get("term") or 0))
        return header.render(revision)


def etcd_json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode("utf-8"), status=status, headers=JSON_HEADERS)


def etcd_error(error: EtcdError) -> web.Response:
    return etcd_json(error.body(), status=error.status)


def gateway(op: str = "") -> Callable:
    """Wrap a handler: cp mode only, etcd's error shape for everything that goes wrong."""

    def wrap(handler: Callable[[web.Request, Headers], Awaitable[web.StreamResponse]]):
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            service = service_of(request)
            try:
                if service.mode != "cp":
                    raise EtcdError(wire.UNIMPLEMENTED, f"the etcd v3 gateway is served in cp mode; this cluster runs in "
                                                        f"{service.mode} mode (start it with --mode cp)")  # fmt: skip
                return await handler(request, Headers(request))
            except EtcdError as exc:
                return etcd_error(exc)
            except ServiceError as exc:
                return etcd_error(wire.from_service_error(exc, op=op))

        return run

    return wrap


async def read_body(request: web.Request) -> bytes:
    limit = _max_body(request)
    if request.content_length is not None and request.content_length > limit:
        raise EtcdError(wire.INVALID_ARGUMENT, wire.ERR_REQUEST_TOO_LARGE)
    raw = await read_at_most(request, limit)
    if raw is None:
        raise EtcdError(wire.INVALID_ARGUMENT, wire.ERR_REQUEST_TOO_LARGE)
    return raw


async def read_object(request: web.Request) -> dict:
    return wire.parse_json_object(await read_body(request))


def require(service, name: str) -> Callable:
    method = getattr(service, name, None)
    if method is None:
        raise EtcdError(wire.UNIMPLEMENTED, f"etcdserver: {name} is not implemented yet by this node's cp service")
    return method


def _timeout(request: web.Request) -> float:
    return limits_of(request).default_timeout_ms / 1000


# --- kv -------------------------------------------------------------------------------------


@gateway()
async def kv_range(request: web.Request, headers: Headers) -> web.Response:
    r = wire.parse_range(await read_object(request))
    service, timeout = service_of(request), _timeout(request)
    result = await bounded(
        service.range(r.key, r.end, limit=r.service_limit, keys_only=r.keys_only, count_only=r.count_only and not r.filtered,
                      revision=r.revision or None, consistency="serializable" if r.serializable else "linearizable",
                      timeout=timeout),
        timeout, request, write=False,
    )  # fmt: skip
    return etcd_json(wire.render_range(await headers.render(result.revision), r, result))


@gateway()
async def kv_put(request: web.Request, headers: Headers) -> web.Response:
    p = wire.parse_put(await read_object(request))
    service, timeout = service_of(request), _timeout(request)
    if p.ignore_value or p.ignore_lease:
        result = await _put_keeping(service, p, timeout, request)
    else:
        result = await bounded(service.put(p.key, p.value, lease=p.lease, prev=p.prev_kv, timeout=timeout),
                               timeout, request, write=True)  # fmt: skip
    return etcd_json(wire.render_put(await headers.render(result.revision), result, p.prev_kv))


async def _put_keeping(service, p: wire.PutRequest, timeout: float, request: web.Request):
    """put with ignore_value/ignore_lease: keep the stored value/lease. The service has
    no such option, so read the key and write it back only if it did not change since
    (compare-and-swap on mod_revision), retrying a bounded number of times."""
    for _ in range(IGNORE_CAS_ATTEMPTS):
        current, _ = await bounded(service.get(p.key, timeout=timeout), timeout, request, write=False)
        if current is None:
            raise EtcdError(wire.INVALID_ARGUMENT, wire.ERR_KEY_NOT_FOUND)
        value = current.value if p.ignore_value else p.value
        lease = current.lease if p.ignore_lease else p.lease
        try:
            return await bounded(
                service.put(p.key, value or b"", lease=lease, if_mod_revision=current.mod_revision, prev=p.prev_kv,
                            timeout=timeout),
                timeout, request, write=True,
            )  # fmt: skip
        except PreconditionFailed:
            continue  # changed under us: read again
    raise EtcdError(wire.UNAVAILABLE, wire.ERR_TIMEOUT)


@gateway()
async def kv_deleterange(request: web.Request, headers: Headers) -> web.Response:
    d = wire.parse_delete(await read_object(request))
    service, timeout = service_of(request), _timeout(request)
    result = await bounded(service.delete(d.key, d.end, prev=d.prev_kv, timeout=timeout), timeout, request, write=True)
    return etcd_json(wire.render_delete(await headers.render(result.revision), result, d.prev_kv))


@gateway()
async def kv_txn(request: web.Request, headers: Headers) -> web.Response:
    t = wire.parse_txn(await read_object(request))
    service, timeout = service_of(request), _timeout(request)
    txn = require(service, "txn")
    result = await bounded(txn(list(t.compare), list(t.success), list(t.failure), timeout=timeout),
                           timeout, request, write=True)  # fmt: skip
    return etcd_json(wire.render_txn(await headers.render(result.revision), t, result))


@gateway()
async def kv_compaction(request: web.Request, headers: Headers) -> web.Response:
    body = await read_object(request)
    revision = wire.parse_int(body, "revision")
    wire.parse_bool(body, "physical")
    service, timeout = service_of(request), _timeout(request)
    compact = require(service, "compact")
    store_revision = await bounded(compact(revision, timeout=timeout), timeout, request, write=True)
    return etcd_json({"header": await headers.render(int(store_revision) if store_revision else None)})


# --- leases ------------------------------------------------------------------------------------


@gateway("lease_grant")
async def lease_grant(request: web.Request, headers: Headers) -> web.Response:
    body = await read_object(request)
    ttl = wire.parse_int(body, "TTL")
    lease_id = wire.parse_int(body, "ID", minimum=0)
    service, timeout = service_of(request), _timeout(request)
    grant = require(service, "lease_grant")
    info = await bounded(grant(ttl, lease_id=lease_id, timeout=timeout), timeout, request, write=True)
    return etcd_json({"header": await headers.render(), "ID": str(info.id), "TTL": str(info.ttl)})


@gateway()
async def lease_revoke(request: web.Request, headers: Headers) -> web.Response:
    lease_id = wire.parse_int(await read_object(request), "ID")
    service, timeout = service_of(request), _timeout(request)
    revoke = require(service, "lease_revoke")
    revision = await bounded(revoke(lease_id, timeout=timeout), timeout, request, write=True)
    return etcd_json({"header": await headers.render(int(revision) if revision else None)})


@gateway()
async def lease_timetolive(request: web.Request, headers: Headers) -> web.Response:
    body = await read_object(request)
    lease_id = wire.parse_int(body, "ID")
    keys = wire.parse_bool(body, "keys")
    service, timeout = service_of(request), _timeout(request)
    info_of = require(service, "lease_info")
    try:
        info = await bounded(info_of(lease_id, keys=keys, timeout=timeout), timeout, request, write=False)
        ttl, granted, lease_keys = info.ttl, info.granted_ttl, info.keys
    except NotFound:
        ttl, granted, lease_keys = -1, 0, []
    out: dict[str, Any] = {"header": await headers.render(), "ID": str(lease_id), "TTL": str(ttl)}
    if ttl >= 0 and granted:
        out["grantedTTL"] = str(granted)
    if keys and lease_keys and ttl >= 0:
        out["keys"] = [wire.b64(k) for k in lease_keys]
    return etcd_json(out)


@gateway()
async def lease_keepalive(request: web.Request, headers: Headers) -> web.StreamResponse:
    """One `{"result": ...}` per request in the body (etcd streams them, 083), each its
    own chunk. A lease that does not exist answers without TTL (etcd3gw reads -1)."""
    documents = wire.parse_json_documents(await read_body(request), max_documents=MAX_DOCUMENTS_PER_BODY)
    lease_ids = [wire.parse_int(d, "ID") for d in documents]
    service, timeout = service_of(request), _timeout(request)
    keepalive = require(service, "lease_keepalive")
    results = []
    for lease_id in lease_ids:
        try:
            info = await bounded(keepalive(lease_id, timeout=timeout), timeout, request, write=True)
            ttl = info.ttl
        except NotFound:
            ttl = 0
        results.append(wire.omit_defaults({"header": await headers.render(), "ID": str(lease_id), "TTL": str(ttl)}))
    response = web.StreamResponse(headers=JSON_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    for result in results:
        await response.write(json.dumps({"result": result}, separators=(",", ":")).encode() + b"\n")
    await response.write_eof()
    return response


@gateway()
async def lease_leases(request: web.Request, headers: Headers) -> web.Response:
    await read_object(request)
    service, timeout = service_of(request), _timeout(request)
    leases = await bounded(require(service, "leases")(timeout=timeout), timeout, request, write=False)
    body: dict[str, Any] = {"header": await headers.render()}
    if leases:
        body["leases"] = [{"ID": str(info.id)} for info in leases]
    return etcd_json(body)


# --- cluster and maintenance ------------------------------------------------------------------


@gateway()
async def member_list(request: web.Request, headers: Headers) -> web.Response:
    await read_object(request)
    status = await headers.status()
    members = []
    for member in status.get("members", []):
        members.append(wire.omit_defaults({
            "ID": str(wire.node_number(member["id"])),
            "name": member["id"],
            "peerURLs": ["http://" + member["peer_address"]] if member.get("peer_address") else [],
            "clientURLs": [member["client_url"]] if member.get("client_url") else [],
        }))  # fmt: skip
    return etcd_json({"header": await headers.render(0), "members": members})


@gateway()
async def maintenance_status(request: web.Request, headers: Headers) -> web.Response:
    await read_object(request)
    service = service_of(request)
    status = await headers.status()
    leader = status.get("leader")
    try:
        metrics = service.metrics()
    except Exception:  # noqa: BLE001 - status still answers
        metrics = {}
    db_size = next((int(metrics[name]) for name in ("engine_disk_bytes", "engine_bytes", "disk_bytes") if name in metrics), 0)
    if not db_size:
        db_size = await asyncio.to_thread(directory_bytes, request.app[CONFIG_KEY].data_dir)
    body = wire.omit_defaults({
        "header": await headers.render(),
        "version": ETCD_SERVER_VERSION,
        "dbSize": str(db_size),
        "leader": str(wire.node_number(leader)) if leader else "",
        "raftIndex": str(status.get("commit_index") or 0),
        "raftTerm": str(status.get("term") or 0),
        "raftAppliedIndex": str(status.get("applied_index") or 0),
        "errors": [] if leader else [wire.ERR_NO_LEADER],
        "dbSizeInUse": str(db_size),
    })  # fmt: skip
    return etcd_json(body)


# Files counted at most when sizing the data directory for maintenance/status.
MAX_SIZED_FILES = 10_000


def directory_bytes(path: str) -> int:
    """Bytes in the files under `path` (etcd's dbSize: what the node keeps on disk);
    0 when it does not exist. Bounded: stops after MAX_SIZED_FILES files."""
    total, seen, stack = 0, 0, [path]
    while stack and seen < MAX_SIZED_FILES:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    seen += 1
            except OSError:
                continue
    return total


# --- watch --------------------------------------------------------------------------------------


class _Watcher:
    def __init__(self, watch_id: int, feed: WatchFeed, filters: set[int], progress_notify: bool):
        self.watch_id = watch_id
        self.feed = feed
        self.filters = filters
        self.progress_notify = progress_notify
        self.last_sent = time.monotonic()


class WatchStream:
    """One `/v3/watch` stream: its watchers, each a service watch feeding one bounded
    queue, and the response they are written to one message (one HTTP chunk) at a time."""

    def __init__(self, request: web.Request, headers: Headers, response: web.StreamResponse):
        self.request = request
        self.headers = headers
        self.response = response
        self.service = service_of(request)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=WATCH_QUEUE_MESSAGES)
        self.watchers: dict[int, _Watcher] = {}
        self.next_id = 0

    async def send(self, result: dict) -> None:
        """One message, one chunk: etcd3gw parses each chunk as one JSON document."""
        await self.response.write(json.dumps({"result": result}, separators=(",", ":")).encode("utf-8") + b"\n")

    async def result(self, revision: int | None = None, watch_id: int = 0, **fields: Any) -> dict:
        body: dict[str, Any] = {"header": await self.headers.render(revision)}
        if watch_id:
            body["watch_id"] = str(watch_id)
        body.update(fields)
        return body

    async def handle(self, document: dict) -> None:
        if document.get("create_request") is not None:
            await self.create(document["create_request"])
        elif document.get("cancel_request") is not None:
            watch_id = wire.parse_int(document["cancel_request"], "watch_id")
            watcher = self.watchers.pop(watch_id, None)
            if watcher is not None:
                await watcher.feed.close()
                await self.send(await self.result(watch_id=watch_id, canceled=True))
        elif document.get("progress_request") is not None:
            await self.send(await self.result(watch_id=-1))

    async def create(self, create: dict) -> None:
        if not isinstance(create, dict):
            raise EtcdError(wire.INVALID_ARGUMENT, "create_request must be an object")
        key = wire.parse_bytes(create, "key")
        end = wire.parse_range_end(create, key)
        start_revision = wire.parse_int(create, "start_revision", minimum=0)
        watch_id = wire.parse_int(create, "watch_id", minimum=0)
        prev = wire.parse_bool(create, "prev_kv")
        progress_notify = wire.parse_bool(create, "progress_notify")
        filters = {wire.parse_enum({"f": f}, "f", wire.WATCH_FILTERS) for f in (create.get("filters") or [])}
        refuse = None
        if watch_id and watch_id in self.watchers:
            refuse = "mvcc: duplicate watch ID provided on the WatchStream"
        elif end is not None and end != b"\0" and end <= key:
            refuse = "mvcc: watcher range is empty"
        elif len(self.watchers) >= MAX_WATCHERS_PER_STREAM:
            refuse = f"capkv: at most {MAX_WATCHERS_PER_STREAM} watchers on one stream"
        if refuse is not None:
            await self.send(await self.result(watch_id=-1, created=True, canceled=True, cancel_reason=refuse))
            return
        if not watch_id:
            while self.next_id in self.watchers:
                self.next_id += 1
            watch_id = self.next_id
            self.next_id += 1
        created_revision = int((await self.headers.status(fresh=True)).get("revision") or 0)
        if not start_revision and created_revision:
            # Pinned: the watch sees every event after the revision its created message
            # shows, however late its iterator gets going (a client writes right after it).
            start_revision = created_revision + 1
        try:
            iterator = self.service.watch(key, end, start_revision=start_revision or None, prev=prev,
                                          progress_interval=PROGRESS_NOTIFY_SECONDS)  # fmt: skip
        except Compacted as exc:  # a service may refuse at once rather than in its first batch
            await self.send(await self.result(watch_id=watch_id, created=True))
            compact_revision = str(int(exc.details.get("compact_revision", 0) or 0))
            await self.send(await self.result(0, watch_id, canceled=True, compact_revision=compact_revision))
            return
        self.watchers[watch_id] = _Watcher(watch_id, WatchFeed(iterator, self.queue, watch_id), filters, progress_notify)
        await self.send(await self.result(created_revision or None, watch_id, created=True))

    async def deliver(self, watch_id: int, batch, error) -> None:
        watcher = self.watchers.get(watch_id)
        if watcher is None:
            return  # canceled meanwhile
        if error is not None or batch.canceled:
            self.watchers.pop(watch_id, None)
            compact_revision = 0
            reason = ""
            if isinstance(error, Compacted):
                compact_revision = int(error.details.get("compact_revision", 0) or 0)
            elif error is not None:
                reason = str(error)
            else:
                compact_revision, reason = batch.compact_revision, batch.reason
            if compact_revision:
                await self.send(await self.result(0, watch_id, canceled=True, compact_revision=str(compact_revision)))
            else:
                await self.send(await self.result(watch_id=watch_id, canceled=True, cancel_reason=reason or "canceled"))
            return
        events = [e for e in batch.events if not ((e.type == "put" and 0 in watcher.filters)
                                                   or (e.type == "delete" and 1 in watcher.filters))]  # fmt: skip
        if events:
            await self.send(await self.result(batch.revision, watch_id, events=[wire.render_event(e) for e in events]))
            watcher.last_sent = time.monotonic()
        elif not batch.events and watcher.progress_notify:
            if time.monotonic() - watcher.last_sent >= PROGRESS_NOTIFY_SECONDS * 0.9:
                await self.send(await self.result(batch.revision, watch_id))
                watcher.last_sent = time.monotonic()

    async def close(self) -> None:
        for watcher in list(self.watchers.values()):
            await watcher.feed.close()
        self.watchers.clear()


@gateway()
async def watch(request: web.Request, headers: Headers) -> web.StreamResponse:
    """`POST /v3/watch`: the whole body first (etcd 3.4 over HTTP/1.1 reads it whole too,
    200-...txt), then a stream of `{"result": ...}` messages until the client leaves."""
    try:
        documents = wire.parse_json_documents(await read_body(request), max_documents=MAX_DOCUMENTS_PER_BODY)
    except EtcdError as exc:
        raise EtcdError(wire.UNKNOWN, exc.message) from None  # etcd answers a bad watch body 500/code 2 (207)
    require(service_of(request), "watch")
    response = web.StreamResponse(headers=JSON_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    stream = WatchStream(request, headers, response)
    try:
        with Stream(request, stream.queue) as registered:
            for document in documents:
                await stream.handle(document)
            while True:
                item = await next_item(registered)
                if item is None:
                    break  # the client left, or this node is stopping
                await stream.deliver(*item)
    except (ConnectionError, EtcdError, ServiceError):
        pass  # the client left, or a request in the body was bad: the stream ends
    finally:
        await stream.close()
    return response


ROUTES: tuple[tuple[str, Callable], ...] = (
    ("/kv/range", kv_range),
    ("/kv/put", kv_put),
    ("/kv/deleterange", kv_deleterange),
    ("/kv/txn", kv_txn),
    ("/kv/compaction", kv_compaction),
    ("/lease/grant", lease_grant),
    ("/lease/revoke", lease_revoke),
    ("/kv/lease/revoke", lease_revoke),
    ("/lease/keepalive", lease_keepalive),
    ("/lease/timetolive", lease_timetolive),
    ("/kv/lease/timetolive", lease_timetolive),
    ("/lease/leases", lease_leases),
    ("/kv/lease/leases", lease_leases),
    ("/watch", watch),
    ("/cluster/member/list", member_list),
    ("/maintenance/status", maintenance_status),
)


async def health(request: web.Request) -> web.Response:
    """etcd's `GET /health` (001-health.txt): {"health": "true"} or 503 {"health": "false"}."""
    try:
        ok, _ = service_of(request).health()
    except Exception:  # noqa: BLE001 - a health probe reports, it does not crash
        ok = False
    return web.Response(text=json.dumps({"health": "true" if ok else "false"}, separators=(",", ":")),
                        status=200 if ok else 503, content_type="text/plain", charset="utf-8")  # fmt: skip


def gateway_paths() -> list[str]:
    return [prefix + path for prefix in PREFIXES for path, _ in ROUTES]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    for prefix in PREFIXES:
        for path, handler in ROUTES:
            app.router.add_post(prefix + path, handler)


def is_gateway_path(path: str) -> bool:
    """True for paths etcd's gateway would answer with its own 404/405 (text, not JSON)."""
    return path.startswith(("/v3/", "/v3beta/", "/v3alpha/"))


__all__ = ["add_routes", "gateway_paths", "is_gateway_path", "PREFIXES", "ROUTES"]
