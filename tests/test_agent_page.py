"""The agent's screen-pop page (/agent) in a real browser, against the real bot on the real
Redis: it waits for a call on the dialled number, then shows the call's context, once.

Calls are made the way the channel makes them (activities posted to /api/messages), on the
example warm-transfer flow with a pool of one number, so the test knows which number the
transfer dials.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from playwright.async_api import ConsoleMessage, Dialog, Page, Request, Route, expect

from adapters.agent_api import AGENT_PAGE_CSP
from adapters.http import STORE_KEY
from app import create_app
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import BOT_ENVIRONMENT, REAL_REDIS_URL, delete_prefix, real_redis_or_skip
from tests.test_agent_api import AGENT_ENVIRONMENT, AGENT_TOKEN, MASKED_CALLER, post, warm_flow_file

pytestmark = pytest.mark.real_redis

NUMBER = "+14255550150"  # the pool's one number
TOKEN_KEY = "cc-agent-token"  # the page's sessionStorage key
# What the caller says: script, if the page ever parsed it as HTML.
HOSTILE = "<img src=x onerror=alert(1)>"
CONTEXT_API = re.compile(r".*/api/pool/[^/]+/context.*")
POLL_SECONDS = 2  # the page's


@pytest.fixture
async def bot(
    tmp_path: Path, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot with the context API on, served on a loopback port; its pool has one number."""
    for name in (*BOT_ENVIRONMENT, *AGENT_ENVIRONMENT):
        monkeypatch.delenv(name, raising=False)
    await (await real_redis_or_skip()).aclose()
    settings = load_settings(
        REDIS_URL=REAL_REDIS_URL,
        REDIS_KEY_PREFIX=key_prefix,
        VARIABLES_KEYS=Fernet.generate_key().decode(),
        AGENT_TOKEN=AGENT_TOKEN,
        CALLFLOW_FILE=warm_flow_file(tmp_path, numbers=[NUMBER]),
    )
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    yield client
    await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
    await client.close()


class Watch:
    """What the page did: its context requests, dialogs, CSP violations in the console."""

    def __init__(self, page: Page) -> None:
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.on("request", self._request)
        page.on("dialog", self._dialog)
        page.on("console", self._console)

    def _request(self, request: Request) -> None:
        if CONTEXT_API.fullmatch(request.url):
            self.requests.append(request.url)

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        self.console.append(message.text)

    def csp_reports(self) -> list[str]:
        return [text for text in self.console if "Content Security Policy" in text]


async def watch(page: Page) -> Watch:
    """Record what the page does, and the violations its Content-Security-Policy reports."""
    await page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation', "
        "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    return Watch(page)


async def csp_violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("window.__csp")
    return found


async def enter_token(page: Page, token: str) -> None:
    await expect(page.locator("#login-card")).to_be_visible()
    await page.get_by_label("Agent token").fill(token)
    await page.get_by_role("button", name="Use token").click()


async def requests_made(seen: Watch, at_least: int) -> None:
    for _ in range(200):
        if len(seen.requests) >= at_least:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the page made {len(seen.requests)} context requests, not {at_least}")


