"""The framed peer wire: many calls multiplexed on one persistent TCP connection per peer.

Why: a peer call over aiohttp HTTP costs a full client request and server request in
Python (headers built and parsed, a task per request, connection pool bookkeeping), and
an ap put makes N-1 of them. Here a call is one length-prefixed frame each way on a
connection that stays open, with many calls in flight on it at once (request ids).
`StreamTransport` keeps the `Transport` contract of transport.py exactly: same payload
dicts (JSON), same `PeerUnreachable` / `RemoteError` meaning. `PeerServer`
(transport.py) serves this wire and HTTP on the same port: it looks at a connection's
first bytes.

Connection (client `c`, server `s`):

    c -> s   MAGIC (4 bytes) + client nonce (16)
    s -> c   MAGIC + server nonce (16)
    both:    session key K = HMAC-SHA256(secret, "capkv-peer-link\\n" + cnonce + snonce)

then frames both ways, each `length (4, big endian) + mac (32) + body (length bytes)`,
where mac = HMAC-SHA256(K, direction + seq (8 bytes) + body); direction is b"q" for
c -> s and b"r" for s -> c, seq counts that direction's frames from 0. So a frame is
authentic (only members know the secret), fresh (the nonces: a recorded connection
cannot be replayed) and in order. Body:

    request:  id (8) + kind 0 + method length (1) + method + JSON payload
    reply:    id (8) + kind 1 + JSON reply          (the handler's dict)
    refusal:  id (8) + kind 2 + JSON {"code", "message"}   (RemoteError at the caller)

A frame with a bad mac makes the server send the 4 bytes `REFUSED` and close: the
caller raises PeerUnreachable saying the secret is wrong, as it did for HTTP 401/403.

Bounds: a frame body is at most `MAX_FRAME_BYTES`; at most `MAX_OUTSTANDING_CALLS`
calls are in flight on one connection (more queue for a slot until their deadline, as
with a connection pool); the socket write buffer is bounded (`WRITE_BUFFER_HIGH`): a
caller waits for it to drain, and the server stops reading requests while its replies
are not being read or while `MAX_CONCURRENT_REQUESTS` are being handled. A lost
connection fails its waiting calls with PeerUnreachable; reconnecting is retried on the
next call after a backoff (`RECONNECT_MIN_S` doubling to `RECONNECT_MAX_S`), and calls
in between fail at once, as they would against a refused port.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import os
import struct
from typing import Mapping

from .transport import MAX_PEER_MESSAGE_BYTES, Handler, ImmediateHandler, PeerUnreachable, RemoteError

MAGIC = b"CKP1"
NONCE_BYTES = 16
MAC_BYTES = 32
REFUSED = b"\xff\xff\xff\xff"
MAX_FRAME_BYTES = MAX_PEER_MESSAGE_BYTES
MAX_OUTSTANDING_CALLS = 1024
MAX_CONCURRENT_REQUESTS = 1024
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 0.5
# Frames sealed during one event-loop iteration leave in one socket write (`_Outbox`), up
# to this many bytes; a larger run is written at once.
MAX_COALESCED_BYTES = 256 * 1024

KIND_REQUEST, KIND_REPLY, KIND_REFUSAL = 0, 1, 2
# Waits here use asyncio.timeout, never wait_for: in Python 3.11 wait_for returns the
# inner result when a cancel arrives just as the inner finishes, swallowing the cancel
# (a node's stop() then hung on a background loop that kept running).
_HEADER = struct.Struct(">I")
_ID = struct.Struct(">Q")
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


def session_key(secret: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.digest(secret.encode(), b"capkv-peer-link\n" + client_nonce + server_nonce, "sha256")


class _SessionMac:
    """HMAC-SHA256 under one fixed key (RFC 2104), the same bytes as
    `hmac.digest(key, message, "sha256")`, at a third of its CPU: the key's inner and outer
    padded blocks are hashed once per connection, and each frame copies those two states.
    (`hmac.digest` with OpenSSL 3 looks the digest up by name and re-keys on every call,
    ~6-13 µs per frame here, and a put or get makes eight frames' macs.)"""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > 64:  # longer keys are hashed first (RFC 2104); ours are 32 bytes
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, *parts: bytes) -> bytes:
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class FrameCodec:
    """Seals outgoing and opens incoming frames of one direction pair (pure, no I/O)."""

    def __init__(self, key: bytes, send_dir: bytes, recv_dir: bytes):
        self.key, self.send_dir, self.recv_dir = key, send_dir, recv_dir
        self._mac = _SessionMac(key)
        self.sent = 0
        self.received = 0
        self._buffer = bytearray()

    def seal(self, body: bytes) -> bytes:
        if len(body) > MAX_FRAME_BYTES:
            raise ValueError(f"peer message of {len(body)} bytes is over the {MAX_FRAME_BYTES}-byte cap")
        mac = self._mac.digest(self.send_dir + _ID.pack(self.sent), body)
        self.sent += 1
        return _HEADER.pack(len(body)) + mac + body

    def feed(self, data: bytes) -> list[bytes]:
        """Bodies of the whole frames now received; raises ValueError on a bad frame."""
        buf = self._buffer
        buf += data
        bodies = []
        offset = 0
        while len(buf) - offset >= 4 + MAC_BYTES:
            (length,) = _HEADER.unpack_from(buf, offset)
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {length} bytes is over the cap")
            end = offset + 4 + MAC_BYTES + length
            if len(buf) < end:
                break
            mac = bytes(buf[offset + 4 : offset + 4 + MAC_BYTES])
            body = bytes(buf[offset + 4 + MAC_BYTES : end])
            expected = self._mac.digest(self.recv_dir + _ID.pack(self.received), body)
            if not hmac.compare_digest(mac, expected):
                raise ValueError("bad frame signature")
            self.received += 1
            bodies.append(body)
            offset = end
        if offset:
            del buf[:offset]
        return bodies


