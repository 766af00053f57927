"""HTTP routes: the channel's ``/api/messages`` and the load balancer's health checks.

botbuilder 4.17.1's ``CloudAdapter.process`` answers several malformed requests with
500 (no content type, bad JSON, a body that is not an object). Requests are checked
here first, so a client's mistake is a 4xx with a reason and never reaches the bot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Any

from aiohttp import web
from botbuilder.core import Bot, serializer_helper
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import Activity
from botframework.connector.auth import AuthenticateRequestResult
from msrest.exceptions import DeserializationError  # type: ignore[attr-defined]
from msrest.serialization import Model

from adapters.activity_json import activity_from_json
from adapters.auth import Unauthorized
from adapters.bot import TURN_BOUND, TurnBound
from adapters.channel_client import is_streaming
from adapters.store import RedisCallStore
from orchestrator.errors import CommitConflict, StoreUnavailable
from orchestrator.metrics import Metrics
from orchestrator.scheduler import Scheduler

log = logging.getLogger(__name__)

ADAPTER_KEY = web.AppKey("adapter", CloudAdapter)
BOT_KEY = web.AppKey("bot", Bot)
STORE_KEY = web.AppKey("store", RedisCallStore)
SCHEDULER_KEY = web.AppKey("scheduler", Scheduler)
METRICS_KEY = web.AppKey("metrics", Metrics)
DRAINING_KEY = web.AppKey("draining", asyncio.Event)  # set when the instance starts shutting down

# The channel waits 15 s for its answer: a turn not committed in TURN_SECONDS is answered
# 503 (it redelivers); a committed turn's replies not said by SAY_SECONDS are kept.
TURN_SECONDS = 12.0
SAY_SECONDS = 14.0
MAX_BODY_BYTES = 256 * 1024  # an activity is a few KB; larger bodies are refused with 413
BODY_READ_SECONDS = 10.0  # a body still arriving after this is cut off with 408

# Fields we read, and the JSON type each must have when present.
_OBJECT_FIELDS = ("from", "recipient", "conversation")
_STRING_FIELDS = ("id", "channelId", "serviceUrl", "text", "name", "locale")
# Only a body with a \uD800-\uDFFF escape can decode to a lone surrogate (which cannot
# be stored or sent); the full check runs just for those.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def problem(status: int, reason: str, **headers: str) -> web.Response:
    """An error response with its reason, as JSON."""
    return web.json_response({"error": reason}, status=status, headers=headers or None)


def locked_page(body: bytes, policy: str) -> web.Response:
    """A static page of the bot's (the dashboard, the agent's): under its Content Security
    Policy, never sniffed, cached or followed by a referrer."""
    return web.Response(
        body=body,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def bearer_is(request: web.Request, expected: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <expected>``, compared in
    constant time."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogates: encode them back, never fail.
    offered = given.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(offered, expected)


def parse_activity(body: bytes, content_type: str) -> Activity | web.Response:
    """The activity in a request body, or the 4xx response that says what is wrong."""
    if content_type != "application/json":
        return problem(415, f"Content-Type must be application/json, not {content_type!r}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return problem(400, f"malformed JSON: {e}")
    except RecursionError:
        return problem(400, "malformed JSON: nested too deeply")
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(data):
        return problem(400, "malformed JSON: a \\u escape is an unpaired surrogate, not a character")
    if not isinstance(data, dict):
        return problem(400, f"the body must be an activity object, not a JSON {type(data).__name__}")
    reason = _activity_problem(data)
    if reason:
        return problem(400, reason)
    try:
        activity = activity_from_json(data)  # Activity().deserialize(data), without msrest's cost
    except (DeserializationError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        # ArithmeticError: msrest's int(Infinity) (an OverflowError) escapes its own errors.
        return problem(400, f"not a valid activity: {e}")
    except RecursionError:
        return problem(400, "not a valid activity: nested too deeply")
    return activity


def _has_lone_surrogate(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _activity_problem(data: dict[str, Any]) -> str:
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        return "activity 'type' must be a non-empty string"
    for name in _OBJECT_FIELDS:
        if name in data and data[name] is not None and not isinstance(data[name], dict):
            return f"activity '{name}' must be an object"
    for name in _STRING_FIELDS:
        if name in data and data[name] is not None and not isinstance(data[name], str):
            return f"activity '{name}' must be a string"
    conversation_id = (data.get("conversation") or {}).get("id")
    if not isinstance(conversation_id, str) or not conversation_id:
        return "activity 'conversation.id' must be a non-empty string"
    if not data.get("channelId"):
        # The SDK checks a token's key is endorsed for the activity's channel only when
        # the activity names one: without it, a key of any channel would do.
        return "activity 'channelId' is required"
    if not data.get("serviceUrl"):
        return "activity 'serviceUrl' is required: replies are posted to it"
    members = data.get("membersAdded")
    if members is not None and (
        not isinstance(members, list) or not all(isinstance(m, dict) for m in members)
    ):
        return "activity 'membersAdded' must be a list of objects"
    return ""


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /api/messages``: one activity from the channel."""
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        content_type = request.content_type
    except (IndexError, ValueError):
        # aiohttp parses the header with CPython's email parser, which raises IndexError
        # on some parameters (``application/json;a*``): a 500 until this.
        return problem(400, "malformed Content-Type header")
    parsed = parse_activity(body, content_type)
    if isinstance(parsed, web.Response):
        return parsed
    if is_streaming(parsed.service_url):
        return problem(
            400,
            f"serviceUrl {parsed.service_url!r} is not http(s): a streaming channel sends its "
            "activities over its WebSocket (GET /api/messages), where the replies go too",
        )
    metrics = request.app[METRICS_KEY]
    with metrics.turn_seconds.time():
        response = await _turn(request, parsed)
    if response.status == 503:
        metrics.unavailable.inc()
    return response


