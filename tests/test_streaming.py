"""Calls over the Telephony channel's streaming socket, with Microsoft's JS
``botframework-streaming`` playing the channel (an implementation we did not write), on the
embedded fake, a real Redis and a Redis Cluster; and what the socket does with bad input."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from adapters.connections import Connections
from adapters.framing import Header, PayloadType, new_id
from adapters.http import BOT_KEY, DRAINING_KEY, METRICS_KEY, STORE_KEY
from adapters.socket_api import CONNECTIONS_KEY
from app import create_app, drain
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from simulator.streaming import SERVICE_URL, SocketBots
from tests.jspeer import Event, JsChannel
from tests.process import ROOT

DEFAULT_FLOW = ROOT / "orchestrator" / "flows" / "transfer-sample.yaml"
WATCHDOG_SECONDS = 1


@pytest.fixture
async def bot(bot_redis: dict[str, Any], tmp_path: Path, key_prefix: str) -> AsyncIterator[TestServer]:
    """The bot in this process on a loopback port, with a 1 s no-answer watchdog."""
    flow = yaml.safe_load(DEFAULT_FLOW.read_text())
    flow["queues"]["agents"]["timeout_seconds"] = WATCHDOG_SECONDS
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    settings = load_settings(
        **bot_redis,
        REDIS_KEY_PREFIX=key_prefix,
        CALLFLOW_FILE=tmp_path / "flow.yaml",
        OUTBOX_GRACE_SECONDS=1,
        SCHEDULER_POLL_SECONDS=0.05,
    )
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def js() -> AsyncIterator[JsChannel]:
    async with JsChannel() as channel:
        yield channel


def ws_url(server: TestServer) -> str:
    return str(server.make_url("/api/messages")).replace("http", "ws", 1)


async def connected(js: JsChannel, server: TestServer, socket: str = "s1") -> str:
    event = await js.connect(socket, ws_url(server), {"channelid": "telephony"})
    assert event["event"] == "connected", event
    return socket


def conversation_of(request: Event) -> str:
    return unquote(str(request["path"]).split("/")[3])


def sent_to(js: JsChannel, conversation: str, socket: str | None = None) -> list[dict[str, Any]]:
    """What the bot sent the call, as activities, in order."""
    return [r["body"] for r in js.requests(socket) if conversation_of(r) == conversation]


async def eventually(ready: Callable[[], bool], within: float = 10) -> None:
    async with asyncio.timeout(within):
        while not ready():  # noqa: ASYNC110 - the JS channel's events, read by another task
            await asyncio.sleep(0.02)


async def said(js: JsChannel, conversation: str, count: int, within: float = 10) -> list[dict[str, Any]]:
    """Wait until the bot has sent the call ``count`` activities; all of them."""
    await eventually(lambda: len(sent_to(js, conversation)) >= count, within)
    return sent_to(js, conversation)


def handoffs(js: JsChannel, conversation: str) -> list[dict[str, Any]]:
    return [a for a in sent_to(js, conversation) if a.get("name") == "handoff.initiate"]


async def state_of(server: TestServer, conversation: str) -> dict[str, str]:
    return await server.app[STORE_KEY].record(conversation)


async def test_a_whole_call_over_the_js_channel(bot: TestServer, js: JsChannel) -> None:
    """Welcome, billing, a transfer that fails and its retry prompt, a retry nobody answers
    and the watchdog's prompt (sent outside any turn), then the caller hangs up."""
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    cid = caller.conversation_id
    answer = await js.send(socket, caller.start())
    assert answer["status"] == 200 and answer["body"] is None
    [welcome] = await said(js, cid, 1)
    assert welcome["type"] == "message" and "press 0" in welcome["text"]
    assert welcome["speak"].startswith("<speak")
    [request] = js.requests(socket)
    assert request["path"].startswith(
        f"/v3/conversations/{cid}/activities"
    )  # a leading slash, as .NET and JS

    assert (await js.send(socket, caller.press("1")[0]))["status"] == 200
    assert "billing" in (await said(js, cid, 2))[1]["text"]

    assert (await js.send(socket, caller.press("0")[0]))["status"] == 200
    handoff = (await said(js, cid, 3))[2]
    assert handoff["name"] == "handoff.initiate" and handoff["value"] == {
        "TargetPhoneNumber": "+14251231234",
        "Queue": "agents",
    }
    lines = handoff["attachments"][0]["content"]["activities"]
    assert any(line.get("text") == "1" for line in lines)
    assert (await state_of(bot, cid))["state"] == "transferring"

    assert (await js.send(socket, caller.status({"state": "failed", "message": "busy"})))["status"] == 200
    retry = (await said(js, cid, 4))[3]
    assert "try again" in retry["text"].lower()
    assert (await state_of(bot, cid))["state"] == "failed"

    assert (await js.send(socket, caller.press("0")[0]))["status"] == 200
    second = (await said(js, cid, 5))[4]
    assert second["name"] == "handoff.initiate"
    watchdog = (await said(js, cid, 6, within=WATCHDOG_SECONDS + 10))[5]  # nobody answers
    assert watchdog["type"] == "message"
    record = await state_of(bot, cid)
    assert record["state"] == "failed" and record["failure"] == "timeout"

    assert (await js.send(socket, caller.hang_up()))["status"] == 200
    assert (await state_of(bot, cid))["state"] == "ended"
    keys = [a["channelData"]["replyKey"] for a in sent_to(js, cid)]
    assert len(keys) == len(set(keys)) == 6  # each reply once


