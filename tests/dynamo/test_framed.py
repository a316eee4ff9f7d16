"""The framed peer wire (dynamo/framed.py) against a real PeerServer on loopback."""
import asyncio
import json

import aiohttp
import pytest

from clusters.spec import free_ports
from dynamo import framed
from dynamo.framed import FrameCodec, StreamTransport, session_key
from dynamo.transport import AUTH_HEADER, HttpTransport, PeerServer, PeerUnreachable, RemoteError, sign

pytestmark = pytest.mark.timeout(60)


class Peer:
    """A PeerServer whose handler echoes, refuses or stalls on demand."""

    def __init__(self):
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.calls = []
        self.release = asyncio.Event()
        self.server = None

    async def handler(self, method, payload):
        self.calls.append(method)
        if method == "refuse":
            raise RemoteError("hints_full", "no room")
        if method == "stall":
            await self.release.wait()
        if method == "crash":
            raise RuntimeError("bug")
        return {"method": method, "payload": payload}

    async def start(self, secret="s3cret"):
        self.server = PeerServer("127.0.0.1", self.port, secret, self.handler)
        await self.server.start()
        return self

    async def stop(self):
        await self.server.stop()


@pytest.fixture
async def peer():
    p = await Peer().start()
    yield p
    await p.stop()


async def test_calls_round_trip_and_share_one_connection(peer):
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        replies = await asyncio.gather(*(transport.call("a", "echo", {"i": i, "v": "x" * i}, 5.0) for i in range(200)))
        assert [r["payload"]["i"] for r in replies] == list(range(200))
        assert len(transport._links) == 1
        assert len(peer.server._framed) == 1
    finally:
        await transport.close()


async def test_a_refusal_is_a_remote_error_and_a_handler_failure_too(peer):
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        with pytest.raises(RemoteError) as err:
            await transport.call("a", "refuse", {}, 5.0)
        assert (err.value.code, err.value.message) == ("hints_full", "no room")
        with pytest.raises(RemoteError) as err:
            await transport.call("a", "crash", {}, 5.0)
        assert err.value.code == "internal"
        assert (await transport.call("a", "echo", {}, 5.0))["method"] == "echo"  # the link survives
    finally:
        await transport.close()


async def test_a_slow_peer_times_out_without_blocking_other_calls(peer):
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        stalled = asyncio.ensure_future(transport.call("a", "stall", {}, 0.2))
        assert (await transport.call("a", "echo", {}, 5.0))["method"] == "echo"
        with pytest.raises(PeerUnreachable, match="did not answer in time"):
            await stalled
        peer.release.set()
        await asyncio.sleep(0.05)  # the late reply is dropped quietly
        assert (await transport.call("a", "echo", {}, 5.0))["method"] == "echo"
    finally:
        await transport.close()


async def test_a_caller_without_the_secret_is_refused():
    peer = await Peer().start(secret="right")
    wrong = StreamTransport({"a": peer.address}, "wrong")
    try:
        with pytest.raises(PeerUnreachable, match="refused our credentials"):
            await wrong.call("a", "echo", {}, 5.0)
        assert peer.calls == []  # the handler never ran
    finally:
        await wrong.close()
        await peer.stop()


async def test_raw_frames_without_a_valid_mac_never_reach_the_handler(peer):
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    try:
        writer.write(framed.MAGIC + b"\x00" * framed.NONCE_BYTES)
        hello = await reader.readexactly(len(framed.MAGIC) + framed.NONCE_BYTES)
        assert hello.startswith(framed.MAGIC)
        # A frame sealed under a key made from a guessed secret.
        codec = FrameCodec(session_key("guess", b"\x00" * framed.NONCE_BYTES, hello[4:]), b"q", b"r")
        body = (0).to_bytes(8, "big") + bytes((framed.KIND_REQUEST, 4)) + b"echo" + b"{}"
        writer.write(codec.seal(body))
        assert await reader.read(100) == framed.REFUSED
        assert await reader.read(100) == b""  # and hung up
        assert peer.calls == []
    finally:
        writer.close()


