"""Fuzzing (issue 7): generated caller text through the SSML and the reply path, and
generated bodies posted to ``/api/messages``.

Caller text mixes XML specials, C0/C1 controls, lone surrogates, noncharacters, the BOM,
astral characters and very long strings. What the caller hears must always be
well-formed SSML whose text is what they said (less what XML forbids), and the transcript
must keep what they said (redacted as the flow says, nothing else changed). Posted bodies
are any JSON, valid activities with one field replaced, wrong content types and tokens,
bytes that are not UTF-8, deep nesting and huge numbers: never a 5xx, a 4xx always says
why, and a refused request leaves a call's state alone.

Timings on a 2-core machine: the two pure properties ~10 s each, the HTTP ones ~10 s and
~4 s (``--hypothesis-show-statistics`` also counts the answers per kind of request).
"""

from __future__ import annotations

import io
import json
import re
import string
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from botbuilder.schema import ActivityTypes
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from adapters.activity_json import to_json
from adapters.bot import replies
from adapters.http import STORE_KEY
from adapters.store import RedisCallStore, decode_line, encode_line
from app import create_app
from orchestrator.call import BOT, CALLER, Call, Line
from orchestrator.callflow import load_callflow
from orchestrator.config import load_settings
from orchestrator.events import CallerInput
from orchestrator.ssml import SSML_NAMESPACE, clean_text, speak, xml_text
from orchestrator.turn import LINE_MAX_CHARS, Speak, TurnRunner
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import SAMPLE_FLOW, delete_prefix
from tests.test_http import dump

SPEAK_TAG = f"{{{SSML_NAMESPACE}}}speak"
VOICE_TAG = f"{{{SSML_NAMESPACE}}}voice"
NOW = "2026-11-23T10:00:00.000Z"
FLOW = load_callflow(SAMPLE_FLOW)
ECHO = 'What I heard was "{}"'  # the default flow's fallback prompt

# A failing 100k-character example is too long to print whole; Hypothesis warns of that,
# and the warning (an error here) must not hide the failure itself.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)

# No example database (as in test_activity_json): a failure prints its example, and the
# ones found so far are pinned with @example.
FUZZ = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- caller text ------------------------------------------------------------------------

# Strings worth meeting in caller text, of more than one character.
TOKENS = [
    "]]>", "<!--", "-->", "&amp;", "&#0;", "&#x1F;", "&lt;", "<![CDATA[", "<?xml version='1.0'?>",
    "</voice>", "</speak>", '<speak version="1.0">', '<!DOCTYPE x [<!ENTITY e "b">]>&e;', "{input}",
    "\r\n", "\ud83d\ude00",  # a surrogate pair: two lone surrogates side by side
    "agent", "one", "caf\u00e9", "\u4f60\u597d", "\u0645\u0631\u062d\u0628\u0627", "x" * 50,
]  # fmt: skip
ODD_CHARACTERS = (
    "<>&'\"{}%"  # XML specials, and a format string's
    "\x00\x01\x08\x0b\x0c\x1b\x1f\x7f\x80\x85\x9f\t\n\r"  # C0 and C1 controls
    "\u00a0\u2028\u2029\u200b\u0301"
    "\ud800\udbff\udc00\udfff"  # lone surrogates
    "\ufeff\ufffe\uffff\ufffd\ue000"  # BOM, noncharacters, replacement, private use
    "\U0001f600\U0001f389\U0001d11e\U0001fffe\U0010fffd\U0010ffff"  # astral
)
# Capital ASCII letters stand for the TOKENS: Hypothesis draws one character where a list
# of pieces costs several draws (10,000 examples take ~6 s of drawing instead of ~15 s).
_MARKS = string.ascii_uppercase[: len(TOKENS)]
_TOKEN_OF = str.maketrans(dict(zip(_MARKS, TOKENS, strict=True)))
characters = st.characters(
    categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cs", "Cf", "Co", "Cn"],  # every category
    include_characters=ODD_CHARACTERS + _MARKS,
)
short_texts = st.text(characters, max_size=40).map(lambda text: text.translate(_TOKEN_OF))


