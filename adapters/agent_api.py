"""The agent side of warm transfers: the context API and the screen-pop page.

``GET /api/pool/{number}/context`` hands the agent side the context of the call that holds
a pool number now, and claims it (docs/warm-transfer.md). None of it exists unless
``AGENT_TOKEN`` is set, and only that token opens it (compared in constant time): not the
operator's, not the channel's. Each client (by address) gets ``AGENT_RATE_LIMIT``
requests a minute across all instances, bad tokens included, so the API cannot be used
to guess tokens or to walk the numbers; a number that is free, lapsed or in no pool is
the same ``404``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from importlib import resources

from aiohttp import web

from adapters.http import BOT_KEY, STORE_KEY, bearer_is, locked_page, problem
from adapters.pool import PoolStore
from adapters.store import unavailable_while
from orchestrator.call import timestamp
from orchestrator.callflow import CallFlow
from orchestrator.errors import CommitConflict, StoreUnavailable
from orchestrator.events import ContextClaimed

log = logging.getLogger(__name__)

AGENT_PAGE = resources.files("adapters").joinpath("agent.html")
# The page's script and style are inline; nothing may load from anywhere else.
AGENT_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NUMBER = re.compile(r"\+[1-9][0-9]{6,14}")
AGENT_NAME = re.compile(r"[\w .@-]{1,64}")  # who claims, as the history shows them
NOT_HELD = "no call holds this number now"
CLAIMS_KEPT_SECONDS = 120  # a minute's counter outlives its minute, for clocks a little apart


class AgentApi:
    """The context API's parts: the flow's pools, their store, the token and the limit."""

    def __init__(self, flow: CallFlow, pools: PoolStore, token: str, per_minute: int) -> None:
        self.flow = flow
        self.pools = pools
        self.token = token.encode()
        self.per_minute = per_minute
        self.claims: dict[str, int] = {pool: 0 for pool in flow.pools}  # first claims, since start

    async def over_limit(self, request: web.Request) -> bool:
        """Count this request against its client's minute; whether it is over the limit."""
        store = request.app[STORE_KEY]
        key = store.keys.agent_requests(request.remote or "unknown", int(time.time()) // 60)
        with unavailable_while("counting context requests"):
            async with store.redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, CLAIMS_KEPT_SECONDS)
                count, _ = await pipe.execute()
        return int(count) > self.per_minute


AGENT_KEY = web.AppKey("agent_api", AgentApi)


async def context(request: web.Request) -> web.StreamResponse:
    """``GET /api/pool/{number}/context``: the context of the call holding ``number``, claimed."""
    api: AgentApi = request.app[AGENT_KEY]
    try:
        if await api.over_limit(request):
            left = 60 - int(time.time()) % 60  # until the client's next minute
            return problem(429, f"more than {api.per_minute} requests a minute", **{"Retry-After": str(left)})
        if not bearer_is(request, api.token):
            return problem(
                401,
                "the context API needs Authorization: Bearer <AGENT_TOKEN>",
                **{"WWW-Authenticate": 'Bearer realm="agent"'},
            )
        number = request.match_info["number"].strip()
        if not NUMBER.fullmatch(number):
            return problem(400, "the number must be E.164: + and 7 to 15 digits, e.g. +14255550100")
        by = request.query.get("agent", "").strip()
        if by and not AGENT_NAME.fullmatch(by):
            return problem(400, "agent: up to 64 letters, digits, spaces and . @ _ -")
        pool = api.flow.pool_of_number.get(number)
        if pool is None:
            return problem(404, NOT_HELD)
        lease = await api.pools.claim(pool, number, api.flow.pools[pool].grace_seconds)
        if lease is None or not lease.context:
            if lease is not None:
                log.error("pool %s: the context under a held number cannot be opened (VARIABLES_KEYS?)", pool)
                return problem(503, "the context cannot be read: see the bot's log", **{"Retry-After": "1"})
            return problem(404, NOT_HELD)
        if lease.fresh:
            api.claims[pool] += 1
        # Recorded at every claim, not only the first: the engine applies the claim once (by
        # its activity id), and a first claim may not be seen as one (redis-py reran the claim
        # script after its reply was lost) or its record may fail (a 503 after the claim).
        who = f"{by or 'an agent'} from {request.remote or 'an unknown address'}"
        await request.app[BOT_KEY].engine.handle(
            lease.call,
            ContextClaimed(number, who),
            activity_id=f"claim:{number}:{lease.key}",
            only_if_changed=True,
        )
    except (StoreUnavailable, CommitConflict) as e:
        return problem(503, f"call state is temporarily unavailable: {e}", **{"Retry-After": "1"})
    document = {**json.loads(lease.context), "number": number, "claimed": timestamp(lease.claimed)}
    return web.json_response(document, headers={"Cache-Control": "no-store"})


async def agent_page(request: web.Request) -> web.StreamResponse:
    """``GET /agent``: the screen-pop page; it asks for the token and reads the API with it."""
    return locked_page(AGENT_PAGE.read_bytes(), AGENT_PAGE_CSP)


def add_agent_routes(app: web.Application, api: AgentApi) -> None:
    """Serve the context API and the /agent page on ``app``."""
    app[AGENT_KEY] = api
    # No HEAD: a claim is a side effect, and HEAD must have none.
    app.router.add_get("/api/pool/{number}/context", context, allow_head=False)
    app.router.add_get("/agent", agent_page)
