"""`/v1/kv`: get, range, put and delete, for both modes (API.md's kv rows).

One handler per method; each parses and validates everything first (nothing reaches the
service on bad input), then branches on the service's mode:

    cp  PUT /v1/kv/a?if_mod_revision=0   -> service.put(b"a", body, if_mod_revision=0)
                                          -> 200 {"key": "a", "revision": 7, "created": true}
    ap  PUT /v1/kv/a  X-Capkv-Context: C -> service.put(b"a", body, context="C")
                                          -> 200 {"key": "a", "context": "C2"}

Every service call is bounded by `timeout_ms` plus a grace period: if the service has not
answered by then, the HTTP layer answers 503 (reads: safe to retry) or 504 (writes: may
have been applied).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from aiohttp import web

from api.errors import invalid, json_response, error_response
from api.service import OutcomeUnknown, Unavailable, ValueTooLarge, prefix_end
from api.routes.common import (
    CONFIG_KEY,
    Params,
    key_from_path,
    limits_of,
    render_ap_read,
    render_kv,
    service_of,
    bytes_field,
)

KEY_ROUTE_PREFIX = "/v1/kv/"
CONTEXT_HEADER = "X-Capkv-Context"
COMMON = ("timeout_ms",)
CP_GET = COMMON + ("consistency", "revision", "raw")
CP_RANGE = COMMON + ("prefix", "limit", "start_after", "keys_only", "revision", "consistency")
CP_PUT = COMMON + ("lease", "if_mod_revision", "prev", "request_id")
CP_DELETE = COMMON + ("prefix", "if_mod_revision", "prev", "request_id")
AP_GET = COMMON + ("r", "raw")
AP_RANGE = COMMON + ("prefix", "limit")
AP_PUT = COMMON + ("w", "context", "request_id")
AP_DELETE = COMMON + ("w", "context", "request_id")
CONSISTENCIES = ("linearizable", "serializable")


async def bounded(call: Awaitable[Any], timeout: float, request: web.Request, *, write: bool) -> Any:
    """Await a service call for at most `timeout` + grace; then answer for the service."""
    limit = timeout + limits_of(request).timeout_grace_seconds
    try:
        # asyncio.timeout, not wait_for: wait_for wraps the call in a Task of its own,
        # which costs every request a task and a loop iteration.
        async with asyncio.timeout(limit):
            return await call
    except TimeoutError:
        if write:
            raise OutcomeUnknown(
                f"no answer within {timeout * 1000:.0f} ms; the write may or may not have been applied "
                "(retry with the same request_id to be safe)"
            ) from None
        raise Unavailable(f"no answer within {timeout * 1000:.0f} ms; retry") from None


async def read_value(request: web.Request) -> bytes:
    """The PUT body, refused with 413 as soon as it is known to exceed max_value_bytes:
    by Content-Length before reading a byte, or while reading (chunked bodies)."""
    limit = limits_of(request).max_value_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(length, limit)
    if length is not None:
        # The usual case: the size is known and within the limit, so take exactly that
        # many bytes in one call instead of chunk-by-chunk reads and copies.
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # the body ended early: what arrived, as the loop below gives
    body = bytearray()
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            break
        body += chunk
        if len(body) > limit:
            raise _too_large(None, limit)
    return bytes(body)


async def expect_value(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on a PUT: refuse a too-large value before the client sends
    it (curl asks this way for bodies over 1 MiB), instead of saying "continue" and then
    refusing. Otherwise behave as aiohttp's default handler does."""
    from api.errors import service_error_response
    from api.routes.meta import METRICS_KEY

    limit = limits_of(request).max_value_bytes
    if request.content_length is not None and request.content_length > limit:
        # This answer bypasses the middleware: count it here.
        request.app[METRICS_KEY].observe("/v1/kv/{key}", request.method, 413, 0.0)
        response = service_error_response(_too_large(request.content_length, limit))
        response.force_close()  # the unsent body must not be read as the next request
        return response
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers.get('Expect')}")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


