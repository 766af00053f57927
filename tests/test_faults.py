"""Redis faults: lost replies, a Redis that stops and comes back. Real servers of the
tests' own, on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from adapters.http import STORE_KEY
from adapters.store import COMMIT_SCRIPT, RedisCallStore, decode_line
from app import create_app
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import SAMPLE_FLOW
from tests.proxy import ReplyDroppingProxy
from tests.servers import RedisServer

pytestmark = pytest.mark.real_redis

COMMIT_SHA = hashlib.sha1(COMMIT_SCRIPT.encode()).hexdigest()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always").start()
    yield server
    server.stop()


async def bot_on(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, redis_timeout: float = 1
) -> TestClient[Any, Any]:
    for name in ("MicrosoftAppId", "MicrosoftAppPassword", "REDIS_URL", "CALLFLOW_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(
        REDIS_URL=redis_url,
        CALLFLOW_FILE=SAMPLE_FLOW,
        REDIS_TIMEOUT_SECONDS=redis_timeout,
        OUTBOX_GRACE_SECONDS=1,
        SCHEDULER_POLL_SECONDS=0.05,
        TRANSCRIPT_MAX_ENTRIES=1000,
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


@pytest.fixture
async def proxied(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ReplyDroppingProxy, TestClient[Any, Any]]]:
    """A bot whose Redis connections go through a proxy that can lose commit replies."""
    proxy = await ReplyDroppingProxy(redis_server.port, COMMIT_SHA).start()
    bot = await bot_on(proxy.url, monkeypatch)
    yield proxy, bot
    await bot.close()
    await proxy.stop()


async def test_a_lost_commit_reply_is_not_applied_twice(
    proxied: tuple[ReplyDroppingProxy, TestClient[Any, Any]], channel: ChannelStandIn
) -> None:
    """The server ran the commit, the reply was lost, redis-py retried: one application."""
    proxy, bot = proxied
    caller = Caller(channel.url)
    proxy.drop_evalsha_replies = 1
    response = await bot.post("/api/messages", json=caller.say("agent"))  # the commit's reply is lost
    assert response.status == 201 and proxy.dropped == 1
    call = (await bot.app[STORE_KEY].load(caller.conversation_id)).call
    assert call is not None and call.version == 1 and call.attempts == 1
    assert [a["name"] for a in channel.for_conversation(caller.conversation_id)] == ["handoff.initiate"]
    steps = [step.trigger for _, step in await bot.app[STORE_KEY].history(caller.conversation_id)]
    assert steps == ["move", "request_agent"]  # one commit's steps, once


async def test_a_commit_whose_every_reply_is_lost_is_answered_once_after_all(
    proxied: tuple[ReplyDroppingProxy, TestClient[Any, Any]], channel: ChannelStandIn
) -> None:
    """redis-py gives up: 503, the channel redelivers, the redelivery is a duplicate, and
    the kept handoff.initiate is sent by the scheduler: once."""
    proxy, bot = proxied
    caller = Caller(channel.url)
    ask = caller.say("agent")
    proxy.drop_evalsha_replies = 100
    assert (await bot.post("/api/messages", json=ask)).status == 503
    proxy.drop_evalsha_replies = 0
    assert (await bot.post("/api/messages", json=ask)).status == 201  # the redelivery
    await channel.wait_for(1, caller.conversation_id)
    await asyncio.sleep(1.5)  # past another grace period: nothing more may come
    sent = channel.for_conversation(caller.conversation_id)
    assert [a["name"] for a in sent] == ["handoff.initiate"]
    call = (await bot.app[STORE_KEY].load(caller.conversation_id)).call
    assert call is not None and call.version == 1


async def test_redis_restarting_under_load_means_503s_then_recovery_and_no_half_written_call(
    redis_server: RedisServer, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = await bot_on(redis_server.url, monkeypatch)
    callers = [Caller(channel.url) for _ in range(10)]
    statuses: Counter[int] = Counter()
    refused: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def caller_loop(caller: Caller) -> None:
        i = 0
        while not stop.is_set():
            activity = caller.say(f"turn {i}")
            i += 1
            status = (await bot.post("/api/messages", json=activity)).status
            statuses[status] += 1
            if status != 201:
                refused.append(activity)
            await asyncio.sleep(0.01)

    try:
        loops = [asyncio.create_task(caller_loop(caller)) for caller in callers]
        await asyncio.sleep(1.0)
        redis_server.stop()  # gone, mid-traffic
        await asyncio.sleep(1.0)
        assert (await bot.get("/readyz")).status == 503
        redis_server.start()  # back on the same port, with its append-only file
        restarted = time.monotonic()
        async with asyncio.timeout(30):
            while (await bot.get("/readyz")).status != 200:  # noqa: ASYNC110 - polling HTTP
                await asyncio.sleep(0.05)
        recovered = time.monotonic() - restarted
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*loops)
        assert set(statuses) == {201, 503}, statuses
        print(f"\nredis restart: {dict(statuses)}; ready again {recovered:.2f} s after the restart")

        for activity in refused:  # the channel redelivers what was refused
            assert (await bot.post("/api/messages", json=activity)).status == 201

        store: RedisCallStore = bot.app[STORE_KEY]
        for caller in callers:
            keys = store.keys.call(caller.conversation_id)
            record = await store.redis.hgetall(keys.call)
            lines = [decode_line(str(raw)) for raw in await store.redis.lrange(keys.transcript, 0, -1)]
            version = int(record["version"])
            assert version == await store.redis.hlen(keys.seen)  # one commit per activity
            assert len(lines) == 2 * version  # every commit wrote its caller and bot line
            said = Counter(line.text for line in lines if line.role == "caller")
            assert max(said.values()) == 1  # nothing applied twice
    finally:
        stop.set()
        await bot.close()


# Connections to the black hole are abandoned mid-command by design; redis-py then
# leaves their transports to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_redis_that_never_answers_gets_a_503_not_a_hang(
    channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A black hole: it accepts connections and never replies."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    bot = await bot_on(f"redis://127.0.0.1:{port}/0", monkeypatch, redis_timeout=0.2)
    try:
        response = await bot.post("/api/messages", json=Caller(channel.url).say("agent"))
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert (await bot.get("/readyz")).status == 503
    finally:
        await bot.close()
        hole.close()
