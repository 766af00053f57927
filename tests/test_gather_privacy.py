"""What a gather collects stays sealed at rest: an account number a caller presses, says as
words or says as numerals is in clear nowhere in Redis (every key of the test's prefix, of
every type: the call's record, transcript, history, seen activities and outbox, the shard's
feed, schedule and indexes; on the real Redis, nothing it receives either, as MONITOR shows
it), nowhere in the bot's log at DEBUG, and nowhere in ``calls show`` or the operator API.

The default flow end to end, over HTTP: the main menu, billing, the account gather with its
read-back, a transfer to the billing queue that the channel first refuses (so it waits in
the outbox), fails, is tried again and connects. Only two things carry the digits in clear,
both over the wire to the channel: the read-back prompt, which says them, and the
``handoff.initiate``, whose context gives them to the agent side.

Run against a bot process on the real Redis (``VARIABLES_KEYS`` set, logging at DEBUG) and
against the app in this process on the embedded Redis (its own key); and over a streaming
socket held by one instance while another sends on it (through Redis Pub/Sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.bot import SEALED
from adapters.http import STORE_KEY
from adapters.keys import Keyspace
from app import create_app
from orchestrator.callflow import DEFAULT_CALLFLOW, shipped_flow
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from simulator.streaming import SERVICE_URL
from tests.conftest import BOT_ENVIRONMENT, REAL_REDIS_URL, delete_prefix, real_redis_or_skip
from tests.jspeer import JsChannel
from tests.process import ROOT, BotProcess, flow_doc, write_flow
from tests.test_redaction import blanked, stored_text
from tests.test_streaming_scale import connect, delivered, send, until

TOKEN = "operator-token-for-tests-0123456789"
OPEN = "2026-11-25T10:00:00-05:00"  # a Wednesday morning in New York: the billing queue is open
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Account numbers that appear nowhere else: every run of five of their digits is above
# 65535, so no port, and no other number the test makes, can hold one by chance.
PRESSED = "98779862"
WORDS = "89778976"
NUMERALS = "97889787"


def leaks(text: str, number: str) -> list[str]:
    """The forms of ``number`` found in ``text``: five digits of it in a row, four spaced as
    a read-back says them, three as digit words, or a masked copy showing more of its end
    than a third (``Privacy.mask_value`` shows the last two of eight)."""
    forms = {number[i : i + 5] for i in range(len(number) - 4)}
    forms |= {" ".join(number[i : i + 4]) for i in range(len(number) - 3)}
    forms |= {" ".join(DIGIT_WORDS[int(d)] for d in number[i : i + 3]) for i in range(len(number) - 2)}
    forms |= {"*" + number[-3:], "* " + " ".join(number[-3:])}
    lowered = text.casefold()
    return sorted(form for form in forms if form in lowered)


def all_leaks(text: str) -> dict[str, list[str]]:
    return {n: found for n in (PRESSED, WORDS, NUMERALS) if (found := leaks(text, n))}


@dataclass
class Entry:
    """How a caller gives the number, confirms it, and asks to try the transfer again."""

    number: str
    enter: Callable[[Caller], list[dict[str, Any]]]
    yes: Callable[[Caller], dict[str, Any]]
    again: Callable[[Caller], dict[str, Any]]


ENTRIES = [
    Entry(PRESSED, lambda c: c.press(PRESSED + "#"), lambda c: c.press("1")[0], lambda c: c.press("1")[0]),
    Entry(
        WORDS,
        lambda c: [c.say("my account is " + " ".join(DIGIT_WORDS[int(d)] for d in WORDS))],
        lambda c: c.say("yes"),
        lambda c: c.say("try again"),
    ),
    Entry(
        NUMERALS,
        lambda c: [c.say(f"it is {NUMERALS}.")],
        lambda c: c.say("that's right"),
        lambda c: c.say("one"),
    ),
]


@dataclass
class Bot:
    """One bot under test, however it runs."""

    post: Callable[[dict[str, Any]], Awaitable[int]]
    get: Callable[[str], Awaitable[Any]]  # an operator API path's JSON
    redis: Redis | RedisCluster
    prefix: str
    log: Callable[[], str]
    redis_url: str | None  # for ``calls show`` (None: the embedded Redis, out of its reach)


@pytest.fixture(params=[pytest.param("process", marks=pytest.mark.real_redis), "embedded"])
async def bot(
    request: pytest.FixtureRequest,
    key_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Bot]:
    """A bot process on the real Redis, or the app in this process on the embedded one."""
    for name in BOT_ENVIRONMENT:  # a developer's settings must not leak into the bot
        monkeypatch.delenv(name, raising=False)
    settings = {
        "REDIS_KEY_PREFIX": key_prefix,
        "CALLFLOW_FILE": str(shipped_flow(DEFAULT_CALLFLOW)),
        "HOURS_CLOCK": OPEN,
        "OPERATOR_TOKEN": TOKEN,
        "OUTBOX_GRACE_SECONDS": "1",
        "SCHEDULER_POLL_SECONDS": "0.05",
        "SCHEDULER_LEASE_SECONDS": "1",  # a refused re-send is tried again a second later
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if request.param == "embedded":
        caplog.set_level(logging.DEBUG)
        client = TestClient(TestServer(create_app(load_settings(**settings))))
        await client.start_server()

        async def post_here(activity: dict[str, Any]) -> int:
            return (await client.post("/api/messages", json=activity)).status

        async def get_here(path: str) -> Any:
            response = await client.get(path, headers=headers)
            assert response.status == 200, await response.text()
            return await response.json()

        try:
            yield Bot(post_here, get_here, client.app[STORE_KEY].redis, key_prefix, lambda: caplog.text, None)
        finally:
            await client.close()
        return
    redis = await real_redis_or_skip()
    env = {**settings, "REDIS_URL": REAL_REDIS_URL, "VARIABLES_KEYS": Fernet.generate_key().decode()}
    process = await BotProcess({**env, "LOG_LEVEL": "DEBUG"}, tmp_path).start()
    async with ClientSession() as session:

        async def post(activity: dict[str, Any]) -> int:
            async with session.post(f"{process.url}/api/messages", json=activity) as response:
                return response.status

        async def get(path: str) -> Any:
            async with session.get(f"{process.url}{path}", headers=headers) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        try:
            yield Bot(post, get, redis, key_prefix, process.log, REAL_REDIS_URL)
        finally:
            process.stop()
            await delete_prefix(redis, key_prefix)
            await redis.aclose()


async def arrived(channel: ChannelStandIn, cid: str, name: str, count: int) -> list[dict[str, Any]]:
    """The call's activities named ``name`` once ``count`` have arrived (re-sends too)."""
    async with asyncio.timeout(20):
        while len(found := [a for a in channel.for_conversation(cid) if a.get("name") == name]) < count:
            await channel.wait_for(len(channel.for_conversation(cid)) + 1, cid)
    return found


