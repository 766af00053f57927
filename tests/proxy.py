"""A loopback TCP proxy in front of Redis that can lose replies after the server acted."""

from __future__ import annotations

import asyncio


class ReplyDroppingProxy:
    """Forwards bytes both ways; while ``drop_evalsha_replies`` > 0, a connection that
    runs the script ``sha`` is cut when the server's reply comes back, so the script has
    run but the client never hears of it (as when a connection drops mid-reply)."""

    def __init__(self, target_port: int, sha: str) -> None:
        self.target_port = target_port
        self.sha = sha.encode()
        self.drop_evalsha_replies = 0
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> ReplyDroppingProxy:
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
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        armed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if self.drop_evalsha_replies > 0 and self.sha in data:
                    self.drop_evalsha_replies -= 1
                    armed.set()
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if armed.is_set():
                    self.dropped += 1
                    return  # the reply is lost: cut the connection
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
