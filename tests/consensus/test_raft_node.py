"""The AppendEntries trimming that keeps pysyncobj from truncating non-conflicting entries."""
from __future__ import annotations

from consensus.raft_node import trim_append_entries


def follower(terms: list[int], first_index: int = 1):
    last = first_index + len(terms) - 1

    def term_at(index):
        if first_index <= index <= last:
            return terms[index - first_index]
        return None

    return term_at, last


def message(prev, prev_term, entries, term=2):
    return {"type": "append_entries", "term": term, "commit_index": 1, "prevLogIdx": prev, "prevLogTerm": prev_term,
            "entries": [(b"cmd", i, t) for i, t in entries]}


def test_a_stale_heartbeat_no_longer_truncates_entries_of_this_leader():
    term_at, last = follower([1, 1, 2, 2, 2, 2])
    out = trim_append_entries(message(3, 2, []), term_at, last)
    assert (out["prevLogIdx"], out["prevLogTerm"], out["entries"]) == (6, 2, [])


def test_entries_the_follower_holds_are_dropped_and_new_ones_kept():
    term_at, last = follower([1, 1, 2, 2])
    out = trim_append_entries(message(2, 1, [(3, 2), (4, 2), (5, 2), (6, 2)]), term_at, last)
    assert out["prevLogIdx"] == 4 and [e[1] for e in out["entries"]] == [5, 6]


def test_a_real_conflict_still_truncates_from_the_conflict():
    term_at, last = follower([1, 1, 2, 2, 2, 2])
    out = trim_append_entries(message(3, 2, [(4, 3), (5, 3)], term=3), term_at, last)
    assert out["prevLogIdx"] == 3 and [e[1] for e in out["entries"]] == [4, 5]
    out = trim_append_entries(message(3, 2, [(4, 2), (5, 3)], term=3), term_at, last)
    assert out["prevLogIdx"] == 4 and [(e[1], e[2]) for e in out["entries"]] == [(5, 3)]


def test_a_tail_from_an_older_term_is_left_to_pysyncobj():
    # Entries 5..6 of term 1 may conflict with the term-2 leader's log: do not vouch for them.
    term_at, last = follower([1, 1, 1, 2, 1, 1])
    out = trim_append_entries(message(4, 2, []), term_at, last)
    assert out["prevLogIdx"] == 4


def test_mismatched_prev_and_snapshot_messages_pass_unchanged():
    term_at, last = follower([1, 1, 2])
    stale = message(3, 1, [(4, 2)])
    assert trim_append_entries(stale, term_at, last) is stale
    beyond = message(9, 2, [])
    assert trim_append_entries(beyond, term_at, last) is beyond
    chunk = dict(message(2, 1, []), transmission="start", data=b"")
    assert trim_append_entries(chunk, term_at, last) is chunk


class FakeJournal:
    def __init__(self, events):
        self.events = events
        self.dirty = False

    def add(self, index):
        self.dirty = True
        self.events.append(("append", index))

    def sync(self):
        if self.dirty:
            self.dirty = False
            self.events.append(("sync",))


class FakeTransport:
    def __init__(self, events):
        self.events = events

    def send_now(self, node, message):
        self.events.append(("send", message["next_node_idx"]))


def durability(sync):
    from consensus.raft_node import RaftOptions, _Durability

    events = []
    d = _Durability(sync, RaftOptions())
    d.journal, d.transport = FakeJournal(events), FakeTransport(events)
    return d, events


def test_with_sync_always_an_acknowledgement_waits_for_the_journal_sync():
    d, events = durability("always")
    assert d.holds_replies
    for index in (5, 6):
        d.journal.add(index)
        d.hold("leader", {"type": "next_node_idx", "next_node_idx": index + 1, "success": True})
    assert events == [("append", 5), ("append", 6)], "nothing is acknowledged before the sync"
    d.on_tick()
    # Both successes are answered by the last one (the leader keeps the highest anyway).
    assert events == [("append", 5), ("append", 6), ("sync",), ("send", 7)]
    d.on_tick()
    assert events[-1] == ("send", 7), "a clean journal is not synced again and nothing is resent"


