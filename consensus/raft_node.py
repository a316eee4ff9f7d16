"""pysyncobj behind one small seam: the only module of capkv that imports it.

`RaftNode` replicates state-machine commands through pysyncobj 0.3.17 and adds what the
library lacks for an etcd-like store (research/pysyncobj.md, cited as §N):

* One replicated entry point, `apply(command)`, that never raises (§0.4, §1.3): commands
  are data; the Raft index of each entry is passed to the state machine, which skips
  entries it already holds after a restart.
* Durable acknowledgements with `sync="always"` (§0.2, §4.1): pysyncobj never fsyncs.
  Here its journal is a `FileJournal` that knows when it is dirty, and once per tick the
  node fdatasyncs it; a follower's replies to AppendEntries (`next_node_idx`) are held back
  until that sync, and the leader syncs its own appended entries before the tick in which
  it could count them. So an entry is on stable storage on a majority before it commits.
  Term and vote are fsynced before any message that reflects them. `batch` syncs the
  journal at most every `sync_interval_ms` without holding replies; `never` leaves it to
  the OS (pysyncobj's own behaviour).
* Snapshots that do not stall heartbeats (§4.2): the serializer pins the snapshot on the
  tick thread (a revision and a copy of the request ids) and a background thread writes
  the file from the engine's immutable history rows, then fsyncs the engine so the log
  prefix the snapshot replaces is durable in the engine too.
* Security (§8): every peer frame authenticated by the cluster secret (HMAC, or Fernet
  with `encrypt_peer_traffic`), and the peer port bound to the configured
  address only.
* Outcomes translated out of FAIL_REASON: `applied`, `not_applied` (safe to retry) or
  `unknown` (may have applied).

Threads: pysyncobj runs everything (apply, callbacks, serializer) on its tick thread,
which dies when the thread that built the node dies: build `RaftNode` on the main thread.
`submit()` is thread-safe; its callback runs on the tick thread.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from typing import Any, Callable

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.node import TCPNode
from pysyncobj.pickle import dumps as _pickle_dumps
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
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
    # Peer traffic is always authenticated by the cluster secret (PeerAuthenticator, an
    # HMAC per frame); True also encrypts it with pysyncobj's Fernet, at several times
    # the CPU per message, for peer links that cross an untrusted network.
    encrypt_peer_traffic: bool = False

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


class PeerAuthenticator:
    """HMAC-SHA256 of every peer frame under a key derived from the cluster secret.

    pysyncobj's `password` wraps every message in Fernet (AES-CBC + HMAC, base64) after a
    zlib pass at level 3: ~0.2 ms of CPU per message here, several messages per write, on
    the one tick thread (measured: most of the leader's CPU at 64 writers). What the Raft
    port needs is *authentication*: a peer without the secret must never reach
    `pickle.loads`. So a frame is `seq, flags, payload, tag` where the tag is an HMAC over
    the rest; the sequence number (per connection and direction, from 0) refuses replayed or
    reordered frames, and pysyncobj's per-connection random keys (sent inside the frames)
    still bind frames to one connection. Traffic is not confidential: with
    `RaftOptions.encrypt_peer_traffic` pysyncobj's Fernet is used as shipped.
    """

    _SALT = b"capkv raft peer authentication v1"
    TAG_BYTES = 32

    def __init__(self, secret: str):
        # Stretched like pysyncobj's Fernet key (PBKDF2, 100 000 rounds), other salt.
        self._key = hashlib.pbkdf2_hmac("sha256", secret.encode(), self._SALT, 100_000)

    _cache: dict = {}  # secret -> authenticator: a process with several nodes stretches once

    @classmethod
    def for_secret(cls, secret: str) -> "PeerAuthenticator":
        authenticator = cls._cache.get(secret)
        if authenticator is None:
            authenticator = cls._cache[secret] = cls(secret)
        return authenticator

    def __bool__(self) -> bool:  # pysyncobj runs its random-key handshake when truthy
        return True

    def tag(self, body: bytes) -> bytes:
        return hmac.digest(self._key, body, "sha256")

    def verify(self, body: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, body, "sha256"), tag)


_FRAME_LENGTH = struct.Struct("<I")
_FRAME_HEADER = struct.Struct("<QB")  # sequence number, flags
_COMPRESSED = 1
# Payloads at least this big are deflated (snapshot chunks, long batches); smaller ones
# would not pay for zlib's set-up (~0.1 ms a call here, measured).
_COMPRESS_FROM_BYTES = 16 * 1024
# A frame announcing more than this is refused before it is buffered (pysyncobj itself
# buffers any length). Batches and snapshot chunks are small, but one forwarded command
# carries a whole request (values up to the engine's 64 MiB, a txn several).
_MAX_FRAME_BYTES = 256 * 1024 * 1024


class _AuthenticatedConnection(TcpConnection):
    """pysyncobj's TcpConnection with `PeerAuthenticator` frames instead of zlib + Fernet.

    Installed by `_HoldingTransport` on each connection it makes or accepts (by class
    swap: pysyncobj constructs them itself); `encryptor` is the node's authenticator.
    Frames: u32 length, then u64 sequence, u8 flags, payload (pickle, maybe deflated),
    32-byte HMAC of everything after the length.
    """

    _send_seq = 0
    _recv_seq = 0

    def send(self, message):
        self.send_many((message,))

    def send_many(self, messages) -> None:
        """Frame every message, then try one socket send for all of them."""
        frames = []
        for message in messages:
            if self.sendRandKey:
                message = (self.sendRandKey, message)
            payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
            flags = 0
            if len(payload) >= _COMPRESS_FROM_BYTES:
                payload = zlib.compress(payload, 1)
                flags = _COMPRESSED
            body = _FRAME_HEADER.pack(self._send_seq, flags) + payload
            self._send_seq += 1
            tag = self.encryptor.tag(body)
            frames.append(_FRAME_LENGTH.pack(len(body) + len(tag)) + body + tag)
        self._TcpConnection__writeBuffer += b"".join(frames)
        self._TcpConnection__trySendBuffer()

    def disconnect(self):
        self._send_seq = 0
        self._recv_seq = 0
        super().disconnect()

    def _TcpConnection__processParseMessage(self):  # noqa: N802 - overrides pysyncobj's private parser
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < 4:
            return None
        (length,) = _FRAME_LENGTH.unpack_from(buffer)
        tag_bytes = PeerAuthenticator.TAG_BYTES
        if length > _MAX_FRAME_BYTES or length < _FRAME_HEADER.size + tag_bytes:
            self.disconnect()
            return None
        if len(buffer) - 4 < length:
            return None
        body = buffer[4 : 4 + length - tag_bytes]
        tag = buffer[4 + length - tag_bytes : 4 + length]
        self._TcpConnection__readBuffer = buffer[4 + length :]
        seq, flags = _FRAME_HEADER.unpack_from(body)
        if not self.encryptor.verify(body, tag) or seq != self._recv_seq:
            # Not from a holder of the secret, or replayed: nothing of it is unpickled.
            self.disconnect()
            return None
        self._recv_seq += 1
        try:
            payload = body[_FRAME_HEADER.size :]
            if flags & _COMPRESSED:
                payload = zlib.decompress(payload)
            message = pickle.loads(payload)
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("frame of another connection")
        except Exception:  # noqa: BLE001 - authenticated but malformed: drop the link
            self.disconnect()
            return None
        return message


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


def merge_append_entries(pending: dict, message: dict, max_bytes: int) -> dict | None:
    """`pending` and `message` as one AppendEntries, or None when they do not chain.

    pysyncobj (appendEntriesUseBatch=False) sends an AppendEntries to every follower for
    each command it takes from its queue; under load one tick takes dozens. Consecutive
    messages to one follower in one tick chain exactly: same term, and each one's
    `prevLogIdx`/`prevLogTerm` is the last entry of the one before. Sending the chain as
    one message carries the same entries and the newest commit index, so the follower
    ends in the same state with one frame, one journal append run and one reply.

        pending: prev=10/t2, entries 11..12 (t2), commit 9
        message: prev=12/t2, entries 13 (t2), commit 10  ->  prev=10/t2, entries 11..13, commit 10
    """
    if "entries" not in message or "transmission" in message or "serialized" in message:
        return None
    if message["term"] != pending["term"]:
        return None
    entries = pending["entries"]
    last_index, last_term = (entries[-1][1], entries[-1][2]) if entries else (pending["prevLogIdx"], pending["prevLogTerm"])
    if message["prevLogIdx"] != last_index or message["prevLogTerm"] != last_term:
        return None
    more = message["entries"]
    if more and sum(len(e[0]) for e in entries) + sum(len(e[0]) for e in more) > max_bytes:
        return None
    merged = dict(pending)
    merged["entries"] = entries + more
    merged["commit_index"] = message["commit_index"]
    return merged


# Sent at the end of a drain, in order, before the merged AppendEntries: the leader's
# answers to forwarded commands, and a follower's forwarded commands.
_QUEUED_IN_DRAIN = ("apply_command_response", "apply_command")


class _HoldingTransport(TCPTransport):
    """Holds a follower's AppendEntries replies until the journal sync of this tick, and
    trims AppendEntries so that only a conflict truncates the log (`trim_append_entries`).
    Frames are authenticated by `PeerAuthenticator` unless the node encrypts (Fernet)."""

    trimmed_messages = 0

    def _authenticate(self, conn) -> None:
        if isinstance(self._syncObj.encryptor, PeerAuthenticator) and type(conn) is TcpConnection:
            conn.__class__ = _AuthenticatedConnection

    def addNode(self, node):  # noqa: N802 - pysyncobj's name
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None:
            self._authenticate(conn)

    def _onNewIncomingConnection(self, conn):  # noqa: N802 - pysyncobj's name
        self._authenticate(conn)
        super()._onNewIncomingConnection(conn)

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

    # While the leader takes commands from its queue (`begin_coalescing` .. `end_coalescing`)
    # what it sends each follower waits in an outbox: its `apply_command_response`s in order,
    # then one AppendEntries merged from the chain (`merge_append_entries`), all in one
    # socket write. (A follower's drain forwards commands: they wait the same way.) The responses
    # may go first: they only name the (index, term) of a forwarded command, and no
    # AppendEntries sent in this drain can commit an entry appended in it (the commit index
    # moves at the start of a tick), so the follower still learns its index before it can
    # apply it. Anything else to a node sends its outbox first.
    _outboxes: dict | None = None
    coalesced_messages = 0
    # Entry bytes per merged message (pysyncobj's own batch limit is 64 KiB) and responses
    # per outbox before it is sent early.
    max_coalesced_bytes = 256 * 1024
    max_outbox_responses = 1024

    def begin_coalescing(self) -> None:
        self._outboxes = {}

    def end_coalescing(self) -> None:
        outboxes, self._outboxes = self._outboxes, None
        for node, outbox in (outboxes or {}).items():
            self._send_outbox(node, outbox)

    def _send_outbox(self, node, outbox: list) -> None:
        responses, append_entries = outbox
        messages = responses if append_entries is None else [*responses, append_entries]
        conn = self._connections.get(node)
        if len(messages) > 1 and isinstance(conn, _AuthenticatedConnection) and not self._send_random_sleep_duration:
            # One socket write for the lot (TCPTransport.send drops a message to a node
            # that is not connected; so does this).
            if conn.state == CONNECTION_STATE.CONNECTED:
                conn.send_many(messages)
            return
        for message in messages:
            super().send(node, message)

    def send(self, node, message):
        durability = getattr(self._syncObj, "_capkv_durability", None)
        if durability is not None and durability.holds_replies and isinstance(message, dict):
            if message.get("type") == "next_node_idx":
                return durability.hold(node, message)
        outboxes = self._outboxes
        if outboxes is not None and isinstance(message, dict):
            kind = message.get("type")
            outbox = outboxes.get(node)
            if kind in _QUEUED_IN_DRAIN and len(outbox[0] if outbox else ()) < self.max_outbox_responses:
                if outbox is None:
                    outbox = outboxes[node] = [[], None]
                outbox[0].append(message)
                return node in self._connections
            if kind == "append_entries" and "entries" in message:
                if outbox is None:
                    outbox = outboxes[node] = [[], None]
                pending = outbox[1]
                merged = merge_append_entries(pending, message, self.max_coalesced_bytes) if pending else None
                if merged is not None:
                    self.coalesced_messages += 1
                    outbox[1] = merged
                    return True
                if pending is not None:
                    self._send_outbox(node, outbox)
                    outbox[0] = []
                outbox[1] = dict(message, entries=list(message["entries"]))
                return node in self._connections
        if outboxes and node in outboxes:
            self._send_outbox(node, outboxes.pop(node))  # keep the order of everything else
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
            for node, message in collapse_replies(held):
                self.transport.send_now(node, message)


def _plain_success(message: dict) -> bool:
    return bool(message.get("success")) and not message.get("reset")


def collapse_replies(held: list) -> list:
    """The held `next_node_idx` replies of one tick, without those a later one supersedes.

    A follower answers every AppendEntries; within one tick it may hold several successes
    for the leader. On a success without `reset` the leader only raises its match and next
    index to the reply's (syncobj.py:1074-1082), so of consecutive such replies to one node
    the last (the highest) leaves the leader in the same state alone. Anything else (a
    failure, a reset) is kept, in order.

        [(L, ok 7), (L, ok 9), (L, fail 5), (L, ok 6)] -> [(L, ok 9), (L, fail 5), (L, ok 6)]
    """
    out: list = []
    last_at: dict = {}  # node -> position in `out` of its latest reply
    for node, message in held:
        at = last_at.get(node)
        if at is not None:
            previous = out[at][1]
            if (_plain_success(previous) and _plain_success(message)
                    and message.get("next_node_idx", 0) >= previous.get("next_node_idx", 0)):  # fmt: skip
                out[at] = (node, message)
                continue
        last_at[node] = len(out)
        out.append((node, message))
    return out


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


class _CoalescedNotifier:
    """Wraps pysyncobj's pipe notifier (a pipe write per submitted command, to wake the
    tick thread) so that a burst of submits costs one write: after the first, further ones
    are skipped until the tick thread re-arms it, which it does *before* taking commands
    from the queue, so a command queued after that takes its own write."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self._armed = True  # a notify now writes

    def notify(self) -> None:  # submitting threads, after the command is queued
        if self._armed:
            self._armed = False
            self._inner.notify()

    def rearm(self) -> None:  # tick thread, before draining the queue
        self._armed = True

    def wake(self) -> None:  # tick thread: commands were left queued, tick again at once
        self._armed = False
        self._inner.notify()