class _Outbox:
    """Frames to one socket, written together at the end of the loop iteration.

    Why: under load a node makes many calls to one peer, and answers many, in the same
    iteration (64 client requests arrive together; a group commit answers all its
    writers at once). `transport.write` on an empty buffer is one send() system call
    each, plus a wakeup and a read at the peer; joined, the iteration's frames cost one.
    Order is kept (the frames' sequence numbers are in their macs). Bounded: a run of
    `MAX_COALESCED_BYTES` is written at once; flow control (pause_writing) still sees
    every byte, only one iteration later."""

    __slots__ = ("loop", "transport", "_frames", "_bytes")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport):
        self.loop, self.transport = loop, transport
        self._frames: list[bytes] = []
        self._bytes = 0

    def put(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._bytes += len(frame)
        if len(self._frames) == 1:
            self.loop.call_soon(self.flush)
        elif self._bytes >= MAX_COALESCED_BYTES:
            self.flush()

    def flush(self) -> None:
        frames = self._frames
        if not frames:
            return
        self._frames, self._bytes = [], 0
        if self.transport.is_closing():
            return
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))


def _reply_body(request_id: bytes, kind: int, obj: dict) -> bytes:
    return request_id + bytes((kind,)) + _DUMPS(obj).encode()


# --- server side ----------------------------------------------------------------------------


