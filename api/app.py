"""The aiohttp application: API.md's routes over one CPService or APService.

    service = consensus.service.create_service(config)     # or dynamo.service...
    app = make_app(service, config)
    web.run_app(app, host="127.0.0.1", port=2379)

The factory keeps all state in the app (typed `AppKey`s, see `api.routes.common`), starts
the service when the app starts and stops it when the app stops (`cleanup_ctx`), and puts
one middleware in front of every route that

- turns every error into API.md's JSON error (`{"error": {"code", "message", ...}}`):
  a service's `ServiceError` with its status, aiohttp's own 404/405/413 too, and anything
  unexpected into a logged 500 `internal`;
- counts every request by route template, method and status, and times it, for /metrics.

The request body is bounded twice: `client_max_size` for anything read whole, and the PUT
handler refuses a value over `max_value_bytes` by its Content-Length before reading it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import AsyncIterator

from aiohttp import web

from api.errors import error_response, service_error_response
from api.routes import cluster, cp_only, etcd_v3, kv, meta, watch
from api.routes.common import CONFIG_KEY, LIMITS_KEY, SERVICE_KEY, VERSION_KEY, ApiLimits
from api.routes.meta import METRICS_KEY, HttpMetrics, capkv_version
from api.service import NodeConfig, ServiceError

log = logging.getLogger("capkv.api")

# Route modules in registration order; each has add_routes(app).
ROUTE_MODULES = (meta, kv, cluster, cp_only, watch, etcd_v3)


def make_app(service, config: NodeConfig, *, limits: ApiLimits | None = None, version: str | None = None,
             tune_gc: bool = False) -> web.Application:  # fmt: skip
    """Build the HTTP app for `service` (its `mode` picks the cp or ap behaviour).

    With `tune_gc` (`capkv serve`: one node per process) the process's garbage collector is
    tuned once the service has started (`tune_gc_for_serving`); an app embedded in another
    program (tests, tools) leaves the collector to that program."""
    if getattr(service, "mode", None) not in ("cp", "ap"):
        raise ValueError(f"service.mode must be 'cp' or 'ap', not {getattr(service, 'mode', None)!r}")
    limits = limits or ApiLimits.from_config(config)
    app = web.Application(
        middlewares=[_capkv_middleware],
        client_max_size=max(limits.max_value_bytes, limits.max_json_body_bytes) + 1024,
    )
    app[SERVICE_KEY] = service
    app[CONFIG_KEY] = config
    app[LIMITS_KEY] = limits
    app[VERSION_KEY] = version or capkv_version()
    app[METRICS_KEY] = HttpMetrics()
    app[TUNE_GC_KEY] = tune_gc
    app.cleanup_ctx.append(_service_lifecycle)
    for module in ROUTE_MODULES:
        module.add_routes(app)
    return app


def server_kwargs(limits: ApiLimits) -> dict:
    """Keyword arguments for aiohttp's `AppRunner` (and test servers) that fit API.md's
    limits: a 4096-byte key percent-encodes to 12 KiB of request line, and a prefix or
    start_after parameter as much again; a causal context travels in a header.

        runner = web.AppRunner(app, **server_kwargs(limits))
    """
    encoded_key = 3 * limits.max_key_bytes
    return {
        "max_line_size": 3 * encoded_key + 4096,
        "max_field_size": max(8190, limits.max_context_chars + 1024),
    }


TUNE_GC_KEY = web.AppKey("tune_gc", bool)

# Young-generation threshold for a serving node (CPython's default is 700): see below.
SERVING_GC_YOUNG_THRESHOLD = 50_000
_gc_tuned = False


def tune_gc_for_serving() -> bool:
    """Tune this process's collector for serving; once per process (True if it did now).

    Measured on a cp node under 64 writers (issue #3's tail): with CPython's defaults
    each node ran ~4 young collections a second and, every ~30 s, a full one over the
    ~58 000 objects alive since start-up that stopped the process (both threads hold the
    GIL) for ~100 ms under load, the longest single stall we saw. So: `gc.freeze()` the
    objects that exist once the service is up (modules, routes, config: never garbage),
    which full collections then skip, and let the young generation grow to
    `SERVING_GC_YOUNG_THRESHOLD` (the hot path allocates few objects that outlive a request,
    ~3 per write, so that is a collection every ~15 000 writes) with the older generations
    at CPython's ratio of 10. Cyclic garbage is still collected, only in fewer, larger
    passes; memory grows by at most that many young objects in between.
    """
    global _gc_tuned
    if _gc_tuned:
        return False
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(SERVING_GC_YOUNG_THRESHOLD, max(middle, 10), max(old, 10))
    return True


async def _service_lifecycle(app: web.Application) -> AsyncIterator[None]:
    service = app[SERVICE_KEY]
    await service.start()
    if app[TUNE_GC_KEY]:
        tune_gc_for_serving()
    try:
        yield
    finally:
        await service.stop()


def route_label(request: web.Request) -> str:
    """The route template a request matched (a bounded label), or 'unmatched'."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    if resource is None:
        return "unmatched"
    canonical = resource.canonical
    # "{key:.*}" -> "{key}": the regex is noise in a metric label.
    return canonical.replace(":.*}", "}")


@web.middleware
async def _capkv_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ServiceError as exc:
        response = service_error_response(exc)
        status = response.status
        return response
    except web.HTTPException as exc:
        response = _http_exception_response(request, exc)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        response = error_response(500, "internal", "the server failed on this request; the error is in its log")
        status = 500
        return response
    finally:
        request.app[METRICS_KEY].observe(route_label(request), request.method, status, time.perf_counter() - started)


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:  # redirects and the like pass through unchanged
        raise exc
    if etcd_v3.is_gateway_path(request.path) and exc.status in (404, 405):
        # etcd's gateway answers these in plain text (037-unknown-path.txt, 036-range-get-method.txt,
        # 017-put-v3alpha-path.txt); clients of the gateway expect that, not capkv's JSON.
        text = "Method Not Allowed\n" if exc.status == 405 else (
            "404 page not found\n" if request.path.startswith("/v3alpha/") else "Not Found\n")
        return web.Response(status=exc.status, text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(m for m in exc.allowed_methods if m != "HEAD")
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)}, allowed=allowed,
        )  # fmt: skip
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, "not_found", f"no such endpoint: {request.method} {request.path} (see /v1/openapi.json)")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[LIMITS_KEY].max_value_bytes
        return error_response(413, "value_too_large", f"the request body is too large; values are at most {limit} bytes",
                              max_value_bytes=limit)  # fmt: skip
    return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)


__all__ = ["make_app", "server_kwargs", "tune_gc_for_serving", "route_label", "ApiLimits", "SERVICE_KEY", "CONFIG_KEY", "LIMITS_KEY", "VERSION_KEY", "METRICS_KEY"]
