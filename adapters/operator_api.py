"""The operator side of the bot's port: a read-only JSON API, ``/metrics`` and the dashboard.

None of it exists unless ``OPERATOR_TOKEN`` is set (every route is then a 404), and
every route but the dashboard page (which holds no data) wants
``Authorization: Bearer <OPERATOR_TOKEN>``, compared in constant time. A channel token
does not open it. What callers said is redacted before it is shown
(``adapters.inspection``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from adapters import inspection
from adapters.http import METRICS_KEY, STORE_KEY, bearer_is, locked_page, problem
from adapters.inspector import CallInspector
from adapters.keys import CallField
from adapters.pool import PoolStatus, PoolStore
from orchestrator.callflow import CallFlow
from orchestrator.errors import StoreUnavailable
from orchestrator.flow_diagram import render as flow_diagram_render
from states import State
from states.diagram import FORMATS, DiagramError, GraphvizMissing, render

INSPECTOR_KEY = web.AppKey("inspector", CallInspector)
TOKEN_KEY = web.AppKey("operator_token", bytes)
FLOW_KEY = web.AppKey("flow", CallFlow)
POOLS_KEY = web.AppKey("pools", PoolStore)  # only when the flow has pools
# The flow's drawings, by format and highlight: each drawn once.
FLOW_DRAWING_KEY = web.AppKey[Callable[[str, str | None], bytes]]("flow_drawing")

MAX_LIST = 1000  # the CLI lists up to 10,000; a page of an HTTP API stays smaller
MAX_TRANSITIONS = 500
CONTENT_TYPES = {
    "mermaid": "text/plain; charset=utf-8",
    "dot": "text/vnd.graphviz; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
}
# The page's script and style are inline; nothing may load from anywhere else.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DASHBOARD = resources.files("adapters").joinpath("dashboard.html")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadQuery(ValueError):
    """A query parameter out of range: a 400 with this reason."""


class NoCall(LookupError):
    """The call a request names is not stored: a 404."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"no call {conversation_id!r} (unknown, or expired)")


def operator_only(handler: Handler) -> Handler:
    """Require the operator's bearer token; answer 503 when Redis fails."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not bearer_is(request, request.app[TOKEN_KEY]):
            return problem(
                401,
                "the operator API needs Authorization: Bearer <OPERATOR_TOKEN>",
                **{"WWW-Authenticate": 'Bearer realm="operator"'},
            )
        try:
            return await handler(request)
        except BadQuery as e:
            return problem(400, str(e))
        except NoCall as e:
            return problem(404, str(e))
        except StoreUnavailable as e:
            return problem(503, f"call state is temporarily unavailable: {e}", **{"Retry-After": "1"})

    return guarded


def _int(request: web.Request, name: str, default: int, top: int) -> int:
    raw = request.query.get(name, str(default))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= top:
        raise BadQuery(f"{name} must be a whole number from 1 to {top}")
    return int(raw)


def _state(request: web.Request) -> str | None:
    state = request.query.get("state") or None
    if state is not None and state not in {s.value for s in State}:
        raise BadQuery(f"state must be one of {', '.join(s.value for s in State)}")
    return state


@operator_only
async def list_calls(request: web.Request) -> web.StreamResponse:
    """``GET /api/calls[?state=&limit=]``"""
    rows = await inspection.list_calls(
        request.app[INSPECTOR_KEY], _state(request), _int(request, "limit", 50, MAX_LIST)
    )
    return web.json_response({"calls": rows})


@operator_only
async def show_call(request: web.Request) -> web.StreamResponse:
    """``GET /api/calls/{id}``"""
    conversation_id = request.match_info["id"]
    call = await inspection.call_details(request.app[INSPECTOR_KEY], conversation_id)
    if call is None:
        raise NoCall(conversation_id)
    return web.json_response(call)


@operator_only
async def stats(request: web.Request) -> web.StreamResponse:
    """``GET /api/stats[?window=1h]``"""
    window = request.query.get("window", "1h")
    try:
        inspection.parse_window(window)
    except ValueError as e:
        raise BadQuery(str(e)) from None
    return web.json_response(await inspection.stats(request.app[INSPECTOR_KEY], window))


@operator_only
async def transitions(request: web.Request) -> web.StreamResponse:
    """``GET /api/transitions[?limit=20]``: the latest steps of any call, newest first."""
    limit = _int(request, "limit", 20, MAX_TRANSITIONS)
    return web.json_response(
        {"transitions": await inspection.recent_transitions(request.app[INSPECTOR_KEY], limit)}
    )


@operator_only
async def pools(request: web.Request) -> web.StreamResponse:
    """``GET /api/pools``: each pool of the flow, its numbers per state now, its grace
    and the queues that lease from it."""
    flow = request.app[FLOW_KEY]
    statuses = await _pool_statuses(request.app)
    return web.json_response(
        {"pools": {name: inspection.pool_figures(flow, name, status) for name, status in statuses.items()}}
    )


async def _pool_statuses(app: web.Application) -> dict[str, PoolStatus]:
    """Each pool's status, by Redis time: one round trip per pool, all at once."""
    flow = app[FLOW_KEY]
    if not flow.pools:
        return {}
    store = app[POOLS_KEY]
    names = list(flow.pools)
    found = await asyncio.gather(*(store.status(name, flow.pools[name].numbers) for name in names))
    return dict(zip(names, found, strict=True))


