"""The operator dashboard in a real browser, against the real bot on the real Redis.

Calls are made the way the channel makes them (activities posted to /api/messages); the
page must show what /api/stats, /api/transitions and /api/machine say about them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from playwright.async_api import Page, expect

from adapters.http import STORE_KEY
from adapters.keys import CallField
from adapters.pool import PoolStore
from app import create_app
from orchestrator.callflow import load_callflow
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import REAL_REDIS_URL, delete_prefix, real_redis_or_skip

pytestmark = pytest.mark.real_redis

TOKEN = "t0ken-dashboard-3f9a"
TOKEN_KEY = "cc-operator-token"  # the page's sessionStorage key
TARGET = "+14251231234"
DEFAULT_FLOW = Path(__file__).parents[1] / "orchestrator" / "flows" / "transfer-sample.yaml"
WARM_FLOW = DEFAULT_FLOW.with_name("warm-transfer.yaml")  # its queue leases from pool "agents"
# Caller-controlled text that would run script if the page ever parsed it as HTML.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"> busy"


def without_watchdog(source: Path, tmp_path: Path) -> Path:
    """A copy of the flow in ``source`` whose watchdog never moves a call mid-test."""
    flow = yaml.safe_load(source.read_text())
    flow["queues"]["agents"]["timeout_seconds"] = 3600
    flow_file = tmp_path / "callflow.yaml"
    flow_file.write_text(yaml.safe_dump(flow))
    return flow_file


async def serve_flow(
    source: Path, tmp_path: Path, key_prefix: str, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot running the flow in ``source``, with the operator API on, served on a
    loopback port."""
    for name in ("MicrosoftAppId", "MicrosoftAppPassword", "REDIS_URL", "OPERATOR_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    await (await real_redis_or_skip()).aclose()
    app = create_app(
        load_settings(
            REDIS_URL=REAL_REDIS_URL,
            REDIS_KEY_PREFIX=key_prefix,
            OPERATOR_TOKEN=TOKEN,
            CALLFLOW_FILE=without_watchdog(source, tmp_path),
            **settings,
        )
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
    await client.close()


@pytest.fixture
async def bot(
    tmp_path: Path, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    async for client in serve_flow(DEFAULT_FLOW, tmp_path, key_prefix, monkeypatch):
        yield client


@pytest.fixture
async def warm_bot(
    tmp_path: Path, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot on the warm-transfer flow: a pool of three numbers."""
    keys = Fernet.generate_key().decode()
    async for client in serve_flow(WARM_FLOW, tmp_path, key_prefix, monkeypatch, VARIABLES_KEYS=keys):
        yield client


async def post(bot: TestClient[Any, Any], activity: dict[str, Any]) -> None:
    response = await bot.post("/api/messages", json=activity)
    assert response.status == 201, await response.text()


async def api(bot: TestClient[Any, Any], path: str) -> Any:
    response = await bot.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, await response.text()
    return await response.json()


async def record_csp_violations(page: Page) -> None:
    """The page runs under the bot's Content-Security-Policy: anything it blocks is a bug."""
    await page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation', "
        "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )


async def csp_violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("window.__csp")
    return found


async def sign_in(page: Page, token: str) -> None:
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", token)
    await page.click("#login button[type=submit]")


async def expect_counts(page: Page, calls: dict[str, int]) -> None:
    """Every state's tile and diagram box shows the count /api/stats gives."""
    for state, count in calls.items():
        await expect(page.locator(f'#tiles [data-tile="{state}"] .value')).to_have_text(str(count))
        await expect(page.locator(f'#diagram [data-state="{state}"] .count')).to_have_text(str(count))


async def test_the_dashboard_shows_the_calls_in_redis_and_follows_them(
    bot: TestClient[Any, Any], channel: ChannelStandIn, browser_page: Page, tmp_path: Path
) -> None:
    page = browser_page
    # Two calls with the bot (at the first menu, and at billing), one ringing an agent,
    # one whose transfer failed.
    chatting = Caller(channel.url)
    await post(bot, chatting.say("hello"))
    await post(bot, Caller(channel.url).say("1"))
    ringing, failed = Caller(channel.url), Caller(channel.url)
    await post(bot, ringing.say("agent"))
    await post(bot, failed.say("agent"))
    await post(bot, failed.status({"state": "failed", "message": HOSTILE}))

    stats = await api(bot, "/api/stats?window=1h")
    assert stats["calls"] == {"bot": 2, "transferring": 1, "accepted": 0, "failed": 1, "ended": 0}
    assert stats["nodes"] == {"billing": 1, "main": 1}
    machine = await api(bot, "/api/machine")

    await record_csp_violations(page)
    await page.goto(str(bot.make_url("/dashboard?refresh=0.5")))

    # A wrong token: refused, forgotten, and the form is back with the reason.
    await sign_in(page, "not-the-token")
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None

    await sign_in(page, TOKEN)
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#updated")).to_contain_text("Last updated")
    await expect_counts(page, stats["calls"])
    await expect(page.locator("#pools-card")).to_be_hidden()  # this flow has no pools

    # The diagram is drawn from /api/machine: every state, every arrow, the self-loops.
    boxes = page.locator("#diagram [data-state]")
    assert await boxes.evaluate_all("els => els.map(e => e.dataset.state)") == machine["states"]
    arrows = page.locator("#diagram g.edge[data-source]")
    drawn = await arrows.evaluate_all("els => els.map(e => [e.dataset.source, e.dataset.dest])")
    assert sorted(drawn) == sorted([t["source"], t["dest"]] for t in machine["transitions"])
    assert any(source == dest for source, dest in drawn)
    labels = await page.locator("#diagram g.label").all_inner_texts()
    assert len(labels) == len(machine["transitions"])
    # Ranked by distance from the initial state: bot leftmost, ended rightmost.
    xs = dict(await boxes.evaluate_all("els => els.map(e => [e.dataset.state, e.getBoundingClientRect().x])"))
    assert xs[machine["initial"]] == min(xs.values()) and xs[machine["final"]] == max(xs.values())
    assert xs["bot"] < xs["transferring"] < xs["failed"] < xs["ended"]

    # Transfers per target, as /api/stats counts them.
    (row,) = stats["targets"]
    assert (row["target"], row["started"], row["failed"], row["success_rate"]) == (TARGET, 2, 1, 0)
    target_row = page.locator("#targets tbody tr", has_text=TARGET)
    await expect(target_row.locator("td")).to_have_text([TARGET, "2", "0", "1", "0", "0", "0%"])
    # ... and per queue: the flow's one queue took them all.
    (row,) = stats["queues"]
    assert (row["queue"], row["started"], row["failed"]) == ("agents", 2, 1)
    await expect(page.locator("#queues tbody tr td")).to_have_text(["agents", "2", "0", "1", "0", "0", "0%"])
    columns = ["Started", "Accepted", "Failed", "Timeout", "Late accepted", "Success rate"]
    await expect(page.locator("#queues thead th")).to_have_text(["Queue", *columns])
    await expect(page.locator("#targets thead th")).to_have_text(["Target", *columns])

    # Calls with the bot, per node of the flow.
    await expect_nodes(page, stats["nodes"])

    # The failed transfer in the recent transitions, the caller's text shown as text.
    fail_row = page.locator("#transitions tbody tr", has_text=failed.conversation_id).filter(
        has_text="transferring \u2192 failed"
    )
    await expect(fail_row.locator("td").nth(2)).to_have_text("fail")
    await expect(fail_row.locator("td").nth(3)).to_have_text("transferring \u2192 failed")
    await expect(fail_row.locator("td").nth(4)).to_have_text(HOSTILE)
    assert await page.locator("#app img").count() == 0
    assert await page.title() != "pwned"

    # A reload keeps the token for the browser session: no form.
    await page.reload()
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()
    await expect_counts(page, stats["calls"])
    # ...in this tab only (sessionStorage): another tab of the same browser asks again.
    other = await page.context.new_page()
    await other.goto(str(bot.make_url("/dashboard")))
    await expect(other.locator("#login")).to_be_visible()
    await other.close()

    # A transition made after the page loaded shows up on a refresh, without a reload.
    await page.evaluate("window.__still_this_page = true")  # gone if the page reloads
    await post(bot, ringing.status({"state": "accepted"}))
    after = await api(bot, "/api/stats?window=1h")
    assert (after["calls"]["transferring"], after["calls"]["accepted"]) == (0, 1)
    await expect_counts(page, after["calls"])
    newest = page.locator("#transitions tbody tr").first
    await expect(newest).to_contain_text(ringing.conversation_id)
    await expect(newest.locator("td").nth(3)).to_have_text("transferring \u2192 accepted")
    # A call that moves on to another node moves in the nodes table too.
    await post(bot, chatting.say("1"))
    assert (await api(bot, "/api/stats?window=1h"))["nodes"] == {"billing": 2}
    await expect_nodes(page, {"billing": 2})
    assert await page.evaluate("window.__still_this_page") is True

    assert await csp_violations(page) == []
    screenshot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")


async def expect_nodes(page: Page, nodes: dict[str, int]) -> None:
    """The nodes table shows each node's live calls as /api/stats gives them, the busiest first."""
    rows = page.locator("#nodes tbody tr")
    busiest = sorted(nodes.items(), key=lambda item: (-item[1], item[0]))
    await expect(rows.locator("td:nth-child(1)")).to_have_text([node for node, _ in busiest])
    await expect(rows.locator("td:nth-child(2)")).to_have_text([str(count) for _, count in busiest])


async def test_an_api_failure_shows_a_banner_until_the_api_answers_again(
    bot: TestClient[Any, Any], browser_page: Page
) -> None:
    """Redis down makes the API answer 503; the page says so and keeps polling."""
    page = browser_page
    await page.goto(str(bot.make_url("/dashboard?refresh=0.5")))
    await sign_in(page, TOKEN)
    await expect(page.locator("#updated")).to_contain_text("Last updated")
    await expect(page.locator("#banner")).to_be_hidden()

    # The shared Redis cannot be stopped under other tests: the browser stands in for
    # the bot's 503 (the same body the API gives when Redis is unreachable).
    async def unavailable(route: Any) -> None:
        await route.fulfill(status=503, json={"error": "Redis is not reachable"})

    await page.route(re.compile(r".*/api/stats\b.*"), unavailable)
    await expect(page.locator("#banner")).to_be_visible()
    await expect(page.locator("#banner")).to_contain_text("503")
    await expect(page.locator("#banner")).to_contain_text("Redis is not reachable")
    await expect(page.locator("#login")).to_be_hidden()

    await page.unroute(re.compile(r".*/api/stats\b.*"))
    await expect(page.locator("#banner")).to_be_hidden()
    await expect(page.locator("#updated")).to_contain_text("Last updated")


async def test_the_api_refuses_the_dashboard_without_the_token(bot: TestClient[Any, Any]) -> None:
    """The page itself holds no data; every API call needs the bearer token."""
    page = await bot.get("/dashboard")
    assert page.status == 200 and page.content_type == "text/html"
    assert "Content-Security-Policy" in page.headers
    for path in ("/api/stats?window=1h", "/api/transitions?limit=20", "/api/machine"):
        response = await bot.get(path)
        assert response.status == 401, path
        response = await bot.get(path, headers={"Authorization": "Bearer wrong"})
        assert response.status == 401, path


async def expect_pool(page: Page, name: str, in_use: str, free: int, lapsed: int, queues: str) -> None:
    row = page.locator(f'#pools tbody tr[data-pool="{name}"]')
    await expect(row.locator('[data-figure="in-use"]')).to_have_text(in_use)
    await expect(row.locator('[data-figure="free"]')).to_have_text(str(free))
    await expect(row.locator('[data-figure="lapsed"]')).to_have_text(str(lapsed))
    await expect(row.locator('[data-figure="queues"]')).to_have_text(queues)


async def test_the_pools_panel_shows_the_numbers_in_use(
    warm_bot: TestClient[Any, Any], channel: ChannelStandIn, browser_page: Page
) -> None:
    bot, page = warm_bot, browser_page
    await record_csp_violations(page)
    await page.goto(str(bot.make_url("/dashboard?refresh=0.5")))
    await sign_in(page, TOKEN)
    await expect(page.locator("#pools-card")).to_be_visible()
    await expect(page.locator("#pools thead th")).to_have_text(
        ["Pool", "In use", "Use", "Free", "Lapsed", "Queues"]
    )
    await expect_pool(page, "agents", "0 of 3", free=3, lapsed=0, queues="agents")

    # Two callers transferred through the pool (one's context claimed by the agent side),
    # shown on a refresh, without a reload.
    await page.evaluate("window.__still_this_page = true")
    callers = [Caller(channel.url) for _ in range(2)]
    for caller in callers:
        await post(bot, caller.say("agent"))
    store = bot.app[STORE_KEY]
    pools = PoolStore(store.redis, store.keys, store.sealer)
    answered = (await store.record(callers[0].conversation_id))[CallField.TARGET]
    assert await pools.claim("agents", answered) is not None
    figures = (await api(bot, "/api/pools"))["pools"]["agents"]
    assert (figures["leased"], figures["claimed"], figures["free"]) == (1, 1, 1)
    await expect_pool(page, "agents", "2 of 3", free=1, lapsed=0, queues="agents")
    used = page.locator('#pools tbody tr[data-pool="agents"] [data-figure="in-use"]')
    await expect(used).to_have_attribute("title", "1 leased (ringing), 1 claimed by the agent side")

    # The last number leased by an instance that died: it lapses (not in use, not free).
    numbers = load_callflow(WARM_FLOW).pools["agents"].numbers
    assert await pools.lease("agents", numbers, "dead-call", "t", 0.2) is not None
    await expect_pool(page, "agents", "2 of 3", free=0, lapsed=1, queues="agents")
    bar = page.locator('#pools tbody tr[data-pool="agents"] .bar')
    await expect(bar).to_have_class("bar")
    # A third caller's transfer leases it again: every number in use.
    third = Caller(channel.url)
    await post(bot, third.say("agent"))
    assert (await store.record(third.conversation_id))[CallField.TARGET] == numbers[2]
    await expect_pool(page, "agents", "3 of 3", free=0, lapsed=0, queues="agents")
    await expect(bar).to_have_class("bar full")
    assert await page.evaluate("window.__still_this_page") is True
    assert await csp_violations(page) == []
