"""Node-to-node RPC: the `Transport` seam, its HTTP implementation, and the peer server.

A call is `await transport.call(node, method, payload, timeout)` with a JSON-able dict
(bytes go as base64 via `b64`/`unb64`), returning the reply dict. It raises
`PeerUnreachable` when the node could not be asked or did not answer in time (the caller
marks it failed and may use a fallback) and `RemoteError(code, message)` when the node
answered with a refusal (e.g. `too_many_siblings`, `hints_full`). The simulator
(`tests/sim/`) has an in-memory twin with the same contract.

Nodes talk over the framed wire of `framed.py` (`StreamTransport`: one persistent,
authenticated connection per peer, many calls in flight on it). `PeerServer` serves it
and, on the same port, the HTTP wire below (for tools, tests and `HttpTransport`); a
connection's first bytes say which.

HTTP wire: `POST http://<peer_address>/peer/<method>`, JSON body, header
`X-Capkv-Peer-Auth: <hex HMAC-SHA256(secret, method + "\\n" + body)>`. The server refuses a
request without the header (401) or with a wrong one (403) before parsing it; replies
carry the same header over `"reply\\n" + body`, so a node also knows the answer came from
a member. (No replay protection: peer traffic is expected on a private network.)

    server = PeerServer("127.0.0.1", 2380, "s3cret", handler)   # handler(method, payload) -> dict
    await server.start()
    transport = StreamTransport({"n1": "127.0.0.1:2380"}, "s3cret")   # framed.py; or HttpTransport
    await transport.call("n1", "ping", {}, timeout=1.0)
"""
from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
from typing import Awaitable, Callable, Mapping, Protocol

import aiohttp
from aiohttp import web

AUTH_HEADER = "X-Capkv-Peer-Auth"
# A peer message holds at most one object (values are capped at max_value_bytes, 1 MiB by
# default) or one scan page (capped at 32 MiB by ReplicaLimits); base64 adds a third.
MAX_PEER_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CONNECTIONS_PER_PEER = 32


class PeerUnreachable(Exception):
    """The peer was not asked or did not answer (refused, timed out, bad reply)."""


class RemoteError(Exception):
    """The peer answered and refused the request; `code` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


Handler = Callable[[str, dict], Awaitable[dict]]
# Optional: answers the methods it can without waiting for anything (a local read), in
# line; returns None for the others, which go to the `Handler` as a task.
ImmediateHandler = Callable[[str, dict], "dict | None"]


class Transport(Protocol):
    async def call(self, node: str, method: str, payload: dict, timeout: float) -> dict: ...

    async def close(self) -> None: ...

    # Optional: `start_call(node, method, payload, timeout) -> asyncio.Future`, the same call
    # as a future that may need no task (`StreamTransport` sends at once when it can);
    # `start_call` below falls back to `call` in a task.


def start_call(transport: Transport, node: str, method: str, payload: dict, timeout: float) -> asyncio.Future:
    """`transport.call(...)` as a future (the reply dict, or its exception); cancelling it
    abandons the call."""
    fast = getattr(transport, "start_call", None)
    if fast is not None:
        return fast(node, method, payload, timeout)
    return asyncio.ensure_future(transport.call(node, method, payload, timeout))


# binascii directly: what base64.b64encode / b64decode(validate=True) do, without their
# argument coercion (a few calls per peer message).
def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def unb64(text: str) -> bytes:
    """Strict standard base64 (ValueError, binascii.Error among them, when it is not)."""
    return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)


def sign(secret: str, label: str, body: bytes) -> str:
    return hmac.new(secret.encode(), label.encode() + b"\n" + body, hashlib.sha256).hexdigest()


class PeerServer:
    """Serves a node's peer address: the framed wire (`framed.py`, what nodes use) and,
    on the same port, HTTP `POST /peer/<method>` (aiohttp; for tools and `HttpTransport`).
    A connection's first bytes say which: the framed wire opens with `framed.MAGIC`."""

    def __init__(self, host: str, port: int, secret: str, handler: Handler, immediate: ImmediateHandler | None = None):
        if not secret:
            raise ValueError("peer traffic needs a non-empty cluster secret")
        self.host, self.port, self.secret, self.handler = host, port, secret, handler
        self.immediate = immediate
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._framed: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_PEER_MESSAGE_BYTES)
        app.router.add_post("/peer/{method}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        http = self._runner.server
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _FirstBytes(self, http), self.host, self.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            for connection in list(self._framed):
                connection.close()
            self._framed.clear()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        given = request.headers.get(AUTH_HEADER)
        if not given:
            return web.json_response({"error": {"code": "unauthenticated", "message": "peer request without " + AUTH_HEADER}}, status=401)
        body = await request.read()
        if not hmac.compare_digest(given, sign(self.secret, method, body)):
            return web.json_response({"error": {"code": "forbidden", "message": "bad peer signature"}}, status=403)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("payload must be an object")
        except ValueError as exc:
            return self._reply({"error": {"code": "bad_request", "message": str(exc)}}, 400)
        try:
            reply = await self.handler(method, payload)
        except RemoteError as exc:
            return self._reply({"error": {"code": exc.code, "message": exc.message}}, 409)
        return self._reply(reply, 200)

    def _reply(self, obj: dict, status: int) -> web.Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return web.Response(
            body=body, status=status, content_type="application/json", headers={AUTH_HEADER: sign(self.secret, "reply", body)}
        )


class _FirstBytes(asyncio.Protocol):
    """Holds a new connection until its first bytes show its wire, then hands it over."""

    def __init__(self, server: PeerServer, http_factory):
        self.server, self.http_factory = server, http_factory
        self.transport = None
        self.head = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        from .framed import MAGIC, FramedServerProtocol

        self.head += data
        if len(self.head) < len(MAGIC) and MAGIC.startswith(self.head):
            return
        if self.head.startswith(MAGIC):
            protocol = FramedServerProtocol(self.server.secret, self.server.handler, self.server.immediate)
            self.server._framed.add(self.transport)
            protocol.on_lost = self.server._framed.discard
        else:
            protocol = self.http_factory()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(self.head)

    def connection_lost(self, exc) -> None:
        pass


class HttpTransport:
    """Calls peers over HTTP with one pooled client session."""

    def __init__(self, addresses: Mapping[str, str], secret: str):
        self.addresses = dict(addresses)
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit_per_host=MAX_CONNECTIONS_PER_PEER, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def call(self, node: str, method: str, payload: dict, timeout: float) -> dict:
        address = self.addresses.get(node)
        if address is None:
            raise PeerUnreachable(f"no address for node {node!r}")
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {AUTH_HEADER: sign(self.secret, method, body), "Content-Type": "application/json"}
        try:
            async with self._client().post(
                f"http://{address}/peer/{method}", data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=max(timeout, 0.001))
            ) as response:
                raw = await response.read()
                if response.status in (401, 403):
                    raise PeerUnreachable(f"{node} refused our credentials ({response.status}): check the cluster secret")
                if not hmac.compare_digest(response.headers.get(AUTH_HEADER, ""), sign(self.secret, "reply", raw)):
                    raise PeerUnreachable(f"{node} sent an unsigned or badly signed reply")
                reply = json.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise PeerUnreachable(f"{node} ({address}): {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            error = reply.get("error", {}) if isinstance(reply, dict) else {}
            raise RemoteError(error.get("code", "error"), error.get("message", f"status {response.status}"))
        return reply

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
