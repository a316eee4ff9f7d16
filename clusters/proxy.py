"""Per-link TCP proxies: the wires between the nodes of a local cluster, made cuttable.

On one machine every node reaches every other over loopback, and loopback never loses a
packet. To partition a local cluster for real, each ordered pair of nodes (from, to) gets
its own listening port that forwards to `to`'s real peer port, and node `from` is started
with `--peer-route to=127.0.0.1:<that port>` (NodeConfig.peer_routes): it keeps dialling
`to` under `to`'s identity, but through the proxy. A link can then be

- cut: its open connections are closed (both ends see a reset/EOF) and new ones are
  accepted and closed at once (counted as `refused`), so the node keeps retrying and
  keeps failing, exactly like a peer behind a dead switch;
- delayed: every chunk is held `delay_ms` before it is passed on (each direction);
- healed: back to a plain forwarder.

A link carries the connections that `from` opens to `to`. pysyncobj keeps ONE connection
per pair, opened by the node with the greater address, so a Raft pair's traffic flows
through whichever of (a, b) / (b, a) that node dialled: a partition must cut both
directions of every pair it separates (`partition_links` does).

    with LinkProxies(["n1", "n2", "n3"], {"n1": "127.0.0.1:2380", ...}) as proxies:
        proxies.route("n1", "n2")          # '127.0.0.1:41234': give n1 --peer-route n2=...
        proxies.cut(partition_links([{"n1"}, {"n2", "n3"}]))
        proxies.stats()[("n1", "n2")].refused   # > 0 once n1 tried again
        proxies.heal()

The proxies run on one asyncio loop in a daemon thread; the methods above are synchronous
and safe to call from any thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Iterable, Mapping, Sequence

Link = tuple[str, str]  # (from node id, to node id)

# Bytes read from a socket at once; also the unit that a delay holds back.
CHUNK_BYTES = 64 * 1024
# At most this many chunks wait in one direction of a delayed connection before the reader
# stops reading (TCP backpressure does the rest): a delay never buffers without bound.
MAX_DELAYED_CHUNKS = 256
# No link may hold data longer than this: a typo of 30000 for 300 would freeze a cluster.
MAX_DELAY_MS = 10_000
# Open connections per link; a node dialling in a loop cannot exhaust file descriptors.
MAX_CONNECTIONS_PER_LINK = 64
# How long a synchronous call waits for the proxy loop to do what it was asked.
CONTROL_TIMEOUT_SECONDS = 10.0


def all_links(nodes: Sequence[str]) -> list[Link]:
    """Every ordered pair of distinct nodes: the links a full mesh of proxies needs.

    >>> all_links(["n1", "n2", "n3"])
    [('n1', 'n2'), ('n1', 'n3'), ('n2', 'n1'), ('n2', 'n3'), ('n3', 'n1'), ('n3', 'n2')]
    """
    return [(a, b) for a, b in itertools.permutations(nodes, 2)]


def partition_links(groups: Iterable[Iterable[str]]) -> set[Link]:
    """The links to cut so that nodes in different groups cannot talk, in both directions.

    Nodes of one group still reach each other; a node named in no group is not touched.

    >>> sorted(partition_links([{"n1"}, {"n2", "n3"}]))
    [('n1', 'n2'), ('n1', 'n3'), ('n2', 'n1'), ('n3', 'n1')]
    """
    sets = [frozenset(g) for g in groups]
    seen: set[str] = set()
    for group in sets:
        overlap = seen & group
        if overlap:
            raise ValueError(f"node(s) {', '.join(sorted(overlap))} are in two groups of a partition")
        seen |= group
    cut: set[Link] = set()
    for left, right in itertools.permutations(sets, 2):
        cut.update((a, b) for a in left for b in right)
    return cut


@dataclasses.dataclass
class LinkStats:
    """What one link has seen since it was created; counters only grow.

    `refused`: connections accepted and closed at once while the link was cut;
    `severed`: open connections closed by a cut; `accepted`: connections forwarded.
    """

    accepted: int = 0
    refused: int = 0
    severed: int = 0
    upstream_failed: int = 0  # the real peer port refused (node down)
    bytes_forward: int = 0  # from -> to
    bytes_backward: int = 0  # to -> from
    open: int = 0
    cut: bool = False
    delay_ms: float = 0.0
    held: int = 0  # chunks a delay held back before passing them on
    cut_since: float | None = None  # monotonic time of the current cut

    def copy(self) -> "LinkStats":
        return dataclasses.replace(self)


class _LinkProxy:
    """One listening port forwarding to one peer; lives on the proxy loop only."""

    def __init__(self, link: Link, target: tuple[str, int]):
        self.link = link
        self.target = target
        self.stats = LinkStats()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> None:
        self.server = await asyncio.start_server(self._accept, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self._sever()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    def cut(self) -> None:
        if not self.stats.cut:
            self.stats.cut = True
            self.stats.cut_since = time.monotonic()
        self._sever()

    def heal(self) -> None:
        self.stats.cut = False
        self.stats.cut_since = None
        self.stats.delay_ms = 0.0

    def _sever(self) -> None:
        for writer in list(self._writers):
            if not writer.is_closing():
                self.stats.severed += 1
            _abort(writer)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.cut or self.stats.open >= MAX_CONNECTIONS_PER_LINK:
            self.stats.refused += 1
            _abort(writer)
            return
        task = asyncio.current_task()
        self._connections.add(task)
        self.stats.open += 1
        upstream_writer = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), timeout=CONTROL_TIMEOUT_SECONDS
                )
            except (OSError, asyncio.TimeoutError):
                self.stats.upstream_failed += 1
                _abort(writer)
                return
            if self.stats.cut:  # cut while we were dialling
                self.stats.refused += 1
                _abort(writer)
                _abort(upstream_writer)
                return
            self.stats.accepted += 1
            self._writers.update((writer, upstream_writer))
            await asyncio.gather(
                self._pump(reader, upstream_writer, "bytes_forward"),
                self._pump(upstream_reader, writer, "bytes_backward"),
                return_exceptions=True,
            )
        finally:
            self.stats.open -= 1
            self._connections.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    _abort(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """Copy one direction until EOF or a cut; with a delay, each chunk waits its turn
        in a bounded queue so latency is added without cutting throughput."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_DELAYED_CHUNKS)
        sender = asyncio.ensure_future(self._send_delayed(queue, writer, counter))
        try:
            while not sender.done():
                data = await reader.read(CHUNK_BYTES)
                if not data or self.stats.cut:
                    break
                await queue.put((time.monotonic() + self.stats.delay_ms / 1000.0, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not sender.done():
                try:
                    queue.put_nowait(None)
                except asyncio.QueueFull:
                    sender.cancel()
            try:
                await sender
            except (OSError, asyncio.CancelledError):
                pass
            # Half-close would keep a cut link half alive; close both ends instead.
            _abort(writer)

    async def _send_delayed(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, counter: str) -> None:
        while True:
            item = await queue.get()
            if item is None or self.stats.cut:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                self.stats.held += 1
                await asyncio.sleep(wait)
            if self.stats.cut:
                return
            writer.write(data)
            await writer.drain()
            setattr(self.stats, counter, getattr(self.stats, counter) + len(data))


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()


class LinkProxies:
    """A full mesh of per-link proxies for `nodes`, forwarding to `peer_addresses`.

    Ports are picked by the OS when the proxies start (`start()`, or entering the
    `with` block) and stay bound until `close()`, so no other process can take them.
    """

    def __init__(self, nodes: Sequence[str], peer_addresses: Mapping[str, str], host: str = "127.0.0.1"):
        if len(set(nodes)) != len(nodes) or len(nodes) < 2:
            raise ValueError(f"proxies need at least two distinct nodes, not {list(nodes)}")
        missing = [n for n in nodes if n not in peer_addresses]
        if missing:
            raise ValueError(f"no peer address for {', '.join(missing)}")
        self.nodes = list(nodes)
        self.host = host
        self._targets = {n: _split(peer_addresses[n]) for n in nodes}
        self._links: dict[Link, _LinkProxy] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "LinkProxies":
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="capkv-link-proxies", daemon=True)
        self._thread.start()
        try:
            self._call(self._start_all())
        except BaseException:
            self.close()
            raise
        return self

    async def _start_all(self) -> None:
        for link in all_links(self.nodes):
            proxy = _LinkProxy(link, self._targets[link[1]])
            await proxy.start(self.host)
            self._links[link] = proxy

    def close(self) -> None:
        """Close every listening port and connection; idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._close_all(), loop)
            future.result(CONTROL_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(CONTROL_TIMEOUT_SECONDS)
        loop.close()

    async def _close_all(self) -> None:
        await asyncio.gather(*(p.close() for p in self._links.values()), return_exceptions=True)

    def __enter__(self) -> "LinkProxies":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- views ------------------------------------------------------------------------------

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    def route(self, source: str, target: str) -> str:
        """host:port where `source` must dial `target` (its `--peer-route target=...`)."""
        return f"{self.host}:{self._link(source, target).port}"

    def routes_for(self, source: str) -> dict[str, str]:
        """{target: host:port} for every other node: the `--peer-route`s of `source`."""
        return {b: self.route(a, b) for (a, b) in self._links if a == source}

    def stats(self) -> dict[Link, LinkStats]:
        """A snapshot of every link's counters."""
        return self._call_soon(lambda: {link: p.stats.copy() for link, p in self._links.items()})

    def cut_links(self) -> set[Link]:
        return {link for link, stats in self.stats().items() if stats.cut}

    # --- faults -------------------------------------------------------------------------------

    def cut(self, links: Iterable[Link]) -> None:
        """Cut each link now: open connections closed, new ones refused until `heal`."""
        chosen = [self._link(*link) for link in links]
        self._call_soon(lambda: [p.cut() for p in chosen])

    def delay(self, links: Iterable[Link], delay_ms: float) -> None:
        """Hold every chunk on these links `delay_ms` (0 removes the delay)."""
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be between 0 and {MAX_DELAY_MS}, not {delay_ms}")
        chosen = [self._link(*link) for link in links]

        def apply() -> None:
            for proxy in chosen:
                proxy.stats.delay_ms = float(delay_ms)

        self._call_soon(apply)

    def heal(self, links: Iterable[Link] | None = None) -> None:
        """Undo cuts and delays on `links` (default: all)."""
        chosen = list(self._links.values()) if links is None else [self._link(*link) for link in links]
        self._call_soon(lambda: [p.heal() for p in chosen])

    def evidence(self, links: Iterable[Link], baseline: Mapping[Link, LinkStats] | None = None) -> tuple[bool, dict]:
        """Did the nodes try to use these cut links since `baseline` (a `stats()` taken at
        the cut)? (shown, details): shown when some connection was refused or severed."""
        stats = self.stats()
        base = baseline or {}
        tried = sum(stats[l].refused + stats[l].severed - (base[l].refused + base[l].severed if l in base else 0)
                    for l in links)  # fmt: skip
        return tried > 0, {"cut_link_refusals": tried}

    def delay_evidence(self, links: Iterable[Link], baseline: Mapping[Link, LinkStats] | None = None) -> tuple[bool, dict]:
        """Did traffic on these delayed links wait since `baseline`? (shown, details): shown
        when some chunk was held back by the delay; `bytes` says how much crossed at all
        (none: the link was idle, e.g. between two Raft followers, so there was nothing to delay)."""
        stats = self.stats()
        base = baseline or {}

        def grown(link: Link, field: str) -> int:
            return getattr(stats[link], field) - (getattr(base[link], field) if link in base else 0)

        held = sum(grown(l, "held") for l in links)
        moved = sum(grown(l, "bytes_forward") + grown(l, "bytes_backward") for l in links)
        return held > 0, {"held_chunks": held, "bytes": moved}

    def _check(self) -> None:
        """Invariants: one proxy per ordered pair of distinct nodes, each on its own port."""
        assert set(self._links) == set(all_links(self.nodes)), "a link is missing or extra"
        ports = [p.port for p in self._links.values()]
        assert len(set(ports)) == len(ports) and all(ports), "proxy ports must be distinct and bound"
        for stats in self.stats().values():
            assert stats.open >= 0 and (stats.cut_since is not None) == stats.cut

    # --- internals ------------------------------------------------------------------------

    def _link(self, source: str, target: str) -> _LinkProxy:
        try:
            return self._links[(source, target)]
        except KeyError:
            raise ValueError(f"no link {source}->{target}; nodes are {', '.join(self.nodes)}") from None

    def _call(self, coroutine):
        if self._loop is None:
            raise RuntimeError("the proxies are not running (call start())")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT_SECONDS)

    def _call_soon(self, function):
        async def run():
            return function()

        return self._call(run())


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


__all__ = ["Link", "LinkProxies", "LinkStats", "all_links", "partition_links", "MAX_DELAY_MS"]