async def test_a_replayed_frame_is_refused(peer):
    # Frames carry their sequence number in the mac: sending one twice breaks the second.
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    try:
        nonce = b"\x01" * framed.NONCE_BYTES
        writer.write(framed.MAGIC + nonce)
        hello = await reader.readexactly(len(framed.MAGIC) + framed.NONCE_BYTES)
        codec = FrameCodec(session_key("s3cret", nonce, hello[4:]), b"q", b"r")
        frame = codec.seal((7).to_bytes(8, "big") + bytes((framed.KIND_REQUEST, 4)) + b"echo" + b'{"n":1}')
        writer.write(frame)
        replies = []
        while not replies:
            replies = codec.feed(await reader.read(4096))
        assert json.loads(replies[0][9:]) == {"method": "echo", "payload": {"n": 1}}
        writer.write(frame)
        assert await reader.read(100) == framed.REFUSED
        assert peer.calls == ["echo"]
    finally:
        writer.close()


async def test_http_still_works_on_the_same_port(peer):
    body = json.dumps({"k": 1}).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{peer.address}/peer/echo", data=body) as response:
            assert response.status == 401
        headers = {AUTH_HEADER: sign("wrong", "echo", body)}
        async with session.post(f"http://{peer.address}/peer/echo", data=body, headers=headers) as response:
            assert response.status == 403
    http = HttpTransport({"a": peer.address}, "s3cret")
    try:
        assert await http.call("a", "echo", {"k": 1}, 5.0) == {"method": "echo", "payload": {"k": 1}}
    finally:
        await http.close()
    assert peer.calls == ["echo"]


async def test_a_peer_that_goes_away_fails_calls_then_is_dialled_again():
    peer = await Peer().start()
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        assert (await transport.call("a", "echo", {}, 5.0))["method"] == "echo"
        stalled = asyncio.ensure_future(transport.call("a", "stall", {}, 5.0))
        await asyncio.sleep(0.05)
        await peer.stop()
        with pytest.raises(PeerUnreachable):
            await stalled  # failed by the lost connection, well before its 5 s
        with pytest.raises(PeerUnreachable):
            await transport.call("a", "echo", {}, 1.0)  # refused while down
        await peer.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # within the reconnect backoff
            try:
                assert (await transport.call("a", "echo", {}, 1.0))["method"] == "echo"
                break
            except PeerUnreachable:
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
    finally:
        await transport.close()
        await peer.stop()


async def test_an_unknown_node_and_an_oversized_message_are_unreachable(peer, monkeypatch):
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        with pytest.raises(PeerUnreachable, match="no address"):
            await transport.call("nope", "echo", {}, 1.0)
        monkeypatch.setattr(framed, "MAX_FRAME_BYTES", 1000)
        with pytest.raises(PeerUnreachable, match="cap"):
            await transport.call("a", "echo", {"v": "x" * 2000}, 1.0)
        assert (await transport.call("a", "echo", {"v": "small"}, 1.0))["payload"] == {"v": "small"}
    finally:
        await transport.close()


def test_the_codec_reassembles_frames_split_anywhere():
    key = session_key("s", b"a" * 16, b"b" * 16)
    sender, receiver = FrameCodec(key, b"q", b"r"), FrameCodec(key, b"r", b"q")
    stream = b"".join(sender.seal(b"body-%d" % i * (i + 1)) for i in range(20))
    got = []
    for start in range(0, len(stream), 7):
        got += receiver.feed(stream[start : start + 7])
    assert got == [b"body-%d" % i * (i + 1) for i in range(20)]
    with pytest.raises(ValueError):
        FrameCodec(key, b"r", b"q").feed(stream[:3] + b"\x00" + stream[4:])  # length tampered with


