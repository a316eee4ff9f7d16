"""Both modes: health, metrics, version, the error model for unknown routes and methods,
cluster status, and the cp-only endpoints' 501s."""
from __future__ import annotations

import re

import pytest

from api.app import make_app
from api.routes.meta import HttpMetrics
from tests.api.conftest import LIMITS, node_config
from tests.api.fakes import FakeCPService


async def test_healthz_reports_the_service(cp):
    r = await cp.get("/healthz")
    assert r.status == 200 and (await r.json())["health"] == "ok"
    cp.service.unavailable = "no leader elected yet"
    r = await cp.get("/healthz")
    assert r.status == 503
    body = await r.json()
    assert body["error"]["code"] == "unavailable" and "no leader elected yet" in body["error"]["message"]


async def test_version_has_etcd_fields(cp, ap):
    for client, mode in ((cp, "cp"), (ap, "ap")):
        body = await (await client.get("/version")).json()
        assert body["mode"] == mode and body["capkv"]
        assert body["etcdserver"].startswith("3.4.") and body["etcdcluster"] == "3.4.0"


async def test_metrics_count_requests_by_route_and_status(cp):
    for _ in range(3):
        await cp.put("/v1/kv/m", data=b"v")
    await cp.get("/v1/kv/missing")
    r = await cp.get("/metrics")
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await r.text()
    assert 'capkv_http_requests_total{route="/v1/kv/{key}",method="PUT",status="200"} 3' in text
    assert 'capkv_http_requests_total{route="/v1/kv/{key}",method="GET",status="404"} 1' in text
    assert re.search(r'capkv_http_request_duration_seconds_count\{route="/v1/kv/\{key\}",method="PUT"\} 3', text)
    assert 'le="+Inf"' in text
    # the service's own metrics as gauges
    assert re.search(r"^capkv_revision \d+$", text, re.M)
    assert 'capkv_info{version=' in text


def test_http_metrics_histogram_is_cumulative_and_consistent():
    m = HttpMetrics()
    for seconds in (0.0001, 0.003, 0.003, 0.7, 99.0):
        m.observe("/v1/kv/{key}", "GET", 200, seconds)
    m.observe("/v1/kv/{key}", "GET", 404, 0.01)
    m._check()
    text = m.render({})
    counts = [int(x) for x in re.findall(r'_bucket\{route="/v1/kv/\{key\}",method="GET",le="[^"]+"\} (\d+)', text)]
    assert counts == sorted(counts) and counts[-1] == 6


async def test_unknown_route_and_wrong_method_are_json(cp):
    r = await cp.get("/v2/whatever")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await cp.post("/v1/kv/k", data=b"v")
    assert r.status == 405
    body = await r.json()
    assert body["error"]["code"] == "method_not_allowed" and "PUT" in body["error"]["allowed"]
    assert "PUT" in r.headers["Allow"]
    assert cp.service.store == {}


CP_ONLY = [("POST", "/v1/txn"), ("GET", "/v1/leases"), ("POST", "/v1/leases"), ("GET", "/v1/leases/7"),
           ("DELETE", "/v1/leases/7"), ("POST", "/v1/leases/7/keepalive"), ("GET", "/v1/watch"),
           ("GET", "/v1/watch/some/key"), ("POST", "/v1/compact")]  # fmt: skip


@pytest.mark.parametrize("method,path", CP_ONLY)
async def test_cp_only_endpoints_in_ap_mode_name_cp(ap, method, path):
    r = await ap.request(method, path)
    assert r.status == 501
    error = (await r.json())["error"]
    assert error["code"] == "not_supported_in_mode" and "cp" in error["message"] and error["offered_by"] == "cp"


@pytest.mark.parametrize("method,path", CP_ONLY)
async def test_cp_only_endpoints_in_cp_mode_are_not_implemented_yet(cp, method, path):
    r = await cp.request(method, path)
    assert r.status == 501 and (await r.json())["error"]["code"] == "not_implemented"


async def test_cp_cluster_status_and_preflist_is_ap_only(cp):
    body = await (await cp.get("/v1/cluster")).json()
    assert body["mode"] == "cp" and body["leader"] == "n1" and len(body["members"]) == 3
    r = await cp.get("/v1/cluster/preflist/k")
    assert r.status == 501 and (await r.json())["error"]["offered_by"] == "ap"


async def test_members_without_service_support_is_501(cp):
    r = await cp.post("/v1/cluster/members", json={"id": "n4", "client_url": "http://127.0.0.1:4", "peer_address": "127.0.0.1:5"})
    assert r.status == 501 and (await r.json())["error"]["code"] == "not_implemented"
    r = await cp.delete("/v1/cluster/members/n3")
    assert r.status == 501


async def test_service_is_started_and_stopped_with_the_app(aiohttp_client):
    service = FakeCPService(node_config())
    client = await aiohttp_client(make_app(service, node_config(), limits=LIMITS))
    assert service.started and not service.stopped
    await client.close()
    assert service.stopped


async def test_unexpected_service_exception_is_a_json_500(cp):
    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    cp.service.get = broken
    r = await cp.get("/v1/kv/k")
    assert r.status == 500
    assert (await r.json())["error"]["code"] == "internal"


def test_make_app_refuses_a_service_without_a_mode():
    class NoMode:
        pass

    with pytest.raises(ValueError, match="mode"):
        make_app(NoMode(), node_config())