def test_held_replies_collapse_only_where_a_later_success_supersedes():
    from consensus.raft_node import collapse_replies

    def reply(index, success=True, reset=False):
        return {"type": "next_node_idx", "next_node_idx": index, "success": success, "reset": reset}

    held = [("L", reply(7)), ("M", reply(3)), ("L", reply(9)), ("L", reply(5, success=False)),
            ("L", reply(6)), ("L", reply(4, reset=True)), ("L", reply(8)), ("L", reply(8))]  # fmt: skip
    out = [(node, m["next_node_idx"], m["success"], m["reset"]) for node, m in collapse_replies(held)]
    assert out == [("L", 9, True, False), ("M", 3, True, False), ("L", 5, False, False),
                   ("L", 6, True, False), ("L", 4, True, True), ("L", 8, True, False)]  # fmt: skip


def test_with_sync_batch_or_never_replies_are_not_held():
    for sync in ("batch", "never"):
        d, _ = durability(sync)
        assert not d.holds_replies


# --- AppendEntries coalescing ---------------------------------------------------------------

from consensus.raft_node import merge_append_entries  # noqa: E402


def test_chained_append_entries_merge_into_one_with_the_newest_commit_index():
    first = message(10, 2, [(11, 2), (12, 2)])
    second = dict(message(12, 2, [(13, 2)]), commit_index=10)
    merged = merge_append_entries(first, second, 1 << 20)
    assert (merged["prevLogIdx"], merged["prevLogTerm"]) == (10, 2)
    assert [e[1] for e in merged["entries"]] == [11, 12, 13]
    assert merged["commit_index"] == 10
    assert [e[1] for e in first["entries"]] == [11, 12]  # the pending message is not mutated
    # A heartbeat that follows the chain only moves the commit index.
    beat = dict(message(13, 2, []), commit_index=11)
    assert merge_append_entries(merged, beat, 1 << 20)["commit_index"] == 11


def test_append_entries_that_do_not_chain_stay_apart():
    first = message(10, 2, [(11, 2)])
    assert merge_append_entries(first, message(12, 2, [(13, 2)]), 1 << 20) is None  # gap
    assert merge_append_entries(first, message(11, 1, [(12, 2)]), 1 << 20) is None  # prev term differs
    assert merge_append_entries(first, message(11, 2, [(12, 3)], term=3), 1 << 20) is None  # new term
    chunk = dict(message(11, 2, []), transmission="start", data=b"")
    assert merge_append_entries(first, chunk, 1 << 20) is None
    assert merge_append_entries(first, message(11, 2, [(12, 2)]), 4) is None  # over the byte bound


# --- authenticated peer frames ---------------------------------------------------------------

import pickle  # noqa: E402
import socket  # noqa: E402

from pysyncobj.tcp_connection import TcpConnection  # noqa: E402

from consensus.raft_node import PeerAuthenticator, _AuthenticatedConnection  # noqa: E402


class _Poller:
    def subscribe(self, *args):
        pass

    def unsubscribe(self, *args):
        pass


_AUTHENTICATORS: dict = {}


def _authenticator(secret: str) -> PeerAuthenticator:
    if secret not in _AUTHENTICATORS:  # PBKDF2 takes a moment: once per secret
        _AUTHENTICATORS[secret] = PeerAuthenticator(secret)
    return _AUTHENTICATORS[secret]


def _link(sender_secret: str, receiver_secret: str):
    a, b = socket.socketpair()
    received = []
    ends = []
    for sock, secret in ((a, sender_secret), (b, receiver_secret)):
        sock.setblocking(False)
        conn = TcpConnection(_Poller(), socket=sock, onMessageReceived=received.append)
        conn.__class__ = _AuthenticatedConnection
        conn.encryptor = _authenticator(secret)
        ends.append(conn)
    return ends[0], ends[1], received


def _pump(receiver) -> None:
    from pysyncobj.poller import POLL_EVENT_TYPE

    receiver._TcpConnection__processConnection(receiver.fileno(), POLL_EVENT_TYPE.READ)


class _Boom:
    def __reduce__(self):
        return (pytest_fail, ("unpickled a frame that was not authenticated",))


def pytest_fail(message):
    raise AssertionError(message)


