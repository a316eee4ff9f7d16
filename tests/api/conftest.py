"""Fixtures for the HTTP layer's tests: the app over the in-memory fakes (tests/api/fakes.py)."""
from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from api.app import make_app, server_kwargs
from api.routes.common import ApiLimits
from api.service import Member, NodeConfig
from tests.api.fakes import FakeAPService, FakeCPService

MEMBERS = (
    Member("n1", "http://127.0.0.1:2379", "127.0.0.1:2380"),
    Member("n2", "http://127.0.0.1:22379", "127.0.0.1:22380"),
    Member("n3", "http://127.0.0.1:32379", "127.0.0.1:32380"),
)
# Small limits so the tests can cross them cheaply; a short grace so timeouts are quick.
LIMITS = ApiLimits(max_value_bytes=1000, max_range_limit=50, timeout_grace_seconds=0.05)


def node_config(**overrides) -> NodeConfig:
    values = dict(node_id="n1", members=MEMBERS, secret="s" * 32, data_dir="/nonexistent", max_value_bytes=1000)
    values.update(overrides)
    return NodeConfig(**values)


async def started_server(app) -> TestServer:
    """A TestServer with the production server settings (aiohttp's TestServer ignores
    its constructor kwargs: they must go to start_server)."""
    server = TestServer(app)
    await server.start_server(**server_kwargs(LIMITS))
    return server


@pytest.fixture
def cp_service() -> FakeCPService:
    return FakeCPService(node_config())


@pytest.fixture
def ap_service() -> FakeAPService:
    return FakeAPService(node_config())


@pytest.fixture
async def cp(aiohttp_client, cp_service):
    """A test client of the app over a fake CPService (`cp.service` is the fake)."""
    client = await aiohttp_client(await started_server(make_app(cp_service, node_config(), limits=LIMITS)))
    client.service = cp_service
    return client


@pytest.fixture
async def ap(aiohttp_client, ap_service):
    client = await aiohttp_client(await started_server(make_app(ap_service, node_config(), limits=LIMITS)))
    client.service = ap_service
    return client


class ThreadedServer:
    """The app served on a real loopback port from a background thread, for the blocking
    client (which cannot run inside the test's event loop)."""

    def __init__(self, service, port: int = 0):
        self.service = service
        self.port = port
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ThreadedServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(make_app(self.service, node_config(), limits=LIMITS), access_log=None,
                               **server_kwargs(LIMITS))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def threaded_servers():
    """Factory: start(service) -> ThreadedServer; all are stopped at teardown."""
    servers: list[ThreadedServer] = []

    def start(service) -> ThreadedServer:
        server = ThreadedServer(service).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
