"""A seeded in-memory network between simulated ap nodes: the twin of dynamo.transport.

Every call takes a random delay each way, may be dropped (the caller waits out its timeout,
as with a lost packet; a dropped *reply* means the request was applied), may be delivered
twice (the copy is handled too, its reply discarded), and fails when the two nodes sit in
different partition groups or the callee has crashed (refused at once). Payloads go
through JSON both ways, as on the wire. All randomness comes from one `random.Random`.
"""
from __future__ import annotations

import asyncio
import json
import random

from dynamo.transport import PeerUnreachable, RemoteError


class SimNetwork:
    def __init__(self, rng: random.Random, *, min_delay=0.0005, max_delay=0.02, drop=0.0, duplicate=0.0):
        self.rng = rng
        self.min_delay, self.max_delay = min_delay, max_delay
        self.drop, self.duplicate = drop, duplicate
        self.handlers: dict[str, object] = {}  # node id -> async handle(method, payload)
        self.crashed: set[str] = set()
        self.groups: list[set[str]] | None = None
        self.messages = 0
        self._tasks: set[asyncio.Task] = set()

    def connected(self, a: str, b: str) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    def partition(self, *groups) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def _delay(self) -> float:
        return self.rng.uniform(self.min_delay, self.max_delay)

    def transport(self, src: str) -> "SimTransport":
        return SimTransport(self, src)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def call(self, src: str, dst: str, method: str, payload: dict, timeout: float) -> dict:
        self.messages += 1
        wire = json.dumps(payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request_delay, reply_delay = self._delay(), self._delay()
        lost_request = self.rng.random() < self.drop
        lost_reply = self.rng.random() < self.drop
        duplicated = self.rng.random() < self.duplicate
        if dst in self.crashed or src in self.crashed:
            await asyncio.sleep(min(request_delay, timeout))
            raise PeerUnreachable(f"{dst} refused (crashed)")
        if not self.connected(src, dst) or lost_request:
            await asyncio.sleep(timeout)
            raise PeerUnreachable(f"{src}->{dst} timed out (partition or loss)")
        await asyncio.sleep(min(request_delay, timeout))
        if loop.time() >= deadline:
            raise PeerUnreachable("timed out")
        if dst in self.crashed or dst not in self.handlers:
            raise PeerUnreachable(f"{dst} refused (crashed)")
        handler = self.handlers[dst]
        server = self._spawn(handler(method, json.loads(wire)))  # runs to the end even if we give up
        if duplicated:
            self._spawn(self._duplicate(handler, method, wire))
        done, _ = await asyncio.wait({server}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            raise PeerUnreachable("timed out waiting for the handler")
        try:
            reply = server.result()
        except RemoteError as exc:
            error = exc
        else:
            error = None
        if lost_reply or not self.connected(src, dst) or dst in self.crashed:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            raise PeerUnreachable("reply lost")
        await asyncio.sleep(min(reply_delay, max(0.0, deadline - loop.time())))
        if loop.time() >= deadline:
            raise PeerUnreachable("timed out")
        if error is not None:
            raise RemoteError(error.code, error.message)
        return json.loads(json.dumps(reply))

    async def _duplicate(self, handler, method, wire) -> None:
        await asyncio.sleep(self._delay())
        try:
            await handler(method, json.loads(wire))
        except Exception:
            pass

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class SimTransport:
    def __init__(self, network: SimNetwork, src: str):
        self.network, self.src = network, src

    async def call(self, node: str, method: str, payload: dict, timeout: float) -> dict:
        return await self.network.call(self.src, node, method, payload, timeout)

    async def close(self) -> None:
        pass
