"""The operator API, /metrics and the dashboard route, through aiohttp's test client, with
calls made the way the channel makes them (activities posted to /api/messages)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from adapters.http import STORE_KEY
from adapters.keys import CallField
from adapters.pool import PoolStore
from app import create_app
from orchestrator import flow_diagram
from orchestrator.callflow import load_callflow, shipped_flow
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from states.diagram import mermaid
from tests.conftest import SAMPLE_FLOW, delete_prefix

TOKEN = "operator-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET = "+14251231234"


async def serve(settings: Any) -> TestClient[Any, Any]:
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


@pytest.fixture
async def bot(bot_redis: dict[str, Any], key_prefix: str) -> AsyncIterator[TestClient[Any, Any]]:
    client = await serve(load_settings(**bot_redis, REDIS_KEY_PREFIX=key_prefix, OPERATOR_TOKEN=TOKEN))
    yield client
    if bot_redis["REDIS_URL"]:
        await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
    await client.close()


@pytest.fixture
async def calls(bot: TestClient[Any, Any], channel: ChannelStandIn) -> dict[str, Caller]:
    """A failed transfer (with a card number said), one ringing, and one in the bot."""
    made = {name: Caller(channel.url) for name in ("failed", "ringing", "chatting")}
    script: dict[str, list[Any]] = {
        "failed": ["start", "my card is 4111 1111 1111 1111", "agent", ("failed", "busy")],
        "ringing": ["start", "agent"],
        "chatting": ["start", "one"],
    }
    for name, steps in script.items():
        caller = made[name]
        for step in steps:
            if step == "start":
                activity = caller.start()
            elif isinstance(step, tuple):
                activity = caller.status({"state": step[0], "message": step[1]})
            else:
                activity = caller.say(step)
            response = await bot.post("/api/messages", json=activity)
            assert response.status == 201, await response.text()
    return made


async def get(bot: TestClient[Any, Any], path: str, status: int = 200, **headers: str) -> Any:
    response = await bot.get(path, headers=headers or AUTH)
    body = await response.read()
    assert response.status == status, body
    return await response.json() if response.content_type == "application/json" else body


async def test_calls_by_state_and_one_call_whole(bot: TestClient[Any, Any], calls: dict[str, Caller]) -> None:
    failed, ringing = calls["failed"].conversation_id, calls["ringing"].conversation_id
    listed = (await get(bot, "/api/calls?state=failed"))["calls"]
    assert [(c["id"], c["state"], c["attempts"], c["target"]) for c in listed] == [
        (failed, "failed", 1, TARGET)
    ]
    assert listed[0]["last_transition"] == "fail transferring -> failed"
    live = {c["id"]: c["state"] for c in (await get(bot, "/api/calls"))["calls"]}
    assert live == {failed: "failed", ringing: "transferring", calls["chatting"].conversation_id: "bot"}
    assert len((await get(bot, "/api/calls?limit=1"))["calls"]) == 1

    call = await get(bot, f"/api/calls/{failed}")
    assert call["record"]["state"] == "failed" and call["record"]["failure"] == "busy"
    said = [line["text"] for line in call["transcript"] if line["role"] == "caller"]
    assert said == ["my card is ************1111", "agent"]
    assert [(h["from"], h["to"], h["node"]) for h in call["history"]] == [
        ("bot", "bot", "main"),  # the call starts at the flow's first node
        ("bot", "bot", "agent"),  # the move to the flow's transfer node
        ("bot", "transferring", ""),
        ("transferring", "failed", ""),
    ]
    assert call["targets_tried"] == [TARGET]
    # The caller's number (their account in the reference) is masked like a digit run.
    reference = call["record"]["reference"]
    assert reference["user"] == {"id": "*******0123", "role": "user"}
    assert reference["conversation"] == {"id": failed} and reference["channelId"] == "telephony"
    for form in (calls["failed"].number, "4255550123", "5550123"):
        assert form not in json.dumps(call)
    await get(bot, "/api/calls/nobody", 404)


async def test_stats_and_recent_transitions(bot: TestClient[Any, Any], calls: dict[str, Caller]) -> None:
    stats = await get(bot, "/api/stats?window=15m")
    assert stats["calls"] == {"bot": 1, "transferring": 1, "accepted": 0, "failed": 1, "ended": 0}
    assert stats["nodes"] == {"billing": 1}  # the call with the bot, at the menu it chose
    counted = {
        "started": 2,
        "accepted": 0,
        "failed": 1,
        "timeout": 0,
        "late_accepted": 0,
        "success_rate": 0.0,
    }
    assert stats["targets"] == [{"target": TARGET, **counted}]
    assert stats["queues"] == [{"queue": "agents", **counted}]
    assert stats["transfers"]["started"] == 2 and stats["window"] == "15m"
    recent = (await get(bot, "/api/transitions?limit=2"))["transitions"]
    assert len(recent) == 2
    steps = {(t["call"], t["from"], t["to"]) for t in (await get(bot, "/api/transitions"))["transitions"]}
    assert (calls["failed"].conversation_id, "transferring", "failed") in steps
    assert (calls["ringing"].conversation_id, "bot", "transferring") in steps


async def test_the_machine_and_its_diagrams(bot: TestClient[Any, Any], calls: dict[str, Caller]) -> None:
    machine = await get(bot, "/api/machine")
    assert machine["states"] == ["bot", "transferring", "accepted", "failed", "ended"]
    assert {
        "trigger": "fail",
        "source": "transferring",
        "dest": "failed",
        "label": "fail / say_retry",
    } in machine["transitions"]
    text = await get(bot, f"/api/diagram?call={calls['failed'].conversation_id}")
    assert text.decode() == mermaid(highlight="failed")
    dot = (await get(bot, "/api/diagram?format=dot")).decode()
    assert dot.startswith("digraph")
    if shutil.which("dot"):
        svg = await bot.get("/api/diagram?format=svg", headers=AUTH)
        assert svg.status == 200 and svg.content_type == "image/svg+xml" and b"<svg" in await svg.read()


async def test_the_flow_diagram(bot: TestClient[Any, Any], calls: dict[str, Caller]) -> None:
    flow = load_callflow(SAMPLE_FLOW)  # the tests' bots run it
    assert (await get(bot, "/api/flow/diagram")).decode() == flow_diagram.mermaid(flow)
    chatting = calls["chatting"].conversation_id  # said "one": at the billing menu
    text = await get(bot, f"/api/flow/diagram?call={chatting}")
    assert text.decode() == flow_diagram.mermaid(flow, "billing")
    dot = await get(bot, f"/api/flow/diagram?format=dot&call={calls['failed'].conversation_id}")
    assert dot.decode() == flow_diagram.dot(flow, "main")
    if shutil.which("dot"):
        svg = await bot.get("/api/flow/diagram?format=svg", headers=AUTH)
        assert (
            svg.status == 200
            and svg.content_type == "image/svg+xml"
            and b"agent (queue agents)" in await svg.read()
        )
    # A call at a node the flow no longer has (it changed since): a conflict that says so.
    store = bot.app[STORE_KEY]
    await store.redis.hset(store.keys.call(chatting).call, CallField.NODE, "gone")
    answer = await get(bot, f"/api/flow/diagram?call={chatting}", 409)
    assert answer["error"] == f"call {chatting!r} is at node 'gone': this bot's flow has no such node"


async def test_diagram_without_graphviz_is_a_501_that_says_so(
    bot: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "needs Graphviz" in (await get(bot, "/api/diagram?format=png", 501))["error"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/api/calls?state=ringing", "state must be one of"),
        ("/api/calls?limit=0", "limit must be"),
        ("/api/calls?limit=ten", "limit must be"),
        ("/api/calls?limit=10001", "limit must be"),
        ("/api/transitions?limit=-1", "limit must be"),
        ("/api/stats?window=soon", "window"),
        ("/api/stats?window=30d", "window"),
        ("/api/diagram?format=gif", "format must be"),
        ("/api/diagram?call=nobody", "no call"),
        ("/api/flow/diagram?format=gif", "format must be"),
        ("/api/flow/diagram?call=nobody", "no call"),
        ("/api/calls?limit=%C2%B2", "limit must be"),  # a digit to str.isdigit, not to int()
        ("/api/calls?limit=" + "9" * 5000, "limit must be"),
        ("/api/stats?window=%D9%A1h", "window"),  # an Arabic-Indic one
        ("/api/stats?window=" + "9" * 5000, "window"),
    ],
)
async def test_bad_queries_get_a_reason_and_change_nothing(
    bot: TestClient[Any, Any], calls: dict[str, Caller], path: str, reason: str
) -> None:
    failed = calls["failed"].conversation_id
    before = await bot.app[STORE_KEY].record(failed)
    answer = await get(bot, path, 404 if "call=" in path else 400)
    assert reason in answer["error"]
    assert await bot.app[STORE_KEY].record(failed) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        # A Bot Framework channel token is no operator token.
        {"Authorization": "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJib3QifQ.c2ln"},
    ],
)
@pytest.mark.parametrize(
    "path",
    [
        "/api/calls",
        "/api/calls/x",
        "/api/stats",
        "/api/transitions",
        "/api/machine",
        "/api/diagram",
        "/api/flow/diagram",
        "/api/pools",
        "/metrics",
    ],
)
async def test_without_the_operator_token_nothing_is_shown(
    bot: TestClient[Any, Any], headers: dict[str, str], path: str
) -> None:
    response = await bot.get(path, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "OPERATOR_TOKEN" in (await response.json())["error"]


async def test_metrics(bot: TestClient[Any, Any], calls: dict[str, Caller]) -> None:
    again = calls["chatting"].say("one")
    assert (await bot.post("/api/messages", json=again)).status == 201
    assert (await bot.post("/api/messages", json=again)).status == 201  # a redelivery: applied once
    text = (await get(bot, "/metrics")).decode()

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        assert match, f"{sample} not in /metrics"
        return float(match.group(1))

    assert value('cc_calls{state="failed"}') == 1 and value('cc_calls{state="transferring"}') == 1
    assert value(f'cc_transfers_total{{outcome="started",queue="agents",target="{TARGET}"}}') == 2
    assert value(f'cc_transfers_total{{outcome="failed",queue="agents",target="{TARGET}"}}') == 1
    assert value('cc_transfer_outcome_seconds_count{outcome="failed",queue="agents"}') == 1
    assert value("cc_turn_seconds_count") == 10  # 8 turns of the calls fixture, then 2
    assert value("cc_duplicate_activities_total") == 1
    assert value("cc_commit_conflicts_total") == 0 and value("cc_timers_fired_total") == 0


async def test_the_dashboard_page_is_served_locked_down(bot: TestClient[Any, Any]) -> None:
    response = await bot.get("/dashboard")  # the page holds no data: it asks for the token
    assert response.status == 200 and response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "<html" in (await response.text()).lower()


async def test_with_no_operator_token_there_is_no_operator_api(
    key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPERATOR_TOKEN", raising=False)
    client = await serve(load_settings(REDIS_URL=None, REDIS_KEY_PREFIX=key_prefix))
    try:
        for path in [
            "/api/calls",
            "/api/calls/x",
            "/api/stats",
            "/api/diagram",
            "/api/flow/diagram",
            "/api/pools",
            "/metrics",
            "/dashboard",
        ]:
            assert (await client.get(path, headers=AUTH)).status == 404, path
    finally:
        await client.close()


async def test_redis_down_is_a_503(key_prefix: str) -> None:
    client = await serve(
        load_settings(REDIS_URL="redis://127.0.0.1:1/0", OPERATOR_TOKEN=TOKEN, REDIS_TIMEOUT_SECONDS=1)
    )
    try:
        for path in ["/api/calls", "/api/stats", "/api/transitions", "/api/calls/x"]:
            response = await client.get(path, headers=AUTH)
            assert response.status == 503 and response.headers["Retry-After"] == "1", path
        # The instance's own metrics are still served, without call counts it cannot read.
        response = await client.get("/metrics", headers=AUTH)
        text = await response.text()
        assert response.status == 200 and "cc_redis_up 0.0" in text and "cc_calls{" not in text
        assert "cc_turn_seconds_count" in text
    finally:
        await client.close()


async def test_a_token_of_bytes_that_are_not_utf8_is_a_401(bot: TestClient[Any, Any]) -> None:
    reader, writer = await asyncio.open_connection(bot.host, bot.port)
    writer.write(
        b"GET /api/calls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.split()[1] == b"401", status_line


async def test_a_call_id_with_braces_and_slashes_opens(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url, conversation_id="x{1}/y")
    assert (await bot.post("/api/messages", json=caller.start())).status == 201
    assert [c["id"] for c in (await get(bot, "/api/calls"))["calls"]] == ["x{1}/y"]
    call = await get(bot, "/api/calls/x%7B1%7D%2Fy")
    assert call["record"]["id"] == "x{1}/y" and call["transcript"]


def test_a_short_operator_token_stops_start_up_without_echoing_it() -> None:
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(OPERATOR_TOKEN="hunter2")
    assert "OPERATOR_TOKEN" in str(caught.value) and "hunter2" not in str(caught.value)
    assert load_settings(OPERATOR_TOKEN="").OPERATOR_TOKEN is None
    token = load_settings(OPERATOR_TOKEN=f"  {TOKEN}\n").OPERATOR_TOKEN  # as read from a secret file
    assert token is not None and token.get_secret_value() == TOKEN


# Number pools (issue 15): the example warm-transfer flow's pool "agents", three numbers,
# leased by its queue "agents" when a caller says "agent".
WARM_FLOW = shipped_flow("warm-transfer.yaml")
POOL_NUMBERS = load_callflow(WARM_FLOW).pools["agents"].numbers


def metric(text: str, sample: str) -> float | None:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture
async def warm_bot(bot_redis: dict[str, Any], key_prefix: str) -> AsyncIterator[TestClient[Any, Any]]:
    """A bot running the warm-transfer flow."""
    settings = load_settings(
        **bot_redis,
        REDIS_KEY_PREFIX=key_prefix,
        OPERATOR_TOKEN=TOKEN,
        CALLFLOW_FILE=WARM_FLOW,
        VARIABLES_KEYS=Fernet.generate_key().decode(),
    )
    client = await serve(settings)
    yield client
    if bot_redis["REDIS_URL"]:
        await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
    await client.close()


def pool_of(bot: TestClient[Any, Any]) -> PoolStore:
    """The pools as any instance (or the agent side) reaches them."""
    store = bot.app[STORE_KEY]
    return PoolStore(store.redis, store.keys, store.sealer)


async def pool_figures(bot: TestClient[Any, Any], **expected: int) -> dict[str, Any]:
    """The pool "agents" as /api/pools gives it, once its counts are ``expected`` (a lease
    lapses by Redis time: polled until it has)."""
    for _ in range(200):
        agents: dict[str, Any] = (await get(bot, "/api/pools"))["pools"]["agents"]
        if all(agents[name] == count for name, count in expected.items()):
            return agents
        await asyncio.sleep(0.02)
    raise AssertionError(f"the pool never got to {expected}: {agents}")


async def test_pools_and_their_numbers_per_state(
    warm_bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    bot = warm_bot
    idle = {"numbers": 3, "free": 3, "leased": 0, "claimed": 0, "lapsed": 0}
    assert await get(bot, "/api/pools") == {
        "pools": {"agents": {**idle, "grace_seconds": 30.0, "queues": ["agents"]}}
    }
    # Two callers transferred through the pool: each dials a number leased to it.
    callers = [Caller(channel.url) for _ in range(2)]
    dialled = []
    for caller in callers:
        response = await bot.post("/api/messages", json=caller.say("agent"))
        assert response.status == 201, await response.text()
        record = await bot.app[STORE_KEY].record(caller.conversation_id)
        assert record[CallField.STATE] == "transferring"
        dialled.append(record[CallField.TARGET])
    assert sorted(dialled) == sorted(POOL_NUMBERS[:2])  # never leased: taken in order
    await pool_figures(bot, free=1, leased=2, claimed=0, lapsed=0)
    # The agent side claims one call's context; a dead instance's lease of the last
    # number lapses.
    pools = pool_of(bot)
    assert await pools.claim("agents", dialled[0]) is not None
    dead = await pools.lease("agents", POOL_NUMBERS, "dead-call", "t", 0.2)
    assert dead is not None and dead.number == POOL_NUMBERS[2]
    agents = await pool_figures(bot, lapsed=1)
    assert agents == {
        "numbers": 3,
        "free": 0,
        "leased": 1,
        "claimed": 1,
        "lapsed": 1,
        "grace_seconds": 30.0,
        "queues": ["agents"],
    }

    # /metrics: the same figures, read at scrape time (as on every instance).
    text = (await get(bot, "/metrics")).decode()
    assert "# TYPE cc_pool_numbers gauge" in text
    for status, count in {"free": 0, "leased": 1, "claimed": 1, "lapsed": 1}.items():
        assert metric(text, f'cc_pool_numbers{{pool="agents",status="{status}"}}') == count, status
    assert metric(text, 'cc_pool_leases_total{pool="agents"}') == 2  # this instance's own
    # A number given back shows free at the next scrape.
    lease = await pools.lease("agents", POOL_NUMBERS, "dead-call", "t", 30)  # the lapsed one, afresh
    assert lease is not None and lease.number == POOL_NUMBERS[2]
    assert await pools.release("agents", lease.number, "dead-call", "t") is not None
    text = (await get(bot, "/metrics")).decode()
    assert metric(text, 'cc_pool_numbers{pool="agents",status="free"}') == 1
    assert metric(text, 'cc_pool_numbers{pool="agents",status="lapsed"}') == 0


async def test_a_flow_without_pools_has_none_to_show(bot: TestClient[Any, Any]) -> None:
    assert await get(bot, "/api/pools") == {"pools": {}}
    text = (await get(bot, "/metrics")).decode()
    assert "cc_pool_numbers{" not in text and "cc_redis_up 1.0" in text


async def test_pools_with_redis_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 like the other routes; /metrics leaves the pools out like cc_calls."""
    monkeypatch.delenv("REDIS_CLUSTER", raising=False)
    client = await serve(
        load_settings(
            REDIS_URL="redis://127.0.0.1:1/0",
            OPERATOR_TOKEN=TOKEN,
            REDIS_TIMEOUT_SECONDS=1,
            CALLFLOW_FILE=WARM_FLOW,
            VARIABLES_KEYS=Fernet.generate_key().decode(),
        )
    )
    try:
        response = await client.get("/api/pools", headers=AUTH)
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert "unavailable" in (await response.json())["error"]
        text = await (await client.get("/metrics", headers=AUTH)).text()
        assert "cc_redis_up 0.0" in text and "cc_pool_numbers{" not in text
    finally:
        await client.close()
