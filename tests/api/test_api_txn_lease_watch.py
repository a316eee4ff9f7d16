"""cp mode's /v1 transactions, leases, watches and compaction over the in-memory cp service
with CPExtras (tests/api/fakes.py), plus the clients and the CLI commands for them."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from api import cli
from api.app import make_app
from api.client import Client, Compacted, NotFound, WatchPlan
from tests.api.conftest import LIMITS, ThreadedServer, node_config, started_server
from tests.api.fakes import FakeAPService, FakeCPExtrasService


class ManualClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def cpx(aiohttp_client, clock):
    service = FakeCPExtrasService(node_config(), clock=clock)
    client = await aiohttp_client(await started_server(make_app(service, node_config(), limits=LIMITS)))
    client.service = service
    return client


async def txn(client, body, **query):
    r = await client.post("/v1/txn", json=body, params=query)
    return r.status, await r.json()


async def put(client, key, value, **query):
    r = await client.put(f"/v1/kv/{key}", data=value, params=query)
    assert r.status == 200, await r.text()
    return await r.json()


# --- txn ------------------------------------------------------------------------------------------


async def test_create_if_absent_succeeds_once_and_the_loser_sees_the_winner(cpx):
    body = lambda me: {"compare": [{"key": "lock", "target": "create_revision", "op": "==", "value": 0}],  # noqa: E731
                       "success": [{"op": "put", "key": "lock", "value": me}],
                       "failure": [{"op": "get", "key": "lock"}]}  # fmt: skip
    status, first = await txn(cpx, body("alice"))
    assert status == 200 and first["succeeded"] is True
    assert first["responses"] == [{"op": "put", "revision": first["revision"], "created": True}]
    status, second = await txn(cpx, body("bob"))
    assert status == 200 and second["succeeded"] is False and second["revision"] == first["revision"]
    (got,) = second["responses"]
    assert got["op"] == "get" and [i["value"] for i in got["items"]] == ["alice"]


async def test_all_writes_of_a_txn_share_one_revision(cpx):
    a = await put(cpx, "acct/a", "100")
    b = await put(cpx, "acct/b", "100")
    transfer = {"compare": [{"key": "acct/a", "target": "mod_revision", "op": "==", "value": a["revision"]},
                            {"key": "acct/b", "target": "mod_revision", "op": "==", "value": b["revision"]}],
                "success": [{"op": "put", "key": "acct/a", "value": "90"}, {"op": "put", "key": "acct/b", "value": "110"},
                            {"op": "get", "key": "acct/", "prefix": True}]}  # fmt: skip
    status, result = await txn(cpx, transfer)
    assert status == 200 and result["succeeded"] and result["revision"] == b["revision"] + 1
    got = result["responses"][2]
    assert [(i["key"], i["value"], i["mod_revision"]) for i in got["items"]] == [
        ("acct/a", "90", result["revision"]), ("acct/b", "110", result["revision"])]
    # the same compare again fails: nothing is written, the revision does not move
    status, again = await txn(cpx, transfer)
    assert not again["succeeded"] and again["revision"] == result["revision"] and again["responses"] == []


async def test_compares_on_every_target_and_op(cpx):
    await put(cpx, "k", "b")
    await put(cpx, "k", "b")  # version 2
    lease = (await (await cpx.post("/v1/leases", json={"ttl": 60})).json())["id"]
    await put(cpx, "leased", "x", lease=lease)
    cases = [({"key": "k", "target": "value", "op": "==", "value": "b"}, True),
             ({"key": "k", "target": "value", "op": "<", "value": "c"}, True),
             ({"key": "k", "target": "value", "op": ">", "value_base64": base64.b64encode(b"c").decode()}, False),
             ({"key": "k", "target": "version", "op": "==", "value": 2}, True),
             ({"key": "k", "target": "version", "op": "!=", "value": 2}, False),
             ({"key": "k", "target": "create_revision", "op": "<", "value": 3}, True),
             ({"key": "k", "target": "mod_revision", "op": ">", "value": 2}, True),
             ({"key": "leased", "target": "lease", "op": "==", "value": lease}, True),
             ({"key": "missing", "target": "version", "op": "==", "value": 0}, True),
             ({"key": "missing", "target": "value", "op": "==", "value": ""}, False),  # an absent key has no value
             ({"key": "", "prefix": True, "target": "version", "op": ">", "value": 0}, True)]  # fmt: skip
    for compare, expected in cases:
        status, result = await txn(cpx, {"compare": [compare]})
        assert status == 200 and result["succeeded"] is expected, compare


async def test_nested_txn_delete_with_prefix_and_binary_values(cpx):
    await put(cpx, "dir/a", "1")
    await put(cpx, "dir/b", "2")
    raw = b"\xff\x00binary"
    body = {"success": [{"op": "txn", "compare": [{"key": "dir/a", "target": "version", "op": ">", "value": 0}],
                         "success": [{"op": "delete", "key": "dir/", "prefix": True, "prev": True}]},
                        {"op": "put", "key": "bin", "value_base64": base64.b64encode(raw).decode()}]}  # fmt: skip
    status, result = await txn(cpx, body)
    assert status == 200 and result["succeeded"]
    nested = result["responses"][0]
    assert nested["op"] == "txn" and nested["succeeded"]
    assert nested["responses"][0]["deleted"] == 2 and [p["key"] for p in nested["responses"][0]["prev"]] == ["dir/a", "dir/b"]
    r = await cpx.get("/v1/kv/bin")
    assert (await r.json())["value_base64"] == base64.b64encode(raw).decode()
    assert (await cpx.get("/v1/kv/dir/a")).status == 404


@pytest.mark.parametrize("body,code", [
    ({"compare": [{"key": "k", "target": "color", "op": "==", "value": 1}]}, "invalid_body"),
    ({"compare": [{"key": "k", "target": "version", "op": "~", "value": 1}]}, "invalid_body"),
    ({"compare": [{"key": "k", "target": "version", "op": "==", "value": "x"}]}, "invalid_body"),
    ({"success": [{"op": "rename", "key": "k"}]}, "invalid_body"),
    ({"success": [{"op": "put", "key": "k"}]}, "invalid_body"),
    ({"success": [{"op": "put", "key": "", "value": "v"}]}, "invalid_key"),
    ({"success": [{"op": "put", "key": "k" * 5000, "value": "v"}]}, "invalid_key"),
    ({"success": [{"op": "put", "key": "k", "value": "v" * 2000}]}, "invalid_body"),
    ({"success": [{"op": "put", "key": "k", "value": "v", "colour": 1}]}, "invalid_body"),
    ({"success": [{"op": "get", "key": f"k{i}"} for i in range(129)]}, "invalid_txn"),
    ({"success": [{"op": "put", "key": "k", "value": "1"}, {"op": "put", "key": "k", "value": "2"}]}, "invalid_txn"),
    ({"success": [{"op": "put", "key": "d/k", "value": "1"}, {"op": "delete", "key": "d/", "prefix": True}]}, "invalid_txn"),
    ({"success": [{"op": "put", "key": "k", "value": "1", "lease": 12345}]}, "lease_not_found"),
    ([1, 2], "invalid_body"),
])  # fmt: skip
async def test_bad_txns_are_refused_and_change_nothing(cpx, body, code):
    await put(cpx, "k", "0")
    before = cpx.service.revision
    status, result = await txn(cpx, body)
    assert status in (400, 404) and result["error"]["code"] == code, result
    assert cpx.service.revision == before and cpx.service.store[b"k"].value == b"0"


async def test_a_txn_retried_with_the_same_request_id_applies_once(cpx):
    body = {"success": [{"op": "put", "key": "counter", "value": "1"}]}
    _, first = await txn(cpx, body, request_id="r1")
    _, again = await txn(cpx, body, request_id="r1")
    assert first == again and cpx.service.store[b"counter"].version == 1


async def test_not_json_is_invalid_body(cpx):
    r = await cpx.post("/v1/txn", data=b"{nope")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_body"


# --- leases -----------------------------------------------------------------------------------------


async def test_lease_grant_info_keepalive_expiry_deletes_its_keys_at_one_revision(cpx, clock):
    r = await cpx.post("/v1/leases", json={"ttl": 10})
    lease = await r.json()
    assert r.status == 200 and lease["ttl"] == 10
    await put(cpx, "svc/a", "1", lease=lease["id"])
    await put(cpx, "svc/b", "2", lease=lease["id"])
    await put(cpx, "other", "stays")
    clock.now += 6
    info = await (await cpx.get(f"/v1/leases/{lease['id']}")).json()
    assert info == {"id": lease["id"], "ttl": 4, "granted_ttl": 10, "keys": ["svc/a", "svc/b"]}
    kept = await (await cpx.post(f"/v1/leases/{lease['id']}/keepalive")).json()
    assert kept["ttl"] == 10
    clock.now += 9  # 15 s after the grant, 9 after the keepalive: still alive
    assert (await cpx.get("/v1/kv/svc/a")).status == 200
    before = cpx.service.revision
    clock.now += 2
    assert (await cpx.get("/v1/kv/svc/a")).status == 404  # expired: both keys gone
    assert cpx.service.revision == before + 1  # one revision for the whole lease
    deletes = [e for e in cpx.service.events if e.type == "delete"]
    assert [(e.kv.key, e.kv.mod_revision) for e in deletes] == [(b"svc/a", before + 1), (b"svc/b", before + 1)]
    r = await cpx.get(f"/v1/leases/{lease['id']}")
    assert r.status == 404 and (await r.json())["error"]["code"] == "lease_not_found"
    assert (await cpx.get("/v1/kv/other")).status == 200


async def test_revoke_list_and_lease_errors(cpx):
    ids = [(await (await cpx.post("/v1/leases", json={"ttl": t})).json())["id"] for t in (5, 50)]
    listed = await (await cpx.get("/v1/leases")).json()
    assert sorted(l["id"] for l in listed["leases"]) == sorted(ids)
    await put(cpx, "x", "1", lease=ids[0])
    r = await cpx.delete(f"/v1/leases/{ids[0]}")
    body = await r.json()
    assert r.status == 200 and body["revoked"] is True and body["revision"] == cpx.service.revision
    assert (await cpx.get("/v1/kv/x")).status == 404
    r = await cpx.delete(f"/v1/leases/{ids[0]}")
    assert r.status == 404 and (await r.json())["error"]["code"] == "lease_not_found"
    r = await cpx.post(f"/v1/leases/{ids[0]}/keepalive")
    assert r.status == 404
    r = await cpx.put("/v1/kv/y", data=b"1", params={"lease": str(ids[0])})
    assert r.status == 404 and (await r.json())["error"]["code"] == "lease_not_found"
    for bad in ({"ttl": 0}, {"ttl": "ten"}, {}, {"ttl": 5, "owner": "me"}):
        r = await cpx.post("/v1/leases", json=bad)
        assert r.status == 400, bad
    r = await cpx.get("/v1/leases/not-a-number")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_lease"
    r = await cpx.post("/v1/leases", json={"ttl": 5, "id": ids[1]})
    assert r.status == 412


# --- compaction ----------------------------------------------------------------------------------


async def test_compaction_gives_410_below_and_reads_at_or_above(cpx):
    first = await put(cpx, "k", "1")
    second = await put(cpx, "k", "2")
    r = await cpx.post("/v1/compact", json={"revision": second["revision"]})
    assert r.status == 200 and (await r.json())["compact_revision"] == second["revision"]
    r = await cpx.get("/v1/kv/k", params={"revision": first["revision"]})
    body = await r.json()
    assert r.status == 410 and body["error"]["code"] == "compacted" and body["error"]["compact_revision"] == second["revision"]
    r = await cpx.get("/v1/kv/k", params={"revision": second["revision"]})
    assert r.status == 200 and (await r.json())["value"] == "2"
    r = await cpx.post("/v1/compact", json={"revision": 10**6})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_revision"
    r = await cpx.post("/v1/compact", json={"revision": second["revision"]})
    assert r.status == 410
    r = await cpx.post("/v1/compact", json={"rev": 1})
    assert r.status == 400


# --- watch ------------------------------------------------------------------------------------------


async def read_lines(response, n: int) -> list[dict]:
    lines = []
    while len(lines) < n:
        line = await asyncio.wait_for(response.content.readline(), 5)
        assert line, f"the stream ended after {lines}"
        lines.append(json.loads(line))
    return lines


async def test_watch_replays_from_start_revision_then_streams_with_no_gap_or_repeat(cpx):
    first = await put(cpx, "cfg/a", "1")
    await put(cpx, "cfg/b", "2")
    await put(cpx, "other", "x")
    r = await cpx.get("/v1/watch", params={"prefix": "cfg/", "start_revision": str(first["revision"]), "prev": "true"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
    events = await read_lines(r, 2)
    await put(cpx, "cfg/a", "1b")
    await cpx.delete("/v1/kv/cfg/b")
    await put(cpx, "cfh", "outside the prefix")
    events += await read_lines(r, 2)
    assert [(e["type"], e["key"], e["mod_revision"]) for e in events] == [
        ("put", "cfg/a", first["revision"]), ("put", "cfg/b", first["revision"] + 1),
        ("put", "cfg/a", first["revision"] + 3), ("delete", "cfg/b", first["revision"] + 4)]  # fmt: skip
    assert events[2]["value"] == "1b" and events[2]["prev"]["value"] == "1" and events[3]["prev"]["value"] == "2"
    assert events[2]["version"] == 2 and events[3]["version"] == 0
    r.close()


async def test_watch_as_server_sent_events_resumes_from_last_event_id(cpx):
    first = await put(cpx, "k", "1")
    await put(cpx, "k", "2")
    r = await cpx.get("/v1/watch/k", params={"start_revision": str(first["revision"])}, headers={"Accept": "text/event-stream"})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    frame = b""
    while frame.count(b"\n\n") < 2:
        frame += await asyncio.wait_for(r.content.readany(), 5)
    messages = [m for m in frame.decode().split("\n\n") if m]
    assert messages[0].splitlines()[:2] == ["event: put", f"id: {first['revision']}"]
    assert json.loads(messages[1].splitlines()[2][len("data: "):])["value"] == "2"
    r.close()
    r = await cpx.get("/v1/watch/k", headers={"Accept": "text/event-stream", "Last-Event-ID": str(first["revision"])})
    frame = b""
    while b"\n\n" not in frame:
        frame += await asyncio.wait_for(r.content.readany(), 5)
    assert frame.decode().startswith(f"event: put\nid: {first['revision'] + 1}\n")  # resumed after the last id
    r.close()


async def test_watch_from_a_compacted_revision_is_410_with_the_compact_revision(cpx):
    await put(cpx, "k", "1")
    second = await put(cpx, "k", "2")
    await cpx.post("/v1/compact", json={"revision": second["revision"]})
    r = await cpx.get("/v1/watch/k", params={"start_revision": "1"})
    body = await r.json()
    assert r.status == 410 and body["error"]["code"] == "compacted" and body["error"]["compact_revision"] == second["revision"]


async def test_an_idle_watch_gets_progress_events(cpx):
    await put(cpx, "elsewhere", "1")
    r = await cpx.get("/v1/watch/quiet", params={"progress_ms": "100"})
    lines = await read_lines(r, 2)
    assert lines == [{"type": "progress", "revision": cpx.service.revision}] * 2
    r.close()


async def registered(service, count: int = 1) -> None:
    for _ in range(100):
        if len(service.watchers) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} watch(es) never registered")


async def test_a_watcher_that_falls_behind_is_closed_with_a_final_event(cpx):
    cpx.service.watch_buffer = 2
    r = await cpx.get("/v1/watch", params={"prefix": "fast/"})
    await registered(cpx.service)
    for i in range(40):  # no await that yields in between: the watcher cannot keep up
        await cpx.service.put(f"fast/{i}".encode(), b"x")
    lines = []
    while True:
        line = await asyncio.wait_for(r.content.readline(), 5)
        if not line:
            break
        lines.append(json.loads(line))
    assert lines[-1]["type"] == "canceled" and "behind" in lines[-1]["reason"]
    puts = [e for e in lines if e["type"] == "put"]
    assert 1 <= len(puts) < 40 and [e["key"] for e in puts] == [f"fast/{i}" for i in range(len(puts))]
    assert not cpx.service.watchers


async def test_a_closed_watch_connection_frees_the_watch(cpx):
    r = await cpx.get("/v1/watch/k")
    await registered(cpx.service)
    assert len(cpx.service.watchers) == 1
    r.close()
    for _ in range(40):
        if not cpx.service.watchers:
            break
        await asyncio.sleep(0.1)
    assert not cpx.service.watchers


async def test_watch_parameters_are_checked(cpx, ap):
    r = await cpx.get("/v1/watch")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_prefix"
    r = await cpx.get("/v1/watch/k", params={"start_revision": "0"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_start_revision"
    r = await cpx.get("/v1/watch/k", params={"since": "1"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_parameter"
    r = await ap.get("/v1/watch/k")
    assert r.status == 501 and (await r.json())["error"]["offered_by"] == "cp"


# --- the Python client and the CLI ------------------------------------------------------------


@pytest.fixture
def served(threaded_servers):
    service = FakeCPExtrasService(node_config())
    server = threaded_servers(service)
    return server, service


def test_client_txn_leases_compact(served):
    server, service = served
    client = Client([server.url])
    result = client.txn([{"key": "a", "target": "version", "op": "==", "value": 0}], [{"op": "put", "key": "a", "value": "1"}])
    assert result["succeeded"]
    lease = client.lease_grant(30)
    client.put("leased", "v", lease=lease["id"])
    assert client.lease_info(lease["id"])["keys"] == ["leased"]
    assert client.lease_keepalive(lease["id"])["ttl"] == 30
    assert [l["id"] for l in client.leases()] == [lease["id"]]
    client.lease_revoke(lease["id"])
    with pytest.raises(NotFound):
        client.lease_info(lease["id"])
    revision = client.put("a", "2")["revision"]
    client.compact(revision)
    with pytest.raises(Compacted):
        client.get("a", revision=revision - 1)


def test_client_watch_reconnects_from_the_last_revision_seen(served):
    server, service = served
    writer = Client([server.url])
    for i in range(3):
        writer.put(f"w/{i}", str(i))
    watcher = Client([server.url])
    events = watcher.watch(prefix="w/", start_revision=1, idle_timeout=5)
    seen = [next(events) for _ in range(3)]
    server.stop()  # the node goes away mid-watch; another comes up on the same port
    replacement = ThreadedServer(service, port=server.port).start()
    try:
        writer.put("w/3", "3")
        seen.append(next(e for e in events if e["type"] != "progress"))
        assert [(e["key"], e["mod_revision"]) for e in seen] == [(f"w/{i}", i + 2) for i in range(4)]
        events.close()
    finally:
        replacement.stop()


def test_watch_plan_resumes_after_the_last_event():
    plan = WatchPlan(None, "p/", None, True, None)
    assert plan.target() == "/v1/watch?prefix=p%2F&prev=true"
    plan.saw({"type": "progress", "revision": 9})
    plan.saw({"type": "put", "mod_revision": 12})
    assert plan.target() == "/v1/watch?prefix=p%2F&start_revision=13&prev=true"
    with pytest.raises(ValueError):
        WatchPlan("k", "p", None, False, None)


def test_cli_txn_lease_member_compact_and_watch(served, capsys, tmp_path):
    server, service = served
    url = ["--endpoints", server.url]
    assert cli.main(["lease", "grant", "20", *url, "-o", "json"]) == 0
    lease_id = json.loads(capsys.readouterr().out)["id"]
    assert cli.main(["put", "cfg/a", "1", "--lease", str(lease_id), *url]) == 0
    assert cli.main(["lease", "info", str(lease_id), *url]) == 0
    assert "cfg/a" in capsys.readouterr().out
    txn_file = tmp_path / "txn.json"
    txn_file.write_text(json.dumps({"compare": [{"key": "cfg/a", "target": "value", "op": "==", "value": "1"}],
                                    "success": [{"op": "put", "key": "cfg/b", "value": "2"}]}))  # fmt: skip
    assert cli.main(["txn", str(txn_file), *url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert cli.main(["txn", str(txn_file), *url]) == 0  # the compare still holds
    txn_file.write_text(json.dumps({"compare": [{"key": "cfg/a", "target": "value", "op": "==", "value": "nope"}]}))
    assert cli.main(["txn", str(txn_file), *url]) == cli.EXIT_NOT_FOUND  # failure branch
    assert cli.main(["watch", "cfg/", "--prefix", "--rev", "1", "--max-events", "3", *url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [line for line in out[-3:] if line.startswith("PUT cfg/")] and len(out) >= 3
    assert cli.main(["lease", "keepalive", str(lease_id), "--once", *url]) == 0
    assert cli.main(["lease", "revoke", str(lease_id), *url]) == 0
    assert cli.main(["lease", "ls", *url, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"leases": []}
    assert cli.main(["member", "add", "n4", "http://127.0.0.1:42379", "127.0.0.1:42380", *url]) == 0
    assert cli.main(["member", "ls", *url]) == 0
    assert "n4" in capsys.readouterr().out
    assert cli.main(["member", "remove", "n4", *url]) == 0
    assert cli.main(["compact", str(service.revision), *url]) == 0
    assert cli.main(["watch", "cfg/a", "--rev", "1", *url]) == cli.EXIT_ERROR  # 410: compacted
    assert "compacted" in capsys.readouterr().err


def test_cli_cp_only_commands_in_ap_mode_say_which_mode_offers_them(threaded_servers, capsys):
    server = threaded_servers(FakeAPService(node_config()))
    assert cli.main(["lease", "grant", "5", "--endpoints", server.url]) == cli.EXIT_USAGE
    assert "cp" in capsys.readouterr().err


def test_openapi_documents_the_query_parameters_these_routes_accept():
    import re

    from api.openapi import build_openapi
    from api.routes import cp_only, watch

    doc = build_openapi("test")

    def names(path, method):
        return {p["name"] for p in doc["paths"][path][method]["parameters"] if p["in"] == "query"}

    for method, path, _, params in cp_only.CP_ONLY_ROUTES:
        assert names(path, method.lower()) == set(params), path
    assert names("/v1/watch", "get") == set(watch.WATCH_PREFIX_PARAMS)
    assert names("/v1/watch/{key}", "get") == set(watch.WATCH_PARAMS)
    gateway = [p for p in doc["paths"] if re.match(r"^/v3(beta)?/", p)]
    assert "/v3/kv/range" in gateway and "/v3beta/watch" in gateway and "/v3/kv/lease/timetolive" in gateway
