"""Watchdogs and outbox re-sends: due work in Redis, claimed with leases, done exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from botbuilder.schema import Activity
from redis.asyncio import Redis

from adapters.bot import from_outbox, outbox_payload, rendered
from adapters.keys import Due, Keyspace
from adapters.sealing import Sealer
from adapters.store import RedisCallStore, Retention
from orchestrator import scheduler as scheduler_module
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.engine import Engine, Replies
from orchestrator.events import CallEnded, CallerInput, HandoffStatus
from orchestrator.scheduler import TIMER, DueItem, Scheduler
from orchestrator.turn import TIMEOUT, Turn
from tests.conftest import SAMPLE_FLOW

REFERENCE = '{"conversation":{"id":"%s"},"serviceUrl":"http://127.0.0.1:9/","channelId":"telephony"}'


class RecordingChannel:
    """Stands in for the bot's proactive path: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Activity]]] = []

    def render(self, turn: Turn) -> Replies:
        return rendered(turn, None, Sealer.from_setting(None))

    async def send(self, reference: str, replies: list[Any]) -> None:
        self.sent.append((reference, replies))

    def from_outbox(self, payload: str, version: int, *, ended: bool = False) -> list[Any]:
        return from_outbox(payload, version, ended=ended)

    def texts(self) -> list[str]:
        return [reply.text for _, replies in self.sent for reply in replies]


def flow(timeout: float = 1, max_attempts: int = 5) -> CallFlow:
    data = load_callflow(SAMPLE_FLOW).model_dump()
    data["queues"]["agents"].update(timeout_seconds=timeout, max_attempts=max_attempts)
    return CallFlow.model_validate(data)


@pytest.fixture
def quick_store(redis_client: Redis, key_prefix: str) -> RedisCallStore:
    """Outbox entries come due 200 ms after their commit."""
    return RedisCallStore(redis_client, Keyspace(key_prefix), Retention(outbox_grace_ms=200))


async def until(condition: Callable[[], Any], scheduler: Scheduler, within: float = 10) -> None:
    """Poll the scheduler until ``condition()`` holds (waiting for Redis time to pass)."""
    async with asyncio.timeout(within):
        while not condition():
            await scheduler.poll()
            await asyncio.sleep(0.05)


def members(items: list[DueItem]) -> list[tuple[str, str, str]]:
    return [(item.kind, item.conversation_id, item.member) for item in items]


async def transfer(engine: Engine, call: str) -> Turn:
    turn = await engine.handle(
        call, CallerInput("agent"), activity_id=f"{call}-agent", reference=REFERENCE % call
    )
    assert turn is not None and turn.call.state == "transferring"
    return turn


async def test_a_watchdog_is_scheduled_exactly_while_transferring(quick_store: RedisCallStore) -> None:
    engine = Engine(quick_store, flow(timeout=60))
    turn = await transfer(engine, "c1")
    due = quick_store.keys.due_for("c1")
    assert await quick_store.redis.zscore(due, Due.timer("c1")) == turn.call.deadline_ms
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1")
    assert await quick_store.redis.zscore(due, Due.timer("c1")) is None


async def test_the_watchdog_fails_an_unanswered_transfer_once(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=1)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    await until(lambda: scheduler.fired == 1, scheduler)
    call = (await quick_store.load("c1")).call
    assert call is not None and call.state == "failed" and call.failure == TIMEOUT
    assert channel.texts() == [load_callflow(SAMPLE_FLOW).prompts["transfer_retry"].text]
    assert channel.sent[0][0] == REFERENCE % "c1"
    for _ in range(5):
        await scheduler.poll()
    assert scheduler.fired == 1 and len(channel.sent) == 1
    steps = [(s.source, s.dest, s.reason) for _, s in await quick_store.history("c1")]
    assert steps[-1] == ("transferring", "failed", TIMEOUT)
    assert await quick_store.redis.zcard(quick_store.keys.due_for("c1")) == 0  # acknowledged