async def test_a_reply_over_5_kb_arrives_whole(bot: TestServer, js: JsChannel) -> None:
    """botbuilder-python 4.17.1 corrupted every body past its first 4096 bytes."""
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    await js.send(socket, caller.start())
    words = " ".join(f"word{i}" for i in range(1000))  # ~8.9 KB of caller speech
    assert (await js.send(socket, caller.say(words)))["status"] == 200
    echo = (await said(js, caller.conversation_id, 2))[1]
    assert echo["text"] == f'What I heard was "{words}"'
    assert js.requests(socket)[-1]["bytes"] > 2 * 4096


@pytest.mark.parametrize("framing", ["merged", "split"])
async def test_merged_and_split_frames_are_read(bot: TestServer, js: JsChannel, framing: str) -> None:
    """The socket is a byte stream: a message holding several payloads, or a part of one."""
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    for activity in (caller.start(), caller.say("hello there")):
        answer = await js.send(socket, activity, framing=framing)  # type: ignore[arg-type]
        assert answer["status"] == 200, answer
    echo = (await said(js, caller.conversation_id, 2))[1]
    assert echo["text"] == 'What I heard was "hello there"'


def hold_turns_of(bot: TestServer, caller: Caller, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold every turn of ``caller``'s call until the returned event is set."""
    engine = bot.app[BOT_KEY].engine
    release = asyncio.Event()
    handle = engine.handle

    async def held(conversation_id: str, *args: Any, **kwargs: Any) -> Any:
        if conversation_id == caller.conversation_id:
            await release.wait()
        return await handle(conversation_id, *args, **kwargs)

    monkeypatch.setattr(engine, "handle", held)
    return release


async def test_many_calls_share_a_socket_and_a_slow_turn_holds_up_no_other(
    bot: TestServer, js: JsChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = await connected(js, bot)
    slow = Caller(SERVICE_URL)
    release = hold_turns_of(bot, slow, monkeypatch)
    stuck = asyncio.create_task(js.send(socket, slow.start()))
    callers = [Caller(SERVICE_URL) for _ in range(40)]
    answers = await asyncio.gather(*(js.send(socket, c.start()) for c in callers))
    assert [a["status"] for a in answers] == [200] * 40
    for c in callers:
        assert len(await said(js, c.conversation_id, 1)) == 1
    assert not stuck.done()  # still held, and it held up nobody
    release.set()
    assert (await stuck)["status"] == 200
    assert len(await said(js, slow.conversation_id, 1)) == 1
    connections: Connections = bot.app[CONNECTIONS_KEY]
    assert connections.calls == 41 and len(connections.sockets) == 1
    exposed = bot.app[METRICS_KEY].exposition({}).decode()
    assert "cc_streaming_connections 1.0" in exposed and "cc_streaming_calls 41.0" in exposed
    assert 'cc_streaming_sends_total{route="local"} 41.0' in exposed  # each call's welcome


async def test_a_provisional_202_is_awaited_past(bot: TestServer, js: JsChannel) -> None:
    """.NET 4.21.1+ answers 202 at once and the final status later, under the same id: the
    bot reads the final answer (its id), and the turn is answered after it."""
    socket = await connected(js, bot)
    await js.answer(socket, provisional=202, delay_ms=300)
    caller = Caller(SERVICE_URL)
    assert (await js.send(socket, caller.start()))["status"] == 200
    assert (await js.send(socket, caller.press("0")[0]))["status"] == 200
    sent = await said(js, caller.conversation_id, 2)
    assert sent[1]["name"] == "handoff.initiate"
    # Acknowledged once the final answer came: nothing is kept, so nothing is sent twice.
    await asyncio.sleep(1.5)  # past OUTBOX_GRACE_SECONDS
    assert len(handoffs(js, caller.conversation_id)) == 1


async def test_a_send_the_channel_never_answers_fails_after_its_bound_and_stays_kept(
    bot: TestServer, js: JsChannel
) -> None:
    connections: Connections = bot.app[CONNECTIONS_KEY]
    connections.send_seconds = 0.5
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    await js.send(socket, caller.start())
    await js.answer(socket, silent=True)
    answer = await js.send(socket, caller.press("0")[0])
    assert answer["status"] == 200  # the turn committed; its handoff is kept, not lost
    assert connections.failures["timeout"] >= 1
    await js.answer(socket, status=200)
    # Re-sent by the scheduler after OUTBOX_GRACE_SECONDS: the same replyKey.
    await eventually(lambda: len(handoffs(js, caller.conversation_id)) >= 2)
    first, again = handoffs(js, caller.conversation_id)[:2]
    assert first["channelData"]["replyKey"] == again["channelData"]["replyKey"]


async def test_an_ordinary_reply_the_channel_refuses_is_kept_and_said_again_over_the_socket(
    bot: TestServer, js: JsChannel
) -> None:
    """As over HTTP: the turn is taken (200), its echo goes in the outbox, and the scheduler
    says it on the same socket once the channel takes requests again."""
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    await js.send(socket, caller.start())
    await said(js, caller.conversation_id, 1)
    await js.answer(socket, status=503)
    assert (await js.send(socket, caller.say("hello there")))["status"] == 200
    await js.answer(socket, status=200)
    sent = await said(js, caller.conversation_id, 3)  # welcome, the refused echo, the echo again
    refused, again = sent[1], sent[2]
    assert "hello there" in again["text"]
    assert refused["channelData"]["replyKey"] == again["channelData"]["replyKey"]


async def test_bad_requests_on_the_socket_get_clear_answers_and_change_nothing(
    bot: TestServer, js: JsChannel
) -> None:
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    await js.send(socket, caller.start())
    before = await state_of(bot, caller.conversation_id)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"path": "/api/nowhere", "body": caller.say("x")}, 404),
        ({"path": "/api/messages", "verb": "PUT", "body": caller.say("x")}, 405),
        ({"path": "/api/messages", "body": None}, 400),  # no body at all
        ({"path": "/api/messages", "body": [1, 2, 3]}, 400),  # not an activity
        ({"path": "/api/messages", "body": {"type": "message"}}, 400),  # no conversation
        ({"path": "/api/messages", "body": {**caller.say("x"), "channelId": None}}, 400),
    ]
    for case, status in cases:
        answer = await js.send(socket, case.pop("body"), **case)
        assert answer["status"] == status, (case, answer)
        assert isinstance(answer["body"], dict) and answer["body"]["error"], answer
    version = await js.send(socket, None, verb="GET", path="/api/version")
    assert version["status"] == 200 and "userAgent" in version["body"]
    assert await state_of(bot, caller.conversation_id) == before
    assert (await js.send(socket, caller.say("still here")))["status"] == 200  # the socket lives on


