"""The agent side's context API (``GET /api/pool/{number}/context``) through aiohttp's test
client, on the embedded Redis, the real one and the test cluster, with calls made the way
the channel makes them (activities posted to /api/messages) on the example warm-transfer
flow: a claim hands over the context of the call that holds the number, once in the
call's history; nothing else opens it, a client's requests are limited, and Redis down is
a 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from hashlib import sha1
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from adapters import agent_api
from adapters.agent_api import AGENT_PAGE_CSP, NOT_HELD
from adapters.http import BOT_KEY, STORE_KEY
from adapters.keys import CallField
from adapters.pool import POOL_SCRIPT, PoolStatus, PoolStore
from app import create_app
from orchestrator.config import load_settings
from orchestrator.errors import ConfigError, StoreUnavailable
from orchestrator.events import ContextClaimed
from orchestrator.warm import CONTEXT_VERSION
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import BOT_ENVIRONMENT, delete_prefix, real_redis_or_skip
from tests.proxy import ReplyDroppingProxy

AGENT_TOKEN = "agent-token-for-tests-0123456789"
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
AGENT = {"Authorization": f"Bearer {AGENT_TOKEN}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
WARM_FLOW = Path(__file__).parents[1] / "orchestrator" / "flows" / "warm-transfer.yaml"
NUMBERS = ["+14255550150", "+14255550151", "+14255550152"]  # the example flow's pool
UNKNOWN = "+14255550199"  # E.164, in no pool
MASKED_CALLER = "+********123"  # the simulator's caller, +14255550123, as the context masks it
# Settings a developer's environment must not bring into these bots (conftest clears the rest).
AGENT_ENVIRONMENT = ("AGENT_TOKEN", "AGENT_RATE_LIMIT", "VARIABLES_KEYS", "PUSH_URL", "PUSH_SECRET")

Serve = Callable[..., Awaitable[TestClient[Any, Any]]]
ProxyT = TypeVar("ProxyT", bound=ReplyDroppingProxy)


def warm_flow_file(
    tmp_path: Path,
    *,
    numbers: list[str] | None = None,
    timeout_seconds: float = 3600,
    grace_seconds: float = 30,
) -> Path:
    """The example warm-transfer flow, written to ``tmp_path``, with a gather (say "account",
    then the digits) that collects ``account`` and goes back to the menu, so the context has
    a variable. A long watchdog by default: no timer may move a call mid-test."""
    flow = yaml.safe_load(WARM_FLOW.read_text())
    flow["queues"]["agents"]["timeout_seconds"] = timeout_seconds
    flow["pools"]["agents"]["grace_seconds"] = grace_seconds
    if numbers is not None:
        flow["pools"]["agents"]["numbers"] = numbers
    flow["prompts"]["ask_account"] = {"text": "Please say or enter your account number."}
    flow["routes"].append({"key": "2", "phrases": ["account"], "to": "account"})
    flow["nodes"]["account"] = {
        "type": "gather",
        "say": "ask_account",
        "into": "account",
        "min_digits": 4,
        "max_digits": 8,
        "next": "main",
        "on_fail": "main",
    }
    path = tmp_path / f"warm-{len(list(tmp_path.glob('warm-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(flow))
    return path


async def post(bot: TestClient[Any, Any], activity: dict[str, Any]) -> None:
    response = await bot.post("/api/messages", json=activity)
    assert response.status == 201, await response.text()


async def transfer(bot: TestClient[Any, Any], caller: Caller, *said: str) -> str:
    """Start a call, say ``said``, then "agent": the pool number the transfer dialled."""
    await post(bot, caller.start())
    for text in (*said, "agent"):
        await post(bot, caller.say(text))
    record = await bot.app[STORE_KEY].record(caller.conversation_id)
    assert record[CallField.STATE] == "transferring", record
    return str(record[CallField.TARGET])


async def claim(
    bot: TestClient[Any, Any],
    number: str,
    status: int = 200,
    agent: str | None = "ana",
    headers: dict[str, str] | None = None,
) -> Any:
    """``GET /api/pool/{number}/context`` (``number`` as it goes in the path): the body."""
    query = {} if agent is None else {"agent": agent}
    response = await bot.get(
        f"/api/pool/{number}/context", params=query, headers=AGENT if headers is None else headers
    )
    body = await response.json()
    assert response.status == status, body
    return body


async def claimed_steps(bot: TestClient[Any, Any], caller: Caller) -> list[str]:
    """The reasons of the "claimed" steps in the call's history, as the operator API shows it."""
    response = await bot.get(f"/api/calls/{caller.conversation_id}", headers=OPERATOR)
    assert response.status == 200, await response.text()
    return [step["reason"] for step in (await response.json())["history"] if step["trigger"] == "claimed"]


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AGENT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def serve(
    bot_redis: dict[str, Any], key_prefix: str, tmp_path: Path, agent_env: None
) -> AsyncIterator[Serve]:
    """Start bots (instances) on the Redis of this run, sharing its key prefix and sealing
    key; each defaults to the example flow and both tokens, overridden by keyword."""
    started: list[TestClient[Any, Any]] = []
    sealing = {"VARIABLES_KEYS": Fernet.generate_key().decode()} if bot_redis["REDIS_URL"] else {}

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        settings = {
            **bot_redis,
            **sealing,
            "REDIS_KEY_PREFIX": key_prefix,
            "AGENT_TOKEN": AGENT_TOKEN,
            "OPERATOR_TOKEN": OPERATOR_TOKEN,
            "CALLFLOW_FILE": warm_flow_file(tmp_path),
            **overrides,
        }
        client = TestClient(TestServer(create_app(load_settings(**settings))))
        await client.start_server()
        started.append(client)
        return client

    yield start
    if bot_redis["REDIS_URL"] and started:
        await delete_prefix(started[0].app[STORE_KEY].redis, key_prefix)
    for client in started:
        await client.close()


