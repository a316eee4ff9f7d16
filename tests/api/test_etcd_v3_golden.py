"""The etcd v3 gateway answers as etcd 3.4 does: golden comparisons with the captures in
../shared/etcd-v3-captures/ (real etcd 3.4.23 request/response pairs).

The kv, txn, lease and compaction captures (003-124) were taken in one run against one
etcd, so they are replayed here in order against one in-memory cp service, with the few
steps the capture run did not record put back in (marked SETUP), and the answers must be
equal to etcd's: same status, same fields, same encodings, same revisions, same error
strings. Only what differs by nature is normalized: cluster_id, member_id and raft_term
in headers, and lease ids (mapped from etcd's to ours as grants answer them). Watch
captures are compared message by message, with numbers normalized.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from pathlib import Path

import pytest

from api.app import make_app
from api.routes import etcd_v3
from api.routes.common import ApiLimits
from tests.api.conftest import node_config, started_server
from tests.api.fakes import FakeCPExtrasService

# The captures sit in shared/ beside the checkout; CAPKV_ETCD_CAPTURES points elsewhere.
CAPTURES = Path(os.environ.get("CAPKV_ETCD_CAPTURES")
                or Path(__file__).resolve().parents[3] / "shared" / "etcd-v3-captures")

GOLDEN_LIMITS = ApiLimits(max_value_bytes=1024 * 1024, timeout_grace_seconds=0.05)
INT64 = re.compile(r"^-?[0-9]+$")


# --- reading the captures -------------------------------------------------------------------


def capture_files(name: str) -> list[Path]:
    if not CAPTURES.is_dir():
        pytest.skip("the etcd v3 captures (../shared/etcd-v3-captures) are not available here")
    return list(CAPTURES.glob(f"{name}-*.txt"))


class Capture:
    """One request/response pair of a capture file."""

    def __init__(self, name: str, method: str, path: str, body: str | None, status: int, response: list[str]):
        self.name, self.method, self.path, self.body, self.status, self.response = name, method, path, body, status, response

    def json(self):
        assert len(self.response) == 1, self.response
        return json.loads(self.response[0])

    def __repr__(self) -> str:
        return f"Capture({self.name} {self.method} {self.path})"


def load(name: str) -> Capture:
    """Parse `NNN-*.txt` (the curl -i format; 003 is curl -v)."""
    (path,) = capture_files(name)
    lines = [line.rstrip("\r") for line in path.read_text().splitlines()]
    if name == "003":
        return Capture(name, "POST", "/v3/kv/put", '{"key":"Zm9v","value":"YmFy"}', 200, [lines[-1]])
    if not any(line.startswith("$ curl") for line in lines):  # 130-132: "HTTP <status>" then the body
        at = next(i for i, line in enumerate(lines) if line.startswith("HTTP "))
        return Capture(name, "POST", "/v3/kv/put", None, int(lines[at].split()[1]), [lines[at + 1]])
    command = next(line for line in lines if line.startswith("$ curl"))
    method = re.search(r"-X (\w+)", command).group(1)
    url_path = re.search(r"http://[^/]+(/\S*)", command).group(1)
    body = None
    if "--- request body" in lines:
        body = lines[lines.index("--- request body") + 1]
    elif " -d '" in command:
        body = command.split(" -d '", 1)[1].rsplit("'", 1)[0]
    start = lines.index("--- response") + 1
    status = int(lines[start].split()[1])
    blank = lines.index("", start)
    response = []
    for line in lines[blank + 1:]:
        line = line.split("Grpc-Trailer-Content-Type:")[0]
        if line.strip():
            response.append(line)
    return Capture(name, method, url_path, body, status, response)


def normalize(obj, lease_ids: dict[str, str] | None = None):
    """Headers' cluster_id/member_id/raft_term become placeholders; etcd's lease ids ours."""
    lease_ids = lease_ids or {}
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key in ("cluster_id", "member_id", "raft_term"):
                out[key] = "<" + key + ">"
            elif key in ("ID", "lease") and isinstance(value, str):
                out[key] = lease_ids.get(value, value)
            else:
                out[key] = normalize(value, lease_ids)
        return out
    if isinstance(obj, list):
        return [normalize(v, lease_ids) for v in obj]
    return obj


def numbers_out(obj):
    """Every int64 string becomes '#': for comparing shapes where revisions differ."""
    if isinstance(obj, dict):
        return {k: numbers_out(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [numbers_out(v) for v in obj]
    if isinstance(obj, str) and INT64.match(obj):
        return "#"
    return obj


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- fixtures --------------------------------------------------------------------------------


class ManualClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def etcd(aiohttp_client, clock):
    service = FakeCPExtrasService(node_config(), clock=clock)
    app = make_app(service, node_config(max_value_bytes=GOLDEN_LIMITS.max_value_bytes), limits=GOLDEN_LIMITS)
    client = await aiohttp_client(await started_server(app))
    client.service = service
    return client


async def send(client, method: str, path: str, body: str | None, lease_ids: dict[str, str] | None = None):
    """Send a capture's request, with etcd's lease ids in the body replaced by ours."""
    for theirs, ours in (lease_ids or {}).items():
        if body is not None:
            body = body.replace(theirs, ours)
    response = await client.request(method, path, data=body.encode() if body is not None else None)
    return response.status, await response.text()


async def replay(client, capture: Capture, lease_ids: dict[str, str] | None = None) -> None:
    status, text = await send(client, capture.method, capture.path, capture.body, lease_ids)
    assert status == capture.status, (capture, text)
    if not capture.response[0].startswith(("{", "[")):
        assert text.strip() == "\n".join(capture.response).strip(), capture
        return
    ours = [json.loads(line) for line in text.splitlines() if line.strip()]
    theirs = [json.loads(line) for line in capture.response]
    assert normalize(ours, lease_ids) == normalize(theirs, lease_ids), capture


async def put(client, key: str, value: str, lease: str | None = None) -> dict:
    body = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = lease
    status, text = await send(client, "POST", "/v3/kv/put", json.dumps(body))
    assert status == 200, text
    return json.loads(text)


async def grant(client, ttl: int) -> str:
    status, text = await send(client, "POST", "/v3/lease/grant", json.dumps({"TTL": ttl}))
    assert status == 200, text
    return json.loads(text)["ID"]


# --- the kv, txn, lease and compaction run --------------------------------------------------

KV_RUN = ["003", "010", "011", "012", "013", "014", "015", "016", "017"]
RANGE_RUN = ["020", "021", "022", "023", "024", "025", "026", "027", "028", "029", "030", "031", "032", "033",
             "034", "035", "036", "037", "038", "039", "040", "041", "042"]
TXN_RUN = ["050", "051", "052", "053", "054", "055", "056", "057", "058", "059", "060", "061"]


async def test_kv_and_txn_captures_replay_exactly(etcd):
    for name in KV_RUN:
        await replay(etcd, load(name))
    # SETUP: the capture run wrote /dir/k1..k5 (revisions 7-11) and /dir/k1 again (12) unrecorded.
    for key, value in [("/dir/k1", "val5"), ("/dir/k2", "val4"), ("/dir/k3", "val3"), ("/dir/k4", "val2"),
                       ("/dir/k5", "val1"), ("/dir/k1", "val5b")]:  # fmt: skip
        await put(etcd, key, value)
    for name in RANGE_RUN + TXN_RUN:
        await replay(etcd, load(name))
    etcd.service._check()


async def test_lease_and_compaction_captures_replay_exactly(etcd, clock):
    for name in KV_RUN:
        await replay(etcd, load(name))
    for key, value in [("/dir/k1", "val5"), ("/dir/k2", "val4"), ("/dir/k3", "val3"), ("/dir/k4", "val2"),
                       ("/dir/k5", "val1"), ("/dir/k1", "val5b")]:  # fmt: skip
        await put(etcd, key, value)
    for name in RANGE_RUN + TXN_RUN:
        await send(etcd, (c := load(name)).method, c.path, c.body)
    assert etcd.service.revision == 17

    lease_ids: dict[str, str] = {}

    async def grant_as(theirs: str, capture_name: str | None = None, ttl: int = 60):
        if capture_name is not None:
            capture = load(capture_name)
            status, text = await send(etcd, capture.method, capture.path, capture.body)
            assert status == 200
            lease_ids[capture.json()["ID"]] = json.loads(text)["ID"]
        else:
            lease_ids[theirs] = await grant(etcd, ttl)

    await grant_as("", "070")  # -> 7668682516572126765
    await replay(etcd, load("071"))  # explicit ID 1000
    await replay(etcd, load("072"))  # duplicate: 412 lease already exists
    await grant_as("", "073")  # TTL as a string
    await grant_as("7668682516572126767")  # SETUP: granted unrecorded in the capture run
    for name in ["074", "075", "076"]:
        await replay(etcd, load(name), lease_ids)
    clock.now += 0.5  # etcd reported 59 of 60 s left
    await replay(etcd, load("077"), lease_ids)
    for name in ["078", "079"]:  # the keys come in any order (etcd's is a map's)
        status, text = await send(etcd, "POST", load(name).path, load(name).body, lease_ids)
        ours, theirs = json.loads(text), load(name).json()
        assert status == 200 and sorted(ours.pop("keys")) == sorted(theirs.pop("keys"))
        assert normalize(ours, lease_ids) == normalize(theirs, lease_ids)
    await replay(etcd, load("080"), lease_ids)
    for name in ["081", "082", "083"]:
        await replay(etcd, load(name), lease_ids)
    for name in ["084", "085"]:  # the same leases, in any order
        status, text = await send(etcd, "POST", load(name).path, "{}")
        ours = normalize(json.loads(text), lease_ids)
        theirs = normalize(load(name).json(), lease_ids)
        assert sorted(l["ID"] for l in ours.pop("leases")) == sorted(l["ID"] for l in theirs.pop("leases"))
        assert ours == theirs
    for name in ["086", "087", "088", "089", "090"]:
        await replay(etcd, load(name), lease_ids)
    # SETUP: a 2 s lease with one key (revision 21) that expired (revision 22), unrecorded.
    await grant_as("7668682516572126781", ttl=2)
    await put(etcd, "ephemeral", "gone soon", lease=lease_ids["7668682516572126781"])
    clock.now += 3
    assert etcd.service.expire_leases() == [int(lease_ids["7668682516572126781"])]
    for name in ["091", "092"]:
        await replay(etcd, load(name), lease_ids)
    capture = load("093")  # a TTL of 9e9 s is granted as etcd 3.4 does
    status, text = await send(etcd, capture.method, capture.path, capture.body)
    lease_ids[capture.json()["ID"]] = json.loads(text)["ID"]
    assert status == 200 and normalize(json.loads(text), lease_ids) == normalize(capture.json(), lease_ids)
    # SETUP: the v3lock lock/unlock of 110/111 wrote revisions 23 and 24.
    await put(etcd, "mylock/x", "held")
    await send(etcd, "POST", "/v3/kv/deleterange", json.dumps({"key": b64("mylock/x")}))
    for name in ["120", "121", "122", "123", "124"]:
        await replay(etcd, load(name), lease_ids)
    etcd.service._check()


async def test_maintenance_status_and_member_list_have_etcds_fields(etcd):
    await put(etcd, "a", "1")
    status, text = await send(etcd, "POST", "/v3/maintenance/status", "{}")
    ours, theirs = json.loads(text), load("100").json()
    assert status == 200
    # dbSize/dbSizeInUse are left out when this node cannot tell (the fake has no disk)
    assert set(ours) == set(theirs) - {"dbSize", "dbSizeInUse"}
    assert numbers_out(normalize(ours))["header"] == numbers_out(normalize(theirs))["header"]
    assert ours["version"] == theirs["version"] and ours["leader"] == ours["header"]["member_id"]
    status, text = await send(etcd, "POST", "/v3/cluster/member/list", "{}")
    ours, theirs = json.loads(text), load("101").json()
    assert status == 200 and set(ours["header"]) == set(theirs["header"]) and "revision" not in ours["header"]
    assert len(ours["members"]) == 3 and all(set(m) == set(theirs["members"][0]) for m in ours["members"])
    assert [m["clientURLs"] for m in ours["members"]] == [["http://127.0.0.1:2379"], ["http://127.0.0.1:22379"],
                                                          ["http://127.0.0.1:32379"]]  # fmt: skip
    assert ours["header"]["member_id"] == ours["members"][0]["ID"]


async def test_request_too_large_is_etcds_error(etcd):
    capture = load("132")
    value = base64.b64encode(b"x" * 1638400).decode()
    status, text = await send(etcd, "POST", "/v3/kv/put", json.dumps({"key": b64("big"), "value": value}))
    assert (status, json.loads(text)) == (capture.status, json.loads(capture.response[0]))
    status, text = await send(etcd, "POST", "/v3/kv/put", json.dumps({"key": b64("big"), "value": base64.b64encode(b"y" * 1048576).decode()}))
    assert status == 200, text
    assert etcd.service.store[b"big"].value == b"y" * 1048576


async def test_v3beta_serves_and_v3alpha_is_404_like_etcd(etcd):
    for name in ("016", "017"):
        capture = load(name)
        status, text = await send(etcd, capture.method, capture.path, capture.body)
        assert status == capture.status
        if status == 200:
            assert numbers_out(normalize(json.loads(text))) == numbers_out(normalize(capture.json()))
        else:
            assert text.strip() == capture.response[0].strip()


async def test_gateway_in_ap_mode_is_unimplemented_in_etcds_shape(aiohttp_client):
    from tests.api.fakes import FakeAPService

    client = await aiohttp_client(await started_server(make_app(FakeAPService(node_config()), node_config())))
    r = await client.post("/v3/kv/range", data=json.dumps({"key": b64("a")}))
    body = await r.json()
    assert r.status == 501 and body["code"] == 12 and "cp mode" in body["error"] and body["error"] == body["message"]


async def test_service_without_extras_answers_unimplemented(aiohttp_client):
    from tests.api.fakes import FakeCPService

    client = await aiohttp_client(await started_server(make_app(FakeCPService(node_config()), node_config())))
    r = await client.post("/v3/kv/txn", data="{}")
    assert r.status == 501 and (await r.json())["code"] == 12
    r = await client.post("/v3/kv/put", data=json.dumps({"key": b64("a"), "value": b64("1")}))
    assert r.status == 200  # the core still works


# --- watch ------------------------------------------------------------------------------------


async def read_message(response) -> dict:
    """One HTTP chunk, which must be exactly one JSON document and a newline (etcd3gw
    parses chunk by chunk: 210-etcd3gw-watch-framing-probe-results.txt)."""
    data = b""
    while True:
        chunk, end_of_chunk = await asyncio.wait_for(response.content.readchunk(), 5)
        data += chunk
        if end_of_chunk or not chunk:
            break
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return json.loads(data)


def watch_capture_messages(name: str) -> list[dict]:
    (path,) = capture_files(name)
    text = path.read_text()
    block = text.split("--- decoded JSON messages from etcd (one per line as they appear in the stream)\n", 1)[1]
    return [json.loads(line) for line in block.split("\n--- note")[0].splitlines() if line.startswith("{")]


def same_shape(ours: list[dict], theirs: list[dict]) -> None:
    assert [numbers_out(normalize(m)) for m in ours] == [numbers_out(normalize(m)) for m in theirs]


async def open_watch(etcd, *requests: dict):
    body = "".join(json.dumps(r) for r in requests)
    response = await etcd.post("/v3/watch", data=body)
    assert response.status == 200 and response.headers["Content-Type"] == "application/json"
    return response


async def test_watch_key_with_prev_kv_put_put_delete(etcd):
    await put(etcd, "/w/key", "after-cancel")
    response = await open_watch(etcd, {"create_request": {"key": b64("/w/key"), "prev_kv": True}})
    ours = [await read_message(response)]
    await put(etcd, "/w/key", "v1")
    await put(etcd, "/w/key", "v2")
    await send(etcd, "POST", "/v3/kv/deleterange", json.dumps({"key": b64("/w/key")}))
    ours += [await read_message(response) for _ in range(3)]
    same_shape(ours, watch_capture_messages("200")[:4])
    response.close()


async def test_watch_prefix_replay_from_start_revision_and_a_txn_in_one_message(etcd):
    await put(etcd, "/wp/b", "x")  # created earlier than the replay starts
    await put(etcd, "/wp/c", "y")
    start = (await put(etcd, "/wp/a", "1"))["header"]["revision"]
    await put(etcd, "/wp/b", "2")
    response = await open_watch(etcd, {"create_request": {"key": b64("/wp/"), "range_end": b64("/wp0"),
                                                          "start_revision": int(start)}})  # fmt: skip
    ours = [await read_message(response), await read_message(response)]
    txn = {"success": [{"request_put": {"key": b64("/wp/c"), "value": b64("3")}},
                       {"request_delete_range": {"key": b64("/wp/a")}}]}  # fmt: skip
    await put(etcd, "/wq", "outside")
    await send(etcd, "POST", "/v3/kv/txn", json.dumps(txn))
    ours.append(await read_message(response))
    same_shape(ours, watch_capture_messages("201"))
    response.close()


async def test_watch_from_a_compacted_revision_is_created_then_canceled(etcd):
    for i in range(4):
        await put(etcd, "foo", str(i))
    await send(etcd, "POST", "/v3/kv/compaction", json.dumps({"revision": 4}))
    response = await open_watch(etcd, {"create_request": {"key": b64("foo"), "start_revision": 2}})
    ours = [await read_message(response), await read_message(response)]
    same_shape(ours, watch_capture_messages("202"))
    assert ours[1]["result"]["compact_revision"] == "4" and "revision" not in ours[1]["result"]["header"]


async def test_watch_progress_notify_sends_header_only_messages(etcd, monkeypatch):
    monkeypatch.setattr(etcd_v3, "PROGRESS_NOTIFY_SECONDS", 0.1)
    response = await open_watch(etcd, {"create_request": {"key": b64("/quiet"), "progress_notify": True}})
    ours = [await read_message(response) for _ in range(3)]
    same_shape(ours, watch_capture_messages("203"))


async def test_watch_filters_explicit_id_and_two_watchers_on_one_stream(etcd):
    response = await open_watch(etcd,
                                {"create_request": {"key": b64("/f/"), "range_end": b64("/f0"), "filters": ["NOPUT"], "watch_id": 7}},
                                {"create_request": {"key": b64("/f/x")}})  # fmt: skip
    ours = [await read_message(response), await read_message(response)]
    await put(etcd, "/f/x", "1")
    ours.append(await read_message(response))
    await send(etcd, "POST", "/v3/kv/deleterange", json.dumps({"key": b64("/f/x")}))
    ours += sorted([await read_message(response), await read_message(response)], key=lambda m: "watch_id" not in m["result"])
    same_shape(ours, watch_capture_messages("204"))


async def test_watch_sees_lease_expiry_as_a_delete_with_prev_kv(etcd, clock):
    lease = await grant(etcd, 2)
    await put(etcd, "/lease/k", "v", lease=lease)
    response = await open_watch(etcd, {"create_request": {"key": b64("/lease/k"), "prev_kv": True}})
    ours = [await read_message(response)]
    clock.now += 3
    etcd.service.expire_leases()
    ours.append(await read_message(response))
    same_shape(ours, watch_capture_messages("205"))


async def test_watch_duplicate_id_progress_request_and_cancel(etcd):
    response = await open_watch(etcd, {"create_request": {"key": b64("/d"), "watch_id": 5}},
                                {"create_request": {"key": b64("/d2"), "watch_id": 5}}, {"progress_request": {}},
                                {"cancel_request": {"watch_id": 5}})  # fmt: skip
    ours = [await read_message(response) for _ in range(4)]
    same_shape(ours, watch_capture_messages("206"))


async def test_watch_bad_json_is_etcds_500(etcd):
    r = await etcd.post("/v3/watch", data="{bad json")
    assert r.status == 500
    assert await r.json() == {"error": "invalid character 'b' looking for beginning of object key string",
                              "message": "invalid character 'b' looking for beginning of object key string", "code": 2}  # fmt: skip


async def test_watch_with_an_empty_range_is_refused_as_etcd_does(etcd):
    # etcd3gw's watch_prefix_once double-encodes range_end (220-etcd3gw-wire-trace.txt)
    response = await open_watch(etcd, {"create_request": {"key": b64("trace/p/"), "range_end": b64(b64("trace/p0"))}})
    message = await read_message(response)
    assert normalize(message)["result"] == {"header": normalize(message)["result"]["header"], "watch_id": "-1",
                                            "created": True, "canceled": True, "cancel_reason": "mvcc: watcher range is empty"}  # fmt: skip


async def test_watch_is_freed_when_the_client_disconnects(etcd):
    response = await open_watch(etcd, {"create_request": {"key": b64("/gone")}})
    await read_message(response)
    assert len(etcd.service.watchers) == 1
    response.close()
    for _ in range(40):
        if not etcd.service.watchers:
            break
        await asyncio.sleep(0.1)
    assert not etcd.service.watchers


# --- the real etcd3gw client against the gateway (over the in-memory service) -------------------


@pytest.fixture
def etcd3gw_client(threaded_servers):
    etcd3gw = pytest.importorskip("etcd3gw")
    service = FakeCPExtrasService(node_config())
    server = threaded_servers(service)
    client = etcd3gw.client(host="127.0.0.1", port=server.port, timeout=10)
    client.service = service
    return client


def test_etcd3gw_kv_txn_and_status(etcd3gw_client):
    c = etcd3gw_client
    assert c.put("trace/a", "1") and c.put("trace/b", "2")
    assert c.get("trace/a") == [b"1"] and c.get("nope") == []
    value, meta = c.get("trace/a", metadata=True)[0]
    assert value == b"1" and meta["key"] == b"trace/a" and meta["version"] == "1"
    assert [v for v, _ in c.get_prefix("trace/", sort_order="descend", sort_target="mod")] == [b"2", b"1"]
    assert c.get("trace/", range_end="trace0", limit=1, keys_only=True, serializable=True) == [b""]
    assert sorted(m["key"] for _, m in c.get_all()) == [b"trace/a", b"trace/b"]
    assert c.create("trace/c", "3") is True and c.create("trace/c", "3") is False
    assert c.replace("trace/c", "3", "4") is True and c.replace("trace/c", "3", "5") is False
    assert c.delete("trace/c") is True and c.delete("trace/c") is False
    assert c.delete_prefix("trace/") is True and c.get_all() == []
    result = c.transaction({"compare": [], "success": [{"request_put": {"key": b64("t"), "value": b64("v")}}]})
    assert result["succeeded"] is True and result["responses"][0]["response_put"]["header"]["revision"]
    status = c.status()
    assert status["version"] == "3.4.23" and status["leader"] == status["header"]["member_id"]
    assert [m["name"] for m in c.members()] == ["n1", "n2", "n3"]


def test_etcd3gw_leases_and_lock(etcd3gw_client):
    c = etcd3gw_client
    lease = c.lease(ttl=30)
    assert c.put("trace/l", "x", lease=lease)
    assert lease.ttl() in (29, 30) and lease.keys() == [b"trace/l"] and lease.refresh() == 30
    assert lease.revoke() is True and c.get("trace/l") == []
    assert lease.refresh() == -1 and lease.ttl() == -1
    first, second = c.lock("trace-lock", ttl=30), c.lock("trace-lock", ttl=30)
    assert first.acquire() is True and first.is_acquired()
    assert second.acquire() is False and not second.is_acquired()
    assert first.refresh() == 30
    assert first.release() is True and first.release() is False
    assert second.acquire() is True and second.release() is True


def test_etcd3gw_watch_and_watch_prefix_with_cancel(etcd3gw_client):
    import time as _time

    c = etcd3gw_client
    # from the next revision: the events replay even if the watch registers after the puts
    start = int(c.status()["header"]["revision"]) + 1
    events, cancel = c.watch("trace/w", prev_kv=True, start_revision=start)
    c.put("trace/w", "w1")
    c.delete("trace/w")
    got = [next(events), next(events)]
    assert got[0]["kv"]["key"] == b"trace/w" and got[0]["kv"]["value"] == b"w1"
    assert got[1]["type"] == "DELETE" and got[1]["prev_kv"]["value"] == b64("w1")
    cancel()
    events, cancel = c.watch_prefix("trace/p/", start_revision=int(c.status()["header"]["revision"]) + 1)
    c.put("trace/p/1", "a")
    c.put("trace/q", "outside")
    c.put("trace/p/2", "b")
    assert [next(events)["kv"]["key"], next(events)["kv"]["key"]] == [b"trace/p/1", b"trace/p/2"]
    cancel()
    for _ in range(50):  # the canceled watches are freed on the server
        if not c.service.watchers:
            break
        _time.sleep(0.1)
    assert not c.service.watchers


async def test_health_answers_as_etcd_does(etcd):
    capture = load("001")
    r = await etcd.get("/health")
    assert r.status == capture.status and (await r.text()) == capture.response[0]
    assert r.headers["Content-Type"].startswith("text/plain")
    etcd.service.unavailable = "no leader"
    r = await etcd.get("/health")
    assert r.status == 503 and json.loads(await r.text()) == {"health": "false"}


@pytest.mark.parametrize("error,op,expected", [
    ("Compacted('x', compact_revision=3)", "", (400, 11, "etcdserver: mvcc: required revision has been compacted")),
    ("InvalidRequest('revision 9 is in the future', code='invalid_revision')", "", (400, 11, "etcdserver: mvcc: required revision is a future revision")),
    ("NotFound('no lease', code='lease_not_found')", "", (404, 5, "etcdserver: requested lease not found")),
    ("PreconditionFailed('lease 5 already exists')", "lease_grant", (412, 9, "etcdserver: lease already exists")),
    ("InvalidRequest('duplicate key given in txn request', code='invalid_txn')", "", (400, 3, "etcdserver: duplicate key given in txn request")),
    ("ValueTooLarge('too big')", "", (400, 3, "etcdserver: request is too large")),
    ("Unavailable('no leader elected')", "", (503, 14, "etcdserver: no leader")),
    ("Unavailable('no quorum')", "", (503, 14, "etcdserver: request timed out")),
    ("OutcomeUnknown('maybe')", "", (500, 2, "context deadline exceeded")),
])  # fmt: skip
def test_service_errors_become_etcds_errors(error, op, expected):
    from api import etcd_wire
    from api.service import Compacted, InvalidRequest, NotFound, OutcomeUnknown, PreconditionFailed, Unavailable, ValueTooLarge  # noqa: F401

    mapped = etcd_wire.from_service_error(eval(error), op=op)
    assert (mapped.status, mapped.code, mapped.message) == expected
    assert mapped.body() == {"error": expected[2], "message": expected[2], "code": expected[1]}


async def post_json(client, path: str, body: dict) -> dict:
    status, text = await send(client, "POST", path, json.dumps(body))
    assert status == 200, text
    return json.loads(text)


async def test_put_with_ignore_value_and_ignore_lease_keeps_what_is_stored(etcd):
    lease = await grant(etcd, 60)
    await put(etcd, "keep", "original", lease=lease)
    await post_json(etcd, "/v3/kv/put", {"key": b64("keep"), "ignore_value": True, "ignore_lease": True})
    kv = (await post_json(etcd, "/v3/kv/range", {"key": b64("keep")}))["kvs"][0]
    assert (kv["value"], kv["lease"], kv["version"]) == (b64("original"), lease, "2")
    await post_json(etcd, "/v3/kv/put", {"key": b64("keep"), "value": b64("new"), "ignore_lease": True})
    kv = (await post_json(etcd, "/v3/kv/range", {"key": b64("keep")}))["kvs"][0]
    assert (kv["value"], kv["lease"]) == (b64("new"), lease)
    status, text = await send(etcd, "POST", "/v3/kv/put", json.dumps({"key": b64("keep"), "value": b64("x"), "ignore_value": True}))
    assert status == 400 and json.loads(text)["error"] == "etcdserver: value is provided"


async def test_range_sorts_and_filters_as_etcd_does(etcd):
    await put(etcd, "s/b", "3")  # rev 2
    await put(etcd, "s/a", "1")  # rev 3
    await put(etcd, "s/c", "2")  # rev 4
    await put(etcd, "s/a", "9")  # rev 5: s/a version 2
    base = {"key": b64("s/"), "range_end": b64("s0"), "keys_only": True}

    async def keys(**extra):
        body = await post_json(etcd, "/v3/kv/range", {**base, **extra})
        return [base64.b64decode(kv["key"]).decode() for kv in body.get("kvs", [])], body

    assert (await keys(sort_target="VERSION", sort_order="DESCEND"))[0][0] == "s/a"
    assert (await keys(sort_target="CREATE"))[0] == ["s/b", "s/a", "s/c"]  # a target alone sorts ascending
    assert (await keys(sort_target="VALUE", sort_order="ASCEND", keys_only=False))[0] == ["s/c", "s/b", "s/a"]
    assert (await keys(sort_order="DESCEND"))[0] == ["s/c", "s/b", "s/a"]
    assert (await keys(min_create_revision=3, max_create_revision=3))[0] == ["s/a"]
    found, body = await keys(max_mod_revision=4, limit=1)
    assert found == ["s/b"] and body["more"] is True and body["count"] == "3"
    body = await post_json(etcd, "/v3/kv/range", {**base, "count_only": True})
    assert "kvs" not in body and body["count"] == "3"


async def test_txn_not_equal_and_lease_compares(etcd):
    await put(etcd, "t", "v")
    body = {"compare": [{"key": b64("t"), "result": "NOT_EQUAL", "target": "VALUE", "value": b64("w")},
                        {"key": b64("t"), "result": 3, "target": "LEASE", "lease": 5}],
            "success": [{"request_put": {"key": b64("t2"), "value": b64("x"), "prev_kv": True}}]}  # fmt: skip
    result = await post_json(etcd, "/v3/kv/txn", body)
    assert result["succeeded"] is True and result["responses"] == [{"response_put": {"header": {"revision": result["header"]["revision"]}}}]
