"""What can happen to a call, as plain data: the bot adapter reads activities into these
(``adapters.bot.event_from_activity``), and the scheduler raises the timer's."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.redact import MARGIN

STATUS_MESSAGE_MAX = 500  # what is kept of the agent side's status message (redacted first)
INVALID_REASON_MAX = 200  # ... and of why a status was ignored


class HandoffStates:
    """The values of ``handoff.status``'s ``value.state``."""

    ACCEPTED = "accepted"
    FAILED = "failed"
    COMPLETED = "completed"
    ALL = (ACCEPTED, FAILED, COMPLETED)


@dataclass(slots=True, frozen=True)
class CallStarted:
    """The caller joined (``conversationUpdate`` adding someone other than the bot)."""


@dataclass(slots=True, frozen=True)
class CallerInput:
    """The caller said something, or pressed a key (``keypad``: the channel's DTMF entity)."""

    text: str
    keypad: bool = False


@dataclass(slots=True, frozen=True)
class HandoffStatus:
    """The agent hub reported on the transfer."""

    state: str
    message: str = ""


@dataclass(slots=True, frozen=True)
class InvalidStatus:
    """A ``handoff.status`` we cannot read; recorded, never acted on."""

    reason: str


@dataclass(slots=True, frozen=True)
class CallEnded:
    """The call is over (``endOfConversation``)."""


@dataclass(slots=True, frozen=True)
class TimerExpired:
    """The call's timer came due (``now_ms`` is Redis time): a transfer's no-answer
    watchdog, a node's no-input or inter-digit timeout, or a hang-up after its prompt."""

    now_ms: int


@dataclass(slots=True, frozen=True)
class ContextClaimed:
    """The agent side claimed the context of the call's warm transfer to ``number``; ``by``
    says who (as the context API saw them), for the call's history."""

    number: str
    by: str


Event = CallStarted | CallerInput | HandoffStatus | InvalidStatus | CallEnded | TimerExpired | ContextClaimed


def status_from_value(value: object) -> HandoffStatus | InvalidStatus:
    """Read ``handoff.status``'s value; anything malformed becomes an InvalidStatus."""
    if not isinstance(value, dict):
        return InvalidStatus(f"value is {type(value).__name__}, not an object")
    state = value.get("state")
    if state not in HandoffStates.ALL:
        return InvalidStatus(f"unknown state {_quoted(state)}")
    message = value.get("message")
    if not isinstance(message, str):
        return HandoffStatus(str(state))
    # Cut with redaction's margin: the turn redacts it, then cuts it to what is kept.
    return HandoffStatus(str(state), message[: STATUS_MESSAGE_MAX + MARGIN])


def _quoted(state: object) -> str:
    """An unknown state as recorded: a string in quotes (as sent: the turn redacts, then
    cuts it), None as None, any other value only by its type. A list like [4111, 1111,
    1111, 1111] is no text the redactor would see as one number, so none of it is kept."""
    if state is None:
        return "None"
    if isinstance(state, str):
        return f"'{state[: INVALID_REASON_MAX + MARGIN]}'"
    return f"of type {type(state).__name__}"
