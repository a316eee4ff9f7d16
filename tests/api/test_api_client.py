"""The Python clients against real loopback servers: results, typed errors, failover."""
from __future__ import annotations

import time

import pytest

from api.client import (
    ANSWERED,
    LOST,
    REFUSED,
    APEntry,
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidRequest,
    OutcomeUnknown,
    PreconditionFailed,
    Unavailable,
    ValueTooLarge,
    key_path,
    retry_decision,
)
from api.service import OutcomeUnknown as ServiceOutcomeUnknown
from clusters.spec import free_ports
from tests.api.conftest import node_config
from tests.api.fakes import FakeAPService, FakeCPService


class AppliedButUnknown:
    """Delegates to a shared fake, but every put answers 504 after applying: a leader that
    committed the write and then lost its lease before it could say so."""

    mode = "cp"

    def __init__(self, inner: FakeCPService):
        self.inner = inner
        self.node_id = "n1"
        self.request_ids: list[str | None] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def put(self, key, value, **kwargs):
        self.request_ids.append(kwargs.get("request_id"))
        await self.inner.put(key, value, **kwargs)
        raise ServiceOutcomeUnknown("leader changed before the write was acknowledged")


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def test_retry_decision_table():
    # (outcome, status, write, has_request_id) -> retry?
    table = [
        (REFUSED, 0, True, False, True),
        (LOST, 0, False, False, True),
        (LOST, 0, True, False, False),
        (LOST, 0, True, True, True),
        (ANSWERED, 503, True, False, True),
        (ANSWERED, 504, True, False, False),
        (ANSWERED, 504, True, True, True),
        (ANSWERED, 504, False, False, True),
        (ANSWERED, 400, False, False, False),
        (ANSWERED, 404, False, False, False),
        (ANSWERED, 412, True, True, False),
        (ANSWERED, 500, False, False, False),
    ]
    for outcome, status, write, has_id, expected in table:
        assert retry_decision(outcome, status, write=write, has_request_id=has_id) is expected, (outcome, status, write, has_id)


def test_key_path_escapes_everything_that_could_be_rewritten():
    assert key_path("a/b c") == "/v1/kv/a%2Fb%20c"
    assert key_path("x/../y") == "/v1/kv/x%2F..%2Fy"
    assert key_path(b"caf\xc3\xa9") == "/v1/kv/caf%C3%A9"


def test_cp_round_trip_and_typed_errors(threaded_servers):
    server = threaded_servers(FakeCPService(node_config()))
    client = Client([server.url])
    created = client.put("dir/../odd key", b"\x00\xffbinary")
    assert created["created"] is True
    entry = client.get("dir/../odd key")
    assert entry.value == b"\x00\xffbinary" and entry.key == b"dir/../odd key"
    assert entry.mod_revision == created["revision"] and entry.version == 1
    assert client.get("absent") is None
    with pytest.raises(PreconditionFailed) as excinfo:
        client.put("dir/../odd key", "v", if_mod_revision=0)
    assert excinfo.value.details["mod_revision"] == created["revision"]
    with pytest.raises(ValueTooLarge):
        client.put("big", b"x" * 5000)
    with pytest.raises(InvalidRequest) as excinfo:
        client.request("GET", "/v1/kv/k", query={"consistency": "bogus"})
    assert excinfo.value.code == "invalid_consistency"
    for i in range(5):
        client.put(f"p/{i}", str(i))
    page = client.range("p/", limit=2)
    assert [e.key for e in page["items"]] == [b"p/0", b"p/1"] and page["more"] is True
    assert client.delete("p/", prefix=True)["deleted"] == 5
    assert client.cluster()["mode"] == "cp"


def test_ap_siblings_and_context_round_trip(threaded_servers):
    server = threaded_servers(FakeAPService(node_config()))
    client = Client(server.url)
    client.put("cart", b"a")
    client.put("cart", b"b")
    found = client.get_ap("cart")
    assert isinstance(found, APEntry) and sorted(found.siblings) == [b"a", b"b"] and found.value is None
    client.put("cart", b"a+b", context=found.context)
    assert client.get_ap("cart").siblings == [b"a+b"]
    client.delete("cart", context=client.get_ap("cart").context)
    gone = client.get_ap("cart")
    assert gone.siblings == [] and gone.context


def test_fails_over_past_a_dead_endpoint_and_remembers_the_live_one(threaded_servers):
    server = threaded_servers(FakeCPService(node_config()))
    client = Client([dead_endpoint(), server.url])
    client.put("k", "v")
    assert client.endpoints[client._preferred] == server.url
    assert client.get("k").value == b"v"