@st.composite
def caller_texts(draw: st.DrawFn) -> str:
    """Mostly short hostile text; one in sixteen a very long one (10k to 100k characters),
    built by repeating a short one (Hypothesis could not draw 100k characters itself)."""
    text = draw(short_texts)
    if draw(st.integers(0, 15)) == 0:
        length = draw(st.integers(10_000, 100_000))
        seed = text or "<&x"
        text = (seed * (length // len(seed) + 1))[:length]
    return text


def heard(text: str, caller: str = "") -> str:
    """What the bot takes the caller to have said: their words as redacted by the flow
    (digit runs, their own number: ``orchestrator.redact``)."""
    return FLOW.redact(text, caller)


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def parse_speak(ssml: str) -> ET.Element:
    """The ``voice`` element of well-formed SSML: ``<speak>`` in the SSML namespace with one
    ``<voice>`` child, which holds only text (caller text never becomes markup)."""
    ssml.encode("utf-8")  # the wire is UTF-8: no lone surrogate survives into the SSML
    root = ET.fromstring(ssml)
    assert root.tag == SPEAK_TAG
    (voice,) = list(root)
    assert voice.tag == VOICE_TAG
    assert list(voice) == []
    assert (root.text, voice.tail) == (" ", " ")  # whitespace between every element
    return voice


REGRESSIONS = [
    "a\rb",  # a parser reads a literal CR as LF: it went out as the wrong text
    "a\r\nb",
    "\r",
    "]]>\x00\ud800\ufffe\uffff\U0010ffff\ufeff",
    "&amp;</voice></speak>",
]

# --- the SSML -----------------------------------------------------------------------------


@settings(FUZZ, max_examples=10_000)
@given(text=caller_texts(), voice=st.sampled_from(["en-US-JennyNeural", 'v"o<i>c&e', "x'y"]))
@example(text="a\rb", voice="en-US-JennyNeural")
@example(text="a\r\nb", voice="en-US-JennyNeural")
def test_speak_is_well_formed_and_says_exactly_the_clean_text(text: str, voice: str) -> None:
    ssml = speak(xml_text(text), voice, "en-US")
    spoken = parse_speak(ssml)
    assert spoken.get("name") == voice
    assert spoken.text == f" {clean_text(text)} "
    assert "><" not in ssml


def test_clean_text_keeps_everything_xml_allows() -> None:
    for text in [*ODD_CHARACTERS, *TOKENS, *REGRESSIONS]:
        kept = clean_text(text)
        assert kept == "".join(c for c in text if c in kept)  # only removes, in order
        assert all(c in "\t\n\r" or not (ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF) for c in kept)


# --- the reply a caller's words produce, and their transcript line --------------------


RUNNER = TurnRunner(FLOW)


@settings(FUZZ, max_examples=5_000)
@given(text=caller_texts())
@example(text="a\rb")
@example(text="]]>\x00\ud800\ufffe\uffff\U0010ffff\ufeff")
def test_the_echo_reply_on_the_wire_says_what_the_caller_said(text: str) -> None:
    """The real turn (machine and rendering) and the real reply (``adapters.bot.replies``),
    serialised as the channel client sends it."""
    assume(FLOW.route_for("main", text, keypad=False) is None)  # a route says its own prompt, or transfers
    turn = RUNNER.run(Call(id="c"), CallerInput(text), now=NOW)
    assert [type(e) for e in turn.effects] == [Speak]
    (reply,) = replies(turn, None)
    wire = json.loads(json.dumps(to_json(reply), ensure_ascii=False).encode("utf-8"))
    said = ECHO.format(clean_text(heard(text)))
    assert wire["type"] == ActivityTypes.message and wire["text"] == said
    voice = parse_speak(wire["speak"])
    assert voice.get("name") == "en-US-GuyNeural"
    assert voice.text == f" {said} "

    caller_line, bot_line = turn.lines
    assert caller_line == Line(CALLER, heard(text)[:LINE_MAX_CHARS], NOW)
    assert bot_line == Line(BOT, said[:LINE_MAX_CHARS], NOW)
    if not has_lone_surrogate(text):  # the HTTP edge refuses those (see the HTTP fuzz)
        for line in turn.lines:
            stored = encode_line(line)
            stored.encode("utf-8")  # as Redis receives it
            assert decode_line(stored) == line


# --- HTTP ---------------------------------------------------------------------------------


@pytest.fixture
async def bot(
    bot_redis: dict[str, Any], key_prefix: str, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    """The bot, with nothing of its own to do while a property runs: no watchdog or re-send
    comes due (either would change the known call between two requests)."""
    flow = FLOW.model_dump(mode="json")
    flow["queues"]["agents"]["timeout_seconds"] = 3600
    flow_file = tmp_path / "callflow.yaml"
    flow_file.write_text(yaml.safe_dump(flow))
    settings = load_settings(
        **bot_redis,
        REDIS_KEY_PREFIX=key_prefix,
        CALLFLOW_FILE=flow_file,
        OUTBOX_GRACE_SECONDS=600,
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    if bot_redis["REDIS_URL"]:
        await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
    await client.close()


DELETE = object()  # a field replaced by this is left out

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**4000), 10**4000),  # Python's str(int) refuses past 4,300 digits
    st.floats(),  # NaN and ±Infinity too: json.dumps writes them and json.loads reads them
    short_texts,
    st.sampled_from(
        [
            "", "message", "event", "conversationUpdate", "endOfConversation", "invoke", "typing",
            "handoff.status", "expectReplies", "notification", "telephony", "en-US", "not a date",
            "2026-11-23T10:00:00.000Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.9999999+00:00", "0001-01-01T00:00:00-14:00", "2026-13-45T99:99:99Z",
            "2026-11-23T10:00:00.000+25:00", "2026-11-23", "T", "1e999",
            "http://127.0.0.1:9/", "user", "bot", "accepted", "failed", "completed",
        ]
    ),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "state", "role", "name", "type"]) | short_texts, children, max_size=4
        )
    ),
    max_leaves=12,
)

