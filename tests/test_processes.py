"""Real bot processes on the real Redis: a call survives kill -9, two processes racing
on the same calls apply every activity exactly once, and operators see every instance."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from adapters.keys import Keyspace
from adapters.store import decode_line, decode_step
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT, BotProcess

pytestmark = pytest.mark.real_redis


@pytest.fixture
def bot_env(key_prefix: str) -> Iterator[dict[str, str]]:
    require_real_redis_sync()
    yield {"REDIS_URL": REAL_REDIS_URL, "REDIS_KEY_PREFIX": key_prefix, "TRANSCRIPT_MAX_ENTRIES": "1000"}
    client = redis.Redis.from_url(REAL_REDIS_URL)
    keys = list(client.scan_iter(match=f"{key_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(session: aiohttp.ClientSession, bot: BotProcess, activity: dict[str, Any]) -> int:
    async with session.post(f"{bot.url}/api/messages", json=activity) as response:
        return response.status


async def test_a_call_survives_kill_9_and_restart(
    bot_env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    caller = Caller(channel.url)
    cid = caller.conversation_id
    first = await BotProcess(bot_env, tmp_path, "first").start()
    try:
        for activity in [caller.start(), caller.say("1"), caller.say("remember me")]:
            assert await post(session, first, activity) == 201, first.log()
    finally:
        first.kill()
    assert first.proc is not None and first.proc.returncode == -9

    second = await BotProcess(bot_env, tmp_path, "second").start()
    try:
        assert await post(session, second, caller.say("agent")) == 201, second.log()
    finally:
        second.stop()
    handoff = channel.for_conversation(cid)[-1]
    assert handoff["name"] == "handoff.initiate"
    lines = [(a["from"]["role"], a["text"]) for a in handoff["attachments"][0]["content"]["activities"]]
    assert [text for role, text in lines if role == "user"] == ["1", "remember me", "agent"]
    assert len(lines) == 6  # welcome, 1, billing, remember me, echo, agent
    assert lines[4] == ("bot", 'What I heard was "remember me"')


async def test_two_processes_apply_every_activity_exactly_once(
    bot_env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    """Each call gets transfer requests, failed statuses and plain messages, every one
    delivered twice to either process, all in flight at once. Serial semantics must
    hold: the history is one unbroken chain and every count agrees with it."""
    flow = yaml.safe_load((ROOT / "orchestrator" / "flows" / "transfer-sample.yaml").read_text())
    flow["queues"]["agents"]["max_attempts"] = 20
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    env = {**bot_env, "CALLFLOW_FILE": str(tmp_path / "flow.yaml")}
    calls, each = 8, 8
    bots = [await BotProcess(env, tmp_path, f"bot{i}").start() for i in range(2)]
    try:
        callers = [Caller(channel.url) for _ in range(calls)]
        deliveries = {
            caller.conversation_id: [caller.say("agent") for _ in range(each)]
            + [caller.status({"state": "failed", "message": "busy"}) for _ in range(each)]
            + [caller.say(f"msg {c}-{i}") for i in range(each)]
            for c, caller in enumerate(callers)
        }
        pick = random.Random(7)
        work = [(pick.choice(bots), a) for acts in deliveries.values() for a in acts for _ in range(2)]
        pick.shuffle(work)
        gate = asyncio.Semaphore(48)

        async def deliver(bot: BotProcess, activity: dict[str, Any]) -> int:
            async with gate:
                return await post(session, bot, activity)

        statuses = await asyncio.gather(*(deliver(bot, activity) for bot, activity in work))
        assert Counter(statuses) == Counter({201: len(work)}), [b.log() for b in bots]
    finally:
        for bot in bots:
            bot.stop()

    replies = channel.reply_counts()
    client: Any = redis.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    keys = Keyspace(bot_env["REDIS_KEY_PREFIX"])
    for c, (cid, activities) in enumerate(deliveries.items()):
        assert all(replies[a["id"]] <= 1 for a in activities)
        call_keys = keys.call(cid)
        record = client.hgetall(call_keys.call)
        assert int(record["version"]) == len(activities) == client.hlen(call_keys.seen)

        steps = [decode_step(raw) for raw in client.lrange(call_keys.history, 0, -1)]
        state = "bot"
        for step in steps:  # one unbroken chain: no two turns ran on the same version
            assert step["from"] == state, steps
            state = step["to"]
        assert record["state"] == state

        transfers = sum(s["to"] == "transferring" and s["from"] != "transferring" for s in steps)
        failures = sum(s["from"] == "transferring" and s["to"] == "failed" for s in steps)
        sent = channel.for_conversation(cid)
        attempts = int(record.get("attempts", 0))  # 0 is not stored
        assert attempts == transfers == sum(a.get("name") == "handoff.initiate" for a in sent)
        assert failures == sum("could not take your call" in a.get("text", "") for a in sent)

        lines = [decode_line(raw) for raw in client.lrange(call_keys.transcript, 0, -1)]
        said = Counter(line.text for line in lines if line.role == "caller")
        assert said == Counter({"agent": each, **{f"msg {c}-{i}": 1 for i in range(each)}})
    client.close()


async def test_sigterm_finishes_in_flight_turns_and_exits_cleanly(
    bot_env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    bot = await BotProcess(bot_env, tmp_path, "graceful").start()
    channel.delay = 1.0  # the reply is still being posted when SIGTERM arrives
    caller = Caller(channel.url)
    in_flight = asyncio.create_task(post(session, bot, caller.say("1")))
    await asyncio.sleep(0.3)
    assert bot.proc is not None
    bot.proc.send_signal(signal.SIGTERM)
    assert await in_flight == 201
    assert await asyncio.to_thread(bot.proc.wait, 30) == 0, bot.log()
    (reply,) = channel.for_conversation(caller.conversation_id)
    assert reply["text"].startswith("Hello and thank you for calling billing department.")


async def test_operators_see_every_instance(
    bot_env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    """Two bot processes: `calls watch` (a process too) shows the steps both commit, and
    either instance's operator API answers for all calls."""
    token = "operator-token-0123456789"
    env = {**bot_env, "OPERATOR_TOKEN": token}
    bots = [await BotProcess(env, tmp_path, f"bot{i}").start() for i in range(2)]
    out = tmp_path / "watch.out"
    command = [sys.executable, "-m", "cli", "--redis-url", REAL_REDIS_URL, "--prefix"]
    with out.open("w") as sink:
        watch = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block
            [*command, bot_env["REDIS_KEY_PREFIX"], "calls", "watch", "--json"], cwd=ROOT, stdout=sink
        )
    try:
        # Until the watch shows a warm-up call's step, it may not be watching yet.
        async with asyncio.timeout(30):
            while '"call": "warm-up' not in out.read_text():
                await post(
                    session,
                    bots[0],
                    Caller(channel.url, conversation_id=f"warm-up-{random.random()}").say("0"),
                )
                await asyncio.sleep(0.3)
        first, second = Caller(channel.url), Caller(channel.url)
        assert await post(session, bots[0], first.say("agent")) == 201
        assert await post(session, bots[1], second.say("agent")) == 201
        assert await post(session, bots[1], first.status({"state": "failed", "message": "busy"})) == 201
        assert await post(session, bots[0], second.status({"state": "accepted"})) == 201
        wanted = {
            (first.conversation_id, "bot", "transferring"),
            (second.conversation_id, "bot", "transferring"),
            (first.conversation_id, "transferring", "failed"),
            (second.conversation_id, "transferring", "accepted"),
        }

        def seen() -> set[tuple[str, str, str]]:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            return {(r["call"], r["from"], r["to"]) for r in rows}

        async with asyncio.timeout(15):
            while not wanted <= seen():  # noqa: ASYNC110 - another process writes the file
                await asyncio.sleep(0.1)

        # Both instances answer for both calls, whichever took their activities.
        for bot in bots:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{bot.url}/api/calls", headers=headers) as response:
                listed = {c["id"]: c["state"] for c in (await response.json())["calls"]}
            assert listed[first.conversation_id] == "failed" and listed[second.conversation_id] == "accepted"
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(10)
        for bot in bots:
            bot.stop()
    assert watch.returncode == 0
