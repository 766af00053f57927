"""The browser fixture keeps pages on loopback and reports uncaught page errors."""

from __future__ import annotations

from aiohttp import web
from playwright.async_api import Page

from tests.browser import Chromium, open_page


async def hello(_: web.Request) -> web.Response:
    return web.Response(text="<p id=hello>hello</p>", content_type="text/html")


async def test_a_page_reaches_loopback_only_and_its_errors_are_caught(chromium: Chromium) -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with open_page(chromium) as (page, watch):
            await page.goto(f"http://127.0.0.1:{port}/")
            assert await page.inner_text("#hello") == "hello"
            # 192.0.2.1 is TEST-NET-1; the request is aborted before it is sent anyway.
            outcome = await page.evaluate(
                "fetch('http://192.0.2.1/x').then(() => 'reached', (e) => 'blocked: ' + e.name)"
            )
            async with page.expect_event("pageerror"):
                await page.evaluate("setTimeout(() => { throw new Error('boom'); })")
        assert outcome == "blocked: TypeError"
        assert watch.blocked == ["http://192.0.2.1/x"]
        assert len(watch.errors) == 1 and "boom" in watch.errors[0], watch.errors
    finally:
        await runner.cleanup()


async def test_browser_page_is_a_working_page(browser_page: Page) -> None:
    await browser_page.set_content("<button onclick=\"this.textContent='pressed'\">press</button>")
    await browser_page.get_by_role("button").click()
    assert await browser_page.inner_text("button") == "pressed"
