"""Headless Chromium for tests: one Debian Chromium per session, a fresh page per test.

tests/conftest.py loads this module as a pytest plugin, so every test can ask for:

``browser_page`` (async, function scope) -> ``playwright.async_api.Page``
    A new page in a new browser context (no cookies, storage or cache shared with other
    tests), driven by the async playwright API in the test's own event loop. The page may
    reach loopback only: any other request is aborted, and it, like any uncaught
    JavaScript error on the page, fails the test at teardown. Point it at a server the
    test started on a free loopback port, for example a dashboard served by the bot::

        from playwright.async_api import Page, expect

        async def test_dashboard_lists_calls(browser_page: Page, bot_url: str) -> None:
            await browser_page.goto(f"{bot_url}/dashboard")
            await expect(browser_page.get_by_role("row", name="demo-call")).to_be_visible()

    Or give it content directly: ``await browser_page.set_content(html)``,
    ``await browser_page.add_script_tag(path=...)``.

``chromium`` (session scope) -> ``Chromium``
    The browser process behind every page, started on first use and stopped at the end.

Chromium is Debian's ``chromium`` (scripts/ensure-browser installs it; ``CHROMIUM`` names
another binary): playwright's own browser download cannot be used here. Without it the
tests that need it skip, and fail under CI=true. Sync playwright cannot run inside the
asyncio loop pytest-asyncio gives each test, and playwright objects belong to the loop
that made them, so the session shares the process only: each test connects to it over
the DevTools protocol (a loopback port) from its own loop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Page, Route, async_playwright

from tests.servers import IN_CI

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
START_TIMEOUT_SECONDS = 30.0


def chromium_executable() -> str:
    """The Chromium binary, or skip (fail under CI=true) when this machine has none."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if path is None or not os.access(path, os.X_OK):
        message = f"Chromium is not installed ({path or 'no chromium on PATH'}): run scripts/ensure-browser"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


class Chromium:
    """One headless Chromium process with a DevTools endpoint on loopback."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log: IO[bytes] | None = None

    @property
    def cdp_url(self) -> str:
        """What ``playwright.chromium.connect_over_cdp`` takes."""
        assert self.port is not None, "Chromium is not started"
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Chromium's stderr so far, for failure messages."""
        return (self.workdir / "chromium.log").read_text(errors="replace")

    def start(self) -> Chromium:
        profile = self.workdir / "profile"
        port_file = profile / "DevToolsActivePort"
        self._log = (self.workdir / "chromium.log").open("wb")
        command = [self.executable, *CHROMIUM_ARGS, f"--user-data-dir={profile}", "about:blank"]
        # Its own process group, so ``stop`` can reach the renderers and zygote it forks.
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2:  # the port, then the browser's websocket path: written whole
                self.port = int(lines[0])
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Chromium did not start ({' '.join(command)}):\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """The session's headless Chromium, started on first use."""
    browser = Chromium(chromium_executable(), tmp_path_factory.mktemp("chromium")).start()
    try:
        yield browser
    finally:
        browser.stop()


@dataclass
class PageWatch:
    """What a page did that a test does not expect: requests off loopback, uncaught errors."""

    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def loopback_only(self, route: Route) -> None:
        url = urlsplit(route.request.url)
        if url.scheme in ("http", "https") and url.hostname not in LOOPBACK_HOSTS:
            self.blocked.append(route.request.url)
            await route.abort("blockedbyclient")  # before it is sent: nothing leaves the machine
        else:
            await route.continue_()


@asynccontextmanager
async def open_page(chromium: Chromium) -> AsyncIterator[tuple[Page, PageWatch]]:
    """A page in a context of its own on ``chromium``, and what it is caught doing."""
    watch = PageWatch()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.connect_over_cdp(chromium.cdp_url)
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            await context.route("**/*", watch.loopback_only)
            page = await context.new_page()
            page.on("pageerror", lambda error: watch.errors.append(str(error)))
            yield page, watch
        finally:
            await context.close()
            await browser.close()  # a CDP connection: this disconnects, the process stays


@pytest.fixture
async def browser_page(chromium: Chromium) -> AsyncIterator[Page]:
    """A fresh page that may reach loopback only (see the module docstring)."""
    async with open_page(chromium) as (page, watch):
        yield page
    if watch.blocked:
        pytest.fail(f"the page tried to leave loopback: {', '.join(watch.blocked)}")
    if watch.errors:
        pytest.fail(f"uncaught JavaScript errors on the page: {'; '.join(watch.errors)}")
