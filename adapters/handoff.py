"""Bot Framework handoff events, which botbuilder-python lacks.

Field for field the C# and JS SDKs' ``EventFactory``: an ``event`` activity named
``handoff.initiate`` (bot -> agent hub) or ``handoff.status`` (agent hub -> bot). The
values of a status' ``state`` are the core's (``orchestrator.events.HandoffStates``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from botbuilder.core import TurnContext
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    Attachment,
    ConversationAccount,
    Transcript,
)


class HandoffEventNames:
    """The two event names of the handoff protocol."""

    INITIATE_HANDOFF = "handoff.initiate"
    HANDOFF_STATUS = "handoff.status"


def create_handoff_initiation(
    turn_context: TurnContext, handoff_context: Any, transcript: Transcript | None = None
) -> Activity:
    """The ``handoff.initiate`` event, in reply to the turn's incoming activity.

    ``handoff_context`` is the agent hub's object (the Telephony channel reads
    ``{"TargetPhoneNumber": "+14251231234"}``); ``transcript`` goes in an attachment.
    """
    if turn_context is None:
        raise TypeError("create_handoff_initiation(): missing turn_context")
    incoming = turn_context.activity
    event = _handoff_event(HandoffEventNames.INITIATE_HANDOFF, handoff_context, incoming.conversation)
    event.from_property = incoming.from_property
    event.relates_to = TurnContext.get_conversation_reference(incoming)
    event.reply_to_id = incoming.id
    event.service_url = incoming.service_url
    event.channel_id = incoming.channel_id
    if transcript is not None:
        event.attachments.append(
            Attachment(content_type="application/json", name="Transcript", content=transcript)
        )
    return event


def create_handoff_status(
    conversation: ConversationAccount, state: str, message: str | None = None
) -> Activity:
    """The ``handoff.status`` event an agent hub sends: ``value`` is ``{state, message}``."""
    if conversation is None:
        raise TypeError("create_handoff_status(): missing conversation")
    if not state or not str(state).strip():
        raise TypeError("create_handoff_status(): missing state")
    # The JS SDK drops an undefined message from the JSON; the C# serializer ignores null.
    value = {"state": state} if message is None else {"state": state, "message": message}
    return _handoff_event(HandoffEventNames.HANDOFF_STATUS, value, conversation)


def _handoff_event(name: str, value: Any, conversation: ConversationAccount | None) -> Activity:
    return Activity(
        type=ActivityTypes.event,
        name=name,
        value=value,
        id=str(uuid.uuid4()),
        timestamp=datetime.now(UTC),
        conversation=conversation,
        attachments=[],
        entities=[],
    )
