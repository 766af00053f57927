"""Microsoft's JS ``botframework-streaming`` (4.23.3) playing the Telephony channel in tests.

Our bot speaks the Bot Framework streaming protocol over a WebSocket; testing it only with
our own client would let one misreading of the protocol hide on both ends. ``JsChannel``
runs ``node tests/jspeer/channel.js``, which opens each socket with ``ws`` (so it can send
``Authorization`` and ``channelid``) and talks over it with the library's own
ProtocolAdapter, framing and parsing. Install its packages with ``scripts/ensure-jspeer``.

Usage::

    async with JsChannel() as channel:
        opened = await channel.connect("s1", f"ws://127.0.0.1:{port}/api/messages", headers)
        assert opened["event"] == "connected"
        answer = await channel.send("s1", activity)  # {"event": "response", "status": 200, ...}
        [reply] = await channel.wait_requests(1, "s1")  # what the bot sent back
        await channel.close("s1")
        await channel.wait_disconnected("s1")

Every method that waits raises ``TimeoutError`` (with the last events and Node's stderr)
when the event does not come, and ``JsChannelError`` when channel.js reports an error or
exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

ROOT = Path(__file__).parents[1]
PEER_DIR = ROOT / "tests" / "jspeer"
CHANNEL_JS = PEER_DIR / "channel.js"

Event = dict[str, Any]
Framing = Literal["library", "merged", "split"]

STDERR_TAIL_LINES = 40
STOP_TIMEOUT_SECONDS = 5.0
EVENT_LINE_LIMIT = 64 * 1024 * 1024  # one event line carries a whole request body (asyncio's default: 64 KiB)


class JsChannelError(RuntimeError):
    """channel.js reported an error for a command, or is not running."""


class JsChannel:
    """One channel.js process: any number of sockets, each with its own streaming session.

    Events are kept in arrival order in ``events``; each wait looks only at events that
    came after its command was written, so reusing a socket name cannot match old events.
    """

    def __init__(self, node: str | None = None) -> None:
        self.node = node or shutil.which("node") or "node"
        self.events: list[Event] = []
        self.stderr_lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._exited = False
        self._rids = itertools.count(1)

    async def __aenter__(self) -> JsChannel:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Spawn channel.js; fails at once, saying what to run, if its packages are missing."""
        if not (PEER_DIR / "node_modules" / "botframework-streaming").is_dir():
            raise JsChannelError(f"{PEER_DIR / 'node_modules'} is missing: run scripts/ensure-jspeer")
        if shutil.which(self.node) is None:
            raise JsChannelError(f"Node.js ({self.node}) is not installed: run scripts/ensure-jspeer")
        self._proc = await asyncio.create_subprocess_exec(
            self.node,
            str(CHANNEL_JS),
            cwd=PEER_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=EVENT_LINE_LIMIT,
        )
        self._tasks = [
            asyncio.create_task(self._read_events(), name="jspeer-stdout"),
            asyncio.create_task(self._read_stderr(), name="jspeer-stderr"),
        ]

    async def stop(self) -> None:
        """Close stdin so channel.js closes its sockets (1001) and exits; kill it if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
            with contextlib.suppress(ConnectionError):
                await proc.stdin.wait_closed()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            proc.kill()  # only our own child, by its handle
            await proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._proc = None

    # Commands -------------------------------------------------------------------------

    async def connect(self, socket: str, url: str, headers: dict[str, str], *, trace: bool = False) -> Event:
        """Open ``socket``: returns its ``connected``, ``refused`` or ``error`` event.

        ``trace`` adds a ``message`` event (size, base64) for every WebSocket message the
        bot sends, for tests about how the bot frames its payloads.
        """
        start = await self._command(
            {"cmd": "connect", "socket": socket, "url": url, "headers": headers, "trace": trace}
        )
        return await self._wait_event(
            lambda e: e.get("socket") == socket and e["event"] in ("connected", "refused", "error"),
            start,
            15,
            f"{socket} to connect",
            errors_of=socket,
        )

    async def send(
        self,
        socket: str,
        body: Any = None,
        *,
        path: str = "/api/messages",
        verb: str = "POST",
        framing: Framing = "library",
        timeout: float = 15,  # noqa: ASYNC109 - seconds to wait for this request's answer
    ) -> Event:
        """Send one streaming request; returns its ``response`` or ``send_failed`` event.

        ``body=None`` sends no body stream. ``framing``: "library" frames as the library
        does (header and payload as separate WebSocket messages); "merged" puts request
        header, payload, stream header and body in one message; "split" cuts those same
        bytes into 7-byte messages.
        """
        rid = f"r{next(self._rids)}"
        command: Event = {
            "cmd": "send",
            "socket": socket,
            "rid": rid,
            "verb": verb,
            "path": path,
            "framing": framing,
        }
        if body is not None:
            command["body"] = body
        start = await self._command(command)
        return await self._wait_event(
            lambda e: e.get("rid") == rid and e["event"] in ("response", "send_failed"),
            start,
            timeout,
            f"the answer to {verb} {path} on {socket}",
            errors_of=socket,
        )

    async def raw(self, socket: str, messages: list[bytes]) -> Event:
        """Write each buffer as its own binary WebSocket message, bypassing the library.

        Returns the ``raw_sent`` event: ``failed`` counts the writes the socket refused
        (the bot may close it on the first bad message), with the first ``message``.
        """
        encoded = [base64.b64encode(m).decode("ascii") for m in messages]
        start = await self._command({"cmd": "raw", "socket": socket, "messages": encoded})
        return await self._wait_ack(
            socket, start, lambda e: e["event"] == "raw_sent", "raw messages to be sent"
        )

    async def answer(
        self,
        socket: str,
        *,
        status: int = 200,
        delay_ms: int | None = None,
        provisional: int | None = None,
        silent: bool = False,
        close_after: int | None = None,
        close_code: int | None = None,
    ) -> None:
        """Set how ``socket`` answers the bot's requests from now on.

        2xx final answers carry ``{"id": <uuid>}``. ``provisional`` first sends that status
        with no body, then (after ``delay_ms``) the final one under the same request id.
        ``close_after=n`` closes the socket (``close_code``, default 1000) on the n-th bot
        request from now, unanswered.
        """
        mode: Event = {"status": status}
        optional = {"delay_ms": delay_ms, "provisional": provisional, "close_after": close_after}
        mode.update({k: v for k, v in optional.items() if v is not None})
        if close_code is not None:
            mode["close_code"] = close_code
        if silent:
            mode["silent"] = True
        start = await self._command({"cmd": "answer", "socket": socket, "mode": mode})
        await self._wait_ack(
            socket, start, lambda e: e.get("what") == "answer_set", "the answer mode to be set"
        )

    async def close(self, socket: str, code: int = 1000) -> None:
        """Start a clean close (close frame with ``code``); see ``wait_disconnected``."""
        await self._command({"cmd": "close", "socket": socket, "code": code})

    async def cut(self, socket: str) -> None:
        """Destroy the TCP connection without a close frame, as a dropped network would."""
        await self._command({"cmd": "cut", "socket": socket})

    # Observations ---------------------------------------------------------------------

    def requests(self, socket: str | None = None) -> list[Event]:
        """The bot's requests received so far (on ``socket``, or on all), oldest first."""
        return [e for e in self.events if e["event"] == "request" and socket in (None, e.get("socket"))]

    async def wait_requests(self, count: int, socket: str | None = None, within: float = 10) -> list[Event]:
        """Wait until at least ``count`` bot requests have arrived; returns them all."""
        await self._wait(lambda: len(self.requests(socket)) >= count, within, f"{count} bot requests")
        return self.requests(socket)

    async def wait_disconnected(self, socket: str, within: float = 10) -> Event:
        """The ``disconnected`` event of the latest connection of ``socket`` (code may be None)."""
        starts = [
            i for i, e in enumerate(self.events) if e["event"] == "connected" and e.get("socket") == socket
        ]
        if not starts:
            raise JsChannelError(f"{socket} never connected")
        return await self._wait_event(
            lambda e: e["event"] == "disconnected" and e.get("socket") == socket,
            starts[-1],
            within,
            f"{socket} to disconnect",
        )

    # Plumbing -------------------------------------------------------------------------

    async def _command(self, command: Event) -> int:
        """Write one command line; returns the event index its answer will come after."""
        proc = self._proc
        if proc is None or proc.stdin is None or self._exited:
            raise JsChannelError("channel.js is not running: call start() first")
        start = len(self.events)
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        await proc.stdin.drain()
        return start

    async def _wait_ack(self, socket: str, start: int, match: Callable[[Event], bool], what: str) -> Event:
        return await self._wait_event(
            lambda e: e.get("socket") == socket and match(e), start, 10, what, errors_of=socket
        )

    async def _wait_event(
        self,
        match: Callable[[Event], bool],
        start: int,
        within: float,
        what: str,
        *,
        errors_of: str | None = None,
    ) -> Event:
        """The first event from index ``start`` on that ``match`` accepts.

        With ``errors_of``, an error that channel.js reports for a command on that socket
        after ``start`` fails the wait at once rather than letting it time out.
        """
        found: list[Event] = []

        def ready() -> bool:
            for event in self.events[start:]:
                if match(event):
                    found.append(event)
                    return True
                if (
                    errors_of is not None
                    and event["event"] == "error"
                    and "cmd" in event
                    and event.get("socket") == errors_of
                ):
                    raise JsChannelError(f"channel.js: {event}")
            return False

        await self._wait(ready, within, what)
        return found[0]

    async def _wait(self, ready: Callable[[], bool], within: float, what: str) -> None:
        try:
            async with asyncio.timeout(within), self._changed:
                while not ready():
                    if self._exited:
                        raise JsChannelError(f"channel.js exited while waiting for {what}\n{self._context()}")
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"no {what} within {within}s\n{self._context()}") from None

    def _context(self) -> str:
        recent = "\n".join(json.dumps(e) for e in self.events[-15:])
        stderr = "\n".join(self.stderr_lines[-STDERR_TAIL_LINES:])
        return f"last events:\n{recent}\nchannel.js stderr:\n{stderr}"

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            async for line in stdout:
                text = line.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    event = json.loads(text)
                except ValueError:
                    self.stderr_lines.append(f"(stdout, not JSON) {text}")
                    continue
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._exited = True
                self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for line in self._proc.stderr:
            self.stderr_lines.append(line.decode("utf-8", "replace").rstrip())
