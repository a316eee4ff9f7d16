"""pysyncobj behind one small seam: the only module of capkv that imports it.

`RaftNode` replicates state-machine commands through pysyncobj 0.3.17 and adds what the
library lacks for an etcd-like store (research/pysyncobj.md, cited as §N):

* One replicated entry point, `apply(command)`, that never raises (§0.4, §1.3): commands
  are data; the Raft index of each entry is passed to the state machine, which skips
  entries it already holds after a restart.
* Durable acknowledgements with `sync="always"` (§0.2, §4.1): pysyncobj never fsyncs.
  Here its journal is a `FileJournal` that knows when it is dirty, and once per tick the
  node msyncs it; a follower's replies to AppendEntries (`next_node_idx`) are held back
  until that sync, and the leader syncs its own appended entries before the tick in which
  it could count them. So an entry is on stable storage on a majority before it commits.
  Term and vote are fsynced before any message that reflects them. `batch` syncs the
  journal at most every `sync_interval_ms` without holding replies; `never` leaves it to
  the OS (pysyncobj's own behaviour).
* Snapshots that do not stall heartbeats (§4.2): the serializer pins the snapshot on the
  tick thread (a revision and a copy of the request ids) and a background thread writes
  the file from the engine's immutable history rows, then fsyncs the engine so the log
  prefix the snapshot replaces is durable in the engine too.
* Security (§8): a password (Fernet) always, and the peer port bound to the configured
  address only.
* Outcomes translated out of FAIL_REASON: `applied`, `not_applied` (safe to retry) or
  `unknown` (may have applied).

Threads: pysyncobj runs everything (apply, callbacks, serializer) on its tick thread,
which dies when the thread that built the node dies: build `RaftNode` on the main thread.
`submit()` is thread-safe; its callback runs on the tick thread.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.node import TCPNode
from pysyncobj.pickle import dumps as _pickle_dumps
from pysyncobj.transport import TCPTransport

from . import snapshot as snapshot_file
from .state_machine import KVStateMachine

logger = logging.getLogger(__name__)

APPLIED = "applied"
NOT_APPLIED = "not_applied"  # definitely not applied: safe to retry as is
UNKNOWN = "unknown"  # may or may not have been applied

_OUTCOMES = {
    FAIL_REASON.SUCCESS: APPLIED,
    FAIL_REASON.QUEUE_FULL: NOT_APPLIED,
    FAIL_REASON.MISSING_LEADER: NOT_APPLIED,
    FAIL_REASON.DISCARDED: NOT_APPLIED,  # another entry won its index (§1.3)
    FAIL_REASON.NOT_LEADER: NOT_APPLIED,
    FAIL_REASON.LEADER_CHANGED: UNKNOWN,
    FAIL_REASON.REQUEST_DENIED: NOT_APPLIED,
    FAIL_REASON.UNKNOWN_OUTCOME: UNKNOWN,
}
_REASONS = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}


@dataclasses.dataclass(frozen=True)
class RaftOptions:
    """pysyncobj tuning. Each default says why (measurements in research/pysyncobj.md)."""

    # Election timeout range; pysyncobj requires min > 3 * heartbeat.
    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 1.4
    heartbeat_s: float = 0.1
    # A leader that hears from no majority for this long steps down. The default 30 s
    # keeps a partitioned leader answering (§3); two election timeouts is enough.
    leader_fallback_s: float = 2.8
    # Dead-connection timer (>= election max) and reconnect interval (default 5 s makes a
    # restarted peer wait seconds before it is dialled again).
    connection_timeout_s: float = 3.5
    connection_retry_s: float = 0.5
    # Snapshot when the log has this many entries (the log lives in RAM, §6.2) or this
    # much time passed. 5 000 (the default) snapshots every second under load.
    log_compaction_entries: int = 100_000
    log_compaction_interval_s: float = 3600.0
    # Commands waiting for the tick thread; beyond it a write is refused (503).
    commands_queue_size: int = 20_000
    # How long a write may wait for a leader inside pysyncobj; we fail fast and retry
    # above it within the request's own timeout instead.
    commands_wait_leader: bool = False
    # msync the journal at most this often with sync="batch".
    batch_sync_interval_ms: float = 5.0
    # Replies held for the journal sync (sync="always"), per tick; past it we sync at once.
    max_held_replies: int = 10_000
    # Members added and removed at run time (one at a time, research/pysyncobj.md §5).
    dynamic_membership: bool = True

    def conf_kwargs(self) -> dict:
        return dict(
            raftMinTimeout=self.election_timeout_min_s,
            raftMaxTimeout=self.election_timeout_max_s,
            appendEntriesPeriod=self.heartbeat_s,
            leaderFallbackTimeout=self.leader_fallback_s,
            connectionTimeout=self.connection_timeout_s,
            connectionRetryTime=self.connection_retry_s,
            logCompactionMinEntries=self.log_compaction_entries,
            logCompactionMinTime=self.log_compaction_interval_s,
            commandsQueueSize=self.commands_queue_size,
            commandsWaitLeader=self.commands_wait_leader,
            # Send each command at once instead of on the next 100 ms heartbeat: ~0.5 ms
            # commits instead of ~100 ms (§6.2).
            appendEntriesUseBatch=False,
            dynamicMembershipChange=self.dynamic_membership,
            maxBindRetries=0,
            bindRetryTime=0.5,
        )


class _TruncationWarnings(logging.Filter):
    """Counts pysyncobj's "truncating already-applied log entries" CRITICAL lines and lets
    at most one through per minute: under load 0.3.17 can print hundreds a second."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._last = -1e9

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncating already-applied" not in str(record.msg):
            return True
        self.count += 1
        now = time.monotonic()
        if now - self._last >= 60.0:
            self._last = now
            return True
        return False


