"""Counting what crosses the wire to Redis, on the client and on the server.

``CountingConnection`` counts the client's round trips and replies into ``Wire``;
``command_stats`` reads the server's per-command call counts (``INFO commandstats``),
which include the commands scripts run, so a delta says what a piece of work cost Redis.
Shared by the benches, so each counts the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection


class Wire:
    """What crossed the client's connections: writes (one per round trip: a pipeline
    is packed into one write) and replies read (one per command)."""

    round_trips = 0
    replies = 0

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        return cls.round_trips, cls.replies


class CountingConnection(Connection):
    """A TCP connection that counts into ``Wire``."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        Wire.round_trips += 1
        await super().send_packed_command(command, check_health)

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (the overridden method's signature)
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        Wire.replies += 1
        return await super().read_response(
            disable_decoding, timeout, disconnect_on_error=disconnect_on_error, push_request=push_request
        )


def count_round_trips(client: Redis) -> None:
    """Make ``client`` count into ``Wire`` from its next new connection on, keeping every
    other option it was built with (timeouts, retries): its pool builds ``CountingConnection``s.
    Call it before the client has connected (connections it already holds do not count)."""
    pool = client.connection_pool
    if not issubclass(pool.connection_class, Connection):
        raise TypeError(f"round trips are counted on plain TCP connections, not {pool.connection_class}")
    pool.connection_class = CountingConnection


async def command_stats(client: Redis) -> Counter[str]:
    """Calls per command name since the server's stats were last reset (``INFO
    commandstats``: scripts' commands included, ``INFO`` itself left out)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(figures["calls"])
            for name, figures in stats.items()
            if name != "cmdstat_info"
        }
    )
