"""Warm transfers through the turn path: a pooled queue leases a number, dials it, keeps
the call's context under it and gives it back; on fake, real and Cluster Redis."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.keys import Keyspace
from adapters.pool import PoolStatus, PoolStore
from adapters.store import RedisCallStore
from orchestrator.call import Call
from orchestrator.callflow import CallFlow, Pool, PoolExhausted, Privacy, load_callflow
from orchestrator.engine import Engine
from orchestrator.events import (
    CallEnded,
    CallerInput,
    CallStarted,
    ContextClaimed,
    HandoffStatus,
    TimerExpired,
)
from orchestrator.turn import Handoff, Speak, Turn
from orchestrator.warm import CONTEXT_VERSION, context_document
from tests.conftest import SAMPLE_FLOW, with_agents

POOL = "agents-pool"
NUMBERS = [f"+1425555{i:04d}" for i in range(3)]
CALLER = "+14255550199"
REFERENCE = json.dumps({"user": {"id": CALLER}, "conversation": {"id": "x"}, "channelId": "telephony"})


def pooled_flow(size: int = 3, then: str = "target", **exhausted: Any) -> CallFlow:
    flow = load_callflow(SAMPLE_FLOW)
    flow = flow.model_copy(update={"pools": {POOL: Pool(numbers=NUMBERS[:size], grace_seconds=5)}})
    flow = with_agents(
        flow,
        pool=POOL,
        pool_exhausted=PoolExhausted.model_validate({"then": then, **exhausted}),
        max_attempts=5,
        timeout_seconds=30,
    )
    return CallFlow.model_validate(flow.model_dump())  # validated whole, as a file would be


@pytest.fixture
async def redis(redis_client: Redis) -> AsyncIterator[Redis | RedisCluster]:
    if isinstance(redis_client, RedisCluster):
        await redis_client.initialize()  # as the app's start-up ping does
    yield redis_client


def engine_for(redis: Redis | RedisCluster, key_prefix: str, flow: CallFlow, store: RedisCallStore) -> Engine:
    return Engine(store, flow, pools=PoolStore(redis, Keyspace(key_prefix), store.sealer), cache_size=0)


async def start(engine: Engine, call: str) -> None:
    await engine.handle(call, CallStarted(), activity_id=f"{call}-start", reference=REFERENCE, caller=CALLER)


async def ask_for_agent(engine: Engine, call: str, activity: str = "") -> Turn | None:
    return await engine.handle(
        call,
        CallerInput("agent"),
        activity_id=activity or f"{call}-agent-{time.monotonic_ns()}",
        caller=CALLER,
    )


def dialled(turn: Turn | None) -> str | None:
    handoffs = [e for e in (turn.effects if turn else []) if isinstance(e, Handoff)]
    return handoffs[0].target if handoffs else None


def said(turn: Turn | None) -> list[str]:
    return [e.prompt.name for e in (turn.effects if turn else []) if isinstance(e, Speak)]


async def test_a_transfer_dials_a_leased_number_whose_context_the_agent_side_claims(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine = engine_for(redis, key_prefix, pooled_flow(), store)
    await start(engine, "c1")
    await engine.handle("c1", CallerInput("my order is late"), activity_id="c1-said", caller=CALLER)
    turn = await ask_for_agent(engine, "c1")
    number = dialled(turn)
    assert number in NUMBERS
    assert turn is not None and turn.call.target == number
    assert engine.leases[POOL] == 1
    assert [(o.outcome, o.target) for o in turn.outcomes] == [("started", f"pool:{POOL}")]  # not per number

    pools = PoolStore(redis, Keyspace(key_prefix), store.sealer)  # the agent side: any instance
    claimed = await pools.claim(POOL, number, grace_seconds=5)
    assert claimed is not None and claimed.call == "c1" and claimed.fresh
    context = json.loads(claimed.context)
    assert context["version"] == CONTEXT_VERSION
    assert (context["pool"], context["queue"], context["attempt"]) == (POOL, "agents", 1)
    assert context["reason"] == 'said "agent"'
    assert context["caller"] == "+********199"  # masked: the last third at most
    assert [line["text"] for line in context["transcript"] if line["role"] == "caller"] == [
        "my order is late",
        "agent",
    ]
    assert context["started"] <= context["transferred"]
    # The context is sealed in Redis: the caller's words are not there in clear.
    raw = await redis.get(Keyspace(key_prefix).pool_context(POOL, number))
    # (whole phrases: a short one may turn up in random base64 by chance)
    assert isinstance(raw, str) and raw.startswith("gAAAAA")  # a Fernet token
    assert "my order is late" not in raw and CALLER not in raw
    assert store.sealer.open(raw) is not None
    assert claimed.until <= claimed.claimed + 5000  # a claim brings the lease to its grace

    await engine.handle("c1", ContextClaimed(number, "ana from 127.0.0.1"), activity_id=f"claim:{number}:x")
    steps = [step for _, step in await store.history("c1")]
    assert steps[-1].trigger == "claimed" and "ana from 127.0.0.1" in steps[-1].reason


async def test_a_failed_transfer_gives_its_number_back_and_the_retry_leases_again(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine = engine_for(redis, key_prefix, pooled_flow(size=1), store)
    pools = PoolStore(redis, Keyspace(key_prefix), store.sealer)
    await start(engine, "c1")
    assert dialled(await ask_for_agent(engine, "c1")) == NUMBERS[0]
    assert await pools.status(POOL, NUMBERS[:1]) == PoolStatus(free=0, leased=1, claimed=0, lapsed=0)
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="c1-failed")
    await engine.settled()
    assert await pools.status(POOL, NUMBERS[:1]) == PoolStatus(free=1, leased=0, claimed=0, lapsed=0)
    assert await redis.get(Keyspace(key_prefix).pool_context(POOL, NUMBERS[0])) is None
    turn = await ask_for_agent(engine, "c1")
    assert dialled(turn) == NUMBERS[0] and turn is not None and turn.call.attempts == 2
    lease = await pools.claim(POOL, NUMBERS[0])
    assert lease is not None and lease.key == "t2" and json.loads(lease.context)["attempt"] == 2


@pytest.mark.parametrize("connected", ["accepted", "telephony"])
async def test_a_connected_transfer_keeps_its_number_for_the_grace_then_the_handback_frees_it(
    redis: Redis, key_prefix: str, store: RedisCallStore, connected: str
) -> None:
    engine = engine_for(redis, key_prefix, pooled_flow(size=1), store)
    pools = PoolStore(redis, Keyspace(key_prefix), store.sealer)
    await start(engine, "c1")
    await ask_for_agent(engine, "c1")
    before = await pools.claim(POOL, NUMBERS[0])  # no grace: the lease stays as it was
    assert before is not None and before.until - before.since == 35_000  # watchdog 30 s + grace 5 s
    if connected == "accepted":
        await engine.handle("c1", HandoffStatus("accepted"), activity_id="c1-accepted")
    else:  # the Telephony channel: the bot is dropped from the call when it connects
        await engine.handle("c1", CallEnded(), activity_id="c1-ended")
    await engine.settled()
    after = await pools.claim(POOL, NUMBERS[0])
    assert after is not None and after.until < before.until  # within the grace of the connect
    assert await redis.pttl(Keyspace(key_prefix).pool_context(POOL, NUMBERS[0])) <= 5000
    if connected == "accepted":
        await engine.handle("c1", HandoffStatus("completed"), activity_id="c1-completed")
        await engine.settled()
        assert (await pools.status(POOL, NUMBERS[:1])).free == 1


async def test_redeliveries_and_racing_deliveries_hold_one_number(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine = engine_for(redis, key_prefix, pooled_flow(), store)
    pools = PoolStore(redis, Keyspace(key_prefix), store.sealer)
    await start(engine, "c1")
    turns = await asyncio.gather(*(ask_for_agent(engine, "c1", "one-activity") for _ in range(5)))
    applied = [turn for turn in turns if turn is not None]
    assert len(applied) == 1
    await engine.settled()
    assert await pools.status(POOL, NUMBERS) == PoolStatus(free=2, leased=1, claimed=0, lapsed=0)
    assert engine.leases[POOL] == 1


async def test_an_exhausted_pool_dials_the_queues_target_when_it_says_so(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine = engine_for(redis, key_prefix, pooled_flow(size=1), store)
    await start(engine, "c1")
    await start(engine, "c2")
    assert dialled(await ask_for_agent(engine, "c1")) == NUMBERS[0]
    turn = await ask_for_agent(engine, "c2")
    assert dialled(turn) == "+14251231234"  # the queue's own target, cold
    assert engine.exhausted[POOL] == 1
    steps = [step for _, step in await store.history("c2")]
    assert any(
        s.trigger == "pool" and "exhausted: transferring to the queue's target" in s.reason for s in steps
    )
    await engine.handle("c2", HandoffStatus("failed"), activity_id="c2-failed")
    await engine.settled()  # a cold transfer's failure gives back nothing it does not hold
    assert (await PoolStore(redis, Keyspace(key_prefix)).status(POOL, NUMBERS[:1])).leased == 1


async def ask_on_a_full_pool(
    redis: Redis | RedisCluster, key_prefix: str, store: RedisCallStore, **exhausted: Any
) -> tuple[Engine, Turn | None]:
    """c1 holds a one-number pool's number, then c2 asks for an agent: the engine and c2's
    turn. ``exhausted`` is the pool's ``pool_exhausted`` (``then``, ``say``, ...)."""
    engine = engine_for(redis, key_prefix, pooled_flow(size=1, **exhausted), store)
    await start(engine, "c1")
    await start(engine, "c2")
    await ask_for_agent(engine, "c1")
    return engine, await ask_for_agent(engine, "c2")


