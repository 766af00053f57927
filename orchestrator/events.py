"""What happened on a call, translated from Bot Framework activities into domain events."""

from __future__ import annotations

from dataclasses import dataclass

from botbuilder.schema import Activity, ActivityTypes

from orchestrator.handoff import HandoffEventNames, HandoffStates


@dataclass(slots=True, frozen=True)
class CallStarted:
    """The caller joined (``conversationUpdate`` adding someone other than the bot)."""


@dataclass(slots=True, frozen=True)
class CallerInput:
    """The caller said something or pressed keys."""

    text: str


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
class WatchdogExpired:
    """A transfer's no-answer deadline came due (``now_ms`` is Redis time)."""

    now_ms: int


Event = CallStarted | CallerInput | HandoffStatus | InvalidStatus | CallEnded | WatchdogExpired


def event_from_activity(activity: Activity) -> Event | None:
    """The event an activity means for the call, or None when it means nothing to it."""
    kind = activity.type
    if kind == ActivityTypes.message:
        return CallerInput(activity.text or "")
    if kind == ActivityTypes.end_of_conversation:
        return CallEnded()
    if kind == ActivityTypes.conversation_update:
        bot_id = activity.recipient.id if activity.recipient else None
        joined = [m for m in activity.members_added or [] if m is not None and m.id != bot_id]
        return CallStarted() if joined else None
    if kind == ActivityTypes.event and activity.name == HandoffEventNames.HANDOFF_STATUS:
        return status_from_value(activity.value)
    return None


def status_from_value(value: object) -> HandoffStatus | InvalidStatus:
    """Read ``handoff.status``'s value; anything malformed becomes an InvalidStatus."""
    if not isinstance(value, dict):
        return InvalidStatus(f"value is {type(value).__name__}, not an object")
    state = value.get("state")
    if state not in HandoffStates.ALL:
        return InvalidStatus(f"unknown state {state!r}"[:200])
    message = value.get("message")
    return HandoffStatus(str(state), message[:500] if isinstance(message, str) else "")
