"""The ap protocol under a seeded simulated network and clock (see harness.py).

A failing seed replays exactly: `python -c "from tests.sim.harness import simulate;
print(simulate(SEED))"` (add `conflicts="lww"`, `drop=...` as the failing test did).
"""
import pytest

from dynamo import versions
from dynamo.service import DynamoService

from .harness import simulate

QUICK_SEEDS = range(0, 24)


def _check(result):
    assert not result.failed(), (
        f"seed {result.seed} ({result.conflicts}) failed: lost {result.lost_acked} acked writes "
        f"{result.lost_examples}, invented {result.invented}, diverged {result.diverged}; "
        f"replay with simulate({result.seed}, {result.conflicts!r})"
    )


@pytest.mark.parametrize("seed", QUICK_SEEDS)
def test_vclock_mode_loses_no_acknowledged_write_and_converges(seed):
    result = simulate(seed, "vclock")
    _check(result)
    assert result.acked > 20 and result.faults["crashes"] + result.faults["partitions"] >= 1


def test_lww_loses_concurrent_writes_that_vclock_keeps():
    counts = {"vclock": [0, 0], "lww": [0, 0]}
    for seed in range(6):
        for mode in counts:
            result = simulate(seed, mode, faults=False, drop=0.0, duplicate=0.0)
            assert not result.invented and not result.diverged, (seed, mode)
            counts[mode][0] += result.acked
            counts[mode][1] += result.lost_acked
            if mode == "lww":
                assert result.max_siblings <= 1
    print(f"\nacked writes lost over 6 seeds (no faults): vclock {counts['vclock'][1]}/{counts['vclock'][0]}, "
          f"lww {counts['lww'][1]}/{counts['lww'][0]}")
    assert counts["vclock"][1] == 0
    assert counts["lww"][1] > 0.1 * counts["lww"][0]


def test_a_seed_replays_exactly():
    a, b = simulate(3), simulate(3)
    assert (a.messages, a.virtual_seconds, a.final, a.acked) == (b.messages, b.virtual_seconds, b.final, b.acked)


def test_the_checker_catches_a_merge_that_drops_siblings(monkeypatch):
    def keep_newest_clock_only(a, b, *, lww=False):
        if a is None or b is None:
            return a or b
        return a if len(a.clock) >= len(b.clock) else b

    monkeypatch.setattr(versions, "merge", keep_newest_clock_only)
    assert any(simulate(seed).failed() for seed in range(3))


def test_the_checker_catches_dot_reuse_without_actor_epochs(monkeypatch):
    """Riak's doomstone: a node that deletes its handed-off copy and keeps its actor mints
    a dot it already used, and replicas that saw the old one drop the new write."""
    from dynamo.node import Replica

    monkeypatch.setattr(Replica, "new_epoch", lambda self: self.actor)
    # anti-entropy off: it narrows the window (it restores a replica's versions sooner)
    # but cannot close it, and this test is about the checker seeing the bug at all
    assert any(simulate(seed, anti_entropy=False).lost_acked for seed in range(10))  # stops at the first catch


@pytest.mark.parametrize("seed", [12, 27])
def test_crashes_that_lose_unsynced_writes_lose_no_acknowledged_write(seed):
    """kill -9 with --sync never loses a node's last writes; its next versions must not
    reuse the dots it had minted (found by `capkv chaos --mode ap`)."""
    _check(simulate(seed, "vclock", loss_window_s=1.0))


def test_the_checker_catches_dot_reuse_after_a_lossy_crash(monkeypatch):
    from dynamo.node import ACTOR_KEY, Replica

    def keep_the_stored_actor(self):
        stored = self.engine.get(ACTOR_KEY)
        return stored.decode() if stored else self._new_actor()

    monkeypatch.setattr(Replica, "_start_actor", keep_the_stored_actor)
    assert any(simulate(seed, loss_window_s=1.0, anti_entropy=False).lost_acked for seed in (12, 27, *range(40)))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(10))