async def test_an_exhausted_pool_fails_the_transfer_with_the_queues_final_prompt(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    _, turn = await ask_on_a_full_pool(redis, key_prefix, store, then="fail")
    assert dialled(turn) is None and said(turn) == ["transfer_final"]
    assert turn is not None and turn.call.state == "bot" and turn.call.attempts == 0


async def test_an_exhausted_pool_holds_the_caller_then_leases_when_a_number_comes_free(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine, held = await ask_on_a_full_pool(
        redis, key_prefix, store, then="hold", say=["handback"], seconds=1, max=2
    )
    assert held is not None and dialled(held) is None and said(held) == ["handback"]
    assert held.call.holding == "agent" and held.call.holds == 1 and held.timer_seconds > 1
    # On hold, what no route takes changes nothing (the hold's timer stands).
    assert await engine.handle("c2", CallerInput("hello?"), activity_id="c2-hello") is not None
    call = (await store.load("c2")).call
    assert call is not None and call.holding == "agent" and call.deadline_ms == held.call.deadline_ms
    # The hold is over while the pool is still exhausted: hold 2.
    again = await engine.handle("c2", TimerExpired(call.deadline_ms), only_if_changed=True)
    assert again is not None and again.call.holds == 2 and said(again) == ["handback"]
    await engine.handle("c1", HandoffStatus("failed"), activity_id="c1-failed")
    await engine.settled()
    call = (await store.load("c2")).call
    assert call is not None
    turn = await engine.handle("c2", TimerExpired(call.deadline_ms), only_if_changed=True)
    assert dialled(turn) == NUMBERS[0]
    assert turn is not None and turn.call.holding == "" and turn.call.holds == 0


async def test_holds_run_out_into_the_final_prompt(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine, held = await ask_on_a_full_pool(
        redis, key_prefix, store, then="hold", say=["handback"], seconds=1, max=1
    )
    assert held is not None and held.call.holds == 1
    turn = await engine.handle("c2", TimerExpired(held.call.deadline_ms + 1), only_if_changed=True)
    assert said(turn) == ["transfer_final"] and dialled(turn) is None
    assert turn is not None and turn.call.holding == "" and turn.call.deadline_ms == 0
    steps = [step.reason for _, step in await store.history("c2")]
    assert "pool agents-pool exhausted after 1 holds: the transfer fails" in steps


async def test_a_caller_who_hangs_up_on_hold_leaves_nothing_held(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    engine, _ = await ask_on_a_full_pool(redis, key_prefix, store, then="hold", seconds=1)
    turn = await engine.handle("c2", CallEnded(), activity_id="c2-ended")
    assert turn is not None and turn.call.state == "ended" and dialled(turn) is None
    assert turn.call.holding == "" and turn.call.deadline_ms == 0


class RecordingPools(PoolStore):
    """A pool store that keeps every lease's interval in Redis time: from its ``since`` to
    its release, its settled end, or its ``until`` (a lapse)."""

    def __init__(self, *args: Any, intervals: dict[tuple[str, str, str], list[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intervals = intervals  # (number, call, key) -> [since, end]

    async def lease(
        self,
        pool: str,
        numbers: list[str],
        conversation_id: str,
        lease_key: str,
        seconds: float,
        context: str = "",
        previous: str = "",
    ) -> Any:
        # The lease script releases the call's previous attempt's number itself, at a time
        # it does not return: release it here first, so its interval's end is known.
        for number, call, key in list(self.intervals):
            if (call, key) == (conversation_id, previous):
                await self.release(pool, number, call, key)
        got = await super().lease(pool, numbers, conversation_id, lease_key, seconds, context, previous)
        if got is not None:
            self.intervals.setdefault((got.number, conversation_id, lease_key), [got.since, got.until])
        return got

    def _end(self, number: str, call: str, key: str, ended: int | None) -> int | None:
        interval = self.intervals.get((number, call, key))
        if ended is not None and interval is not None:
            interval[1] = min(interval[1], ended)
        return ended

    async def release(self, pool: str, number: str, conversation_id: str, lease_key: str) -> int | None:
        ended = await super().release(pool, number, conversation_id, lease_key)
        return self._end(number, conversation_id, lease_key, ended)

    async def settle(
        self, pool: str, number: str, conversation_id: str, lease_key: str, seconds: float
    ) -> int | None:
        ends = await super().settle(pool, number, conversation_id, lease_key, seconds)
        return self._end(number, conversation_id, lease_key, ends)


@pytest.mark.parametrize(
    "calls", [pytest.param(300, id="300"), pytest.param(3000, id="3000", marks=pytest.mark.heavy)]
)
async def test_many_transfers_on_three_instances_never_share_a_number(
    instance_clients: list[Redis | RedisCluster], key_prefix: str, store: RedisCallStore, calls: int
) -> None:
    """Contention through the turn path: calls on 3 instances (an engine and a Redis client
    each) ask for an agent at once, twice, on a pool of 20. Every lease's interval, in Redis
    time, overlaps no other on its number; every number ends free or inside its grace."""
    numbers = [f"+1425556{i:04d}" for i in range(20)]
    flow = pooled_flow(then="target")
    # A short grace: connected transfers' numbers come back within the run, and are no lapse.
    flow = flow.model_copy(update={"pools": {POOL: Pool(numbers=numbers, grace_seconds=0.3)}})
    intervals: dict[tuple[str, str, str], list[int]] = {}
    engines = []
    for client in instance_clients:
        calls_store = RedisCallStore(client, store.keys, store.retention, store.sealer)
        pools = RecordingPools(client, store.keys, store.sealer, intervals=intervals)
        engines.append(Engine(calls_store, flow, pools=pools, cache_size=0))
    rng = random.Random(15)
    lines = asyncio.Semaphore(240)  # calls at once: within redis-py's 100 connections a client
    cold = 0

    async def one_call(i: int) -> None:
        nonlocal cold
        async with lines:
            call = f"call-{i}"
            await start(engines[i % 3], call)
            for attempt in range(2):
                await asyncio.sleep(rng.uniform(0, 0.2))
                number = dialled(await ask_for_agent(engines[(i + attempt) % 3], call))
                cold += number == "+14251231234"
                await asyncio.sleep(rng.uniform(0, 0.1))
                if rng.random() < 0.3:  # the Telephony channel's connect: the call leaves the bot
                    await engines[(i + 2) % 3].handle(call, CallEnded(), activity_id=f"{call}-ended")
                    return
                failed = HandoffStatus("failed")
                await engines[(i + 1) % 3].handle(call, failed, activity_id=f"{call}-f{attempt}")

    await asyncio.gather(*(one_call(i) for i in range(calls)))
    for engine in engines:
        await engine.settled()
    by_number: dict[str, list[tuple[int, int, str]]] = {}
    for (number, call, _key), (since, end) in intervals.items():
        by_number.setdefault(number, []).append((since, end, call))
    overlaps = [
        (number, a, b)
        for number, held in by_number.items()
        for a, b in pairwise(sorted(held))
        if b[0] < a[1]  # the next lease began before this one ended
    ]
    assert overlaps == []
    leased = sum(e.leases[POOL] for e in engines)
    exhausted = sum(e.exhausted[POOL] for e in engines)
    assert len(intervals) == leased > 20
    assert exhausted == cold > 0  # exhausted: a cold transfer to the queue's target, as configured
    status = await engines[0].pools.status(POOL, numbers)  # type: ignore[union-attr]
    # Released on failure; a connected transfer's number is kept for its grace, no lapse.
    assert status.leased + status.free == 20 and status.claimed == status.lapsed == 0
    assert sum(e.lapses[POOL] for e in engines) == 0
    print(
        f"\n{calls} calls, {leased + exhausted} transfers on a pool of 20 over 3 instances: "
        f"{leased} leased, {exhausted} found it exhausted (cold), overlaps 0, "
        f"{status.leased} in their grace, {status.free} free, lapsed 0"
    )


class GatedPools(PoolStore):
    """A pool store whose leases wait, once leased, until the test lets them return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leased, self.go_on = asyncio.Event(), asyncio.Event()

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        got = await super().lease(*args, **kwargs)
        self.leased.set()
        await self.go_on.wait()
        return got


async def test_a_number_leased_by_a_turn_that_lost_its_race_is_given_back(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """A turn leases for a transfer; before it commits, another instance ends the call. Its
    commit conflicts, the rerun transfers nothing, and the number goes back rather than
    waiting out its lease."""
    flow = pooled_flow(size=1)
    pools = GatedPools(redis, Keyspace(key_prefix), store.sealer)
    racing = Engine(store, flow, pools=pools, cache_size=0)
    other = engine_for(redis, key_prefix, flow, store)
    await start(other, "c1")
    asking = asyncio.create_task(ask_for_agent(racing, "c1"))
    await pools.leased.wait()  # leased, not yet committed
    await other.handle("c1", CallEnded(), activity_id="c1-ended")
    pools.go_on.set()
    turn = await asking
    assert racing.conflicts == 1, "the test must actually make the turns race"
    assert turn is not None and turn.call.state == "ended" and dialled(turn) is None
    await racing.settled()
    assert await pools.status(POOL, NUMBERS[:1]) == PoolStatus(free=1, leased=0, claimed=0, lapsed=0)
    assert racing.leases[POOL] == 0


async def test_a_turn_from_a_stale_cached_copy_reads_the_call_before_it_leases(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """A cached copy can tell neither a redelivery nor the call's real transfer: the turn
    reads the call first. A redelivery of the retry to an instance whose copy is two
    attempts old leases nothing (it held a second number, for good, before)."""
    flow = pooled_flow()
    pools = PoolStore(redis, Keyspace(key_prefix), store.sealer)
    behind = Engine(store, flow, pools=pools, cache_size=100)
    ahead = Engine(store, flow, pools=pools, cache_size=100)
    await start(behind, "c1")  # behind keeps this copy: no transfer yet
    await ask_for_agent(ahead, "c1", "first")
    await ahead.handle("c1", HandoffStatus("failed"), activity_id="c1-failed")
    retry = await ask_for_agent(ahead, "c1", "retry")
    assert dialled(retry) in NUMBERS and retry is not None and retry.call.attempts == 2
    assert await ask_for_agent(behind, "c1", "retry") is None  # the channel redelivers it
    assert behind.duplicates == 1
    await ahead.settled()
    await behind.settled()
    assert await pools.status(POOL, NUMBERS) == PoolStatus(free=2, leased=1, claimed=0, lapsed=0)


async def test_a_started_warm_transfer_is_pushed_signed_with_its_number(
    redis: Redis, key_prefix: str, store: RedisCallStore, unused_tcp_port: int
) -> None:
    from aiohttp import web

    from adapters.push import Pusher, verify

    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify("push-secret-0123456789", request.headers["X-CC-Signature"], body)
        received.append({"id": request.headers["X-CC-Event-Id"], **json.loads(body)})
        arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    pusher = Pusher(f"http://127.0.0.1:{unused_tcp_port}/hook", "push-secret-0123456789")
    pusher.start()
    try:
        engine = Engine(
            store,
            pooled_flow(),
            pools=PoolStore(redis, Keyspace(key_prefix), store.sealer),
            notify=lambda event, document: pusher.submit(event, dict(document)),
        )
        await start(engine, "c1")
        turn = await ask_for_agent(engine, "c1")
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await pusher.close()
        await runner.cleanup()
    assert len(received) == 1 and turn is not None
    push = received[0]
    assert push["id"] == "c1:t1" and push["number"] == dialled(turn)
    assert (push["queue"], push["attempt"], push["caller"]) == ("agents", 1, "+********199")
    assert pusher.counts()["sent"] == 1


async def test_a_retry_at_once_after_a_failure_gets_a_number_from_a_pool_of_one(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """The failure's release runs after its turn, in the background: a retry that comes
    first must still find the pool's one number, its own (the lease releases it)."""
    engine = engine_for(redis, key_prefix, pooled_flow(size=1), store)
    await start(engine, "c1")
    for attempt in range(1, 4):
        turn = await ask_for_agent(engine, "c1")
        assert dialled(turn) == NUMBERS[0] and turn is not None and turn.call.attempts == attempt
        await engine.handle("c1", HandoffStatus("failed"), activity_id=f"c1-failed-{attempt}")
    assert engine.exhausted[POOL] == 0
    await engine.settled()
    status = await PoolStore(redis, Keyspace(key_prefix)).status(POOL, NUMBERS[:1])
    assert status == PoolStatus(free=1, leased=0, claimed=0, lapsed=0)


async def test_a_hold_whose_transfer_left_the_flow_is_let_go(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """A flow deployed without the node a caller holds for: the caller is no longer on hold
    (input is taken as at any menu again), rather than stuck ignoring everything."""
    _, held = await ask_on_a_full_pool(redis, key_prefix, store, then="hold", seconds=1)
    assert held is not None and held.call.holding == "agent"
    flow = pooled_flow(size=1, then="hold", seconds=1)
    nodes = {**flow.nodes, "agent2": flow.nodes["agent"]}
    del nodes["agent"]
    routes = [r.model_copy(update={"to": "agent2"}) if r.to == "agent" else r for r in flow.routes]
    changed = CallFlow.model_validate(
        {
            **flow.model_dump(),
            "nodes": {k: v.model_dump() for k, v in nodes.items()},
            "routes": [r.model_dump() for r in routes],
        }
    )
    other = engine_for(redis, key_prefix, changed, store)
    turn = await other.handle("c2", CallerInput("hello"), activity_id="c2-hello", caller=CALLER)
    assert turn is not None and turn.call.holding == "" and turn.call.holds == 0
    assert turn.effects  # answered as at the menu (the sample flow echoes), not ignored


async def test_each_transfer_has_its_own_lease_key_across_queues(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """Attempts count per queue, and start again at another queue: a lease key counts the
    call's transfers instead, so two transfers never share a push's event id or a claim."""
    doc = pooled_flow().model_dump()
    doc["queues"]["sales"] = {**doc["queues"]["agents"], "pool": POOL}
    doc["nodes"]["sales"] = {"type": "transfer", "queue": "sales"}
    doc["routes"].append({"key": "2", "phrases": ["sales"], "to": "sales"})
    flow = CallFlow.model_validate(doc)
    pushed: list[str] = []
    engine = Engine(
        store,
        flow,
        pools=PoolStore(redis, Keyspace(key_prefix), store.sealer),
        notify=lambda event, document: pushed.append(f"{event} {document['queue']} {document['attempt']}"),
    )
    await start(engine, "c1")
    for said in ("agent", "sales", "agent"):
        await engine.handle("c1", CallerInput(said), activity_id=f"c1-{said}-{len(pushed)}", caller=CALLER)
        await engine.handle("c1", HandoffStatus("failed"), activity_id=f"c1-failed-{len(pushed)}")
    assert pushed == ["c1:t1 agents 1", "c1:t2 sales 1", "c1:t3 agents 1"]


@pytest.mark.parametrize("reference", ["", "[]", "not json", '{"user": "x"}', '{"user": {}}'])
def test_a_context_without_a_readable_caller_says_none(reference: str) -> None:
    """The caller's number comes from the stored conversation reference, read as the bot's
    replies read it: any reference that names no caller gives "" (a reference edited by
    hand into a JSON list broke the turn before)."""
    call = Call(id="c1", reference=reference)
    context = context_document(
        call,
        pool=POOL,
        queue="agents",
        reason="r",
        attempt=1,
        privacy=Privacy(),
        now="2026-12-05T00:00:00.000Z",
    )
    assert context["caller"] == ""


async def test_a_caller_held_after_a_failure_who_takes_a_route_is_back_with_the_bot(
    redis: Redis, key_prefix: str, store: RedisCallStore
) -> None:
    """Held after a failed transfer, the caller presses 1 (billing): as from any menu, the
    call is back with the bot, not left failed at the billing menu."""
    engine = engine_for(redis, key_prefix, pooled_flow(size=1, then="hold", seconds=1), store)
    await start(engine, "c1")
    await start(engine, "c2")
    await ask_for_agent(engine, "c2")
    await engine.handle("c2", HandoffStatus("failed"), activity_id="c2-failed")
    await engine.settled()
    await ask_for_agent(engine, "c1")  # c1 takes the one number
    held = await ask_for_agent(engine, "c2")
    assert held is not None and held.call.state == "failed" and held.call.holding == "agent"
    turn = await engine.handle("c2", CallerInput("1", keypad=True), activity_id="c2-one", caller=CALLER)
    assert turn is not None and turn.call.node == "billing" and turn.call.holding == ""
    assert turn.call.state == "bot"
