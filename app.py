"""The bot's entry point, in the shape of the Bot Framework samples: ``python app.py``."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from aiohttp import web
from botbuilder.integration.aiohttp import (
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
)

from adapters.agent_api import AgentApi, add_agent_routes
from adapters.auth import (
    CheckedAuthentication,
    channel_metadata_url,
    install_key_cache,
    warm_keys,
)
from adapters.bot import CallBot
from adapters.channel_client import PooledAuthentication
from adapters.connections import Connections
from adapters.http import (
    ADAPTER_KEY,
    BOT_KEY,
    DRAINING_KEY,
    MAX_BODY_BYTES,
    METRICS_KEY,
    SAY_SECONDS,
    SCHEDULER_KEY,
    STORE_KEY,
    add_routes,
)
from adapters.keys import Keyspace
from adapters.operator_api import add_operator_routes
from adapters.pool import PoolStore
from adapters.push import Pusher
from adapters.redis_client import connection_problem, create_redis
from adapters.sealing import Sealer
from adapters.socket_api import CONNECTIONS_KEY, add_socket_routes
from adapters.store import RedisCallStore, Retention
from orchestrator.actions import load_actions
from orchestrator.callflow import Action, load_callflow
from orchestrator.config import Settings, load_settings
from orchestrator.engine import Engine
from orchestrator.errors import ConfigError, StoreUnavailable
from orchestrator.metrics import Metrics
from orchestrator.scheduler import Scheduler

log = logging.getLogger("app")

SHUTDOWN_SECONDS = 25.0  # all of a shutdown, inside docker-compose's stop_grace_period of 30 s
CLEANUP_SECONDS = 2.0  # each clean-up step after that
GC_YOUNG_THRESHOLD = 2_000  # allocations between young collections (CPython's default: 700)


def fixed_clock(moment: datetime) -> Callable[[], datetime]:
    """A clock that always reads ``moment`` (``HOURS_CLOCK``)."""
    return lambda: moment


def create_app(config: Settings | None = None) -> web.Application:
    """Build the bot; raises ConfigError for a bad setting or call flow file."""
    CONFIG = config or load_settings()
    FLOW = load_callflow(CONFIG.CALLFLOW_FILE)
    # A transferring call must outlive its watchdog, or nobody hears the retry prompt.
    longest = max(((q.timeout_seconds, name) for name, q in FLOW.queues.items()), default=None)
    for name, seconds in (
        ("CALL_IDLE_TTL_SECONDS", CONFIG.CALL_IDLE_TTL_SECONDS),
        ("CALL_MAX_LIFETIME_SECONDS", CONFIG.CALL_MAX_LIFETIME_SECONDS or None),  # 0: no bound
    ):
        if longest is not None and seconds is not None and 2 * longest[0] > seconds:
            raise ConfigError(
                name, f"must be at least twice queues.{longest[1]}.timeout_seconds ({longest[0]} s)"
            )
    # A timer turn that runs an action must commit before its claim lapses, or another
    # instance claims the timer and runs the user's code again.
    slowest = max(
        ((n.timeout_seconds, name) for name, n in FLOW.nodes.items() if isinstance(n, Action)), default=None
    )
    if slowest is not None and 2 * slowest[0] > CONFIG.SCHEDULER_LEASE_SECONDS:
        raise ConfigError(
            "SCHEDULER_LEASE_SECONDS",
            f"must be at least twice nodes.{slowest[1]}.timeout_seconds ({slowest[0]:g} s): a timer "
            "that runs the action must be done before another instance may claim it",
        )
    keys = CONFIG.VARIABLES_KEYS.get_secret_value() if CONFIG.VARIABLES_KEYS else None
    if keys is None and CONFIG.REDIS_URL is not None and (FLOW.collects_variables or FLOW.pools):
        raise ConfigError(
            "VARIABLES_KEYS",
            "required with REDIS_URL when the call flow collects variables or leases pool "
            "numbers: every instance must open what another sealed (see docs/call-flows.md)",
        )
    # Every authentication failure a 401; signing keys fetched off the event loop.
    install_key_cache()
    AUTH = PooledAuthentication(CheckedAuthentication(ConfigurationBotFrameworkAuthentication(CONFIG)))
    ADAPTER = CloudAdapter(AUTH)
    STORE = RedisCallStore(
        create_redis(CONFIG),
        Keyspace(CONFIG.REDIS_KEY_PREFIX),
        Retention.from_settings(CONFIG),
        Sealer.from_setting(keys),
    )
    METRICS = Metrics()
    # Warm transfers' numbers, leased by every instance from the same pools in Redis.
    POOLS = PoolStore(STORE.redis, STORE.keys, STORE.sealer) if FLOW.pools else None
    # Each warm transfer's context, POSTed (signed) to the agent side, off the call's path.
    PUSHER = (
        Pusher(str(CONFIG.PUSH_URL), CONFIG.PUSH_SECRET.get_secret_value())
        if CONFIG.PUSH_URL is not None and CONFIG.PUSH_SECRET is not None
        else None
    )
    # The streaming sockets of this instance, and the way to other instances' sockets.
    CONNECTIONS = Connections(
        STORE,
        hold_seconds=max(CONFIG.CALL_IDLE_TTL_SECONDS, CONFIG.CALL_MAX_LIFETIME_SECONDS),
        metrics=METRICS,
    )
    AUTH.sockets = CONNECTIONS
    ENGINE = Engine(
        STORE,
        FLOW,
        transcript_max=CONFIG.TRANSCRIPT_MAX_ENTRIES,
        metrics=METRICS,
        cache_size=CONFIG.CALL_CACHE_SIZE,
        clock=fixed_clock(CONFIG.HOURS_CLOCK) if CONFIG.HOURS_CLOCK else None,
        actions=load_actions(FLOW),
        pools=POOLS,
        notify=None if PUSHER is None else lambda event, document: PUSHER.submit(event, dict(document)),
    )
    BOT = CallBot(ENGINE, STORE, ADAPTER, CONFIG.APP_ID)
    SCHEDULER = Scheduler(
        ENGINE,
        STORE,
        BOT,
        poll_seconds=CONFIG.SCHEDULER_POLL_SECONDS,
        lease_seconds=CONFIG.SCHEDULER_LEASE_SECONDS,
    )
    if not CONFIG.APP_ID:
        log.warning(
            "MicrosoftAppId is not set: Bot Framework authentication is OFF and anyone who "
            "can reach this port can post activities or open the streaming WebSocket without a "
            "token. Set MicrosoftAppId/MicrosoftAppPassword "
            "before exposing the bot."
        )

    METRICS.tally(
        "cc_commit_conflicts",
        "Commits lost to a concurrent turn on the call, and rerun",
        lambda: ENGINE.conflicts,
    )
    METRICS.tally(
        "cc_duplicate_activities", "Deliveries of an activity already applied", lambda: ENGINE.duplicates
    )
    METRICS.tally(
        "cc_call_cache_hits",
        "Turns started from this instance's copy of the call (no load)",
        lambda: ENGINE.cache.hits,
    )
    METRICS.tally(
        "cc_call_cache_stale",
        "Cached copies out of date (another instance had moved the call on)",
        lambda: ENGINE.cache.stale,
    )
    METRICS.tally(
        "cc_timers_fired",
        "Call timers that changed a call: no-answer watchdogs, no-input and inter-digit timeouts, hang-ups",
        lambda: SCHEDULER.fired,
    )
    METRICS.tally("cc_replies_resent", "Outbox entries sent again by the scheduler", lambda: SCHEDULER.resent)
    if FLOW.pools:
        METRICS.tally(
            "cc_pool_leases", "Warm transfers that leased a pool number", lambda: ENGINE.leases, "pool"
        )
        METRICS.tally(
            "cc_pool_exhausted",
            "Warm transfers that found every number of the pool held",
            lambda: ENGINE.exhausted,
            "pool",
        )
        METRICS.tally(
            "cc_pool_lapses",
            "Lapsed leases (never released: their instance died, or a release failed) leased again",
            lambda: ENGINE.lapses,
            "pool",
        )

    METRICS.level("cc_streaming_connections", "Open streaming connections", lambda: len(CONNECTIONS.sockets))
    METRICS.level(
        "cc_streaming_calls",
        "Calls carried by this instance's streaming connections",
        lambda: CONNECTIONS.calls,
    )
    METRICS.tally(
        "cc_streaming_sends",
        "Sends over streaming connections: local (on this instance's socket), routed (to "
        "another instance's), served (for another instance)",
        lambda: CONNECTIONS.sends,
        "route",
    )
    METRICS.tally(
        "cc_streaming_send_failures",
        "Streaming sends that failed: no_connection (no instance held the call: the reply "
        "stays in the outbox), timeout, closed (the socket went)",
        lambda: CONNECTIONS.failures,
        "reason",
    )

    APP = web.Application(client_max_size=MAX_BODY_BYTES)
    APP[ADAPTER_KEY] = ADAPTER
    APP[BOT_KEY] = BOT
    APP[STORE_KEY] = STORE
    APP[SCHEDULER_KEY] = SCHEDULER
    APP[METRICS_KEY] = METRICS
    APP[DRAINING_KEY] = asyncio.Event()

    async def redis_lifetime(app: web.Application) -> AsyncIterator[None]:
        if problem := await connection_problem(STORE.redis, CONFIG):
            log.error("%s; /readyz fails until Redis answers", problem)
        yield
        await AUTH.close()
        try:
            await asyncio.wait_for(STORE.redis.aclose(), CLEANUP_SECONDS)
        except TimeoutError:
            log.warning("Redis connections did not close within %s s", CLEANUP_SECONDS)

    async def scheduler_lifetime(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(SCHEDULER.run(), name="scheduler")
        yield
        # Shutdown: in-flight requests have finished; stop claiming and hand back what
        # is claimed but not done, so another instance takes it at once.
        task.cancel()
        await asyncio.wait({task}, timeout=CLEANUP_SECONDS)
        try:
            await asyncio.wait_for(SCHEDULER.release(), CLEANUP_SECONDS)
        except (StoreUnavailable, TimeoutError) as e:
            log.warning("claimed work not handed back (its leases will lapse): %r", e)

    async def keys_lifetime(app: web.Application) -> AsyncIterator[None]:
        # Load the channel's signing keys in the background: the server starts at once,
        # and the first calls wait (off the loop) for this same fetch, not a new one.
        task = asyncio.create_task(warm_keys(channel_metadata_url(CONFIG)), name="warm-keys")
        yield
        task.cancel()  # the fetch itself runs on a daemon thread, bounded by its timeout
        await asyncio.gather(task, return_exceptions=True)

    async def sockets_lifetime(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(CONNECTIONS.run(), name="connections")
        yield
        task.cancel()
        await asyncio.wait({task}, timeout=CLEANUP_SECONDS)

    APP.cleanup_ctx.append(redis_lifetime)
    if CONFIG.APP_ID:
        APP.cleanup_ctx.append(keys_lifetime)
    # Torn down in reverse: the scheduler stops before the inbox, so its routed sends in
    # flight can still be answered.
    APP.cleanup_ctx.append(sockets_lifetime)
    APP.cleanup_ctx.append(scheduler_lifetime)
    APP.on_shutdown.append(drain)  # as a fallback: serve() drains before aiohttp's shutdown
    add_routes(APP)
    add_socket_routes(APP, CONNECTIONS)
    if CONFIG.AGENT_TOKEN is not None and POOLS is not None:
        AGENT = AgentApi(FLOW, POOLS, CONFIG.AGENT_TOKEN.get_secret_value(), CONFIG.AGENT_RATE_LIMIT)
        add_agent_routes(APP, AGENT)
        METRICS.tally(
            "cc_pool_claims",
            "Contexts claimed by the agent side (first claims)",
            lambda: AGENT.claims,
            "pool",
        )
    elif POOLS is not None:
        log.info("AGENT_TOKEN is not set: the context API and /agent are off (pushes still go)")
    if PUSHER is not None:
        METRICS.tally(
            "cc_push",
            "Context pushes, by how they ended (retried: tries after the first)",
            PUSHER.counts,
            "result",
        )

        async def push_lifetime(app: web.Application) -> AsyncIterator[None]:
            PUSHER.start()
            yield
            await PUSHER.close(flush_timeout=CLEANUP_SECONDS)

        APP.cleanup_ctx.append(push_lifetime)
    if CONFIG.OPERATOR_TOKEN is not None:
        add_operator_routes(APP, CONFIG.OPERATOR_TOKEN.get_secret_value(), FLOW, POOLS)
    else:
        log.info("OPERATOR_TOKEN is not set: the operator API, /metrics and /dashboard are off")
    return APP


def tune_gc() -> None:
    """Keep the garbage collector off the turn's tail latency.

    Everything alive once the app is built (botbuilder, msrest, aiohttp) is frozen out of
    the collector's reach, so a full collection no longer walks it in the middle of some
    turn; young collections run less often than Python's default, since each walks the
    turn's short-lived objects for nothing.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def main() -> None:
    try:
        CONFIG = load_settings()
    except ConfigError as e:
        sys.exit(f"configuration error: {e}")
    logging.basicConfig(level=CONFIG.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        APP = create_app(CONFIG)
    except ConfigError as e:
        sys.exit(f"configuration error: {e}")
    tune_gc()
    asyncio.run(serve(APP, CONFIG.HOST, CONFIG.PORT))


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM (or Ctrl-C), then shut down within SHUTDOWN_SECONDS: first the
    streaming sockets (their turns finish, then they close and the channel reconnects
    elsewhere), then aiohttp's own shutdown (stop accepting, finish requests, clean up).

    In that order because aiohttp's shutdown stops reading every open connection before
    anything else, sockets included: a turn still running could no longer read the
    channel's answer to its replies."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_SECONDS - SAY_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("shutting down: finishing the streaming sockets' turns, then closing them")
        await drain(app)
    finally:
        await runner.cleanup()


async def drain(app: web.Application) -> None:
    """Start shutting down: /readyz fails and upgrades are refused (the load balancer sends
    new work elsewhere); the streaming sockets finish their turns, then close."""
    if not app[DRAINING_KEY].is_set():
        app[DRAINING_KEY].set()
        await app[CONNECTIONS_KEY].close_all(drain_seconds=SAY_SECONDS)


if __name__ == "__main__":
    main()
