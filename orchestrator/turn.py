"""One turn of a call: an event, run through the call state machine, with no I/O.

The result (a ``Turn``) says what to persist and what to send; the engine commits it
and only then does the bot send anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any

from transitions import EventData, MachineError

from orchestrator.call import BOT, CALLER, Call, Line, Step
from orchestrator.callflow import CallFlow, SpokenPrompt
from orchestrator.events import (
    INVALID_REASON_MAX,
    CallEnded,
    CallerInput,
    CallStarted,
    Event,
    HandoffStates,
    HandoffStatus,
    InvalidStatus,
    WatchdogExpired,
)
from orchestrator.redact import MARGIN
from states import State, Trigger, build_machine
from states.dispatch import Dispatch

LINE_MAX_CHARS = 1000
# With configured patterns (any regex: some take quadratic time), a message is cut to this
# before it is redacted, and the redacted words to LINE_MAX_CHARS: no pattern scans 256 KB.
# The built-in rules are linear and see the whole message (the echo repeats all of it).
CALLER_TEXT_MAX = LINE_MAX_CHARS + MARGIN

STATUS_TRIGGERS = {
    HandoffStates.ACCEPTED: Trigger.ACCEPT,
    HandoffStates.FAILED: Trigger.FAIL,
    HandoffStates.COMPLETED: Trigger.COMPLETE,
}

# How a successful transfer shows on the Telephony channel: the bot is dropped from the
# call and no handoff.status is sent.
TELEPHONY_TRANSFERRED = "call ended while transferring (Telephony: the transfer connected)"
TIMEOUT = "timeout"  # the no-answer watchdog: the channel redials forever and never says so


# Every field of a Call, in __init__ order: ``Call(*_CALL_FIELDS(call))`` is
# ``dataclasses.replace(call)`` without its per-call introspection (every turn copies one).
if not all(f.init for f in fields(Call)):
    raise TypeError("Call has a field outside __init__: copy it with dataclasses.replace")
_CALL_FIELDS = attrgetter(*(f.name for f in fields(Call)))


def copy_call(call: Call) -> Call:
    """A copy of ``call`` with its own transcript list (the lines themselves are frozen)."""
    copied = Call(*_CALL_FIELDS(call))
    copied.transcript = list(call.transcript)
    return copied


class Outcome(StrEnum):
    """What a turn did to a transfer, as counted per target by the stats and metrics."""

    STARTED = "started"
    ACCEPTED = "accepted"
    FAILED = "failed"
    TIMEOUT = "timeout"  # failed by the no-answer watchdog
    LATE_ACCEPTED = "late_accepted"  # accepted after it was counted failed or timed out


@dataclass(slots=True, frozen=True)
class Say:
    """Speak a prompt to the caller."""

    prompt: SpokenPrompt


@dataclass(slots=True, frozen=True)
class Handoff:
    """Send ``handoff.initiate`` to this target, with the call's transcript."""

    target: str
    attempt: int


Effect = Say | Handoff


