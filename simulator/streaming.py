"""The channel's side of the streaming transport: activities to the bots over WebSockets.

The Telephony channel opens a WebSocket to the bot (``GET /api/messages``) and sends every
activity of a call as a streaming request on it; the bot sends its replies back on the same
socket. ``SocketBots`` does that in place of ``simulator.call.Bots``: a call keeps to the
socket its first activity took (new calls take the sockets in turn, so with several bot
URLs, sockets to several instances carry calls at once), and the replies arriving on any
socket are recorded by the same ``ChannelStandIn`` as replies posted over HTTP. When a
socket drops, it is opened again to the next bot, as the channel reconnects, and an
activity that was cut off is sent again there (same id: the bot applies it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any
from urllib.parse import unquote

import aiohttp

from adapters.framing import CONTENT_TYPE, Request, Response, new_id
from adapters.streaming import ConnectionClosed, StreamingConnection
from simulator.call import TURN_SECONDS, Bots, Tally
from simulator.channel import ChannelStandIn

# What streaming activities carry as serviceUrl: not http(s), so replies go over the socket.
# (The Telephony channel's own value is not public; Direct Line Speech uses this form.)
SERVICE_URL = "urn:botframework:websocket:telephony"


class _Socket:
    """One WebSocket to a bot, opened again (to the next bot) when it drops."""

    def __init__(self, owner: SocketBots, index: int) -> None:
        self.owner, self.index = owner, index
        self.connection: StreamingConnection | None = None
        self.url = ""
        self._reader: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def open(self) -> StreamingConnection:
        async with self._opening:
            if self.connection is not None and not self.connection.closing:
                return self.connection
            self.url = self.owner.next_url()
            ws_url = self.url.replace("http", "ws", 1)
            ws = await self.owner.session.ws_connect(ws_url, headers=self.owner.headers, autoping=True)
            self.connection = StreamingConnection(ws, self.owner.answer, name=f"channel-{self.index}")
            self._reader = asyncio.create_task(self.connection.run(), name=f"channel socket {self.index}")
            return self.connection

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close(1000, "done")
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


class SocketBots(Bots):
    """The bots, reached over streaming sockets: ``post`` as over HTTP, same answers."""

    def __init__(
        self,
        urls: list[str],
        session: aiohttp.ClientSession,
        channel: ChannelStandIn,
        tally: Tally | None = None,
        *,
        sockets: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(urls, session, tally)
        self._next_url = itertools.cycle(self.urls)
        self.channel = channel
        self.headers = headers or {}
        self.sockets = [_Socket(self, index) for index in range(max(1, sockets * len(urls)))]
        self._next_socket = itertools.cycle(self.sockets)
        self._calls: dict[str, _Socket] = {}  # conversation -> the socket it keeps to
        self.reconnects = 0

    def next_url(self) -> str:
        return next(self._next_url)

    async def close(self) -> None:
        await asyncio.gather(*(socket.close() for socket in self.sockets))

    async def post(self, activity: dict[str, Any]) -> int:
        """Send one activity on its call's socket; the bot's status (0: not reached)."""
        conversation = str((activity.get("conversation") or {}).get("id", ""))
        socket = self._calls.get(conversation)
        if socket is None:
            socket = self._calls[conversation] = next(self._next_socket)
        body = json.dumps(activity).encode()
        started = time.perf_counter()
        for attempt in (1, 2):  # a socket that dropped is opened again, once
            try:
                connection = await socket.open()
                self.sent[socket.url] += 1
                request = Request(new_id(), "POST", "/api/messages", body, CONTENT_TYPE)
                response = await connection.request(request, TURN_SECONDS)
                break
            except (ConnectionClosed, aiohttp.ClientError, OSError, TimeoutError) as e:
                error = e
                if attempt == 2 or isinstance(e, TimeoutError):
                    return self.unreached(e)
                self.reconnects += 1
        else:  # pragma: no cover - the loop always breaks or returns
            raise AssertionError(error)
        return self.answered(response.status, response.body or b"", started)

    async def answer(self, connection: StreamingConnection, request: Request) -> Response:
        """The channel's answer to what a bot sends on a socket: a reply to a call."""
        parts = request.path.split("?", 1)[0].strip("/").split("/")
        if request.verb != "POST" or len(parts) not in (4, 5) or parts[:2] != ["v3", "conversations"]:
            return Response(request.id, 404, b'{"error":"not a conversation activities path"}', CONTENT_TYPE)
        status, body = await self.channel.take(unquote(parts[2]), request.body or b"")
        return Response(request.id, status, json.dumps(body).encode(), CONTENT_TYPE)
