"""Model-based: Hypothesis drives random sequences of caller input, statuses (in and out of
order, duplicated), watchdog expiries and instance restarts against a real Redis, and
checks the invariants after every step."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import pytest
from botbuilder.schema import Activity
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.asyncio import Redis

from adapters.bot import as_replies
from adapters.keys import Due, Keyspace
from adapters.sealing import Sealer
from adapters.store import RedisCallStore, Retention
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.engine import Engine, Replies
from orchestrator.events import CallEnded, CallerInput, Event, HandoffStatus, InvalidStatus
from orchestrator.scheduler import TIMER, DueItem, Scheduler
from orchestrator.turn import EndCall, Speak, Turn
from states import State
from tests.conftest import REAL_REDIS_URL, SAMPLE_FLOW, require_real_redis_sync
from tests.test_scheduler import RecordingChannel

pytestmark = pytest.mark.real_redis

PREFIX = f"test-model-{uuid.uuid4().hex[:8]}"
STATES = {s.value for s in State}


def flow() -> CallFlow:
    data = load_callflow(SAMPLE_FLOW).model_dump()
    data["queues"]["agents"].update(
        targets=["+14251231234", "+14255550100"], max_attempts=3, timeout_seconds=30
    )
    return CallFlow.model_validate(data)


FLOW = flow()


def render(turn: Turn) -> Replies:
    """Replies without an incoming activity to answer: enough to keep and count them."""
    return as_replies(
        turn,
        [
            Activity(type="message", text=e.prompt.text)
            if isinstance(e, Speak)
            else Activity(type="event", name="handoff.initiate", value={"TargetPhoneNumber": e.target})
            for e in turn.effects
            if not isinstance(e, EndCall)
        ],
        Sealer.from_setting(None),
    )


class CallModel(RuleBasedStateMachine):
    """One call per example, driven through Engine and Scheduler exactly as instances do."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.call = f"model-{uuid.uuid4().hex}"
        self.ids = itertools.count(1)
        self.delivered: list[tuple[str, Event]] = []
        self.version = 0
        self.steps = 0  # history entries written by applied turns
        self.channel = RecordingChannel()
        self._start_instance()

    def _start_instance(self) -> None:
        self.redis = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        self.store = RedisCallStore(self.redis, Keyspace(PREFIX), Retention(transcript_max=100))
        self.engine = Engine(self.store, FLOW, transcript_max=100)
        self.scheduler = Scheduler(self.engine, self.store, self.channel)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.redis.delete(*self.store.keys.call(self.call)))
        due = self.store.keys.due_for(self.call)
        mine = [m for m in self.run(self.redis.zrange(due, 0, -1)) if Due.parse(m)[1] == self.call]
        if mine:
            self.run(self.redis.zrem(due, *mine))
        self.run(self.redis.aclose())
        self.loop.close()

    def _current(self) -> Any:
        return self.run(self.store.load(self.call)).call

    def _apply(self, event: Event, activity_id: str | None = None) -> Turn | None:
        before = self._current()
        activity_id = activity_id or f"a{next(self.ids)}"
        turn: Turn | None = self.run(
            self.engine.handle(self.call, event, activity_id=activity_id, render=render)
        )
        self.delivered.append((activity_id, event))
        if turn is not None:
            self.steps += len(turn.steps)
            if before is not None and before.state == State.ACCEPTED and isinstance(event, CallerInput):
                assert turn.effects == [], "the bot must be silent while the caller is with an agent"
        return turn

    @rule(text=st.sampled_from(["agent", "0", "1", "hello", "what?", "Talk to agent."]))
    def caller_says(self, text: str) -> None:
        self._apply(CallerInput(text))

    @rule(state=st.sampled_from(["accepted", "failed", "completed"]), message=st.sampled_from(["", "busy"]))
    def status(self, state: str, message: str) -> None:
        self._apply(HandoffStatus(state, message))

    @rule(reason=st.sampled_from(["unknown state 'x'", "value is str, not an object"]))
    def malformed_status(self, reason: str) -> None:
        self._apply(InvalidStatus(reason))

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redelivery(self, data: st.DataObject) -> None:
        activity_id, event = data.draw(st.sampled_from(self.delivered))
        before = self._current()
        turn = self.run(self.engine.handle(self.call, event, activity_id=activity_id))
        assert turn is None, "a redelivered activity must not apply again"
        after = self._current()
        assert (before.version if before else 0) == (after.version if after else 0)

    @rule(late=st.booleans())
    def watchdog(self, late: bool) -> None:
        """The due schedule's watchdog, claimed on time (after the deadline) or early."""
        call = self._current()
        if call is None:
            return
        now = call.deadline_ms + 1 if late else max(call.deadline_ms - 1, 0)
        item = DueItem(TIMER, self.call, "", Keyspace.locate(self.call)[0], Due.timer(self.call), now)
        fired_before = self.scheduler.fired
        self.run(self.scheduler._timer(item))
        if self.scheduler.fired > fired_before:
            after = self._current()
            assert after.state == State.FAILED and after.failure == "timeout"
            self.steps += 1

    @rule()
    def restart_instance(self) -> None:
        self.run(self.redis.aclose())
        self._start_instance()

    @precondition(lambda self: len(self.delivered) > 8)
    @rule()
    def hang_up(self) -> None:
        self._apply(CallEnded())

    @invariant()
    def consistent(self) -> None:
        call = self._current()
        if call is None:
            return
        assert call.state in STATES
        assert call.version >= self.version, "the version only grows"
        self.version = call.version
        due = self.run(self.redis.zscore(self.store.keys.due_for(self.call), Due.timer(self.call)))
        assert (due is not None) == (call.state == State.TRANSFERRING), (
            "a watchdog exactly while transferring"
        )
        if due is not None:
            assert due == call.deadline_ms
        history = self.run(self.redis.llen(self.store.keys.call(self.call).history))
        assert history == self.steps, "the history holds every applied step, once"


CallModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _real_redis() -> None:
    require_real_redis_sync()


class TestCallModel(CallModel.TestCase):  # type: ignore[valid-type,misc]
    pass
