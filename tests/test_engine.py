"""The turn loop on the embedded fake and a real Redis: many coroutines, one call."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from adapters.store import RedisCallStore
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.engine import Engine
from orchestrator.events import CallerInput, Event, HandoffStatus
from orchestrator.turn import Handoff, Say, Turn


def generous_flow() -> CallFlow:
    data = load_callflow().model_dump()
    data["transfer"]["max_attempts"] = 20
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
        isinstance(e, Say) and e.prompt.name == "transfer_retry" for turn in applied for e in turn.effects
    )
    assert retry_prompts == sum(s.source == "transferring" and s.dest == "failed" for s in history)
    said = Counter(line.text for line in call.transcript if line.role == "caller")
    assert said == Counter({"agent": 6, **{f"msg {i}": 1 for i in range(6)}})


async def test_an_ordinary_turn_costs_two_round_trips(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pipelined load and one commit script; a duplicate costs the load alone."""
    from redis.asyncio.connection import AbstractConnection

    engine = Engine(store, load_callflow())
    await engine.handle("call-1", CallerInput("hello"), activity_id="a0")  # scripts loaded
    sent: list[object] = []
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: object, check_health: bool = True) -> None:
        sent.append(command)
        await original(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    await engine.handle("call-1", CallerInput("hello again"), activity_id="a1")
    assert len(sent) == 2
    sent.clear()
    await engine.handle("call-1", CallerInput("hello again"), activity_id="a1")
    assert len(sent) == 1
