"""`GET /v1/watch/{key}` and `GET /v1/watch?prefix=P`: a service watch as a stream.

    $ curl -N 'http://127.0.0.1:2379/v1/watch?prefix=config/&start_revision=5&prev'
    {"type": "put", "key": "config/a", "value": "1", "create_revision": 5, "mod_revision": 5, "version": 1}
    {"type": "delete", "key": "config/a", "create_revision": 0, "mod_revision": 6, "version": 0, "prev": {...}}
    {"type": "progress", "revision": 6}                  # at least every 10 s when idle

One JSON object a line (`application/x-ndjson`), or Server-Sent Events with `Accept:
text/event-stream` (`event: put`, `id: <mod_revision>`, `data: <the same JSON>`; a
browser's EventSource reconnects with `Last-Event-ID`, which resumes at that id + 1).

Why the stream never grows the server's memory: the service's iterator keeps a bounded
buffer per watcher (a watcher too far behind gets a final canceled batch, passed on as
`{"type": "canceled", "reason": ...}`), and this route hands batches from the iterator to
the response through a small bounded queue and awaits every write, so a client that does
not read stops the route from pulling, and the service cancels the watch.

A client that goes away frees its watch: the route checks the connection at least once a
second while idle, and every write to a closed connection ends the stream.

`WatchFeed` and `next_item` are shared with the etcd gateway's `/v3/watch`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from aiohttp import web

from api.errors import NotImplementedYet, invalid, not_in_mode
from api.routes.common import Params, key_from_path, render_kv, service_of
from api.service import ServiceError, WatchBatch, WatchEvent, prefix_end

log = logging.getLogger("capkv.api.watch")

WATCH_KEY_ROUTE_PREFIX = "/v1/watch/"
WATCH_PARAMS = ("start_revision", "prev", "progress_ms")
WATCH_PREFIX_PARAMS = WATCH_PARAMS + ("prefix",)
# API.md: a progress event at least every 10 s when idle; `progress_ms` may ask for more often.
PROGRESS_MS_DEFAULT = 10_000
PROGRESS_MS_MIN = 100
# Batches waiting between the service's iterator and the response: small, so a client
# that stops reading soon stops the route from pulling (the service then cancels the watch).
FEED_QUEUE_BATCHES = 16
# Batches already queued are written together up to about this many bytes (one write
# instead of one per event when a watcher is behind); aiohttp then drains the socket
# whenever more than 64 KiB wait in it, so a slow reader stops the route here.
COALESCE_BYTES = 256 * 1024
# How long the route waits for the first batch before sending the headers, so a
# compacted start_revision is a 410 rather than a canceled event in a 200 stream.
FIRST_BATCH_WAIT_SECONDS = 0.3
# How often an idle stream checks that its client is still connected.
CLIENT_CHECK_SECONDS = 1.0
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


class WatchFeed:
    """Pulls one service watch iterator in its own task and puts `(tag, batch, error)`
    on a bounded queue (shared by several feeds on one etcd stream). Ends after a
    canceled batch or an error; `close()` cancels the task, which closes the iterator
    and so frees the service's watch."""

    def __init__(self, iterator: AsyncIterator[WatchBatch], queue: asyncio.Queue, tag: Any = None):
        self.iterator = iterator
        self.queue = queue
        self.tag = tag
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for batch in self.iterator:
                await self.queue.put((self.tag, batch, None))
                if batch.canceled:
                    return
        except ServiceError as exc:
            await self.queue.put((self.tag, None, exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client as a canceled watch
            log.exception("watch iterator failed")
            await self.queue.put((self.tag, None, exc))
        finally:
            close = getattr(self.iterator, "aclose", None)
            if close is not None:
                try:
                    await close()
                except (RuntimeError, StopAsyncIteration):  # already running or closed
                    pass

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing, nothing to report
            pass


class Stream:
    """An open watch stream, registered with the app so that a node shutting down ends it
    (aiohttp waits for running handlers before it stops the service)."""

    def __init__(self, request: web.Request, queue: asyncio.Queue):
        self.request = request
        self.queue = queue
        self.stopping = False

    def __enter__(self) -> "Stream":
        self.request.app[STREAMS_KEY].add(self)
        return self

    def __exit__(self, *exc) -> None:
        self.request.app[STREAMS_KEY].discard(self)

    def stop(self) -> None:
        self.stopping = True
        try:
            self.queue.put_nowait(None)  # wakes the loop; a full queue wakes it anyway
        except asyncio.QueueFull:
            pass


STREAMS_KEY: web.AppKey[set] = web.AppKey("capkv_watch_streams", set)


async def _end_streams(app: web.Application) -> None:
    for stream in list(app[STREAMS_KEY]):
        stream.stop()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def next_item(stream: Stream):
    """The next queued item, or None once the client has gone away or the node stops."""
    while not stream.stopping:
        try:
            item = stream.queue.get_nowait()  # under load there usually is one: no timer needed
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(CLIENT_CHECK_SECONDS):
                    item = await stream.queue.get()
            except TimeoutError:
                if client_gone(stream.request):
                    return None
                continue
        if item is not None and not stream.stopping:
            return item
    return None


def render_watch_event(event: WatchEvent) -> dict:
    """API.md's event: {type, key, value?, create_revision, mod_revision, version, lease?, prev?}."""
    out: dict[str, Any] = {"type": event.type}
    out.update(render_kv(event.kv))
    if event.prev is not None:
        out["prev"] = render_kv(event.prev)
    return out


def render_batch(batch: WatchBatch) -> list[dict]:
    """The lines one batch becomes: an event each; a progress notice; or the final
    canceled notice (with `compact_revision` when history was compacted)."""
    if batch.canceled:
        last = {"type": "canceled", "reason": batch.reason or "canceled", "revision": batch.revision}
        if batch.compact_revision:
            last["compact_revision"] = batch.compact_revision
        return [render_watch_event(e) for e in batch.events] + [last]
    if not batch.events:
        return [{"type": "progress", "revision": batch.revision}]
    return [render_watch_event(e) for e in batch.events]


def frame(message: dict, sse: bool) -> bytes:
    data = json.dumps(message, separators=(",", ":"))
    if not sse:
        return (data + "\n").encode("utf-8")
    lines = [f"event: {message['type']}"]
    if message["type"] in ("put", "delete"):
        lines.append(f"id: {message['mod_revision']}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _check_served(request: web.Request) -> None:
    service = service_of(request)
    if service.mode != "cp":
        raise not_in_mode("watch", service.mode, "cp")
    if getattr(service, "watch", None) is None:
        raise NotImplementedYet("watch is not implemented yet by this node's cp service")


async def watch_key(request: web.Request) -> web.StreamResponse:
    _check_served(request)
    key = key_from_path(request, WATCH_KEY_ROUTE_PREFIX)
    params = Params(request, WATCH_PARAMS)
    return await _watch(request, params, key, None)


async def watch_prefix(request: web.Request) -> web.StreamResponse:
    _check_served(request)
    params = Params(request, WATCH_PREFIX_PARAMS)
    prefix = params.key_text("prefix", allow_empty=True)
    if prefix is None:
        raise invalid("prefix", "give the keys to watch: /v1/watch/<key>, or /v1/watch?prefix=<prefix> (empty: every key)")
    return await _watch(request, params, prefix, prefix_end(prefix))


async def _watch(request: web.Request, params: Params, start: bytes, end: bytes | None) -> web.StreamResponse:
    service = service_of(request)
    start_revision = params.integer("start_revision", minimum=1)
    prev = params.flag("prev")
    progress_ms = params.integer("progress_ms", minimum=PROGRESS_MS_MIN, maximum=PROGRESS_MS_DEFAULT, default=PROGRESS_MS_DEFAULT)
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if start_revision is None and last_event_id:
        if not last_event_id.isdigit():
            raise invalid("last_event_id", "the Last-Event-ID header must be a revision (a whole number)")
        start_revision = int(last_event_id) + 1
    replay = start_revision is not None
    if start_revision is None:
        # Pinned to the store's revision now: every later event is delivered, however late
        # the service's iterator gets going (a client may write right after connecting).
        status = await service.status()
        if status.get("revision"):
            start_revision = int(status["revision"]) + 1
    sse = SSE in request.headers.get("Accept", "")
    queue: asyncio.Queue = asyncio.Queue(maxsize=FEED_QUEUE_BATCHES)
    iterator = service.watch(start, end, start_revision=start_revision, prev=prev, progress_interval=progress_ms / 1000)
    feed = WatchFeed(iterator, queue)
    try:
        first = None
        if replay:  # only a replay the client asked for can find its history compacted
            try:
                first = await asyncio.wait_for(queue.get(), FIRST_BATCH_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass
        if first is not None and first[2] is not None:
            raise first[2]  # e.g. Compacted: 410 with the compact revision, before any stream
        response = web.StreamResponse(headers={"Content-Type": SSE if sse else NDJSON, "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})  # fmt: skip
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"")  # the headers go out now, not with the first event
        item = first
        with Stream(request, queue) as stream:
            while True:
                if item is None:
                    item = await next_item(stream)
                    if item is None:
                        if stream.stopping:  # tell the client to resume elsewhere
                            last = {"type": "canceled", "reason": "node stopping"}
                            try:
                                await response.write(frame(last, sse))
                            except ConnectionError:
                                pass
                        break  # the client went away, or this node is stopping
                # What is already queued goes out in one write, up to COALESCE_BYTES:
                # under load that is far fewer writes than one per event.
                payload = bytearray()
                ended = False
                while True:
                    _, batch, error = item
                    if error is not None:
                        batch = _error_batch(error)
                    for message in render_batch(batch):
                        payload += frame(message, sse)
                    if batch.canceled:
                        ended = True
                        break
                    if len(payload) >= COALESCE_BYTES or queue.empty():
                        break
                    item = queue.get_nowait()
                    if item is None:  # a stop signal: the loop sees `stream.stopping` next
                        break
                item = None
                try:
                    await response.write(bytes(payload))
                except ConnectionError:
                    break
                if ended:
                    break
        return response
    finally:
        await feed.close()


def _error_batch(error: BaseException) -> WatchBatch:
    details = getattr(error, "details", {}) or {}
    reason = getattr(error, "code", "error")
    return WatchBatch(revision=0, events=[], canceled=True, reason=f"{reason}: {error}",
                      compact_revision=int(details.get("compact_revision", 0) or 0))  # fmt: skip


def add_routes(app: web.Application) -> None:
    app[STREAMS_KEY] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/v1/watch", watch_prefix)
    app.router.add_get("/v1/watch/{key:.*}", watch_key)


__all__ = ["WatchFeed", "Stream", "client_gone", "next_item", "render_batch", "render_watch_event", "frame", "add_routes",
           "WATCH_PARAMS", "WATCH_PREFIX_PARAMS"]  # fmt: skip
