"""adapters.activity_json against msrest, with Hypothesis: ``to_json(m)`` is
``m.serialize()`` (the same dict, keys in the same order, so the same JSON bytes) and
``activity_from_json(d)`` is ``Activity().deserialize(d)`` (the same attribute values
and types, down to each datetime's tzinfo), or both raise the same error.

Activities are generated with every field the Telephony channel and the handoff
protocol use, then spoiled: wrong JSON types, nulls, unknown keys, datetimes in and
out of the strict shape. Well-formed input must also take the fast path (no fallback
to msrest), or the equivalence would be msrest against itself."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any

import pytest
from aiohttp import web
from botbuilder.core import TurnContext
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    Attachment,
    CardAction,
    ChannelAccount,
    ConversationAccount,
    ConversationReference,
    Entity,
    InputHints,
    InvokeResponse,
    RoleTypes,
    SemanticAction,
    SuggestedActions,
    TextHighlight,
    Transcript,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msrest.serialization import Model

from adapters import activity_json
from adapters.activity_json import activity_from_json, model_from_json, to_json
from adapters.bot import conversation_reference
from adapters.http import parse_activity

SETTINGS = settings(
    max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- comparing ----------------------------------------------------------------------


def same(a: Any, b: Any, path: str = "$") -> None:
    """``a`` and ``b`` alike in type and value all the way down (``==`` is not enough:
    models compare their ``__dict__`` loosely, datetimes ignore their tzinfo's kind)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, Model):
        assert list(vars(a)) == list(vars(b)), path
        for name in vars(a):
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{index}]")
    elif isinstance(a, datetime):
        assert a.replace(tzinfo=None) == b.replace(tzinfo=None), path
        assert type(a.tzinfo) is type(b.tzinfo), path
        assert (a.utcoffset(), a.tzname(), a.dst()) == (b.utcoffset(), b.tzname(), b.dst()), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def outcome(work: Any) -> tuple[str, Any]:
    try:
        return "ok", work()
    except Exception as e:
        return "raised", (type(e), str(e))


def check_deserialize(data: Any, cls: type[Model] = Activity) -> Any:
    fast = outcome(lambda: model_from_json(cls, data))
    slow = outcome(lambda: cls().deserialize(data))  # type: ignore[no-untyped-call]
    assert fast[0] == slow[0], (fast, slow)
    same(fast[1], slow[1])
    if cls is Activity:
        assert outcome(lambda: activity_from_json(data))[0] == fast[0]
    return fast[1]


def check_serialize(model: Model) -> dict[str, Any] | None:
    fast = outcome(lambda: to_json(model))
    slow = outcome(lambda: model.serialize())  # type: ignore[no-untyped-call]
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "raised":
        assert fast[1] == slow[1]
        return None
    same(fast[1], slow[1])
    assert json.dumps(fast[1]) == json.dumps(slow[1])  # the bytes posted to the channel
    result: dict[str, Any] = fast[1]
    return result


class no_fallback:
    """Asserts the block took the fast path only."""

    def __enter__(self) -> None:
        self.before = dict(activity_json.fallbacks)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert activity_json.fallbacks == self.before, "fell back to msrest"


# --- strategies ---------------------------------------------------------------------

texts = st.text(max_size=8)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=6,
)


@st.composite
def iso_texts(draw: st.DrawFn) -> str:
    """ISO 8601 as channels write it: 0-9 fraction digits, Z, an offset or none."""
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    text = moment.isoformat(timespec="seconds")
    digits = draw(st.integers(0, 9))
    if digits:
        text += "." + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits)))
    zone = draw(
        st.sampled_from(["Z", ""])
        | st.builds(
            lambda sign, hours, minutes: f"{sign}{hours:02}:{minutes:02}",
            st.sampled_from("+-"),
            st.integers(0, 25),
            st.integers(0, 99),
        )
    )
    return text + zone


def mangled(text: str) -> st.SearchStrategy[str]:
    """Near misses: msrest's lenient forms (lowercase, basic offsets, a comma) and bad values."""
    return st.sampled_from(
        [
            text.lower(),
            text.replace("Z", "+0000"),
            text.replace("Z", "+05"),
            text.replace(".", ","),
            text[:-1],
            text + "x",
            text.replace("T", " "),
            text[:11] + "24" + text[13:],
            text[:5] + "13" + text[7:],
            text[:8] + "31" + text[10:],
            text[:17] + "60" + text[19:],
            "0000" + text[4:],
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00+01:00",
            "2026-11-23T10:00:00.Z",
            "2026-11-23T10:00:00Z+01:00",
            "\uff12\uff10\uff12\uff16-11-23T10:00:00Z",  # full-width digits: msrest's \\d takes them
        ]
    )


iso_any = iso_texts() | iso_texts().flatmap(mangled) | texts | json_values