def test_peer_frames_carry_messages_between_holders_of_the_secret():
    sender, receiver, received = _link("s3cret", "s3cret")
    sender.send({"type": "append_entries", "entries": [(b"x" * 40_000, 1, 1)]})  # compressed
    sender.send("hello")
    sender.send_many(["one", "two"])  # one socket write, two frames
    _pump(receiver)
    assert received == [{"type": "append_entries", "entries": [(b"x" * 40_000, 1, 1)]}, "hello", "one", "two"]


def test_a_frame_without_the_secret_is_refused_before_unpickling():
    sender, receiver, received = _link("wrong", "s3cret")
    sender.send(_Boom())
    _pump(receiver)
    assert received == [] and receiver.fileno() is None  # disconnected, nothing unpickled


def test_a_tampered_or_replayed_frame_is_refused():
    import struct

    auth = _authenticator("s3cret")

    def frame(seq: int, message, tamper: bool = False) -> bytes:
        body = struct.pack("<QB", seq, 0) + pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        tag = auth.tag(body)
        if tamper:
            body = body[:-1] + bytes([body[-1] ^ 1])
        return struct.pack("<I", len(body) + len(tag)) + body + tag

    sender, receiver, received = _link("s3cret", "s3cret")
    raw = sender._TcpConnection__socket
    raw.send(frame(0, "one"))
    _pump(receiver)
    assert received == ["one"]
    raw.send(frame(0, "one"))  # replayed: sequence 0 again
    _pump(receiver)
    assert received == ["one"] and receiver.fileno() is None

    sender, receiver, received = _link("s3cret", "s3cret")
    sender._TcpConnection__socket.send(frame(0, "two", tamper=True))
    _pump(receiver)
    assert received == [] and receiver.fileno() is None


def test_a_drain_sends_each_follower_its_responses_then_one_append_entries(monkeypatch):
    from pysyncobj.transport import TCPTransport

    from consensus.raft_node import _HoldingTransport

    sent = []
    monkeypatch.setattr(TCPTransport, "send", lambda self, node, msg: sent.append((node, msg)) or True)
    transport = _HoldingTransport.__new__(_HoldingTransport)
    transport._syncObj = type("FakeSyncObj", (), {"_capkv_durability": None})()
    transport._connections = {"f1": object(), "f2": object()}

    def response(index):
        return {"type": "apply_command_response", "request_id": index, "log_idx": index, "log_term": 2}

    transport.begin_coalescing()
    for index in (11, 12, 13):
        transport.send("f1", response(index))  # f1 forwarded these commands
        for node in ("f1", "f2"):
            transport.send(node, dict(message(index - 1, 2, [(index, 2)]), commit_index=9))
    assert sent == []
    transport.send("f2", {"type": "request_vote"})  # anything else flushes that node first
    transport.end_coalescing()

    to_f1 = [m for n, m in sent if n == "f1"]
    assert [m["type"] for m in to_f1] == ["apply_command_response"] * 3 + ["append_entries"]
    assert [m["log_idx"] for m in to_f1[:3]] == [11, 12, 13]
    assert [e[1] for e in to_f1[3]["entries"]] == [11, 12, 13] and to_f1[3]["prevLogIdx"] == 10
    to_f2 = [m for n, m in sent if n == "f2"]
    assert [m["type"] for m in to_f2] == ["append_entries", "request_vote"]
    assert [e[1] for e in to_f2[0]["entries"]] == [11, 12, 13]
    assert transport.coalesced_messages == 4


def test_a_burst_of_submits_writes_one_wake_up_and_none_is_lost():
    from consensus.raft_node import _CoalescedNotifier

    class Pipe:
        writes = 0

        def notify(self):
            self.writes += 1

    pipe = Pipe()
    notifier = _CoalescedNotifier(pipe)
    for _ in range(50):
        notifier.notify()  # a burst before the tick thread drains
    assert pipe.writes == 1
    notifier.rearm()  # the tick thread is about to drain the queue
    notifier.notify()  # queued after the re-arm: the drain may have missed it, so it writes
    assert pipe.writes == 2
    notifier.wake()  # the drain left commands: the next poll must not sleep
    assert pipe.writes == 3
