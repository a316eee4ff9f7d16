"""The ap rows of API.md, through the real app over a fake APService."""
from __future__ import annotations

import pytest


async def test_put_get_single_value_has_value_and_context(ap):
    r = await ap.put("/v1/kv/cart", data=b"apple")
    assert r.status == 200
    written = await r.json()
    assert written["key"] == "cart" and written["context"]
    assert r.headers["X-Capkv-Context"] == written["context"]
    r = await ap.get("/v1/kv/cart")
    body = await r.json()
    assert r.status == 200
    assert body["value"] == "apple" and body["siblings"] == [{"value": "apple"}]
    assert body["context"] and r.headers["X-Capkv-Context"] == body["context"]


async def test_writes_without_context_become_siblings_and_a_context_resolves_them(ap):
    await ap.put("/v1/kv/cart", data=b"apple")
    await ap.put("/v1/kv/cart", data=b"pear")
    body = await (await ap.get("/v1/kv/cart")).json()
    assert sorted(s["value"] for s in body["siblings"]) == ["apple", "pear"]
    assert "value" not in body  # two siblings: the client must resolve
    # write back the merge with the context (header form)
    r = await ap.put("/v1/kv/cart", data=b"apple,pear", headers={"X-Capkv-Context": body["context"]})
    assert r.status == 200
    body = await (await ap.get("/v1/kv/cart")).json()
    assert body["siblings"] == [{"value": "apple,pear"}] and body["value"] == "apple,pear"
    # and the query-parameter form
    await ap.put("/v1/kv/cart", data=b"final", params={"context": body["context"]})
    assert (await (await ap.get("/v1/kv/cart")).json())["value"] == "final"


async def test_missing_key_404_carries_context(ap):
    await ap.put("/v1/kv/k", data=b"v")
    context = (await (await ap.get("/v1/kv/k")).json())["context"]
    r = await ap.delete("/v1/kv/k", headers={"X-Capkv-Context": context})
    assert r.status == 200 and (await r.json())["context"]
    r = await ap.get("/v1/kv/k")
    assert r.status == 404
    body = await r.json()
    assert body["error"]["code"] == "key_not_found"
    assert body["error"]["context"] and r.headers["X-Capkv-Context"] == body["error"]["context"]
    # causal re-create with the 404's context: one value, no leftover tombstone sibling
    await ap.put("/v1/kv/k", data=b"again", headers={"X-Capkv-Context": body["error"]["context"]})
    body = await (await ap.get("/v1/kv/k")).json()
    assert body["siblings"] == [{"value": "again"}]


async def test_raw_single_value_and_300_for_siblings(ap):
    await ap.put("/v1/kv/r", data=bytes([1, 2, 255]))
    r = await ap.get("/v1/kv/r?raw")
    assert r.status == 200 and await r.read() == bytes([1, 2, 255])
    assert r.headers["X-Capkv-Context"]
    await ap.put("/v1/kv/r", data=b"other")
    r = await ap.get("/v1/kv/r?raw=true")
    assert r.status == 300
    body = await r.json()
    assert len(body["siblings"]) == 2 and r.headers["X-Capkv-Siblings"] == "2"
    assert {"value_base64": "AQL/"} in body["siblings"]


async def test_quorum_parameters(ap):
    await ap.put("/v1/kv/q", data=b"v", params={"w": "3"})
    assert ap.service.last_call["w"] == 3
    await ap.get("/v1/kv/q", params={"r": "1"})
    assert ap.service.last_call["r"] == 1
    for method, name in (("GET", "r"), ("PUT", "w"), ("DELETE", "w")):
        for bad in ("0", "4", "two"):  # N is 3
            calls = ap.service.calls
            r = await ap.request(method, "/v1/kv/q", params={name: bad}, data=b"x" if method == "PUT" else None)
            assert r.status == 400 and (await r.json())["error"]["code"] == f"invalid_{name}"
            assert ap.service.calls == calls


async def test_bad_context_is_400_invalid_context_and_changes_nothing(ap):
    r = await ap.put("/v1/kv/c", data=b"v", headers={"X-Capkv-Context": "%%%not-base64"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_context"
    assert ap.service.store == {}
    r = await ap.put("/v1/kv/c", data=b"v", headers={"X-Capkv-Context": "e30="}, params={"context": "e31="})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_context"
    assert ap.service.store == {}


@pytest.mark.parametrize(
    "method,params",
    [("GET", {"consistency": "serializable"}), ("GET", {"revision": "1"}), ("PUT", {"if_mod_revision": "0"}),
     ("PUT", {"lease": "1"}), ("DELETE", {"prefix": "true"})],
)  # fmt: skip
async def test_cp_only_parameters_are_refused_in_ap(ap, method, params):
    r = await ap.request(method, "/v1/kv/k", params=params, data=b"v" if method == "PUT" else None)
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_parameter"
    assert ap.service.store == {}


async def test_range_lists_keys_with_siblings(ap):
    for key, value in (("u/1", b"a"), ("u/2", b"b"), ("v/1", b"c")):
        await ap.put(f"/v1/kv/{key}", data=value)
    await ap.put("/v1/kv/u/2", data=b"b2")
    body = await (await ap.get("/v1/kv", params={"prefix": "u/"})).json()
    assert [i["key"] for i in body["items"]] == ["u/1", "u/2"]
    assert body["items"][0]["value"] == "a"
    assert sorted(s["value"] for s in body["items"][1]["siblings"]) == ["b", "b2"]
    assert body["partial"] is False and body["more"] is False
    body = await (await ap.get("/v1/kv", params={"prefix": "", "limit": "2"})).json()
    assert len(body["items"]) == 2 and body["more"] is True


async def test_value_too_large_in_ap(ap):
    r = await ap.put("/v1/kv/big", data=b"x" * 1001)
    assert r.status == 413 and ap.service.store == {}


async def test_preflist_and_members(ap):
    body = await (await ap.get("/v1/cluster/preflist/user%2F42")).json()
    assert body["key"] == "user/42"
    assert len(body["preference_list"]) == 3
    r = await ap.post("/v1/cluster/members", json={"id": "n4", "client_url": "http://127.0.0.1:42379",
                                                   "peer_address": "127.0.0.1:42380"})  # fmt: skip
    assert r.status == 200
    assert [m.id for m in ap.service.members][-1] == "n4"
    r = await ap.delete("/v1/cluster/members/n4")
    assert r.status == 200 and "n4" not in [m.id for m in ap.service.members]
    r = await ap.delete("/v1/cluster/members/n9")
    assert r.status == 404


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"id": "n4"}', b'{"id": "n4", "client_url": "ftp://x:1", "peer_address": "127.0.0.1:1"}',
     b'{"id": "bad id!", "client_url": "http://127.0.0.1:1", "peer_address": "127.0.0.1:2"}',
     b'{"id": "n4", "client_url": "http://127.0.0.1:1", "peer_address": "127.0.0.1:2", "extra": 1}'],
)  # fmt: skip
async def test_bad_member_bodies_are_400_and_change_nothing(ap, body):
    before = list(ap.service.members)
    r = await ap.post("/v1/cluster/members", data=body)
    assert r.status == 400 and (await r.json())["error"]["code"].startswith("invalid_")
    assert ap.service.members == before


async def test_cluster_status(ap):
    body = await (await ap.get("/v1/cluster")).json()
    assert body["mode"] == "ap" and body["n"] == 3 and len(body["members"]) == 3
