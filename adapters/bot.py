"""The Bot Framework bot: turns activities into engine calls, and turns into replies."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botbuilder.core import Bot, InvokeResponse, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    Attachment,
    ChannelAccount,
    ConversationReference,
    RoleTypes,
    Transcript,
)

from adapters.activity_json import activity_from_json, model_from_json, to_json
from adapters.handoff import HandoffEventNames, create_handoff_initiation
from adapters.sealing import Sealer
from adapters.store import RedisCallStore
from orchestrator.call import CALLER, Call, reference_user
from orchestrator.engine import Engine, Replies
from orchestrator.errors import StoreUnavailable
from orchestrator.events import CallEnded, CallerInput, CallStarted, Event, status_from_value
from orchestrator.turn import EndCall, Handoff, Speak, Turn

log = logging.getLogger(__name__)

REPLY_KEY = "replyKey"
DTMF = "DTMF"  # the entity type the Telephony channel puts on a keypad press
SEALED = "sealed:"  # an outbox payload that carries collected values, sealed

# The Telephony channel sends no invoke activities; answer any with a 400 and a reason
# rather than the SDK's default 501.
NO_INVOKES = Activity(
    type=ActivityTypes.invoke_response,
    value=InvokeResponse(status=400, body={"error": "this bot handles no invoke activities"}),
)


class CallBot(Bot):  # type: ignore[misc]
    """Thin: every decision is the engine's; this class only translates, both ways.

    It is also the scheduler's way to the channel: ``render``, ``send`` and ``from_outbox``
    speak to a call proactively, through its stored conversation reference.

    What "said" means: a reply is said once the channel has taken it. Replies that must
    arrive are in the outbox from their commit; any other reply whose send fails goes in
    it then. A failed send makes its entry due at once, and the scheduler re-sends what
    the outbox holds until it is acknowledged. (A redelivered activity does not re-send
    it: the first delivery may still be sending, and the same prompt would be said twice.)
    """

    def __init__(
        self, engine: Engine, store: RedisCallStore, adapter: CloudAdapter, app_id: str = ""
    ) -> None:
        self.engine = engine
        self.store = store  # the engine's, for the outbox
        self.adapter = adapter
        self.app_id = app_id
        self.full_transcript = engine.runner.flow.privacy.full_transcript
        self.sealer: Sealer = store.sealer

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
            render=lambda turn: rendered(turn, turn_context, self.sealer),
        )
        if turn is None:  # a redelivery of an activity already taken: the outbox has its replies
            return
        say_by = taken()
        if not turn.replies:
            return
        outgoing = turn.replies
        if self.full_transcript:
            outgoing = [with_full_transcript(reply, turn.call, activity) for reply in outgoing]
        try:
            async with asyncio.timeout_at(say_by):
                await turn_context.send_activities(outgoing)
        except Exception as e:
            await self._keep(turn, activity.id or "", e)
            return
        if turn.outbox_key:
            await self._acknowledge(turn.call.id, turn.outbox_key)

    async def _keep(self, turn: Turn, key: str, error: Exception) -> None:
        """Replies that were not said: into the outbox (if not there from the commit), for
        the scheduler to re-send. The channel is not asked to retry: its redelivery would
        find the turn taken, and only the outbox can say the replies again. A refused send
        is re-sent at once; one that timed out may have been said, so only after the grace.
        Replies the commit kept are only made due, and only when refused: after a timeout
        they are already due when the grace ends."""
        call = turn.call
        log.warning("call %s v%d: %d replies not sent (%r)", call.id, call.version, len(turn.replies), error)
        timed_out = isinstance(error, TimeoutError)
        if turn.outbox_key and timed_out:
            return
        key = turn.outbox_key or key
        payload = ""
        if not turn.outbox_key:
            payload = seal_if(turn, outbox_payload(turn.replies, call.reference, call.version), self.sealer)
        try:
            await self.store.keep(call.id, key, payload, at_once=not timed_out)
        except StoreUnavailable as e:
            log.warning("call %s v%d: unsent replies not kept, they are lost: %s", call.id, call.version, e)

    async def _acknowledge(self, conversation_id: str, key: str) -> None:
        try:
            await self.store.acknowledge(conversation_id, key)
        except StoreUnavailable as e:
            # The replies went out; only a re-send (a repeated prompt) can follow.
            log.warning("call %s: replies sent but not acknowledged: %s", conversation_id, e)

    # --- the scheduler's way to the channel ----------------------------------------

    def render(self, turn: Turn) -> Replies:
        """Replies for a turn with no incoming activity (a timer). A transfer it starts (a
        warm transfer's hold over) replies as if to the caller's last activity."""
        turn_context = None
        if any(isinstance(effect, Handoff) for effect in turn.effects):
            turn_context = TurnContext(self.adapter, incoming_from(turn.call.reference))
        return rendered(turn, turn_context, self.sealer)

    async def send(self, reference: str, replies: list[Activity]) -> None:
        """Speak to a call proactively (the adapter's continue-conversation). Replies from
        the outbox get the caller's account back from ``reference``."""
        ref = model_from_json(ConversationReference, json.loads(reference))
        replies = [with_caller(reply, reference) for reply in replies]

        async def speak(turn_context: TurnContext) -> None:
            await turn_context.send_activities(replies)

        await self.adapter.continue_conversation(ref, speak, self.app_id or None)

    def from_outbox(self, payload: str, version: int, *, ended: bool = False) -> list[Activity]:
        if payload.startswith(SEALED):
            opened = self.sealer.open(payload.removeprefix(SEALED))
            if opened is None:
                log.error("an outbox entry cannot be opened with VARIABLES_KEYS: dropped")
                return []
            payload = opened
        return from_outbox(payload, version, ended=ended)


@dataclass(slots=True, frozen=True)
class TurnBound:
    """The bounds of a turn the channel waits for (``adapters.http.answer_activity``)."""

    timeout: asyncio.Timeout  # cancels the turn until it is committed
    say_by: float  # event loop time: replies not said by then are kept in the outbox


TURN_BOUND: ContextVar[TurnBound | None] = ContextVar("turn_bound", default=None)
REPLY_SECONDS = 10.0  # for replies no channel request waits on


def taken() -> float:
    """The turn is committed: cancelling it now would only cut its replies short, so the
    turn's bound is lifted. When its replies must be said by (event loop time)."""
    bound = TURN_BOUND.get()
    if bound is None:
        return asyncio.get_running_loop().time() + REPLY_SECONDS
    if not bound.timeout.expired():
        bound.timeout.reschedule(None)
    return bound.say_by


def event_from_activity(activity: Activity) -> Event | None:
    """The event an activity means for the call, or None when it means nothing to it."""
    kind = activity.type
    if kind == ActivityTypes.message:
        keypad = any(getattr(entity, "type", None) == DTMF for entity in activity.entities or [])
        return CallerInput(activity.text or "", keypad=keypad)
    if kind == ActivityTypes.end_of_conversation:
        return CallEnded()
    if kind == ActivityTypes.conversation_update:
        bot_id = activity.recipient.id if activity.recipient else None
        joined = [m for m in activity.members_added or [] if m is not None and m.id != bot_id]
        return CallStarted() if joined else None
    if kind == ActivityTypes.event and activity.name == HandoffEventNames.HANDOFF_STATUS:
        return status_from_value(activity.value)
    return None


# --- the outbox: replies as kept, without the caller's number ---------------------------

# What a kept reply holds instead of the caller's account id and name: a ``handoff.initiate``
# names the caller in its ``from``, ``relatesTo.user`` and every transcript line's
# ``from``/``recipient``. The number stays only in the call's stored conversation reference
# (its ``user``), and ``with_caller`` puts it back from there when the reply is re-sent.
CALLER_ACCOUNT = "[caller]"


def outbox_payload(replies: list[Activity], reference: str, version: int = 0) -> str:
    """The outbox entry of ``replies``: their JSON, every account of the caller (the
    ``user`` of ``reference``) with ``CALLER_ACCOUNT`` for its id and name. ``version``,
    the call's version they answer, makes them go stale once the call moves on (replies
    that must arrive, kept by their commit, have none: they are said whatever follows)."""
    data = [to_json(reply) for reply in replies]
    caller = reference_user(reference).get("id")
    if caller:
        _replace_account(data, caller, CALLER_ACCOUNT, CALLER_ACCOUNT)
    return json.dumps({"replies": data, "version": version} if version else {"replies": data})


def from_outbox(payload: str, version: int, *, ended: bool = False) -> list[Activity]:
    """The activities of an outbox entry still worth saying to a call now at ``version``
    (``ended``: only the bot's own hang-up is); the caller's account is ``CALLER_ACCOUNT``
    until ``with_caller`` restores it."""
    entry = json.loads(payload)
    if 0 < entry.get("version", 0) < version:
        return []  # an ordinary reply after a later turn: said now, it would be out of order
    replies = entry["replies"]
    if ended and not any(data.get("type") == ActivityTypes.end_of_conversation for data in replies):
        return []  # the caller hung up: nobody to speak to
    return [activity_from_json(data) for data in replies]


def seal_if(turn: Turn, payload: str, sealer: Sealer) -> str:
    """An outbox payload as kept: sealed when its replies carry collected values."""
    return SEALED + sealer.seal(payload) if turn.secret and payload else payload


def with_caller(reply: Activity, reference: str) -> Activity:
    """``reply`` with the caller's account, which the outbox keeps as ``CALLER_ACCOUNT``,
    restored from the call's stored conversation ``reference``; others as they are."""
    accounts = (reply.from_property, reply.recipient)
    if not (reply.attachments or reply.relates_to or any(a and a.id == CALLER_ACCOUNT for a in accounts)):
        return reply
    data = to_json(reply)
    user = reference_user(reference)
    _replace_account(data, CALLER_ACCOUNT, str(user.get("id") or ""), user.get("name") or None)
    return activity_from_json(data)


def _replace_account(value: Any, old_id: str, new_id: str, new_name: Any) -> None:
    """Every account (a dict whose ``id`` is ``old_id``) anywhere in ``value`` gets ``new_id``,
    and its name, where it has one, ``new_name`` (removed for None); changed in place."""
    if isinstance(value, dict):
        if value.get("id") == old_id:
            value["id"] = new_id
            if "name" in value:
                if new_name is None:
                    del value["name"]
                else:
                    value["name"] = new_name
        for item in value.values():
            _replace_account(item, old_id, new_id, new_name)
    elif isinstance(value, list):
        for item in value:
            _replace_account(item, old_id, new_id, new_name)


def rendered(turn: Turn, turn_context: TurnContext | None, sealer: Sealer) -> Replies:
    """The turn's replies, and their outbox entry if they must arrive."""
    return as_replies(turn, replies(turn, turn_context), sealer)


def as_replies(turn: Turn, activities: list[Activity], sealer: Sealer) -> Replies:
    """``activities`` answering ``turn``, with their outbox entry if they must arrive."""
    if not turn.must_arrive:
        return Replies(activities)
    return Replies(activities, seal_if(turn, outbox_payload(activities, turn.call.reference), sealer))


def replies(turn: Turn, turn_context: TurnContext | None) -> list[Activity]:
    """The turn's effects as activities, each marked with an idempotency key.

    Replies in the outbox are sent at least once; ``channelData.replyKey`` (the call
    version the turn commits, and the reply's place in it) lets a receiver drop a repeat.
    """
    activities = [_reply(turn, effect, turn_context) for effect in turn.effects]
    version = turn.call.version + 1  # what the commit's compare-and-set makes it
    for index, activity in enumerate(activities):
        activity.channel_data = {REPLY_KEY: f"{version}.{index}"}
    return activities


def _reply(turn: Turn, effect: Speak | Handoff | EndCall, turn_context: TurnContext | None) -> Activity:
    if isinstance(effect, Speak):
        return Activity(
            type=ActivityTypes.message,
            text=effect.prompt.text,
            speak=effect.prompt.ssml,
            # The channel's barge-in: what may interrupt this prompt (botbuilder-schema
            # 4.17.1 knows only some of the Telephony channel's values: sent as strings).
            input_hint=effect.prompt.hint,
        )
    if isinstance(effect, EndCall):
        # How the Telephony channel lets a bot hang up (docs/research/telephony-channel.md).
        return Activity(
            type=ActivityTypes.end_of_conversation, code="completedSuccessfully", text=effect.reason
        )
    # A transfer a timer started has one too (CallBot.render): TurnContext needs an adapter.
    assert turn_context is not None, "a transfer replies in a turn context"
    transcript = Transcript(activities=transcript_activities(turn.call, turn_context.activity))
    context: dict[str, Any] = {"TargetPhoneNumber": effect.target}
    if effect.queue:
        context["Queue"] = effect.queue
    if effect.variables:
        context["Variables"] = dict(effect.variables)
    return create_handoff_initiation(turn_context, context, transcript)


def incoming_from(reference: str) -> Activity:
    """An activity as if from the caller, from the call's stored conversation reference."""
    ref = model_from_json(ConversationReference, json.loads(reference))
    return TurnContext.apply_conversation_reference(
        Activity(type=ActivityTypes.message), ref, is_incoming=True
    )


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
