"""Scale-out: three bot processes on one real Redis (or a Redis Cluster), round-robin
traffic with duplicate deliveries, and one instance killed with SIGKILL mid-run.

The full-size variants (300 calls, 1,000 watchdogs) are marked ``heavy`` and left out
of the default run: ``make test PYTEST_ARGS="-m heavy"`` runs them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.cluster import RedisCluster

from adapters.keys import SHARDS, Keyspace
from adapters.store import decode_step
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import BotProcess, flow_file
from tests.silent_callers import END, KINDS, TOKEN, kind_of, said, script, timers_settings

pytestmark = pytest.mark.real_redis

FIRST, SECOND = "+14251231234", "+14255550100"


@pytest.fixture
def env(key_prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    require_real_redis_sync()
    yield {
        "REDIS_URL": REAL_REDIS_URL,
        "REDIS_KEY_PREFIX": key_prefix,
        "OUTBOX_GRACE_SECONDS": "3",
        "SCHEDULER_POLL_SECONDS": "0.1",
        "SCHEDULER_LEASE_SECONDS": "2",
    }
    client = redis.Redis.from_url(REAL_REDIS_URL)
    for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


class LoadBalancer:
    """Round-robin over the instances; like nginx's proxy_next_upstream, a request that
    fails to connect, or dies with its instance, goes to the next one."""

    def __init__(self, session: aiohttp.ClientSession, bots: list[BotProcess]) -> None:
        self.session, self.bots = session, bots
        self.next = 0
        self.cut_off = 0  # requests an instance died with: they may have been applied

    async def post(self, activity: dict[str, Any], start: int | None = None) -> int:
        if start is None:
            start, self.next = self.next, self.next + 1
        for attempt in range(len(self.bots) * 4):
            bot = self.bots[(start + attempt) % len(self.bots)]
            try:
                async with self.session.post(f"{bot.url}/api/messages", json=activity) as response:
                    if response.status < 500:
                        return response.status
            except aiohttp.ServerDisconnectedError:
                self.cut_off += 1
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"no instance took activity {activity['id']}")


async def start_bots(env: dict[str, str], tmp_path: Path, count: int = 3) -> list[BotProcess]:
    return list(await asyncio.gather(*(BotProcess(env, tmp_path, f"bot{i}").start() for i in range(count))))


def history(client: Any, keys: Keyspace, conversation_id: str) -> list[tuple[str, str, str]]:
    """The call's steps (trigger, from, to); a move through the call flow as ("move", node, "")."""
    entries = map(decode_step, client.lrange(keys.call(conversation_id).history, 0, -1))
    return [
        (f["trigger"], f["node"], "") if f["trigger"] == "move" else (f["trigger"], f["from"], f["to"])
        for f in entries
    ]