async def test_garbage_on_a_socket_closes_it_and_no_other(bot: TestServer, js: JsChannel) -> None:
    good = await connected(js, bot, "good")
    caller = Caller(SERVICE_URL)
    await js.send(good, caller.start())
    before = await state_of(bot, caller.conversation_id)
    garbage: list[list[bytes]] = [
        [b"this is not a header at all, not even close....\n"],
        # a header that lies: it claims 3 bytes, then the real payload follows
        [Header(PayloadType.REQUEST, 3, new_id(), True).encode(), b'{"verb":"POST","path":"/api/messages"}'],
        [Header(PayloadType.REQUEST, 999_999, new_id(), True).encode()],  # over the body limit
    ]
    for number, messages in enumerate(garbage):
        name = f"bad{number}"
        await connected(js, bot, name)
        await js.raw(name, messages)
        closed = await js.wait_disconnected(name)
        assert closed["code"] == 1002, closed  # protocol error
    # A socket cut in the middle of a request: the bot is left waiting for a body that never comes.
    await connected(js, bot, "cut")
    header = Header(PayloadType.REQUEST, 0, new_id(), True)
    payload = json.dumps(
        {"verb": "POST", "path": "/api/messages", "streams": [{"id": new_id(), "length": 10}]}
    )
    await js.raw("cut", [Header(header.type, len(payload), header.id, True).encode(), payload.encode()])
    await js.cut("cut")
    await js.wait_disconnected("cut")
    assert (await js.send(good, caller.say("fine")))["status"] == 200
    after = await state_of(bot, caller.conversation_id)
    assert int(after["version"]) == int(before["version"]) + 1  # only the good socket's turn
    async with TestClient(bot) as http:  # HTTP is served all along
        assert (await http.get("/healthz")).status == 200


