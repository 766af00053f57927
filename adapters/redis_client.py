"""Redis clients: a real server from ``REDIS_URL``, or the embedded fake when it is unset."""

from __future__ import annotations

import logging
from typing import Any

from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from orchestrator.config import Settings
from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)


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
    }
    if settings.REDIS_CLUSTER:
        return RedisCluster.from_url(settings.REDIS_URL, **options)
    return Redis.from_url(settings.REDIS_URL, health_check_interval=30, **options)
