"""The cp rows of API.md's kv table, through the real app over a fake CPService."""
from __future__ import annotations

import base64
import time

import pytest

from tests.api.conftest import LIMITS


async def put(cp, key: str, value: bytes | str, **params):
    return await cp.put(f"/v1/kv/{key}", data=value, params=params)


async def test_put_then_get_returns_value_and_revisions(cp):
    r = await put(cp, "config/db", "postgres://a")
    assert r.status == 200
    written = await r.json()
    assert written["key"] == "config/db" and written["created"] is True
    r = await cp.get("/v1/kv/config/db")
    body = await r.json()
    assert r.status == 200
    assert body["value"] == "postgres://a"
    assert body["create_revision"] == body["mod_revision"] == written["revision"]
    assert body["version"] == 1 and body["revision"] == written["revision"]
    assert "lease" not in body

    r = await put(cp, "config/db", "postgres://b")
    second = await r.json()
    assert second["created"] is False and second["revision"] == written["revision"] + 1
    body = await (await cp.get("/v1/kv/config/db")).json()
    assert body["version"] == 2 and body["create_revision"] == written["revision"]


async def test_missing_key_is_404_key_not_found_json(cp):
    r = await cp.get("/v1/kv/nope")
    assert r.status == 404
    body = await r.json()
    assert body["error"]["code"] == "key_not_found"
    assert body["error"]["message"]
    assert body["error"]["key"] == "nope"


async def test_binary_value_comes_back_as_value_base64(cp):
    raw = bytes([0xFF, 0x00, 0x80])
    await put(cp, "bin", raw)
    body = await (await cp.get("/v1/kv/bin")).json()
    assert "value" not in body
    assert base64.b64decode(body["value_base64"]) == raw


async def test_raw_returns_bytes_with_metadata_headers(cp):
    raw = bytes(range(256))
    rev = (await (await put(cp, "blob", raw)).json())["revision"]
    r = await cp.get("/v1/kv/blob?raw")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert await r.read() == raw
    assert r.headers["X-Capkv-Mod-Revision"] == str(rev)
    assert r.headers["X-Capkv-Version"] == "1"


async def test_empty_value_is_stored(cp):
    await put(cp, "empty", b"")
    body = await (await cp.get("/v1/kv/empty")).json()
    assert body["value"] == ""


@pytest.mark.parametrize(
    "path",
    [
        "/v1/kv/",  # empty
        "/v1/kv/%FF%FE",  # not UTF-8
        "/v1/kv/" + "k" * 4097,  # over 4096 bytes
    ],
)
async def test_bad_keys_are_400_invalid_key_and_store_nothing(cp, path):
    for method in ("GET", "PUT", "DELETE"):
        r = await cp.request(method, path, data=b"v" if method == "PUT" else None)
        assert r.status == 400, (method, path)
        assert (await r.json())["error"]["code"] == "invalid_key"
    assert cp.service.store == {} and cp.service.calls == 0


async def test_key_of_4096_bytes_is_accepted_and_percent_decoding_applies(cp):
    key = "é" * 2048  # 4096 bytes of UTF-8
    assert (await put(cp, key, "x")).status == 200
    assert (await put(cp, "a%2Fb%20c", "y")).status == 200
    assert b"a/b c" in cp.service.store
    body = await (await cp.get("/v1/kv/a/b%20c")).json()
    assert body["key"] == "a/b c" and body["value"] == "y"


async def test_value_over_limit_is_413_and_nothing_is_stored(cp):
    r = await put(cp, "big", b"x" * (LIMITS.max_value_bytes + 1))
    assert r.status == 413
    body = await r.json()
    assert body["error"]["code"] == "value_too_large"
    assert body["error"]["max_value_bytes"] == LIMITS.max_value_bytes
    assert cp.service.store == {}
    # exactly at the limit is fine
    assert (await put(cp, "big", b"x" * LIMITS.max_value_bytes)).status == 200


async def test_chunked_value_over_limit_is_413_and_nothing_is_stored(cp):
    async def chunks():
        for _ in range(5):
            yield b"y" * 300  # 1500 bytes in all, no Content-Length

    r = await cp.put("/v1/kv/chunked", data=chunks())
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "value_too_large"
    assert cp.service.store == {}


async def test_compare_and_swap(cp):
    # 0 means "only if absent"
    r = await put(cp, "lock", "me", if_mod_revision=0)
    assert r.status == 200
    rev = (await r.json())["revision"]
    r = await put(cp, "lock", "you", if_mod_revision=0)
    assert r.status == 412
    body = await r.json()
    assert body["error"]["code"] == "precondition_failed"
    assert body["error"]["mod_revision"] == rev
    assert (await put(cp, "lock", "again", if_mod_revision=rev)).status == 200
    assert (await put(cp, "lock", "stale", if_mod_revision=rev)).status == 412
    assert cp.service.store[b"lock"].value == b"again"


