"""Shared fixtures: Redis backends (embedded fake and a real server), the channel stand-in.

The suite's bots run the Telephony how-to's sample flow unless a test names another
(``CALLFLOW_FILE``): most tests were written against its behaviour, and it has no opening
hours that would make a result depend on the clock. The default flow has tests of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.keys import Keyspace
from adapters.store import RedisCallStore, Retention
from orchestrator.callflow import SAMPLE_CALLFLOW, CallFlow, shipped_flow
from simulator.channel import ChannelStandIn
from tests.servers import IN_CI, REAL_REDIS_URL, RedisClusterServers

__all__ = ["IN_CI", "REAL_REDIS_URL"]

SAMPLE_FLOW = shipped_flow(SAMPLE_CALLFLOW)


def with_agents(flow: CallFlow, **changes: Any) -> CallFlow:
    """``flow`` with its queue ``agents`` (the sample flow's one queue) changed."""
    queue = flow.queues["agents"].model_copy(update=changes)
    return flow.model_copy(update={"queues": {**flow.queues, "agents": queue}})


os.environ.setdefault("CALLFLOW_FILE", str(SAMPLE_FLOW))  # bot processes the tests start inherit it


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster of the tests' own, started once, on first use."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(params=["fake", "real", "cluster"])
async def redis_client(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Redis]:
    """The same tests against the embedded fake, a real Redis server and a Redis Cluster."""
    if request.param == "fake":
        client: Redis = FakeRedis(server=FakeServer(), decode_responses=True)
        yield client
        await client.aclose()
        return
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.url, decode_responses=True)  # type: ignore[assignment]
    else:
        client = await real_redis_or_skip()
    yield client
    await delete_prefix(client, key_prefix)
    await client.aclose()


@pytest.fixture
async def instance_clients(
    request: pytest.FixtureRequest, redis_client: Redis
) -> AsyncIterator[list[Redis | RedisCluster]]:
    """Three instances' clients of ``redis_client``'s Redis, each with connections of its
    own (redis-py allows a client 100), as three bot instances would have."""
    backend = request.node.callspec.params["redis_client"]
    clients: list[Redis | RedisCluster] = [redis_client]
    for _ in range(2):
        if backend == "fake":
            server = redis_client.connection_pool.connection_kwargs["server"]
            clients.append(FakeRedis(server=server, decode_responses=True))
        elif backend == "cluster":
            url = request.getfixturevalue("redis_cluster").url
            clients.append(RedisCluster.from_url(url, decode_responses=True))
        else:
            clients.append(Redis.from_url(REAL_REDIS_URL, decode_responses=True))
    for client in clients:
        if isinstance(client, RedisCluster):
            # As an instance's start-up ping does: redis-py's async cluster client, sent
            # commands at once before it has read the slots, fails some with AttributeError.
            await client.initialize()
    yield clients
    for client in clients[1:]:
        await client.aclose()


async def delete_prefix(client: Redis | RedisCluster, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for key in keys:  # one by one: on a cluster they live in many slots
        await client.delete(key)


# Settings the tests set themselves: a developer's environment must not leak into the bot.
BOT_ENVIRONMENT = (
    "MicrosoftAppId",
    "MicrosoftAppPassword",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "REDIS_USERNAME",
    "REDIS_PASSWORD",
    "REDIS_TLS_CA_FILE",
    "REDIS_TLS_CERT_FILE",
    "REDIS_TLS_KEY_FILE",
    "OPERATOR_TOKEN",
    "AGENT_TOKEN",
    "AGENT_RATE_LIMIT",
    "PUSH_URL",
    "PUSH_SECRET",
    "CHANNEL_SERVICE",
    "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL",
    "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER",
)


@pytest.fixture(params=["fake", "real", "cluster"])
async def bot_redis(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Settings that point a bot at the embedded fake, the real Redis or the test cluster,
    with the bot's other environment cleared."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    if request.param == "real":
        await (await real_redis_or_skip()).aclose()
        return {"REDIS_URL": REAL_REDIS_URL}
    if request.param == "cluster":
        return {"REDIS_URL": request.getfixturevalue("redis_cluster").url, "REDIS_CLUSTER": True}
    return {"REDIS_URL": None}


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


# Headless Chromium fixtures (browser_page, chromium) for every test: see tests/browser.py.
pytest_plugins = ["tests.browser"]
