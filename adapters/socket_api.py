"""The channel's streaming connection: the WebSocket upgrade on ``GET /api/messages``,
and the requests the channel sends on it.

botbuilder-python 4.17.1's streaming stack does not survive a real call (it cannot read
the channel's answers, corrupts bodies over 4 KB, loses bytes when frames are merged or
split, and never fails a send; see docs/streaming.md). This replaces it at the socket,
and keeps the rest of the SDK: the channel's token is checked at the upgrade by the
SDK's authentication, and each activity runs through ``CloudAdapter.process_activity``
with the same checks and answers as a POST.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging

from aiohttp import web
from botbuilder.core import __version__ as botbuilder_version
from botbuilder.schema import ActivityTypes
from botframework.connector.auth import AuthenticateRequestResult

from adapters import framing
from adapters.auth import Unauthorized
from adapters.channel_client import is_streaming
from adapters.connections import Connections
from adapters.framing import Request, Response
from adapters.http import (
    ADAPTER_KEY,
    DRAINING_KEY,
    METRICS_KEY,
    TURN_SECONDS,
    answer_activity,
    parse_activity,
    problem,
    unauthorized,
)
from adapters.streaming import StreamingConnection
from orchestrator.errors import StoreUnavailable

log = logging.getLogger(__name__)

CONNECTIONS_KEY = web.AppKey("connections", Connections)
HEARTBEAT_SECONDS = 20.0  # a WebSocket ping this often finds a peer that vanished without a close
HOLD_SECONDS = 2.0  # recording a call's socket: past this, its next activity records it
MAX_MESSAGE_BYTES = 2 * framing.MAX_BODY_BYTES  # one WebSocket message: several payloads at most
MESSAGES_PATH = "/api/messages"
VERSION_PATH = "/api/version"
USER_AGENT = f"callflow-orchestrator (botbuilder-python {botbuilder_version})"
_numbers = itertools.count(1)


async def upgrade(request: web.Request) -> web.StreamResponse:
    """``GET /api/messages``: authenticate, upgrade, then serve the socket until it closes."""
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_MESSAGE_BYTES)
    if not ws.can_prepare(request).ok:
        return problem(400, "GET /api/messages is the WebSocket upgrade; send activities with POST")
    connections = request.app[CONNECTIONS_KEY]
    if request.app[DRAINING_KEY].is_set():
        return problem(503, "this instance is shutting down; connect again", **{"Retry-After": "1"})
    try:
        authenticated = await request.app[
            ADAPTER_KEY
        ].bot_framework_authentication.authenticate_streaming_request(
            request.headers.get("Authorization"), request.headers.get("channelid")
        )
    except Unauthorized as e:
        log.info("streaming connection refused before the upgrade: %s", e.reason)
        return unauthorized(e.reason)
    await ws.prepare(request)
    if request.app[DRAINING_KEY].is_set():  # began shutting down while this one was upgraded
        await ws.close(code=1012, message=b"restarting")
        return ws
    name = f"{connections.instance}/{next(_numbers)}"
    connection = StreamingConnection(ws, functools.partial(_serve, request.app, authenticated), name=name)
    serving = asyncio.create_task(_carry(connections, connection, request.remote), name=f"socket {name}")
    connections.keep(serving)
    # aiohttp may cancel this handler (at shutdown, or when the peer goes with
    # handler_cancellation on); the socket's own task still finishes its turns and lets go
    # of its calls.
    await asyncio.shield(serving)
    return ws


async def _carry(connections: Connections, connection: StreamingConnection, peer: str | None) -> None:
    """Serve one socket until it closes, then let go of the calls it carried."""
    connections.attach(connection)
    log.info("socket %s opened from %s", connection.name, peer)
    try:
        await connection.run()
    finally:
        await connections.detach(connection)
        log.info(
            "socket %s closed (code %s): %d calls carried, %d still live",
            connection.name,
            connection.ws.close_code,
            connection.carried,
            len(connection.conversations),
        )


async def _serve(
    app: web.Application,
    authenticated: AuthenticateRequestResult,
    connection: StreamingConnection,
    request: Request,
) -> Response:
    """The answer to one request from the channel: an activity, or a clear 4xx."""
    path = "/" + request.path.split("?", 1)[0].lstrip("/")
    if path.lower() == VERSION_PATH and request.verb.upper() == "GET":  # the .NET channel side's keep-alive
        return _framed(request, web.json_response({"userAgent": USER_AGENT}))
    if path != MESSAGES_PATH:
        return _framed(
            request, problem(404, f"no such path {request.path!r}; activities go to {MESSAGES_PATH}")
        )
    if request.verb.upper() != "POST":
        return _framed(request, problem(405, f"{request.verb} {MESSAGES_PATH}: activities are POSTed"))
    if request.body is None:
        return _framed(request, problem(400, "the request has no body: an activity is expected"))
    # The body is JSON whatever its stream says: .NET describes a JSON body as text/plain,
    # and no SDK reads the type of an activity's stream.
    parsed = parse_activity(request.body, "application/json")
    if isinstance(parsed, web.Response):
        return _framed(request, parsed)
    deadline = asyncio.get_running_loop().time() + TURN_SECONDS
    metrics, connections = app[METRICS_KEY], app[CONNECTIONS_KEY]
    call = parsed.conversation.id
    over_socket = is_streaming(parsed.service_url)  # an http(s) one is answered over HTTP
    with metrics.turn_seconds.time():
        if over_socket:
            connections.route_here(call, connection)
        answer = await answer_activity(app, authenticated, parsed, deadline)
        if over_socket and answer.status < 300:
            if parsed.type == ActivityTypes.end_of_conversation:
                connections.forget(call, connection)
            else:
                await _hold(connections, call, connection)
    if answer.status == 503:
        metrics.unavailable.inc()
    return _framed(request, answer)


async def _hold(connections: Connections, call: str, connection: StreamingConnection) -> None:
    """Record the call's socket in Redis once its turn is taken (not for an activity the
    bot refused); a failure leaves it to the call's next activity, the turn stands. Its
    own bound: the turn's replies may have used all of the turn's."""
    try:
        async with asyncio.timeout(HOLD_SECONDS):
            await connections.hold(call, connection)
    except (StoreUnavailable, TimeoutError) as e:
        log.warning("call %s: its socket not recorded (next activity tries again): %s", call, e)


def _framed(request: Request, answer: web.Response) -> Response:
    """An HTTP answer as the streaming response to ``request``: same status and body, but
    200 for an activity taken (every SDK answers 200 on the socket; a POST gets 201)."""
    body = answer.body if isinstance(answer.body, bytes) and answer.body else None
    if answer.status == 201 and body is None:
        return Response(request.id, 200)
    if answer.status >= 400 and body is not None:
        log.info(
            "socket request %s %s answered %d: %s", request.verb, request.path, answer.status, _reason(body)
        )
    return Response(request.id, answer.status, body, answer.content_type if body is not None else "")


def _reason(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return ""


def add_socket_routes(app: web.Application, connections: Connections) -> None:
    app[CONNECTIONS_KEY] = connections
    app.router.add_get(MESSAGES_PATH, upgrade)