truncation_warnings = _TruncationWarnings()
logging.getLogger("pysyncobj.syncobj").addFilter(truncation_warnings)


# --- durable journal ----------------------------------------------------------------------


class _DurableMetaStorer(MetaStorer):
    """pysyncobj's meta file (term, vote, commit index), fsynced before the rename."""

    def storeMeta(self, meta):  # noqa: N802 - pysyncobj's name
        path = self.getPath()
        with open(path + ".tmp", "wb") as f:
            f.write(_pickle_dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        snapshot_file.fsync_directory(path)


class _DurableJournal(FileJournal):
    """A FileJournal that tracks unsynced changes; `sync()` makes them durable."""

    def __init__(self, path: str):
        super().__init__(path)
        self._FileJournal__metaStorer = _DurableMetaStorer(path + ".meta")
        snapshot_file.fsync_directory(path)
        self.dirty = True
        self.syncs = 0
        self.sync_seconds = 0.0

    def add(self, command, idx, term):
        super().add(command, idx, term)
        self.dirty = True

    def clear(self):
        super().clear()
        self.dirty = True

    def deleteEntriesFrom(self, entryFrom):  # noqa: N802
        super().deleteEntriesFrom(entryFrom)
        self.dirty = True

    def deleteEntriesTo(self, entryTo):  # noqa: N802
        super().deleteEntriesTo(entryTo)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            started = time.perf_counter()
            # fdatasync writes back the pages dirtied through pysyncobj's shared mmap (one
            # page cache on Linux) and is several times cheaper here than msync of the
            # whole mapping (measured: 0.06 ms vs 0.4-1.7 ms).
            resizable = self._FileJournal__journalFile
            os.fdatasync(resizable._ResizableFile__f.fileno())
            self.sync_seconds += time.perf_counter() - started
            self.syncs += 1


class _DurableJournalPath(str):
    """Marks `journalFile` for `_create_journal`: a str, so pysyncobj passes it through."""


_original_create_journal = _syncobj_module.createJournal


def _create_journal(journalFile=None):  # noqa: N803 - pysyncobj's name
    if isinstance(journalFile, _DurableJournalPath):
        return _DurableJournal(str(journalFile))
    return _original_create_journal(journalFile)


# pysyncobj builds its journal with a module-level factory and offers no hook; this
# wrapper changes nothing for journals not marked durable.
_syncobj_module.createJournal = _create_journal


# --- transport and nodes ---------------------------------------------------------------------


class PeerNode(TCPNode):
    """A peer named by its peer address (its Raft identity) but dialled at `route`, so a
    test proxy can sit in between (NodeConfig.peer_routes)."""

    def __init__(self, address: str, route: str | None = None, member_id: str = ""):
        super().__init__(address)
        self.member_id = member_id
        route = route or address
        self._route_host, port = route.rsplit(":", 1)
        self._route_port = int(port)

    @property
    def ip(self):
        from pysyncobj.dns_resolver import globalDnsResolver

        return globalDnsResolver().resolve(self._route_host)

    @property
    def port(self):
        return self._route_port


def trim_append_entries(message: dict, term_at: Callable[[int], int | None], last_index: int) -> dict:
    """Rewrite an AppendEntries so pysyncobj truncates a follower's log only on a conflict.

    pysyncobj 0.3.17 deletes every entry after `prevLogIdx` whenever the follower has more
    (syncobj.py:991-1006), even when nothing conflicts, e.g. for a heartbeat sent with a
    stale nextIndex: a follower's log then shrinks below what it acknowledged, and a
    committed entry can vanish from a majority (research/pysyncobj.md §0.3). Raft deletes
    entries only from the first conflict (§5.3 of the paper). So before pysyncobj sees the
    message, drop the entries the follower already holds with the same term and move
    `prevLogIdx` to the last of them; when nothing new is left and every entry the follower
    holds beyond it carries the leader's current term (so it came from this leader, and
    matches its log), point `prevLogIdx` at the follower's last entry instead.

    `term_at(index)` is the term of the follower's entry at `index`, or None.

        follower log terms 1..6: [1, 1, 2, 2, 2, 2]; leader (term 2) sends prev=3,
        entries 4..5 with terms [2, 2]  ->  prev=6, no entries: nothing is truncated
        same, but entries 4..5 with terms [3, 3]  ->  prev=3, entries 4..5: a real conflict
    """
    if "prevLogIdx" not in message or "transmission" in message:
        return message
    prev_index = message["prevLogIdx"]
    prev_term = message["prevLogTerm"]
    if prev_index is None or term_at(prev_index) != prev_term:
        return message  # pysyncobj answers the mismatch itself
    entries = message.get("entries") or []
    skip = 0
    for entry in entries:
        _, index, term = entry
        if index > last_index or term_at(index) != term:
            break
        skip += 1
    if skip:
        prev_index, prev_term = entries[skip - 1][1], entries[skip - 1][2]
    rest = entries[skip:]
    if not rest and prev_index < last_index:
        leader_term = message["term"]
        if all(term_at(i) == leader_term for i in range(prev_index + 1, last_index + 1)):
            prev_index, prev_term = last_index, term_at(last_index)
    if prev_index == message["prevLogIdx"] and skip == 0:
        return message
    trimmed = dict(message)
    trimmed["prevLogIdx"], trimmed["prevLogTerm"], trimmed["entries"] = prev_index, prev_term, rest
    return trimmed


class _HoldingTransport(TCPTransport):
    """Holds a follower's AppendEntries replies until the journal sync of this tick, and
    trims AppendEntries so that only a conflict truncates the log (`trim_append_entries`)."""

    trimmed_messages = 0

    def _onMessageReceived(self, node, message):  # noqa: N802 - pysyncobj's name
        if isinstance(message, dict) and message.get("type") == "append_entries" and "prevLogIdx" in message:
            log = getattr(self._syncObj, "_SyncObj__raftLog")
            first_index = log[0][1]
            last_index = log[-1][1]

            def term_at(index: int) -> int | None:
                if index < first_index or index > last_index:
                    return None
                return log[index - first_index][2]

            if message.get("term", 0) >= self._syncObj.raftCurrentTerm:
                trimmed = trim_append_entries(message, term_at, last_index)
                if trimmed is not message:
                    self.trimmed_messages += 1
                    message = trimmed
        return super()._onMessageReceived(node, message)

    def send(self, node, message):
        durability = getattr(self._syncObj, "_capkv_durability", None)
        if durability is not None and durability.holds_replies and isinstance(message, dict):
            if message.get("type") == "next_node_idx":
                return durability.hold(node, message)
        return super().send(node, message)

    def send_now(self, node, message):
        return super().send(node, message)


class _Durability:
    """Per-tick journal sync and the replies waiting for it (runs on the tick thread)."""

    def __init__(self, sync: str, options: RaftOptions):
        self.sync_mode = sync
        self.holds_replies = sync == "always"
        self.interval = options.batch_sync_interval_ms / 1000.0
        self.max_held = options.max_held_replies
        self.held: list = []
        self.journal: _DurableJournal | None = None
        self.transport: _HoldingTransport | None = None
        self._last_sync = 0.0

    def hold(self, node, message) -> bool:
        self.held.append((node, message))
        if len(self.held) >= self.max_held:
            self.on_tick()
        return True

    def on_tick(self) -> None:
        journal = self.journal
        if journal is None:
            return
        if self.sync_mode == "always":
            journal.sync()
        elif self.sync_mode == "batch":
            now = time.monotonic()
            if journal.dirty and now - self._last_sync >= self.interval:
                self._last_sync = now
                journal.sync()
        if self.held:
            held, self.held = self.held, []
            for node, message in held:
                self.transport.send_now(node, message)


# --- snapshots -------------------------------------------------------------------------------


def _yielding(rows, every: int = 64):
    """Hand the GIL to the tick thread every few rows: a snapshot of a large store is
    CPU-bound Python, and the tick thread must keep heartbeats going meanwhile."""
    for count, row in enumerate(rows, 1):
        yield row
        if count % every == 0:
            time.sleep(0)


class _Snapshots:
    """pysyncobj's custom serializer trio, writing `snapshot.py` files off the tick thread.

    pysyncobj renames `tmpFile` over the dump right after `serializer()` returns, so the
    serializer puts a hard link of the current dump there (a no-op rename), and the
    background thread, started by the next `checker()` call (after that rename), replaces
    the dump when it is complete. Until `checker()` reports success pysyncobj neither
    truncates its log nor ships the dump.
    """

    def __init__(self, path: str, state_machine: KVStateMachine, durable: bool):
        self.path = path
        self.sm = state_machine
        self.durable = durable
        self._status = SERIALIZER_STATE.NOT_SERIALIZING
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: tuple | None = None
        self.own_index = -1  # index of the last snapshot this node wrote itself
        self.written = 0
        self.installed = 0
        self.skipped_installs = 0
        self.last_error: str | None = None
        self.last_seconds = 0.0

    # tick thread
    def serialize(self, tmp_file: str, raft_data) -> None:
        last_entry, prev_entry, cluster = raft_data
        source = self.sm.capture_snapshot()
        header = {
            "index": int(last_entry[1]),
            "revision": source.revision,
            "compact_revision": source.compact_revision,
            "last_entry": snapshot_file.encode_entry(last_entry),
            "prev_entry": snapshot_file.encode_entry(prev_entry),
            "cluster": sorted(getattr(n, "address", str(n)) for n in cluster),
        }
        try:
            os.unlink(tmp_file)
        except FileNotFoundError:
            pass
        placeholder = not os.path.exists(self.path)
        if placeholder:
            with open(tmp_file, "wb") as f:
                f.write(b"CAPKV-PLACEHOLDER")  # refused by the deserializer; replaced below
        else:
            os.link(self.path, tmp_file)
        # Start writing only from the next `checker()` call: pysyncobj renames tmp_file
        # over the dump after this returns, and must not do so after our thread did.
        with self._lock:
            self._status = SERIALIZER_STATE.SERIALIZING
            self._pending = (header, source, placeholder)

    def _write(self, header: dict, source, placeholder: bool) -> None:
        started = time.perf_counter()
        try:
            # The log prefix this snapshot replaces must be durable in the engine first.
            self.sm.engine.sync()
            snapshot_file.write_snapshot(self.path, header, _yielding(source.rows()), durable=self.durable)
            self.own_index = header["index"]
            status = SERIALIZER_STATE.SUCCESS
            self.written += 1
        except Exception as exc:  # noqa: BLE001 - reported through the checker
            logger.exception("writing the snapshot failed")
            self.last_error = repr(exc)
            status = SERIALIZER_STATE.FAILED
            if placeholder:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally_done = getattr(source, "done", None)
        if finally_done is not None:
            finally_done()  # compaction may delete history rows again
        self.last_seconds = time.perf_counter() - started
        with self._lock:
            self._status = status

    # tick thread
    def checker(self):
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._thread = threading.Thread(target=self._write, args=pending, name="capkv-snapshot", daemon=True)
            self._thread.start()
        with self._lock:
            status = self._status
            if status in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._status = SERIALIZER_STATE.NOT_SERIALIZING
            return status

    # tick thread: at start-up and when a leader shipped a snapshot
    def deserialize(self, path: str):
        writer = self._thread
        if writer is not None and writer.is_alive():
            # Our own snapshot is still being written from the engine that an install is
            # about to wipe: let it finish first (it reads rows the install deletes).
            writer.join()
            header = snapshot_file.verify(path)
            if int(header["index"]) == self.own_index:
                # ...and it renamed its file over the one pysyncobj had just received.
                # Refuse this time; the leader ships its snapshot again.
                raise RuntimeError("a local snapshot replaced the one just received; waiting for it again")
        header = snapshot_file.verify(path)
        index = int(header["index"])
        if index > self.sm.applied_index:
            self.sm.install_snapshot(
                index, int(header["revision"]), int(header["compact_revision"]), snapshot_file.read_rows(path)
            )
            self.installed += 1
        else:
            self.skipped_installs += 1
        return (
            snapshot_file.decode_entry(header["last_entry"]),
            snapshot_file.decode_entry(header["prev_entry"]),
            list(header["cluster"]),
        )

    def wait(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


# --- the node ---------------------------------------------------------------------------------


class _KVSyncObj(SyncObj):
    def __init__(self, state_machine: KVStateMachine, durability: _Durability, *args, **kwargs):
        self._capkv_sm = state_machine
        self._capkv_durability = durability
        super().__init__(*args, **kwargs)

    @replicated
    def apply(self, command):
        # pysyncobj applies entry N while raftLastApplied is N - 1 (syncobj.py:708-725).
        return self._capkv_sm.apply(command, self.raftLastApplied + 1)


@dataclasses.dataclass(frozen=True)
class Peer:
    member_id: str
    address: str  # the Raft identity, host:port
    route: str | None = None  # where to dial it, when not `address`


class RaftNode:
    """One Raft member replicating `state_machine`'s commands.

        node = RaftNode(sm, Peer("n1", "127.0.0.1:2380"), [Peer("n2", "127.0.0.1:22380"), ...],
                        data_dir="/var/lib/capkv/n1/raft", password=secret, sync="always")
        node.submit({"v": 1, "op": "barrier"}, lambda result, outcome, reason: ...)
        node.destroy()
    """

    def __init__(
        self,
        state_machine: KVStateMachine,
        self_peer: Peer,
        peers: list[Peer],
        *,
        data_dir: str,
        password: str,
        sync: str = "always",
        options: RaftOptions | None = None,
        on_state_changed: Callable[[str, str], None] | None = None,
        bind_timeout_s: float = 3.0,
    ) -> None:
        if not password:
            raise ValueError("the Raft port needs a password: without one anyone who reaches it runs code")
        if sync not in ("always", "batch", "never"):
            raise ValueError(f"sync must be always, batch or never, not {sync!r}")
        options = options or RaftOptions()
        os.makedirs(data_dir, exist_ok=True)
        self.state_machine = state_machine
        self.sync = sync
        self.options = options
        self.self_peer = self_peer
        self.peers = list(peers)
        self.leader_changes = 0  # times the known leader changed to another node
        self._last_leader = None
        self._on_state_changed = on_state_changed
        self._durability = _Durability(sync, options)
        journal_path = os.path.join(data_dir, "journal")
        durable_journal = sync in ("always", "batch")
        self._snapshots = _Snapshots(os.path.join(data_dir, "snapshot"), state_machine, durable=sync != "never")
        conf = SyncObjConf(
            password=password,
            bindAddress=self_peer.address,
            journalFile=_DurableJournalPath(journal_path) if durable_journal else journal_path,
            fullDumpFile=os.path.join(data_dir, "snapshot"),
            serializer=self._snapshots.serialize,
            deserializer=self._snapshots.deserialize,
            serializeChecker=self._snapshots.checker,
            onStateChanged=self._state_changed,
            **options.conf_kwargs(),
        )
        self._self_node = PeerNode(self_peer.address, None, self_peer.member_id)
        self._nodes = {p.address: PeerNode(p.address, p.route, p.member_id) for p in self.peers}
        self._member_by_address = {p.address: p.member_id for p in [self_peer, *self.peers]}
        self._obj = _KVSyncObj(
            state_machine,
            self._durability,
            self._self_node,
            list(self._nodes.values()),
            conf,
            nodeClass=PeerNode,
            transportClass=_HoldingTransport,
        )
        transport = getattr(self._obj, "_SyncObj__transport")
        deadline = time.monotonic() + bind_timeout_s
        while not transport.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        if not transport.ready:
            self._obj.destroy()
            raise OSError(f"cannot bind the Raft peer port {self_peer.address} (in use, or not an address of this host)")
        journal = getattr(self._obj, "_SyncObj__raftLog")
        self._durability.journal = journal if isinstance(journal, _DurableJournal) else None
        self._durability.transport = getattr(self._obj, "_SyncObj__transport")
        self._obj.addOnTickCallback(self._durability.on_tick)
        self._obj.addOnTickCallback(self._watch_leader)

    # --- callbacks on the tick thread ---

    def _watch_leader(self) -> None:
        leader = self._obj._getLeader()
        if leader is not None and leader != self._last_leader:
            if self._last_leader is not None:
                self.leader_changes += 1
            self._last_leader = leader

    def _state_changed(self, old: int, new: int) -> None:
        if self._on_state_changed is not None:
            names = {0: "follower", 1: "candidate", 2: "leader"}
            self._on_state_changed(names.get(old, str(old)), names.get(new, str(new)))

    # --- API ---

    def submit(self, command: Any, callback: Callable[[Any, str, str], None]) -> None:
        """Replicate `command`; `callback(result, outcome, reason)` runs on the tick thread
        once this node applied it (or it failed). `outcome` is APPLIED, NOT_APPLIED or UNKNOWN."""

        def done(result, error):
            callback(result, _OUTCOMES.get(error, UNKNOWN), _REASONS.get(error, str(error)))

        self._obj.apply(command, callback=done)

    @property
    def term(self) -> int:
        return self._obj.raftCurrentTerm

    @property
    def commit_index(self) -> int:
        return self._obj.raftCommitIndex

    @property
    def applied_index(self) -> int:
        return self._obj.raftLastApplied

    def role(self) -> str:
        state = getattr(self._obj, "_SyncObj__raftState")
        return {0: "follower", 1: "candidate", 2: "leader"}.get(state, "unknown")

    def leader_id(self) -> str | None:
        leader = self._obj._getLeader()
        if leader is None:
            return None
        address = getattr(leader, "address", str(leader))
        return self._member_by_address.get(address) or getattr(leader, "member_id", "") or address

    def register_member(self, member_id: str, address: str) -> None:
        """Name a peer address added at run time (tick or loop thread; a dict store)."""
        self._member_by_address[address] = member_id

    def _other_nodes(self) -> list:
        return list(getattr(self._obj, "_SyncObj__otherNodes"))

    def member_addresses(self) -> list[str]:
        """Every member's peer address as this node's Raft layer sees them now."""
        return [self.self_peer.address] + [n.address for n in self._other_nodes()]

    def reachable(self, member_id: str) -> bool:
        if member_id == self.self_peer.member_id:
            return True
        for node in self._other_nodes():
            address = node.address
            if self._member_by_address.get(address, getattr(node, "member_id", "") or address) == member_id:
                return self._obj.isNodeConnected(node)
        return False

    def change_membership(self, change: tuple, callback: Callable[[Any, str, str], None]) -> None:
        """("add", member_id, address) | ("remove", address) | ("transfer",): pysyncobj's
        single-server change (forwarded to the leader like any command) or, on the
        leader, a leadership transfer. `callback` as for `submit`."""

        def done(result, error):
            callback(result, _OUTCOMES.get(error, UNKNOWN), _REASONS.get(error, str(error)))

        if change[0] == "add":
            self._obj.addNodeToCluster(PeerNode(change[2], None, change[1]), callback=done)
        elif change[0] == "remove":
            self._obj.removeNodeFromCluster(PeerNode(change[1]), callback=done)
        else:
            self._obj.transferLeadership(callback=done)

    def has_quorum(self) -> bool:
        return self._obj.hasQuorum

    def log_entries(self) -> int:
        return self._obj._getRaftLogSize()

    def stats(self) -> dict:
        journal = self._durability.journal
        return {
            "journal_syncs": journal.syncs if journal else 0,
            "journal_sync_seconds": journal.sync_seconds if journal else 0.0,
            "snapshots_written": self._snapshots.written,
            "snapshots_installed": self._snapshots.installed,
            "snapshot_last_seconds": self._snapshots.last_seconds,
            "log_entries": self.log_entries(),
            "append_entries_trimmed": self._durability.transport.trimmed_messages,
            # process-wide (every RaftNode of this process): should stay 0 with the trimming
            "truncated_applied_entries_warnings": truncation_warnings.count,
        }

    def force_snapshot(self) -> None:
        self._obj.forceLogCompaction()

    def destroy(self) -> None:
        """Stop the tick thread and close the port and journal (blocks briefly)."""
        self._obj.destroy()
        thread = getattr(self._obj, "_SyncObj__thread")
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
        self._snapshots.wait(30)