def _too_large(size: int | None, limit: int) -> ValueTooLarge:
    what = f"{size} bytes" if size is not None else f"over {limit} bytes"
    return ValueTooLarge(
        f"the value is {what}; the limit is {limit} bytes (the cluster's --max-value-bytes); nothing was stored",
        max_value_bytes=limit,
    )


# --- handlers -----------------------------------------------------------------------------------


async def get_key(request: web.Request) -> web.StreamResponse:
    service = service_of(request)
    key = key_from_path(request, KEY_ROUTE_PREFIX)
    if service.mode == "ap":
        return await _ap_get(request, service, key)
    params = Params(request, CP_GET)
    consistency = params.choice("consistency", CONSISTENCIES, "linearizable")
    revision = params.integer("revision", minimum=1)
    raw = params.flag("raw")
    timeout = params.timeout()
    kv, store_revision = await bounded(
        service.get(key, consistency=consistency, revision=revision, timeout=timeout), timeout, request, write=False
    )
    if kv is None:
        return error_response(
            404, "key_not_found", f"no key {key.decode('utf-8', 'replace')!r}", revision=store_revision,
            **bytes_field("key", key),
        )
    if raw:
        headers = {
            "X-Capkv-Revision": str(store_revision),
            "X-Capkv-Create-Revision": str(kv.create_revision),
            "X-Capkv-Mod-Revision": str(kv.mod_revision),
            "X-Capkv-Version": str(kv.version),
        }
        if kv.lease:
            headers["X-Capkv-Lease"] = str(kv.lease)
        return web.Response(body=kv.value or b"", content_type="application/octet-stream", headers=headers)
    body = render_kv(kv)
    body["revision"] = store_revision
    return json_response(body)


async def _ap_get(request: web.Request, service, key: bytes) -> web.StreamResponse:
    params = Params(request, AP_GET)
    r = params.integer("r", minimum=1, maximum=_replicas(request))
    raw = params.flag("raw")
    timeout = params.timeout()
    read = await bounded(service.get(key, r=r, timeout=timeout), timeout, request, write=False)
    headers = {CONTEXT_HEADER: read.context}
    if not read.siblings:
        return error_response(
            404, "key_not_found", f"no key {key.decode('utf-8', 'replace')!r}", headers=headers,
            context=read.context, **bytes_field("key", key),
        )
    if raw and len(read.siblings) == 1:
        return web.Response(body=read.siblings[0], content_type="application/octet-stream", headers=headers)
    # Several siblings cannot be one raw body: 300 Multiple Choices with the JSON, as Riak does.
    status = 300 if raw else 200
    headers["X-Capkv-Siblings"] = str(len(read.siblings))
    return json_response(render_ap_read(read), status=status, headers=headers)


async def range_keys(request: web.Request) -> web.StreamResponse:
    service = service_of(request)
    limits = limits_of(request)
    if service.mode == "ap":
        params = Params(request, AP_RANGE)
        prefix = params.key_text("prefix", allow_empty=True) or b""
        limit = params.integer("limit", minimum=1, maximum=limits.max_range_limit, default=limits.max_range_limit)
        timeout = params.timeout()
        reads, partial = await bounded(service.range(prefix, limit=limit + 1, timeout=timeout), timeout, request, write=False)
        more = len(reads) > limit
        return json_response({"items": [render_ap_read(r) for r in reads[:limit]], "partial": bool(partial), "more": more})

    params = Params(request, CP_RANGE)
    prefix = params.key_text("prefix", allow_empty=True) or b""
    start_after = params.key_text("start_after", allow_empty=False)
    limit = params.integer("limit", minimum=1, maximum=limits.max_range_limit, default=limits.max_range_limit)
    keys_only = params.flag("keys_only")
    revision = params.integer("revision", minimum=1)
    consistency = params.choice("consistency", CONSISTENCIES, "linearizable")
    timeout = params.timeout()
    start = prefix
    if start_after is not None and start_after + b"\0" > start:
        start = start_after + b"\0"  # the smallest key after start_after
    end = prefix_end(prefix)
    result = await bounded(
        service.range(
            start, end, limit=limit, keys_only=keys_only, revision=revision, consistency=consistency, timeout=timeout
        ),
        timeout, request, write=False,
    )  # fmt: skip
    return json_response(
        {
            "revision": result.revision,
            "items": [render_kv(kv) for kv in result.items],
            "more": bool(result.more),
            "count": result.count,
        }
    )


