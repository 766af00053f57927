"""Every key of a call expires: bounded while it is live (even a call nobody ends, however
busy), within the retention once it has ended. Shared keys either expire themselves or
lose the call's members as it goes."""

from __future__ import annotations

import json
import time

import pytest
from botbuilder.schema import Activity, ActivityTypes
from redis.asyncio import Redis

from adapters.bot import as_replies
from adapters.keys import Keyspace
from adapters.sealing import Sealer
from adapters.store import RedisCallStore, Retention
from orchestrator.callflow import load_callflow
from orchestrator.engine import Engine, Replies
from orchestrator.events import CallEnded, CallerInput, CallStarted, Event, HandoffStatus
from orchestrator.turn import Turn
from tests.conftest import SAMPLE_FLOW

LIVE, MAX_LIVE, ENDED = 3600, 1800, 600
CID = "call-ttl"
# Written with the first turn only (it never changes): its key's TTL must follow the others'.
REFERENCE = '{"conversation":{"id":"call-ttl"},"serviceUrl":"https://channel.invalid/"}'


@pytest.fixture
def store(redis_client: Redis, key_prefix: str) -> RedisCallStore:
    retention = Retention(live_seconds=LIVE, max_live_seconds=MAX_LIVE, ended_seconds=ENDED)
    return RedisCallStore(redis_client, Keyspace(key_prefix), retention)


SEALER = Sealer.from_setting(None)


def render(turn: Turn) -> Replies:
    return as_replies(
        turn, [Activity(type=ActivityTypes.message, text="reply") for _ in turn.effects], SEALER
    )


async def ttls(store: RedisCallStore) -> dict[str, int]:
    """TTL of every key under the test's prefix (the prefix is the test's own)."""
    found = {}
    async for key in store.redis.scan_iter(match=f"{store.keys.prefix}:*", count=1000):
        found[key] = await store.redis.ttl(key)
    return found


def shared(store: RedisCallStore, key: str) -> bool:
    """The shard's due schedule, state and node indexes and set of nodes: shared by its calls,
    never expired as a whole; the call's members leave them instead (checked below)."""
    shard = store.keys.locate(CID)[0]
    indexes = (store.keys.state_index(shard, ""), store.keys.node_index(shard, ""))
    return key in (store.keys.due(shard), store.keys.nodes(shard)) or key.startswith(indexes)


async def check_bounded(store: RedisCallStore, call_bound: int) -> None:
    call_keys = set(store.keys.call(CID))
    for key, ttl in (await ttls(store)).items():
        if shared(store, key):
            continue
        assert ttl > 0, f"{key} has no TTL ({ttl})"
        if key in call_keys:
            assert ttl <= call_bound, f"{key}: TTL {ttl} > {call_bound}"
        elif key == store.keys.feed(store.keys.locate(CID)[0]):
            assert ttl <= store.retention.feed_seconds


async def members_of_the_call(store: RedisCallStore) -> dict[str, list[str]]:
    shard = store.keys.locate(CID)[0]
    found: dict[str, list[str]] = {}
    for key in [
        store.keys.due(shard),
        *(store.keys.state_index(shard, s) for s in ("bot", "transferring", "accepted", "failed", "ended")),
        *(store.keys.node_index(shard, node) for at, node in await store.listed_nodes() if at == shard),
    ]:
        raw: list[str] = await store.redis.zrange(key, 0, -1)  # type: ignore[assignment]
        members = [m for m in raw if m == CID or CID in json.loads(m if m.startswith("[") else "[]")]
        if members:
            found[key.rsplit(":", 1)[-1]] = members
    return found


async def test_every_key_of_a_call_expires_live_and_ended(store: RedisCallStore) -> None:
    engine = Engine(store, load_callflow(SAMPLE_FLOW))
    turns: list[tuple[str, Event]] = [
        ("a1", CallStarted()),
        ("a2", CallerInput("hello")),
        ("a3", CallerInput("agent")),  # transferring: a watchdog, a handoff in the outbox
        ("a4", HandoffStatus("failed", "busy")),  # failed: a retry prompt in the outbox
        ("a5", CallerInput("agent")),
        ("a6", HandoffStatus("accepted")),
    ]
    for activity_id, event in turns:
        turn = await engine.handle(CID, event, activity_id=activity_id, render=render, reference=REFERENCE)
        assert turn is not None
        assert await store.redis.exists(store.keys.call(CID).reference)
        await check_bounded(store, MAX_LIVE)  # the lifetime bound, below the idle TTL
        if turn.outbox_key:
            await store.acknowledge(CID, turn.outbox_key)
            await check_bounded(store, MAX_LIVE)
    assert await members_of_the_call(store) == {"accepted": [CID]}

    await engine.handle(CID, CallEnded(), activity_id="a7", render=render)
    await check_bounded(store, ENDED)
    assert await members_of_the_call(store) == {"ended": [CID]}
    # A late activity on the ended call keeps it within the retention too.
    await engine.handle(CID, CallerInput("hello?"), activity_id="a8", render=render)
    await check_bounded(store, ENDED)


async def test_a_call_that_never_ends_expires_at_its_maximum_lifetime(store: RedisCallStore) -> None:
    engine = Engine(store, load_callflow(SAMPLE_FLOW))
    await engine.handle(CID, CallStarted(), activity_id="a1")
    record = store.keys.call(CID).call
    # Started MAX_LIVE - 5 s ago: however much it talks now, it has ~5 s left.
    await store.redis.hset(record, "created", int(time.time() * 1000) - (MAX_LIVE - 5) * 1000)
    await engine.handle(CID, CallerInput("still here"), activity_id="a2")
    for key in store.keys.call(CID):
        ttl = await store.redis.ttl(key)
        assert ttl == -2 or 0 < ttl <= 6, (key, ttl)
    # Past it: the next turn leaves it a second.
    await store.redis.hset(record, "created", int(time.time() * 1000) - (MAX_LIVE + 60) * 1000)
    await engine.handle(CID, CallerInput("and here"), activity_id="a3")
    assert 0 < await store.redis.ttl(record) <= 1


async def test_without_a_lifetime_bound_the_idle_ttl_applies(redis_client: Redis, key_prefix: str) -> None:
    retention = Retention(live_seconds=LIVE, max_live_seconds=0, ended_seconds=ENDED)
    store = RedisCallStore(redis_client, Keyspace(key_prefix), retention)
    await Engine(store, load_callflow(SAMPLE_FLOW)).handle(CID, CallStarted(), activity_id="a1")
    assert LIVE - 5 <= await store.redis.ttl(store.keys.call(CID).call) <= LIVE


async def test_old_feed_entries_go(store: RedisCallStore) -> None:
    engine = Engine(store, load_callflow(SAMPLE_FLOW))
    feed = store.keys.feed(store.keys.locate(CID)[0])
    await store.redis.xadd(feed, {"call": "old"}, id="1000-0")  # from 1970: long past the retention
    await engine.handle(CID, CallerInput("agent"), activity_id="a1")  # a step: written to the feed
    entries: list[tuple[str, dict[str, str]]] = await store.redis.xrange(feed)  # type: ignore[assignment]
    triggers = [(fields["call"], fields["trigger"]) for _, fields in entries]
    assert triggers == [(CID, "move"), (CID, "request_agent")]
    assert 0 < await store.redis.ttl(feed) <= store.retention.feed_seconds
