"""PII redaction: caller words are redacted where they enter a call, so Redis (and everything
that shows it) never holds them; the agent gets them whole only when the flow says so."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from botbuilder.core import TurnContext
from botbuilder.core.adapters import TestAdapter
from click.testing import CliRunner
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.activity_json import activity_from_json
from adapters.bot import caller_id, conversation_reference, rendered
from adapters.http import STORE_KEY
from adapters.sealing import Sealer
from adapters.store import RedisCallStore
from app import create_app
from cli import cli
from orchestrator.call import CALLER, Call
from orchestrator.callflow import CallFlow, load_callflow, parse_callflow
from orchestrator.config import load_settings
from orchestrator.engine import Engine
from orchestrator.errors import ConfigError
from orchestrator.events import CallerInput, CallStarted, HandoffStatus, InvalidStatus, status_from_value
from orchestrator.redact import CALLER_NUMBER, Redactor
from orchestrator.turn import LINE_MAX_CHARS, TurnRunner
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import SAMPLE_FLOW, delete_prefix

DEFAULT_FLOW = Path(__file__).parents[1] / "orchestrator" / "flows" / "transfer-sample.yaml"
CALLER_ID = "+14255550123"
CARD = "4111 1111 1111 1111"
SAID = f"my card is {CARD} and call me on 425-555-0123"
MASKED_CARD = "************1111"
REDACTED = f"my card is {MASKED_CARD} and call me on {CALLER_NUMBER}"
# What must appear nowhere in Redis (the caller's number stays only in the conversation
# reference's "from", where it belongs).
SECRETS = ("4111", "555-0123", "5550123")
# The caller's number as it may be written; none may be stored outside the reference.
CALLER_FORMS = (
    "+14255550123",
    "14255550123",
    "4255550123",
    "425-555-0123",
    "555-0123",
    "555 0123",
    "5550123",
)


def flow_with(**privacy: Any) -> CallFlow:
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["privacy"] = {**data["privacy"], **privacy}
    return CallFlow.model_validate(data)


# --- the rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CARD, MASKED_CARD),
        ("4111-1111-1111-1111", MASKED_CARD),
        ("card 4111111111111111.", f"card {MASKED_CARD}."),
        ("call +1 (206) 555-0100 please", "call *******0100 please"),
        ("account 12345678, order 42", "account ****5678, order 42"),
        ("1234567", "***4567"),
        ("123456", "123456"),  # six digits: kept
        ("press 1 or 0", "press 1 or 0"),
        # A date of 7 or more digits is masked: a false positive rather than a leaked card.
        ("on 2024/01/15 at 10:30", "on ****0115 at 10:30"),
        ("on 15/1 at 10:30", "on 15/1 at 10:30"),
        ("", ""),
        ("talk to agent", "talk to agent"),
    ],
)
def test_long_digit_runs_are_masked_but_their_last_four(text: str, expected: str) -> None:
    assert Redactor()(text) == expected
    assert Redactor()(expected) == expected  # masking twice changes nothing


@pytest.mark.parametrize(
    "separator",
    [
        " ",
        "\t",
        "\u00a0",  # no-break space
        "\u202f",  # narrow no-break space
        "\u2009",  # thin space
        "\u3000",  # ideographic space
        "\u200b",  # zero-width space
        "\u00ad",  # soft hyphen
        *(chr(c) for c in range(0x2010, 0x2016)),  # hyphen ... horizontal bar (en, em dash)
        "\u2212",  # minus
        "\uff0d",  # fullwidth hyphen-minus
        "/",
        ",",
        ", ",
        " - ",
        ".",
    ],
)
def test_a_card_written_with_any_separator_is_masked(separator: str) -> None:
    card = separator.join(["4111", "1111", "1111", "1111"])
    assert Redactor()(f"card {card} ok") == f"card {MASKED_CARD} ok"
    number = separator.join(["425", "555", "0123"])
    assert Redactor(digit_runs=0)(f"on {number}", CALLER_ID) == f"on {CALLER_NUMBER}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 " * 50_000, "*" * 49_996 + "1111 "),  # one run of 50,000 digits
        ("4" * 100_000, "*" * 99_996 + "4444"),
        ("123456 ,,, " * 10_000, None),  # runs a digit short, each ended by five separators
        ("1 2 3 4 5 6;" * 9_000, None),
        ("+(1 " * 25_000, None),
        ("-. /" * 25_000, None),  # separators only
    ],
)
def test_100k_characters_of_digits_and_separators(text: str, expected: str | None) -> None:
    """Each repetition of the run regex takes a digit, so a scan is linear in the text
    (checked by hand with timeit: 2-16 ms per 100k characters, ten times that for 1M)."""
    assert Redactor()(text, CALLER_ID) == (text if expected is None else expected)


def test_keep_no_digits() -> None:
    assert flow_with(keep_last_digits=0).redact(CARD) == "*" * 16


@pytest.mark.parametrize(
    "said",
    [
        "+14255550123",
        "14255550123",
        "4255550123",
        "425-555-0123",
        "(425) 555 0123",
        "425.555.0123",
        "555 0123",
    ],
)
def test_the_callers_own_number_in_any_formatting(said: str) -> None:
    redact = Redactor(digit_runs=0)  # only the caller rule
    assert redact(f"it is {said}, thanks", CALLER_ID) == f"it is {CALLER_NUMBER}, thanks"
    assert redact(f"it is {said}", "+14255559999") == f"it is {said}"  # someone else's number
    assert redact(f"it is {said}", "web-user-1") == f"it is {said}"  # not a phone number


def test_a_national_number_with_a_trunk_zero() -> None:
    assert Redactor()("020 7946 0000", "+442079460000") == CALLER_NUMBER


def test_the_caller_rule_catches_numbers_shorter_than_digit_runs() -> None:
    redact = Redactor(digit_runs=12)
    assert redact("4255550123 or 4255550124", CALLER_ID) == f"{CALLER_NUMBER} or 4255550124"


def test_configured_patterns_run_after_the_digit_rules() -> None:
    flow = flow_with(patterns=[{"pattern": r"[\w.+-]+@[\w-]+\.[\w.]+", "replace_with": "[email]"}])
    assert flow.redact("mail a.b@example.com or 4255550123", CALLER_ID) == f"mail [email] or {CALLER_NUMBER}"


@pytest.mark.parametrize("replace_with", ["C:\\path", "\\1", "\\g<0>", "a\\nb", "\\"])
def test_replace_with_is_literal_text(replace_with: str) -> None:
    """A backslash in replace_with loaded, then made every redaction raise re.error (and a
    group reference would have put the words back)."""
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["privacy"]["patterns"] = [{"pattern": r"secret (\w+)", "replace_with": replace_with}]
    flow = parse_callflow(yaml.safe_dump(data), "flow.yaml")
    assert flow.redact("my secret sauce, ok") == f"my {replace_with}, ok"
    turn = TurnRunner(flow).run(_new(), CallerInput("secret sauce"), now="t")
    assert turn.lines[0].text == replace_with


def test_everything_off() -> None:
    flow = flow_with(digit_runs=0, caller_number=False)
    assert flow.redact(SAID, CALLER_ID) == SAID


def test_the_default_flow_redacts() -> None:
    flow = load_callflow(SAMPLE_FLOW)
    assert flow.privacy.agent_transcript == "redacted"
    assert flow.redact(SAID, CALLER_ID) == REDACTED


@pytest.mark.parametrize(
    ("privacy", "where", "problem"),
    [
        (
            {"patterns": [{"pattern": "(unclosed"}]},
            "privacy.patterns.0.pattern",
            "not a valid regular expression",
        ),
        ({"patterns": [{"pattern": "x*"}]}, "privacy.patterns.0.pattern", "matches the empty string"),
        ({"digit_runs": 2}, "privacy.digit_runs", "would redact menu choices"),
        ({"keep_last_digits": 5}, "privacy.keep_last_digits", "less than or equal to 4"),
        ({"agent_transcript": "raw"}, "privacy.agent_transcript", "'redacted' or 'full'"),
        ({"redact": []}, "privacy.redact", "unknown field"),
    ],
)
def test_bad_privacy_settings_stop_start_up(privacy: dict[str, Any], where: str, problem: str) -> None:
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["privacy"] = privacy
    with pytest.raises(ConfigError) as e:
        parse_callflow(yaml.safe_dump(data), "flow.yaml")
    assert e.value.where == f"flow.yaml: {where}"
    assert problem in e.value.problem


# --- where caller words enter a call -------------------------------------------------


def test_a_turn_stores_and_echoes_only_redacted_words() -> None:
    runner = TurnRunner(load_callflow(SAMPLE_FLOW))
    turn = runner.run(
        runner.run(_new(), CallStarted(), now="t").call, CallerInput(SAID), now="t", caller=CALLER_ID
    )
    caller_line, bot_line = turn.lines
    assert caller_line.text == REDACTED and caller_line.full == ""  # nothing kept whole
    assert bot_line.text == f'What I heard was "{REDACTED}"'
    (say,) = turn.effects
    assert "4111" not in say.prompt.ssml and "4111" not in say.prompt.text  # type: ignore[union-attr]


def test_routes_match_the_words_as_said() -> None:
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["routes"].append({"phrases": ["12345678"], "to": "billing"})
    runner = TurnRunner(CallFlow.model_validate(data))
    turn = runner.run(_new(), CallerInput("12345678"), now="t", caller=CALLER_ID)
    assert turn.effects[0].prompt.name == "billing"  # type: ignore[union-attr]
    assert turn.lines[0].text == "****5678"


def test_full_agent_transcript_keeps_the_words_in_memory_only() -> None:
    runner = TurnRunner(flow_with(agent_transcript="full"))
    turn = runner.run(_new(), CallerInput(SAID), now="t", caller=CALLER_ID)
    line = turn.lines[0]
    assert (line.text, line.full) == (REDACTED, SAID)
    assert SAID not in repr(line)


def test_agent_side_status_messages_are_redacted() -> None:
    runner = TurnRunner(load_callflow(SAMPLE_FLOW))
    transferring = runner.run(_new(), CallerInput("agent"), now="t").call
    turn = runner.run(transferring, HandoffStatus("failed", "agent at 4255550199 busy"), now="t")
    assert turn.call.failure == "agent at ******0199 busy"
    assert turn.steps[0].reason == "agent at ******0199 busy"
    ignored = runner.run(turn.call, InvalidStatus("unknown state '4111111111111111'"), now="t")
    assert ignored.steps[0].reason == f"ignored: unknown state '{MASKED_CARD}'"


def test_agent_side_text_is_redacted_before_it_is_cut() -> None:
    """A card split by the cut keeps none of its first digits: the turn redacts, then cuts."""
    runner = TurnRunner(load_callflow(SAMPLE_FLOW))
    transferring = runner.run(_new(), CallerInput("agent"), now="t").call
    message = "x" * 492 + f" {CARD} declined"  # cut first at 500, "4111 11" was kept
    turn = runner.run(transferring, status_from_value({"state": "failed", "message": message}), now="t")
    assert turn.call.failure == ("x" * 492 + f" {MASKED_CARD}")[:500]
    assert turn.steps[0].reason == turn.call.failure and "4111" not in turn.call.failure
    state = "y" * 180 + f" {CARD}"  # an unknown state with a card across character 200
    ignored = runner.run(turn.call, status_from_value({"state": state}), now="t")
    assert ignored.steps[0].reason == "ignored: " + f"unknown state '{'y' * 180} {MASKED_CARD}'"[:200]


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ([4111, 1111, 1111, 1111], "unknown state of type list"),
        ({"number": 4111111111111111}, "unknown state of type dict"),
        (4111111111111111, "unknown state of type int"),
        (None, "unknown state None"),
        ("bogus", "unknown state 'bogus'"),
    ],
)
def test_an_unknown_state_that_is_no_string_is_named_by_its_type(state: Any, reason: str) -> None:
    assert status_from_value({"state": state}) == InvalidStatus(reason)


EMAIL = r"[\w.+-]+@[\w-]+\.[\w.]+"  # quadratic: docs/privacy.md recommended it once


def test_patterns_see_the_kept_words_and_a_margin_not_the_whole_message() -> None:
    runner = TurnRunner(flow_with(patterns=[{"pattern": EMAIL, "replace_with": "[email]"}]))
    # 256 KB of one word: the quadratic pattern scans only the first 1,256 characters (whole
    # it would take minutes), and the words kept, and echoed, are the first 1,000.
    turn = runner.run(_new(), CallerInput("a" * 256 * 1024), now="t", caller=CALLER_ID)
    assert turn.lines[0].text == "a" * LINE_MAX_CHARS
    # An address across the cut is found whole (cut after redaction), not left half-readable.
    said = "x" * 990 + " a.b@example.com " + "z" * 2000
    line = runner.run(_new(), CallerInput(said), now="t", caller=CALLER_ID).lines[0]
    assert line.text == ("x" * 990 + " [email] z")[:LINE_MAX_CHARS] and "a.b@" not in line.text
    # So is a card across the cut, and the caller's number.
    said = "x" * 990 + f" {CARD} or 425-555-0123 " + "z" * 2000
    assert "4111" not in runner.run(_new(), CallerInput(said), now="t", caller=CALLER_ID).lines[0].text


def test_the_recommended_email_pattern_is_linear_and_finds_addresses() -> None:
    """The pattern docs/privacy.md recommends: only where a run of address characters
    starts, so 100k of them are one scan (measured by hand: ~2 ms; the old one took minutes)."""
    docs = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
    (pattern,) = re.findall(r"- pattern: '([^']+)'", docs)
    flow = flow_with(patterns=[{"pattern": pattern, "replace_with": "[email]"}])
    for text in ("a" * 100_000, "a." * 50_000, "a@" + "b" * 100_000, "-@a" * 30_000):
        assert flow.redact(text) == text
    assert flow.redact("mail a.b@example.com, x+y@mail.co.uk. or me") == "mail [email], [email] or me"
    assert flow.redact("first.last@sub-domain.example.org") == "[email]"


def _new() -> Call:
    return Call(id="call-1")


# --- nothing raw reaches Redis -------------------------------------------------------


# Redis times in ms (record fields, scores, stream ids, the outbox's kept time): any
# 13-digit time may hold "4111" by chance, which is no card.
# Times in ms, or in seconds (with a fraction or not), since the epoch: 2020 to 2033.
_TIMES = re.compile(r"(?<!\d)1[6-9](?:\d{11}|\d{8}(?:\.\d+)?)(?!\d)")
# Hex that is no caller's (key hashes, commit tokens, object ids in conversation ids) may
# hold "4111" by chance too; a run with a letter in it is no card or phone number.
_HEX = re.compile(r"(?<![0-9a-f])(?=[0-9a-f]*[a-f])[0-9a-f]{12,}(?![0-9a-f])")


def blanked(text: str) -> str:
    """``text`` with its times and hex ids blanked out: a clock reading may hold any five
    digits in a row (1796439788912 holds 97889), and no caller gave those."""
    return _HEX.sub("<hex>", _TIMES.sub("<ms>", text))


async def stored_text(client: Redis | RedisCluster, prefix: str, *, reference: bool = False) -> str:
    """``everything_stored`` as one text, with its times and hex ids blanked out."""
    return blanked(json.dumps(await everything_stored(client, prefix, reference=reference)))


async def everything_stored(
    client: Redis | RedisCluster, prefix: str, *, reference: bool = False
) -> list[tuple[str, Any]]:
    """(key, contents) of every key under the prefix, of every type; a call's reference
    (which names the caller: its key, or the field of a record an earlier version wrote)
    left out unless ``reference``."""
    found: list[tuple[str, Any]] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        if not reference and key.endswith(":reference"):  # CallKeys.reference
            continue
        kind = await client.type(key)
        if kind == "hash":
            value: Any = await client.hgetall(key)
            if not reference:
                value.pop("reference", None)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = await client.get(key)
        found.append((key, value))
    return found


async def test_no_raw_caller_words_anywhere_in_redis(store: RedisCallStore, key_prefix: str) -> None:
    """Every turn renders its replies as the bot does, and none is acknowledged: the
    handoff.initiate and the prompts after it stay in the outbox when Redis is read."""
    engine = Engine(store, flow_with(agent_transcript="full"))
    caller = Caller("http://channel.invalid/", conversation_id="call-1", number=CALLER_ID)

    async def turn(activity: dict[str, Any], event: Any) -> None:
        incoming = activity_from_json(activity)
        context = TurnContext(TestAdapter(), incoming)
        await engine.handle(
            "call-1",
            event,
            activity_id=incoming.id,
            reference=conversation_reference(incoming),
            caller=caller_id(incoming),
            render=lambda turn: rendered(turn, context, Sealer.from_setting(None)),
        )

    await turn(caller.start(), CallStarted())
    await turn(caller.say(SAID), CallerInput(SAID))
    await turn(caller.say("agent"), CallerInput("agent"))
    await turn(caller.status({"state": "failed"}), HandoffStatus("failed", "4111 1111 1111 1111 declined"))
    await turn(caller.say(f"it is {CARD}"), CallerInput(f"it is {CARD}"))
    kept = await store.redis.hvals(store.keys.call("call-1").outbox)
    # Never acknowledged: the handoff, the retry prompt and the reply that resumed the bot.
    assert len(kept) == 3 and sum("handoff.initiate" in entry for entry in kept) == 1
    stored = await stored_text(store.redis, key_prefix)
    assert CALLER_NUMBER in stored and MASKED_CARD in stored
    for secret in (*SECRETS, *CALLER_FORMS):
        assert secret not in stored
    call = (await store.load("call-1")).call
    assert call is not None
    assert next(line.text for line in call.transcript if line.role == CALLER) == REDACTED


# --- the handoff transcript, over HTTP -------------------------------------------------


def flow_file(tmp_path: Path, agent_transcript: str) -> Path:
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["privacy"]["agent_transcript"] = agent_transcript
    path = tmp_path / "callflow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(params=["redacted", "full"])
def agent_transcript(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def bot(
    agent_transcript: str, bot_redis: dict[str, Any], tmp_path: Path, key_prefix: str
) -> AsyncIterator[TestClient[Any, Any]]:
    settings = load_settings(
        **bot_redis,
        REDIS_KEY_PREFIX=key_prefix,
        CALLFLOW_FILE=flow_file(tmp_path, agent_transcript),
        OUTBOX_GRACE_SECONDS=1,
        SCHEDULER_POLL_SECONDS=0.05,
        SCHEDULER_LEASE_SECONDS=1,  # a refused re-send is tried again a second later
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    async with asyncio.timeout(20):
        if bot_redis["REDIS_URL"]:
            await delete_prefix(client.app[STORE_KEY].redis, key_prefix)
        await client.close()


def transcript_texts(handoff: dict[str, Any]) -> list[str]:
    return [a["text"] for a in handoff["attachments"][0]["content"]["activities"]]


async def test_the_agent_gets_the_transcript_the_flow_says(
    bot: TestClient[Any, Any], channel: ChannelStandIn, agent_transcript: str
) -> None:
    full = agent_transcript == "full"
    caller = Caller(channel.url, number=CALLER_ID)
    cid = caller.conversation_id
    for activity in (caller.start(), caller.say(SAID), caller.say("agent")):
        assert (await bot.post("/api/messages", json=activity)).status == 201
    handoff = channel.for_conversation(cid)[-1]
    assert handoff["name"] == "handoff.initiate"
    texts = transcript_texts(handoff)
    assert texts[1] == (SAID if full else REDACTED)
    assert texts[2] == f'What I heard was "{REDACTED}"'  # what the caller actually heard
    assert texts[3] == "agent"


def accounts(handoff: dict[str, Any]) -> list[Any]:
    """Every account a handoff.initiate names: its own, its relatesTo's and its transcript's."""
    lines = handoff["attachments"][0]["content"]["activities"]
    return [
        handoff["from"],
        handoff["recipient"],
        handoff["relatesTo"]["user"],
        handoff["relatesTo"]["bot"],
        *(line[side] for line in lines for side in ("from", "recipient")),
    ]


async def handoff_of(channel: ChannelStandIn, cid: str) -> dict[str, Any]:
    """The first handoff.initiate that reached the call, waiting for it to arrive."""
    while not any(a["name"] == "handoff.initiate" for a in channel.for_conversation(cid) if "name" in a):
        await channel.wait_for(len(channel.for_conversation(cid)) + 1, cid)
    return next(a for a in channel.for_conversation(cid) if a.get("name") == "handoff.initiate")


async def test_a_kept_handoff_holds_no_caller_number_and_is_re_sent_whole(
    bot: TestClient[Any, Any], channel: ChannelStandIn, agent_transcript: str
) -> None:
    """The outbox is Redis: while a handoff waits there, it holds neither the caller's words
    nor their number (only the reference does); re-sent, it names the caller as a handoff sent
    at once does, and carries the redacted transcript (also for ``full``)."""
    store: RedisCallStore = bot.app[STORE_KEY]
    sent_at_once = Caller(channel.url, number=CALLER_ID)
    for activity in (sent_at_once.start(), sent_at_once.say(SAID), sent_at_once.say("agent")):
        assert (await bot.post("/api/messages", json=activity)).status == 201
    expected = await handoff_of(channel, sent_at_once.conversation_id)
    await delete_prefix(store.redis, store.keys.prefix)  # only the kept call's keys below

    caller = Caller(channel.url, number=CALLER_ID)
    cid = caller.conversation_id
    for activity in (caller.start(), caller.say(SAID)):
        assert (await bot.post("/api/messages", json=activity)).status == 201
    channel.refuse_next = 1_000_000  # every delivery fails, re-sends too: the handoff stays kept
    assert (await bot.post("/api/messages", json=caller.say("agent"))).status == 201
    assert await store.redis.hlen(store.keys.call(cid).outbox) == 1
    stored = await stored_text(store.redis, store.keys.prefix)
    assert "handoff.initiate" in stored and MASKED_CARD in stored  # the kept handoff is there
    for secret in (*SECRETS, *CALLER_FORMS):
        assert secret not in stored
    # The redactor finds the number in any other formatting: nothing it would mask is left.
    assert Redactor(digit_runs=0)(stored, CALLER_ID).count(CALLER_NUMBER) == stored.count(CALLER_NUMBER)
    assert CALLER_ID in (await store.record(cid))["reference"]  # the one place it is kept

    channel.refuse_next = 0
    resent = await handoff_of(channel, cid)
    assert resent["channelData"] == expected["channelData"]
    assert accounts(resent) == accounts(expected)
    assert resent["relatesTo"]["user"] == {"id": CALLER_ID, "role": "user"}
    assert resent["recipient"]["id"] == CALLER_ID
    texts = transcript_texts(resent)
    assert texts[1] == REDACTED  # the outbox never held the words as said
    assert texts == [*transcript_texts(expected)[:1], REDACTED, *transcript_texts(expected)[2:]]


# --- what operators see -------------------------------------------------------------------

OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
MEMBER = "my member number is 1234567"  # seven digits: the shortest run the redactor masks


@pytest.mark.parametrize("bot_redis", ["real", "cluster"], indirect=True)  # the CLI needs a server
async def test_a_seven_digit_run_is_masked_alike_in_storage_and_in_every_view(
    bot_redis: dict[str, Any], channel: ChannelStandIn, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator API (which the dashboard reads) and ``calls show`` show the transcript as
    it was stored: views apply the redactor's rule, not one of their own."""
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: no table cell wraps
    settings = load_settings(**bot_redis, REDIS_KEY_PREFIX=key_prefix, OPERATOR_TOKEN=OPERATOR_TOKEN)
    bot = TestClient(TestServer(create_app(settings)))
    await bot.start_server()
    try:
        caller = Caller(channel.url, number=CALLER_ID)
        cid = caller.conversation_id
        for activity in (caller.start(), caller.say(MEMBER)):
            assert (await bot.post("/api/messages", json=activity)).status == 201
        call = (await bot.app[STORE_KEY].load(cid)).call
        assert call is not None
        stored = [(line.role, line.text) for line in call.transcript]
        assert (CALLER, "my member number is ***4567") in stored

        response = await bot.get(f"/api/calls/{cid}", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert response.status == 200
        shown = await response.json()
        assert [(line["role"], line["text"]) for line in shown["transcript"]] == stored

        cluster = ["--cluster"] if bot_redis.get("REDIS_CLUSTER") else []
        show = ["--redis-url", bot_redis["REDIS_URL"], *cluster, "--prefix", key_prefix, "calls", "show", cid]
        as_json, for_people = [
            await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)
            for args in ([*show, "--json"], show)
        ]
        assert as_json.exit_code == 0 and for_people.exit_code == 0, as_json.output + for_people.output
        assert [(line["role"], line["text"]) for line in json.loads(as_json.output)["transcript"]] == stored
        assert "my member number is ***4567" in for_people.output and "1234567" not in for_people.output
    finally:
        await delete_prefix(bot.app[STORE_KEY].redis, key_prefix)
        await bot.close()
