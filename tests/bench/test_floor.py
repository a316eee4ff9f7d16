"""`bench.floor`'s dynamo stand-in serves the requests `bench.cluster` sends, as a
replicated store: behaviour only (answers, replication), never speed."""
from __future__ import annotations

import asyncio
import base64
import os

import aiohttp
import pytest

from bench.cluster import CapkvTarget
from bench.floor import start_floor, stop_procs, wait_serving

pytestmark = pytest.mark.timeout(60)


async def started(kind: str) -> tuple[list, CapkvTarget]:
    procs, urls = start_floor(kind)
    target = CapkvTarget(urls, "ap", [p.pid for p in procs])
    try:
        await wait_serving(target, timeout=20)
    except BaseException:
        stop_procs(procs)
        raise
    return procs, target


async def test_dynamo_stand_in_answers_put_get_and_miss():
    procs, target = await started("dynamo")
    value = os.urandom(256)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with target.put(session, 0, "floor/a/b", value) as response:
                assert response.status == 200
                assert await response.json() == {"key": "floor/a/b"}
            async with target.get(session, 1, "floor/a/b", False) as response:
                assert response.status == 200
                body = await response.json()
            assert body["key"] == "floor/a/b"
            assert base64.b64decode(body["value_base64"]) == value
            async with target.get(session, 2, "floor/absent", False) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "key_not_found"
    finally:
        stop_procs(procs)


async def test_dynamo_stand_in_stores_every_put_on_all_three_nodes(monkeypatch):
    # With R=1 a get reads its own node's dict alone: each node answering proves N=3.
    monkeypatch.setenv("FLOOR_DYNAMO_R", "1")
    procs, target = await started("dynamo")
    value = os.urandom(256)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with target.put(session, 2, "floor/everywhere", value) as response:
                assert response.status == 200
            for node in (0, 1, 2):
                # W=2: the put was answered after one peer's ack, the third copy may lag.
                for _attempt in range(100):
                    async with target.get(session, node, "floor/everywhere", False) as response:
                        body = await response.json()
                    if response.status != 404:
                        break
                    await asyncio.sleep(0.02)
                assert response.status == 200, (node, body)
                assert base64.b64decode(body["value_base64"]) == value
    finally:
        stop_procs(procs)
