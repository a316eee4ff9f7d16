"""bench.ring prints the balance and churn figures; check they are sane on a small run."""
import json

from bench import ring as bench_ring


def test_bench_ring_prints_balance_and_join_movement(capsys):
    bench_ring.main(["--keys", "2000"])
    report = json.loads(capsys.readouterr().out)
    sizes = [r["nodes"] for r in report["results"]]
    assert sizes == [3, 5, 10, 30, 100]
    for result in report["results"]:
        assert 1.0 <= result["ownership_max_over_mean"] < 1.6
        join = result["join"]
        assert abs(join["copies_moved"] - join["ideal"]) < 0.5 * join["ideal"] + 0.02
        assert join["replica_set_changed"] >= join["primary_moved"] * 0.9
