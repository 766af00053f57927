"""Which instance holds which call's socket, and how a send reaches it from any instance.

Only the instance holding a call's streaming socket can write to the call. A call's
``:socket`` key names that instance; the instance keeps a lease on itself (its
``instance`` key, renewed while it runs) and listens on an inbox of its own (a sharded
Pub/Sub channel, so it works the same on a Redis Cluster). A send fired elsewhere, a
watchdog's prompt or an outbox entry sent again, is published to the holder's inbox, and
the holder answers with what the channel answered. When no instance holds the call, the
send fails at once: the reply stays in the call's outbox, and is made due again as soon
as the channel's next activity for the call arrives on a socket (the channel reconnects
by itself, to any instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter, OrderedDict
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub

from adapters.framing import Request, Response, new_id
from adapters.keys import Due
from adapters.store import UNAVAILABLE, RedisCallStore, load_script, unavailable_while
from adapters.streaming import ConnectionClosed, StreamingConnection
from orchestrator.metrics import Metrics
from orchestrator.scheduler import stop_if_cancelled

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0  # an instance that stops renewing is gone this long after
SEND_SECONDS = 5.0  # the channel's answer to one send over a socket
ROUTE_MARGIN_SECONDS = 1.0  # a routed send waits this much longer: the holder's own bound runs out first
REFRESH_SECONDS = 60.0  # a live call's :socket key is written again this often (it may have moved)
RELEASE_SCRIPT = load_script("release_socket.lua")


class NotConnected(ConnectionError):
    """No instance holds a socket for the call now: the reply waits for the channel."""


def instance_name() -> str:
    """This process's name in Redis: host, pid and a random tag (pids repeat in containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Connections:
    """The streaming sockets of this instance, and the way to the others'."""

    def __init__(
        self,
        store: RedisCallStore,
        *,
        instance: str | None = None,
        hold_seconds: int = 86_400,
        lease_seconds: float = LEASE_SECONDS,
        send_seconds: float = SEND_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys
        self.instance = instance or instance_name()
        self.hold_seconds = hold_seconds  # a call's :socket key lives at most as long as the call
        self.lease_seconds = lease_seconds
        self.send_seconds = send_seconds
        self.sockets: set[StreamingConnection] = set()
        # call -> the socket carrying it, when its last activity came and when its :socket
        # key was last written (monotonic), least recently active first
        self._by_call: OrderedDict[str, tuple[StreamingConnection, float, float]] = OrderedDict()
        self._routed: dict[str, asyncio.Future[Response]] = {}  # request id -> the holder's answer
        self._tasks: set[asyncio.Task[None]] = set()
        self._served: OrderedDict[str, None] = OrderedDict()  # routed request ids sent (a retried publish)
        self._lease: asyncio.Task[None] | None = None
        self._resubscribe = asyncio.Event()  # the inbox lost its subscription: make it again
        self._release = self.redis.register_script(RELEASE_SCRIPT)
        # Every label from the start, so a first failure after a restart is an increase.
        self.sends: Counter[str] = Counter(local=0, routed=0, served=0)  # served: for another instance
        self.failures: Counter[str] = Counter(no_connection=0, timeout=0, closed=0)
        self.metrics = metrics

    # --- this instance's sockets -------------------------------------------------

    @property
    def calls(self) -> int:
        return len(self._by_call)

    def attach(self, connection: StreamingConnection) -> None:
        self.sockets.add(connection)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a task that must run to its end (a socket's reading and clean-up) until it does."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def detach(self, connection: StreamingConnection) -> None:
        """The socket closed: its calls are no longer held here (unless on another socket)."""
        if self.metrics is not None:
            self.metrics.connection_calls.observe(connection.carried)
        gone = [c for c in connection.conversations if self._holder(c) is connection]

        for conversation_id in gone:
            del self._by_call[conversation_id]
        try:
            await self._let_go(gone)
        finally:
            self.sockets.discard(connection)

    def _holder(self, conversation_id: str) -> StreamingConnection | None:
        held = self._by_call.get(conversation_id)
        return held[0] if held else None

    def route_here(self, conversation_id: str, connection: StreamingConnection) -> None:
        """The call's activity arrived on ``connection``: its sends from this instance go
        there (in memory only; ``hold`` records it in Redis once the turn is taken)."""
        held = self._by_call.get(conversation_id)
        written = held[2] if held and held[0] is connection else float("-inf")
        self._by_call[conversation_id] = (connection, time.monotonic(), written)
        self._by_call.move_to_end(conversation_id)

    async def hold(self, conversation_id: str, connection: StreamingConnection) -> None:
        """Record in Redis that this instance holds the call, after a turn of it was taken
        on ``connection``: the first time on this socket (its outbox, kept while nobody held it,
        is made due at once), then again every ``REFRESH_SECONDS`` while it talks."""
        held = self._by_call.get(conversation_id)
        if held is None or held[0] is not connection:
            return  # gone meanwhile (ended), or moved to another socket
        now = time.monotonic()
        if conversation_id in connection.conversations and now - held[2] < REFRESH_SECONDS:
            return
        first = conversation_id not in connection.conversations
        connection.conversations.add(conversation_id)  # before the await: one write per socket
        keys = self.keys.call(conversation_id)
        try:
            with unavailable_while("recording the call's socket"):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.keys.socket(conversation_id), self.instance, ex=self.hold_seconds)
                    pipe.hkeys(keys.outbox)
                    _, kept = await pipe.execute()
        except BaseException:
            if first:
                connection.conversations.discard(conversation_id)  # written on its next activity
            raise
        if self._holder(conversation_id) is connection:
            self._by_call[conversation_id] = (connection, held[1], now)
        if first:
            connection.carried += 1
            if kept:
                due = {Due.outbox(conversation_id, key): 0 for key in kept}
                await self.redis.zadd(self.keys.due_for(conversation_id), due, xx=True)
                log.info("call %s: %d outbox entries due now, on a socket again", conversation_id, len(kept))

    def forget(self, conversation_id: str, connection: StreamingConnection) -> None:
        """The call ended: nothing more goes to it, so its socket lets go of it (a socket
        that carries calls for days keeps only the live ones)."""
        connection.conversations.discard(conversation_id)
        if self._holder(conversation_id) is connection:
            del self._by_call[conversation_id]
            self.keep(
                asyncio.create_task(self._let_go([conversation_id]), name=f"let go of {conversation_id}")
            )

    def _sweep(self) -> None:
        """Let go of calls nothing has come for in ``hold_seconds`` (their ``:socket`` keys
        have expired by now): a call the channel never ended must not stay forever."""
        idle_since = time.monotonic() - self.hold_seconds
        while self._by_call:
            conversation_id, (connection, last, _) = next(iter(self._by_call.items()))
            if last > idle_since:
                return
            del self._by_call[conversation_id]
            connection.conversations.discard(conversation_id)

    async def _let_go(self, conversation_ids: list[str]) -> None:
        """Clear the calls' ``:socket`` keys where they still name this instance."""
        if not conversation_ids:
            return
        try:
            async with asyncio.timeout(self.send_seconds):  # one round trip (per node), not one per call
                await self.store.run_each(
                    self._release, [([self.keys.socket(c)], [self.instance]) for c in conversation_ids]
                )
        except (*UNAVAILABLE, TimeoutError) as e:
            # Harmless: a send to them finds nobody listening on this instance's inbox.
            log.warning("%d calls' socket keys not cleared: %r", len(conversation_ids), e)

    # --- sending --------------------------------------------------------------------

    async def send(self, conversation_id: str, request: Request) -> Response:
        """Send ``request`` to the channel over the socket holding the call, here or on
        another instance; the channel's answer. ``NotConnected`` when none holds it."""
        connection = self._holder(conversation_id)
        if connection is not None and not connection.closing:
            self.sends["local"] += 1
            return await self._over(connection, request)
        with unavailable_while("finding the call's socket"):
            holder = await self.redis.get(self.keys.socket(conversation_id))
        if not holder or holder == self.instance:
            self.failures["no_connection"] += 1
            raise NotConnected(f"call {conversation_id}: no socket holds it")
        self.sends["routed"] += 1
        return await self._route(str(holder), conversation_id, request)

    async def _over(self, connection: StreamingConnection, request: Request) -> Response:
        try:
            return await connection.request(request, self.send_seconds)
        except TimeoutError:
            self.failures["timeout"] += 1
            raise
        except ConnectionClosed:
            self.failures["closed"] += 1
            raise

    async def _route(self, holder: str, conversation_id: str, request: Request) -> Response:
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._routed[request.id] = answer
        message = {
            "op": "send",
            "id": request.id,
            "from": self.instance,
            "call": conversation_id,
            "verb": request.verb,
            "path": request.path,
        }
        body = (request.body or b"").decode()
        # The reply may carry what the flow collected (a read-back, a handoff's variables):
        # sealed, as the outbox keeps it, when every instance holds the keys to open it.
        if self.store.sealer.shared:
            message["sealed"] = self.store.sealer.seal(body)
        else:
            message["body"] = body
        try:
            async with asyncio.timeout(self.send_seconds + ROUTE_MARGIN_SECONDS):
                with unavailable_while("routing a send"):
                    listening = await self.redis.spublish(self.keys.inbox(holder), json.dumps(message))
                if not listening:  # the holder is gone (killed, or shut down)
                    self.failures["no_connection"] += 1
                    raise NotConnected(f"call {conversation_id}: its socket's instance {holder} is gone")
                return await answer
        except TimeoutError:
            self.failures["timeout"] += 1
            raise
        finally:
            self._routed.pop(request.id, None)

    # --- the inbox ------------------------------------------------------------------

    async def run(self) -> None:
        """Keep this instance's lease and serve its inbox until cancelled."""
        self._lease = asyncio.create_task(self._keep_lease(), name="instance lease")
        try:
            await self._serve_inbox()
        finally:
            await self._stop_lease()

    async def _stop_lease(self) -> None:
        if self._lease is not None:
            self._lease.cancel()
            await asyncio.wait({self._lease})

    async def _keep_lease(self) -> None:
        """Renew the lease; and check the inbox still has its listener (a Cluster can drop a
        sharded subscription when a slot moves), asking for a new one when it has not."""
        key, inbox = self.keys.instance(self.instance), self.keys.inbox(self.instance)
        while True:
            stop_if_cancelled()
            self._sweep()
            try:
                state = json.dumps({"sockets": len(self.sockets), "calls": self.calls})
                await self.redis.set(key, state, px=int(self.lease_seconds * 1000))
                if not await self.redis.spublish(inbox, '{"op":"ping"}'):
                    log.warning("inbox %s has no listener; subscribing again", inbox)
                    self._resubscribe.set()
            except UNAVAILABLE as e:
                log.warning("instance lease not renewed: %r", e)
            stop_if_cancelled()  # a cancellation the Redis calls lost: not after a third of a lease
            await asyncio.sleep(self.lease_seconds / 3)

    async def _serve_inbox(self) -> None:
        pause = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.ssubscribe(self.keys.inbox(self.instance))
                self._resubscribe.clear()
                pause = 0.1
                while not self._resubscribe.is_set():
                    stop_if_cancelled()  # redis-py's waits can lose a cancellation (gh-86296)
                    message = await _next(pubsub)
                    if message is not None and message.get("type") == "smessage":
                        self._receive(message["data"])
            except Exception as e:  # Redis trouble, or a bug: the inbox must come back either way
                trouble = isinstance(e, UNAVAILABLE)
                log.log(
                    logging.WARNING if trouble else logging.ERROR,
                    "inbox lost, subscribing again in %.1f s: %r",
                    pause,
                    e,
                    exc_info=not trouble,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
            finally:
                with contextlib.suppress(*UNAVAILABLE):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _receive(self, raw: str) -> None:
        try:
            message: dict[str, Any] = json.loads(raw)
            if message["op"] == "ping":  # the lease's check that this inbox listens
                return
            ident = str(message["id"])
            if message["op"] == "answer":
                answer = self._routed.get(ident)
                if answer is not None and not answer.done():
                    if message.get("error"):
                        answer.set_exception(NotConnected(str(message["error"])))
                    else:
                        body = str(message.get("body") or "").encode() or None
                        answer.set_result(Response(ident, int(message["status"]), body))
                return
            if ident in self._served:  # a publish redis-py retried: sent once already
                return
            self._served[ident] = None
            if len(self._served) > 4096:
                self._served.popitem(last=False)
            sender, call = str(message["from"]), str(message["call"])
            # Sealed by an instance with the shared keys; in clear from one without them.
            opened = (
                self.store.sealer.open(str(message["sealed"])) if "sealed" in message else message["body"]
            )
            request = None
            if opened is not None:
                request = Request(new_id(), str(message["verb"]), str(message["path"]), str(opened).encode())
        except (ValueError, KeyError, TypeError) as e:
            log.warning("inbox: a message this version cannot read (%r): %.200s", e, raw)
            return
        self.keep(asyncio.create_task(self._serve(ident, sender, call, request), name=f"routed send {ident}"))

    async def _serve(self, ident: str, sender: str, call: str, request: Request | None) -> None:
        """Send for another instance over this one's socket, and tell it how it went
        (``request`` None: it came sealed with a key this instance lacks)."""
        answer: dict[str, Any] = {"op": "answer", "id": ident}
        connection = self._holder(call)
        try:
            if request is None:
                log.error("inbox: a send for call %s cannot be opened with VARIABLES_KEYS: not sent", call)
                raise NotConnected(
                    f"call {call}: {self.instance} cannot open the send (VARIABLES_KEYS differ)"
                )
            if connection is None or connection.closing:
                raise NotConnected(f"call {call}: no socket on {self.instance} holds it now")
            self.sends["served"] += 1
            response = await self._over(connection, request)
            answer.update(status=response.status, body=(response.body or b"").decode(errors="replace"))
        except (NotConnected, ConnectionClosed, TimeoutError) as e:
            answer["error"] = str(e) or type(e).__name__
        try:
            await self.redis.spublish(self.keys.inbox(sender), json.dumps(answer))
        except UNAVAILABLE as e:  # the sender times out and the reply stays in the outbox
            log.warning("inbox: answer to %s not sent: %r", sender, e)

    # --- shutdown -------------------------------------------------------------------

    async def close_all(self, drain_seconds: float) -> None:
        """Shutdown: the sockets take no new requests (503) and their turns in flight
        finish, then every socket closes (the channel reconnects to another instance) and
        lets go of its calls; the lease goes last. Nothing in flight is cancelled."""
        sockets = list(self.sockets)
        drains = {asyncio.ensure_future(s.drain()) for s in sockets}
        if drains:
            await asyncio.wait(drains, timeout=drain_seconds)
        await asyncio.gather(*(s.close(1012, "restarting") for s in sockets))  # 1012: service restart
        if self._tasks:  # the sockets' clean-up, routed sends
            await asyncio.wait(set(self._tasks), timeout=self.send_seconds)
        await self._stop_lease()
        with contextlib.suppress(*UNAVAILABLE, TimeoutError):
            async with asyncio.timeout(self.send_seconds):
                await self.redis.delete(self.keys.instance(self.instance))


async def _next(pubsub: PubSub | ClusterPubSub) -> dict[str, Any] | None:
    """The next inbox message, or None after a second of silence."""
    if isinstance(pubsub, ClusterPubSub):
        message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=1.0)
    else:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    return message if isinstance(message, dict) else None