async def dump(bot: Bot) -> str:
    """Every key under the test's prefix, of every type, as one text (Redis times blanked)."""
    return await stored_text(bot.redis, bot.prefix, reference=True)


def calls_show(bot: Bot, cid: str) -> str:
    """``python -m cli calls show`` of the call, for people and as JSON."""
    assert bot.redis_url is not None
    base = [sys.executable, "-m", "cli", "--redis-url", bot.redis_url, "--prefix", bot.prefix]
    outputs = []
    for extra in ([], ["--json"]):
        done = subprocess.run(
            [*base, "calls", "show", cid, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        # Nothing on stderr: it reads no sealed value, so it needs (and lacks) no key.
        assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
        outputs.append(done.stdout)
    return "\n".join(outputs)


@contextlib.asynccontextmanager
async def monitored(prefix: str) -> AsyncIterator[list[str]]:
    """Every command the real Redis receives that names ``prefix``, as MONITOR shows it
    (its arguments whole: what reaches Redis, stored or not), while in the block."""
    client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    seen: list[str] = []
    started = asyncio.Event()

    async def watch() -> None:
        async with client.monitor() as monitor:
            started.set()
            async for info in monitor.listen():
                if prefix in info["command"]:
                    seen.append(info["command"])

    task = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(10):
            await started.wait()
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def give_the_number(bot: Bot, channel: ChannelStandIn, entry: Entry) -> list[str]:
    """One call: the number given, read back, confirmed; the transfer refused (Redis is read
    while it waits in the outbox), failed, tried again, connected; the caller hangs up.
    What the operator API and ``calls show`` then show of it."""
    caller = Caller(channel.url)
    cid = caller.conversation_id
    for activity in [
        caller.start(),
        caller.say("billing"),
        caller.say("current customer"),
        *entry.enter(caller),
    ]:
        assert await bot.post(activity) == 201
    readback = channel.for_conversation(cid)[-1]
    assert readback["text"].startswith(f"You entered {' '.join(entry.number)}."), readback

    channel.refuse_next = 1_000_000
    assert await bot.post(entry.yes(caller)) == 201
    outbox = [str(kept) for kept in await bot.redis.hvals(Keyspace(bot.prefix).call(cid).outbox)]
    # Each entry is "<ms>:<payload>": the payload sealed, as it carries the variables.
    assert outbox and all(kept.partition(":")[2].startswith(SEALED) for kept in outbox), outbox
    assert all_leaks(await dump(bot)) == {}
    channel.refuse_next = 0
    await arrived(channel, cid, "handoff.initiate", 1)

    for activity in (
        caller.status({"state": "failed"}),
        entry.again(caller),
        caller.status({"state": "accepted"}),
    ):
        assert await bot.post(activity) == 201
    handoffs = await arrived(channel, cid, "handoff.initiate", 2)
    assert [h["value"]["Variables"] for h in handoffs] == [{"account": entry.number}] * 2
    assert await bot.post(caller.hang_up()) == 201

    # Over the wire, only the read-back and the handoff's context carry the digits.
    for activity in channel.for_conversation(cid):
        sent = copy.deepcopy(activity)
        if sent.get("name") == "handoff.initiate":
            del sent["value"]["Variables"]
        elif str(sent.get("text", "")).startswith("You entered"):
            continue
        assert all_leaks(json.dumps(sent)) == {}, sent
    views = [json.dumps(await bot.get(f"/api/calls/{cid}"))]
    if bot.redis_url is not None:
        views.append(await asyncio.to_thread(calls_show, bot, cid))
    return views


async def test_gathered_digits_are_in_clear_nowhere_at_rest(bot: Bot, channel: ChannelStandIn) -> None:
    """Three callers give their account number: pressed, said as words, said as numerals.
    Redis is read whole while each one's transfer waits refused and at the end, with the
    log, ``calls show`` and the operator API; on the real Redis, what it received too."""
    views: list[str] = []
    watching: contextlib.AbstractAsyncContextManager[list[str]] = (
        monitored(bot.prefix) if bot.redis_url else contextlib.nullcontext([])
    )
    async with watching as commands:
        for entry in ENTRIES:
            views += await give_the_number(bot, channel, entry)

    stored = await dump(bot)
    assert "* * * * * * 6 2" in stored  # the read-back as the transcript keeps it
    assert all_leaks(stored) == {}
    assert all_leaks(blanked("\n".join(commands))) == {}
    assert bool(commands) == bool(bot.redis_url)
    log = bot.log()
    assert log.count("(account: 8 digits)") == len(ENTRIES)  # the log has every call's turns ...
    assert all_leaks(log) == {}  # ... and none of their digits
    assert all_leaks("\n".join(views)) == {}


# --- between instances: what one sends over another's socket crosses Redis sealed ---------


@pytest.mark.real_redis
async def test_a_send_routed_to_the_sockets_instance_crosses_redis_sealed(
    key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's socket is on instance A; B does the due work (A's scheduler barely polls):
    the inter-digit timeout's read-back, and the re-send of a transfer the channel refused,
    are sent by B over A's socket, published to A's inbox through Redis. Nothing Redis
    receives, stored or published, holds the digits in clear; the channel gets them."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    redis = await real_redis_or_skip()
    data = flow_doc("default.yaml")
    data["nodes"]["account"]["inter_digit_seconds"] = 1
    env = {
        "REDIS_URL": REAL_REDIS_URL,
        "REDIS_KEY_PREFIX": key_prefix,
        "CALLFLOW_FILE": write_flow(tmp_path, data),
        "HOURS_CLOCK": OPEN,
        "VARIABLES_KEYS": Fernet.generate_key().decode(),
        "SCHEDULER_LEASE_SECONDS": "1",
        "LOG_LEVEL": "DEBUG",
    }
    slow, fast = {"SCHEDULER_POLL_SECONDS": "10"}, {"SCHEDULER_POLL_SECONDS": "0.05"}
    bots = [BotProcess({**env, **slow}, tmp_path, "a"), BotProcess({**env, **fast}, tmp_path, "b")]
    caller = Caller(SERVICE_URL, "routed:1")
    try:
        await asyncio.gather(*(bot.start() for bot in bots))
        async with JsChannel() as channel, monitored(key_prefix) as commands:
            await connect(channel, "a", bots[0])
            for activity in [caller.start(), *caller.press("11" + PRESSED)]:  # no "#": the timer takes it
                await send(channel, "a", activity, bots)

            async def read_back() -> bool:
                return any(str(r["body"].get("text")).startswith("You entered") for r in delivered(channel))

            await until(read_back, 20, "the read-back, after the inter-digit timeout", bots)
            await channel.answer("a", status=503)
            await send(channel, "a", caller.press("1")[0], bots)  # confirmed: transferred, refused
            await channel.wait_requests(len(channel.requests("a")) + 1, "a", within=20)  # a re-send
            await channel.answer("a", status=200)

            async def handed_off() -> bool:
                return any(r["body"].get("name") == "handoff.initiate" for r in delivered(channel))

            await until(handed_off, 20, "the handoff, re-sent", bots)
            await send(channel, "a", caller.hang_up(), bots)
            received = [r["body"] for r in delivered(channel)]
        stored = await stored_text(redis, key_prefix, reference=True)
    finally:
        for bot in bots:
            bot.stop()
        await delete_prefix(redis, key_prefix)
        await redis.aclose()

    handoff = next(r for r in received if r.get("name") == "handoff.initiate")
    assert handoff["value"]["Variables"] == {"account": PRESSED}
    # B sent both over A's socket: the read-back and the handoff (refused, then again).
    routed = [c for c in commands if c.upper().startswith("SPUBLISH") and '"op": "send"' in c]
    assert len(routed) >= 3 and all('"sealed": "gAAAAA' in c for c in routed), routed
    assert all_leaks(blanked("\n".join(commands))) == {}  # nothing Redis received holds them ...
    assert all_leaks(stored) == {}  # ... nor what it keeps
    assert all_leaks(bots[0].log() + bots[1].log()) == {}