async def test_a_status_racing_the_timeout_has_exactly_one_winner(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=1)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    calls = [f"race-{i}" for i in range(20)]
    for call in calls:
        await transfer(engine, call)
    await asyncio.sleep(1.1)  # every deadline has passed
    statuses = [
        engine.handle(
            call, HandoffStatus("failed", "busy"), activity_id=f"{call}-failed", render=channel.render
        )
        for call in calls
    ]
    _, *results = await asyncio.gather(scheduler.poll(), *statuses)
    status_wins = sum(isinstance(turn, Turn) and turn.changed_state for turn in results)
    assert status_wins + scheduler.fired == len(calls)
    for call in calls:
        fails = [
            s for _, s in await quick_store.history(call) if (s.source, s.dest) == ("transferring", "failed")
        ]
        assert len(fails) == 1, call


async def test_a_timer_for_an_attempt_that_ended_does_nothing(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=1)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1")
    await asyncio.sleep(1.1)  # the first attempt's deadline has passed
    await engine.handle("c1", CallerInput("agent"), activity_id="a2")
    second = (await quick_store.load("c1")).call
    assert second is not None and second.attempts == 2
    # The first attempt's watchdog, claimed now by a slow instance:
    seconds, micros = await quick_store.redis.time()
    now_ms = seconds * 1000 + micros // 1000
    await scheduler._timer(DueItem(TIMER, "c1", "", Keyspace.locate("c1")[0], Due.timer("c1"), now_ms))
    after = (await quick_store.load("c1")).call
    assert after is not None and after.state == "transferring" and after.version == second.version
    assert scheduler.fired == 0 and channel.sent == []
    assert (
        await quick_store.redis.zscore(quick_store.keys.due_for("c1"), Due.timer("c1")) == second.deadline_ms
    )


async def test_a_lapsed_lease_is_claimed_again_and_released_work_at_once(quick_store: RedisCallStore) -> None:
    engine = Engine(quick_store, flow(timeout=60))
    await transfer(engine, "c1")
    due = quick_store.keys.due_for("c1")
    await quick_store.redis.zadd(due, {Due.timer("c1"): 0})  # due now
    claimed_items = await quick_store.claim_due(10, lease_ms=300)
    claimed = members(claimed_items)
    assert claimed == [("timer", "c1", Due.timer("c1"))]
    assert await quick_store.claim_due(10, lease_ms=300) == []  # leased to the first claimer
    await asyncio.sleep(0.4)  # the claimer died; its lease lapses
    again = await quick_store.claim_due(10, lease_ms=60_000)
    assert members(again) == claimed
    await quick_store.release(claimed_items, 300)  # a lapsed lease, re-claimed since: not ours
    assert await quick_store.claim_due(10, lease_ms=60_000) == []
    await quick_store.release(again, 60_000)  # a clean shutdown hands back its own claim
    assert members(await quick_store.claim_due(10, lease_ms=60_000)) == claimed


async def test_replies_in_the_outbox_never_acknowledged_are_sent_again(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=60)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    turn = await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1", render=channel.render)
    assert turn is not None and turn.outbox_key == "s1"  # in the outbox with the commit
    # ... and the instance died before sending: nobody acknowledges.
    await until(lambda: scheduler.resent == 1, scheduler)
    assert channel.texts() == [load_callflow(SAMPLE_FLOW).prompts["transfer_retry"].text]
    assert await quick_store.redis.hlen(quick_store.keys.call("c1").outbox) == 0
    assert await quick_store.redis.zcard(quick_store.keys.due_for("c1")) == 0


async def test_acknowledged_replies_are_not_sent_again(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=60)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    turn = await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1", render=channel.render)
    assert turn is not None
    await quick_store.acknowledge("c1", turn.outbox_key)
    await asyncio.sleep(0.3)
    for _ in range(3):
        await scheduler.poll()
    assert channel.sent == [] and scheduler.resent == 0