def test_many_seeds_under_heavy_faults(chunk):
    for seed in range(1000 + chunk * 40, 1000 + (chunk + 1) * 40):
        _check(simulate(seed, "vclock", ops=400, drop=0.1, duplicate=0.1, clients=6, loss_window_s=0.5))


@pytest.mark.parametrize("seed", range(100, 106))
def test_strict_quorum_without_handoff_loses_nothing_either(seed):
    """Without sloppy quorum more writes fail (503), but none that was acked may vanish."""
    _check(simulate(seed, "vclock", hinted_handoff=False))


AAE_BOUND_S = 10.0  # virtual seconds after the heal (5 anti-entropy periods of 2 s)


@pytest.mark.parametrize("seed", range(200, 206))
def test_anti_entropy_alone_converges_every_replica_within_a_bound_after_the_heal(seed):
    """No read touches the keys until the primaries agree: hints (half the seeds have
    none) and anti-entropy exchanges must get every acknowledged write everywhere."""
    result = simulate(seed, "vclock", keys=20, hinted_handoff=bool(seed % 2), aae_within_s=AAE_BOUND_S)
    _check(result)
    assert result.aae_converged_s is not None and result.aae_converged_s <= AAE_BOUND_S


def test_without_anti_entropy_or_reads_replicas_stay_diverged():
    """The control for the test above: same runs, anti-entropy off, no hints."""
    stuck = 0
    for seed in range(200, 206, 2):
        result = simulate(seed, "vclock", keys=20, hinted_handoff=False, anti_entropy=False, aae_within_s=AAE_BOUND_S)
        stuck += result.aae_converged_s is None
    assert stuck >= 1


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(5))
def test_anti_entropy_converges_for_many_seeds(chunk):
    for seed in range(5000 + chunk * 40, 5000 + (chunk + 1) * 40):
        result = simulate(seed, "vclock", keys=30, ops=300, drop=0.05, hinted_handoff=bool(seed % 2), aae_within_s=AAE_BOUND_S)
        _check(result)


@pytest.mark.parametrize("size,seed", [(8, 300), (12, 301)])
def test_bigger_clusters_with_gossip_and_anti_entropy_lose_nothing_and_converge(size, seed):
    result = simulate(seed, "vclock", keys=20, size=size, hinted_handoff=bool(seed % 2), aae_within_s=AAE_BOUND_S)
    _check(result)


@pytest.mark.slow
@pytest.mark.parametrize("size", [5, 10, 15, 20])
def test_many_seeds_on_clusters_of_5_to_20_nodes(size):
    for seed in range(7000 + size * 100, 7000 + size * 100 + 15):
        result = simulate(seed, "vclock", keys=20, ops=300, size=size, drop=0.05, hinted_handoff=bool(seed % 2),
                          aae_within_s=AAE_BOUND_S)
        _check(result)


REAP_SEEDS = range(0, 8)


@pytest.mark.parametrize("seed", REAP_SEEDS)
def test_reaping_tombstones_brings_no_deleted_value_back_and_loses_no_later_write(seed):
    # grace 3 s: hints live 1.5 s here, so some expire during the faults (the harsh case)
    result = simulate(seed, "vclock", ops=300, reap_grace_s=3.0)
    _check(result)
    assert result.acked > 20
    # the harness deletes every key at the end and waits until every tombstone is reaped
    assert result.faults["tombstones_reaped"] >= 9


def test_the_checker_catches_a_fallback_copy_that_outlives_a_reaped_tombstone(monkeypatch):
    async def keep_stray_copies(self, keys):
        pass

    monkeypatch.setattr(DynamoService, "_drop_stray_copies", keep_stray_copies)
    assert any(simulate(seed, "vclock", ops=300, reap_grace_s=3.0).failed() for seed in (4, 7, 8))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(4))
def test_reaping_for_many_seeds_under_heavy_faults(chunk):
    for seed in range(1000 + 25 * chunk, 1000 + 25 * (chunk + 1)):
        _check(simulate(seed, "vclock", ops=300, drop=0.1, duplicate=0.05, reap_grace_s=8.0))