async def put_key(request: web.Request) -> web.StreamResponse:
    service = service_of(request)
    key = key_from_path(request, KEY_ROUTE_PREFIX)
    if service.mode == "ap":
        params = Params(request, AP_PUT)
        w = params.integer("w", minimum=1, maximum=_replicas(request))
        context = _context(request, params)
        request_id = params.request_id()
        timeout = params.timeout()
        value = await read_value(request)
        new_context = await bounded(
            service.put(key, value, context=context, w=w, request_id=request_id, timeout=timeout),
            timeout, request, write=True,
        )  # fmt: skip
        return json_response({**bytes_field("key", key), "context": new_context}, headers={CONTEXT_HEADER: new_context})

    params = Params(request, CP_PUT)
    lease = params.integer("lease", minimum=0, default=0)
    if_mod_revision = params.integer("if_mod_revision", minimum=0)
    prev = params.flag("prev")
    request_id = params.request_id()
    timeout = params.timeout()
    value = await read_value(request)
    result = await bounded(
        service.put(
            key, value, lease=lease, if_mod_revision=if_mod_revision, prev=prev, request_id=request_id, timeout=timeout
        ),
        timeout, request, write=True,
    )  # fmt: skip
    body: dict[str, Any] = {**bytes_field("key", key), "revision": result.revision, "created": bool(result.created)}
    if prev:
        body["prev"] = render_kv(result.prev) if result.prev is not None else None
    return json_response(body)


async def delete_key(request: web.Request) -> web.StreamResponse:
    service = service_of(request)
    key = key_from_path(request, KEY_ROUTE_PREFIX)
    if service.mode == "ap":
        params = Params(request, AP_DELETE)
        w = params.integer("w", minimum=1, maximum=_replicas(request))
        context = _context(request, params)
        params.request_id()  # validated; the ap delete is idempotent by its context
        timeout = params.timeout()
        new_context = await bounded(service.delete(key, context=context, w=w, timeout=timeout), timeout, request, write=True)
        return json_response({**bytes_field("key", key), "context": new_context}, headers={CONTEXT_HEADER: new_context})

    params = Params(request, CP_DELETE)
    by_prefix = params.flag("prefix")
    if_mod_revision = params.integer("if_mod_revision", minimum=0)
    if by_prefix and if_mod_revision is not None:
        raise invalid("if_mod_revision", "if_mod_revision compares one key; it cannot be combined with prefix=true")
    prev = params.flag("prev")
    request_id = params.request_id()
    timeout = params.timeout()
    end = prefix_end(key) if by_prefix else None
    result = await bounded(
        service.delete(key, end, if_mod_revision=if_mod_revision, prev=prev, request_id=request_id, timeout=timeout),
        timeout, request, write=True,
    )  # fmt: skip
    body: dict[str, Any] = {"deleted": result.deleted, "revision": result.revision}
    if prev:
        body["prev"] = [render_kv(kv) for kv in result.prev]
    return json_response(body)


# --- helpers ------------------------------------------------------------------------------------


def _replicas(request: web.Request) -> int:
    return request.app[CONFIG_KEY].replicas


def _context(request: web.Request, params: Params) -> str | None:
    max_chars = limits_of(request).max_context_chars
    header = request.headers.get(CONTEXT_HEADER)
    query = params.string("context", max_chars=max_chars)
    if header is not None and len(header) > max_chars:
        raise invalid("context", f"the context is over {max_chars} characters; send back the one a read returned")
    if header is not None and query is not None and header != query:
        raise invalid("context", f"the {CONTEXT_HEADER} header and the context parameter differ; give one")
    context = header if header is not None else query
    return context or None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/kv", range_keys)
    app.router.add_get("/v1/kv/{key:.*}", get_key)
    app.router.add_put("/v1/kv/{key:.*}", put_key, expect_handler=expect_value)
    app.router.add_delete("/v1/kv/{key:.*}", delete_key)