async def test_ordinary_replies_are_not_kept_in_the_outbox_when_sent(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow()), RecordingChannel()
    turn = await engine.handle("c1", CallerInput("hello"), activity_id="m1", render=channel.render)
    assert turn is not None and turn.replies and not turn.must_arrive and turn.outbox_key == ""
    assert await quick_store.redis.hlen(quick_store.keys.call("c1").outbox) == 0


async def test_work_claimed_at_shutdown_is_handed_back(quick_store: RedisCallStore) -> None:
    """SIGTERM cancels the scheduler mid-work; what it held is due again at once."""
    engine = Engine(quick_store, flow(timeout=60))
    sending = asyncio.Event()

    class StuckChannel(RecordingChannel):
        async def send(self, reference: str, replies: list[Any]) -> None:
            sending.set()
            await asyncio.sleep(3600)

    channel = StuckChannel()
    scheduler = Scheduler(engine, quick_store, channel, lease_seconds=600)
    await transfer(engine, "c1")
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1", render=channel.render)
    await asyncio.sleep(0.3)  # the retry prompt in the outbox comes due, unacknowledged
    polling = asyncio.create_task(scheduler.poll())
    await asyncio.wait_for(sending.wait(), 10)
    polling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await polling
    assert await quick_store.claim_due(10, 600_000) == []  # still leased to us
    await scheduler.release()
    items = await quick_store.claim_due(10, 600_000)
    assert [(item.kind, item.key) for item in items] == [("outbox", "s1")]


