"""Sends reach a call's socket from any instance: two bots in this process on one Redis
(a real server, and a Redis Cluster), Microsoft's JS streaming client as the channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from adapters.connections import Connections, NotConnected
from adapters.framing import CONTENT_TYPE, Request, new_id
from adapters.http import STORE_KEY
from adapters.keys import Due
from adapters.socket_api import CONNECTIONS_KEY
from adapters.store import RedisCallStore
from app import create_app
from orchestrator.config import load_settings
from simulator.channel import Caller
from simulator.streaming import SERVICE_URL
from tests.jspeer import JsChannel
from tests.process import ROOT

DEFAULT_FLOW = ROOT / "orchestrator" / "flows" / "transfer-sample.yaml"

two_instances = pytest.mark.parametrize("bot_redis", ["real", "cluster"], indirect=True)


@pytest.fixture
async def bots(
    request: pytest.FixtureRequest, bot_redis: dict[str, Any], tmp_path: Path, key_prefix: str
) -> AsyncIterator[list[TestServer]]:
    """Two instances on one Redis, their schedulers slowed right down: these tests send by
    hand, and a watchdog fired meanwhile would only add replies. Parametrized, each
    instance's VARIABLES_KEYS (by default, none: a key of its own)."""
    flow = yaml.safe_load(DEFAULT_FLOW.read_text())
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    servers = []
    for variables_keys in getattr(request, "param", [None, None]):
        settings = load_settings(
            **bot_redis,
            REDIS_KEY_PREFIX=key_prefix,
            CALLFLOW_FILE=tmp_path / "flow.yaml",
            SCHEDULER_POLL_SECONDS=10,
            VARIABLES_KEYS=variables_keys,
        )
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
    yield servers
    for server in servers:
        await server.close()


def connections(server: TestServer) -> Connections:
    return server.app[CONNECTIONS_KEY]


def reply(conversation_id: str, text: str) -> Request:
    body = json.dumps({"type": "message", "text": text, "conversation": {"id": conversation_id}}).encode()
    return Request(new_id(), "POST", f"/v3/conversations/{conversation_id}/activities", body, CONTENT_TYPE)


async def call_on(js: JsChannel, server: TestServer, socket: str) -> Caller:
    """A call started over a socket to ``server``: its welcome prompt arrived there."""
    url = str(server.make_url("/api/messages")).replace("http", "ws", 1)
    assert (await js.connect(socket, url, {"channelid": "telephony"}))["event"] == "connected"
    caller = Caller(SERVICE_URL)
    assert (await js.send(socket, caller.start()))["status"] == 200
    await js.wait_requests(1, socket)
    return caller


@two_instances
async def test_a_send_fired_on_another_instance_goes_over_the_holders_socket(bots: list[TestServer]) -> None:
    holder, other = bots
    async with JsChannel() as js:
        caller = await call_on(js, holder, "s1")
        cid = caller.conversation_id
        assert (
            await connections(other).redis.get(connections(other).keys.socket(cid))
            == connections(holder).instance
        )
        answer = await connections(other).send(cid, reply(cid, "from the other instance"))
        assert answer.status == 200 and json.loads(answer.body or b"{}")["id"]
        [_, routed] = await js.wait_requests(2, "s1")
        assert routed["body"]["text"] == "from the other instance"
        assert connections(other).sends["routed"] == 1 and connections(holder).sends["served"] == 1

        # The socket goes: the call's socket key with it, and a send finds nobody at once.
        await js.close("s1")
        await js.wait_disconnected("s1")
        async with asyncio.timeout(10):
            while connections(holder).sockets:  # noqa: ASYNC110 - the bot's own task detaches it
                await asyncio.sleep(0.02)
        assert await connections(other).redis.get(connections(other).keys.socket(cid)) is None
        with pytest.raises(NotConnected):
            await connections(other).send(cid, reply(cid, "nobody holds it"))
        assert connections(other).failures["no_connection"] == 1


KEY, OTHER_KEY = (Fernet.generate_key().decode() for _ in range(2))


