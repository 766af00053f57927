"""The turn loop on the embedded fake and a real Redis: many coroutines, one call."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from adapters.store import RedisCallStore
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.engine import Engine
from orchestrator.events import CallEnded, CallerInput, CallStarted, Event, HandoffStatus
from orchestrator.metrics import Metrics
from orchestrator.turn import Handoff, Speak, Turn
from tests.conftest import SAMPLE_FLOW


def generous_flow() -> CallFlow:
    data = load_callflow(SAMPLE_FLOW).model_dump()
    data["queues"]["agents"]["max_attempts"] = 20
    return CallFlow.model_validate(data)


async def test_concurrent_turns_on_one_call_are_serialised(store: RedisCallStore) -> None:
    engine = Engine(store, generous_flow(), transcript_max=50)
    events: list[tuple[str, Event]] = [(f"agent-{i}", CallerInput("agent")) for i in range(6)]
    events += [(f"failed-{i}", HandoffStatus("failed", "busy")) for i in range(6)]
    events += [(f"msg-{i}", CallerInput(f"msg {i}")) for i in range(6)]
    deliveries = [pair for pair in events for _ in range(3)]  # every activity three times
    random.Random(3).shuffle(deliveries)

    results = await asyncio.gather(
        *(engine.handle("call-1", event, activity_id=activity_id) for activity_id, event in deliveries)
    )
    applied: list[Turn] = [turn for turn in results if turn is not None]
    assert len(applied) == len(events), "each distinct activity applied exactly once"
    assert engine.conflicts > 0, "the test must actually make turns race"

    call = (await store.load("call-1")).call
    assert call is not None and call.version == len(events)
    history = [step for _, step in await store.history("call-1")]
    state = "bot"
    for step in history:
        assert step.source == state
        state = step.dest
    assert call.state == state
    transfers = sum(isinstance(e, Handoff) for turn in applied for e in turn.effects)
    assert call.attempts == transfers == sum(s.dest == "transferring" != s.source for s in history)
    retry_prompts = sum(
        isinstance(e, Speak) and e.prompt.name == "transfer_retry" for turn in applied for e in turn.effects
    )
    assert retry_prompts == sum(s.source == "transferring" and s.dest == "failed" for s in history)
    said = Counter(line.text for line in call.transcript if line.role == "caller")
    assert said == Counter({"agent": 6, **{f"msg {i}": 1 for i in range(6)}})


class RoundTrips:
    """Writes to Redis connections (one per round trip: a pipeline is packed into one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.sent: list[object] = []
        original = AbstractConnection.send_packed_command

        async def counting(conn: AbstractConnection, command: object, check_health: bool = True) -> None:
            self.sent.append(command)
            await original(conn, command, check_health)  # type: ignore[arg-type]

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)

    def take(self) -> int:
        count = len(self.sent)
        self.sent.clear()
        return count


async def test_an_ordinary_turn_costs_one_round_trip(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit alone, from this instance's copy of the call; a redelivery is found by the
    commit (one round trip); a new call needs no load either."""
    engine = Engine(store, load_callflow(SAMPLE_FLOW))
    # Scripts loaded and connected to call-1's node (on a cluster), by a call in its shard.
    shard = store.keys.locate("call-1")[0]
    warm = next(f"warm-{n}" for n in range(10_000) if store.keys.locate(f"warm-{n}")[0] == shard)
    await engine.handle(warm, CallerInput("hello"), activity_id="warm")
    trips = RoundTrips(monkeypatch)
    assert await engine.handle("call-1", CallStarted(), activity_id="a0") is not None
    assert trips.take() == 1
    assert await engine.handle("call-1", CallerInput("hello again"), activity_id="a1") is not None
    assert trips.take() == 1
    assert await engine.handle("call-1", CallerInput("hello again"), activity_id="a1") is None
    assert trips.take() == 1
    assert engine.duplicates == 1 and engine.cache.hits == 2 and engine.cache.stale == 0


async def test_a_stale_copy_costs_one_more_round_trip_and_loses_nothing(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances (no sticky routing): each commit finds the other's copy out of date and
    hands back the call as it stands, so the rerun needs no load and no turn is lost."""
    flow = load_callflow(SAMPLE_FLOW)
    first, second = Engine(store, flow), Engine(store, flow)
    await first.handle("call-0", CallerInput("hello"), activity_id="warm")
    await first.handle("call-1", CallStarted(), activity_id="a0")
    await second.handle("call-1", CallerInput("one"), activity_id="a1")  # no copy: load + commit
    trips = RoundTrips(monkeypatch)
    for number in range(2, 6):
        engine = first if number % 2 == 0 else second
        assert await engine.handle("call-1", CallerInput(f"line {number}"), activity_id=f"a{number}")
        assert trips.take() == 2  # the stale commit, and the rerun's
    assert (first.cache.stale, second.cache.stale) == (2, 2)
    assert first.conflicts == second.conflicts == 0  # not races: nobody backed off

    call = (await store.load("call-1")).call
    assert call is not None and call.version == 6
    said = [line.text for line in call.transcript if line.role == "caller"]
    assert said == ["one", "line 2", "line 3", "line 4", "line 5"]


async def test_the_cache_is_bounded_and_forgets_ended_calls(store: RedisCallStore) -> None:
    engine = Engine(store, load_callflow(SAMPLE_FLOW), cache_size=2)
    for number in range(3):
        await engine.handle(f"call-{number}", CallStarted(), activity_id=f"s{number}")
    assert len(engine.cache) == 2 and engine.cache.get("call-0") is None
    await engine.handle("call-2", CallEnded(), activity_id="end")
    assert len(engine.cache) == 1 and engine.cache.get("call-2") is None
    off = Engine(store, load_callflow(SAMPLE_FLOW), cache_size=0)
    await off.handle("call-9", CallStarted(), activity_id="s9")
    assert len(off.cache) == 0


@pytest.mark.parametrize("cached", [True, False])
async def test_a_transfer_outcome_is_timed_from_the_transfer_not_from_the_commit(
    store: RedisCallStore, cached: bool
) -> None:
    """cc_transfer_outcome_seconds measured the ring from the time the outcome's own commit
    set (about 0 s): a ring of 0.3 s was recorded as a few ms. Whether the call comes from
    the instance's copy or from Redis, the ring is timed from entering transferring."""
    metrics = Metrics()
    engine = Engine(store, generous_flow(), metrics=metrics, cache_size=4096 if cached else 0)
    await engine.handle("call-1", CallStarted(), activity_id="a1")
    await engine.handle("call-1", CallerInput("agent"), activity_id="a2")
    await asyncio.sleep(0.3)  # the phone rings
    await engine.handle("call-1", HandoffStatus("failed", "busy"), activity_id="a3")
    rang = metrics.registry.get_sample_value(
        "cc_transfer_outcome_seconds_sum", {"queue": "agents", "outcome": "failed"}
    )
    assert rang is not None and rang >= 0.25
