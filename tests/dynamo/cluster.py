"""An in-process ap cluster on free loopback ports: each node a DynamoService with its own
peer server (real HTTP peer traffic, authenticated), all in the test's event loop."""
from __future__ import annotations

import tempfile

from api.service import Member, NodeConfig
from dynamo.service import APOptions, DynamoService
from dynamo.coordinator import CoordinatorLimits
from clusters.spec import free_ports

SECRET = "test-secret"
FAST = APOptions(
    probe_interval_s=0.1,
    handoff_interval_s=0.05,
    coordinator=CoordinatorLimits(peer_timeout_s=1.0, read_repair_wait_s=0.3),
)


class InProcessCluster:
    def __init__(self, size: int = 5, *, engine: str = "memory", options: APOptions = FAST, **config):
        ports = free_ports(size)
        self.members = tuple(
            Member(f"n{i + 1}", f"http://127.0.0.1:{1 + i}", f"127.0.0.1:{port}") for i, port in enumerate(ports)
        )
        self.tmp = tempfile.TemporaryDirectory(prefix="capkv-ap-")
        self.engine, self.options, self.config = engine, options, config
        self.nodes: dict[str, DynamoService] = {}

    def node_config(self, node_id: str) -> NodeConfig:
        return NodeConfig(
            node_id=node_id, members=self.members, secret=SECRET, data_dir=f"{self.tmp.name}/{node_id}",
            engine=self.engine, sync="never", **self.config,
        )

    async def start(self, node_id: str | None = None) -> None:
        for member in self.members:
            if node_id in (None, member.id):
                service = DynamoService(self.node_config(member.id), options=self.options)
                await service.start()
                self.nodes[member.id] = service

    async def kill(self, node_id: str) -> None:
        """Stop a node (its memory engine data is lost; use engine='hash'/'lsm' to keep it)."""
        await self.nodes.pop(node_id).stop()

    async def stop(self) -> None:
        for node_id in list(self.nodes):
            await self.kill(node_id)
        self.tmp.cleanup()

    def __getitem__(self, node_id: str) -> DynamoService:
        return self.nodes[node_id]