@pytest.mark.parametrize(
    ("backend", "calls"), [("real", 90), ("cluster", 90), pytest.param("real", 300, marks=pytest.mark.heavy)]
)
async def test_calls_spread_over_three_instances_survive_one_being_killed(
    backend: str,
    calls: int,
    request: pytest.FixtureRequest,
    env: dict[str, str],
    tmp_path: Path,
    channel: ChannelStandIn,
    session: aiohttp.ClientSession,
) -> None:
    env = {**env, "CALLFLOW_FILE": flow_file(tmp_path, targets=[FIRST, SECOND])}
    if backend == "cluster":
        env.update(REDIS_URL=request.getfixturevalue("redis_cluster").url, REDIS_CLUSTER="1")
    bots = await start_bots(env, tmp_path)
    lb = LoadBalancer(session, bots)
    pick = random.Random(11)
    started = asyncio.Event()

    async def call(i: int, caller: Caller) -> None:
        script = [caller.start(), caller.say("1"), caller.say("agent"), caller.status({"state": "failed"})]
        script += [caller.say("agent")]
        script += [caller.status({"state": "accepted"}), caller.hang_up()] if i % 2 else [caller.hang_up()]
        # What the agent side answers depends on what reached it: wait for each transfer
        # (and the retry prompt) to arrive, re-sent by a survivor if its sender died.
        arrivals = {2: ("handoff", 1), 3: ("retry", 1), 4: ("handoff", 2)}
        for n, activity in enumerate(script):
            if n == 2 and i == calls // 3:
                started.set()
            first = lb.post(activity)
            if pick.random() < 0.25:  # the channel delivers it twice, to another instance
                await asyncio.gather(first, lb.post(activity, start=lb.next + 1))
            else:
                await first
            if n in arrivals:
                await arrived(caller, *arrivals[n])

    async def kill_one() -> None:
        await started.wait()
        bots[0].kill()

    def count(caller: Caller, kind: str) -> int:
        sent = channel.deliveries(caller.conversation_id).values()
        if kind == "handoff":
            return sum(a.get("name") == "handoff.initiate" for a in sent)
        return sum("could not take your call" in a.get("text", "") for a in sent)

    async def arrived(caller: Caller, kind: str, at_least: int) -> None:
        async with asyncio.timeout(30):
            while count(caller, kind) < at_least:  # noqa: ASYNC110 - waiting on other processes
                await asyncio.sleep(0.1)

    callers = [Caller(channel.url) for _ in range(calls)]
    try:
        await asyncio.gather(kill_one(), *(call(i, c) for i, c in enumerate(callers)))
    finally:
        for bot in bots:
            bot.stop()

    client: Any = (RedisCluster if backend == "cluster" else redis.Redis).from_url(
        env["REDIS_URL"], decode_responses=True
    )
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    expected = [
        ("move", "main", ""),
        ("move", "billing", ""),
        ("move", "agent", ""),
        ("request_agent", "bot", "transferring"),
        ("fail", "transferring", "failed"),
        ("move", "agent", ""),
        ("request_agent", "failed", "transferring"),
        ("accept", "transferring", "accepted"),
        ("hang_up", "accepted", "ended"),
    ]
    for caller in callers:
        cid = caller.conversation_id
        assert client.hget(keys.call(cid).call, "state") == "ended"
        assert history(client, keys, cid) == expected, cid
        sent = list(channel.deliveries(cid).values())
        handoffs = [a["value"]["TargetPhoneNumber"] for a in sent if a.get("name") == "handoff.initiate"]
        assert handoffs == [FIRST, SECOND], cid
        assert sum("could not take your call" in a.get("text", "") for a in sent) == 1, cid
    repeats = channel.repeats()
    print(
        f"\n{backend}: {calls} calls, {len(channel.activities)} activities received, {repeats} repeats, "
        f"{lb.cut_off} requests cut off by the kill"
    )
    # Delivery is at least once: a reply sent by the killed instance just before it died
    # (or sent slower than the grace period) comes again, with the same replyKey, which
    # ``deliveries`` counts once. The raw repeats are reported, not bounded.
    client.close()


