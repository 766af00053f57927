"""Redis clients: a real server from ``REDIS_URL``, or the embedded fake when it is unset."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from orchestrator.config import Settings, redis_user
from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 100  # to one Redis server, per instance (a Cluster client has as many per node)


def create_redis(settings: Settings) -> Redis | RedisCluster:
    """The client the store runs on. Every call has a timeout, so no turn can hang."""
    if settings.REDIS_URL is None:
        if settings.REDIS_CLUSTER:
            raise ConfigError("REDIS_CLUSTER", "needs REDIS_URL, the address of a cluster node")
        log.warning(
            "REDIS_URL is not set: using an embedded in-process Redis (fakeredis). "
            "Call state is not shared between processes and is lost when this one exits."
        )
        return FakeRedis(server=FakeServer(), decode_responses=True)
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": settings.REDIS_TIMEOUT_SECONDS,
        # redis-py retries a command on a dropped connection or a timeout (the commit
        # script recognises its own retried run); its default back-off of up to 10 s
        # between tries would outlast the channel's 15 s, so keep it short.
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        **security_options(settings),
    }
    if settings.REDIS_CLUSTER:
        return RedisCluster.from_url(settings.REDIS_URL, **options)
    # A burst of turns (a failed-over instance's calls arriving at once) waits for a free
    # connection, up to the command timeout, where redis-py's default pool fails at once
    # with "Too many connections".
    pool = BlockingConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=MAX_CONNECTIONS,
        timeout=settings.REDIS_TIMEOUT_SECONDS,
        health_check_interval=30,
        **options,
    )
    return Redis.from_pool(pool)


def security_options(settings: Settings) -> dict[str, Any]:
    """redis-py's AUTH and TLS arguments from the settings (only those that are set, so a
    URL without them behaves as before). Config validation guarantees TLS means rediss://."""
    options: dict[str, Any] = {}
    if settings.REDIS_USERNAME is not None:
        options["username"] = settings.REDIS_USERNAME
    if settings.REDIS_PASSWORD is not None:
        options["password"] = settings.REDIS_PASSWORD.get_secret_value()
    if (settings.REDIS_URL or "").startswith("rediss://"):
        options["ssl_check_hostname"] = settings.REDIS_TLS_CHECK_HOSTNAME
        files = {
            "ssl_ca_certs": settings.REDIS_TLS_CA_FILE,
            "ssl_certfile": settings.REDIS_TLS_CERT_FILE,
            "ssl_keyfile": settings.REDIS_TLS_KEY_FILE,
        }
        options.update({name: str(path) for name, path in files.items() if path is not None})
    return options


async def connection_problem(client: Redis | RedisCluster, settings: Settings) -> str | None:
    """None when Redis answers PING; otherwise one line saying why not and which settings
    to check (never the password), for start-up logs and the CLI."""
    try:
        async with asyncio.timeout(settings.REDIS_TIMEOUT_SECONDS + 1):
            await client.ping()
    except AuthenticationError as e:
        return (
            f"Redis refused to log in user {redis_user(settings)!r}: check REDIS_USERNAME and "
            f"REDIS_PASSWORD ({e})"
        )
    except NoPermissionError as e:
        return f"Redis user {redis_user(settings)!r} may not run PING (see docs/redis-security.md): {e}"
    except (RedisError, OSError, TimeoutError) as e:
        if _tls_failure(e):
            return (
                f"the TLS handshake with Redis failed: check REDIS_TLS_CA_FILE, REDIS_TLS_CERT_FILE, "
                f"REDIS_TLS_KEY_FILE and REDIS_TLS_CHECK_HOSTNAME ({e})"
            )
        if settings.REDIS_URL is not None and settings.REDIS_URL.startswith("rediss://") and _cut_off(e):
            # TLS 1.3 checks the client's certificate after the handshake: the server's alert
            # (CERTIFICATE_REQUIRED, unknown CA) races its close, and a reset can lose it.
            return (
                f"Redis cut off the TLS connection: if it asks for client certificates, check "
                f"REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE (a refused certificate can look like "
                f"this when the server's alert is lost to the reset) ({e})"
            )
        return f"Redis is not reachable ({e or type(e).__name__})"
    return None


def _cut_off(error: BaseException) -> bool:
    """Whether ``error`` or what caused it is the peer resetting or closing the connection."""
    return _caused_by(
        error,
        lambda e: (
            isinstance(e, ConnectionResetError | BrokenPipeError) or "Connection reset by peer" in str(e)
        ),
    )


def _tls_failure(error: BaseException) -> bool:
    """Whether ``error`` or what caused it is an SSL error (redis-py wraps them)."""
    return _caused_by(error, lambda e: isinstance(e, ssl.SSLError) or "[SSL" in str(e))


def _caused_by(error: BaseException, matches: Callable[[BaseException], bool]) -> bool:
    """Whether ``error`` or one of the errors that caused it (redis-py wraps them) matches."""
    seen: BaseException | None = error
    for _ in range(8):  # a chain, not a cycle
        if seen is None:
            break
        if matches(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