async def test_prev_returns_previous_value(cp):
    r = await put(cp, "k", "one", prev="true")
    assert (await r.json())["prev"] is None
    r = await put(cp, "k", "two", prev="")
    assert (await r.json())["prev"]["value"] == "one"
    r = await cp.delete("/v1/kv/k", params={"prev": "true"})
    body = await r.json()
    assert body["deleted"] == 1 and [p["value"] for p in body["prev"]] == ["two"]


async def test_delete_single_and_prefix(cp):
    for key in ("app/a", "app/b", "apple", "b"):
        await put(cp, key, "v")
    r = await cp.delete("/v1/kv/app/", params={"prefix": "true"})
    body = await r.json()
    assert r.status == 200 and body["deleted"] == 2
    assert sorted(cp.service.store) == [b"apple", b"b"]
    r = await cp.delete("/v1/kv/b")
    assert (await r.json())["deleted"] == 1
    r = await cp.delete("/v1/kv/b")
    assert r.status == 200 and (await r.json())["deleted"] == 0


async def test_delete_with_if_mod_revision(cp):
    rev = (await (await put(cp, "k", "v")).json())["revision"]
    r = await cp.delete("/v1/kv/k", params={"if_mod_revision": str(rev + 5)})
    assert r.status == 412 and b"k" in cp.service.store
    r = await cp.delete("/v1/kv/k", params={"if_mod_revision": str(rev)})
    assert r.status == 200 and b"k" not in cp.service.store