@pytest.mark.parametrize("timers", [300, pytest.param(1000, marks=pytest.mark.heavy)])
async def test_watchdogs_fire_once_each_across_instances_with_one_killed(
    timers: int, env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    env = {**env, "CALLFLOW_FILE": flow_file(tmp_path, timeout_seconds=1, max_attempts=1)}
    bots = await start_bots(env, tmp_path)
    lb = LoadBalancer(session, bots)
    callers = [Caller(channel.url) for _ in range(timers)]
    gate = asyncio.Semaphore(32)

    async def transfer(caller: Caller) -> None:
        async with gate:
            assert await lb.post(caller.say("agent")) == 201

    try:
        await asyncio.gather(*(transfer(c) for c in callers[: timers // 2]))
        await asyncio.sleep(0.5)  # the first watchdogs come due and are being claimed ...
        bots[1].kill()  # ... when an instance dies, holding some of them
        await asyncio.gather(*(transfer(c) for c in callers[timers // 2 :]))

        def finals(caller: Caller) -> int:
            return sum(
                "no agent is available" in a.get("text", "")
                for a in channel.deliveries(caller.conversation_id).values()
            )

        async with asyncio.timeout(60):
            while not all(finals(c) for c in callers):  # noqa: ASYNC110 - waiting on other processes
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # longer than a lease: anything that would fire twice has
    finally:
        for bot in bots:
            bot.stop()

    client = redis.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    missed = fired_twice = 0
    for caller in callers:
        cid = caller.conversation_id
        timeouts = [h for h in history(client, keys, cid) if h[1:] == ("transferring", "failed")]
        missed += not timeouts
        fired_twice += len(timeouts) > 1
        assert client.hget(keys.call(cid).call, "failure") == "timeout"
        assert finals(caller) == 1
    assert (missed, fired_twice) == (0, 0)
    assert sum(client.zcard(keys.due(shard)) for shard in range(SHARDS)) == 0  # nothing left due
    print(
        f"\n{timers} watchdogs: missed {missed}, fired twice {fired_twice}, "
        f"{channel.repeats()} repeated prompts, {lb.cut_off} requests cut off by the kill"
    )
    client.close()


@pytest.mark.parametrize(
    "calls", [90, pytest.param(900, marks=[pytest.mark.heavy, pytest.mark.timeout(600)])]
)
async def test_no_input_and_inter_digit_timers_fire_once_each_across_instances(
    calls: int, env: dict[str, str], tmp_path: Path, channel: ChannelStandIn, session: aiohttp.ClientSession
) -> None:
    """Callers going quiet on the default flow (tests/silent_callers.py), their activities
    round-robin over three instances: every no-input, inter-digit and hang-up timer fires
    once, on whichever instance claims it, and each of its prompts reaches the channel once."""
    env = {**env, **timers_settings(tmp_path)}
    bots = await start_bots(env, tmp_path)
    lb = LoadBalancer(session, bots)
    callers = {Caller(channel.url): kind_of(i) for i in range(calls)}
    gate = asyncio.Semaphore(16)  # callers typing at once: each key well within its 1 s

    async def call(caller: Caller, kind: str) -> None:
        async with gate:
            for activity in script(caller, kind):
                assert await lb.post(activity) == 201

    def ended(caller: Caller) -> bool:
        return any(said(a) == END for a in channel.for_conversation(caller.conversation_id))

    try:
        await asyncio.gather(*(call(c, kind) for c, kind in callers.items()))
        async with asyncio.timeout(60):
            while not all(map(ended, callers)):  # noqa: ASYNC110 - waiting on other processes
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # longer than a lease: anything that would fire twice has
        fired = [int(await bot.metric("cc_timers_fired_total", TOKEN)) for bot in bots]
    finally:
        for bot in bots:
            bot.stop()

    client = redis.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    wrong: dict[str, Any] = {}
    committed_by_timers = 0
    for caller, kind in callers.items():
        cid, expected = caller.conversation_id, KINDS[kind]
        replies = [said(a) for a in channel.deliveries(cid).values()]
        steps = history(client, keys, cid)
        # A turn no activity started (a timer's) is committed under a key of its own: "~...".
        by_timer = sum(str(key).startswith("~") for key in client.hkeys(keys.call(cid).seen))
        committed_by_timers += by_timer
        state = client.hget(keys.call(cid).call, "state")
        if (replies, steps, by_timer, state) != (expected.said, expected.steps, expected.timers, "ended"):
            wrong[cid] = (kind, replies, steps, by_timer, state)
    due = sum(client.zcard(keys.due(shard)) for shard in range(SHARDS))
    kept = sum(client.hlen(keys.call(c.conversation_id).outbox) for c in callers)
    client.close()
    expected_fired = sum(KINDS[kind].timers for kind in callers.values())
    received = len(channel.activities)
    lost = sum(len(KINDS[kind].said) for kind in callers.values()) - (received - channel.repeats())
    print(
        f"\n{calls} quiet calls over 3 instances: {sum(fired)} timers fired (expected {expected_fired}; "
        f"per instance {fired}), {received} replies received, duplicates {channel.repeats()}, lost {lost}"
    )
    assert wrong == {}
    assert (channel.repeats(), lost) == (0, 0)
    assert sum(fired) == committed_by_timers == expected_fired
    assert all(fired), fired  # every instance claimed some: the timers are spread
    assert (due, kept) == (0, 0)  # nothing left to fire or to send
