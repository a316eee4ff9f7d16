"""The per-request paths shaped for speed keep their exact behaviour: query checking with
and without a query string, the PUT body read by Content-Length or chunk by chunk, the
latency histogram's inclusive bucket bounds, and JSON rendering of service output."""
from __future__ import annotations

import re

import pytest

from api.errors import json_response, to_jsonable
from api.routes.meta import LATENCY_BUCKETS, HttpMetrics


@pytest.mark.parametrize("query", ["?timeout_ms=10&timeout_ms=20", "?prev&timeout_ms=10&timeout_ms=20"])
async def test_repeated_parameter_is_400_for_its_name(cp, query):
    r = await cp.put("/v1/kv/k" + query, data=b"v")
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_timeout_ms"
    assert cp.service.store == {}


@pytest.mark.parametrize("query", ["?bogus=1", "?timeout_ms=10&bogus", "?prev&prev&bogus"])
async def test_unknown_parameter_is_400_even_beside_valid_ones(cp, query):
    r = await cp.put("/v1/kv/k" + query, data=b"v")
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["code"] == "invalid_parameter" and error["parameter"] == "bogus"
    assert "allowed: if_mod_revision, lease, prev, request_id, timeout_ms" in error["message"]


async def test_parameters_are_checked_per_route_with_and_without_query(cp, ap):
    assert (await cp.get("/v1/kv/k?w=2")).status == 400  # an ap parameter on cp
    assert (await ap.get("/v1/kv/k?consistency=serializable")).status == 400  # and the reverse
    assert (await cp.put("/v1/kv/k", data=b"v")).status == 200
    assert (await cp.put("/v1/kv/k?prev=true", data=b"w")).status == 200


@pytest.mark.parametrize("size", [0, 1, 999, 1000])
async def test_put_body_by_content_length_is_stored_exactly(cp, size):
    value = bytes(range(256)) * 4
    value = value[:size]
    r = await cp.put("/v1/kv/sized", data=value)
    assert r.status == 200
    assert cp.service.last_call["value"] == value


async def test_chunked_put_body_within_limit_is_stored_exactly(cp):
    async def chunks():
        for part in (b"ab", b"", b"c" * 500, b"d" * 497):
            yield part

    r = await cp.put("/v1/kv/chunked", data=chunks())
    assert r.status == 200
    assert cp.service.last_call["value"] == b"ab" + b"c" * 500 + b"d" * 497


def test_latency_bucket_bounds_are_inclusive():
    for index, bound in enumerate(LATENCY_BUCKETS):
        m = HttpMetrics()
        m.observe("/r", "GET", 200, bound)  # exactly on the bound: counted as le=bound
        m.observe("/r", "GET", 200, bound * 1.0001)  # just over: the next bucket
        counts, total = m.latency[("/r", "GET")]
        assert counts[index] == 1 and counts[index + 1] == 1 and sum(counts) == 2, (bound, counts)
    m = HttpMetrics()
    m.observe("/r", "GET", 200, 0.0)
    m.observe("/r", "GET", 200, LATENCY_BUCKETS[-1] + 1)
    counts, _ = m.latency[("/r", "GET")]
    assert counts[0] == 1 and counts[-1] == 1
    text = m.render({})
    assert re.search(r'le="0.0005"\} 1$', text, re.M) and re.search(r'le="\+Inf"\} 2$', text, re.M)


def test_json_rendering_of_service_output():
    payload = {"s": "x", "i": 7, "f": 0.5, "b": True, "n": None, "raw": b"\xff", "text": b"ok",
               "nested": {1: [b"a", ("t", bytearray(b"u"))]}}  # fmt: skip
    assert to_jsonable(payload) == {"s": "x", "i": 7, "f": 0.5, "b": True, "n": None, "raw": "/w==", "text": "ok",
                                    "nested": {"1": ["a", ["t", "u"]]}}  # fmt: skip
    response = json_response({"key": "k", "context": "C"}, headers={"X-Capkv-Context": "C"})
    assert response.text == '{"key": "k", "context": "C"}'
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["X-Capkv-Context"] == "C"


async def test_a_started_node_tunes_its_collector_once_and_an_embedded_app_does_not(aiohttp_client, monkeypatch):
    import gc

    import api.app as app_module
    from tests.api.conftest import LIMITS, node_config, started_server
    from tests.api.fakes import FakeCPService

    calls = []
    monkeypatch.setattr(app_module, "tune_gc_for_serving", lambda: calls.append("tuned"))
    await aiohttp_client(await started_server(app_module.make_app(FakeCPService(node_config()), node_config(), limits=LIMITS)))
    assert calls == []
    await aiohttp_client(await started_server(app_module.make_app(FakeCPService(node_config()), node_config(),
                                                                  limits=LIMITS, tune_gc=True)))  # fmt: skip
    assert calls == ["tuned"], "after the service started"
    monkeypatch.undo()

    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    monkeypatch.setattr(app_module, "_gc_tuned", False)
    try:
        assert app_module.tune_gc_for_serving() is True
        assert gc.get_threshold()[0] == app_module.SERVING_GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0, "start-up objects are frozen out of full collections"
        assert app_module.tune_gc_for_serving() is False, "once per process"
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if frozen:
            gc.freeze()