async def test_delete_prefix_with_if_mod_revision_is_refused(cp):
    await put(cp, "p/a", "v")
    r = await cp.delete("/v1/kv/p/", params={"prefix": "true", "if_mod_revision": "1"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_if_mod_revision"
    assert b"p/a" in cp.service.store


async def test_range_prefix_limit_paging_and_keys_only(cp):
    keys = [f"r/{i:02d}" for i in range(7)] + ["s/0", "q"]
    for key in keys:
        await put(cp, key, "val-" + key)
    r = await cp.get("/v1/kv", params={"prefix": "r/", "limit": "3"})
    page = await r.json()
    assert [i["key"] for i in page["items"]] == ["r/00", "r/01", "r/02"]
    assert page["more"] is True and page["count"] == 7
    seen = [i["key"] for i in page["items"]]
    while page["more"]:
        page = await (await cp.get("/v1/kv", params={"prefix": "r/", "limit": "3", "start_after": seen[-1]})).json()
        seen += [i["key"] for i in page["items"]]
    assert seen == sorted(k for k in keys if k.startswith("r/"))

    page = await (await cp.get("/v1/kv", params={"prefix": "r/", "keys_only": "true"})).json()
    assert all("value" not in i and "value_base64" not in i for i in page["items"])
    assert all(i["mod_revision"] > 0 for i in page["items"])

    everything = await (await cp.get("/v1/kv")).json()
    assert [i["key"] for i in everything["items"]] == sorted(keys)


async def test_range_is_bounded_by_the_server_limit(cp):
    for i in range(LIMITS.max_range_limit + 5):
        await put(cp, f"many/{i:03d}", "v")
    page = await (await cp.get("/v1/kv", params={"prefix": "many/"})).json()
    assert len(page["items"]) == LIMITS.max_range_limit and page["more"] is True
    r = await cp.get("/v1/kv", params={"prefix": "many/", "limit": str(LIMITS.max_range_limit + 1)})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_limit"


async def test_reads_at_a_past_revision_and_compacted(cp):
    first = (await (await put(cp, "h", "one")).json())["revision"]
    await put(cp, "h", "two")
    body = await (await cp.get("/v1/kv/h", params={"revision": str(first)})).json()
    assert body["value"] == "one"
    page = await (await cp.get("/v1/kv", params={"prefix": "h", "revision": str(first)})).json()
    assert [i["value"] for i in page["items"]] == ["one"]
    cp.service.compact_revision = first + 1
    r = await cp.get("/v1/kv/h", params={"revision": str(first)})
    assert r.status == 410
    body = await r.json()
    assert body["error"]["code"] == "compacted" and body["error"]["compact_revision"] == first + 1


async def test_parameters_reach_the_service(cp):
    await cp.get("/v1/kv/x", params={"consistency": "serializable", "timeout_ms": "250"})
    assert cp.service.last_call["consistency"] == "serializable"
    assert cp.service.last_call["timeout"] == pytest.approx(0.25)
    await put(cp, "x", "v", lease="42", request_id="abc")
    assert cp.service.last_call["lease"] == 42 and cp.service.last_call["request_id"] == "abc"
    await cp.get("/v1/kv/x")
    assert cp.service.last_call["consistency"] == "linearizable"
    assert cp.service.last_call["timeout"] == pytest.approx(5.0)


async def test_request_id_makes_a_retried_put_apply_once(cp):
    r1 = await (await put(cp, "once", "v", request_id="req-1")).json()
    r2 = await (await put(cp, "once", "v", request_id="req-1")).json()
    assert r1 == r2
    body = await (await cp.get("/v1/kv/once")).json()
    assert body["version"] == 1


@pytest.mark.parametrize(
    "method,path,params,code",
    [
        ("GET", "/v1/kv/k", {"consistency": "strong"}, "invalid_consistency"),
        ("GET", "/v1/kv/k", {"revision": "0"}, "invalid_revision"),
        ("GET", "/v1/kv/k", {"revision": "abc"}, "invalid_revision"),
        ("GET", "/v1/kv/k", {"timeout_ms": "-5"}, "invalid_timeout_ms"),
        ("GET", "/v1/kv/k", {"timeout_ms": "99999999"}, "invalid_timeout_ms"),
        ("GET", "/v1/kv/k", {"raw": "maybe"}, "invalid_raw"),
        ("GET", "/v1/kv/k", {"r": "2"}, "invalid_parameter"),  # ap-only parameter
        ("GET", "/v1/kv", {"limit": "0"}, "invalid_limit"),
        ("GET", "/v1/kv", {"start_after": ""}, "invalid_start_after"),
        ("PUT", "/v1/kv/k", {"if_mod_revision": "-1"}, "invalid_if_mod_revision"),
        ("PUT", "/v1/kv/k", {"if_mod_rev": "3"}, "invalid_parameter"),  # a typo must not become a blind write
        ("PUT", "/v1/kv/k", {"lease": "x"}, "invalid_lease"),
        ("PUT", "/v1/kv/k", {"prev": "perhaps"}, "invalid_prev"),
        ("PUT", "/v1/kv/k", {"request_id": "x" * 300}, "invalid_request_id"),
        ("PUT", "/v1/kv/k", {"context": "abc"}, "invalid_parameter"),  # ap-only
        ("DELETE", "/v1/kv/k", {"prefix": "sometimes"}, "invalid_prefix"),
    ],
)
async def test_bad_parameters_are_400_with_a_code_naming_them_and_change_nothing(cp, method, path, params, code):
    r = await cp.request(method, path, params=params, data=b"v" if method == "PUT" else None)
    assert r.status == 400
    body = await r.json()
    assert body["error"]["code"] == code
    assert len(body["error"]["message"]) > 10
    assert cp.service.store == {} and cp.service.calls == 0


async def test_repeated_parameter_is_refused(cp):
    r = await cp.put("/v1/kv/k?if_mod_revision=0&if_mod_revision=5", data=b"v")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_if_mod_revision"
    assert cp.service.store == {}


async def test_unavailable_service_is_503(cp):
    cp.service.unavailable = "no leader"
    r = await put(cp, "k", "v")
    assert r.status == 503
    body = await r.json()
    assert body["error"]["code"] == "unavailable" and "no leader" in body["error"]["message"]


async def test_a_service_that_hangs_is_cut_off_at_the_timeout(cp):
    cp.service.delay = 5.0
    started = time.monotonic()
    r = await put(cp, "k", "v", timeout_ms="100")
    assert r.status == 504 and (await r.json())["error"]["code"] == "outcome_unknown"
    r = await cp.get("/v1/kv/k", params={"timeout_ms": "100"})
    assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
    assert time.monotonic() - started < 2.0


async def test_expect_continue_with_a_too_large_value_is_refused_before_the_body_is_sent(cp):
    import asyncio

    reader, writer = await asyncio.open_connection(cp.server.host, cp.server.port)
    size = LIMITS.max_value_bytes * 3
    writer.write(
        f"PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 413"), status_line  # not "100 Continue"
    writer.close()
    assert cp.service.store == {}


async def test_expect_continue_with_an_acceptable_value_continues(cp):
    r = await cp.put("/v1/kv/small", data=b"ok", headers={"Expect": "100-continue"})
    assert r.status == 200 and cp.service.store[b"small"].value == b"ok"


async def test_prefix_is_taken_byte_exact_from_the_query(cp):
    await put(cp, "caf%C3%A9/1", "a")  # key "café/1"
    await put(cp, "%EF%BF%BD/2", "b")  # key "\ufffd/2": a real U+FFFD is a valid key and prefix
    body = await (await cp.get("/v1/kv?prefix=caf%C3%A9%2F")).json()
    assert [i["key"] for i in body["items"]] == ["café/1"]
    body = await (await cp.get("/v1/kv?prefix=%EF%BF%BD")).json()
    assert [i["key"] for i in body["items"]] == ["\ufffd/2"]
    r = await cp.get("/v1/kv?prefix=caf%E9")  # latin-1, not UTF-8
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_prefix"