class FramedServerProtocol(asyncio.Protocol):
    """One accepted connection that began with MAGIC (see `transport.PeerServer`)."""

    def __init__(self, secret: str, handler: Handler, immediate: ImmediateHandler | None = None):
        self.secret, self.handler, self.immediate = secret, handler, immediate
        self.transport: asyncio.Transport | None = None
        self.codec: FrameCodec | None = None
        self._hello = bytearray()
        self._running: set[asyncio.Task] = set()
        self._reading_paused = False
        self._writing_paused = False
        self._closed = False
        self._outbox: _Outbox | None = None
        self.on_lost = None  # called with the transport when the connection ends

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._outbox = _Outbox(asyncio.get_running_loop(), transport)

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self._hello += data
            if len(self._hello) < len(MAGIC) + NONCE_BYTES:
                return
            if not self._hello.startswith(MAGIC):
                self.transport.close()
                return
            client_nonce = bytes(self._hello[len(MAGIC) : len(MAGIC) + NONCE_BYTES])
            rest = bytes(self._hello[len(MAGIC) + NONCE_BYTES :])
            server_nonce = os.urandom(NONCE_BYTES)
            self.codec = FrameCodec(session_key(self.secret, client_nonce, server_nonce), b"r", b"q")
            self.transport.write(MAGIC + server_nonce)
            if not rest:
                return
            data = rest
        try:
            bodies = self.codec.feed(data)
        except ValueError:
            # Not a member (wrong or no secret) or a corrupted stream: say so, then hang up.
            self.transport.write(REFUSED)
            self.transport.close()
            self._closed = True
            return
        for body in bodies:
            self._start(body)

    def _start(self, body: bytes) -> None:
        request_id = body[:8]
        try:
            if len(body) < 10 or body[8] != KIND_REQUEST:
                raise ValueError("not a request frame")
            method_end = 10 + body[9]
            method = body[10:method_end].decode()
            payload = json.loads(body[method_end:])
            if not isinstance(payload, dict):
                raise ValueError("payload must be an object")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            self._send(_reply_body(request_id, KIND_REFUSAL, {"code": "bad_request", "message": str(exc)}))
            return
        if self.immediate is not None:
            # A request that needs no waiting (a replica read) is answered in line: no task.
            try:
                reply = self.immediate(method, payload)
                if reply is not None:
                    self._send(_reply_body(request_id, KIND_REPLY, reply))
                    return
            except RemoteError as exc:
                self._send(_reply_body(request_id, KIND_REFUSAL, {"code": exc.code, "message": exc.message}))
                return
            except Exception as exc:  # the node answered, with a failure of its own
                self._send(_reply_body(request_id, KIND_REFUSAL, {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}))
                return
        task = asyncio.ensure_future(self._serve(request_id, method, payload))
        self._running.add(task)
        task.add_done_callback(self._done)
        self._update_reading()

    async def _serve(self, request_id: bytes, method: str, payload: dict) -> None:
        try:
            reply = await self.handler(method, payload)
            body = _reply_body(request_id, KIND_REPLY, reply)
        except RemoteError as exc:
            body = _reply_body(request_id, KIND_REFUSAL, {"code": exc.code, "message": exc.message})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the node answered, with a failure of its own
            body = _reply_body(request_id, KIND_REFUSAL, {"code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        self._send(body)

    def _send(self, body: bytes) -> None:
        if self._closed or self.transport.is_closing():
            return
        try:
            frame = self.codec.seal(body)
        except ValueError as exc:  # a reply over the frame cap: refuse instead
            frame = self.codec.seal(_reply_body(body[:8], KIND_REFUSAL, {"code": "too_large", "message": str(exc)}))
        self._outbox.put(frame)

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._update_reading()

    def _update_reading(self) -> None:
        # Back-pressure: no new requests while too many run or our replies are not read.
        want_pause = len(self._running) >= MAX_CONCURRENT_REQUESTS or self._writing_paused
        if self._closed or self.transport.is_closing() or want_pause == self._reading_paused:
            return
        self._reading_paused = want_pause
        if want_pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def connection_lost(self, exc) -> None:
        self._closed = True
        for task in list(self._running):
            task.cancel()
        if self.on_lost is not None:
            self.on_lost(self.transport)


# --- client side ----------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """One connection to one peer, carrying many calls."""

    def __init__(self, peer: str, secret: str, loop: asyncio.AbstractEventLoop):
        self.peer, self.secret, self.loop = peer, secret, loop
        self.transport: asyncio.Transport | None = None
        self.codec: FrameCodec | None = None
        self.ready = loop.create_future()  # set once the handshake is done
        # Calls sent and not yet answered: id -> (future, expiry timer). An entry holds its
        # call's slot until the reply, the expiry or the connection's end (a cancelled
        # future keeps it until then too: the request is out, the peer still answers it).
        self.pending: dict[int, tuple[asyncio.Future, asyncio.TimerHandle]] = {}
        self.next_id = 0
        self._client_nonce = os.urandom(NONCE_BYTES)
        self._hello = bytearray()
        self._drained: asyncio.Future | None = None
        # Calls in flight (at most MAX_OUTSTANDING_CALLS) and those queued for a slot, first
        # come first served; a freed slot passes straight to the first waiter.
        self._in_flight = 0
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._outbox: _Outbox | None = None
        self.closed = False
        self.why_closed = "connection closed"

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._outbox = _Outbox(self.loop, transport)
        transport.write(MAGIC + self._client_nonce)

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self._hello += data
            if self._hello.startswith(REFUSED):
                return self._fail(f"{self.peer} refused our credentials: check the cluster secret")
            if len(self._hello) < len(MAGIC) + NONCE_BYTES:
                return
            if not self._hello.startswith(MAGIC):
                return self._fail(f"{self.peer} does not speak the capkv peer wire")
            server_nonce = bytes(self._hello[len(MAGIC) : len(MAGIC) + NONCE_BYTES])
            data = bytes(self._hello[len(MAGIC) + NONCE_BYTES :])
            self.codec = FrameCodec(session_key(self.secret, self._client_nonce, server_nonce), b"q", b"r")
            if not self.ready.done():
                self.ready.set_result(None)
            if not data:
                return
        if data.startswith(REFUSED) and not self.codec._buffer:
            return self._fail(f"{self.peer} refused our credentials: check the cluster secret")
        try:
            bodies = self.codec.feed(data)
        except ValueError as exc:
            return self._fail(f"{self.peer} sent a bad frame ({exc}): is the cluster secret the same?")
        for body in bodies:
            (request_id,) = _ID.unpack_from(body)
            entry = self.pending.pop(request_id, None)
            if entry is None:
                continue  # the call timed out meanwhile
            future, timer = entry
            timer.cancel()
            self._release_slot()
            if future.done():
                continue  # cancelled by its caller
            kind = body[8] if len(body) > 8 else -1
            try:
                obj = json.loads(body[9:])
                if not isinstance(obj, dict):
                    raise ValueError("reply is not an object")
            except ValueError as exc:
                future.set_exception(PeerUnreachable(f"{self.peer} sent a bad reply: {exc}"))
                continue
            if kind == KIND_REPLY:
                future.set_result(obj)
            elif kind == KIND_REFUSAL:
                future.set_exception(RemoteError(str(obj.get("code", "error")), str(obj.get("message", ""))))
            else:
                future.set_exception(PeerUnreachable(f"{self.peer} sent a frame of unknown kind {kind}"))

    def _fail(self, why: str) -> None:
        self.why_closed = why
        if self.transport is not None:
            self.transport.close()
        self._close_all(why)

    def _close_all(self, why: str) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(PeerUnreachable(why))
            self.ready.exception()  # retrieved: nobody may be waiting on it
        pending, self.pending = self.pending, {}
        for future, timer in pending.values():
            timer.cancel()
            self._release_slot()  # a waiter handed it finds the link closed and fails at once
            if not future.done():
                future.set_exception(PeerUnreachable(why))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def connection_lost(self, exc) -> None:
        why = self.why_closed if self.closed else f"connection to {self.peer} lost" + (f": {exc}" if exc else "")
        self._close_all(why)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def can_start(self) -> bool:
        """A call can go out now, without waiting for a slot or for the buffer to drain."""
        return (
            not self.closed
            and self._in_flight < MAX_OUTSTANDING_CALLS
            and not self._slot_waiters
            and (self._drained is None or self._drained.done())
        )

    def start(self, method: str, body: bytes, deadline: float) -> asyncio.Future:
        """Send a call now (the caller checked `can_start`); the future gets the reply dict,
        `RemoteError` or `PeerUnreachable`. Cancelling it abandons the call."""
        self._in_flight += 1
        return self._start(method, body, deadline)

    async def send(self, method: str, body: bytes, deadline: float) -> dict:
        if self.closed:
            raise PeerUnreachable(self.why_closed)
        if self._in_flight >= MAX_OUTSTANDING_CALLS or self._slot_waiters:
            # MAX_OUTSTANDING_CALLS already wait on this peer: queue for a slot, within the deadline.
            await self._wait_for_slot(deadline)
        else:
            self._in_flight += 1
        try:
            if self._drained is not None and not self._drained.done():
                # Our socket buffer is full: wait (bounded by the deadline) until it drains.
                try:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.shield(self._drained)
                except TimeoutError:
                    raise PeerUnreachable(f"{self.peer}: send buffer did not drain in time") from None
            if self.closed:
                raise PeerUnreachable(self.why_closed)
        except BaseException:
            self._release_slot()
            raise
        return await self._start(method, body, deadline)

    async def _wait_for_slot(self, deadline: float) -> None:
        """Wait until a finishing call hands this one its slot (counted in `_in_flight`)."""
        turn = self.loop.create_future()
        self._slot_waiters.append(turn)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._release_slot()  # handed the slot just as we gave up: pass it on
            elif turn in self._slot_waiters:
                self._slot_waiters.remove(turn)
            if isinstance(exc, TimeoutError):
                raise PeerUnreachable(f"{self.peer}: {MAX_OUTSTANDING_CALLS} calls waiting on it; no slot in time") from None
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            turn = self._slot_waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to that waiter, still counted
                return
        self._in_flight -= 1

    def _start(self, method: str, body: bytes, deadline: float) -> asyncio.Future:
        """Seal and queue the request frame (its slot taken); the call's future. The slot
        is freed by the reply, the expiry or the connection's end (`pending`)."""
        future = self.loop.create_future()
        if self.closed:
            self._release_slot()
            future.set_exception(PeerUnreachable(self.why_closed))
            return future
        request_id = self.next_id
        self.next_id += 1
        method_bytes = method.encode()
        try:
            frame = self.codec.seal(_ID.pack(request_id) + bytes((KIND_REQUEST, len(method_bytes))) + method_bytes + body)
        except ValueError as exc:  # over the frame cap
            self._release_slot()
            future.set_exception(PeerUnreachable(f"{self.peer}: {exc}"))
            return future
        timer = self.loop.call_at(deadline, self._expire, request_id)
        self.pending[request_id] = (future, timer)
        self._outbox.put(frame)
        return future

    def _expire(self, request_id: int) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return
        self._release_slot()
        future = entry[0]
        if not future.done():
            future.set_exception(PeerUnreachable(f"{self.peer} did not answer in time"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._close_all("transport closed")


class StreamTransport:
    """Calls peers over one framed, authenticated connection each (module docstring)."""

    def __init__(self, addresses: Mapping[str, str], secret: str):
        if not secret:
            raise ValueError("peer traffic needs a non-empty cluster secret")
        self._addresses = dict(addresses)
        self.secret = secret
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # node -> (retry at, current backoff)
        self._closed = False

    async def _link(self, node: str, deadline: float) -> _Link:
        link = self._links.get(node)
        if link is not None and not link.closed:
            return link
        connecting = self._connecting.get(node)
        if connecting is None:
            loop = asyncio.get_running_loop()
            retry_at, _ = self._backoff.get(node, (0.0, 0.0))
            if loop.time() < retry_at:
                raise PeerUnreachable(f"{node}: not reconnecting yet (last attempt failed)")
            connecting = self._connecting[node] = asyncio.ensure_future(self._connect(node))
            connecting.add_done_callback(lambda fut, node=node: self._connected(node, fut))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(connecting)
        except TimeoutError:
            raise PeerUnreachable(f"{node}: connecting timed out") from None

    def _connected(self, node: str, attempt: asyncio.Future) -> None:
        self._connecting.pop(node, None)
        if not attempt.cancelled():
            attempt.exception()  # retrieved here: every waiter may have timed out already

    async def _connect(self, node: str) -> _Link:
        loop = asyncio.get_running_loop()
        address = self._addresses.get(node)
        if address is None:
            raise PeerUnreachable(f"no address for node {node!r}")
        host, _, port = address.rpartition(":")
        link = None
        try:
            async with asyncio.timeout(RECONNECT_MAX_S * 4):
                _, link = await loop.create_connection(lambda: _Link(node, self.secret, loop), host, int(port))
                await asyncio.shield(link.ready)
        except (OSError, TimeoutError, ValueError, PeerUnreachable) as exc:
            if link is not None:
                link.close()
            _, backoff = self._backoff.get(node, (0.0, 0.0))
            backoff = min(RECONNECT_MAX_S, max(RECONNECT_MIN_S, backoff * 2))
            self._backoff[node] = (loop.time() + backoff, backoff)
            if isinstance(exc, PeerUnreachable):
                raise
            raise PeerUnreachable(f"{node} ({address}): {type(exc).__name__}: {exc}") from None
        self._backoff.pop(node, None)
        if self._closed:
            link.close()
            raise PeerUnreachable("transport closed")
        self._links[node] = link
        return link

    async def call(self, node: str, method: str, payload: dict, timeout: float) -> dict:
        if self._closed:
            raise PeerUnreachable("transport closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.001)
        try:
            body = _DUMPS(payload).encode()
        except (TypeError, ValueError) as exc:
            raise PeerUnreachable(f"payload for {node} is not JSON: {exc}") from None
        link = self._links.get(node)
        if link is None or link.closed:
            link = await self._link(node, deadline)
        return await link.send(method, body, deadline)

    def start_call(self, node: str, method: str, payload: dict, timeout: float) -> asyncio.Future:
        """`call` as a future: the reply dict, or `PeerUnreachable` / `RemoteError`. When the
        connection is up with a free slot (the usual case) the frame is sealed and queued
        here and no task is made; otherwise this is `call` in a task. Cancelling the future
        abandons the call."""
        link = self._links.get(node)
        if link is None or self._closed or not link.can_start():
            return asyncio.ensure_future(self.call(node, method, payload, timeout))
        try:
            body = _DUMPS(payload).encode()
        except (TypeError, ValueError) as exc:
            future = link.loop.create_future()
            future.set_exception(PeerUnreachable(f"payload for {node} is not JSON: {exc}"))
            return future
        return link.start(method, body, link.loop.time() + max(timeout, 0.001))

    @property
    def addresses(self) -> dict[str, str]:
        return dict(self._addresses)

    @addresses.setter
    def addresses(self, addresses: Mapping[str, str]) -> None:
        """New peer addresses (membership change): a connection to a node whose address
        changed or that is gone is closed; the next call dials the new one."""
        addresses = dict(addresses)
        for node in list(self._links):
            if addresses.get(node) != self._addresses.get(node):
                self._links.pop(node).close()
                self._backoff.pop(node, None)
        self._addresses = addresses

    async def close(self) -> None:
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        for link in self._links.values():
            link.close()
        self._links.clear()