@pytest.fixture
async def bot(serve: Serve) -> TestClient[Any, Any]:
    return await serve()


async def test_a_claim_hands_over_the_context_and_is_recorded_once(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller, "my order is late", "account", "12345678")
    assert number in NUMBERS

    context = await claim(bot, number)
    assert context["version"] == CONTEXT_VERSION
    assert (context["pool"], context["queue"], context["attempt"]) == ("agents", "agents", 1)
    assert context["reason"] == 'said "agent"'
    assert context["caller"] == MASKED_CALLER
    assert context["number"] == number
    assert context["variables"] == {"account": "12345678"}  # as collected: the agent needs it
    said = [line["text"] for line in context["transcript"] if line["role"] == "caller"]
    assert said[:2] == ["my order is late", "account"] and said[-1] == "agent"
    assert {line["role"] for line in context["transcript"]} == {"caller", "bot"}
    for moment in ("started", "transferred", "claimed"):
        assert datetime.fromisoformat(context[moment].replace("Z", "+00:00")).tzinfo is not None
    steps = await claimed_steps(bot, caller)
    assert len(steps) == 1 and "claimed by ana from 127.0.0.1" in steps[0]

    # Within the lease the same agent (or another one) gets the same answer, recorded once.
    assert await claim(bot, number) == context
    assert await claim(bot, number, agent=None) == context
    assert await claimed_steps(bot, caller) == steps

    # The claim changed nothing else about the call.
    record = await bot.app[STORE_KEY].record(caller.conversation_id)
    assert record[CallField.STATE] == "transferring" and record[CallField.TARGET] == number


