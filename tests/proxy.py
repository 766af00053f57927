"""Loopback TCP proxies in front of Redis that can lose replies after the server acted."""

from __future__ import annotations

import asyncio
from typing import Self


class ReplyLosingProxy:
    """Forwards bytes both ways between its clients and Redis at ``host``:``target_port``.
    A client's bytes that carry the script ``sha`` while ``_arm`` says so mark that
    connection: when the server's reply comes back, ``_lose_reply`` decides what the
    client hears instead (the script has run; the client never hears of it)."""

    def __init__(self, target_port: int, sha: str, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.sha = sha.encode()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def _arm(self) -> bool:
        """A client just sent ``sha``: whether this connection's reply is to be lost."""
        raise NotImplementedError

    async def _lose_reply(self) -> None:
        """The reply of a marked connection came back: what happens instead of passing it
        on. When this returns, the connection is cut."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        assert this is not None
        self._connections.add(this)
        try:
            await self._pump(client_reader, client_writer)
        finally:
            self._connections.discard(this)

    async def _pump(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.host, self.target_port)
        armed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if self.sha in data and self._arm():
                    armed.set()
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if armed.is_set():
                    await self._lose_reply()
                    return  # cut the connection
                client_writer.write(data)
                await client_writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_writer, server_writer):
                writer.close()


class ReplyDroppingProxy(ReplyLosingProxy):
    """While ``drop_evalsha_replies`` > 0, a connection that runs the script ``sha`` is cut
    when the server's reply comes back, so the script has run but the client never hears
    of it (as when a connection drops mid-reply)."""

    def __init__(self, target_port: int, sha: str) -> None:
        super().__init__(target_port, sha)
        self.drop_evalsha_replies = 0
        self.dropped = 0

    def _arm(self) -> bool:
        if self.drop_evalsha_replies <= 0:
            return False
        self.drop_evalsha_replies -= 1
        return True

    async def _lose_reply(self) -> None:
        self.dropped += 1
