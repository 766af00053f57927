"""The streaming transport at scale, with real bot processes on the real Redis and
Microsoft's JS ``botframework-streaming`` playing the Telephony channel (tests/jspeer).

- Three instances, sockets to each, 150 calls: every ``handoff.initiate`` comes back on
  its call's socket, every no-answer watchdog fires once on whichever instance claims it,
  and its prompt is routed to the instance holding the call's socket: each reply arrives
  once, on the socket that carries its call.
- SIGKILL of the instance holding the calls mid-transfer: the channel reconnects to
  another instance and the calls carry on from Redis; replies kept while nobody held a
  call (refused by the channel, cut off mid-turn, or a watchdog's prompt fired during the
  gap) arrive on the new socket once the call's next activity does.
- SIGTERM: the turn in flight is answered, then the socket is closed with 1012, the
  channel reconnects elsewhere, and the process exits 0.

What the bot sent is read from the JS peer's ``request`` events; a reply counts as
delivered when the peer answered it 2xx. Repeats are counted per (conversation, replyKey).
The full-size variants (600 calls on 12 sockets; 200 calls on the killed instance) are
marked ``heavy``: ``pytest -m heavy tests/test_streaming_scale.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.keys import SHARDS, Keyspace
from adapters.store import decode_step
from simulator.channel import Caller
from simulator.streaming import SERVICE_URL
from tests.conftest import BOT_ENVIRONMENT, REAL_REDIS_URL, require_real_redis_sync
from tests.jspeer import Event, JsChannel
from tests.process import BotProcess, flow_file
from tests.silent_callers import END, KINDS, kind_of, said, script, timers_settings

pytestmark = pytest.mark.real_redis

TOKEN = "operator-token-0123456789"
HEADERS = {"channelid": "telephony"}
FIRST, SECOND = "+14251231234", "+14255550100"

Step = tuple[str, str, str]  # trigger, from, to
SECOND_ATTEMPT: list[Step] = [
    ("request_agent", "bot", "transferring"),
    ("fail", "transferring", "failed"),
    ("request_agent", "failed", "transferring"),
    # The Telephony channel drops the bot when a transfer connects: accepted, then ended.
    ("accept", "transferring", "accepted"),
    ("hang_up", "accepted", "ended"),
]


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def env(
    key_prefix: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """Bot settings on the real Redis (or, parametrized "cluster", the test cluster) under
    this test's own prefix; keys deleted after."""
    require_real_redis_sync()
    for name in BOT_ENVIRONMENT:  # a developer's settings must not leak into the bots
        monkeypatch.delenv(name, raising=False)
    cluster = getattr(request, "param", "real") == "cluster"
    url = request.getfixturevalue("redis_cluster").url if cluster else REAL_REDIS_URL
    yield {
        "REDIS_URL": url,
        **({"REDIS_CLUSTER": "1"} if cluster else {}),
        "REDIS_KEY_PREFIX": key_prefix,
        "SCHEDULER_POLL_SECONDS": "0.1",
        "SCHEDULER_LEASE_SECONDS": "2",
        "OUTBOX_GRACE_SECONDS": "5",
        "OPERATOR_TOKEN": TOKEN,
        "LOG_LEVEL": "INFO",  # the logs are the evidence when a test fails
    }
    client = (redis.RedisCluster if cluster else redis.Redis).from_url(url)
    for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
async def store(env: dict[str, str]) -> AsyncIterator[Redis]:
    url = env["REDIS_URL"]
    if env.get("REDIS_CLUSTER"):
        client: Redis = RedisCluster.from_url(url, decode_responses=True)  # type: ignore[assignment]
    else:
        client = Redis.from_url(url, decode_responses=True)
    yield client
    await client.aclose()


async def start_bots(env: dict[str, str], tmp_path: Path, names: list[str]) -> list[BotProcess]:
    bots = [BotProcess(env, tmp_path, name) for name in names]
    try:
        await asyncio.gather(*(bot.start() for bot in bots))
    except BaseException:
        for bot in bots:
            bot.stop()
        raise
    return bots


