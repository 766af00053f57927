"""End to end over HTTP, exactly as the channel drives the bot: activities posted to
/api/messages, replies captured by a stand-in for the channel's serviceUrl."""

from __future__ import annotations

import asyncio
import contextlib
import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient, TestServer

from adapters.bot import TURN_BOUND, TurnBound, taken
from adapters.http import STORE_KEY
from adapters.keys import Due
from adapters.store import RedisCallStore
from app import create_app
from orchestrator.callflow import load_callflow
from orchestrator.config import load_settings
from simulator.call import voice_of
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import SAMPLE_FLOW, delete_prefix

DEFAULT_FLOW = Path(__file__).parents[1] / "orchestrator" / "flows" / "transfer-sample.yaml"
SECOND_TARGET = "+14255550100"


@pytest.fixture
def transfer_timeout() -> float:
    return 60


@pytest.fixture
def flow_file(tmp_path: Path, transfer_timeout: float) -> Path:
    """The default flow with a second agent number."""
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["queues"]["agents"]["targets"] = ["+14251231234", SECOND_TARGET]
    data["queues"]["agents"]["timeout_seconds"] = transfer_timeout
    path = tmp_path / "callflow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def outbox_grace() -> float:
    return 1


@pytest.fixture
async def bot(
    bot_redis: dict[str, Any], flow_file: Path, key_prefix: str, outbox_grace: float
) -> AsyncIterator[TestClient[Any, Any]]:
    settings = load_settings(
        **bot_redis,
        REDIS_KEY_PREFIX=key_prefix,
        CALLFLOW_FILE=flow_file,
        OUTBOX_GRACE_SECONDS=outbox_grace,
        SCHEDULER_POLL_SECONDS=0.05,
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    try:
        async with asyncio.timeout(20):
            if bot_redis["REDIS_URL"]:
                await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
            await client.close()
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack()
        raise


async def post(bot: TestClient[Any, Any], activity: dict[str, Any]) -> int:
    response = await bot.post("/api/messages", json=activity)
    return response.status


def speak_of(activity: dict[str, Any]) -> ET.Element:
    """The reply's SSML, which must be well-formed."""
    return ET.fromstring(activity["speak"])


async def state_of(bot: TestClient[Any, Any], conversation_id: str) -> str | None:
    call = (await bot.app[STORE_KEY].load(conversation_id)).call
    return call.state if call else None


async def test_a_whole_call(bot: TestClient[Any, Any], channel: ChannelStandIn) -> None:
    caller = Caller(channel.url)
    sent = channel.for_conversation
    cid = caller.conversation_id

    assert await post(bot, caller.start()) == 201
    assert len(sent(cid)) == 1 and "For the billing department" in sent(cid)[0]["text"]

    assert await post(bot, caller.say("one")) == 201
    billing = sent(cid)[-1]
    assert billing["text"].startswith("Hello and thank you for calling billing department.")
    assert voice_of(billing) == "en-US-JessaNeural"

    hostile = caller.say('<b> & "')
    assert await post(bot, hostile) == 201
    echo = sent(cid)[-1]
    assert echo["text"] == 'What I heard was "<b> & ""' and voice_of(echo) == "en-US-GuyNeural"
    assert "".join(speak_of(echo).itertext()).strip() == 'What I heard was "<b> & ""'
    assert echo["replyToId"] == hostile["id"]

    ask = caller.say("Talk to agent")
    assert await post(bot, ask) == 201
    handoff = sent(cid)[-1]
    assert (handoff["type"], handoff["name"]) == ("event", "handoff.initiate")
    assert handoff["value"] == {"TargetPhoneNumber": "+14251231234", "Queue": "agents"}
    assert handoff["replyToId"] == ask["id"] and handoff["relatesTo"]["conversation"]["id"] == cid
    assert handoff["entities"] == []
    # EventFactory gives the event an id, which the adapter clears on send: C#'s
    # CloudAdapterBase.SendActivitiesAsync does the same, so the wire matches.
    assert "id" not in handoff
    (attachment,) = handoff["attachments"]
    assert (attachment["contentType"], attachment["name"]) == ("application/json", "Transcript")
    transcript = attachment["content"]["activities"]
    assert [(a["from"]["role"], a["text"]) for a in transcript][1:] == [
        ("user", "one"),
        ("bot", billing["text"]),
        ("user", '<b> & "'),
        ("bot", echo["text"]),
        ("user", "Talk to agent"),
    ]
    assert transcript[1]["from"]["id"] == caller.number
    assert await state_of(bot, cid) == "transferring"

    assert await post(bot, caller.status({"state": "failed", "message": "busy"})) == 201
    assert "could not take your call" in sent(cid)[-1]["text"]
    assert await state_of(bot, cid) == "failed"

    assert await post(bot, caller.say("agent")) == 201
    assert sent(cid)[-1]["value"] == {"TargetPhoneNumber": SECOND_TARGET, "Queue": "agents"}

    before = len(sent(cid))
    assert await post(bot, caller.status({"state": "accepted"})) == 201
    assert await post(bot, caller.say("hello? are you there")) == 201
    assert len(sent(cid)) == before, "the bot must be silent while the caller is with an agent"
    assert await state_of(bot, cid) == "accepted"

    assert await post(bot, caller.status({"state": "completed"})) == 201
    assert "back with the automated assistant" in sent(cid)[-1]["text"]
    assert await state_of(bot, cid) == "bot"

    assert await post(bot, caller.say("0")) == 201
    assert sent(cid)[-1]["value"] == {
        "TargetPhoneNumber": "+14251231234",
        "Queue": "agents",
    }  # attempt 3 wraps around
    assert await post(bot, caller.hang_up()) == 201
    assert await state_of(bot, cid) == "ended"

    store: RedisCallStore = bot.app[STORE_KEY]
    steps = [s for _, s in await store.history(cid)]
    # Moves through the call flow name their node (every one the sample flow has); the rest
    # are the machine's transitions.
    assert {s.node for s in steps if s.trigger == "move"} <= set(load_callflow(SAMPLE_FLOW).nodes)
    history = [(s.trigger, s.source, s.dest) for s in steps if s.trigger != "move"]
    assert history == [
        ("request_agent", "bot", "transferring"),
        ("fail", "transferring", "failed"),
        ("request_agent", "failed", "transferring"),
        ("accept", "transferring", "accepted"),
        ("complete", "accepted", "bot"),
        ("request_agent", "bot", "transferring"),
        ("accept", "transferring", "accepted"),  # Telephony: the call ended while transferring
        ("hang_up", "accepted", "ended"),
    ]


async def test_max_attempts_then_the_final_prompt(bot: TestClient[Any, Any], channel: ChannelStandIn) -> None:
    caller = Caller(channel.url)
    cid = caller.conversation_id
    targets = []
    for _ in range(3):
        await post(bot, caller.say("agent"))
        targets.append(channel.for_conversation(cid)[-1]["value"]["TargetPhoneNumber"])
        await post(bot, caller.status({"state": "failed", "message": "no answer"}))
    assert targets == ["+14251231234", SECOND_TARGET, "+14251231234"]
    assert "no agent is available" in channel.for_conversation(cid)[-1]["text"]
    await post(bot, caller.say("agent"))
    assert "no agent is available" in channel.for_conversation(cid)[-1]["text"]
    assert await state_of(bot, cid) == "failed"


async def test_a_call_the_bot_never_saw_starts_in_bot(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    assert await post(bot, caller.say("1")) == 201
    assert channel.for_conversation(caller.conversation_id)[-1]["text"].startswith("Hello and thank you")
    assert await state_of(bot, caller.conversation_id) == "bot"


async def test_a_redelivered_activity_is_applied_and_answered_once(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    ask = caller.say("agent")
    for _ in range(3):
        assert await post(bot, ask) == 201
    assert channel.reply_counts()[ask["id"]] == 1
    call = (await bot.app[STORE_KEY].load(caller.conversation_id)).call
    assert call is not None and call.version == 1 and call.attempts == 1


async def test_statuses_that_do_not_fit_are_recorded_and_never_error(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    await post(bot, caller.say("hello"))
    for value in [
        {"state": "accepted"},
        {"state": "nonsense"},
        "accepted",
        None,
        [1],
        {"state": "completed"},
    ]:
        assert await post(bot, caller.status(value)) == 201
    assert await state_of(bot, caller.conversation_id) == "bot"
    history = await bot.app[STORE_KEY].history(caller.conversation_id)
    assert len(history) == 6 and all(step.reason.startswith("ignored") for _, step in history)


async def dump(store: RedisCallStore, conversation_id: str) -> list[Any]:
    """Everything Redis holds for one call."""
    keys = store.keys.call(conversation_id)
    return [
        await store.redis.hgetall(keys.call),
        await store.redis.lrange(keys.transcript, 0, -1),
        await store.redis.lrange(keys.history, 0, -1),
        await store.redis.hgetall(keys.seen),
        await store.redis.hgetall(keys.outbox),
    ]


def bad_requests(caller: Caller) -> list[tuple[str, bytes, str, int]]:
    good = caller.say("agent")

    def with_(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    def without(name: str) -> bytes:
        return json.dumps({k: v for k, v in good.items() if k != name}).encode()

    json_type = "application/json"
    return [
        ("malformed JSON", b'{"type": "message",', json_type, 400),
        ("not UTF-8", b"\xff\xfe{}", json_type, 400),
        ("wrong content type", json.dumps(good).encode(), "text/plain", 415),
        ("no content type", json.dumps(good).encode(), "", 415),
        ("content type the email parser fails on", json.dumps(good).encode(), "application/json;a*", 400),
        ("a list", json.dumps([good]).encode(), json_type, 400),
        ("a string", b'"message"', json_type, 400),
        ("null", b"null", json_type, 400),
        ("empty body", b"", json_type, 400),
        ("no type", without("type"), json_type, 400),
        ("type not a string", with_(type=5), json_type, 400),
        ("no conversation", without("conversation"), json_type, 400),
        ("conversation not an object", with_(conversation="c"), json_type, 400),
        ("conversation without id", with_(conversation={}), json_type, 400),
        ("text not a string", with_(text={"a": 1}), json_type, 400),
        ("from not an object", with_(**{"from": "x"}), json_type, 400),
        ("no serviceUrl", without("serviceUrl"), json_type, 400),
        ("membersAdded not a list", with_(membersAdded="x"), json_type, 400),
        ("too big", with_(text="x" * 300_000), json_type, 413),
        (
            "nested too deeply",
            b'{"type": "message", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            json_type,
            400,
        ),
        ("a lone surrogate in text", with_(text="\ud800"), json_type, 400),
        ("a lone surrogate in the conversation id", with_(conversation={"id": "c\udfff"}), json_type, 400),
        ("a lone surrogate in the activity id", with_(id="\udbff"), json_type, 400),
    ]


async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    await post(bot, caller.start())
    store: RedisCallStore = bot.app[STORE_KEY]
    before = await dump(store, caller.conversation_id)
    for label, body, content_type, expected in bad_requests(caller):
        headers = {"Content-Type": content_type} if content_type else {}
        response = await bot.post(
            "/api/messages", data=body, headers=headers, skip_auto_headers=["Content-Type"]
        )
        assert response.status == expected, label
        reason = (await response.json())["error"]
        assert reason and "\n" not in reason, label
    assert await dump(store, caller.conversation_id) == before
    assert len(channel.for_conversation(caller.conversation_id)) == 1


async def test_health_and_readiness(bot: TestClient[Any, Any]) -> None:
    assert (await bot.get("/healthz")).status == 200
    ready = await bot.get("/readyz")
    assert ready.status == 200 and (await ready.json()) == {"status": "ready"}


async def test_get_without_upgrade_is_a_4xx(bot: TestClient[Any, Any]) -> None:
    response = await bot.get("/api/messages")
    assert response.status == 400


async def test_the_streaming_upgrade_is_accepted_without_a_token_when_auth_is_off(
    bot: TestClient[Any, Any],
) -> None:
    """As a POST is: with MicrosoftAppId unset no token is needed (botbuilder 4.17.1 refused
    the upgrade: "argument auth_header is null"), but one that is there must be valid."""
    ws = await bot.ws_connect("/api/messages")
    assert not ws.closed
    await ws.close()
    with pytest.raises(WSServerHandshakeError) as refused:
        await bot.ws_connect(
            "/api/messages", headers={"Authorization": "Bearer not-a-jwt", "channelid": "telephony"}
        )
    assert refused.value.status == 401


async def test_readyz_fails_when_redis_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MicrosoftAppId", raising=False)
    settings = load_settings(REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT_SECONDS=1)
    async with TestClient(TestServer(create_app(settings))) as client:
        assert (await client.get("/healthz")).status == 200
        ready = await client.get("/readyz")
        assert ready.status == 503
        caller = Caller("http://127.0.0.1:9/")
        response = await client.post("/api/messages", json=caller.say("hi"))
        assert response.status == 503 and response.headers["Retry-After"] == "1"


async def test_expect_replies_returns_the_replies_in_the_response(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """botbuilder 4.17.1 answers deliveryMode expectReplies with a 500; here it works."""
    caller = Caller(channel.url)
    response = await bot.post("/api/messages", json={**caller.say("1"), "deliveryMode": "expectReplies"})
    assert response.status == 200
    (reply,) = (await response.json())["activities"]
    assert reply["text"].startswith("Hello and thank you for calling billing department.")
    assert channel.for_conversation(caller.conversation_id) == []


async def test_odd_but_well_formed_activities_never_get_a_5xx(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    message = caller.say("hi")
    odd = {
        "invoke": (caller._base("invoke", name="x", value={}), 400),
        "typing": (caller._base("typing"), 201),
        "an unknown type": (caller._base("somethingNew"), 201),
        "membersAdded with an empty member": ({**caller.start(), "membersAdded": [{}]}, 201),
        "no from": ({k: v for k, v in message.items() if k != "from"}, 201),
        "no recipient": ({k: v for k, v in message.items() if k != "recipient"}, 201),
        "null text": ({**message, "id": "n1", "text": None}, 201),
        "a bad timestamp": ({**message, "timestamp": "not a date"}, 400),
        "attachments not a list": ({**message, "attachments": "x"}, 400),
        "a bad boolean": ({**message, "conversation": {"id": "x", "isGroup": "yes"}}, 400),
        "suggestedActions not an object": ({**message, "suggestedActions": "x"}, 400),
    }
    for label, (activity, expected) in odd.items():
        response = await bot.post("/api/messages", json=activity)
        assert response.status == expected, label


async def test_a_call_in_a_state_this_version_does_not_know_is_refused_with_503(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """A record written by a newer version (rolling deploy) or by hand: refuse, keep it."""
    caller = Caller(channel.url)
    await post(bot, caller.say("hello"))
    store: RedisCallStore = bot.app[STORE_KEY]
    await store.redis.hset(store.keys.call(caller.conversation_id).call, "state", "on_hold")
    before = await dump(store, caller.conversation_id)
    for activity in [caller.say("agent"), caller.hang_up(), caller.status({"state": "accepted"})]:
        response = await bot.post("/api/messages", json=activity)
        assert response.status == 503
    assert await dump(store, caller.conversation_id) == before


@pytest.mark.parametrize("transfer_timeout", [1])
async def test_an_unanswered_transfer_times_out_and_the_caller_hears_the_retry_prompt(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """The Telephony channel redials forever and never reports; the watchdog speaks up,
    proactively, through the stored conversation reference."""
    caller = Caller(channel.url)
    cid = caller.conversation_id
    assert await post(bot, caller.say("agent")) == 201
    await channel.wait_for(2, cid)
    retry = channel.for_conversation(cid)[-1]
    assert "could not take your call" in retry["text"]
    assert await state_of(bot, cid) == "failed"
    history = [(s.source, s.dest, s.reason) for _, s in await bot.app[STORE_KEY].history(cid)]
    assert history[-1] == ("transferring", "failed", "timeout")


async def test_replies_the_channel_refused_are_delivered_later(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """A transfer's handoff.initiate must not be lost when the channel fails to take it."""
    caller = Caller(channel.url)
    cid = caller.conversation_id
    channel.refuse_next = 1
    assert await post(bot, caller.say("agent")) == 201  # committed; the send failed
    assert channel.for_conversation(cid) == []
    await channel.wait_for(1, cid)  # re-sent by the scheduler after the grace period
    (handoff,) = channel.for_conversation(cid)
    assert handoff["name"] == "handoff.initiate" and handoff["value"] == {
        "TargetPhoneNumber": "+14251231234",
        "Queue": "agents",
    }
    assert handoff["attachments"][0]["content"]["activities"][0]["text"] == "agent"
    store: RedisCallStore = bot.app[STORE_KEY]
    async with asyncio.timeout(10):  # acknowledged once the channel took it
        while await store.redis.hlen(store.keys.call(cid).outbox):  # noqa: ASYNC110 - polling Redis
            await asyncio.sleep(0.05)


async def test_an_activity_without_an_id_still_starts_an_unknown_call(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    activity = {k: v for k, v in caller.say("1").items() if k != "id"}
    assert await post(bot, activity) == 201
    assert channel.for_conversation(caller.conversation_id)[-1]["text"].startswith("Hello and thank you")
    assert await state_of(bot, caller.conversation_id) == "bot"


# --- what "said" means: a reply the channel took, or one the outbox keeps until it is ---


async def outbox_of(bot: TestClient[Any, Any], conversation_id: str) -> dict[str, str]:
    store: RedisCallStore = bot.app[STORE_KEY]
    entries: dict[str, str] = await store.redis.hgetall(store.keys.call(conversation_id).outbox)  # type: ignore[assignment]
    return entries


async def test_an_ordinary_reply_whose_send_fails_is_kept_and_said_after_all(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """The turn committed, then the channel refused its echo: the redelivery would be a
    duplicate, so the reply goes in the outbox, and the scheduler says it once the channel
    takes posts again. The channel is answered 201: its retry could not help."""
    caller = Caller(channel.url)
    hello = caller.say("hello there")
    channel.refuse_next = 1_000_000
    assert await post(bot, hello) == 201
    assert channel.for_conversation(caller.conversation_id) == []
    assert list(await outbox_of(bot, caller.conversation_id)) == [hello["id"]]
    channel.refuse_next = 0
    await channel.wait_for(1, caller.conversation_id)
    (echo,) = channel.for_conversation(caller.conversation_id)
    assert "hello there" in echo["text"]
    async with asyncio.timeout(10):
        while await outbox_of(bot, caller.conversation_id):  # noqa: ASYNC110 (Redis, not a local event)
            await asyncio.sleep(0.05)


async def test_a_reply_slower_than_the_turn_bound_is_still_said_and_the_turn_taken(
    bot: TestClient[Any, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is for taking the turn: cancelling a committed turn's send at it cut the
    reply short and told the channel 503, whose redelivery, a duplicate, said nothing."""
    monkeypatch.setattr("adapters.http.TURN_SECONDS", 0.2)
    caller = Caller(channel.url)
    channel.delay = 0.6
    assert await post(bot, caller.say("hello there")) == 201
    channel.delay = 0.0
    (echo,) = channel.for_conversation(caller.conversation_id)
    assert "hello there" in echo["text"]
    assert await outbox_of(bot, caller.conversation_id) == {}


@pytest.mark.parametrize("outbox_grace", [60])
async def test_a_handoff_whose_send_is_refused_is_re_sent_at_once_not_a_grace_later(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """Kept by its commit, due after the grace (here a minute) in case the instance dies;
    a refused send makes it due at once. The channel's retry of the activity says nothing:
    a re-send there could race the first delivery's send and say it twice."""
    caller = Caller(channel.url)
    ask = caller.say("agent")
    channel.refuse_next = 1_000_000
    assert await post(bot, ask) == 201
    assert list(await outbox_of(bot, caller.conversation_id)) == [ask["id"]]
    channel.refuse_next = 0
    await channel.wait_for(1, caller.conversation_id, within=20)  # well inside the minute
    async with asyncio.timeout(10):
        while await outbox_of(bot, caller.conversation_id):  # noqa: ASYNC110 (Redis, not a local event)
            await asyncio.sleep(0.05)
    assert await post(bot, ask) == 201  # the channel's retry: a duplicate
    assert [a["name"] for a in channel.for_conversation(caller.conversation_id)] == ["handoff.initiate"]


async def test_a_redelivery_whose_re_send_fails_again_is_taken_and_the_replies_stay_kept(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    """The channel still refusing when it retries the activity: the retry is answered as
    taken, the handoff stays in the outbox for the scheduler, and is said once."""
    caller = Caller(channel.url)
    ask = caller.say("agent")
    channel.refuse_next = 1_000_000
    assert await post(bot, ask) == 201
    assert await post(bot, ask) == 201
    assert list(await outbox_of(bot, caller.conversation_id)) == [ask["id"]]
    channel.refuse_next = 0
    await channel.wait_for(1, caller.conversation_id)
    assert [a["name"] for a in channel.for_conversation(caller.conversation_id)] == ["handoff.initiate"]


async def test_a_reply_whose_send_times_out_is_kept_until_the_grace_not_re_sent_at_once(
    bot: TestClient[Any, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that timed out may have been said: re-sending it at once would say it twice."""
    monkeypatch.setattr("adapters.http.TURN_SECONDS", 0.2)
    monkeypatch.setattr("adapters.http.SAY_SECONDS", 0.4)
    caller = Caller(channel.url)
    hello = caller.say("hello there")
    channel.delay = 2.0
    assert await post(bot, hello) == 201
    store: RedisCallStore = bot.app[STORE_KEY]
    (kept,) = (await outbox_of(bot, caller.conversation_id)).values()
    due = await store.redis.zscore(
        store.keys.due_for(caller.conversation_id), Due.outbox(caller.conversation_id, hello["id"])
    )
    assert due is not None and int(due) - int(kept.partition(":")[0]) == store.retention.outbox_grace_ms


async def test_lifting_a_bound_that_expired_meanwhile_does_not_fail_the_turn() -> None:
    """A cancellation lost inside a library (CPython gh-86296) leaves the bound expired and
    the turn running: lifting it must not raise, and the replies keep their own bound."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(0) as expiring:
        bound = TurnBound(expiring, loop.time() + 5)
        token = TURN_BOUND.set(bound)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # the lost cancellation
                await asyncio.sleep(1)
            assert expiring.expired()
            assert taken() == bound.say_by
        finally:
            TURN_BOUND.reset(token)
