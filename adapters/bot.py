"""The Bot Framework bot: turns activities into engine calls, and turns into replies."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime

from botbuilder.core import Bot, InvokeResponse, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    Attachment,
    ChannelAccount,
    ConversationReference,
    InputHints,
    RoleTypes,
    Transcript,
)

from adapters.activity_json import activity_from_json, model_from_json, to_json
from adapters.store import CALLER_ACCOUNT, restore_caller
from orchestrator.call import CALLER, Call
from orchestrator.engine import Engine
from orchestrator.errors import StoreUnavailable
from orchestrator.events import event_from_activity
from orchestrator.handoff import HandoffEventNames, create_handoff_initiation
from orchestrator.turn import Handoff, Say, Turn

log = logging.getLogger(__name__)

REPLY_KEY = "replyKey"

# The Telephony channel sends no invoke activities; answer any with a 400 and a reason
# rather than the SDK's default 501.
NO_INVOKES = Activity(
    type=ActivityTypes.invoke_response,
    value=InvokeResponse(status=400, body={"error": "this bot handles no invoke activities"}),
)


class CallBot(Bot):  # type: ignore[misc]
    """Thin: every decision is the engine's; this class only translates, both ways.

    It is also the scheduler's way to the channel: ``render``, ``send`` and ``unpark``
    speak to a call proactively, through its stored conversation reference.
    """

    def __init__(self, engine: Engine, adapter: CloudAdapter, app_id: str = "") -> None:
        self.engine = engine
        self.adapter = adapter
        self.app_id = app_id
        self.full_transcript = engine.runner.flow.privacy.full_transcript

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
            caller=caller_id(activity),
            render=lambda turn: replies(turn, turn_context),
        )
        if turn is None or not turn.replies:
            return
        outgoing = turn.replies
        if self.full_transcript:
            outgoing = [with_full_transcript(reply, turn.call, activity) for reply in outgoing]
        try:
            await turn_context.send_activities(outgoing)
        except Exception:
            log.exception(
                "call %s v%d: %d replies not delivered%s",
                turn.call.id,
                turn.call.version,
                len(turn.replies),
                "; parked, they will be re-sent" if turn.delivery_key else "",
            )
            return
        await self._acknowledge(turn)

    async def _acknowledge(self, turn: Turn) -> None:
        if not turn.delivery_key:
            return
        try:
            await self.engine.store.acknowledge(turn.call.id, turn.delivery_key)
        except StoreUnavailable as e:
            # The replies went out; only a re-send (a duplicate prompt) can follow.
            log.warning("call %s: delivered replies not acknowledged: %s", turn.call.id, e)

    # --- the scheduler's way to the channel ----------------------------------------

    def render(self, turn: Turn) -> list[Activity]:
        """Replies for a turn with no incoming activity (a timer)."""
        return proactive_replies(turn)

    async def send(self, reference: str, replies: list[Activity]) -> None:
        """Speak to a call proactively (the adapter's continue-conversation). Replies from
        the outbox get the caller's account back from ``reference`` (see ``unpark``)."""
        ref = model_from_json(ConversationReference, json.loads(reference))
        replies = [with_caller(reply, reference) for reply in replies]

        async def speak(turn_context: TurnContext) -> None:
            await turn_context.send_activities(replies)

        await self.adapter.continue_conversation(ref, speak, self.app_id or None)

    @staticmethod
    def unpark(payload: str) -> list[Activity]:
        """The activities of an outbox entry. The outbox does not hold the caller's number:
        their account is ``CALLER_ACCOUNT`` until ``send`` restores it from the reference."""
        return [activity_from_json(data) for data in json.loads(payload)]


def with_caller(reply: Activity, reference: str) -> Activity:
    """``reply`` with the caller's account, which the outbox keeps as ``CALLER_ACCOUNT``,
    restored from the call's stored conversation ``reference``; others as they are."""
    accounts = (reply.from_property, reply.recipient)
    if not (reply.attachments or reply.relates_to or any(a and a.id == CALLER_ACCOUNT for a in accounts)):
        return reply
    return activity_from_json(restore_caller(to_json(reply), reference))


def proactive_replies(turn: Turn) -> list[Activity]:
    """A turn's replies when no caller activity is being answered (a timer's turn)."""
    return replies(turn, None)


def replies(turn: Turn, turn_context: TurnContext | None) -> list[Activity]:
    """The turn's effects as activities, each marked with an idempotency key.

    Parked replies are sent at least once; ``channelData.replyKey`` (the call version the
    turn commits, and the reply's place in it) lets a receiver drop a repeat.
    """
    rendered = [_reply(turn, effect, turn_context) for effect in turn.effects]
    version = turn.call.version + 1  # what the commit's compare-and-set makes it
    for index, activity in enumerate(rendered):
        activity.channel_data = {REPLY_KEY: f"{version}.{index}"}
    return rendered


def _reply(turn: Turn, effect: Say | Handoff, turn_context: TurnContext | None) -> Activity:
    if isinstance(effect, Say):
        return Activity(
            type=ActivityTypes.message,
            text=effect.prompt.text,
            speak=effect.prompt.ssml,
            input_hint=InputHints.accepting_input,
        )
    if turn_context is None:
        raise ValueError("a handoff is only initiated in reply to the caller")
    transcript = Transcript(activities=transcript_activities(turn.call, turn_context.activity))
    return create_handoff_initiation(turn_context, {"TargetPhoneNumber": effect.target}, transcript)


def caller_id(activity: Activity) -> str:
    """The caller's id (on Telephony their number): ``from.id`` of the caller's own
    activities; events come from the agent side."""
    if activity.type == ActivityTypes.event or activity.from_property is None:
        return ""
    return str(activity.from_property.id or "")


def with_full_transcript(reply: Activity, call: Call, incoming: Activity) -> Activity:
    """``reply`` as sent for ``agent_transcript: full``: a ``handoff.initiate`` gets a copy whose
    transcript has the caller's words as said, as far as this process holds them (lines of
    turns another instance took, or taken before a restart, stay redacted). The turn's
    replies themselves, and so the outbox that re-sends them, keep the redacted transcript."""
    if reply.name != HandoffEventNames.INITIATE_HANDOFF:
        return reply
    full = copy.copy(reply)
    full.attachments = [
        Attachment(
            content_type="application/json",
            name="Transcript",
            content=Transcript(activities=transcript_activities(call, incoming, full=True)),
        )
    ]
    return full


def conversation_reference(activity: Activity) -> str:
    """The JSON reference to reach this call proactively (no activity id: it changes per turn)."""
    reference = TurnContext.get_conversation_reference(activity)
    reference.activity_id = None
    # to_json is reference.serialize(): the string is the same, so stored references still match.
    return json.dumps(to_json(reference), separators=(",", ":"), sort_keys=True)


def transcript_activities(call: Call, incoming: Activity, *, full: bool = False) -> list[Activity]:
    """The call's exchange so far as message activities, caller and bot in turn: redacted,
    or with ``full``, the words as said where this process still holds them."""
    caller = _account(incoming.from_property, RoleTypes.user)
    bot = _account(incoming.recipient, RoleTypes.bot)
    return [
        Activity(
            type=ActivityTypes.message,
            text=line.full or line.text if full else line.text,
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