def ws_url(bot: BotProcess) -> str:
    return bot.url.replace("http://", "ws://", 1) + "/api/messages"


def logs(bots: list[BotProcess], lines: int = 40, problems: int = 15) -> str:
    """Each bot's first warnings and errors, and the end of its log."""
    parts = []
    for bot in bots:
        text = bot.log().splitlines()
        bad = [line for line in text if " WARNING " in line or " ERROR " in line][:problems]
        parts.append(f"--- {bot.log_path.name}: first {problems} warnings and errors\n" + "\n".join(bad))
        parts.append(f"--- {bot.log_path.name}: last {lines} lines\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


async def connect(channel: JsChannel, socket: str, bot: BotProcess) -> None:
    opened = await channel.connect(socket, ws_url(bot), HEADERS)
    assert opened["event"] == "connected", opened


async def send(channel: JsChannel, socket: str, activity: dict[str, Any], bots: list[BotProcess]) -> None:
    """One activity on ``socket``: taken (200, no body), or the test fails with the logs."""
    answer = await channel.send(socket, activity, timeout=20)
    assert answer["event"] == "response" and answer["status"] == 200, (answer, logs(bots))


def conversation(request: Event) -> str:
    """The conversation of a bot request: ``/v3/conversations/{quoted id}/activities[/{id}]``."""
    return unquote(str(request["path"]).split("?", 1)[0].split("/")[3])


def reply_key(request: Event) -> tuple[int, int]:
    version, index = str(request["body"]["channelData"]["replyKey"]).split(".")
    return int(version), int(index)


def kind(request: Event) -> str:
    body = request["body"]
    if body.get("name") == "handoff.initiate":
        return f"handoff {body['value']['TargetPhoneNumber']}"
    text = str(body.get("text") or "")
    for prefix, name in (
        ("Thank you for calling", "welcome"),
        ("Hello and thank you for calling billing", "billing"),
        ("Sorry, the agent could not take your call", "retry"),
        ("Sorry, no agent is available", "final"),
        ("What I heard was", "echo"),
        ("You are back with the automated assistant", "handback"),
    ):
        if text.startswith(prefix):
            return name
    return f"other: {text[:40]!r}"


def delivered(channel: JsChannel) -> list[Event]:
    """The bot's requests the channel answered 2xx, in arrival order."""
    ok = {
        (e.get("socket"), e.get("id"))
        for e in channel.events
        if e["event"] == "log" and e.get("what") == "answered" and 200 <= int(e.get("status", 0)) < 300
    }
    return [r for r in channel.requests() if (r.get("socket"), r.get("id")) in ok]


def by_call(requests: list[Event]) -> dict[str, list[Event]]:
    found: dict[str, list[Event]] = {}
    for request in requests:
        found.setdefault(conversation(request), []).append(request)
    return found


def once_each(requests: list[Event]) -> list[Event]:
    """One request per replyKey (the first), in the order the bot produced them."""
    first: dict[tuple[int, int], Event] = {}
    for request in requests:
        first.setdefault(reply_key(request), request)
    return [first[key] for key in sorted(first)]


def repeats(requests: list[Event]) -> int:
    """Deliveries beyond the first of the same (conversation, replyKey)."""
    keys = Counter((conversation(r), reply_key(r)) for r in requests)
    return sum(n - 1 for n in keys.values())


def mixed_keys(requests: list[Event]) -> list[str]:
    """(conversation, replyKey) pairs delivered with different content: a repeat must be
    the same reply, not another one under the same key."""
    seen: dict[tuple[str, tuple[int, int]], str] = {}
    bad = []
    for request in requests:
        key = (conversation(request), reply_key(request))
        if seen.setdefault(key, kind(request)) != kind(request):
            bad.append(f"{key}: {seen[key]} and {kind(request)}")
    return bad


async def until(
    ready: Callable[[], Awaitable[bool]], within: float, what: str, bots: list[BotProcess]
) -> None:
    """Poll ``ready`` until it holds; a bounded wait that fails with the bots' logs."""
    try:
        async with asyncio.timeout(within):
            while not await ready():  # noqa: ASYNC110 - other processes make it true
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}\n{logs(bots)}") from None