async def test_closed_and_cut_sockets_leave_nothing_behind(
    bot: TestServer, js: JsChannel, caplog: pytest.LogCaptureFixture
) -> None:
    connections: Connections = bot.app[CONNECTIONS_KEY]
    for name, end in (("clean", js.close), ("cut", js.cut)):
        socket = await connected(js, bot, name)
        caller = Caller(SERVICE_URL)
        await js.send(socket, caller.start())
        await js.answer(socket, silent=True)  # a send of the bot's is waiting when the socket goes
        pending = asyncio.create_task(js.send(socket, caller.press("0")[0]))
        await js.wait_requests(len(js.requests()) + 1)
        await end(socket)
        await js.wait_disconnected(socket)
        await pending
    await eventually(lambda: not connections.sockets)
    assert connections.calls == 0
    await asyncio.sleep(0.2)
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not never_retrieved
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "asyncio"]


async def test_an_activity_is_read_whatever_content_type_its_stream_names(
    bot: TestServer, js: JsChannel
) -> None:
    """.NET's CloudAdapter describes a JSON body as text/plain; no SDK reads the type."""
    socket = await connected(js, bot)
    caller = Caller(SERVICE_URL)
    body = json.dumps(caller.start()).encode()
    stream = new_id()
    head = json.dumps(
        {
            "verb": "POST",
            "path": "/api/messages",
            "streams": [{"id": stream, "type": "text/plain; charset=utf-8", "length": len(body)}],
        }
    ).encode()
    request = new_id()
    await js.raw(
        socket,
        [
            Header(PayloadType.REQUEST, len(head), request, True).encode(),
            head,
            Header(PayloadType.STREAM, len(body), stream, True).encode(),
            body,
        ],
    )
    [welcome] = await js.wait_requests(1, socket)
    assert welcome["body"]["conversation"]["id"] == caller.conversation_id


