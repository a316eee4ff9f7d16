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
    assert events == [("append", 5), ("append", 6), ("sync",), ("send", 6), ("send", 7)]
    d.on_tick()
    assert events[-1] == ("send", 7), "a clean journal is not synced again and nothing is resent"


def test_with_sync_batch_or_never_replies_are_not_held():
    for sync in ("batch", "never"):
        d, _ = durability(sync)
        assert not d.holds_replies