async def test_a_bad_shard_or_an_unreadable_member_does_not_stop_the_others(
    quick_store: RedisCallStore,
) -> None:
    engine, channel = Engine(quick_store, flow(timeout=1)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    shard = Keyspace.locate("c1")[0]
    other = (shard + 1) % 64
    await quick_store.redis.set(quick_store.keys.due(other), "not a sorted set")  # WRONGTYPE
    unreadable = '["reminder"]'  # written by some future version
    await quick_store.redis.zadd(quick_store.keys.due(shard), {unreadable: 0})
    await until(lambda: scheduler.fired == 1, scheduler)
    assert channel.texts() == [load_callflow(SAMPLE_FLOW).prompts["transfer_retry"].text]
    assert await quick_store.redis.zscore(quick_store.keys.due(shard), unreadable) is not None  # left alone
    await quick_store.redis.delete(quick_store.keys.due(other))


async def test_outbox_entries_of_a_call_that_ended_are_dropped_not_sent(quick_store: RedisCallStore) -> None:
    engine, channel = Engine(quick_store, flow(timeout=60)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1", render=channel.render)
    await engine.handle("c1", CallEnded(), activity_id="bye")
    await asyncio.sleep(0.3)  # the prompt in the outbox comes due, unacknowledged
    for _ in range(3):
        await scheduler.poll()
    assert channel.sent == []
    assert await quick_store.redis.hlen(quick_store.keys.call("c1").outbox) == 0
    assert await quick_store.redis.zcard(quick_store.keys.due_for("c1")) == 0


async def test_a_running_scheduler_prunes_entries_of_expired_calls(
    redis_client: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside its polling, every instance reconciles the state indexes with the records."""
    monkeypatch.setattr("orchestrator.scheduler.PRUNE_SECONDS", 0.05)
    # "gone" is long expired; "kept" stays live (a 1 s TTL let a slow run expire it too).
    store = RedisCallStore(redis_client, Keyspace(key_prefix), Retention(live_seconds=60, ended_seconds=60))
    engine = Engine(store, flow(timeout=20))
    await engine.handle("kept", CallerInput("hi"), activity_id="a")
    await engine.handle("gone", CallerInput("hi"), activity_id="a")
    await redis_client.delete(store.keys.call("gone").call)  # expired without ending
    shard = store.keys.locate("gone")[0]
    index = store.keys.state_index(shard, "bot")
    await redis_client.zadd(index, {"gone": 1})  # and long ago
    scheduler = Scheduler(engine, store, RecordingChannel(), poll_seconds=0.05)
    running = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(10):
            while await redis_client.zscore(index, "gone") is not None:  # noqa: ASYNC110 (Redis, not a local event)
                await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    kept = store.keys.locate("kept")[0]
    assert await redis_client.zscore(store.keys.state_index(kept, "bot"), "kept") is not None


class LosesCancellation(RedisCallStore):
    """A store whose claim returns normally when cancelled, as Python 3.11's
    ``asyncio.wait_for`` inside redis-py and fakeredis sometimes does (CPython gh-86296)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claiming = asyncio.Event()

    async def claim_due(self, limit: int, lease_ms: int) -> list[DueItem]:
        self.claiming.set()
        with contextlib.suppress(asyncio.CancelledError):  # the cancellation is lost here
            await asyncio.sleep(60)
        return []


async def test_a_cancelled_scheduler_stops_even_if_a_redis_call_lost_the_cancellation(
    redis_client: Redis, key_prefix: str
) -> None:
    store = LosesCancellation(redis_client, Keyspace(key_prefix))
    scheduler = Scheduler(Engine(store, flow()), store, RecordingChannel(), poll_seconds=0.05)
    running = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(store.claiming.wait(), 10)
    running.cancel()
    done, _ = await asyncio.wait([running], timeout=10)
    assert running in done and running.cancelled()


async def test_outbox_entries_go_stale_by_when_they_were_kept_even_on_a_busy_call(
    quick_store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staleness was judged by the call's last update, so on a call that kept talking a reply
    the channel kept refusing was sent again for ever (the Telephony channel drops a bot
    that errors). It is judged by when the reply went in the outbox."""
    monkeypatch.setattr(scheduler_module, "MAX_KEPT_MS", 400)
    engine, channel = Engine(quick_store, flow(timeout=60)), RecordingChannel()
    scheduler = Scheduler(engine, quick_store, channel)
    await transfer(engine, "c1")
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="s1", render=channel.render)
    for n in range(6):  # the caller keeps talking while the kept prompt is never acknowledged
        await asyncio.sleep(0.1)
        await engine.handle("c1", CallerInput(f"hello {n}"), activity_id=f"m{n}", render=channel.render)
    channel.sent.clear()
    for _ in range(3):
        await scheduler.poll()
    assert channel.sent == [] and scheduler.resent == 0  # dropped, not sent once more
    assert await quick_store.redis.hlen(quick_store.keys.call("c1").outbox) == 0


async def kept_after_a_failed_send(store: RedisCallStore) -> tuple[Engine, RecordingChannel, Scheduler, Turn]:
    """An ordinary turn of call c1 (not kept by its commit) whose send failed: the bot kept
    its replies in the outbox."""
    engine, channel = Engine(store, flow()), RecordingChannel()
    turn = await engine.handle(
        "c1", CallerInput("hello"), activity_id="m1", reference=REFERENCE % "c1", render=channel.render
    )
    assert turn is not None and turn.outbox_key == ""
    await store.keep("c1", "m1", outbox_payload(turn.replies, turn.call.reference, turn.call.version))
    return engine, channel, Scheduler(engine, store, channel), turn


async def test_an_ordinary_reply_kept_after_its_send_failed_is_re_sent_while_the_call_waits(
    quick_store: RedisCallStore,
) -> None:
    _, channel, scheduler, turn = await kept_after_a_failed_send(quick_store)
    await until(lambda: scheduler.resent == 1, scheduler)
    assert channel.texts() == [reply.text for reply in turn.replies]


async def test_an_ordinary_reply_kept_after_its_send_failed_is_dropped_once_the_call_moves_on(
    quick_store: RedisCallStore,
) -> None:
    """Said after a later turn's reply it would be out of order: the caller has moved on."""
    engine, channel, scheduler, _ = await kept_after_a_failed_send(quick_store)
    await engine.handle("c1", CallerInput("hello again"), activity_id="m2", render=channel.render)
    for _ in range(3):
        await scheduler.poll()
    assert channel.sent == [] and scheduler.resent == 0
    assert await quick_store.redis.hlen(quick_store.keys.call("c1").outbox) == 0
