"""`/healthz`, `/metrics`, `/version`, `/v1/openapi.json`, and the HTTP request metrics.

`/metrics` is Prometheus text: per route (the route template, so label values stay few),
method and status a request counter, per route and method a latency histogram, and the
service's own `metrics()` as `capkv_<name>` gauges:

    capkv_http_requests_total{route="/v1/kv/{key}",method="PUT",status="200"} 12
    capkv_http_request_duration_seconds_bucket{route="/v1/kv/{key}",method="PUT",le="0.005"} 9
    capkv_raft_term 3
"""
from __future__ import annotations

import bisect
import math
import re
from importlib import metadata

from aiohttp import web

from api.errors import error_response, json_response
from api.routes.common import VERSION_KEY, Params, service_of

# Seconds. Spans a sub-millisecond local read to a request that ran into its timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# What etcd clients read from /version to pick the gateway's paths (etcd3gw wants >= 3.4).
ETCD_SERVER_VERSION = "3.4.23"
ETCD_CLUSTER_VERSION = "3.4.0"
# Label sets are bounded by construction (route templates x methods x statuses); this is
# the backstop should a bug make them grow: further label sets are folded into one.
MAX_SERIES = 2000
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_:]")


def capkv_version() -> str:
    try:
        return metadata.version("capkv")
    except metadata.PackageNotFoundError:
        return "0.1.0+source"


class HttpMetrics:
    """Request counters and latency histograms. Plain data; the middleware feeds it.

        >>> m = HttpMetrics(); m.observe("/healthz", "GET", 200, 0.002)
        >>> 'capkv_http_requests_total{route="/healthz",method="GET",status="200"} 1' in m.render({})
        True
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # (route, method) -> [count per bucket (non-cumulative)..., +Inf count], sum
        self.latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        if key not in self.requests and len(self.requests) >= MAX_SERIES:
            key = ("other", "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        lkey = (route, method)
        if lkey not in self.latency and len(self.latency) >= MAX_SERIES:
            lkey = ("other", "other")
        series = self.latency.get(lkey)
        if series is None:
            series = self.latency[lkey] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        counts, total = series
        # The first bucket whose bound is >= seconds (le is inclusive); past the last, +Inf.
        # bisect_left finds it without a Python-level loop: this runs on every request.
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        counts[index] += 1
        total[0] += seconds

    def render(self, service_metrics: dict[str, float], labels: dict[str, str] | None = None) -> str:
        lines = []
        if labels:
            lines += ["# HELP capkv_info Which capkv build, mode and node this is.", "# TYPE capkv_info gauge",
                      f"capkv_info{{{_labels(labels)}}} 1"]  # fmt: skip
        lines += ["# HELP capkv_http_requests_total HTTP requests by route template, method and status.",
                  "# TYPE capkv_http_requests_total counter"]  # fmt: skip
        for (route, method, status), count in sorted(self.requests.items()):
            lines.append(f"capkv_http_requests_total{{{_labels({'route': route, 'method': method, 'status': str(status)})}}} {count}")
        lines += ["# HELP capkv_http_request_duration_seconds HTTP request latency by route template and method.",
                  "# TYPE capkv_http_request_duration_seconds histogram"]  # fmt: skip
        for (route, method), (counts, total) in sorted(self.latency.items()):
            base = _labels({"route": route, "method": method})
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS + (math.inf,), counts):
                cumulative += count
                le = "+Inf" if bound == math.inf else repr(bound)
                lines.append(f'capkv_http_request_duration_seconds_bucket{{{base},le="{le}"}} {cumulative}')
            lines.append(f"capkv_http_request_duration_seconds_sum{{{base}}} {total[0]!r}")
            lines.append(f"capkv_http_request_duration_seconds_count{{{base}}} {cumulative}")
        for name, value in sorted(service_metrics.items()):
            metric = "capkv_" + _METRIC_NAME.sub("_", str(name))
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            lines += [f"# TYPE {metric} gauge", f"{metric} {_number(number)}"]
        return "\n".join(lines) + "\n"

    def _check(self) -> None:
        for (route, method), (counts, total) in self.latency.items():
            assert len(counts) == len(LATENCY_BUCKETS) + 1
            assert all(c >= 0 for c in counts) and total[0] >= 0
        by_route: dict[tuple[str, str], int] = {}
        for (route, method, _), n in self.requests.items():
            by_route[(route, method)] = by_route.get((route, method), 0) + n
        for key, n in by_route.items():
            assert sum(self.latency[key][0]) == n, (key, n)


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


METRICS_KEY: web.AppKey[HttpMetrics] = web.AppKey("capkv_http_metrics", HttpMetrics)


async def healthz(request: web.Request) -> web.Response:
    Params(request, ())
    service = service_of(request)
    try:
        ok, reason = service.health()
    except Exception as exc:  # noqa: BLE001 - a health probe reports, it does not crash
        ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
    if ok:
        return json_response({"health": "ok", "mode": service.mode, "node": service.node_id})
    return error_response(503, "unavailable", f"this node cannot serve {service.mode} requests now: {reason}",
                          reason=reason, mode=service.mode, node=service.node_id)  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    Params(request, ())
    service = service_of(request)
    try:
        service_metrics = dict(service.metrics())
    except Exception:  # noqa: BLE001 - still serve the HTTP metrics
        service_metrics = {"service_metrics_errors": 1}
    text = request.app[METRICS_KEY].render(
        service_metrics, {"version": request.app[VERSION_KEY], "mode": service.mode, "node": service.node_id}
    )
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


async def version(request: web.Request) -> web.Response:
    Params(request, ())
    return json_response(
        {
            "capkv": request.app[VERSION_KEY],
            "mode": service_of(request).mode,
            "etcdserver": ETCD_SERVER_VERSION,
            "etcdcluster": ETCD_CLUSTER_VERSION,
        }
    )


async def openapi(request: web.Request) -> web.Response:
    from api.openapi import build_openapi

    Params(request, ())
    return json_response(build_openapi(request.app[VERSION_KEY]))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/openapi.json", openapi)
