"""The handoff events, checked against the official C# and JS SDKs' EventFactory tests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botbuilder.core import TurnContext
from botbuilder.core.adapters import TestAdapter
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    ChannelAccount,
    ConversationAccount,
    ConversationReference,
    Transcript,
)

from adapters.handoff import HandoffEventNames, create_handoff_initiation, create_handoff_status
from orchestrator.events import HandoffStates

FIXTURES = Path(__file__).parent / "fixtures"
HUB_CONTEXT = {"TargetPhoneNumber": "+14251231234"}


def make_turn_context() -> TurnContext:
    incoming = Activity(
        type=ActivityTypes.message,
        text="talk to agent",
        from_property=ChannelAccount(id="test"),
        recipient=ChannelAccount(id="bot"),
        conversation=ConversationAccount(id="conv1"),
        channel_id="telephony",
        service_url="http://myservice",
        id="act-1",
    )
    return TurnContext(TestAdapter(), incoming)


def make_transcript() -> Transcript:
    return Transcript(activities=[Activity(type="message", text="hello")])


def with_placeholders(wire: dict[str, Any]) -> dict[str, Any]:
    """The wire dict with its random id and clock timestamp replaced, after checking them."""
    uuid.UUID(wire["id"])  # a real GUID, as the SDKs' Guid.NewGuid() / uuid()
    stamp = datetime.fromisoformat(wire["timestamp"].replace("Z", "+00:00"))
    offset = stamp.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return {**wire, "id": "<id>", "timestamp": "<timestamp>"}


def load_fixture(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_event_names() -> None:
    assert HandoffEventNames.INITIATE_HANDOFF == "handoff.initiate"
    assert HandoffEventNames.HANDOFF_STATUS == "handoff.status"
    assert HandoffStates.ALL == ("accepted", "failed", "completed")


# --- create_handoff_status -------------------------------------------------------------


def test_status_without_conversation_raises() -> None:
    with pytest.raises(TypeError):
        create_handoff_status(None, "accepted")


@pytest.mark.parametrize("state", [None, "", "   "], ids=["none", "empty", "blank"])
def test_status_without_state_raises(state: str | None) -> None:
    with pytest.raises(TypeError):
        create_handoff_status(ConversationAccount(), state)  # type: ignore[arg-type]


def test_status_with_message() -> None:
    conversation = ConversationAccount(id="conv1")
    event = create_handoff_status(conversation, "failed", "timed out")

    assert event.name == "handoff.status"
    assert event.type == "event"
    assert json.dumps(event.value, separators=(",", ":")) == '{"state":"failed","message":"timed out"}'
    assert isinstance(event.attachments, list)
    assert event.attachments == []
    assert event.entities == []
    assert event.conversation is conversation
    assert event.id
    uuid.UUID(event.id)
    assert isinstance(event.timestamp, datetime)
    assert event.timestamp.tzinfo is not None


def test_status_without_message_has_state_only() -> None:
    event = create_handoff_status(ConversationAccount(id="conv1"), "failed")
    assert event.value == {"state": "failed"}
    assert "message" not in event.serialize()["value"]


@pytest.mark.parametrize("state", ["accepted", "failed", "completed"])
def test_status_states(state: str) -> None:
    event = create_handoff_status(ConversationAccount(id="conv1"), state)
    assert event.value == {"state": state}


def test_events_get_distinct_ids() -> None:
    first = create_handoff_status(ConversationAccount(id="conv1"), "accepted")
    second = create_handoff_status(ConversationAccount(id="conv1"), "accepted")
    assert first.id != second.id


# --- create_handoff_initiation ---------------------------------------------------------


def test_initiation_without_turn_context_raises() -> None:
    with pytest.raises(TypeError):
        create_handoff_initiation(None, HUB_CONTEXT)


def test_initiation_fields() -> None:
    ctx = make_turn_context()
    transcript = make_transcript()
    event = create_handoff_initiation(ctx, HUB_CONTEXT, transcript)

    assert event.name == "handoff.initiate"
    assert event.type == "event"
    assert event.value == {"TargetPhoneNumber": "+14251231234"}
    assert event.from_property.id == "test"
    assert event.reply_to_id == "act-1"
    assert event.service_url == "http://myservice"
    assert event.channel_id == "telephony"
    assert event.conversation.id == "conv1"
    assert event.id
    uuid.UUID(event.id)
    assert event.entities == []

    assert isinstance(event.relates_to, ConversationReference)
    assert event.relates_to.conversation.id == "conv1"
    assert event.relates_to.activity_id == "act-1"
    assert event.relates_to.user.id == "test"
    assert event.relates_to.bot.id == "bot"
    assert event.relates_to.channel_id == "telephony"
    assert event.relates_to.service_url == "http://myservice"

    assert len(event.attachments) == 1
    attachment = event.attachments[0]
    assert attachment.content_type == "application/json"
    assert attachment.name == "Transcript"
    assert attachment.content is transcript


def test_initiation_without_transcript_has_no_attachments() -> None:
    event = create_handoff_initiation(make_turn_context(), HUB_CONTEXT)
    assert event.attachments == []
    assert event.entities == []
    assert event.value == HUB_CONTEXT


def test_initiation_does_not_share_lists_between_events() -> None:
    ctx = make_turn_context()
    with_transcript = create_handoff_initiation(ctx, HUB_CONTEXT, make_transcript())
    without = create_handoff_initiation(ctx, HUB_CONTEXT)
    assert len(with_transcript.attachments) == 1
    assert without.attachments == []


# --- wire format -----------------------------------------------------------------------


def test_initiation_wire_format_matches_golden() -> None:
    event = create_handoff_initiation(make_turn_context(), HUB_CONTEXT, make_transcript())
    assert with_placeholders(event.serialize()) == load_fixture("handoff_initiate.json")


def test_status_wire_format_matches_golden() -> None:
    event = create_handoff_status(ConversationAccount(id="conv1"), "failed", "timed out")
    assert with_placeholders(event.serialize()) == load_fixture("handoff_status.json")


def test_initiation_serializes_to_json_with_transcript_activities() -> None:
    transcript = Transcript(
        activities=[
            Activity(type="message", text="talk to agent", from_property=ChannelAccount(id="test")),
            Activity(type="message", text="Transferring you now", from_property=ChannelAccount(id="bot")),
        ]
    )
    event = create_handoff_initiation(make_turn_context(), HUB_CONTEXT, transcript)

    decoded = json.loads(json.dumps(event.serialize()))

    activities = decoded["attachments"][0]["content"]["activities"]
    assert [a["text"] for a in activities] == ["talk to agent", "Transferring you now"]
    assert [a["from"]["id"] for a in activities] == ["test", "bot"]
    assert all(a["type"] == "message" for a in activities)
    assert decoded["attachments"][0]["contentType"] == "application/json"
    assert decoded["relatesTo"]["activityId"] == "act-1"
    assert decoded["replyToId"] == "act-1"
    assert decoded["value"] == HUB_CONTEXT


def test_timestamp_is_current_utc() -> None:
    before = datetime.now(UTC)
    event = create_handoff_status(ConversationAccount(id="conv1"), "completed")
    after = datetime.now(UTC)
    assert before <= event.timestamp <= after