async def history(client: Redis, keys: Keyspace, cid: str) -> list[Step]:
    """The call's state machine transitions (its moves through the call flow left out: these
    tests follow the machine across instances)."""
    entries = [decode_step(str(raw)) for raw in await client.lrange(keys.call(cid).history, 0, -1)]
    return [(e["trigger"], e["from"], e["to"]) for e in entries if e["trigger"] != "move"]


async def state(client: Redis, keys: Keyspace, cid: str) -> str:
    return str(await client.hget(keys.call(cid).call, "state"))


async def nothing_due(client: Redis, keys: Keyspace, cids: list[str]) -> bool:
    """No due work (watchdogs, re-deliveries) and no kept reply left anywhere: nothing
    more can be sent to any of these calls."""
    due = sum([await client.zcard(keys.due(shard)) for shard in range(SHARDS)])
    if due:
        return False
    async with client.pipeline(transaction=False) as pipe:
        for cid in cids:
            pipe.hlen(keys.call(cid).outbox)
        return not any(await pipe.execute())


async def sends(session: aiohttp.ClientSession, bot: BotProcess) -> dict[str, Counter[str]]:
    """The instance's ``cc_streaming_sends`` (by route) and ``cc_streaming_send_failures``
    (by reason), from its ``/metrics``."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(f"{bot.url}/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    found: dict[str, Counter[str]] = {"sends": Counter(), "failures": Counter()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cc_streaming_sends_total":
                found["sends"][sample.labels["route"]] += int(sample.value)
            elif sample.name == "cc_streaming_send_failures_total":
                found["failures"][sample.labels["reason"]] += int(sample.value)
    return found


# --- 1. three instances, 150 calls, watchdog prompts routed to the socket's holder ------


@pytest.mark.parametrize("env", ["real", "cluster"], indirect=True)
@pytest.mark.parametrize(
    ("calls", "per_bot"),
    [(150, 2), pytest.param(600, 4, marks=[pytest.mark.heavy, pytest.mark.timeout(600)])],
)
async def test_every_reply_reaches_its_calls_socket_whichever_instance_sends_it(
    calls: int, per_bot: int, env: dict[str, str], store: Redis, tmp_path: Path
) -> None:
    began = time.monotonic()
    env = {**env, "CALLFLOW_FILE": flow_file(tmp_path, timeout_seconds=2)}
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    bots = await start_bots(env, tmp_path, ["bot0", "bot1", "bot2"])
    metrics: dict[str, dict[str, Counter[str]]] = {}
    try:
        async with JsChannel() as channel, aiohttp.ClientSession() as session:
            sockets = [(f"s{b}.{k}", bot) for b, bot in enumerate(bots) for k in range(per_bot)]
            await asyncio.gather(*(connect(channel, name, bot) for name, bot in sockets))
            callers = [Caller(SERVICE_URL, f"scale:{i}") for i in range(calls)]
            carrier = {c.conversation_id: sockets[i % len(sockets)][0] for i, c in enumerate(callers)}
            gate = asyncio.Semaphore(24)

            async def place(caller: Caller) -> None:
                socket = carrier[caller.conversation_id]
                async with gate:
                    await send(channel, socket, caller.start(), bots)
                    await send(channel, socket, caller.press("0")[0], bots)

            await asyncio.gather(*(place(c) for c in callers))

            async def prompted() -> bool:
                return {conversation(r) for r in delivered(channel) if kind(r) == "retry"} >= set(carrier)

            await until(prompted, 60, f"{calls} retry prompts", bots)
            cids = list(carrier)
            await until(lambda: nothing_due(store, keys, cids), 30, "nothing left due or kept", bots)
            for bot in bots:
                metrics[bot.log_path.stem] = await sends(session, bot)
            requests = channel.requests()
            received = delivered(channel)
    finally:
        for bot in bots:
            bot.stop()

    # Every request the bot made was answered 200 (nothing refused, nothing unanswered).
    assert len(received) == len(requests), logs(bots)
    wrong_socket = [
        (conversation(r), kind(r), r["socket"]) for r in received if r["socket"] != carrier[conversation(r)]
    ]
    assert wrong_socket == [], logs(bots)
    calls_seen = by_call(received)
    expected = ["welcome", f"handoff {FIRST}", "retry"]
    wrong: dict[str, list[str]] = {}
    lost = 0
    for cid in carrier:
        kinds = [kind(r) for r in once_each(calls_seen.get(cid, []))]
        lost += sum(k not in kinds for k in expected)
        if kinds != expected:
            wrong[cid] = kinds
    duplicates = repeats(received)
    fired = [await history(store, keys, cid) for cid in carrier]
    failures_recorded = [await store.hget(keys.call(cid).call, "failure") for cid in carrier]
    routed = sum(m["sends"]["routed"] for m in metrics.values())
    served = sum(m["sends"]["served"] for m in metrics.values())
    local = sum(m["sends"]["local"] for m in metrics.values())
    failures = sum((m["failures"] for m in metrics.values()), Counter[str]())
    per_instance = {name: dict(m["sends"]) for name, m in metrics.items()}
    print(
        f"\n{calls} calls on {len(set(carrier.values()))} sockets to 3 instances: "
        f"{len(received)} replies delivered, lost {lost}, duplicates {duplicates}; sends: "
        f"local {local}, routed {routed}, served {served}, failures {dict(failures)}; "
        f"per instance {per_instance}; "
        f"{time.monotonic() - began:.1f} s"
    )
    assert (lost, duplicates, wrong) == (0, 0, {}), logs(bots)
    # Every watchdog fired once: one step into failed per call, the watchdog's (timeout).
    assert fired == [[("request_agent", "bot", "transferring"), ("fail", "transferring", "failed")]] * calls
    assert failures_recorded == ["timeout"] * calls
    assert routed > 0, metrics
    assert served == routed, metrics  # every routed send was written by the holder


# --- 2. SIGKILL of the instance holding the calls ---------------------------------------


@pytest.mark.parametrize(
    "per_group", [10, pytest.param(50, marks=[pytest.mark.heavy, pytest.mark.timeout(600)])]
)
async def test_calls_on_a_killed_instance_carry_on_over_a_new_socket_elsewhere(
    per_group: int, env: dict[str, str], store: Redis, tmp_path: Path
) -> None:
    """Four kinds of call on instance A's sockets when A is SIGKILLed, all mid-transfer:

    - ``gap``: its watchdog fires while no instance holds the call; the prompt is kept
      until the call's next activity (pressing 0 again) reaches the new socket;
    - ``after``: its next activity reaches the new socket first, then its watchdog fires;
    - ``refused``: the channel answered its ``handoff.initiate`` 503, so it is kept;
      the next activity is the agent side's failed ``handoff.status``;
    - ``cut``: A died waiting for the channel's answer to its ``handoff.initiate``; the
      channel's request was cut off, so it delivers the same activity again to B.
    """
    began = time.monotonic()
    env = {**env, "CALLFLOW_FILE": flow_file(tmp_path, timeout_seconds=5, targets=[FIRST, SECOND])}
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    bots = await start_bots(env, tmp_path, ["a", "b", "c"])
    a, b, _ = bots
    groups = {
        g: [Caller(SERVICE_URL, f"{g}:{i}") for i in range(per_group)]
        for g in ("gap", "after", "refused", "cut")
    }
    home = {"gap": "a", "after": "a", "refused": "a-refusing", "cut": "a-silent"}
    everyone = [c for callers in groups.values() for c in callers]
    metrics: dict[str, dict[str, Counter[str]]] = {}
    try:
        async with JsChannel() as channel, aiohttp.ClientSession() as session:

            def got(
                callers: list[Caller], what: str, socket: str | None = None
            ) -> Callable[[], Awaitable[bool]]:
                wanted = {c.conversation_id for c in callers}

                async def ready() -> bool:
                    have = {
                        conversation(r)
                        for r in delivered(channel)
                        if kind(r) == what and socket in (None, r["socket"])
                    }
                    return wanted <= have

                return ready

            async def each(
                callers: list[Caller], socket: str, make: Callable[[Caller], dict[str, Any]]
            ) -> None:
                await asyncio.gather(*(send(channel, socket, make(c), bots) for c in callers))

            for socket in set(home.values()):
                await connect(channel, socket, a)
            for group, callers in groups.items():
                await each(callers, home[group], Caller.start)
            await until(got(everyone, "welcome"), 20, "every welcome", bots)

            # Transfers under way on A, their watchdogs pending.
            await each(groups["gap"] + groups["after"], "a", lambda c: c.press("0")[0])
            await until(got(groups["gap"] + groups["after"], f"handoff {FIRST}", "a"), 20, "handoffs", bots)
            # The channel refuses the next transfers: kept in the outbox.
            await channel.answer("a-refusing", status=503)
            await each(groups["refused"], "a-refusing", lambda c: c.press("0")[0])
            # The channel says nothing to the last ones: A is waiting for its answer ...
            await channel.answer("a-silent", silent=True)
            silent_mark = len(channel.requests("a-silent"))
            cut_presses = [c.press("0")[0] for c in groups["cut"]]
            cut_off = [asyncio.create_task(channel.send("a-silent", p, timeout=30)) for p in cut_presses]
            waiting = (await channel.wait_requests(silent_mark + per_group, "a-silent", within=20))[
                silent_mark:
            ]
            assert {(conversation(r), kind(r)) for r in waiting} == {
                (c.conversation_id, f"handoff {FIRST}") for c in groups["cut"]
            }
            assert not any(t.done() for t in cut_off), logs(bots)

            a.kill()  # ... when it dies
            assert a.proc is not None and a.proc.returncode == -9
            for socket in set(home.values()):
                await channel.wait_disconnected(socket)
            answers = await asyncio.gather(*cut_off)
            assert all(e["event"] == "send_failed" for e in answers), answers

            # The channel reconnects to B, and each call's next activity goes there.
            await connect(channel, "b", b)
            await each(groups["after"], "b", lambda c: c.say("are you still there?"))
            await asyncio.gather(*(send(channel, "b", p, bots) for p in cut_presses))  # the same ids again
            await each(groups["refused"], "b", lambda c: c.status({"state": "failed", "message": "busy"}))

            await until(
                got(groups["refused"] + groups["cut"], f"handoff {FIRST}", "b"), 30, "kept handoffs", bots
            )
            await until(
                got(groups["after"] + groups["cut"] + groups["refused"], "retry", "b"), 30, "prompts", bots
            )

            # The gap calls' watchdogs fire while nobody holds them: nothing can reach them.
            async def gap_fired() -> bool:
                states = [await state(store, keys, c.conversation_id) for c in groups["gap"]]
                return all(s == "failed" for s in states)

            await until(gap_fired, 30, "the gap calls' watchdogs", bots)
            gap_ids = {c.conversation_id for c in groups["gap"]}
            early = [
                conversation(r)
                for r in delivered(channel)
                if kind(r) == "retry" and conversation(r) in gap_ids
            ]
            assert early == [], early
            await each(groups["gap"], "b", lambda c: c.press("0")[0])
            await until(
                got(groups["gap"], "retry", "b"), 30, "the prompts kept while nobody held the calls", bots
            )

            # Every call is where it was: one attempt used, so pressing 0 dials the second target.
            await each(groups["after"] + groups["refused"] + groups["cut"], "b", lambda c: c.press("0")[0])
            await until(got(everyone, f"handoff {SECOND}", "b"), 30, "second handoffs", bots)
            await each(everyone, "b", Caller.hang_up)
            cids = [c.conversation_id for c in everyone]
            await until(lambda: nothing_due(store, keys, cids), 30, "nothing left due or kept", bots)
            for bot in bots[1:]:
                metrics[bot.log_path.stem] = await sends(session, bot)
            received = delivered(channel)
            requests = channel.requests()
    finally:
        for bot in bots:
            bot.stop()

    assert mixed_keys(received) == [], mixed_keys(received)
    calls_seen = by_call(received)
    expected = ["welcome", f"handoff {FIRST}", "retry", f"handoff {SECOND}"]
    lost = 0
    wrong: dict[str, Any] = {}
    for group, callers in groups.items():
        for caller in callers:
            cid = caller.conversation_id
            replies = once_each(calls_seen.get(cid, []))
            kinds = [kind(r) for r in replies]
            lost += sum(k not in kinds for k in expected)
            where = {kind(r): r["socket"] for r in replies}
            # The prompts after the kill, and the replies kept when A died, on the new socket.
            moved = ["retry", f"handoff {SECOND}"]
            if group in ("refused", "cut"):
                moved.append(f"handoff {FIRST}")
            steps = await history(store, keys, cid)
            if kinds != expected or any(where.get(k) != "b" for k in moved) or steps != SECOND_ATTEMPT:
                wrong[cid] = (kinds, where, steps)
    duplicates = repeats(received)
    unanswered = len(requests) - len(received)  # refused (503), unanswered (silent), or cut off
    routed = sum(m["sends"]["routed"] for m in metrics.values())
    per_instance = {name: (dict(m["sends"]), dict(m["failures"])) for name, m in metrics.items()}
    print(
        f"\nSIGKILL: {len(everyone)} calls on 3 sockets to the killed instance, 1 kill, 1 new socket; "
        f"lost {lost}, duplicates (same replyKey) {duplicates}, requests not answered 2xx {unanswered}; "
        f"after the kill: routed sends {routed}, per instance "
        f"{per_instance}; "
        f"{time.monotonic() - began:.1f} s"
    )
    assert (lost, wrong) == (0, {}), logs(bots)


# --- 3. SIGTERM: in-flight turns answered, sockets closed with 1012, exit 0 -------------


async def test_sigterm_answers_turns_in_flight_then_closes_the_socket_for_the_channel_to_move(
    env: dict[str, str], store: Redis, tmp_path: Path
) -> None:
    """The channel is slow to answer (1.5 s) when SIGTERM arrives: the turns in flight
    send their ``handoff.initiate``, the channel answers it, the turns are answered 200 and
    leave nothing kept (delivered and acknowledged); then the socket closes with 1012
    (service restart), the channel reconnects to B and the calls carry on; A exits 0."""
    began = time.monotonic()
    # A long watchdog: the pending calls' watchdogs must fire after the channel has moved.
    env = {**env, "CALLFLOW_FILE": flow_file(tmp_path, timeout_seconds=10, targets=[FIRST, SECOND])}
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    bots = await start_bots(env, tmp_path, ["a", "b"])
    a, b = bots
    in_flight = [Caller(SERVICE_URL, f"in-flight:{i}") for i in range(3)]
    pending = [Caller(SERVICE_URL, f"pending:{i}") for i in range(3)]  # watchdogs pending
    everyone = in_flight + pending
    try:
        async with JsChannel() as channel:
            await connect(channel, "a", a)
            for caller in everyone:
                await send(channel, "a", caller.start(), bots)
            for caller in pending:
                await send(channel, "a", caller.press("0")[0], bots)
            await channel.wait_requests(len(everyone) + len(pending), "a")
            # The channel is slow to answer: the turns' replies are still being sent ...
            await channel.answer("a", delay_ms=1500)
            mark = len(channel.requests("a"))
            turns = [asyncio.create_task(channel.send("a", c.press("0")[0], timeout=30)) for c in in_flight]
            await channel.wait_requests(mark + len(in_flight), "a")
            assert a.proc is not None
            a.proc.terminate()  # ... when SIGTERM arrives
            exited = asyncio.create_task(asyncio.to_thread(a.proc.wait, 30))
            answers = await asyncio.gather(*turns)
            assert [e.get("status") for e in answers] == [200] * len(in_flight), (answers, logs(bots))
            closed = await channel.wait_disconnected("a", within=30)
            assert closed["code"] == 1012, (closed, logs(bots))
            # All answered before the close: the turns, and the channel's answers to their replies.
            order = {id(e): i for i, e in enumerate(channel.events)}
            assert all(order[id(e)] < order[id(closed)] for e in answers)
            handoffs = [r for r in channel.requests("a")[mark:] if kind(r) == f"handoff {FIRST}"]
            assert {conversation(r) for r in handoffs} == {c.conversation_id for c in in_flight}
            assert len(delivered(channel)) == len(channel.requests("a")), logs(bots)
            # So nothing of theirs may be left kept, to be sent again.
            kept_after_close = {
                c.conversation_id: kept
                for c in in_flight
                if (kept := await store.hkeys(keys.call(c.conversation_id).outbox))
            }

            # The channel moves to B; the calls carry on from where they were.
            await connect(channel, "b", b)
            for caller in pending:
                await send(channel, "b", caller.say("are you still there?"), bots)
            for caller in in_flight:
                await send(channel, "b", caller.status({"state": "failed", "message": "busy"}), bots)

            async def carried_on() -> bool:
                got = {(conversation(r), kind(r), r["socket"]) for r in delivered(channel)}
                return all((c.conversation_id, "retry", "b") in got for c in everyone)

            await until(carried_on, 30, "the calls carrying on over B", bots)
            for caller in everyone:
                await send(channel, "b", caller.hang_up(), bots)
            cids = [c.conversation_id for c in everyone]
            await until(lambda: nothing_due(store, keys, cids), 30, "nothing left due or kept", bots)
            code = await exited
            received = delivered(channel)
    finally:
        for bot in bots:
            bot.stop()

    assert code == 0, logs([a])
    assert mixed_keys(received) == []
    calls_seen = by_call(received)
    for caller in everyone:
        replies = once_each(calls_seen[caller.conversation_id])
        assert [kind(r) for r in replies] == ["welcome", f"handoff {FIRST}", "retry"], caller.conversation_id
        assert [r["socket"] for r in replies] == ["a", "a", "b"], caller.conversation_id
        assert await history(store, keys, caller.conversation_id) == [
            ("request_agent", "bot", "transferring"),
            ("fail", "transferring", "failed"),
            ("hang_up", "failed", "ended"),
        ]
    duplicates = repeats(received)
    print(
        f"\nSIGTERM: {len(in_flight)} turns in flight answered 200, socket closed with {closed['code']}, "
        f"exit code {code}; {len(everyone)} calls carried on over B; kept after the close "
        f"{len(kept_after_close)}, duplicates {duplicates}; {time.monotonic() - began:.1f} s"
    )
    # A graceful shutdown: the replies the channel answered were acknowledged, none sent again.
    not_delivered = [line for line in a.log().splitlines() if "replies not delivered" in line]
    assert (kept_after_close, duplicates) == ({}, 0), (
        "turns answered 200, whose replies the channel answered 200 before the close, left them "
        "kept (sent again on B): A did not read the channel's answers after SIGTERM",
        not_delivered,
    )


# --- 4. quiet callers: each timer's prompts reach the call's socket once ----------------


@pytest.mark.parametrize(
    "calls", [90, pytest.param(900, marks=[pytest.mark.heavy, pytest.mark.timeout(600)])]
)
async def test_no_input_and_inter_digit_prompts_reach_the_calls_socket_once_each(
    calls: int, env: dict[str, str], store: Redis, tmp_path: Path
) -> None:
    """Callers going quiet on the default flow (tests/silent_callers.py) on sockets to three
    instances: every no-input, inter-digit and hang-up timer fires once, on whichever
    instance claims it, and its prompts arrive once, on the socket that carries the call."""
    env = {**env, **timers_settings(tmp_path)}
    keys = Keyspace(env["REDIS_KEY_PREFIX"])
    bots = await start_bots(env, tmp_path, ["bot0", "bot1", "bot2"])
    try:
        async with JsChannel() as channel:
            sockets = [(f"s{b}.{k}", bot) for b, bot in enumerate(bots) for k in range(2)]
            await asyncio.gather(*(connect(channel, name, bot) for name, bot in sockets))
            callers = {Caller(SERVICE_URL, f"quiet:{i}"): kind_of(i) for i in range(calls)}
            carrier = {c.conversation_id: sockets[i % len(sockets)][0] for i, c in enumerate(callers)}
            gate = asyncio.Semaphore(16)  # callers typing at once: each key well within its 1 s

            async def call(caller: Caller, kind: str) -> None:
                async with gate:
                    for activity in script(caller, kind):
                        await send(channel, carrier[caller.conversation_id], activity, bots)

            await asyncio.gather(*(call(c, kind) for c, kind in callers.items()))

            async def all_ended() -> bool:
                return {conversation(r) for r in delivered(channel) if said(r["body"]) == END} >= set(carrier)

            await until(all_ended, 60, f"{calls} hang-ups", bots)
            await asyncio.sleep(2.5)  # longer than a lease: anything that would fire twice has
            fired = [int(await bot.metric("cc_timers_fired_total", TOKEN)) for bot in bots]
            received = delivered(channel)
            requests = channel.requests()
    finally:
        for bot in bots:
            bot.stop()

    calls_seen = by_call(received)
    wrong: dict[str, Any] = {}
    committed_by_timers = 0
    for caller, kind in callers.items():
        cid, expected = caller.conversation_id, KINDS[kind]
        replies = once_each(calls_seen.get(cid, []))
        sockets_used = {r["socket"] for r in replies}
        # A turn no activity started (a timer's) is committed under a key of its own: "~...".
        by_timer = sum(str(key).startswith("~") for key in await store.hkeys(keys.call(cid).seen))
        committed_by_timers += by_timer
        steps = await history(store, keys, cid)
        machine = [step for step in expected.steps if step[0] != "move"]  # as history() reads them
        if ([said(r["body"]) for r in replies], sockets_used, by_timer, steps) != (
            expected.said,
            {carrier[cid]},
            expected.timers,
            machine,
        ):
            wrong[cid] = (kind, [said(r["body"]) for r in replies], sockets_used, by_timer, steps)
    duplicates = repeats(received)
    expected_fired = sum(KINDS[kind].timers for kind in callers.values())
    lost = sum(len(KINDS[kind].said) for kind in callers.values()) - (len(received) - duplicates)
    print(
        f"\n{calls} quiet calls on 6 sockets to 3 instances: {sum(fired)} timers fired (expected "
        f"{expected_fired}; per instance {fired}), {len(received)} replies delivered, "
        f"duplicates {duplicates}, lost {lost}"
    )
    assert len(received) == len(requests), logs(bots)  # every request the bot made was answered 2xx
    assert wrong == {}, logs(bots)
    assert (duplicates, lost) == (0, 0)
    assert sum(fired) == committed_by_timers == expected_fired
    assert all(fired), fired  # every instance claimed some: the timers are spread
    assert await nothing_due(store, keys, list(carrier))
