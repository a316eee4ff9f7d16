"""Fixtures for real-process tests: whole clusters through `clusters.launcher.LocalCluster`
on free loopback ports, in the test's tmp dir. Teardown always stops every process.

    def test_something(cp_cluster):
        cluster = cp_cluster(nodes=3)               # started, a leader exists
        leader = cluster.leader()
        cluster.kill(leader)
        ...

    def test_ap(ap_cluster):
        cluster = ap_cluster(nodes=5, extra_args=("--replicas", "3"))

Each factory takes `nodes`, `engine` (default "lsm"), `sync` (default "never": these
tests are about the protocol, not the disk; pass "always" when durability is the point),
`extra_args`, `start` (False returns it unstarted) and `timeout`. Logs go to
`<tmp>/logs/<node>.log`; on a failing test their tails are printed.

`fake_cluster` starts the same processes over the in-memory fake services of
tests/api/fakes.py (each node independent, n1 always "leader"), for testing the
launcher and CLI without Raft or a ring.
"""
from __future__ import annotations

import importlib
import itertools
import os
from pathlib import Path
from typing import Callable

import pytest

from clusters.launcher import LocalCluster
from clusters.spec import write_cluster_file

FAKE_FACTORIES = {"cp": "tests.api.fakes:create_cp_service", "ap": "tests.api.fakes:create_ap_service"}
SERVICE_MODULES = {"cp": "consensus.service", "ap": "dynamo.service"}


def service_available(mode: str) -> bool:
    try:
        module = importlib.import_module(SERVICE_MODULES[mode])
    except ImportError:
        return False
    return hasattr(module, "create_service")


def require_service(mode: str) -> None:
    if not service_available(mode):
        pytest.skip(f"{SERVICE_MODULES[mode]}.create_service does not exist yet")


@pytest.fixture(scope="session", autouse=True)
def _children_find_capkv():
    """Children run `python -m api.cli` with the project root on PYTHONPATH (the launcher
    adds it); nothing to do here but keep the environment stable for them."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    yield


def _cluster_factory(tmp_path: Path, request, mode: str, *, fake: bool) -> tuple[Callable[..., LocalCluster], list]:
    clusters: list[LocalCluster] = []
    counter = itertools.count(1)

    def make(nodes: int = 3, engine: str = "lsm", sync: str = "never", extra_args=(), start: bool = True,
             timeout: float = 60.0, **kwargs) -> LocalCluster:  # fmt: skip
        if not fake:
            require_service(mode)
        index = next(counter)
        base = tmp_path / f"{mode}-cluster-{index}"
        base.mkdir(parents=True, exist_ok=True)
        cluster_file = base / "cluster.toml"
        write_cluster_file(cluster_file, nodes, name=f"{mode}-test-{index}")
        args = tuple(extra_args)
        if fake:
            args = ("--service-factory", FAKE_FACTORIES[mode]) + args
        cluster = LocalCluster(cluster_file, mode=mode, data_dir=base / "data", engine=engine, sync=sync,
                               extra_args=args, log_dir=base / "logs", **kwargs)  # fmt: skip
        clusters.append(cluster)
        if start:
            cluster.start(timeout=timeout)
        return cluster

    return make, clusters


def _teardown(request, clusters: list[LocalCluster]) -> None:
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in clusters:
        if failed:
            for node_id in cluster.nodes:
                tail = cluster.log_tail(node_id, 2000)
                if tail:
                    print(f"\n--- log tail of {node_id} ({cluster.spec.name}) ---\n{tail}")
        cluster.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def cp_cluster(tmp_path, request):
    """Factory of started cp clusters (real consensus service); skips until it exists."""
    make, clusters = _cluster_factory(tmp_path, request, "cp", fake=False)
    yield make
    _teardown(request, clusters)


@pytest.fixture
def ap_cluster(tmp_path, request):
    """Factory of started ap clusters (real dynamo service); skips until it exists."""
    make, clusters = _cluster_factory(tmp_path, request, "ap", fake=False)
    yield make
    _teardown(request, clusters)


@pytest.fixture
def fake_cluster(tmp_path, request):
    """Factory: fake_cluster(mode="cp", nodes=3, ...) over the in-memory fakes."""
    made: dict[str, tuple] = {}

    def make(mode: str = "cp", **kwargs) -> LocalCluster:
        if mode not in made:
            made[mode] = _cluster_factory(tmp_path, request, mode, fake=True)
        kwargs.setdefault("engine", "memory")
        return made[mode][0](**kwargs)

    yield make
    for _, clusters in made.values():
        _teardown(request, clusters)
