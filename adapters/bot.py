"""The Bot Framework bot: turns activities into engine calls, and turns into replies."""

from __future__ import annotations

import json
import logging
from datetime import datetime

from botbuilder.core import Bot, InvokeResponse, TurnContext
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    ChannelAccount,
    InputHints,
    RoleTypes,
    Transcript,
)

from orchestrator.call import CALLER, Call
from orchestrator.engine import Engine
from orchestrator.events import event_from_activity
from orchestrator.handoff import create_handoff_initiation
from orchestrator.turn import Handoff, Say, Turn

log = logging.getLogger(__name__)

# The Telephony channel sends no invoke activities; answer any with a 400 and a reason
# rather than the SDK's default 501.
NO_INVOKES = Activity(
    type=ActivityTypes.invoke_response,
    value=InvokeResponse(status=400, body={"error": "this bot handles no invoke activities"}),
)


class CallBot(Bot):  # type: ignore[misc]
    """Thin: every decision is the engine's; this class only translates."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def on_turn(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        if activity.type == ActivityTypes.invoke:
            await turn_context.send_activity(NO_INVOKES)
            return
        event = event_from_activity(activity)
        if event is None:
            return
        turn = await self.engine.handle(
            activity.conversation.id,
            event,
            activity_id=activity.id or "",
            reference=conversation_reference(activity),
        )
        if turn is None or not turn.effects:
            return
        replies = [self._reply(turn_context, turn, effect) for effect in turn.effects]
        try:
            await turn_context.send_activities(replies)
        except Exception:
            # The turn is committed; a redelivery of this activity is a duplicate and
            # would not speak again, so there is nothing better to do than to say so.
            log.exception(
                "call %s: turn committed at version %s but its %d replies were not delivered",
                turn.call.id,
                turn.call.version,
                len(replies),
            )

    @staticmethod
    def _reply(turn_context: TurnContext, turn: Turn, effect: Say | Handoff) -> Activity:
        if isinstance(effect, Say):
            return Activity(
                type=ActivityTypes.message,
                text=effect.prompt.text,
                speak=effect.prompt.ssml,
                input_hint=InputHints.accepting_input,
            )
        transcript = Transcript(activities=transcript_activities(turn.call, turn_context.activity))
        return create_handoff_initiation(turn_context, {"TargetPhoneNumber": effect.target}, transcript)


def conversation_reference(activity: Activity) -> str:
    """The JSON reference to reach this call proactively (no activity id: it changes per turn)."""
    reference = TurnContext.get_conversation_reference(activity)
    reference.activity_id = None
    return json.dumps(reference.serialize(), separators=(",", ":"), sort_keys=True)


def transcript_activities(call: Call, incoming: Activity) -> list[Activity]:
    """The call's exchange so far as message activities, caller and bot in turn."""
    caller = _account(incoming.from_property, RoleTypes.user)
    bot = _account(incoming.recipient, RoleTypes.bot)
    return [
        Activity(
            type=ActivityTypes.message,
            text=line.text,
            timestamp=_parse_time(line.at),
            from_property=caller if line.role == CALLER else bot,
            recipient=bot if line.role == CALLER else caller,
            conversation=incoming.conversation,
            channel_id=incoming.channel_id,
        )
        for line in call.transcript
    ]


def _account(account: ChannelAccount | None, role: str) -> ChannelAccount:
    if account is None:
        return ChannelAccount(role=role)
    return ChannelAccount(id=account.id, name=account.name, role=role)


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
