"""One streaming connection: the channel's WebSocket, carrying requests both ways.

The bot's side of an accepted socket; the simulator's channel uses the same session over
the socket it opens.

The channel sends each activity as a request and waits for its answer; the bot sends
its replies as requests on the same socket and reads the channel's answers. Any number
of calls share a socket, and each request is handled in a task of its own, so a slow
turn on one call delays no other. Every send has a bound; when the socket goes, the
sends still waiting fail at once, and the turns still running finish on their own
(their replies that could not be sent stay in the outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, web

from adapters.framing import CONTENT_TYPE, Deframer, FramingError, Request, Response, encode

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024  # requests from the channel handled at once on one socket; more get 503
WRITE_SECONDS = 10.0  # a peer that reads nothing for this long is cut off (its buffers are full)

Handler = Callable[["StreamingConnection", Request], Awaitable[Response]]


class ConnectionClosed(ConnectionError):
    """The socket is gone (or going): nothing more can be sent on it."""


class StreamingConnection:
    """The protocol session over one accepted WebSocket."""

    def __init__(
        self, ws: web.WebSocketResponse | ClientWebSocketResponse, handle: Handler, *, name: str
    ) -> None:
        self.ws = ws
        self.name = name  # for logs: which socket
        self._handle = handle
        self._deframer = Deframer()
        self._waiting: dict[str, asyncio.Future[Response]] = {}  # request id -> its answer
        self._turns: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()  # a header and its payload go out back to back
        self.conversations: set[str] = set()  # the live calls this socket holds
        self.carried = 0  # calls it held, ended or not, since it opened
        self.closing = False
        self.draining = False  # shutting down: new requests get 503, those in flight finish

    @property
    def busy(self) -> int:
        """Requests from the channel being handled now."""
        return len(self._turns)

    async def run(self) -> None:
        """Read until the socket closes; then fail waiting sends and let turns finish."""
        try:
            async for message in self.ws:
                if message.type is WSMsgType.BINARY:
                    try:
                        received = self._deframer.feed(message.data)
                    except FramingError as e:
                        log.warning("socket %s: %s; closing it", self.name, e)
                        await self.close(WSCloseCode.PROTOCOL_ERROR, "protocol error")
                        break
                    except Exception:  # a bug of ours: this socket goes, no other
                        log.exception("socket %s: reading failed; closing it", self.name)
                        await self.close(WSCloseCode.INTERNAL_ERROR, "internal error")
                        break
                    for item in received:
                        self._dispatch(item)
                elif message.type is WSMsgType.TEXT:
                    log.warning("socket %s: a text message; the protocol is binary; closing it", self.name)
                    await self.close(WSCloseCode.UNSUPPORTED_DATA, "binary messages only")
                    break
        except (ConnectionError, TimeoutError) as e:  # the peer vanished mid-read
            log.info("socket %s: cut off: %r", self.name, e)
        finally:
            self.closing = True
            self._fail_waiting()
            # Turns end by their own bounds (the turn's, a send's, a write's); waited for,
            # never cancelled, even if this task is.
            await self.drain()

    def _dispatch(self, item: Request | Response) -> None:
        if isinstance(item, Response):
            waiter = self._waiting.get(item.id)
            if waiter is not None and not waiter.done():
                waiter.set_result(item)
            else:  # answered after its sender gave up, or a second answer to one request
                log.debug(
                    "socket %s: an answer to no waiting request (%s, %d)", self.name, item.id, item.status
                )
            return
        refused = "shutting down; send it again on another socket" if self.draining else ""
        if len(self._turns) >= MAX_IN_FLIGHT:
            refused = "too many requests in flight on this socket; retry"
        task = asyncio.create_task(self._answer(item, refused), name=f"socket {self.name} request {item.id}")
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    async def _answer(self, request: Request, refused: str = "") -> None:
        try:
            if refused:
                response = Response(request.id, 503, json.dumps({"error": refused}).encode(), CONTENT_TYPE)
            else:
                response = await self._handle(self, request)
        except Exception:
            log.exception("socket %s: request %s %s failed", self.name, request.verb, request.path)
            response = Response(request.id, 500, b'{"error":"the bot failed on this request"}')
        try:
            await self._send(encode(response))
        except ConnectionClosed:
            log.info("socket %s: request %s answered after the socket closed", self.name, request.id)

    async def request(self, request: Request, seconds: float) -> Response:
        """Send ``request`` and wait (at most ``seconds``) for the channel's answer.

        A 202 without a body is provisional: .NET 4.21.1+ peers answer 202 at once and
        the final status later, under the same id. The final one is awaited for the rest
        of the bound; a peer that never sends one has still accepted the request."""
        if self.closing:
            raise ConnectionClosed(f"socket {self.name} is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiting[request.id] = waiter
        accepted: Response | None = None
        try:
            async with asyncio.timeout(seconds):
                await self._send(encode(request))
                while True:
                    answer = await waiter
                    if answer.status != 202 or answer.body:
                        return answer
                    accepted = answer
                    waiter = self._waiting[request.id] = loop.create_future()
        except (TimeoutError, ConnectionClosed):
            if accepted is not None:  # taken: no final answer came, or the socket went first
                return accepted
            raise
        finally:
            self._waiting.pop(request.id, None)

    async def _send(self, frames: list[bytes]) -> None:
        """Write one message's frames; a sender that gives up (a timeout, a cancelled turn)
        does not stop the write half-way, which would leave the peer a header without its
        payload and break the socket for every call on it."""
        writing = asyncio.ensure_future(self._write(frames))
        writing.add_done_callback(_retrieve)
        await asyncio.shield(writing)

    async def _write(self, frames: list[bytes]) -> None:
        async with self._write_lock:
            if self.ws.closed:
                raise ConnectionClosed(f"socket {self.name} is closed")
            try:
                async with asyncio.timeout(WRITE_SECONDS):
                    for frame in frames:
                        await self.ws.send_bytes(frame)
            except ConnectionError as e:  # aiohttp: "Cannot write to closing transport"
                raise ConnectionClosed(f"socket {self.name}: {e}") from e
            except TimeoutError as e:
                # The peer reads nothing: a close would wait on the same full buffer, and
                # aiohttp's heartbeat only closes the transport, which never wakes a write.
                self._abort()
                raise ConnectionClosed(f"socket {self.name}: the peer stopped reading") from e

    def _abort(self) -> None:
        """Drop the TCP connection at once (aiohttp has no public way to abort a socket)."""
        transport = getattr(getattr(self.ws, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()

    def _fail_waiting(self) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(
                    ConnectionClosed(f"socket {self.name} closed before the channel answered")
                )
                # Retrieved by its sender; marked so a sender that already left leaves no warning.
                waiter.exception()
        self._waiting.clear()

    async def drain(self) -> None:
        """Take no new requests (503) and wait, without cancelling them, for those being
        handled to be answered."""
        self.draining = True
        while self._turns:
            await asyncio.wait(set(self._turns))

    async def close(self, code: int = WSCloseCode.GOING_AWAY, message: str = "") -> None:
        self.closing = True
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.ws.close(code=code, message=message.encode())


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a write's outcome seen: its sender may have stopped waiting for it."""
    if not task.cancelled():
        task.exception()
