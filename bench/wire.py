"""Counting what crosses the wire to Redis, on the client and on the server.

``CountingConnection`` counts the client's round trips and replies into ``Wire``;
``command_stats`` reads the server's per-command call counts (``INFO commandstats``,
which include the commands scripts run): exact on a Redis nobody else uses. On a shared
one, ``ServerTap`` counts from ``MONITOR`` only what the server ran for this process's
counting connections, script commands included. Shared by the benches, so each counts
the same way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.connection import Connection


class Wire:
    """What crossed the client's connections: writes (one per round trip: a pipeline
    is packed into one write) and replies read (one per command)."""

    round_trips = 0
    replies = 0
    addresses: ClassVar[set[str]] = set()  # "host:port" of every counting connection, as MONITOR shows them

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        return cls.round_trips, cls.replies


class CountingConnection(Connection):
    """A TCP connection that counts into ``Wire``."""

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[no-untyped-call]
        host, port = self._writer.get_extra_info("sockname")[:2]  # type: ignore[union-attr]
        Wire.addresses.add(f"{host}:{port}")

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


# Commands whose first argument names the subcommand, as INFO commandstats spells them.
_CONTAINERS = frozenset({"client", "script", "config", "object", "memory", "xinfo", "command", "cluster"})


class ServerTap:
    """What the server ran for the counting connections (``Wire.addresses``), from its
    ``MONITOR`` feed: their commands, and the commands of the scripts they ran (a script
    runs atomically, so its commands follow its EVALSHA in the feed). ``mark`` cuts the
    feed into windows; a window's counts are per command name, as INFO commandstats names
    them. MONITOR costs the server some throughput while it runs: a bench-only tool."""

    def __init__(self, client: Redis) -> None:
        self._client = client  # a non-counting client: it sends the markers
        self._monitor = client.monitor()
        self._task: asyncio.Task[None] | None = None
        self._counts: Counter[str] = Counter()
        self._waiting: dict[str, asyncio.Future[Counter[str]]] = {}

    async def __aenter__(self) -> ServerTap:
        await self._monitor.__aenter__()  # type: ignore[no-untyped-call]
        self._task = asyncio.create_task(self._read(), name="server-tap")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        await self._monitor.__aexit__()  # type: ignore[no-untyped-call]

    async def mark(self) -> Counter[str]:
        """The commands counted since the previous mark (all the server ran before this)."""
        token = f"bench-tap-{uuid.uuid4().hex}"
        done = self._waiting[token] = asyncio.get_running_loop().create_future()
        await self._client.echo(token)
        async with asyncio.timeout(30):
            counts: Counter[str] = await done
        return counts

    async def _read(self) -> None:
        connection = self._monitor.connection
        assert connection is not None
        ours = False
        while True:
            line = await connection.read_response()
            if isinstance(line, bytes):
                line = line.decode("utf-8", "replace")
            # '<time> [<db> <client>] "<COMMAND>" "<arg>" ...'
            _, _, rest = str(line).partition(" [")
            client, _, command = rest.partition("] ")
            client = client.partition(" ")[2]
            if client != "lua":
                ours = client in Wire.addresses
                if not ours and self._waiting and command[1:5].lower() == "echo":
                    token = command[8:-1]
                    if token in self._waiting:
                        counts, self._counts = self._counts, Counter()
                        self._waiting.pop(token).set_result(counts)
                    continue
            if ours:
                self._counts[_command_name(command)] += 1


def _command_name(command: str) -> str:
    parts = command.split('"', 4)  # '', NAME, ' ', FIRST ARG, ...
    name = parts[1].lower() if len(parts) > 1 else command
    if name in _CONTAINERS and len(parts) > 3:
        return f"{name}|{parts[3].lower()}"
    return name