# Every field a Telephony activity has, a few it might, and the nested ones we read.
FIELDS = [
    "type", "id", "timestamp", "localTimestamp", "channelId", "serviceUrl", "from", "recipient",
    "conversation", "locale", "text", "speak", "value", "name", "code", "membersAdded",
    "membersRemoved", "entities", "channelData", "deliveryMode", "replyToId", "attachments",
    "inputHint", "relatesTo", "suggestedActions", "textFormat", "expiration", "importance",
    "callerId", "semanticAction", "valueType", "label", "textHighlights", "listenFor",
    "conversation.id", "conversation.isGroup", "conversation.tenantId", "from.id", "from.role",
    "from.name", "recipient.id", "recipient.role", "membersAdded.0", "membersAdded.1.id",
    "value.state", "value.message", "attachments.0", "entities.0",
]  # fmt: skip


def activities_of(caller: Caller) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(["start", "say", "agent", "status", "hang_up"]).map(
        lambda kind: {
            "start": caller.start,
            "say": lambda: caller.say("hello"),
            "agent": lambda: caller.say("agent"),
            "status": lambda: caller.status({"state": "failed", "message": "busy"}),
            "hang_up": caller.hang_up,
        }[kind]()
    )


def replaced(activity: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``activity`` with the field at ``path`` (dotted; digits index lists) set to ``value``,
    creating what is missing on the way."""
    activity = json.loads(json.dumps(activity))
    *parents, last = path.split(".")
    node: Any = activity
    for name in parents:
        key: Any = int(name) if isinstance(node, list) else name
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
        elif not isinstance(node.get(key), dict | list):
            node[key] = [] if name in ("membersAdded", "attachments", "entities") else {}
        node = node[key]
    if isinstance(node, list):
        while len(node) <= int(last):
            node.append({})
        node[int(last)] = value if value is not DELETE else None
    elif value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return activity


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


JSON = "application/json"


class Request(NamedTuple):
    """A request for /api/messages; ``conversation`` is the call it is aimed at, if any."""

    what: str
    body: bytes
    content_type: str = JSON
    conversation: str = ""
    authorization: str | None = None


_SPLICE = "\x00splice\x00"


def spliced(activity: dict[str, Any], name: str, raw: bytes) -> bytes:
    """``activity`` as JSON, with ``raw`` (any bytes) for the value of field ``name``."""
    body = json.dumps({**activity, name: _SPLICE}).encode()
    return body.replace(json.dumps(_SPLICE).encode(), raw)


TOP_FIELDS = [name for name in FIELDS if "." not in name]
KINDS = [
    "any JSON",
    "one field replaced",
    "known call, one field replaced",
    "content type",
    "authorization",
    "bytes",
    "nested",
    "huge number",
]


@st.composite
def requests(draw: st.DrawFn, service_url: str, known: str) -> Request:
    kind = draw(st.sampled_from(KINDS))
    caller = Caller(service_url, known if kind.startswith("known") else None)
    cid = caller.conversation_id
    activity = draw(activities_of(caller))
    if kind == "any JSON":
        return Request(kind, json.dumps(draw(json_values)).encode())
    if kind.endswith("one field replaced"):
        path = draw(st.sampled_from(FIELDS))
        value = draw(st.just(DELETE) | json_values)
        return Request(
            f"{kind}: {path}", json.dumps(replaced(activity, path, value)).encode(), conversation=cid
        )
    if kind == "content type":
        content_type = draw(
            # "text/plain;a*": a parameter CPython's email parser (aiohttp's) raises IndexError on
            st.sampled_from(
                ["", "text/plain", "application/xml", "application/json-patch+json", "*/*", "text/plain;a*"]
            )
            | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
        )
        assume(content_type.split(";")[0].strip().lower() != JSON)
        return Request(kind, json.dumps(activity).encode(), content_type, cid)
    if kind == "authorization":
        authorization = draw(
            st.sampled_from(
                ["", "Bearer", "Bearer ", "Bearer not-a-jwt", "Bearer a.b.c", "Basic dXNlcjpwYXNz"]
            )
            | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
        )
        return Request(kind, json.dumps(activity).encode(), conversation=cid, authorization=authorization)
    if kind == "bytes":
        raw = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            return Request(kind, raw)
        name = draw(st.sampled_from(TOP_FIELDS))
        quoted = b'"' + raw.replace(b'"', b"").replace(b"\\", b"") + b'"'  # a string of raw bytes
        return Request(
            f"{kind}: {name}", spliced(activity, name, draw(st.sampled_from([raw, quoted]))), conversation=cid
        )
    if kind == "nested":
        depth = draw(st.integers(1, 120_000))
        inner = nested(depth, draw(st.sampled_from(["list", "object"])))
        if draw(st.booleans()):
            return Request(kind, inner)
        name = draw(st.sampled_from(TOP_FIELDS))
        return Request(f"{kind}: {name}", spliced(activity, name, inner), conversation=cid)
    digits = draw(st.integers(4_000, 200_000))  # Python's int() refuses past 4,300
    number = draw(st.sampled_from(["", "-", "0.", "1e"])) + "9" * digits
    name = draw(st.sampled_from(TOP_FIELDS))
    return Request(f"{kind}: {name}", spliced(activity, name, number.encode()), conversation=cid)


async def post(
    bot: TestClient[Any, Any], body: bytes, content_type: str = JSON, authorization: str | None = None
) -> ClientResponse:
    """POST ``body`` as is (a large one from a file object: aiohttp warns of a large bytes body)."""
    headers = {"Content-Type": content_type} if content_type else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = io.BytesIO(body) if len(body) > 512 * 1024 else body
    return await bot.post("/api/messages", data=data, headers=headers, skip_auto_headers=["Content-Type"])


def assert_explained(status: int, body: bytes, what: str) -> None:
    """A 4xx carries ``{"error": "<one line>"}``, a 413 for too big a body too."""
    reason = json.loads(body)["error"]
    assert isinstance(reason, str) and reason.strip() and "\n" not in reason, (what, reason)


@pytest.fixture
async def known_call(bot: TestClient[Any, Any], channel: ChannelStandIn) -> str:
    """A call started before the property runs, by a valid turn."""
    caller = Caller(channel.url)
    assert (await bot.post("/api/messages", json=caller.start())).status == 201
    return caller.conversation_id


HTTP_FUZZ = settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("bot_redis", ["real"], indirect=True)
@settings(HTTP_FUZZ, max_examples=2_000)
@given(data=st.data())
async def test_any_request_gets_no_5xx_and_a_refused_one_changes_nothing(
    bot: TestClient[Any, Any], channel: ChannelStandIn, known_call: str, data: st.DataObject
) -> None:
    store: RedisCallStore = bot.app[STORE_KEY]
    before = await dump(store, known_call)
    request = data.draw(requests(channel.url, known_call), label="request")
    response = await post(bot, request.body, request.content_type, request.authorization)
    answer = await response.read()
    event(f"{request.what.split(':')[0]}: {response.status}")  # --hypothesis-show-statistics
    assert response.status < 500, (request.what, response.status, answer[:300])
    if response.status >= 400:
        assert_explained(response.status, answer, request.what)
        assert await dump(store, known_call) == before, request.what
    elif request.conversation != known_call:
        assert await dump(store, known_call) == before, request.what


@pytest.mark.parametrize("bot_redis", ["real"], indirect=True)
@settings(HTTP_FUZZ, max_examples=1_000)
@given(text=caller_texts())
@example(text="a\rb")
@example(text="\ud800 lone")
@example(text="\ud83d\ude00")  # a pair, as two \u escapes: one astral character
@example(text="\x00" * 60_000)  # 360 KB as \u0000 escapes: refused as too big
async def test_what_a_caller_says_over_http_is_echoed_and_kept_as_said(
    bot: TestClient[Any, Any], channel: ChannelStandIn, text: str
) -> None:
    """The whole way: JSON in, the turn, Redis, the reply posted to the channel."""
    caller = Caller(channel.url)
    cid = caller.conversation_id
    body = json.dumps(caller.say(text)).encode()
    response = await post(bot, body)
    store: RedisCallStore = bot.app[STORE_KEY]
    # json.dumps writes a surrogate as a \u escape: a high one before a low one is read
    # back as the astral character they encode, any other as itself, and refused.
    text = json.loads(json.dumps(text))
    if response.status == 413:
        assert len(body) > 256 * 1024
        return
    if has_lone_surrogate(text):
        assert response.status == 400
        assert_explained(response.status, await response.read(), "lone surrogate")
        assert await dump(store, cid) == [{}, [], [], {}, {}]
        return
    assert response.status == 201, await response.text()
    call = (await store.load(cid)).call
    assert call is not None
    said = heard(text, caller.number)  # control characters and all: it is not SSML
    assert call.transcript[0] == Line(CALLER, said[:LINE_MAX_CHARS], call.transcript[0].at)
    if FLOW.route_for("main", text, keypad=False) is not None:
        return
    (reply,) = channel.for_conversation(cid)
    echo = ECHO.format(clean_text(said))
    assert reply["text"] == echo
    assert parse_speak(reply["speak"]).text == f" {echo} "
    assert call.transcript[1:] == [Line(BOT, echo[:LINE_MAX_CHARS], call.transcript[1].at)]
