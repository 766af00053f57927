"""One turn of a call: an event, run through the call flow and the call state machine,
with no I/O.

The result (a ``Turn``) says what to persist and what to send; the engine commits it
and only then does the bot send anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from operator import attrgetter
from typing import Any, NamedTuple

from transitions import EventData, MachineError

from orchestrator.call import BOT, CALLER, Call, Line, Step
from orchestrator.callflow import (
    CALLER as CALLER_VARIABLE,
)
from orchestrator.callflow import (
    INPUT,
    WAITING,
    Action,
    CallFlow,
    CheckHours,
    Gather,
    HangUp,
    Menu,
    Queue,
    Retry,
    Say,
    SpokenPrompt,
    TransferTo,
    normalize_input,
)
from orchestrator.events import (
    INVALID_REASON_MAX,
    CallEnded,
    CallerInput,
    CallStarted,
    ContextClaimed,
    Event,
    HandoffStates,
    HandoffStatus,
    InvalidStatus,
    TimerExpired,
)
from orchestrator.redact import MARGIN
from orchestrator.warm import context_document
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
CALLER_HUNG_UP = "caller hung up"

# History triggers of the call flow's own steps (the machine's are ``states.Trigger``).
MOVE = "move"  # the call went to another node
NO_MATCH = "no_match"
NO_INPUT = "no_input"
GATHERED = "gathered"
ACTION = "action"
POOL = "pool"  # a warm transfer's pool was exhausted
CLAIMED = "claimed"  # the agent side claimed a warm transfer's context
HOLD_OVER = "hold over"

MAX_HOPS = 32  # nodes one turn may pass through (the flow's validation forbids loops)
MIN_HANG_UP_SECONDS = 1.0  # a hang-up after prompts waits at least this for them to be said
YES = frozenset({"1", "yes", "yeah", "yep", "correct", "right", "that's right", "that is right"})
NO = frozenset({"2", "no", "nope", "wrong", "try again"})
_NUMBER_WORDS = {
    "zero": "0",
    "oh": "0",
    "o": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
_WORDS = re.compile(r"[A-Za-z]+|\d+")
_DIGIT = re.compile(r"\d")
_WORD_OR_DIGIT = re.compile(r"[A-Za-z]+|\d")


def spoken_digits(text: str) -> str:
    """The digits in what a caller said: numerals, and digit words ("one two", "oh")."""
    return "".join(
        _NUMBER_WORDS.get(word.casefold(), word if word.isdigit() else "") for word in _WORDS.findall(text)
    )


def masked_digits(text: str) -> str:
    """``text`` with a ``*`` for each digit and each word ``spoken_digits`` takes for one: an
    account number said as words ("nine eight seven") is as secret as one pressed."""
    return _WORD_OR_DIGIT.sub(
        lambda m: "*" if m[0].isdigit() or m[0].casefold() in _NUMBER_WORDS else m[0], text
    )


# Every field of a Call, in __init__ order: ``Call(*_CALL_FIELDS(call))`` is
# ``dataclasses.replace(call)`` without its per-call introspection (every turn copies one).
if not all(f.init for f in fields(Call)):
    raise TypeError("Call has a field outside __init__: copy it with dataclasses.replace")
_CALL_FIELDS = attrgetter(*(f.name for f in fields(Call)))


def copy_call(call: Call) -> Call:
    """A copy of ``call`` with its own transcript list and variables (lines are frozen)."""
    copied = Call(*_CALL_FIELDS(call))
    copied.transcript = list(call.transcript)
    if call.variables:
        copied.variables = dict(call.variables)
        copied.shown = dict(call.shown)
    return copied


class Outcome(StrEnum):
    """What a turn did to a transfer, as counted per queue and target by stats and metrics."""

    STARTED = "started"
    ACCEPTED = "accepted"
    FAILED = "failed"
    TIMEOUT = "timeout"  # failed by the no-answer watchdog
    LATE_ACCEPTED = "late_accepted"  # accepted after it was counted failed or timed out


class Counted(NamedTuple):
    """A transfer outcome and the queue and target it counts for, as they were at its step
    (a failure's next transfer, in the same turn, may go to another queue); a pool number
    counts as ``pool:<name>``."""

    outcome: Outcome
    queue: str
    target: str


def outcome_of(source: str, dest: str, reason: str) -> Outcome | None:
    """What a transition does to a transfer, if anything."""
    if dest == State.TRANSFERRING:
        return Outcome.STARTED
    if dest == State.ACCEPTED:
        return Outcome.LATE_ACCEPTED if source == State.FAILED else Outcome.ACCEPTED
    if dest == State.FAILED:
        return Outcome.TIMEOUT if reason == TIMEOUT else Outcome.FAILED
    return None


@dataclass(slots=True, frozen=True)
class Speak:
    """Speak a prompt to the caller."""

    prompt: SpokenPrompt


@dataclass(slots=True, frozen=True)
class Handoff:
    """Send ``handoff.initiate`` to this target, with the call's transcript, its queue and
    the variables the flow collected."""

    target: str
    attempt: int
    queue: str = ""
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class EndCall:
    """Hang up: the bot ends the call (``endOfConversation``)."""

    reason: str


Effect = Speak | Handoff | EndCall


@dataclass(slots=True, frozen=True)
class LeaseRequest:
    """A warm transfer needs a number: lease one of ``pool`` for the call's transfer ``key``
    for ``seconds``, keeping ``context`` under it. The engine does, and carries the turn on
    with ``TurnRunner.after_lease``."""

    pool: str
    key: str
    seconds: float
    context: Mapping[str, Any]
    node: str  # the transfer node, and why the call came to it
    why: str
    previous: str = ""  # the lease key of the call's last attempt at the queue ("" for none)


@dataclass(slots=True, frozen=True)
class PoolRelease:
    """Give a leased number back: at once, or with ``grace_seconds`` > 0, that long from now
    (a connected transfer: the agent side may still look the call up)."""

    pool: str
    number: str
    key: str
    grace_seconds: float = 0.0


def lease_key(transfer: int) -> str:
    """A warm transfer's lease key: which of the call's transfers it is (a rerun turn leases
    with the same key, and gets the same number back; no two transfers share one, so
    neither do their pushes' event ids or their claims)."""
    return f"t{transfer}"


@dataclass(slots=True, frozen=True)
class ActionOutcome:
    """What a flow action returned: variables to set and the node to go to (None: its
    ``next``); or why it failed."""

    variables: Mapping[str, str] = field(default_factory=dict)
    next: str | None = None
    error: str = ""


@dataclass(slots=True)
class Turn:
    """What one event did to one call."""

    call: Call  # the call after the turn; ``version`` is the loaded one until the engine commits it
    loaded_state: str = State.BOT.value  # the state the turn started from
    loaded_since_ms: int = 0  # when the call entered it (Redis time; the commit moves call.since_ms)
    loaded_node: str = ""  # the node it was at
    effects: list[Effect] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)  # appended to the transcript
    steps: list[Step] = field(default_factory=list)  # appended to the history
    outcomes: list[Counted] = field(default_factory=list)  # of its transitions, counted by stats and metrics
    timer_seconds: float = 0.0  # > 0: arm the call's timer at commit
    reference_changed: bool = False
    replies: list[Any] = field(default_factory=list)  # the effects as the bot side sends them
    outbox_key: str = ""  # where the replies wait in the outbox until acknowledged ("" if not kept)
    action: str = ""  # an action node the turn stopped at: the engine runs it, then ``after_action``
    secret: bool = False  # its replies carry collected values: the outbox keeps them sealed
    caller_input: str = ""  # what the caller said this turn, as redacted (for an action)
    lease: LeaseRequest | None = None  # a warm transfer waits on a number: the engine leases it
    releases: list[PoolRelease] = field(default_factory=list)  # numbers to give back once committed
    now: str = ""  # when the turn ran (ISO 8601), and the caller's id: for ``after_action``
    caller: str = ""

    @property
    def changed_state(self) -> bool:
        return any(step.source != step.dest for step in self.steps)

    @property
    def must_arrive(self) -> bool:
        """A turn that moves the call (a transfer, its outcome's prompt, a hang-up) keeps its
        replies in the outbox with the commit: they are re-sent until acknowledged. Others'
        replies go in the outbox only if their send fails (``adapters.bot``)."""
        return bool(self.effects) and self.changed_state

    @property
    def is_empty(self) -> bool:
        return not (self.effects or self.lines or self.steps or self.reference_changed)


class TurnRunner:
    """Runs turns through the call flow and the one machine built for it.

    The runner is the machine's model; each turn attaches a call by pointing ``state``
    at it. ``run`` never awaits, so turns on one event loop cannot interleave.
    Triggers go through ``Dispatch`` (the machine's transitions, pre-resolved);
    ``compiled=False`` fires them through transitions itself, the reference the
    equivalence test and the benchmark compare against. ``clock`` is what opening
    hours are checked against (a test sets it).
    """

    def __init__(
        self,
        flow: CallFlow,
        transcript_max: int = 50,
        *,
        compiled: bool = True,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.flow = flow
        self.clock = clock or (lambda: datetime.now(UTC))
        self._transcript_max = transcript_max
        self._redact = flow.redact
        self._keep_full = flow.privacy.full_transcript
        self._cut_input = self._redact.has_patterns
        self._caller = ""
        self._turn = Turn(call=Call(id=""))
        self._now = ""
        self._then: tuple[str, str] | None = None  # where a machine callback sends the call next
        self._leased: tuple[str, str | None] | None = None  # (lease key, number or None: exhausted)
        self._dial = ""  # the leased number the transfer being started dials
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
        self._turn = turn = Turn(
            call=call, loaded_state=call.state, loaded_since_ms=call.since_ms, loaded_node=call.node
        )
        turn.now, turn.caller = now, caller
        self._now = now
        self._caller = caller
        self._leased, self._dial = None, ""
        if call.holding and not isinstance(self.flow.nodes.get(call.holding), TransferTo):
            call.holding, call.holds = "", 0  # the flow changed under a held call: no hold left
        if reference and reference != call.reference:
            call.reference = reference
            turn.reference_changed = True
        match event:
            case CallStarted():
                if call.is_new:
                    self._go(self.flow.start, "call started")
                else:
                    self._ignore("call_started", "the call had already started")
            case CallerInput(text=text, keypad=keypad):
                self._on_input(text, keypad)
            case HandoffStatus(state=status, message=message):
                # The agent side's words are stored (history, failure) and shown too.
                self._fire(STATUS_TRIGGERS[status], reason=self._redact(message) if message else status)
            case InvalidStatus(reason=reason):
                self._ignore("handoff_status", self._redact(reason)[:INVALID_REASON_MAX])
            case TimerExpired(now_ms=now_ms):
                # Fenced by the deadline: a timer for a wait that already ended, or claimed
                # early, finds the call elsewhere or not yet due and does nothing.
                if 0 < call.deadline_ms <= now_ms:
                    self._on_timer()
            case CallEnded():
                call.holding, call.holds = "", 0
                if call.state == State.TRANSFERRING:
                    self._fire(Trigger.ACCEPT, reason=TELEPHONY_TRANSFERRED)
                self._fire(Trigger.HANG_UP, reason=CALLER_HUNG_UP)
            case ContextClaimed(number=number, by=by):
                self._step(CLAIMED, f"the context of {number} was claimed by {by}"[:500])
        return self._finish()

    def after_lease(self, turn: Turn, number: str | None) -> Turn:
        """Carry on a turn that stopped for a pool number: ``number`` leased, or None when
        the pool is exhausted."""
        self._turn, self._now, self._caller = turn, turn.now, turn.caller
        request, turn.lease = turn.lease, None
        assert request is not None
        self._leased = (request.key, number)
        node = self.flow.nodes[request.node]
        assert isinstance(node, TransferTo)
        self._transfer(request.node, node.queue, request.why)
        return self._finish()

    def after_action(self, turn: Turn, outcome: ActionOutcome) -> Turn:
        """Carry on a turn that stopped at an action node, with what the action returned."""
        self._turn, self._now, self._caller = turn, turn.now, turn.caller
        node = self.flow.nodes[turn.action]
        turn.action = ""
        assert isinstance(node, Action)
        error = outcome.error
        unknown = sorted(set(outcome.variables) - set(node.sets))
        target = outcome.next or node.next
        if not error and unknown:
            error = f"set variables it does not declare in 'sets': {', '.join(unknown)}"
        if not error and target not in (node.next, *node.may_go):
            error = f"returned the node {target!r}, which is neither its 'next' nor in its 'may_go'"
        if error:
            self._step(ACTION, f"{node.action} failed: {error}"[:500])
            self._go(node.on_error, f"{node.action} failed")
        else:
            for name, value in outcome.variables.items():
                self._set_variable(name, str(value))
            self._step(ACTION, f"{node.action} returned")
            self._go(target, f"{node.action} returned")
        return self._finish()

    def _finish(self) -> Turn:
        turn, call = self._turn, self._turn.call
        cap = self._transcript_max
        if len(call.transcript) > cap:  # as the store's LTRIM does
            del call.transcript[:-cap]
        return turn

    # --- caller input ---------------------------------------------------------------------

    def _on_input(self, text: str, keypad: bool) -> None:
        call = self._turn.call
        if call.state == State.ENDED:
            self._ignore("caller_input", "the call has ended")
            return
        if not call.node:  # input before the call started (or its start was lost)
            call.node = self.flow.first_stop
        node = self.flow.nodes.get(call.node)
        gathering = isinstance(node, Gather) and call.state in (State.BOT, State.FAILED)
        # Redacted here, once: the transcript, the echo, the history and everything that
        # shows them only ever see this. Routes match the words as said (in memory only).
        # Digits a gather collects are never kept as said: each, pressed, said or said as a
        # word, becomes a "*".
        if gathering:
            said = masked_digits(text if keypad else self._redact(text[:CALLER_TEXT_MAX], self._caller))
            self._line(CALLER, said)
        else:
            if self._cut_input and len(text) > CALLER_TEXT_MAX:
                said = self._redact(text[:CALLER_TEXT_MAX], self._caller)[:LINE_MAX_CHARS]
            else:
                said = self._redact(text, self._caller)
            self._line(CALLER, said, text if self._keep_full and said != text else "")
        self._turn.caller_input = said
        if call.state in (State.ACCEPTED, State.TRANSFERRING):
            return  # the caller is with, or being put through to, an agent: the bot is silent
        if isinstance(node, HangUp):
            return  # the goodbye is being said: the call ends when it has been
        if node is None:  # the flow changed under a live call: start it afresh
            self._go(self.flow.start, f"node {call.node!r} is no longer in the flow")
            return
        if call.holding:  # on hold for a pool number: only a route takes the caller elsewhere
            route = self.flow.route_for(call.node, text, keypad=keypad)
            if route is not None and route.to is not None:
                self._disarm()
                self._take_route(route.to, text, keypad, said)
            return
        self._disarm()  # any input ends the wait; whatever waits next arms it again
        if isinstance(node, Gather):
            self._gather_input(node, text, keypad)
            return
        assert isinstance(node, Menu)
        route = self.flow.route_for(call.node, text, keypad=keypad)
        if route is None:
            self._resume_bot()
            self._no_match(node, said)
        elif route.repeat:
            self._resume_bot()
            self._repeat(node)
        else:
            assert route.to is not None
            self._take_route(route.to, text, keypad, said)

    def _take_route(self, to: str, text: str, keypad: bool, said: str) -> None:
        """The caller's input takes a route to node ``to``: the bot carries on with the
        caller (after a failed transfer) unless the route transfers again."""
        if not isinstance(self.flow.nodes[to], TransferTo):
            self._resume_bot()
        self._go(to, f"pressed {text.strip()}" if keypad else f'said "{said[:80]}"')

    def _resume_bot(self) -> None:
        """The caller carries on with the bot after a failed transfer."""
        if self._turn.call.state == State.FAILED:
            self._fire(Trigger.RESUME, reason="caller carried on with the bot")

    def _no_match(self, node: Menu, said: str) -> None:
        retry = self.flow.retry_of(node, "no_match")
        assert retry is not None
        self._turn.call.tries += 1
        self._retry(node, retry, NO_MATCH, self._turn.call.tries, said)

    def _retry(self, node: Menu | Gather, retry: Retry, trigger: str, count: int, said: str = "") -> None:
        """The ``count``-th miss (no match, no input) at ``node``: past ``retry.max`` the call
        goes to ``retry.then``; before, its prompts, then the node's own again."""
        call = self._turn.call
        if retry.max is not None and count > retry.max:
            self._step(trigger, f"{trigger.replace('_', ' ')}, {count} times")
            assert retry.then is not None
            self._go(retry.then, trigger.replace("_", " "))
            return
        for prompt in retry.say:
            self._say(prompt, said)
        if retry.repeat:
            if isinstance(node, Gather) and call.confirming:
                self._confirm(node)
                return
            self._repeat(node, wait=False)
        self._wait(call.node)

    def _repeat(self, node: Menu | Gather, *, wait: bool = True) -> None:
        for prompt in node.say:
            self._say(prompt)
        if wait:
            self._wait(self._turn.call.node)

    # --- gathering digits ----------------------------------------------------------------

    def _gather_input(self, node: Gather, text: str, keypad: bool) -> None:
        call = self._turn.call
        if call.confirming:
            answer = text.strip() if keypad else normalize_input(text)
            if answer in YES:
                self._gathered(node, call.entry)
            elif answer in NO:
                call.entry, call.confirming = "", False
                self._repeat(node)
            else:
                self._confirm(node)
            return
        if not keypad:
            route = self.flow.route_for(call.node, text, keypad=False)  # "agent" still works
            if route is not None and route.to is not None:
                self._go(route.to, f'said "{normalize_input(text)[:80]}"')
                return
            digits = spoken_digits(text)
            if digits:
                self._check_entry(node, digits)
            else:
                self._invalid(node)
            return
        key = text.strip()
        if node.finish_key is not None and key == node.finish_key:
            self._check_entry(node, call.entry)
        elif key.isdigit() and len(key) == 1:
            call.entry += key
            if len(call.entry) >= node.max_digits:
                self._check_entry(node, call.entry)
            else:
                self._arm(node.inter_digit_seconds)
        else:  # a key that is neither a digit nor the finish key: wait on
            self._arm(node.inter_digit_seconds if call.entry else self._no_input_seconds(node))

    def _check_entry(self, node: Gather, digits: str) -> None:
        call = self._turn.call
        if not node.fits(digits):
            self._invalid(node)
        elif node.confirm is not None:
            call.entry, call.confirming = digits, True
            self._confirm(node)
        else:
            self._gathered(node, digits)

    def _confirm(self, node: Gather) -> None:
        assert node.confirm is not None
        call = self._turn.call
        self._say(node.confirm, values={node.into: call.entry})
        self._wait(call.node)

    def _invalid(self, node: Gather) -> None:
        call = self._turn.call
        call.entry, call.confirming = "", False
        call.tries += 1
        if call.tries >= node.attempts:
            self._step(NO_MATCH, f"{call.tries} entries for {node.into} did not fit")
            self._go(node.on_fail, f"{node.into} not gathered")
            return
        for prompt in node.invalid:
            self._say(prompt)
        self._repeat(node)

    def _gathered(self, node: Gather, digits: str) -> None:
        self._set_variable(node.into, digits)
        self._step(GATHERED, f"{node.into}: {len(digits)} digits")
        self._go(node.next, f"gathered {node.into}")

    def _set_variable(self, name: str, value: str) -> None:
        call = self._turn.call
        call.variables[name] = value
        call.shown[name] = self.flow.privacy.mask_value(value)
        call.entry, call.confirming = "", False

    # --- timers -----------------------------------------------------------------------------

    def _on_timer(self) -> None:
        call = self._turn.call
        if call.state == State.TRANSFERRING:
            self._fire(Trigger.FAIL, reason=TIMEOUT)
            return
        if call.state not in (State.BOT, State.FAILED):
            return
        node = self.flow.nodes.get(call.node)
        self._disarm()
        if call.holding:
            self._go(call.holding, HOLD_OVER)
        elif isinstance(node, HangUp):
            self._end(node.reason)
        elif isinstance(node, Gather) and call.entry and not call.confirming:
            self._check_entry(node, call.entry)  # the caller stopped pressing: take what came
        elif isinstance(node, WAITING):
            self._no_input(node)

    def _no_input(self, node: Menu | Gather) -> None:
        retry = self.flow.no_input_of(node)
        if retry is None:
            return
        call = self._turn.call
        call.silences += 1
        if retry.max is None or call.silences <= retry.max:
            self._step(NO_INPUT, f"no input ({call.silences})")
        self._retry(node, retry, NO_INPUT, call.silences)

    def _wait(self, name: str) -> None:
        """The call rests at a waiting node: arm its no-input timer, counted from when this
        turn's prompts will have been said."""
        node = self.flow.nodes[name]
        assert isinstance(node, WAITING)
        seconds = self._no_input_seconds(node)
        if seconds:
            self._arm(seconds + self._speaking_seconds())
        else:
            self._disarm()

    def _no_input_seconds(self, node: Menu | Gather) -> float:
        retry = self.flow.no_input_of(node)
        return retry.seconds if retry is not None else 0.0

    def _speaking_seconds(self) -> float:
        return sum(e.prompt.seconds for e in self._turn.effects if isinstance(e, Speak))

    def _arm(self, seconds: float) -> None:
        self._turn.timer_seconds = seconds

    def _disarm(self) -> None:
        self._turn.call.deadline_ms = 0
        self._turn.timer_seconds = 0.0

    # --- moving through the flow ------------------------------------------------------------

    def _go(self, name: str, why: str) -> None:
        """Take the call to node ``name`` and on through the nodes that pass it on, until one
        waits for the caller, transfers, hangs up or runs an action."""
        call = self._turn.call
        for _ in range(MAX_HOPS):
            node = self.flow.nodes[name]
            if isinstance(node, Menu | Gather | HangUp):
                call.node, call.tries, call.silences = name, 0, 0
                call.entry, call.confirming = "", False
                call.holding, call.holds = "", 0
            self._step(MOVE, why, node=name)
            for prompt in node.say:
                self._say(prompt)
            match node:
                case Menu() | Gather():
                    self._wait(name)
                    return
                case Say():
                    name, why = node.next, "next"
                case CheckHours():
                    is_open = self.flow.hours[node.hours].is_open(self.clock())
                    name, why = (node.open, "open") if is_open else (node.closed, "closed")
                case TransferTo():
                    self._transfer(name, node.queue, why)
                    return
                case HangUp():
                    self._hang_up(node)
                    return
                case Action():
                    self._turn.action = name
                    return
            if self._turn.call.state == State.ENDED:
                return
        raise RuntimeError(f"call {call.id}: more than {MAX_HOPS} nodes in one turn")

    def _transfer(self, node: str, name: str, why: str) -> None:
        call, queue = self._turn.call, self.flow.queues[name]
        if queue.hours is not None and not self.flow.hours[queue.hours].is_open(self.clock()):
            assert queue.closed is not None
            call.holding, call.holds = "", 0
            self._go(queue.closed, f"queue {name} closed")
            return
        if call.queue != name:  # attempts count per queue ("": a call from before queues)
            call.attempts = call.attempts if not call.queue else 0
            call.queue = name
        if (
            queue.pool is not None
            and call.state in (State.BOT, State.FAILED)
            and call.attempts < queue.max_attempts
        ):
            key = lease_key(call.transfers + 1)
            if self._leased is None or self._leased[0] != key:
                self._turn.lease = self._lease_request(node, queue, queue.pool, key, why)
                return  # the engine leases a number, then after_lease comes back here
            number, self._leased = self._leased[1], None
            if number is None and self._pool_exhausted(node, queue, queue.pool):
                return
            self._dial = number or ""
        call.holding, call.holds = "", 0
        self._fire(Trigger.REQUEST_AGENT, reason=f"transfer to {name}")
        self._follow()

    def _lease_request(self, node: str, queue: Queue, pool: str, key: str, why: str) -> LeaseRequest:
        call = self._turn.call
        context = context_document(
            call,
            pool=pool,
            queue=call.queue,
            reason=why,
            attempt=call.attempts + 1,
            privacy=self.flow.privacy,
            now=self._now,
        )
        seconds = queue.timeout_seconds + self.flow.pools[pool].grace_seconds
        previous = lease_key(call.transfers) if call.transfers else ""
        return LeaseRequest(pool, key, seconds, context, node, why, previous)

    def _pool_exhausted(self, node: str, queue: Queue, pool: str) -> bool:
        """Every number of the pool is held: dial the queue's target cold (False: carry on
        with the transfer), or hold and lease again later, or fail (True)."""
        call, then = self._turn.call, queue.pool_exhausted
        if then.then == "target":
            self._step(POOL, f"pool {pool} exhausted: transferring to the queue's target")
            return False
        if then.then == "hold" and call.holds < then.max:
            call.holding, call.holds = node, call.holds + 1
            self._step(POOL, f"pool {pool} exhausted: hold {call.holds} of {then.max}")
            for prompt in then.say:
                self._say(prompt)
            self._arm(then.seconds + self._speaking_seconds())
            return True
        held = f" after {call.holds} holds" if call.holds else ""
        self._step(POOL, f"pool {pool} exhausted{held}: the transfer fails")
        call.holding, call.holds = "", 0
        for prompt in then.say if then.then == "fail" and then.say else queue.final:
            self._say(prompt)
        if queue.after_final is not None:
            self._go(queue.after_final, f"pool {pool} exhausted")
        else:
            self._rest()
        return True

    def _hang_up(self, node: HangUp) -> None:
        """End the call once this turn's prompts have been said (the channel would cut
        them off): at once without any, else by the call's timer."""
        seconds = self._speaking_seconds()
        if seconds:
            self._arm(max(seconds, MIN_HANG_UP_SECONDS))
        else:
            self._end(node.reason)

    def _end(self, reason: str) -> None:
        self._fire(Trigger.HANG_UP, reason=reason)
        if self._turn.call.state == State.ENDED:
            self._turn.effects.append(EndCall(reason))

    def _follow(self) -> None:
        """Go where a machine callback said the call goes next (after its trigger: a
        trigger is not fired from within another's callbacks)."""
        then, self._then = self._then, None
        if then is not None:
            self._go(*then)

    # --- the machine ---------------------------------------------------------------------------

    def _fire(self, trigger: Trigger, reason: str) -> None:
        """Trigger the machine; a trigger the current state does not take is recorded."""
        try:
            self.fire_trigger(trigger.value, reason=reason)
        except MachineError:
            self._ignore(trigger.value, f"not valid in state {self.state} ({reason})")
        if trigger is not Trigger.REQUEST_AGENT:
            self._follow()

    def _ignore(self, trigger: str, why: str) -> None:
        state = self.state
        self._turn.steps.append(Step(trigger, state, state, f"ignored: {why}"[:500]))

    def _step(self, trigger: str, why: str, node: str = "") -> None:
        state = self.state
        self._turn.steps.append(Step(trigger, state, state, why[:500], node=node))

    def _say(self, name: str, caller_input: str = "", values: Mapping[str, str] | None = None) -> None:
        if self.flow.is_fixed(name):
            spoken = self.flow.render(name)
        else:
            spoken = self.flow.render(name, *self._values(caller_input, values))
        self._turn.effects.append(Speak(spoken))
        if spoken.shown:
            self._turn.secret = True
        self._line(BOT, spoken.transcript_text)

    def _values(
        self, caller_input: str, extra: Mapping[str, str] | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(values, masked values) a prompt's placeholders are filled with."""
        call = self._turn.call
        keep = min(4, self.flow.privacy.keep_last_digits)
        last = "".join(_DIGIT.findall(self._caller)[-keep:]) if keep else ""
        values = {**call.variables, INPUT: caller_input, CALLER_VARIABLE: last}
        shown = dict(call.shown)
        for name, value in (extra or {}).items():
            values[name], shown[name] = value, self.flow.privacy.mask_value(value)
        return values, shown

    def _line(self, role: str, text: str, full: str = "") -> None:
        line = Line(role, text[:LINE_MAX_CHARS], self._now, full[:LINE_MAX_CHARS])
        self._turn.lines.append(line)
        self._turn.call.transcript.append(line)

    def _current_queue(self) -> Queue:
        queue = self.flow.queues.get(self._turn.call.queue)
        if queue is None and self.flow.queues:  # a call from before queues (or edited by hand)
            self._turn.call.queue = next(iter(self.flow.queues))
            queue = self.flow.queues[self._turn.call.queue]
        if queue is None:
            raise RuntimeError(f"call {self._turn.call.id}: no queue {self._turn.call.queue!r} in the flow")
        return queue

    # --- callbacks named in states.call.TRANSITIONS -------------------------------

    def has_attempts_left(self, event: EventData) -> bool:
        return self._turn.call.attempts < self._current_queue().max_attempts

    def start_transfer(self, event: EventData) -> None:
        call, queue = self._turn.call, self._current_queue()
        call.attempts += 1
        call.transfers += 1
        call.target, self._dial = self._dial or queue.target_for(call.attempts), ""
        call.failure = ""
        self._arm(queue.timeout_seconds)
        for prompt in queue.announce:
            self._say(prompt)
        self._turn.effects.append(Handoff(call.target, call.attempts, call.queue, dict(call.variables)))
        if call.variables:
            self._turn.secret = True

    def say_retry(self, event: EventData) -> None:
        call, queue = self._turn.call, self._current_queue()
        call.failure = str(event.kwargs.get("reason", ""))[:500]
        if call.attempts >= queue.max_attempts:
            self._say_final(queue)
            return
        for prompt in queue.retry:
            self._say(prompt)
        if queue.on_failure is not None:
            self._then = (queue.on_failure, "transfer failed")
        else:
            self._rest()

    def say_no_agents(self, event: EventData) -> None:
        self._ignore(Trigger.REQUEST_AGENT.value, "no transfer attempts left")
        self._say_final(self._current_queue())

    def _say_final(self, queue: Queue) -> None:
        for prompt in queue.final:
            self._say(prompt)
        if queue.after_final is not None:
            self._then = (queue.after_final, "no transfer attempts left")
        else:
            self._rest()

    def say_handback(self, event: EventData) -> None:
        for prompt in self._current_queue().handback:
            self._say(prompt)
        self._rest()

    def _rest(self) -> None:
        """The call stays where it was: waiting again there, if that node waits."""
        if isinstance(self.flow.nodes.get(self._turn.call.node), WAITING):
            self._wait(self._turn.call.node)

    def disarm_timer(self, event: EventData) -> None:
        self._disarm()

    def record_step(self, event: EventData) -> None:
        transition = event.transition
        if transition is None or transition.dest is None:
            return
        reason = str(event.kwargs.get("reason", ""))[:500]
        self._turn.steps.append(Step(event.event.name, transition.source, transition.dest, reason))
        # After the transition's own callback: a started transfer's target is chosen.
        outcome = outcome_of(transition.source, transition.dest, reason)
        if outcome is not None:
            call = self._turn.call
            # A pool's numbers count as one target, the pool: per number is noise, and
            # a large pool would swell every counter by its size.
            pool = self.flow.pool_of_number.get(call.target)
            self._turn.outcomes.append(Counted(outcome, call.queue, f"pool:{pool}" if pool else call.target))
        self._give_back(transition.source, transition.dest)

    def _give_back(self, source: str, dest: str) -> None:
        """A warm transfer's number goes back when its transfer fails, or the call comes back
        from or ends at it; a connected one is kept a grace for the agent side's look-up."""
        call = self._turn.call
        name = self.flow.pool_of_number.get(call.target)
        if name is None or dest == State.TRANSFERRING:
            return
        key = lease_key(call.transfers)
        if dest == State.ACCEPTED:
            grace = self.flow.pools[name].grace_seconds
            self._turn.releases.append(PoolRelease(name, call.target, key, grace))
        elif (
            dest == State.FAILED
            or source == State.TRANSFERRING
            or (source, dest) == (State.ACCEPTED, State.BOT)
        ):
            self._turn.releases.append(PoolRelease(name, call.target, key))  # (accepted, ended): grace
