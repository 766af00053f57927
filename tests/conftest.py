"""Shared fixtures: Redis backends (embedded fake and a real server), the channel stand-in."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from redis.asyncio import Redis

from adapters.keys import Keyspace
from adapters.store import RedisCallStore, Retention
from tests.channel import ChannelStandIn

REAL_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"


async def real_redis_or_skip() -> Redis:
    """A client for the real server; under CI=true a missing server fails the test."""
    client = Redis.from_url(REAL_REDIS_URL, decode_responses=True, socket_timeout=5)
    try:
        await client.ping()
    except Exception as e:
        await client.aclose()
        message = f"real Redis at {REAL_REDIS_URL} is not reachable: {e}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return client


def require_real_redis_sync() -> None:
    """The same check for tests that drive bot processes on the real server."""
    import redis

    try:
        redis.Redis.from_url(REAL_REDIS_URL, socket_timeout=5).ping()
    except Exception as e:
        message = f"real Redis at {REAL_REDIS_URL} is not reachable: {e}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's calls."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["fake", "real"])
async def redis_client(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Redis]:
    """The same tests against the embedded fake and a real Redis server."""
    if request.param == "fake":
        client: Redis = FakeRedis(server=FakeServer(), decode_responses=True)
        yield client
        await client.aclose()
        return
    client = await real_redis_or_skip()
    yield client
    await delete_prefix(client, key_prefix)
    await client.aclose()


async def delete_prefix(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


@pytest.fixture
def retention() -> Retention:
    return Retention(live_seconds=3600, ended_seconds=600, transcript_max=50, history_max=1000)


@pytest.fixture
def store(redis_client: Redis, key_prefix: str, retention: Retention) -> RedisCallStore:
    return RedisCallStore(redis_client, Keyspace(key_prefix), retention)


@pytest.fixture
async def channel() -> AsyncIterator[ChannelStandIn]:
    stand_in = await ChannelStandIn().start()
    yield stand_in
    await stand_in.stop()
