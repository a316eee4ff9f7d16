"""The floor of the stack: what aiohttp and pysyncobj cost before capkv does anything.

    python -m bench.floor                  # http, raft and dynamo floors beside etcd, 64 clients, 10 s
    python -m bench.floor --seconds 5 --systems http,raft
    python -m bench.floor --systems http,dynamo,etcd  # issue #5's ap floor

Issues #3 and #5 ask capkv to beat etcd 3.4 by 1.5x on puts and 2x on gets, on this
2-core machine, under `bench.cluster`'s load (64 clients, 256-byte values, 10,000 keys).
This script runs that same load generator against stand-ins that do less than any
correct capkv node could, each as three processes on loopback like a local-3 cluster:

- `raw`: three processes of the thinnest HTTP/1.1 server asyncio allows (find the end of
  the headers, skip Content-Length bytes, write a fixed answer): the ceiling of any
  server written in Python on asyncio, aiohttp or not.
- `http`: three aiohttp servers whose handler reads the body and sets or looks up a dict
  entry: no replication, no engine, no checks. The ceiling of any aiohttp-served store.
- `raft`: three processes, each an aiohttp server in front of a pysyncobj node, whose PUT
  handler calls one `@replicated` method that sets a dict entry, and answers when it is
  committed. No journal (pysyncobj's in-memory log), no fsync, no password, no engine:
  the ceiling of any aiohttp + pysyncobj store that commits a write before answering.
- `dynamo`: three processes, each an aiohttp server for clients plus a peer listener
  (asyncio.Protocol; length-prefixed binary frames with request ids; one persistent TCP
  connection per pair of nodes, used both ways; the frames queued for a peer in one loop
  pass leave in one write). A PUT sends the key and value to both other nodes, sets its
  own dict entry, and answers after W=2 acknowledgements (its own and the first peer's);
  a GET asks both other nodes and answers after R=2 replies (its own dict and the first
  peer's): N=3, R=2, W=2 as issue #5 asks. Left out, so cheaper than any capkv ap node:
  engine, fsync (so no durability at all), vector clocks and siblings (a GET keeps its
  own copy, a peer's fills a local miss), causal context in answers, HMAC on peer
  frames, ring and preference lists (three nodes hold every key), hinted handoff,
  read repair, per-request timers (a sweeper answers 503 to requests whose replies have
  not come in 2.5-5 s), request validation and the API's error paths. Its get line is
  labelled `get-quorum` and compared with etcd's linearizable get, as `bench.cluster`
  does for ap.
- `etcd`: a 3-member etcd 3.4 through its JSON gateway, as in `bench.cluster`.

It prints one JSON line per (system, workload) with ops/s, p50/p99, server CPU per op,
the generator's CPU per op, and the ratio to etcd in the same run. If a floor is below a
goal, no code of ours on this stack can meet that goal on this machine: the floor runs
with every capkv cost removed. This is a measurement, never a timed test.

Knobs (environment): FLOOR_RAFT_BATCH_S=0.002 runs the raft stand-in with pysyncobj's
batching (commands sent on ticks that many seconds apart) instead of at once;
FLOOR_RAFT_GROUP=1 has each raft stand-in submit the puts that arrive while its last
command is uncommitted as one command; FLOOR_UVLOOP=1 runs servers and generator on uvloop (needs `pip install uvloop`).
FLOOR_DYNAMO_W=1|2|3 and FLOOR_DYNAMO_R=1|2|3 set the dynamo stand-in's quorums (a put
still goes to all three nodes; R=1 reads the local dict alone); FLOOR_DYNAMO_ASK_QUORUM=1
has a get ask only the R-1 peers it waits for, not both (Dynamo asks all N).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from .cluster import CapkvTarget, EtcdTarget, cpu_seconds, fill, free_ports, run_load, start_etcd, stop_procs

WORKLOADS = {
    "raw": ("put", "get-linearizable"),
    "http": ("put", "get-linearizable"),
    "raft": ("put",),
    "dynamo": ("put", "get-linearizable"),
    "etcd": ("put", "get-linearizable"),
}


# --- the stand-in servers (run as `python -m bench.floor serve ...`) ---------------------------


def serve_http(port: int) -> None:
    from aiohttp import web

    store: dict[str, bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if request.method == "PUT":
            store[key] = await request.read()
            return web.json_response({"revision": len(store)})
        # Each stand-in process has its own dict, so a key written through another one is
        # a miss here: answered 200 all the same, as a lookup costs the same either way.
        # The value goes out in base64, as etcd's gateway and capkv send binary values.
        value = store.get(key, b"")
        return web.json_response({"key": key, "value": base64.b64encode(value).decode()})

    app = web.Application()
    app.router.add_route("*", "/v1/kv/{key:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_raw(port: int) -> None:
    """The thinnest HTTP/1.1 server asyncio allows: find the end of the headers, take
    Content-Length bytes of body, answer a fixed JSON, keep the connection. No routing,
    no parser beyond that, no error handling: the floor of any Python server at all."""
    answer = b'{"revision": 1}'
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(answer),
        answer,
    )

    class Raw(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end].lower() + b"\r\n"
                at = head.find(b"content-length:")
                length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length :]
                self.transport.write(response)
            self.buffer = buffer

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_raft(port: int, peer: str, others: list[str]) -> None:
    from aiohttp import web
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    class Store(SyncObj):
        def __init__(self) -> None:
            # The settings capkv uses for speed (consensus/raft_node.py): each command sent
            # at once rather than on the next heartbeat.
            # With FLOOR_RAFT_BATCH_S set, commands are batched instead and sent every that
            # many seconds (pysyncobj's own batching), with the tick thread waking as often,
            # to try the other trade-off.
            batch_s = float(os.environ.get("FLOOR_RAFT_BATCH_S", "0"))
            conf = SyncObjConf(
                autoTickPeriod=batch_s if batch_s > 0 else 0.05,
                appendEntriesUseBatch=batch_s > 0,
                appendEntriesPeriod=batch_s if batch_s > 0 else 0.1,
                dynamicMembershipChange=False,
                commandsQueueSize=20_000,
            )
            super().__init__(peer, others, conf)
            self._data: dict[str, bytes] = {}

        @replicated
        def set(self, key: str, value: bytes) -> int:
            self._data[key] = value
            return len(self._data)

        @replicated
        def set_many(self, items: list) -> int:
            for key, value in items:
                self._data[key] = value
            return len(self._data)

    store = Store()
    # With FLOOR_RAFT_GROUP=1 each node submits the puts that arrive while its previous
    # command is uncommitted as one command (`set_many`): the cost of grouping writes above
    # pysyncobj, which capkv does not do (each write is its own command).
    grouped = bool(os.environ.get("FLOOR_RAFT_GROUP"))
    waiting: list = []  # (key, value, future) not yet submitted
    in_flight = False

    def submit(loop) -> None:
        nonlocal in_flight
        batch = waiting[:1000]
        del waiting[:1000]
        in_flight = True

        def committed(result, error) -> None:
            loop.call_soon_threadsafe(finish, loop, batch, result, error)

        store.set_many([(key, value) for key, value, _ in batch], callback=committed)

    def finish(loop, batch, result, error) -> None:
        nonlocal in_flight
        in_flight = False
        for _, _, done in batch:
            if not done.done():
                done.set_result((result, error))
        if waiting:
            submit(loop)

    async def handle(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await request.read()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if grouped:
            waiting.append((key, value, done))
            if not in_flight:
                submit(loop)
        else:

            def committed(result, error) -> None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((result, error)))

            store.set(key, value, callback=committed)
        result, error = await done
        if error != FAIL_REASON.SUCCESS:
            return web.json_response({"error": str(error)}, status=503)
        return web.json_response({"revision": result})

    app = web.Application()
    app.router.add_route("PUT", "/v1/kv/{key:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# One peer frame: the length of what follows it, the kind, the request id, the key's length;
# then the key, then the value (the rest). Replies carry no key.
PEER_FRAME = struct.Struct("!IBIH")
STORE, STORED, FETCH, FOUND, MISSING = 1, 2, 3, 4, 5
# A request whose peer replies have not come for two sweeps of this many seconds is answered
# 503 (the bound on the waiting table; no per-request timer, which costs more).
DYNAMO_SWEEP_S = 2.5
DYNAMO_PENDING_MAX = 10_000


def serve_dynamo(port: int, peer: str, others: list[str]) -> None:
    """The floor of a Dynamo-style ap node: see the module docstring for what it leaves out.

    Each pair of nodes shares one persistent TCP connection, opened by the node whose peer
    address sorts first and then used both ways: a node's requests to that peer and its
    replies to the peer's requests travel on it, and everything queued for it in one loop
    pass leaves in one `transport.write`.
    """
    from json.encoder import encode_basestring_ascii as quote  # json.dumps of one str, in C

    from aiohttp import web

    write_quorum = int(os.environ.get("FLOOR_DYNAMO_W", "2"))
    read_quorum = int(os.environ.get("FLOOR_DYNAMO_R", "2"))
    # With FLOOR_DYNAMO_ASK_QUORUM=1 a get asks only the R-1 peers it waits for, not all
    # N-1 (Dynamo asks all N, to hedge against a slow replica and to repair stale ones).
    ask_quorum = bool(os.environ.get("FLOOR_DYNAMO_ASK_QUORUM"))
    if not (1 <= write_quorum <= 3 and 1 <= read_quorum <= 3):
        raise SystemExit("FLOOR_DYNAMO_W and FLOOR_DYNAMO_R take 1, 2 or 3 (N=3)")

    store: dict[bytes, bytes] = {}
    links: list[PeerLink] = []
    # request id -> [future, peer replies still awaited, value of the last reply]
    waiting: dict[int, list] = {}
    next_id = 0
    loop: asyncio.AbstractEventLoop | None = None  # set when the app starts

    class PeerLink(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = b""
            self.outbox: list[bytes] = []
            links.append(self)

        def connection_lost(self, exc) -> None:
            # Requests waiting on this peer are answered 503 by the sweeper.
            if self in links:
                links.remove(self)

        def send(self, frame: bytes) -> None:
            if not self.outbox:
                loop.call_soon(self.flush)
            self.outbox.append(frame)

        def flush(self) -> None:
            frames = self.outbox
            self.outbox = []
            if not self.transport.is_closing():
                self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data if self.buffer else data
            at, end = 0, len(buffer)
            while end - at >= 11:
                length, kind, request_id, key_length = PEER_FRAME.unpack_from(buffer, at)
                stop = at + 4 + length
                if stop > end:
                    break
                if kind == STORE:
                    store[buffer[at + 11 : at + 11 + key_length]] = buffer[at + 11 + key_length : stop]
                    self.send(PEER_FRAME.pack(7, STORED, request_id, 0))
                elif kind == FETCH:
                    value = store.get(buffer[at + 11 : stop])
                    if value is None:
                        self.send(PEER_FRAME.pack(7, MISSING, request_id, 0))
                    else:
                        self.send(PEER_FRAME.pack(7 + len(value), FOUND, request_id, 0) + value)
                else:  # STORED, FOUND, MISSING: a reply to one of ours
                    entry = waiting.get(request_id)
                    if entry is not None:
                        if kind == FOUND:
                            entry[2] = buffer[at + 11 : stop]
                        entry[1] -= 1
                        if entry[1] == 0:
                            del waiting[request_id]
                            if not entry[0].done():
                                entry[0].set_result(entry[2])
                at = stop
            self.buffer = buffer[at:] if at < end else b""

    def ask(kind: int, key: bytes, value: bytes, replies: int, fanout: int):
        """Send one request to `fanout` peers; a future of the last of `replies` replies."""
        nonlocal next_id
        next_id = (next_id + 1) & 0xFFFFFFFF
        frame = PEER_FRAME.pack(7 + len(key) + len(value), kind, next_id, len(key)) + key + value
        for link in links[:fanout]:
            link.send(frame)
        if not replies:
            return None
        done = loop.create_future()
        waiting[next_id] = [done, replies, None]
        return done

    def unavailable(message: str) -> web.Response:
        return web.json_response({"error": {"code": "unavailable", "message": message}}, status=503)

    async def put(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await request.read()
        if len(links) < write_quorum - 1 or len(waiting) >= DYNAMO_PENDING_MAX:
            return unavailable("too few replicas reachable for W")
        encoded = key.encode()
        acknowledged = ask(STORE, encoded, value, write_quorum - 1, 2)  # N=3: every replica
        store[encoded] = value
        if acknowledged is not None and await acknowledged is False:
            return unavailable("too few replicas acknowledged in time")
        return web.Response(body=b'{"key":%s}' % quote(key).encode(), content_type="application/json")

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if len(links) < read_quorum - 1 or len(waiting) >= DYNAMO_PENDING_MAX:
            return unavailable("too few replicas reachable for R")
        encoded = key.encode()
        value = store.get(encoded)
        if read_quorum > 1:
            replied = ask(FETCH, encoded, b"", read_quorum - 1, read_quorum - 1 if ask_quorum else 2)
            peer_value = await replied
            if peer_value is False:
                return unavailable("too few replicas replied in time")
            # No versions to compare: the local copy wins, a peer's fills a local miss.
            if value is None:
                value = peer_value
        if value is None:
            return web.json_response({"error": {"code": "key_not_found", "message": f"no key {key!r}"}}, status=404)
        body = b'{"key":%s,"value_base64":"%s"}' % (quote(key).encode(), base64.b64encode(value))
        return web.Response(body=body, content_type="application/json")

    async def sweep() -> None:
        seen: set[int] = set()
        while True:
            await asyncio.sleep(DYNAMO_SWEEP_S)
            for request_id in seen & waiting.keys():
                done = waiting.pop(request_id)[0]
                if not done.done():
                    done.set_result(False)
            seen = set(waiting)

    async def connect(address: str) -> None:
        host, peer_port = address.rsplit(":", 1)
        while True:
            try:
                await loop.create_connection(PeerLink, host, int(peer_port))
                return
            except OSError:
                await asyncio.sleep(0.1)

    async def peering(app: web.Application):
        nonlocal loop
        loop = asyncio.get_running_loop()
        host, peer_port = peer.rsplit(":", 1)
        server = await loop.create_server(PeerLink, host, int(peer_port))
        tasks = [asyncio.create_task(sweep())]
        tasks += [asyncio.create_task(connect(other)) for other in others if other > peer]
        yield
        for task in tasks:
            task.cancel()
        server.close()

    app = web.Application()
    app.router.add_put("/v1/kv/{key:.*}", put)
    app.router.add_get("/v1/kv/{key:.*}", get, allow_head=False)
    app.cleanup_ctx.append(peering)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- the driver -----------------------------------------------------------------------------


def start_floor(kind: str) -> tuple[list[subprocess.Popen], list[str]]:
    ports = free_ports(6)
    clients, peers = ports[0::2], [f"127.0.0.1:{p}" for p in ports[1::2]]
    procs, urls = [], []
    for i in range(3):
        cmd = [sys.executable, "-m", "bench.floor", "serve", kind, "--port", str(clients[i])]
        if kind in ("raft", "dynamo"):
            cmd += ["--peer", peers[i], "--others", *[p for j, p in enumerate(peers) if j != i]]
        procs.append(subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        urls.append(f"http://127.0.0.1:{clients[i]}")
    return procs, urls


async def wait_serving(target, timeout: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for node in range(len(target.urls)):
            while True:
                try:
                    async with target.put(session, node, "floor/ready", b"x") as response:
                        if response.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{target.urls[node]} did not serve within {timeout} s")
                await asyncio.sleep(0.2)


async def measure(name: str, target, workloads, args) -> list[dict]:
    await wait_serving(target)
    await fill(target, args.keys, args.value_bytes)
    lines = []
    for workload in workloads:
        generator_before = time.process_time()
        result = await run_load(target, workload, args.clients, args.seconds, args.keys, args.value_bytes)
        generator_cpu = time.process_time() - generator_before
        line = {"system": name, **{k: v for k, v in result.as_json().items() if k != "system"}}
        if name == "dynamo" and workload == "get-linearizable":
            # As bench.cluster labels an ap read: it waits for R replies, and is compared
            # with etcd's linearizable get.
            line["workload"] = "get-quorum"
            line["compare_with"] = workload
        if result.ok:
            line["generator_cpu_us_per_op"] = round(generator_cpu / result.ok * 1e6, 1)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("FLOOR_UVLOOP"):
        # uvloop is not a capkv dependency: this knob measured what it would save (little:
        # aiohttp's own per-request work dominates), `pip install uvloop` to repeat it.
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="python -m bench.floor serve")
        parser.add_argument("kind", choices=("raw", "http", "raft", "dynamo"))
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--peer")
        parser.add_argument("--others", nargs="*", default=[])
        args = parser.parse_args(argv[1:])
        if args.kind in ("raft", "dynamo") and not (args.peer and len(args.others) == 2):
            parser.error(f"{args.kind} takes --peer HOST:PORT and --others with the two other peers")
        if args.kind == "raw":
            serve_raw(args.port)
        elif args.kind == "http":
            serve_http(args.port)
        elif args.kind == "dynamo":
            serve_dynamo(args.port, args.peer, args.others)
        else:
            serve_raft(args.port, args.peer, args.others)
        return 0

    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="raw,http,raft,dynamo,etcd", help="comma-separated: raw, http, raft, dynamo, etcd")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=256)
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(systems) <= set(WORKLOADS):
        parser.error(f"--systems takes raw, http, raft, dynamo and/or etcd, not {args.systems!r}")
    if "etcd" in systems and not shutil.which("etcd"):
        print(json.dumps({"note": "etcd not installed (apt-get install etcd-server): no ratios"}))
        systems.remove("etcd")

    results: dict[str, list[dict]] = {}
    workdir = tempfile.mkdtemp(prefix="capkv-floor-")
    try:
        for name in systems:
            if name == "etcd":
                procs, urls = start_etcd(workdir)
                target = EtcdTarget(urls, [p.pid for p in procs])
            else:
                procs, urls = start_floor(name)
                target = CapkvTarget(urls, "cp", [p.pid for p in procs])
            try:
                results[name] = asyncio.run(measure(name, target, WORKLOADS[name], args))
            finally:
                stop_procs(procs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    etcd = {line["workload"]: line for line in results.get("etcd", [])}
    for name in systems:
        for line in results[name]:
            reference = etcd.get(line.get("compare_with", line["workload"]))
            if name != "etcd" and reference and reference["ops_per_s"]:
                line["ratio_vs_etcd"] = round(line["ops_per_s"] / reference["ops_per_s"], 3)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