@two_instances
@pytest.mark.parametrize("bots", [[KEY, KEY], [KEY, OTHER_KEY]], indirect=True, ids=["same", "different"])
async def test_a_routed_send_is_sealed_with_the_shared_keys(
    bots: list[TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With VARIABLES_KEYS, a send crosses Redis sealed (it may read back what a caller
    keyed in): the holder opens it, or, with other keys, says at once that it cannot."""
    holder, other = bots
    published: list[str] = []
    publish = connections(other).redis.spublish

    async def spy(channel: str, message: str) -> Any:
        published.append(message)
        return await publish(channel, message)

    monkeypatch.setattr(connections(other).redis, "spublish", spy)
    async with JsChannel() as js:
        caller = await call_on(js, holder, "s1")
        cid = caller.conversation_id
        send = connections(other).send(cid, reply(cid, "You entered 9 8 7 7 9 8 6 2."))
        if bots[0].app[STORE_KEY].sealer.open(bots[1].app[STORE_KEY].sealer.seal("")) is None:
            with pytest.raises(NotConnected, match="cannot open"):
                await send
        else:
            assert (await send).status == 200
            [_, routed] = await js.wait_requests(2, "s1")
            assert routed["body"]["text"] == "You entered 9 8 7 7 9 8 6 2."
    [message] = [m for m in map(json.loads, published) if m["op"] == "send"]
    assert "body" not in message and "9 8 7" not in json.dumps(message)
    assert message["sealed"].startswith("gAAAAA")  # Fernet


@two_instances
async def test_a_holder_that_died_is_found_gone_at_once(bots: list[TestServer]) -> None:
    """A call whose socket key names an instance that no longer listens (killed: nothing
    cleared the key) fails fast: nobody is subscribed to that instance's inbox."""
    _, other = bots
    conns = connections(other)
    cid = "call-held-by-the-dead"
    await conns.redis.set(conns.keys.socket(cid), "gone-host-1-abcdef", ex=60)
    with pytest.raises(NotConnected, match="is gone"):
        await conns.send(cid, reply(cid, "anyone?"))


@two_instances
async def test_replies_kept_without_a_socket_are_due_once_the_call_is_on_one_again(
    bots: list[TestServer],
) -> None:
    first, second = bots
    async with JsChannel() as js:
        caller = await call_on(js, first, "s1")
        cid = caller.conversation_id
        await js.cut("s1")  # the channel's socket drops: nobody holds the call
        await js.wait_disconnected("s1")
        async with asyncio.timeout(10):
            while connections(first).sockets:  # noqa: ASYNC110 - the bot's own task detaches it
                await asyncio.sleep(0.02)
        store = first.app[STORE_KEY]
        # kept at 0 ms: too old to be sent
        await store.redis.hset(store.keys.call(cid).outbox, "kept-1", '0:{"replies":[]}')
        due = store.keys.due_for(cid)
        member = Due.outbox(cid, "kept-1")
        await store.redis.zadd(due, {member: 10**13})  # due far in the future
        # The channel reconnects, to the other instance, and the call's next activity arrives.
        url = str(second.make_url("/api/messages")).replace("http", "ws", 1)
        assert (await js.connect("s2", url, {"channelid": "telephony"}))["event"] == "connected"
        assert (await js.send("s2", caller.say("hello again")))["status"] == 200
        assert await store.redis.zscore(due, member) == 0  # due now
        assert await store.redis.get(store.keys.socket(cid)) == connections(second).instance


async def test_the_lease_stops_at_once_when_a_redis_call_lost_the_cancellation(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 a Redis call can swallow a cancellation and return normally
    (gh-86296): the lease loop must end then, not sleep out a third of its lease."""
    connections = Connections(store, lease_seconds=600)
    renewing = asyncio.Event()

    async def set_losing_the_cancellation(*args: Any, **kwargs: Any) -> bool:
        renewing.set()
        with contextlib.suppress(asyncio.CancelledError):  # as asyncio.wait_for can drop one
            await asyncio.sleep(60)
        return True  # the command returns as if nothing had happened

    monkeypatch.setattr(connections.redis, "set", set_losing_the_cancellation)
    lease = asyncio.create_task(connections._keep_lease())
    await renewing.wait()
    lease.cancel()
    done, _ = await asyncio.wait({lease}, timeout=30)  # a hang guard: the bug sleeps 200 s
    assert done and lease.cancelled()