ROLES = st.sampled_from(["user", "bot", "skill"])


def accounts(roles: st.SearchStrategy[str] = ROLES) -> Any:
    return st.fixed_dictionaries(
        {"id": texts},
        optional={
            "name": texts,
            "role": roles,
            "aadObjectId": texts,
            "properties": json_values,
        },
    )


conversations = st.fixed_dictionaries(
    {"id": texts},
    optional={
        "name": texts,
        "isGroup": st.booleans(),
        "conversationType": texts,
        "tenantId": texts,
        "role": texts,
        "aadObjectId": texts,
        "properties": json_values,
    },
)
entities = st.fixed_dictionaries({"type": texts}, optional={"text": texts, "mentioned": accounts()})
attachments = st.fixed_dictionaries(
    {"contentType": texts}, optional={"contentUrl": texts, "content": json_values, "name": texts}
)
card_actions = st.fixed_dictionaries(
    {"type": st.just("imBack"), "title": texts}, optional={"value": json_values, "image": texts}
)


def activity_dicts(timestamps: st.SearchStrategy[Any]) -> Any:
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "event", "conversationUpdate", "endOfConversation"])},
        optional={
            "id": texts,
            "timestamp": timestamps,
            "localTimestamp": timestamps,
            "serviceUrl": texts,
            "channelId": st.just("telephony"),
            "from": accounts(),
            "recipient": accounts(),
            "conversation": conversations,
            "text": texts,
            "speak": texts,
            "inputHint": st.sampled_from(["acceptingInput", "expectingInput", "ignoringInput"]),
            "locale": st.just("en-US"),
            "replyToId": texts,
            "value": json_values,
            "name": st.sampled_from(["handoff.status", "handoff.initiate"]),
            "channelData": json_values,
            "entities": st.lists(entities, max_size=3),
            "attachments": st.lists(attachments, max_size=2),
            "membersAdded": st.lists(accounts(), max_size=3),
            "suggestedActions": st.fixed_dictionaries(
                {"actions": st.lists(card_actions, max_size=2)}, optional={"to": st.lists(texts, max_size=2)}
            ),
            "historyDisclosed": st.booleans(),
            "textHighlights": st.lists(
                st.fixed_dictionaries({"text": texts, "occurrence": st.integers()}), max_size=2
            ),
            "semanticAction": st.fixed_dictionaries(
                {"id": texts, "state": texts, "entities": st.dictionaries(texts, entities, max_size=2)}
            ),
            "relatesTo": st.fixed_dictionaries(
                {"conversation": conversations, "serviceUrl": texts, "channelId": texts},
                optional={"user": accounts(), "bot": accounts(), "activityId": texts},
            ),
            "expiration": timestamps,
            "code": texts,
            "callerId": texts,
        },
    )


valid_timestamps = iso_texts().filter(lambda t: t[-5:-3] < "24" and t[-2:] < "60" if t[-6] in "+-" else True)


@st.composite
def handoff_values(draw: st.DrawFn) -> dict[str, Any]:
    """A handoff.initiate's value as the JSON carries it: a transcript of activities."""
    return {
        "TargetPhoneNumber": draw(texts),
        "transcript": {"activities": draw(st.lists(activity_dicts(valid_timestamps), max_size=2))},
    }


def well_formed(timestamps: st.SearchStrategy[str] = valid_timestamps) -> Any:
    return activity_dicts(timestamps) | st.builds(
        lambda a, v: {**a, "value": v}, activity_dicts(timestamps), handoff_values()
    )


@st.composite
def spoiled(draw: st.DrawFn) -> Any:
    """A generated activity with some fields' values replaced by any JSON (or a bad
    datetime), nulls, unknown keys, nested objects broken."""
    data: dict[str, Any] = draw(activity_dicts(iso_any))
    keys = list(Activity._attribute_map[a]["key"] for a in Activity._attribute_map)
    for key in draw(st.lists(st.sampled_from(keys), max_size=4)):
        data[key] = draw(json_values | iso_any | st.none())
    for key in draw(st.lists(st.sampled_from(["from", "conversation", "relatesTo", "suggestedActions"]))):
        if isinstance(data.get(key), dict):
            inner = dict(data[key])
            inner[draw(st.sampled_from(["id", "role", "isGroup", "properties", "actions", "zz"]))] = draw(
                json_values
            )
            data[key] = inner
    data.update(draw(st.dictionaries(texts, json_values, max_size=3)))
    return draw(st.just(data) | st.just([data]) | st.just(json.dumps(data)) | json_values)


# --- deserialization ----------------------------------------------------------------


@settings(SETTINGS, max_examples=300)
@given(well_formed())
def test_well_formed_activities_deserialize_as_msrest_does_on_the_fast_path(data: dict[str, Any]) -> None:
    with no_fallback():
        fast = activity_from_json(data)
    same(fast, Activity().deserialize(data))