async def test_thousands_of_turns_leave_no_state_behind_and_memory_flat(bot: TestServer) -> None:
    """Stream buffers, waiting sends and per-socket state are freed turn by turn: after the
    first thousand turns on a socket, the next thousand add (almost) nothing to the bot's
    memory (a few KB, of caches that fill up: measured, not a bound on anything real)."""
    connections: Connections = bot.app[CONNECTIONS_KEY]
    channel = ChannelStandIn(record=False)
    channel.url = SERVICE_URL
    async with aiohttp.ClientSession() as session:
        bots = SocketBots([str(bot.make_url("/"))], session, channel)
        callers = [Caller(SERVICE_URL) for _ in range(20)]
        for caller in callers:
            assert await bots.post(caller.start()) == 200

        async def turns(count: int) -> None:
            for n in range(count // len(callers)):
                statuses = await asyncio.gather(*(bots.post(c.say(f"turn {n}")) for c in callers))
                assert statuses == [200] * len(callers)

        tracemalloc.start()  # before the first thousand: objects replaced later are seen freed
        try:
            await turns(1000)
            gc.collect()
            before = tracemalloc.take_snapshot()
            await turns(1000)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # The bot's side is what counts: not the simulator (it keeps every turn's latency, by
        # design), nor the embedded Redis (call data, the seen ids filling up to their bound).
        grown = sum(
            stat.size_diff
            for stat in after.compare_to(before, "filename")
            if not any(part in stat.traceback[0].filename for part in ("/simulator/", "/fakeredis/"))
        )
        [socket] = connections.sockets
        assert socket._deframer.open == 0 and not socket._waiting and not socket.busy
        assert socket.conversations == {c.conversation_id for c in callers}
        assert not connections._routed
        client = bots.sockets[0].connection
        assert client is not None and client._deframer.open == 0 and not client._waiting
        assert channel.received == 1000 + 1000 + len(callers)  # every turn's reply arrived
        growth = after.compare_to(before, "lineno")[:5]
        assert grown < 64 * 1024, f"{grown} bytes more after 1,000 more turns: {growth}"
        await bots.close()


async def test_a_socket_that_carries_many_calls_keeps_only_the_live_ones(bot: TestServer) -> None:
    """botbuilder-python's per-socket set of conversations only grew; here a call that
    ends lets go of its socket, and its ``:socket`` key with it."""
    connections: Connections = bot.app[CONNECTIONS_KEY]
    channel = ChannelStandIn()
    channel.url = SERVICE_URL
    async with aiohttp.ClientSession() as session:
        bots = SocketBots([str(bot.make_url("/"))], session, channel)
        callers = [Caller(SERVICE_URL) for _ in range(100)]
        assert await asyncio.gather(*(bots.post(c.start()) for c in callers)) == [200] * 100
        live = callers[:3]
        for caller in callers[3:]:
            assert await bots.post(caller.hang_up()) == 200
        [socket] = connections.sockets
        assert socket.conversations == {c.conversation_id for c in live} and connections.calls == 3
        redis = bot.app[STORE_KEY].redis
        keys = bot.app[STORE_KEY].keys
        await eventually(lambda: not [t for t in connections._tasks if t.get_name().startswith("let go")])
        held = [await redis.get(keys.socket(c.conversation_id)) for c in callers]
        assert held == [connections.instance] * 3 + [None] * 97
        await bots.close()


async def test_shutting_down_finishes_the_turns_in_flight_and_refuses_new_ones(
    bot: TestServer, js: JsChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While draining, a socket answers new requests 503 (the channel sends them again on
    another socket) and lets the turns in flight finish, never cancelling them; then it
    closes with 1012 and new upgrades are refused."""
    socket = await connected(js, bot)
    held, other = Caller(SERVICE_URL), Caller(SERVICE_URL)
    await js.send(socket, other.start())
    release = hold_turns_of(bot, held, monkeypatch)
    in_flight = asyncio.create_task(js.send(socket, held.start()))
    await eventually(lambda: bool(next(iter(bot.app[CONNECTIONS_KEY].sockets)).busy))
    draining = asyncio.create_task(drain(bot.app))
    await eventually(lambda: bot.app[DRAINING_KEY].is_set())
    refused = await js.send(socket, other.say("still there?"))
    assert refused["status"] == 503 and "shutting down" in refused["body"]["error"]
    upgrade = await js.connect("late", ws_url(bot), {"channelid": "telephony"})
    assert upgrade["event"] == "refused" and upgrade["status"] == 503
    release.set()
    assert (await in_flight)["status"] == 200  # finished, not cancelled
    assert len(await said(js, held.conversation_id, 1)) == 1  # and its reply went out first
    await draining
    assert (await js.wait_disconnected(socket))["code"] == 1012
    record = await state_of(bot, other.conversation_id)
    assert record["version"] == "1"  # the refused activity changed nothing