async def test_the_context_is_not_cached_by_anyone(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    number = await transfer(bot, Caller(channel.url))
    response = await bot.get(f"/api/pool/{number}/context", headers=AGENT)
    assert response.status == 200 and response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"


async def test_a_claim_without_a_name_says_an_agent(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    await claim(bot, number.replace("+", "%2B"), agent=None)  # as a page encodes it
    assert [step.split(" claimed by ")[1] for step in await claimed_steps(bot, caller)] == [
        "an agent from 127.0.0.1"
    ]


async def test_free_unknown_and_given_back_numbers_are_the_same_404(
    bot: TestClient[Any, Any], channel: ChannelStandIn
) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    free = next(n for n in NUMBERS if n != number)
    assert await claim(bot, free, 404) == {"error": NOT_HELD}
    assert await claim(bot, UNKNOWN, 404) == {"error": NOT_HELD}
    # The transfer fails: the number is given back, and its context with it.
    await post(bot, caller.status({"state": "failed", "message": "busy"}))
    await bot.app[BOT_KEY].engine.settled()  # the release follows the commit
    assert await claim(bot, number, 404) == {"error": NOT_HELD}
    assert await claimed_steps(bot, caller) == []


async def pool_status(bot: TestClient[Any, Any], number: str) -> PoolStatus:
    store = bot.app[STORE_KEY]
    return await PoolStore(store.redis, store.keys).status("agents", [number])


async def until_lapsed(bot: TestClient[Any, Any], number: str) -> Any:
    """Ask for ``number``'s context until its lease has run out (by Redis time): the answer then."""
    for _ in range(200):
        response = await bot.get(f"/api/pool/{number}/context", headers=AGENT)
        if response.status != 200:
            assert response.status == 404, await response.text()
            return await response.json()
        await asyncio.sleep(0.05)
    pytest.fail(f"the lease on {number} never lapsed")


async def test_a_claimed_number_lapses_after_the_pools_grace(
    serve: Serve, channel: ChannelStandIn, tmp_path: Path
) -> None:
    bot = await serve(CALLFLOW_FILE=warm_flow_file(tmp_path, grace_seconds=0.5), AGENT_RATE_LIMIT=100_000)
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    await claim(bot, number)  # the first claim brings the lease to end within the grace
    assert await until_lapsed(bot, number) == {"error": NOT_HELD}
    # A claimed lease that ran out is no lapse (it was not left behind): the number is free.
    assert await pool_status(bot, number) == PoolStatus(free=1, leased=0, claimed=0, lapsed=0)
    assert len(await claimed_steps(bot, caller)) == 1


async def test_a_connected_transfers_number_lapses_after_the_grace_unclaimed(
    serve: Serve, channel: ChannelStandIn, tmp_path: Path
) -> None:
    bot = await serve(CALLFLOW_FILE=warm_flow_file(tmp_path, grace_seconds=0.5), AGENT_RATE_LIMIT=100_000)
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    await post(bot, caller.status({"state": "accepted"}))
    await bot.app[BOT_KEY].engine.settled()
    for _ in range(200):  # watched without claiming: the lease runs out the grace after the connect
        if (await pool_status(bot, number)).free:
            break
        await asyncio.sleep(0.05)
    assert await pool_status(bot, number) == PoolStatus(free=1, leased=0, claimed=0, lapsed=0)
    assert await claim(bot, number, 404) == {"error": NOT_HELD}
    assert await claimed_steps(bot, caller) == []


async def test_a_lapsed_lease_is_a_404(serve: Serve, channel: ChannelStandIn, tmp_path: Path) -> None:
    """A lease nobody gave back (its instance died mid-transfer: here, its watchdog is not due
    to be looked at for 10 s) lapses by Redis time, and its number holds no call."""
    flow = warm_flow_file(tmp_path, timeout_seconds=0.3, grace_seconds=0.3)
    bot = await serve(CALLFLOW_FILE=flow, SCHEDULER_POLL_SECONDS=10)
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    for _ in range(200):  # watched without claiming
        if (await pool_status(bot, number)).lapsed:
            break
        await asyncio.sleep(0.05)
    assert await pool_status(bot, number) == PoolStatus(free=0, leased=0, claimed=0, lapsed=1)
    assert await claim(bot, number, 404) == {"error": NOT_HELD}
    assert await claimed_steps(bot, caller) == []


@pytest.mark.parametrize(
    "number",
    [
        "14255550150",  # no +
        "%2B04255550150",  # no country code starts with 0
        "%2B123456",  # too short
        "%2B1425555015012345",  # 16 digits
        "%2B1425555O150",  # a letter O
        "%2B1%20425%20555%200150",  # spaced
        "%2B%D9%A1%D9%A4%D9%A2%D9%A5%D9%A5%D9%A5%D9%A5%D9%A0%D9%A1%D9%A5%D9%A0",  # Arabic-Indic digits
        "%2B14255550150%00",
    ],
)
async def test_a_number_that_is_not_e164_is_a_400(
    bot: TestClient[Any, Any], channel: ChannelStandIn, number: str
) -> None:
    held = await transfer(bot, Caller(channel.url))
    assert "E.164" in (await claim(bot, number, 400))["error"]
    assert await pool_status(bot, held) == PoolStatus(free=0, leased=1, claimed=0, lapsed=0)


@pytest.mark.parametrize("agent", ["<script>", "a" * 65, "ana\nbob", "ana;drop", "\u202eana"])
async def test_a_bad_agent_name_is_a_400_and_claims_nothing(
    bot: TestClient[Any, Any], channel: ChannelStandIn, agent: str
) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    assert "agent:" in (await claim(bot, number, 400, agent=agent))["error"]
    assert await pool_status(bot, number) == PoolStatus(free=0, leased=1, claimed=0, lapsed=0)
    assert await claimed_steps(bot, caller) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": AGENT_TOKEN},  # no scheme
        {"Authorization": f"Basic {AGENT_TOKEN}"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {AGENT_TOKEN}x"},
        {"Authorization": f"Bearer {AGENT_TOKEN[:-1]}"},
        OPERATOR,  # the operator's token opens the operator API only
        # A Bot Framework channel token is no agent token.
        {"Authorization": "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJib3QifQ.c2ln"},
    ],
)
async def test_without_the_agent_token_there_is_no_context(
    bot: TestClient[Any, Any], channel: ChannelStandIn, headers: dict[str, str]
) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    for asked in (number, UNKNOWN, "not-a-number"):  # the same 401 whatever is asked for
        response = await bot.get(f"/api/pool/{asked}/context", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="agent"'
        assert "AGENT_TOKEN" in (await response.json())["error"]
    assert await pool_status(bot, number) == PoolStatus(free=0, leased=1, claimed=0, lapsed=0)
    assert await claimed_steps(bot, caller) == []


async def test_the_agent_token_opens_no_operator_route(bot: TestClient[Any, Any]) -> None:
    for path in ("/api/calls", "/api/stats", "/metrics"):
        assert (await bot.get(path, headers=AGENT)).status == 401, path


async def test_a_client_gets_agent_rate_limit_requests_a_minute_bad_tokens_included(
    serve: Serve, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [time.time()]  # the limit counts per epoch minute: hold the clock in one
    monkeypatch.setattr(agent_api, "time", SimpleNamespace(time=lambda: now[0]))
    bot = await serve(AGENT_RATE_LIMIT=5)
    number = await transfer(bot, Caller(channel.url))
    wrong = {"Authorization": "Bearer wrong-token"}
    for _ in range(3):
        await claim(bot, number, 401, headers=wrong)
    await claim(bot, UNKNOWN, 404)
    context = await claim(bot, number)  # the 5th of the minute

    for headers in (AGENT, wrong, {}):  # the 6th, 7th, 8th: refused before the token is looked at
        response = await bot.get(f"/api/pool/{number}/context", headers=headers)
        assert response.status == 429, await response.text()
        # Until the client's next minute, by the same clock the count is kept by.
        assert int(response.headers["Retry-After"]) == 60 - int(now[0]) % 60
        assert (await response.json())["error"] == "more than 5 requests a minute"
    store = bot.app[STORE_KEY]
    counter = store.keys.agent_requests("127.0.0.1", int(now[0]) // 60)
    assert await store.redis.get(counter) == "8"  # counted in Redis, for every instance
    assert 0 < await store.redis.ttl(counter) <= agent_api.CLAIMS_KEPT_SECONDS

    now[0] += 60  # the next minute: a new count
    assert await claim(bot, number) == context


async def test_the_limit_is_one_count_across_instances(
    serve: Serve, bot_redis: dict[str, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not bot_redis["REDIS_URL"]:
        pytest.skip("each bot on the embedded Redis has a Redis of its own")
    now = [time.time()]
    monkeypatch.setattr(agent_api, "time", SimpleNamespace(time=lambda: now[0]))
    one, other = await serve(AGENT_RATE_LIMIT=5), await serve(AGENT_RATE_LIMIT=5)
    number = await transfer(one, Caller(channel.url))
    for bot in (one, other, one, other):
        await claim(bot, number)
    await claim(other, number, 401, headers={"Authorization": "Bearer wrong-token"})
    for bot in (one, other):
        assert (await bot.get(f"/api/pool/{number}/context", headers=AGENT)).status == 429


async def test_with_no_agent_token_there_is_no_context_api_and_no_page(
    serve: Serve, channel: ChannelStandIn
) -> None:
    bot = await serve(AGENT_TOKEN=None)
    number = await transfer(bot, Caller(channel.url))  # pooled transfers still go
    for path in (f"/api/pool/{number}/context", f"/api/pool/{UNKNOWN}/context", "/agent"):
        assert (await bot.get(path, headers=AGENT)).status == 404, path


def test_the_agent_token_must_not_be_the_operators(agent_env: None) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(AGENT_TOKEN=OPERATOR_TOKEN, OPERATOR_TOKEN=OPERATOR_TOKEN)
    assert "AGENT_TOKEN" in str(caught.value) and OPERATOR_TOKEN not in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # as read from a secret file, newline and all
        load_settings(AGENT_TOKEN=f"{OPERATOR_TOKEN}\n", OPERATOR_TOKEN=OPERATOR_TOKEN)
    assert "AGENT_TOKEN" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_settings(AGENT_TOKEN="short")
    assert "AGENT_TOKEN" in str(caught.value) and "short" not in str(caught.value)


def test_the_agent_token_equal_to_the_operators_stops_start_up(
    agent_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_TOKEN", OPERATOR_TOKEN)
    monkeypatch.setenv("OPERATOR_TOKEN", OPERATOR_TOKEN)
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError) as caught:
        create_app()
    assert "AGENT_TOKEN" in str(caught.value)


async def test_a_head_request_claims_nothing(bot: TestClient[Any, Any], channel: ChannelStandIn) -> None:
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    response = await bot.head(f"/api/pool/{number}/context", headers=AGENT)
    assert response.status == 405  # a claim is a side effect: GET only
    assert await claimed_steps(bot, caller) == []
    await claim(bot, number)
    assert len(await claimed_steps(bot, caller)) == 1


async def test_the_page_is_served_locked_down(bot: TestClient[Any, Any]) -> None:
    response = await bot.get("/agent")  # the page holds no data: it asks for the token
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["Content-Security-Policy"] == AGENT_PAGE_CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert "<html" in (await response.text()).lower()


@pytest.fixture
async def bot_without_redis(
    key_prefix: str, tmp_path: Path, agent_env: None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    """A bot whose Redis does not answer (nothing listens on port 1)."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(
        REDIS_URL="redis://127.0.0.1:1/0",
        REDIS_TIMEOUT_SECONDS=1,
        REDIS_KEY_PREFIX=key_prefix,
        VARIABLES_KEYS=Fernet.generate_key().decode(),
        AGENT_TOKEN=AGENT_TOKEN,
        CALLFLOW_FILE=warm_flow_file(tmp_path),
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    await client.close()


@pytest.mark.parametrize("headers", [AGENT, {"Authorization": "Bearer wrong-token"}, {}])
async def test_redis_unreachable_is_a_503(
    bot_without_redis: TestClient[Any, Any], headers: dict[str, str]
) -> None:
    for number in (NUMBERS[0], UNKNOWN):
        response = await bot_without_redis.get(f"/api/pool/{number}/context", headers=headers)
        assert response.status == 503, await response.text()
        assert response.headers["Retry-After"] == "1"
        assert "temporarily unavailable" in (await response.json())["error"]
    assert (await bot_without_redis.get("/agent")).status == 200  # the page needs no Redis


class Outage(ReplyDroppingProxy):
    """The proxy in front of the real Redis, stopped and started again on its port: Redis
    going away and coming back, for this test's bot only (the server is shared)."""

    async def restart(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)


@asynccontextmanager
async def proxied_bot(
    proxy_for: Callable[[int], ProxyT], key_prefix: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[ProxyT, TestClient[Any, Any]]]:
    """A bot on the real Redis through the proxy ``proxy_for`` makes for the server's port,
    with the example flow, both tokens, a sealing key and ``settings``: the proxy and the
    bot, both started. Afterwards both are stopped and the test's keys deleted."""
    real = await real_redis_or_skip()
    proxy = await proxy_for(real.connection_pool.connection_kwargs["port"]).start()
    bot = TestClient(
        TestServer(
            create_app(
                load_settings(
                    REDIS_URL=proxy.url,
                    REDIS_KEY_PREFIX=key_prefix,
                    VARIABLES_KEYS=Fernet.generate_key().decode(),
                    AGENT_TOKEN=AGENT_TOKEN,
                    OPERATOR_TOKEN=OPERATOR_TOKEN,
                    CALLFLOW_FILE=warm_flow_file(tmp_path),
                    **settings,
                )
            )
        )
    )
    await bot.start_server()
    try:
        yield proxy, bot
    finally:
        await proxy.stop()
        await delete_prefix(real, key_prefix)
        await real.aclose()
        await bot.close()


@pytest.mark.real_redis
async def test_redis_stopping_mid_call_is_a_503_and_the_claim_works_once_it_is_back(
    key_prefix: str, tmp_path: Path, agent_env: None, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    async with proxied_bot(
        lambda port: Outage(port, sha="none"), key_prefix, tmp_path, REDIS_TIMEOUT_SECONDS=1
    ) as (proxy, bot):
        caller = Caller(channel.url)
        number = await transfer(bot, caller)
        await proxy.stop()  # Redis is gone
        for headers in (AGENT, {}):
            response = await bot.get(f"/api/pool/{number}/context", headers=headers)
            assert response.status == 503, await response.text()
            assert response.headers["Retry-After"] == "1"
        await proxy.restart()  # and back: nothing was claimed while it was away
        await claim(bot, number)
        assert len(await claimed_steps(bot, caller)) == 1


@pytest.mark.real_redis
async def test_a_claim_whose_reply_was_lost_is_still_recorded_once(
    key_prefix: str, tmp_path: Path, agent_env: None, channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim script runs but its reply is lost with the connection: redis-py runs it
    again, and that run finds the number claimed already. The claim is still the first."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    sha = sha1(POOL_SCRIPT.encode()).hexdigest()
    async with proxied_bot(lambda port: ReplyDroppingProxy(port, sha), key_prefix, tmp_path) as (proxy, bot):
        caller = Caller(channel.url)
        number = await transfer(bot, caller)
        proxy.drop_evalsha_replies = 1
        context = await claim(bot, number)
        assert proxy.dropped == 1 and context["number"] == number
        steps = await claimed_steps(bot, caller)
        assert len(steps) == 1 and "claimed by ana from 127.0.0.1" in steps[0]
        assert await claim(bot, number) == context
        assert await claimed_steps(bot, caller) == steps


async def test_a_claim_whose_record_failed_is_recorded_by_the_next(
    bot: TestClient[Any, Any], channel: ChannelStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails after the number was claimed, as the claim is written to the call's
    history: a 503, and the agent's next try (the page retries) records it."""
    caller = Caller(channel.url)
    number = await transfer(bot, caller)
    engine = bot.app[BOT_KEY].engine
    handle = engine.handle
    failures = [StoreUnavailable("Redis unavailable while committing a turn: lost")]

    async def failing_once(conversation_id: str, event: Any, **kwargs: Any) -> Any:
        if isinstance(event, ContextClaimed) and failures:
            raise failures.pop()
        return await handle(conversation_id, event, **kwargs)

    monkeypatch.setattr(engine, "handle", failing_once)
    assert "temporarily unavailable" in (await claim(bot, number, 503))["error"]
    assert await claimed_steps(bot, caller) == []
    await claim(bot, number, agent="bo")
    steps = await claimed_steps(bot, caller)
    assert len(steps) == 1 and "claimed by bo from 127.0.0.1" in steps[0]
    await claim(bot, number)
    assert await claimed_steps(bot, caller) == steps