def test_a_sealed_frame_is_the_documented_bytes():
    """The wire is `length + HMAC-SHA256(K, direction + seq + body) + body`: the codec's
    precomputed-pad mac must give exactly hmac.digest's bytes (old and new nodes interoperate)."""
    import hmac
    import struct

    key = session_key("s", b"a" * 16, b"b" * 16)
    sender = FrameCodec(key, b"q", b"r")
    for seq, body in enumerate([b"", b"x", b"y" * 63, b"z" * 64, b"w" * 1000]):
        frame = sender.seal(body)
        expected = hmac.digest(key, b"q" + struct.pack(">Q", seq) + body, "sha256")
        assert frame == struct.pack(">I", len(body)) + expected + body
    for length in (1, 32, 64, 65, 200):  # RFC 2104: keys over one block are hashed first
        long_key = bytes(range(length % 256)) * (length // 256 + 1)
        long_key = long_key[:length]
        assert framed._SessionMac(long_key).digest(b"ab", b"cd") == hmac.digest(long_key, b"abcd", "sha256")


async def test_calls_beyond_the_outstanding_cap_queue_instead_of_failing(peer, monkeypatch):
    monkeypatch.setattr(framed, "MAX_OUTSTANDING_CALLS", 4)
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        stalled = [asyncio.ensure_future(transport.call("a", "stall", {}, 5.0)) for _ in range(4)]
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(transport.call("a", "echo", {}, 5.0))
        await asyncio.sleep(0.1)
        assert not queued.done() and peer.calls.count("echo") == 0  # waiting for a slot
        peer.release.set()
        assert (await queued)["method"] == "echo"
        await asyncio.gather(*stalled)
        with pytest.raises(PeerUnreachable, match="no slot"):
            peer.release.clear()
            more = [asyncio.ensure_future(transport.call("a", "stall", {}, 5.0)) for _ in range(4)]
            await asyncio.sleep(0.1)
            await transport.call("a", "echo", {}, 0.2)
        peer.release.set()
        await asyncio.gather(*more)
    finally:
        await transport.close()


async def test_immediate_methods_are_answered_in_line_and_others_go_to_the_handler():
    peer = Peer()
    immediate_calls = []

    def immediate(method, payload):
        immediate_calls.append(method)
        if method == "now":
            return {"now": payload["i"]}
        if method == "refuse_now":
            raise RemoteError("not_ready", "starting")
        return None

    peer.server = PeerServer("127.0.0.1", peer.port, "s3cret", peer.handler, immediate)
    await peer.server.start()
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        replies = await asyncio.gather(*(transport.call("a", "now", {"i": i}, 5.0) for i in range(50)))
        assert [r["now"] for r in replies] == list(range(50))
        assert (await transport.call("a", "echo", {}, 5.0))["method"] == "echo"
        with pytest.raises(RemoteError) as err:
            await transport.call("a", "refuse_now", {}, 5.0)
        assert err.value.code == "not_ready"
        assert peer.calls == ["echo"]  # "now" and "refuse_now" never reached the async handler
        assert immediate_calls.count("now") == 50 and "echo" in immediate_calls
    finally:
        await transport.close()
        await peer.stop()


async def test_start_call_sends_without_a_task_and_a_cancelled_call_keeps_its_slot_until_answered(peer, monkeypatch):
    monkeypatch.setattr(framed, "MAX_OUTSTANDING_CALLS", 2)
    transport = StreamTransport({"a": peer.address}, "s3cret")
    try:
        first = transport.start_call("a", "echo", {"i": 0}, 5.0)  # not connected yet: `call` in a task
        assert isinstance(first, asyncio.Task)
        assert (await first)["payload"] == {"i": 0}
        fast = transport.start_call("a", "echo", {"i": 1}, 5.0)
        assert not isinstance(fast, asyncio.Task)  # connected, a free slot: sealed and queued here
        assert (await fast)["payload"] == {"i": 1}
        with pytest.raises(RemoteError):
            await transport.start_call("a", "refuse", {}, 5.0)
        link = transport._links["a"]
        stalled = transport.start_call("a", "stall", {}, 5.0)
        stalled.cancel()  # the request is out: its slot stays taken until the peer answers
        other = transport.start_call("a", "stall", {}, 5.0)
        await asyncio.sleep(0.1)
        assert link._in_flight == 2 and not link.can_start()
        queued = transport.start_call("a", "echo", {"i": 2}, 5.0)  # no slot: waits in a task
        assert isinstance(queued, asyncio.Task)
        await asyncio.sleep(0.1)
        assert not queued.done()
        peer.release.set()
        assert (await other)["method"] == "stall"
        assert (await queued)["payload"] == {"i": 2}
        assert link._in_flight == 0 and not link.pending and link.can_start()
        expiring = transport.start_call("a", "stall", {}, 0.05)  # the peer still stalls? no: released
        assert (await expiring)["method"] == "stall"
        peer.release.clear()
        with pytest.raises(PeerUnreachable, match="in time"):
            await transport.start_call("a", "stall", {}, 0.1)
        assert link._in_flight == 0 and not link.pending  # the expiry freed the slot
        peer.release.set()
    finally:
        await transport.close()