def test_fails_over_on_503(threaded_servers):
    sick = FakeCPService(node_config())
    sick.unavailable = "no quorum"
    healthy = FakeCPService(node_config())
    a, b = threaded_servers(sick), threaded_servers(healthy)
    client = Client([a.url, b.url])
    client.put("k", "v")
    assert healthy.store[b"k"].value == b"v" and sick.store == {}


def test_a_504_write_is_retried_elsewhere_with_the_same_request_id_and_applies_once(threaded_servers):
    shared = FakeCPService(node_config())
    flaky = AppliedButUnknown(shared)
    a, b = threaded_servers(flaky), threaded_servers(shared)
    client = Client([a.url, b.url])
    result = client.put("counter", "1")
    assert flaky.request_ids and flaky.request_ids[0] is not None
    assert shared.store[b"counter"].version == 1  # applied once, not twice
    assert result["revision"] == shared.store[b"counter"].mod_revision


def test_a_504_write_without_request_id_is_not_retried(threaded_servers):
    shared = FakeCPService(node_config())
    flaky = AppliedButUnknown(shared)
    other = FakeCPService(node_config())
    a, b = threaded_servers(flaky), threaded_servers(other)
    client = Client([a.url, b.url])
    with pytest.raises(OutcomeUnknown):
        client.put("k", "v", request_id=False)
    assert flaky.request_ids == [None]
    assert other.calls == 0  # never sent anywhere else


def test_a_412_is_not_retried(threaded_servers):
    first, second = FakeCPService(node_config()), FakeCPService(node_config())
    a, b = threaded_servers(first), threaded_servers(second)
    client = Client([a.url, b.url])
    client.put("k", "v")
    with pytest.raises(PreconditionFailed):
        client.put("k", "w", if_mod_revision=0)
    assert second.calls == 0


def test_all_endpoints_down_fails_fast_with_connection_failed():
    client = Client([dead_endpoint(), dead_endpoint()], max_attempts=4)
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as excinfo:
        client.get("k")
    assert isinstance(excinfo.value, Unavailable)
    assert time.monotonic() - started < 2.0


def test_client_refuses_bad_endpoints():
    for bad in ([], ["ftp://x:1"], ["127.0.0.1:2379"]):
        with pytest.raises(ValueError):
            Client(bad)


async def test_async_client_round_trip_and_failover(threaded_servers):
    sick = FakeCPService(node_config())
    sick.unavailable = "electing"
    healthy = FakeCPService(node_config())
    a, b = threaded_servers(sick), threaded_servers(healthy)
    async with AsyncClient([dead_endpoint(), a.url, b.url]) as client:
        written = await client.put("a/b", b"\xfe")
        entry = await client.get("a/b")
        assert entry.value == b"\xfe" and entry.mod_revision == written["revision"]
        assert await client.get("missing") is None
        with pytest.raises(PreconditionFailed):
            await client.put("a/b", "x", if_mod_revision=0)
        page = await client.range("a/")
        assert [e.key for e in page["items"]] == [b"a/b"]
    assert sick.store == {}


async def test_async_client_504_retry_applies_once(threaded_servers):
    shared = FakeCPService(node_config())
    flaky = AppliedButUnknown(shared)
    a, b = threaded_servers(flaky), threaded_servers(shared)
    async with AsyncClient([a.url, b.url]) as client:
        await client.put("once", "v")
    async with AsyncClient([a.url, b.url]) as client:  # fresh: starts at the flaky one again
        with pytest.raises(OutcomeUnknown):
            await client.put("twice", "v", request_id=False)
    assert shared.store[b"once"].version == 1
    assert flaky.request_ids[-1] is None and shared.store[b"twice"].version == 1


def test_members_through_the_client(threaded_servers):
    service = FakeAPService(node_config())
    client = Client(threaded_servers(service).url)
    client.add_member("n4", "http://127.0.0.1:42379", "127.0.0.1:42380")
    assert [m.id for m in service.members][-1] == "n4"
    client.remove_member("n4")
    assert "n4" not in [m.id for m in service.members]
    assert client.preflist("k")["key"] == "k"


def test_kept_alive_connection_survives_a_server_restart(threaded_servers):
    from tests.api.conftest import ThreadedServer

    service = FakeCPService(node_config())
    first = threaded_servers(service)
    with Client([first.url], max_attempts=1) as client:
        client.put("k", "v")
        assert client.get("k").value == b"v"
        assert first.url in client._pool()  # kept alive
        port = first.port
        first.stop()
        second = ThreadedServer(service, port=port).start()  # same address, the old connection is dead
        try:
            assert client.get("k").value == b"v"  # one attempt allowed: the stale connection was replaced
            client.put("k", "w", request_id=False)  # a write without request_id never reuses a connection
            assert service.store[b"k"].value == b"w"
        finally:
            second.stop()