@operator_only
async def machine(request: web.Request) -> web.StreamResponse:
    """``GET /api/machine``: the state machine as data."""
    return web.json_response(inspection.machine())


@operator_only
async def diagram(request: web.Request) -> web.StreamResponse:
    """``GET /api/diagram[?format=mermaid|dot|svg|png&call=ID]``"""
    fmt = _format(request)
    highlight = await _current(request, CallField.STATE)
    return await _drawn(fmt, functools.partial(_drawing, fmt, highlight))


@operator_only
async def flow_diagram(request: web.Request) -> web.StreamResponse:
    """``GET /api/flow/diagram[?format=mermaid|dot|svg|png&call=ID]``: the call flow this
    bot runs, the call's node highlighted."""
    fmt = _format(request)
    node = await _current(request, CallField.NODE)
    if node is not None and node not in request.app[FLOW_KEY].nodes:  # a flow since changed
        return problem(
            409, f"call {request.query['call']!r} is at node {node!r}: this bot's flow has no such node"
        )
    return await _drawn(fmt, functools.partial(request.app[FLOW_DRAWING_KEY], fmt, node))


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "mermaid")
    if fmt not in FORMATS:
        raise BadQuery(f"format must be one of {', '.join(FORMATS)}")
    return fmt


async def _current(request: web.Request, field: str) -> str | None:
    """``field`` of the record of the ``call`` asked for (its state or node), if one is."""
    if "call" not in request.query:
        return None
    record = await request.app[INSPECTOR_KEY].store.record(request.query["call"])
    if not record:
        raise NoCall(request.query["call"])
    return record.get(field) or None


async def _drawn(fmt: str, draw: Callable[[], bytes]) -> web.StreamResponse:
    try:
        drawing = await asyncio.to_thread(draw)  # Graphviz runs as a process
    except GraphvizMissing as e:
        return problem(501, str(e))
    except DiagramError as e:  # Graphviz failed, or a state this version does not know
        return problem(503, f"the diagram could not be drawn: {e}", **{"Retry-After": "5"})
    return web.Response(body=drawing, headers={"Content-Type": CONTENT_TYPES[fmt]})


@functools.lru_cache(maxsize=64)
def _drawing(fmt: str, highlight: str | None) -> bytes:
    """A diagram depends only on its format and highlight: draw each once."""
    return render(fmt, highlight)


@operator_only
async def prometheus(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text format. With Redis down the instance's own
    metrics are still served, ``cc_calls`` and ``cc_pool_numbers`` left out and
    ``cc_redis_up`` 0."""
    try:
        counts: dict[str, int] | None = await request.app[INSPECTOR_KEY].state_counts()
    except StoreUnavailable:
        counts = None
    numbers: dict[str, dict[str, int]] | None = None
    if counts is not None:  # Redis down: no second wait for it
        try:
            statuses = await _pool_statuses(request.app)
            numbers = {name: dataclasses.asdict(status) for name, status in statuses.items()}
        except StoreUnavailable:
            pass
    body = request.app[METRICS_KEY].exposition(counts, numbers)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def dashboard(request: web.Request) -> web.StreamResponse:
    """``GET /dashboard``: the page; it asks for the token and reads the API with it."""
    return locked_page(DASHBOARD.read_bytes(), DASHBOARD_CSP)


def add_operator_routes(
    app: web.Application, token: str, flow: CallFlow, pool_store: PoolStore | None = None
) -> None:
    """Serve the operator API on ``app``, opened by ``token``; ``flow`` is the call flow
    the bot runs, and ``pool_store`` where its number pools are (required when it has some)."""
    app[TOKEN_KEY] = token.encode()
    app[INSPECTOR_KEY] = CallInspector(app[STORE_KEY])
    app[FLOW_KEY] = flow
    if flow.pools:
        if pool_store is None:
            raise ValueError("the call flow has number pools: give the operator API their store")
        app[POOLS_KEY] = pool_store
    drawing: Callable[[str, str | None], bytes] = functools.lru_cache(maxsize=64)(
        functools.partial(flow_diagram_render, flow)
    )
    app[FLOW_DRAWING_KEY] = drawing
    routes: dict[str, Any] = {
        "/api/calls": list_calls,
        "/api/calls/{id:.+}": show_call,  # ids may hold { } and /
        "/api/stats": stats,
        "/api/transitions": transitions,
        "/api/pools": pools,
        "/api/machine": machine,
        "/api/diagram": diagram,
        "/api/flow/diagram": flow_diagram,
        "/metrics": prometheus,
        "/dashboard": dashboard,
    }
    for path, handler in routes.items():
        app.router.add_get(path, handler)