@settings(SETTINGS, max_examples=500)
@given(spoiled())
def test_any_json_deserializes_and_serializes_as_msrest_does_or_raises_the_same(data: Any) -> None:
    activity = check_deserialize(data)
    if isinstance(activity, Activity):  # msrest's own, whatever it made of the input
        check_serialize(activity)


@settings(SETTINGS, max_examples=1200)
@given(iso_any)
def test_datetimes_parse_as_msrest_parses_them(text: Any) -> None:
    check_deserialize({"type": "message", "timestamp": text})


@settings(SETTINGS, max_examples=200)
@given(
    st.fixed_dictionaries({"conversation": conversations, "serviceUrl": texts}, optional={"user": accounts()})
)
def test_conversation_references_deserialize_as_msrest_does(data: dict[str, Any]) -> None:
    with no_fallback():
        fast = model_from_json(ConversationReference, data)
    same(fast, ConversationReference().deserialize(data))


def test_unknown_keys_are_kept_in_additional_properties_as_msrest_keeps_them() -> None:
    data = {"type": "message", "zz": [1], "from": {"id": "a", "extra": {"b": None}}, "Text": "x"}
    activity = check_deserialize(data)
    assert activity.additional_properties == {"zz": [1], "Text": "x"}
    assert activity.from_property.additional_properties == {"extra": {"b": None}}
    assert activity.text is None  # keys match exactly, as msrest's rest_key_extractor does


@pytest.mark.parametrize(
    "data",
    [
        {"type": 5},  # msrest: str(5)
        {"type": "message", "historyDisclosed": "true"},  # msrest: True
        {"type": "message", "textHighlights": [{"occurrence": "3"}]},  # msrest: 3
        {"type": "message", "from": "caller"},  # msrest: an error
        {"type": "message", "membersAdded": {"id": "a"}},
        {"type": "message", "timestamp": 1700000000},
        {"type": "message", "timestamp": "2026-11-23t10:00:00z"},
        {"type": "message", "semanticAction": {"entities": [{"key": "k", "value": {"type": "t"}}]}},
        [{"type": "message"}],
        '{"type": "message"}',
    ],
)
def test_input_msrest_coerces_or_rejects_goes_to_msrest(data: Any) -> None:
    before = activity_json.fallbacks["from_json"]
    check_deserialize(data)
    assert activity_json.fallbacks["from_json"] > before


# --- serialization ------------------------------------------------------------------


# A naive datetime (no zone in the JSON) goes to msrest, which warns it takes it as UTC.
@settings(SETTINGS, max_examples=250)
@given(well_formed(valid_timestamps.filter(lambda t: t.endswith("Z") or t[-6] in "+-")))
def test_deserialized_activities_serialize_as_msrest_does_on_the_fast_path(data: dict[str, Any]) -> None:
    activity = Activity().deserialize(data)
    with no_fallback():
        check_serialize(activity)
    reference = TurnContext.get_conversation_reference(activity)
    with no_fallback():
        check_serialize(reference)


class Color(Enum):
    RED = "red"


python_values = st.recursive(
    json_scalars
    | st.sampled_from([ActivityTypes.message, InputHints.expecting_input, RoleTypes.bot, Color.RED])
    | st.builds(ChannelAccount, id=texts, role=st.sampled_from(list(RoleTypes)))
    | st.datetimes(timezones=st.none() | st.just(UTC) | st.just(timezone(timedelta(hours=-5))))
    | st.tuples(texts),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts | st.integers(), inner, max_size=3),
    max_leaves=8,
)
aware_datetimes = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)
) | st.datetimes(timezones=st.just(timezone(timedelta(hours=5, minutes=30))))


