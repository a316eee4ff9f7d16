import pytest

from .cluster import InProcessCluster


@pytest.fixture
async def cluster():
    clusters = []

    async def make(size=5, **kwargs):
        c = InProcessCluster(size, **kwargs)
        clusters.append(c)
        await c.start()
        return c

    yield make
    for c in clusters:
        await c.stop()