@dataclass(slots=True)
class Turn:
    """What one event did to one call."""

    call: Call  # the call after the turn; ``version`` is the loaded one until the engine commits it
    loaded_state: str = State.BOT.value  # the state the turn started from
    loaded_since_ms: int = 0  # when the call entered it (Redis time; the commit moves call.since_ms)
    effects: list[Effect] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)  # appended to the transcript
    steps: list[Step] = field(default_factory=list)  # appended to the history
    watchdog_seconds: float = 0.0  # > 0: arm the no-answer deadline at commit
    reference_changed: bool = False
    replies: list[Any] = field(default_factory=list)  # the effects as the bot side sends them
    outbox_key: str = ""  # where the replies wait in the outbox until acknowledged ("" if not kept)

    @property
    def changed_state(self) -> bool:
        return any(step.source != step.dest for step in self.steps)

    @property
    def must_arrive(self) -> bool:
        """A turn that moves the call (a transfer, its outcome's prompt) keeps its replies in
        the outbox with the commit: they are re-sent until acknowledged. Others' replies go
        in the outbox only if their send fails (``adapters.bot``)."""
        return bool(self.effects) and self.changed_state

    @property
    def outcomes(self) -> list[Outcome]:
        """The transfer outcomes of this turn's transitions (for ``call.target``)."""
        found: list[Outcome] = []
        for step in self.steps:
            if step.source == step.dest:
                continue
            if step.dest == State.TRANSFERRING:
                found.append(Outcome.STARTED)
            elif step.dest == State.ACCEPTED:
                found.append(Outcome.LATE_ACCEPTED if step.source == State.FAILED else Outcome.ACCEPTED)
            elif step.dest == State.FAILED:
                found.append(Outcome.TIMEOUT if step.reason == TIMEOUT else Outcome.FAILED)
        return found

    @property
    def is_empty(self) -> bool:
        return not (self.effects or self.lines or self.steps or self.reference_changed)


