"""In-process cp clusters on 127.0.0.1 with free ports: three `ConsensusService`s in one
event loop, no HTTP. Benchmarks (`bench.raft_watch`) run them, and the consensus tests
(`tests/consensus/cluster.py`) build on them, so a benchmark run from an installed package
never needs the test tree.

    cluster = Cluster(make_configs(base_dir, 3, sync="never"))
    await cluster.start()
    leader = cluster.services[await cluster.wait_leader()]
    ...
    await cluster.stop()
"""
from __future__ import annotations

import asyncio
import os

from api.service import Member, NodeConfig
from clusters.spec import free_ports
from consensus.raft_node import RaftOptions
from consensus.service import ConsensusService, create_service

# Faster failure detection than the defaults, so fault tests and short runs finish quickly.
FAST = RaftOptions(
    election_timeout_min_s=0.3,
    election_timeout_max_s=0.6,
    heartbeat_s=0.05,
    leader_fallback_s=1.2,
    connection_timeout_s=1.0,
    connection_retry_s=0.2,
)


def make_configs(base_dir: str, n: int = 3, *, engine: str = "memory", sync: str = "never") -> list[NodeConfig]:
    """Configs of an `n`-node cluster on free loopback ports, data under `base_dir/<id>`."""
    ports = free_ports(2 * n)
    members = tuple(
        Member(f"n{i + 1}", f"http://127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}") for i in range(n)
    )
    return [
        NodeConfig(
            node_id=m.id,
            members=members,
            secret="test-secret",
            data_dir=os.path.join(base_dir, m.id),
            engine=engine,
            sync=sync,
        )
        for m in members
    ]


class Cluster:
    """The services of `configs`, started and stopped in this process (main thread only:
    pysyncobj's tick thread exits with the thread that built it)."""

    def __init__(self, configs: list[NodeConfig], options: RaftOptions = FAST):
        self.configs = configs
        self.options = options
        self.services: dict[str, ConsensusService | None] = {c.node_id: None for c in configs}

    async def start(self, node_id: str | None = None) -> None:
        for config in self.configs:
            if node_id is None or config.node_id == node_id:
                service = create_service(config, raft_options=self.options)
                await service.start()
                self.services[config.node_id] = service

    async def stop(self, node_id: str | None = None) -> None:
        for nid, service in list(self.services.items()):
            if service is not None and (node_id is None or nid == node_id):
                await service.stop()
                self.services[nid] = None

    def running(self) -> list[ConsensusService]:
        return [s for s in self.services.values() if s is not None]

    async def wait_leader(self, timeout: float = 10.0) -> str:
        """The id of the leader every running node agrees on, once all are healthy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            leaders = set()
            for service in self.running():
                status = await service.status()
                leaders.add(status["leader"])
            if len(leaders) == 1 and None not in leaders and all(s.health()[0] for s in self.running()):
                return leaders.pop()
            await asyncio.sleep(0.05)
        raise AssertionError("no stable leader")

    def follower(self, leader: str) -> ConsensusService:
        return next(s for s in self.running() if s.node_id != leader)