async def test_the_page_waits_for_the_call_then_shows_its_context_once(
    bot: TestClient[Any, Any], channel: ChannelStandIn, browser_page: Page
) -> None:
    page = browser_page
    seen = await watch(page)
    response = await page.goto(str(bot.make_url(f"/agent?number=%2B{NUMBER[1:]}&agent=ana")))
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == AGENT_PAGE_CSP
    await expect(page.get_by_label("Dialled number")).to_have_value(NUMBER)
    await expect(page.get_by_label("Your name")).to_have_value("ana")

    # No token yet: nothing asked. A wrong one: refused, forgotten, and asked for again.
    await expect(page.locator("#status")).to_be_hidden()
    assert seen.requests == []
    await enter_token(page, "not-the-agent-token")
    await expect(page.locator("#login-error")).to_contain_text("refused")
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    assert len(seen.requests) == 1

    # The token: no call holds the number yet, and the page keeps asking.
    await enter_token(page, AGENT_TOKEN)
    await expect(page.locator("#login-card")).to_be_hidden()
    await expect(page.locator("#status")).to_contain_text("Waiting for the call")
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == AGENT_TOKEN
    await requests_made(seen, 3)
    await expect(page.locator("#context")).to_be_hidden()
    await expect(page.locator("#status")).to_contain_text("Waiting for the call")

    # A call: the caller says something hostile, enters an account number, asks for an agent.
    caller = Caller(channel.url)
    await post(bot, caller.start())
    await post(bot, caller.say(HOSTILE))
    await post(bot, caller.say("account"))
    await post(bot, caller.say("12345678"))
    await post(bot, caller.say("agent"))

    context = page.locator("#context")
    await expect(context).to_be_visible()
    await expect(page.locator("#status")).to_contain_text("is yours")
    await expect(page.locator("#caller")).to_have_text(MASKED_CALLER)
    await expect(page.locator("#queue")).to_have_text("agents")
    await expect(page.locator("#reason")).to_have_text('said "agent"')
    await expect(page.locator("#attempt")).to_have_text("1")
    await expect(page.locator("#dialled")).to_have_text(NUMBER)
    for moment in ("started", "transferred", "claimed"):
        await expect(page.locator(f"#{moment} time")).to_have_attribute("datetime", re.compile(r"^\d{4}-"))
    rows = page.locator("#variables tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.locator("th")).to_have_text("account")
    await expect(rows.locator("td")).to_have_text("12345678")

    said = page.locator("#transcript li.caller .text")
    # The digits entered are the variable's alone: the transcript keeps them masked.
    await expect(said).to_have_text([HOSTILE, "account", "********", "agent"])
    await expect(page.locator("#transcript")).not_to_contain_text("12345678")
    await expect(page.locator("#transcript li.bot").first).to_contain_text("Thank you for calling")
    await expect(page.get_by_role("heading", name="Transcript")).to_be_visible()
    # What the caller said is text: no element was made of it, and nothing ran.
    assert await page.locator("#transcript img, #transcript script").count() == 0
    assert await page.locator("img").count() == 0
    assert seen.dialogs == []

    # Claimed: the page stops asking (two poll periods and more go by without a request).
    claimed = len(seen.requests)
    await asyncio.sleep(2 * POLL_SECONDS + 1)
    assert len(seen.requests) == claimed
    history = [step for _, step in await bot.app[STORE_KEY].history(caller.conversation_id)]
    claims = [step.reason for step in history if step.trigger == "claimed"]
    assert len(claims) == 1 and "claimed by ana from 127.0.0.1" in claims[0]

    assert await csp_violations(page) == []
    assert seen.csp_reports() == []


async def test_the_page_backs_off_and_recovers(bot: TestClient[Any, Any], browser_page: Page) -> None:
    """Too many requests, a bot that does not answer, Redis down, a token no longer good:
    the page says so, waits as told, and carries on (the API's answers are stood in for)."""
    page = browser_page
    seen = await watch(page)
    await page.goto(str(bot.make_url("/agent")))
    await enter_token(page, AGENT_TOKEN)
    await page.get_by_label("Dialled number").fill("+1 (425) 555-0150")
    await page.get_by_role("button", name="Show the caller").click()
    await expect(page.locator("#status")).to_contain_text("Waiting for the call")
    await expect(page.get_by_label("Dialled number")).to_have_value(NUMBER)

    async def answer(status: int, body: dict[str, str], **headers: str) -> None:
        async def fulfil(route: Route) -> None:
            await route.fulfill(status=status, json=body, headers=headers)

        await page.unroute(CONTEXT_API)
        await page.route(CONTEXT_API, fulfil)

    await answer(429, {"error": "more than 5 requests a minute"}, **{"Retry-After": "3"})
    await expect(page.locator("#status")).to_contain_text("Too many requests (429): trying again in 3 s")

    async def unreachable(route: Route) -> None:
        await route.abort("connectionrefused")

    await page.unroute(CONTEXT_API)
    await page.route(CONTEXT_API, unreachable)
    await expect(page.locator("#status")).to_contain_text("Cannot reach the bot", timeout=10_000)

    await answer(503, {"error": "call state is temporarily unavailable"}, **{"Retry-After": "1"})
    await expect(page.locator("#status")).to_contain_text(
        "answered 503: call state is temporarily unavailable", timeout=10_000
    )

    await page.unroute(CONTEXT_API)  # the bot itself again
    await expect(page.locator("#status")).to_contain_text("Waiting for the call", timeout=10_000)

    await answer(401, {"error": "the context API needs Authorization: Bearer <AGENT_TOKEN>"})
    await expect(page.locator("#login-error")).to_contain_text("refused", timeout=10_000)
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    asked = len(seen.requests)
    await asyncio.sleep(POLL_SECONDS + 1)
    assert len(seen.requests) == asked  # no more asking without a token
    assert await csp_violations(page) == []
    assert seen.csp_reports() == []


async def test_a_number_that_is_not_e164_is_refused_before_asking(
    bot: TestClient[Any, Any], browser_page: Page
) -> None:
    page = browser_page
    seen = await watch(page)
    await page.goto(str(bot.make_url("/agent?number=4255550150")))  # no country code
    await expect(page.locator("#lookup-error")).to_contain_text("E.164")
    await expect(page.locator("#login-card")).to_be_visible()
    await enter_token(page, AGENT_TOKEN)
    await expect(page.locator("#status")).to_be_hidden()
    assert seen.requests == []
    # An unencoded + in the query reads as a space: the page puts it back.
    await page.goto(str(bot.make_url(f"/agent?number={NUMBER}")))
    await expect(page.get_by_label("Dialled number")).to_have_value(NUMBER)
    await expect(page.locator("#status")).to_contain_text("Waiting for the call")

    # What the bot refuses (400) it says why, and the page stops asking.
    async def refused(route: Route) -> None:
        await route.fulfill(status=400, json={"error": "agent: up to 64 letters, digits, spaces and . @ _ -"})

    await page.route(CONTEXT_API, refused)
    await expect(page.locator("#lookup-error")).to_contain_text("agent: up to 64 letters", timeout=10_000)
    await expect(page.locator("#status")).to_be_hidden()
    asked = len(seen.requests)
    await asyncio.sleep(POLL_SECONDS + 1)
    assert len(seen.requests) == asked
    assert await csp_violations(page) == []