class TurnRunner:
    """Runs turns through the one machine built for a flow.

    The runner is the machine's model; each turn attaches a call by pointing ``state``
    at it. ``run`` never awaits, so turns on one event loop cannot interleave.
    Triggers go through ``Dispatch`` (the machine's transitions, pre-resolved);
    ``compiled=False`` fires them through transitions itself, the reference the
    equivalence test and the benchmark compare against.
    """

    def __init__(self, flow: CallFlow, transcript_max: int = 50, *, compiled: bool = True) -> None:
        self.flow = flow
        self._transcript_max = transcript_max
        self._redact = flow.redact
        self._keep_full = flow.privacy.full_transcript
        self._cut_input = self._redact.has_patterns
        self._caller = ""
        self._turn = Turn(call=Call(id=""))
        self._now = ""
        self.machine = build_machine(self)
        self.fire_trigger: Callable[..., bool] = (
            Dispatch(self.machine, self).fire if compiled else self.trigger  # type: ignore[attr-defined]
        )

    # The machine reads and writes the attached call's state through this property.
    @property
    def state(self) -> str:
        return self._turn.call.state

    @state.setter
    def state(self, value: str) -> None:
        self._turn.call.state = value

    def run(self, call: Call, event: Event, *, now: str, reference: str = "", caller: str = "") -> Turn:
        """Apply ``event`` to a copy of ``call``; ``now`` is an ISO 8601 timestamp,
        ``caller`` the caller's id (``from.id``), whose number is redacted from their words."""
        call = copy_call(call)
        self._turn = turn = Turn(call=call, loaded_state=call.state, loaded_since_ms=call.since_ms)
        self._now = now
        self._caller = caller
        if reference and reference != call.reference:
            call.reference = reference
            turn.reference_changed = True
        match event:
            case CallStarted():
                if call.is_new:
                    self._say(self.flow.start_prompt)
                else:
                    self._ignore("call_started", "the call had already started")
            case CallerInput(text=text):
                self._on_input(text)
            case HandoffStatus(state=status, message=message):
                # The agent side's words are stored (history, failure) and shown too.
                self._fire(STATUS_TRIGGERS[status], reason=self._redact(message) if message else status)
            case InvalidStatus(reason=reason):
                self._ignore("handoff_status", self._redact(reason)[:INVALID_REASON_MAX])
            case WatchdogExpired(now_ms=now_ms):
                # Fenced by the deadline: a timer for an attempt that already ended, or
                # claimed early, finds the call elsewhere or not yet due and does nothing.
                if call.state == State.TRANSFERRING and 0 < call.deadline_ms <= now_ms:
                    self._fire(Trigger.FAIL, reason=TIMEOUT)
            case CallEnded():
                if call.state == State.TRANSFERRING:
                    self._fire(Trigger.ACCEPT, reason=TELEPHONY_TRANSFERRED)
                self._fire(Trigger.HANG_UP, reason="caller hung up")
        cap = self._transcript_max
        if len(call.transcript) > cap:  # as the store's LTRIM does
            del call.transcript[:-cap]
        return turn

    def _on_input(self, text: str) -> None:
        call = self._turn.call
        if call.state == State.ENDED:
            self._ignore("caller_input", "the call has ended")
            return
        # Redacted here, once: the transcript, the echo, the history and everything that
        # shows them only ever see this. Routes match the words as said (in memory only).
        if self._cut_input and len(text) > CALLER_TEXT_MAX:
            said = self._redact(text[:CALLER_TEXT_MAX], self._caller)[:LINE_MAX_CHARS]
        else:
            said = self._redact(text, self._caller)
        self._line(CALLER, said, text if self._keep_full and said != text else "")
        if call.state in (State.ACCEPTED, State.TRANSFERRING):
            return  # the caller is with, or being put through to, an agent: the bot is silent
        route = self.flow.route_for(text)
        if route is not None and route.transfer:
            self._fire(Trigger.REQUEST_AGENT, reason="caller asked for an agent")
            return
        if call.state == State.FAILED:
            self._fire(Trigger.RESUME, reason="caller carried on with the bot")
        self._say(route.say if route is not None and route.say else self.flow.fallback_prompt, said)

    def _fire(self, trigger: Trigger, reason: str) -> None:
        """Trigger the machine; a trigger the current state does not take is recorded."""
        try:
            self.fire_trigger(trigger.value, reason=reason)
        except MachineError:
            self._ignore(trigger.value, f"not valid in state {self.state} ({reason})")

    def _ignore(self, trigger: str, why: str) -> None:
        state = self.state
        self._turn.steps.append(Step(trigger, state, state, f"ignored: {why}"[:500]))

    def _say(self, prompt: str, caller_input: str = "") -> None:
        spoken = self.flow.render(prompt, caller_input)
        self._turn.effects.append(Say(spoken))
        self._line(BOT, spoken.text)

    def _line(self, role: str, text: str, full: str = "") -> None:
        line = Line(role, text[:LINE_MAX_CHARS], self._now, full[:LINE_MAX_CHARS])
        self._turn.lines.append(line)
        self._turn.call.transcript.append(line)

    # --- callbacks named in states.call.TRANSITIONS -------------------------------

    def has_attempts_left(self, event: EventData) -> bool:
        return self._turn.call.attempts < self.flow.transfer.max_attempts

    def start_transfer(self, event: EventData) -> None:
        call, transfer = self._turn.call, self.flow.transfer
        call.attempts += 1
        call.target = transfer.target_for(call.attempts)
        call.failure = ""
        self._turn.watchdog_seconds = transfer.timeout_seconds
        if transfer.announce_prompt:
            self._say(transfer.announce_prompt)
        self._turn.effects.append(Handoff(call.target, call.attempts))

    def say_retry(self, event: EventData) -> None:
        call, transfer = self._turn.call, self.flow.transfer
        call.failure = str(event.kwargs.get("reason", ""))[:500]
        exhausted = call.attempts >= transfer.max_attempts
        self._say(transfer.final_prompt if exhausted else transfer.retry_prompt)

    def say_no_agents(self, event: EventData) -> None:
        self._ignore(Trigger.REQUEST_AGENT.value, "no transfer attempts left")
        self._say(self.flow.transfer.final_prompt)

    def say_handback(self, event: EventData) -> None:
        self._say(self.flow.transfer.handback_prompt)

    def disarm_watchdog(self, event: EventData) -> None:
        self._turn.call.deadline_ms = 0
        self._turn.watchdog_seconds = 0.0

    def record_step(self, event: EventData) -> None:
        transition = event.transition
        if transition is None or transition.dest is None:
            return
        reason = str(event.kwargs.get("reason", ""))[:500]
        self._turn.steps.append(Step(event.event.name, transition.source, transition.dest, reason))
