"""Scripted calls: YAML scenario files, run against a bot, passed or failed step by step.

    name: a caller asks for an agent and gets one
    protocol: telephony          # or generic: the accepted transfer as handoff.status
    transport: websocket         # optional: http or websocket (the streaming socket)
    hours: open                  # optional: runs only when the flow's opening hours say so
    steps:
      - start                    # the call starts (conversationUpdate)
      - expect_prompt: {contains: "may be recorded", barge_in: none}
      - press: "0"               # keys 0-9 * #: one message per key, as the channel sends them
      - expect_transfer: {target: "+14251231234", queue: reception}   # or pool: NAME, one of its numbers
      - expect_context: {attempt: 1}   # a warm transfer: the agent side claims that number's context
      - agent: accept            # accept | fail | no_answer | complete (+ message)
      - expect_nothing: 1        # seconds of silence
      - silence: 6               # the caller does nothing this long (above 0, at most 120 s)
      - expect_hangup            # the bot ends the call; or expect_hangup: 10 (seconds to wait)

Every ``expect_*`` reads the bot's next activity on the call, in order; whatever the
bot sent and no step read is unexpected and fails the scenario. ``expect_context`` reads
no activity: it asks the bot's context API (``GET /api/pool/<number>/context``, with the
bot's ``AGENT_TOKEN``) about the number the ``expect_transfer`` before it read dialled;
without an agent token a scenario that has one is skipped, saying why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.callflow import BARGE_IN_HINTS, BargeIn, CallFlow
from simulator.call import (
    EXPECT_SECONDS,
    Bots,
    Mismatch,
    Protocol,
    SimulatedCall,
    Transport,
    check_silence,
    describe,
)
from simulator.channel import ChannelStandIn, check_keys

SHIPPED = Path(__file__).parent / "scenarios"  # one folder per shipped flow, named for its file
DEFAULT_FLOW = "default"  # the flow `make run` starts
MAX_WITHIN = 600  # the longest an expect_* step may wait, in seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpectPrompt(_Strict):
    contains: str | None = None
    voice: str | None = None
    barge_in: BargeIn | None = None  # what may interrupt it: the input hint it carries
    within: float = Field(EXPECT_SECONDS, gt=0, le=MAX_WITHIN)

    @property
    def hint(self) -> str | None:
        return None if self.barge_in is None else BARGE_IN_HINTS[self.barge_in]


class ExpectTransfer(_Strict):
    target: str | None = None
    queue: str | None = None
    variables: dict[str, str] | None = None  # what the flow collected, in the handoff's context
    transcript_contains: str | None = None  # something the caller said, handed to the agent
    pool: str | None = None  # a warm transfer: it dials one of this pool's numbers (the bot's flow's)
    within: float = Field(EXPECT_SECONDS, gt=0, le=MAX_WITHIN)


class ExpectContext(_Strict):
    """What the context API hands the agent side for the number the last transfer dialled."""

    pool: str | None = None
    queue: str | None = None
    attempt: int | None = Field(default=None, ge=1)  # the call's transfer attempt at the queue
    caller: str | None = None  # the caller's number as shown to the agent (masked, by default)
    reason_contains: str | None = None  # why the call was transferred: 'pressed 0', 'said "agent"'
    transcript_contains: tuple[str, ...] = ()  # each is in some line of the transcript handed over
    variables: dict[str, str] | None = None  # what the flow collected, exactly

    @field_validator("transcript_contains", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class Status(_Strict):
    state: str
    message: str | None = None


class Agent(_Strict):
    answer: Literal["accept", "fail", "no_answer", "complete"]
    message: str | None = None


# Each step is one key: a bare word (``start``), or the key and its argument.
STEP_KINDS: dict[str, type[BaseModel] | type | None] = {
    "start": None,
    "hang_up": None,
    "redeliver": None,
    "say": str,
    "press": str,
    "wait": float,
    "silence": float,
    "expect_nothing": float,
    "expect_hangup": float,  # bare: waits EXPECT_SECONDS
    "expect_prompt": ExpectPrompt,
    "expect_transfer": ExpectTransfer,
    "expect_context": ExpectContext,
    "status": Status,
    "agent": Agent,
}


def _check_within(seconds: float) -> None:
    if not 0 < seconds <= MAX_WITHIN:
        raise ValueError(f"seconds above 0, at most {MAX_WITHIN}; not {seconds:g}")


# What a step's argument must also be, beyond its type: a mistake is a load error, not a crash.
_CHECKS: dict[str, Callable[[Any], object]] = {
    "press": check_keys,
    "silence": check_silence,
    "expect_hangup": _check_within,
}


class Step(_Strict):
    kind: str
    arg: Any = None

    def __str__(self) -> str:
        """As written, with what was given: ``expect_context: {attempt: 2}``."""
        if isinstance(self.arg, BaseModel):
            given = self.arg.model_dump(mode="json", exclude_defaults=True)
            if not given:
                return self.kind
            written = yaml.safe_dump(given, default_flow_style=True, sort_keys=False, width=1_000_000)
            return f"{self.kind}: {written.strip()}"
        return self.kind if self.arg is None else f"{self.kind}: {self.arg}"


class Scenario(_Strict):
    name: str
    protocol: Protocol = "telephony"
    transport: Transport | None = None  # http or websocket; unset: the run's (--transport)
    hours: Literal["open", "closed"] | None = None  # the flow's opening hours it needs
    caller: str = "+14255550123"
    steps: list[Step] = Field(min_length=1)
    source: str = ""

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, raw: Any) -> list[Step]:
        if not isinstance(raw, list):
            raise ValueError("steps must be a list")
        steps = [_step(n, item) for n, item in enumerate(raw, 1)]
        kinds = [step.kind for step in steps]
        if "expect_context" in kinds and "expect_transfer" not in kinds[: kinds.index("expect_context")]:
            number = kinds.index("expect_context") + 1
            raise ValueError(
                f"step {number}: expect_context asks about the number a transfer dialled: "
                "an expect_transfer must come before it"
            )
        return steps

    @property
    def needs_agent_token(self) -> bool:
        """Whether it asks the bot's context API (which needs the bot's AGENT_TOKEN)."""
        return any(step.kind == "expect_context" for step in self.steps)


def _step(number: int, item: Any) -> Step:
    if isinstance(item, str):
        item = {item: None}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"step {number} must be one of {', '.join(STEP_KINDS)} (one key per step)")
    ((kind, value),) = item.items()
    if kind not in STEP_KINDS:
        raise ValueError(f"step {number}: unknown step {kind!r}; known: {', '.join(STEP_KINDS)}")
    shape = STEP_KINDS[kind]
    if kind == "expect_hangup" and value in (None, {}):
        return Step(kind=kind)
    if shape is None:
        if value not in (None, {}):
            raise ValueError(f"step {number}: {kind} takes nothing")
        return Step(kind=kind)
    if shape in (str, float):
        if (
            value is None
            or isinstance(value, dict | list)
            or (shape is float and isinstance(value, str | bool))
        ):
            raise ValueError(f"step {number}: {kind} takes a {'number' if shape is float else 'text'}")
        arg = shape(value)
        try:
            _CHECKS.get(kind, lambda _: None)(arg)
        except ValueError as e:
            raise ValueError(f"step {number}: {kind}: {e}") from None
        return Step(kind=kind, arg=arg)
    if kind == "agent" and isinstance(value, str):
        value = {"answer": value}
    try:
        assert issubclass(shape, BaseModel)
        return Step(kind=kind, arg=shape.model_validate(value or {}))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"step {number}: {kind}{'.' + where if where else ''}: {first['msg']}") from None


class ScenarioError(ValueError):
    """A scenario file that cannot be read: says which file and what is wrong."""


def load(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping with name and steps")
    try:
        return Scenario.model_validate({**data, "source": str(path)})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ScenarioError(f"{path}: {where}: {message}") from None


def shipped_flows() -> list[str]:
    """The flows scenarios are shipped for: the names of their files in orchestrator/flows."""
    return sorted(path.name for path in SHIPPED.iterdir() if path.is_dir())


def shipped(flow: str = DEFAULT_FLOW) -> list[Path]:
    """The scenario files shipped for ``flow``, one per documented behaviour."""
    return sorted((SHIPPED / flow).glob("*.yaml"))


@dataclass(frozen=True)
class BotHours:
    """What the opening hours of the bot's flow say at the bot's clock: a scenario that
    needs them open (or closed) runs only when they are."""

    said: str | None  # "open" or "closed" by every hours of the flow; None: none, or they differ
    at: datetime
    has_hours: bool = True

    @classmethod
    def of(cls, flow: CallFlow, at: datetime) -> BotHours:
        said = {hours.is_open(at) for hours in flow.hours.values()}
        return cls(None if len(said) != 1 else ("open" if said.pop() else "closed"), at, bool(flow.hours))

    def __str__(self) -> str:
        at = self.at.isoformat(timespec="minutes")
        if not self.has_hours:
            return "the flow has no opening hours"
        return f"at {at} the flow's hours are {self.said or 'not all the same'}"

    def skip_reason(self, scenario: Scenario) -> str:
        """Why ``scenario`` cannot run against this bot ("": it can)."""
        if scenario.hours is None or scenario.hours == self.said:
            return ""
        pin = " (pin the bot's clock with HOURS_CLOCK and pass the same --clock)" if self.has_hours else ""
        return f"needs the flow's hours {scenario.hours}; {self}{pin}"


@dataclass(frozen=True)
class AgentSide:
    """What the agent side knows of the bot: its flow's number pools (which numbers a warm
    transfer may dial) and the token of its context API (the bot's ``AGENT_TOKEN``)."""

    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    token: str | None = None
    flow: str = ""  # the flow's name, for messages

    @classmethod
    def of(cls, flow: CallFlow, token: str | None = None, name: str = "") -> AgentSide:
        return cls({pool: tuple(p.numbers) for pool, p in flow.pools.items()}, token or None, name)

    def skip_reason(self, scenario: Scenario) -> str:
        """Why ``scenario`` cannot run with what the agent side has ("": it can)."""
        if scenario.needs_agent_token and not self.token:
            return (
                "expect_context asks the bot's context API, which needs the bot's AGENT_TOKEN "
                "(pass --agent-token or set AGENT_TOKEN)"
            )
        return ""

    def unknown_pool(self, scenario: Scenario) -> Result | None:
        """A failed result for the first step that names a pool the flow lacks, else None."""
        for number, step in enumerate(scenario.steps, 1):
            pool = getattr(step.arg, "pool", None)
            if step.kind == "expect_transfer" and pool is not None and pool not in self.pools:
                flow = f" {self.flow}" if self.flow else ""
                known = ", ".join(self.pools) or "none"
                why = f"the flow{flow} has no pool {pool!r} (its pools: {known}); is --flow the bot's?"
                return Result(scenario, False, number, f"{step}: {why}")
        return None


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    passed: bool
    step: int = 0  # the failing step, 1-based (0: after the last step)
    reason: str = ""
    unexpected: tuple[str, ...] = ()
    skipped: bool = False


async def run(
    scenario: Scenario, bots: Bots, channel: ChannelStandIn, agents: AgentSide | None = None
) -> Result:
    """Run one scenario as one call; the first failing step ends it. ``agents``: the
    bot's pools and agent token, for ``expect_transfer: {pool}`` and ``expect_context``."""
    agents = agents or AgentSide()
    wrong = agents.unknown_pool(scenario)
    if wrong is not None:
        return wrong
    call = SimulatedCall(
        bots,
        channel,
        protocol=scenario.protocol,
        number=scenario.caller,
        pools=agents.pools,
        agent_token=agents.token,
    )
    for number, step in enumerate(scenario.steps, 1):
        try:
            await _do(call, step)
        except Mismatch as e:
            return Result(scenario, False, number, f"{step}: {e}")
    # Let anything still on its way arrive before deciding nobody expected it.
    late = await call.next_activity(0.3)
    unexpected = tuple(describe(a) for a in ([late] if late else []) + call.unread())
    if unexpected:
        bots.tally.unexpected.extend(unexpected)
        return Result(scenario, False, 0, "the bot sent what no step expected", unexpected)
    return Result(scenario, True)


_ACTIONS: dict[str, Callable[[SimulatedCall, Any], Awaitable[Any]]] = {
    "start": lambda call, _: call.start(),
    "hang_up": lambda call, _: call.hang_up(),
    "redeliver": lambda call, _: call.redeliver(),
    "say": lambda call, text: call.say(text),
    "press": lambda call, digits: call.press(digits),
    "wait": lambda call, seconds: asyncio.sleep(seconds),
    "silence": lambda call, seconds: call.silence(seconds),
    "expect_nothing": lambda call, seconds: call.expect_nothing(seconds),
    "expect_hangup": lambda call, seconds: call.expect_hangup(EXPECT_SECONDS if seconds is None else seconds),
    "expect_prompt": lambda call, e: call.expect_prompt(e.contains, e.voice, e.within, e.hint),
    "expect_transfer": lambda call, e: call.expect_transfer(
        e.target, e.within, e.transcript_contains, e.queue, e.variables, e.pool
    ),
    "expect_context": lambda call, e: call.expect_context(**e.model_dump()),
    "status": lambda call, s: call.status(s.state, s.message),
    "agent": lambda call, a: call.agent(a.answer, a.message),
}


async def _do(call: SimulatedCall, step: Step) -> None:
    await _ACTIONS[step.kind](call, step.arg)