async def _read_body(request: web.Request) -> bytes | web.Response:
    """The request body, or a 413 (too big, refused before it is read) or a 408 (too slow)."""
    too_big = f"the body is over {MAX_BODY_BYTES} bytes; an activity is a few KB"
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return problem(413, too_big)  # unread; aiohttp discards the rest for a few seconds, then closes
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            return await request.read()  # stops with 413 past client_max_size (chunked bodies)
    except web.HTTPRequestEntityTooLarge:
        return problem(413, too_big)
    except TimeoutError:
        # Answer, then close: aiohttp would otherwise linger for seconds reading the rest.
        response = problem(408, f"the body did not arrive within {BODY_READ_SECONDS} s")
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
        return response


def unauthorized(reason: str) -> web.Response:
    return problem(
        401,
        f"missing or invalid channel token: {reason}",
        **{"WWW-Authenticate": 'Bearer realm="api/messages"'},
    )


async def _turn(request: web.Request, parsed: Activity) -> web.StreamResponse:
    """Authenticate, then run the activity through the bot; the response for the channel."""
    adapter = request.app[ADAPTER_KEY]
    # The channel gives a turn 15 s; answer before that, so it redelivers rather than
    # giving up (a turn cut short here was either committed or not at all).
    deadline = asyncio.get_running_loop().time() + TURN_SECONDS
    # Authenticated first, on its own and outside the turn's timeout: only this step
    # answers 401, so nothing a turn raises is taken for a bad token, and a wait for the
    # signing keys ends in 401 (adapters.auth.AUTH_SECONDS), not 503. (None, not "", for
    # a missing header: the SDK's parameterised path fails on "" with a 500.)
    try:
        authenticated = await adapter.bot_framework_authentication.authenticate_request(
            parsed, request.headers.get("Authorization")
        )
    except Unauthorized as e:
        log.info("activity %s refused: %s", parsed.id, e.reason)
        return unauthorized(e.reason)
    return await answer_activity(request.app, authenticated, parsed, deadline)


def not_applied(parsed: Activity, error: Exception) -> web.Response:
    """A 503 for an activity Redis could not take: the channel redelivers it."""
    log.warning("activity %s not applied, the channel will redeliver: %s", parsed.id, error)
    return problem(503, "call state is temporarily unavailable; retry", **{"Retry-After": "1"})


async def answer_activity(
    app: web.Application, authenticated: AuthenticateRequestResult, parsed: Activity, deadline: float
) -> web.Response:
    """Run an authenticated activity through the bot by ``deadline`` (event loop time); the
    answer for the channel, whichever way the activity came (a POST, or the socket)."""
    adapter, bot = app[ADAPTER_KEY], app[BOT_KEY]
    try:
        async with asyncio.timeout_at(deadline) as bound:
            # The bot lifts the bound once the turn is committed (``adapters.bot.taken``).
            token = TURN_BOUND.set(TurnBound(bound, deadline - TURN_SECONDS + SAY_SECONDS))
            try:
                invoke_response = await adapter.process_activity(authenticated, parsed, bot.on_turn)
            finally:
                TURN_BOUND.reset(token)
    except TimeoutError:
        log.warning(
            "activity %s not answered within %s s; the channel will redeliver", parsed.id, TURN_SECONDS
        )
        return problem(503, "the turn took too long; retry", **{"Retry-After": "1"})
    except (StoreUnavailable, CommitConflict) as e:
        return not_applied(parsed, e)
    if invoke_response:
        body = invoke_response.body
        # expectReplies hands back a plain dict, which botbuilder's own helper cannot serialise.
        data = serializer_helper(body) if isinstance(body, Model) else body
        return web.json_response(data=data, status=invoke_response.status)
    return web.Response(status=201)


async def healthz(request: web.Request) -> web.Response:
    """The process is up."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The process can serve calls: Redis answers, and it is not shutting down."""
    if request.app[DRAINING_KEY].is_set():
        return problem(503, "shutting down")
    if await request.app[STORE_KEY].ping():
        return web.json_response({"status": "ready"})
    return problem(503, "Redis is not reachable")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/messages", messages)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