@st.composite
def built_activities(draw: st.DrawFn) -> Activity:
    """Activities as the bot builds them in Python: enums, aware datetimes, models in
    ``value`` and in attachments (a handoff's transcript), and sometimes values of the
    wrong type, naive datetimes, tuples, enums where msrest wants plain data."""
    transcript = Transcript(
        activities=[
            Activity(
                type=ActivityTypes.message,
                text=draw(texts),
                timestamp=draw(aware_datetimes),
                from_property=ChannelAccount(id="+1425", role=RoleTypes.user),
                recipient=ChannelAccount(id="bot", role=RoleTypes.bot),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
    )
    activity = Activity(
        type=draw(st.sampled_from([ActivityTypes.message, ActivityTypes.event, "message"])),
        id=draw(st.none() | texts),
        timestamp=draw(st.none() | aware_datetimes),
        text=draw(st.none() | texts),
        speak=draw(st.none() | texts),
        input_hint=draw(st.none() | st.sampled_from(list(InputHints))),
        channel_data=draw(st.none() | json_values | st.just({"replyKey": "3.0"})),
        value=draw(
            st.none()
            | json_values
            | st.just({"TargetPhoneNumber": "+14251231234", "transcript": transcript})
            | st.just(InvokeResponse(status=400, body={"error": "no"}))
        ),
        from_property=ChannelAccount(id="bot", name="Contoso", role=RoleTypes.bot),
        recipient=ChannelAccount(id="+1425", role="user", properties=draw(st.none() | json_values)),
        conversation=ConversationAccount(id=draw(texts), is_group=draw(st.none() | st.booleans())),
        attachments=draw(
            st.none()
            | st.just([Attachment(content_type="application/json", name="Transcript", content=transcript)])
        ),
        entities=draw(st.none() | st.just([Entity(type="mention")])),
        suggested_actions=draw(
            st.none() | st.just(SuggestedActions(to=["a"], actions=[CardAction(type="imBack", value=1)]))
        ),
        text_highlights=draw(st.none() | st.just([TextHighlight(text="a", occurrence=2)])),
        semantic_action=draw(st.none() | st.just(SemanticAction(id="s", entities={"e": Entity(type="t")}))),
    )
    for _ in range(draw(st.integers(0, 2))):  # a field of the wrong type
        name = draw(st.sampled_from(list(Activity._attribute_map)))
        setattr(activity, name, draw(python_values))
    if draw(st.integers(0, 9)) == 0:
        delattr(activity, draw(st.sampled_from(list(Activity._attribute_map))))
    return activity


@settings(SETTINGS, max_examples=300)
@given(built_activities())
def test_built_activities_serialize_as_msrest_does(activity: Activity) -> None:
    check_serialize(activity)


def test_a_reply_and_a_handoff_take_the_fast_path() -> None:
    incoming = Activity().deserialize(
        {
            "type": "message",
            "id": "1",
            "timestamp": "2026-11-23T10:00:00.000Z",
            "serviceUrl": "http://channel/",
            "channelId": "telephony",
            "from": {"id": "+14255550123", "role": "user"},
            "recipient": {"id": "bot", "role": "bot"},
            "conversation": {"id": "call-1"},
            "text": "agent",
        }
    )
    reply = Activity(
        type=ActivityTypes.message, text="hi", speak="<speak/>", input_hint=InputHints.accepting_input
    )
    reply.apply_conversation_reference(TurnContext.get_conversation_reference(incoming))
    with no_fallback():
        out = check_serialize(reply)
    assert out is not None and out["inputHint"] == "acceptingInput"
    transcript = Transcript(activities=[Activity(type="message", text="a", timestamp=datetime.now(UTC))])
    handoff = Activity(
        type="event",
        name="handoff.initiate",
        value={"TargetPhoneNumber": "+1"},
        attachments=[Attachment(content_type="application/json", name="Transcript", content=transcript)],
    )
    with no_fallback():
        check_serialize(handoff)


def test_naive_datetimes_and_foreign_models_go_to_msrest() -> None:
    before = activity_json.fallbacks["to_json"]
    check_serialize(Activity(type="message", timestamp=datetime(2026, 1, 1)))  # msrest warns: UTC

    mine: Any = type("Mine", (Model,), {"_attribute_map": {"a": {"key": "a", "type": "str"}}})
    check_serialize(Activity(type="message", value=mine()))
    assert activity_json.fallbacks["to_json"] == before + 2


def test_conversation_reference_json_is_unchanged() -> None:
    activity = Activity().deserialize(
        {
            "type": "message",
            "id": "1",
            "serviceUrl": "http://channel/",
            "channelId": "telephony",
            "from": {"id": "+14255550123", "role": "user"},
            "recipient": {"id": "bot", "name": "Contoso", "role": "bot"},
            "conversation": {"id": "call-1"},
            "locale": "en-US",
        }
    )
    reference = TurnContext.get_conversation_reference(activity)
    reference.activity_id = None
    expected = json.dumps(reference.serialize(), separators=(",", ":"), sort_keys=True)
    assert conversation_reference(activity) == expected


def test_parse_activity_answers_400_when_msrest_raises_past_its_own_errors() -> None:
    base = '{"type":"message","channelId":"telephony","serviceUrl":"http://c/","conversation":{"id":"c"}'
    for body in (
        base + ',"textHighlights":[{"occurrence":Infinity}]}',  # int(inf): OverflowError
        base + ',"timestamp":"2026-11-23T10:00:00+99:00"}',  # a DeserializationError
    ):
        response = parse_activity(body.encode(), "application/json")
        assert isinstance(response, web.Response) and response.status == 400, body
        assert response.text is not None and "not a valid activity" in response.text


def test_the_codec_bench_runs_at_smoke_size() -> None:
    from bench import codec

    report = codec.bench("", smoke=True, say=lambda _: None)
    assert all(report["checks"].values()), report["checks"]
    assert all(r["value"] > 0 for r in report["rows"])