class _KVSyncObj(SyncObj):
    def __init__(self, state_machine: KVStateMachine, durability: _Durability, authenticator, *args, **kwargs):
        self._capkv_sm = state_machine
        self._capkv_durability = durability
        self._capkv_authenticator = authenticator
        super().__init__(*args, **kwargs)
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        self._capkv_notifier = _CoalescedNotifier(notifier) if notifier is not None else None
        if self._capkv_notifier is not None:
            self._SyncObj__pipeNotifier = self._capkv_notifier

    def _checkCommandsToApply(self):  # noqa: N802 - pysyncobj's name
        # Takes queued commands; the leader sends AppendEntries after each one. Those to
        # one follower go out as one message at the end (`merge_append_entries`), still
        # before this tick's journal sync and poll.
        notifier = getattr(self, "_capkv_notifier", None)
        if notifier is not None:
            notifier.rearm()
        transport = self._SyncObj__transport
        transport.begin_coalescing()
        try:
            super()._checkCommandsToApply()
        finally:
            transport.end_coalescing()
        # pysyncobj stops draining after appendEntriesPeriod; what it left was notified
        # before the re-arm, so wake the next poll for it here. (Not without a leader:
        # with commandsWaitLeader the queue waits for one, and waking would spin.)
        queue = getattr(self, "_SyncObj__commandsQueue", None)
        if notifier is not None and queue is not None and len(queue._FastQueue__queue) and self._getLeader() is not None:
            notifier.wake()

    @property
    def encryptor(self):
        # pysyncobj's transport reads this for each connection: our frames' authenticator,
        # or (encrypt_peer_traffic) the Fernet it built from the password.
        return self._capkv_authenticator or super().encryptor

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
        authenticator = None if options.encrypt_peer_traffic else PeerAuthenticator.for_secret(password)
        conf = SyncObjConf(
            # With our authenticator pysyncobj gets no password: it would derive a Fernet
            # key it never uses (PBKDF2, ~0.1 s at start). `_KVSyncObj.encryptor` supplies
            # the authenticator to every connection instead.
            password=password if authenticator is None else None,
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
            authenticator,
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
            "append_entries_coalesced": self._durability.transport.coalesced_messages,
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
