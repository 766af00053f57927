"""The store contract, run against the embedded fake and a real Redis server alike."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest
from fakeredis.aioredis import FakeRedis
from redis.asyncio import Redis
from redis.crc import key_slot

from adapters.keys import RECORD_VALUE_MAX, CallField, Due, FeedField, HistoryField, Keyspace
from adapters.store import (
    COMMIT_KEYS,
    COMMIT_SCRIPT,
    CommitArgs,
    RedisCallStore,
    Retention,
    cut,
    decode_line,
    decode_step,
    encode_line,
)
from orchestrator.call import Call, Line, Step, timestamp
from orchestrator.engine import Commit
from orchestrator.errors import StoreUnavailable
from orchestrator.turn import Turn
from states import State

# A conversation reference as the bot stores it (adapters.bot.conversation_reference): ~240
# bytes of JSON, far over the 64 a value of a compact hash may have.
REFERENCE = json.dumps(
    {
        "bot": {"id": "bot-app-id", "name": "contact-center", "role": "bot"},
        "channelId": "telephony",
        "conversation": {"id": "c1", "isGroup": False},
        "locale": "en-US",
        "serviceUrl": "https://telephony.botframework.com/",
        "user": {"id": "+14255550123", "name": "+14255550123", "role": "user"},
    },
    separators=(",", ":"),
)


def turn_for(
    call: Call, *, state: str | None = None, lines: int = 1, steps: list[Step] | None = None
) -> Turn:
    loaded_state = call.state
    call = replace(call, transcript=list(call.transcript))
    new_lines = [Line("caller", f"line {call.version}.{i}", "2026-11-23T10:00:00.000Z") for i in range(lines)]
    call.transcript.extend(new_lines)
    if state:
        call.state = state
    return Turn(call=call, loaded_state=loaded_state, lines=new_lines, steps=steps or [])


async def test_an_unknown_call_loads_as_none(store: RedisCallStore) -> None:
    loaded = await store.load("nobody", "a1")
    assert loaded.call is None and not loaded.duplicate


async def test_commit_then_load_round_trips_the_call(store: RedisCallStore) -> None:
    turn = turn_for(Call(id="c1"), lines=2, steps=[Step("request_agent", "bot", "transferring", "asked")])
    turn.call.state, turn.call.attempts, turn.call.target = State.TRANSFERRING, 1, "+14251231234"
    turn.call.reference, turn.reference_changed = '{"conversation":{"id":"c1"}}', True
    receipt = await store.commit(turn, "a1")
    assert receipt.outcome is Commit.APPLIED and receipt.version == 1
    assert turn.call.version == 0  # the store hands back a receipt; it changes nothing it is given
    loaded = (await store.load("c1", "a2")).call
    assert loaded is not None
    assert (loaded.state, loaded.version, loaded.attempts, loaded.target) == (
        "transferring",
        1,
        1,
        "+14251231234",
    )
    assert loaded.reference == '{"conversation":{"id":"c1"}}'
    assert [line.text for line in loaded.transcript] == ["line 0.0", "line 0.1"]
    history = await store.history("c1")
    assert [step for _, step in history] == [
        Step("request_agent", "bot", "transferring", "asked", "+14251231234")
    ]


async def test_a_stale_version_is_a_conflict_and_writes_nothing(store: RedisCallStore) -> None:
    first = turn_for(Call(id="c1"))
    assert (await store.commit(first, "a1")).outcome is Commit.APPLIED
    stale = turn_for(Call(id="c1"), state=State.ENDED, steps=[Step("hang_up", "bot", "ended")])
    assert (await store.commit(stale, "a2")).outcome is Commit.CONFLICT
    loaded = (await store.load("c1")).call
    assert loaded is not None and loaded.state == State.BOT and loaded.version == 1
    assert len(loaded.transcript) == 1 and await store.history("c1") == []
    assert not (await store.load("c1", "a2")).duplicate


async def test_an_activity_is_applied_once(store: RedisCallStore) -> None:
    call = Call(id="c1")
    assert (await store.commit(turn_for(call), "a1")).outcome is Commit.APPLIED
    assert (await store.load("c1", "a1")).duplicate
    loaded = (await store.load("c1")).call
    assert loaded is not None
    # A second delivery that raced past the load is stopped by the commit itself.
    assert (await store.commit(turn_for(loaded), "a1")).outcome is Commit.DUPLICATE
    after = (await store.load("c1")).call
    assert after is not None and after.version == 1 and len(after.transcript) == 1


async def test_a_retried_commit_with_the_same_token_is_not_applied_twice(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """redis-py retries a command whose reply was lost; the script must recognise its own commit."""
    turn = turn_for(Call(id="c1"), steps=[Step("request_agent", "bot", "transferring")])
    keys = store._commit_keys(turn, int(time.time()))
    args = store._commit_args(turn, "a1", "token-1", int(time.time()))
    script = redis_client.register_script(COMMIT_SCRIPT)
    assert (await script(keys=keys, args=args))[0] == 1
    assert (await script(keys=keys, args=args))[0:2] == [2, 1]  # same token: "already yours"
    loaded = (await store.load("c1")).call
    assert loaded is not None and loaded.version == 1 and len(loaded.transcript) == 1
    assert len(await store.history("c1")) == 1


async def test_the_transcript_is_capped_in_redis(redis_client: Redis, key_prefix: str) -> None:
    store = RedisCallStore(redis_client, Keyspace(key_prefix), Retention(transcript_max=3))
    call = Call(id="c1")
    for i in range(5):
        turn = turn_for(call)
        receipt = await store.commit(turn, f"a{i}")
        assert receipt.outcome is Commit.APPLIED
        call = replace(turn.call, version=receipt.version)
    loaded = (await store.load("c1")).call
    assert loaded is not None and [line.text for line in loaded.transcript] == [
        "line 2.0",
        "line 3.0",
        "line 4.0",
    ]


async def test_the_watchdog_deadline_comes_from_redis_time(
    store: RedisCallStore, redis_client: Redis
) -> None:
    turn = turn_for(Call(id="c1"), state=State.TRANSFERRING)
    turn.timer_seconds = 30
    receipt = await store.commit(turn, "a1")
    seconds, micros = await redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    assert 25_000 < receipt.deadline_ms - now_ms <= 30_000
    record = await redis_client.hgetall(store.keys.call("c1").call)
    assert int(record[CallField.DEADLINE]) == receipt.deadline_ms
    # Leaving ``transferring`` disarms it.
    loaded = (await store.load("c1")).call
    assert loaded is not None
    disarm = turn_for(loaded, state=State.FAILED)
    disarm.call.deadline_ms = 0
    await store.commit(disarm, "a2")
    assert await redis_client.hget(store.keys.call("c1").call, CallField.DEADLINE) is None  # 0: not stored


async def test_a_timer_a_claim_did_not_fire_goes_back_to_its_deadline_in_any_live_state(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """A claim pushes the timer's score to the end of its lease; when the timer finds nothing
    to do (the caller spoke meanwhile and re-armed it), it goes back in step with the call:
    a no-input, inter-digit or hang-up timer of a call with the bot as much as a watchdog."""
    due, member = store.keys.due_for("c1"), Due.timer("c1")
    turn = turn_for(Call(id="c1"))  # with the bot, waiting for input
    turn.timer_seconds = 30
    receipt = await store.commit(turn, "a1")
    await redis_client.zadd(due, {member: 1})  # as a claim leaves it
    await store.reschedule_timer("c1")
    assert await redis_client.zscore(due, member) == receipt.deadline_ms
    loaded = (await store.load("c1")).call
    assert loaded is not None
    await store.commit(turn_for(loaded, state=State.ENDED), "a2")
    await redis_client.zadd(due, {member: 1})
    await store.reschedule_timer("c1")  # an ended call has no timer
    assert await redis_client.zscore(due, member) is None


async def test_live_calls_expire_when_idle_and_ended_calls_after_retention(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """Every key of the call, the reference and the variables in theirs too, whether
    written by this turn or an earlier one."""
    turn = turn_for(Call(id="c1", variables={"account": "123"}), steps=[Step("x", "bot", "bot")])
    turn.call.reference, turn.reference_changed = REFERENCE, True
    receipt = await store.commit(turn, "a1", outbox="kept")
    keys = store.keys.call("c1")
    for key in keys:
        assert 3590 < await redis_client.ttl(key) <= 3600, key
    ended = turn_for(
        replace(turn.call, version=receipt.version),
        state=State.ENDED,
        steps=[Step("hang_up", "bot", "ended")],
    )
    await store.commit(ended, "a2")  # the reference unchanged: not written, its TTL is
    for key in keys:
        assert 590 < await redis_client.ttl(key) <= 600, key
    await store.acknowledge("c1", receipt.outbox_key)
    assert not await redis_client.exists(keys.outbox)  # nothing in the outbox: no key to expire


async def test_timestamps_are_stamped_by_redis(store: RedisCallStore, redis_client: Redis) -> None:
    turn = turn_for(Call(id="c1"))
    receipt = await store.commit(turn, "a1")
    record = await redis_client.hgetall(store.keys.call("c1").call)
    assert record[CallField.CREATED] == record[CallField.UPDATED] == record[CallField.SINCE]
    assert record[CallField.ID] == "c1" and record[CallField.STATE] == "bot"
    later = turn_for(replace(turn.call, version=receipt.version), state=State.TRANSFERRING)
    await store.commit(later, "a2")
    after = await redis_client.hgetall(store.keys.call("c1").call)
    assert int(after[CallField.SINCE]) >= int(record[CallField.SINCE])
    assert after[CallField.CREATED] == record[CallField.CREATED]


async def test_transcript_lines_are_compact_json(store: RedisCallStore, redis_client: Redis) -> None:
    turn = turn_for(Call(id="c1"))
    await store.commit(turn, "a1")
    raw = await redis_client.lrange(store.keys.call("c1").transcript, 0, -1)
    assert raw == ['["c",1795428000000,"line 0.0"]']  # 2026-11-23T10:00:00.000Z in epoch ms


@pytest.mark.parametrize(
    "line",
    [
        Line("caller", "my card is 4111 1111 1111 1111", "2026-11-23T10:00:00.007Z"),
        Line("bot", 'He said "ça va" \u2713 ✓', timestamp()),
        Line("bot", "", "1970-01-01T00:00:00.000Z"),
        Line("agent", "a role of its own", "2026-11-23T10:00:00.999Z"),
        Line("caller", "a time epoch ms would not give back", "2026-11-23T10:00:00Z"),
        Line("caller", "no zone", "2026-11-23T10:00:00.000"),
        Line("caller", "not a time", "yesterday"),
    ],
)
def test_a_line_reads_back_as_written(line: Line) -> None:
    assert decode_line(encode_line(line)) == line


@pytest.mark.parametrize("ms", [0, 999, 1_795_428_000_007, 1_795_428_059_999, 4_102_444_800_123, -1])
def test_line_times_read_back_as_timestamp_formats_them(ms: int) -> None:
    at = timestamp(ms)
    assert decode_line(encode_line(Line("bot", "hi", at))).at == at
    assert json.loads(encode_line(Line("bot", "hi", at)))[1] == ms


async def test_history_entries_are_compact_json_arrays(store: RedisCallStore, redis_client: Redis) -> None:
    turn = turn_for(
        Call(id="c1"),
        state=State.TRANSFERRING,
        steps=[
            Step("noop", "bot", "bot", "ignored: x"),
            Step("request_agent", "bot", "transferring", "asked"),
        ],
    )
    turn.call.target = "+14251231234"
    await store.commit(turn, "a1")
    key = store.keys.call("c1").history
    assert key.endswith(":history") and await redis_client.type(key) == "list"
    raw = [str(entry) for entry in await redis_client.lrange(key, 0, -1)]
    first, second = raw
    at = json.loads(first)[0]
    assert first == f'[{at},"noop","bot","bot","ignored: x","a1",1]'
    assert second == f'[{at},"request_agent","bot","transferring","asked","a1",1,"+14251231234"]'
    assert [decode_step(entry) for entry in raw][1] == {
        "at": at,
        "trigger": "request_agent",
        "from": "bot",
        "to": "transferring",
        "reason": "asked",
        "activity": "a1",
        "version": 1,
        "target": "+14251231234",
        "node": "",
    }
    seconds, micros = await redis_client.time()
    assert 0 <= seconds * 1000 + micros // 1000 - at < 5000  # Redis time, in ms
    assert [at_ms for at_ms, _ in await store.history("c1")] == [at, at]


async def test_the_history_is_capped_in_redis(redis_client: Redis, key_prefix: str) -> None:
    store = RedisCallStore(redis_client, Keyspace(key_prefix), Retention(history_max=3))
    call = Call(id="c1")
    for i in range(5):
        turn = turn_for(call, steps=[Step(f"t{i}", "bot", "bot")])
        receipt = await store.commit(turn, f"a{i}")
        assert receipt.outcome is Commit.APPLIED
        call = replace(turn.call, version=receipt.version)
    assert [step.trigger for _, step in await store.history("c1")] == ["t2", "t3", "t4"]


async def test_seen_remembers_at_least_the_last_seen_max_activities(
    redis_client: Redis, key_prefix: str
) -> None:
    """Bounded by count: past seen_max + a quarter, entries older than the last seen_max
    versions go; a redelivery of any of the last seen_max activities is still a duplicate."""
    store = RedisCallStore(redis_client, Keyspace(key_prefix), Retention(seen_max=8))
    seen = store.keys.call("c1").seen
    call = Call(id="c1")
    sizes = []
    for i in range(30):
        turn = turn_for(call)
        receipt = await store.commit(turn, f"a{i}")
        assert receipt.outcome is Commit.APPLIED
        call = replace(turn.call, version=receipt.version)
        sizes.append(await redis_client.hlen(seen))
        for recent in range(max(0, i - 7), i + 1):
            assert (await store.load("c1", f"a{recent}")).duplicate, (i, recent)
    assert max(sizes) == 8 + 2 and min(sizes[10:]) == 8  # never more than seen_max + a quarter
    mark = str(await redis_client.hget(seen, "a29"))
    assert re.fullmatch(r"30:[\w-]{8}", mark), mark  # the version, then an 8-character token
    stale = turn_for(call)
    assert (await store.commit(stale, "a25")).outcome is Commit.DUPLICATE


def test_all_keys_of_a_call_share_one_cluster_slot() -> None:
    keys = Keyspace("cc")
    for conversation_id in ["plain", "with{brace}", "}{", "a" * 500, "çà/ü:✓"]:
        call_keys = keys.call(conversation_id)
        assert len({key_slot(k.encode()) for k in call_keys}) == 1
        assert call_keys.call.count("{") == call_keys.call.count("}") == 1
    assert keys.call("a").call != keys.call("b").call


async def test_ping(store: RedisCallStore) -> None:
    assert await store.ping()


async def test_an_unreachable_redis_is_reported_as_unavailable() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1", decode_responses=True, socket_connect_timeout=1)
    store = RedisCallStore(dead, Keyspace("x"))
    assert not await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.load("c1")
    with pytest.raises(StoreUnavailable):
        await store.commit(turn_for(Call(id="c1")), "a1")
    await dead.aclose()


async def test_a_seen_entry_without_a_version_goes_with_the_sweep_and_stops_no_commit(
    redis_client: Redis, key_prefix: str
) -> None:
    """Written by hand: the sweep once compared nothing with a number and failed the commit
    after its writes (the channel got 503, its retry a duplicate)."""
    store = RedisCallStore(redis_client, Keyspace(key_prefix), Retention(seen_max=8))
    seen = store.keys.call("c1").seen
    await redis_client.hset(seen, "by-hand", "no version here")
    call = Call(id="c1")
    for i in range(12):
        turn = turn_for(call)
        receipt = await store.commit(turn, f"a{i}")
        assert receipt.outcome is Commit.APPLIED, i
        call = replace(turn.call, version=receipt.version)
    assert not await redis_client.hexists(seen, "by-hand")


def test_the_commit_script_reads_exactly_the_arguments_the_store_builds(store: RedisCallStore) -> None:
    """commit.lua takes one JSON object: every name it reads is built, and nothing else;
    its KEYS line names them in the order the store passes them."""
    turn = turn_for(Call(id="c1"), steps=[Step("request_agent", "bot", "transferring")])
    (encoded,) = store._commit_args(turn, "a1", "token-1", int(time.time()))
    read = set(re.findall(r"\bargs\.([a-z_]+)", COMMIT_SCRIPT))
    assert read == set(json.loads(encoded)) == set(CommitArgs.__annotations__)
    names = re.search(r"^local (.+) = unpack\(KEYS\)$", COMMIT_SCRIPT, re.M)
    assert names is not None and tuple(names[1].split(", ")) == COMMIT_KEYS
    assert len(store._commit_keys(turn, int(time.time()))) == len(COMMIT_KEYS)


def test_the_commit_script_uses_only_the_field_names_defined_in_keys() -> None:
    names = set(re.findall(r"'([a-z_]+)'", COMMIT_SCRIPT))
    defined = {v for k, v in vars(CallField).items() if k.isupper()}
    defined |= {v for k, v in vars(HistoryField).items() if k.isupper()}
    defined |= {v for k, v in vars(FeedField).items() if k.isupper()}
    defined |= {s.value for s in State}
    assert names and names <= defined, names - defined


async def test_a_retried_commit_without_an_activity_id_is_not_applied_twice(
    store: RedisCallStore, redis_client: Redis
) -> None:
    turn = turn_for(Call(id="c1"))
    keys = store._commit_keys(turn, int(time.time()))
    args = store._commit_args(turn, "~token-1", "token-1", int(time.time()))
    script = redis_client.register_script(COMMIT_SCRIPT)
    assert (await script(keys=keys, args=args))[0] == 1
    assert (await script(keys=keys, args=args))[0:2] == [2, 1]
    loaded = (await store.load("c1")).call
    assert loaded is not None and loaded.version == 1 and len(loaded.transcript) == 1


async def test_every_redis_failure_is_reported_as_unavailable(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ReadOnlyError, ResponseError

    for error in [ReadOnlyError("You can't write against a read only replica."), ResponseError("OOM")]:

        async def failing(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(store, "_commit", failing)
        with pytest.raises(StoreUnavailable):
            await store.commit(turn_for(Call(id="c1")), "a1")


# --- the record stays small: long values in keys of their own, nothing empty stored -------


async def test_empty_fields_are_not_stored_and_a_field_that_empties_goes(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """Empty values and a count or time of 0 are left out (readers default them); a field that becomes
    empty is deleted, not left with its old value."""
    keys = store.keys.call("c1")
    turn = turn_for(Call(id="c1"))
    receipt = await store.commit(turn, "a1")
    stamped = {"id", "state", "version", "created", "updated", "since"}
    assert set(await redis_client.hkeys(keys.call)) == stamped  # nothing else to store
    call = replace(turn.call, version=receipt.version)
    call.attempts, call.target, call.failure, call.tries, call.queue = 2, "+14251231234", "busy", 1, "agents"
    turn = turn_for(call, state=State.FAILED)
    turn.timer_seconds = 30
    receipt = await store.commit(turn, "a2")
    record = await redis_client.hgetall(keys.call)
    assert {k: record[k] for k in ("attempts", "target", "failure", "tries", "queue")} == {
        "attempts": "2",
        "target": "+14251231234",
        "failure": "busy",
        "tries": "1",
        "queue": "agents",
    }
    assert int(record["deadline"]) == receipt.deadline_ms
    call = replace(turn.call, version=receipt.version, deadline_ms=0, failure="", tries=0)
    await store.commit(turn_for(call), "a3")
    record = await redis_client.hgetall(keys.call)
    assert not {"deadline", "failure", "tries"} & set(record)
    assert (record["attempts"], record["target"]) == ("2", "+14251231234")
    loaded = (await store.load("c1")).call
    assert loaded is not None
    assert (loaded.deadline_ms, loaded.failure, loaded.tries, loaded.attempts) == (0, "", 0, 2)


async def test_the_reference_and_variables_live_in_keys_of_their_own(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """The reference is written when it changes, the sealed variables with every commit
    (deleted when there are none); neither goes into the record, and both load with it."""
    keys = store.keys.call("c1")
    turn = turn_for(Call(id="c1", variables={"account": "98779862"}, entry="12"))
    turn.call.reference, turn.reference_changed = REFERENCE, True
    receipt = await store.commit(turn, "a1")
    record = await redis_client.hgetall(keys.call)
    assert "reference" not in record and "variables" not in record
    assert await redis_client.get(keys.reference) == REFERENCE
    sealed = str(await redis_client.get(keys.variables))
    assert "98779862" not in sealed and store.sealer.open(sealed) is not None
    loaded = (await store.load("c1")).call
    assert loaded is not None
    assert (loaded.reference, loaded.variables, loaded.entry) == (REFERENCE, {"account": "98779862"}, "12")
    # The reference unchanged is not written again; variables gone, their key goes.
    await redis_client.set(keys.reference, "as it was")
    call = replace(turn.call, version=receipt.version, variables={}, entry="")
    await store.commit(turn_for(call), "a2")
    assert await redis_client.get(keys.reference) == "as it was"
    assert not await redis_client.exists(keys.variables)
    assert (await store.record("c1"))["reference"] == "as it was"


async def test_a_conflict_hands_back_the_reference_and_variables(store: RedisCallStore) -> None:
    turn = turn_for(Call(id="c1", variables={"account": "42"}))
    turn.call.reference, turn.reference_changed = REFERENCE, True
    assert (await store.commit(turn, "a1")).outcome is Commit.APPLIED
    receipt = await store.commit(turn_for(Call(id="c1")), "a2")  # computed from version 0
    assert receipt.outcome is Commit.CONFLICT and receipt.current is not None
    assert (receipt.current.reference, receipt.current.variables) == (REFERENCE, {"account": "42"})
    rerun = await store.commit(turn_for(receipt.current), "a2", outbox="replies")
    assert rerun.outcome is Commit.APPLIED
    entry = await store.outbox_entry("c1", rerun.outbox_key)
    assert entry is not None and entry.reference == REFERENCE


async def test_record_shows_every_field_the_record_leaves_out_at_its_default(store: RedisCallStore) -> None:
    turn = turn_for(Call(id="c1"))
    turn.call.reference, turn.reference_changed = REFERENCE, True
    await store.commit(turn, "a1")
    record = await store.record("c1")
    assert {k: v for k, v in record.items() if k not in ("created", "updated", "since")} == {
        "id": "c1",
        "state": "bot",
        "version": "1",
        "attempts": "0",
        "target": "",
        "deadline": "0",
        "failure": "",
        "reference": REFERENCE,
        "node": "",
        "queue": "",
        "tries": "0",
        "silences": "0",
        "variables": "",
        "shown": "",
        "holding": "",
        "transfers": "0",
    }
    assert await store.record("nobody") == {}


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("busy", "busy"),
        ("x" * 64, "x" * 64),
        ("x" * 65, "x" * 61 + "\u2026"),
        ("é" * 40, "é" * 30 + "\u2026"),  # 80 bytes: cut at a character, never inside one
        ("x" + "é" * 40, "x" + "é" * 30 + "\u2026"),
    ],
)
def test_a_failure_reason_is_cut_to_what_a_compact_record_holds(text: str, stored: str) -> None:
    assert cut(text) == stored and len(cut(text).encode("utf-8")) <= RECORD_VALUE_MAX


async def test_a_long_failure_reason_is_stored_cut_and_kept_whole_in_the_history(
    store: RedisCallStore, redis_client: Redis
) -> None:
    reason = "The agent queue rejected the transfer: no agent was available within 30 seconds"
    turn = turn_for(Call(id="c1"), state=State.FAILED, steps=[Step("fail", "transferring", "failed", reason)])
    turn.call.failure = reason
    await store.commit(turn, "a1")
    stored = str(await redis_client.hget(store.keys.call("c1").call, CallField.FAILURE))
    assert stored == cut(reason) and stored.endswith("\u2026") and reason.startswith(stored[:-1])
    assert [step.reason for _, step in await store.history("c1")] == [reason]


async def test_the_record_stays_a_listpack_on_a_real_redis(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """What the layout is for: an ordinary call's record, a gathering call's, and one whose
    transfer failed with a long reason are compact listpacks (a hashtable is ~1 KB more)."""
    if isinstance(redis_client, FakeRedis):
        pytest.skip("the embedded fake does not encode hashes as Redis does")
    keys = store.keys.call("c1")
    call = Call(id="c1", node="account", variables={"account": "98779862"}, entry="1234")
    call.shown = {"account": "*****862"}
    turn = turn_for(call, state=State.FAILED)
    turn.call.reference, turn.reference_changed = REFERENCE, True
    turn.call.failure, turn.call.attempts, turn.call.target = "x" * 200, 1, "+14251231234"
    turn.timer_seconds = 30
    await store.commit(turn, "a1")
    assert await redis_client.object("ENCODING", keys.call) == "listpack"
    assert await redis_client.type(keys.reference) == await redis_client.type(keys.variables) == "string"


# --- a rolling upgrade: records an earlier version wrote --------------------------------


async def legacy_call(store: RedisCallStore, redis_client: Redis, **fields: str) -> None:
    """A call as the version before wrote it: every field, "" and "0" included, the
    reference and sealed variables in the record."""
    record = {
        "id": "c1",
        "state": "bot",
        "version": "3",
        "attempts": "0",
        "target": "",
        "deadline": "0",
        "failure": "",
        "reference": REFERENCE,
        "created": "1795428000000",
        "updated": "1795428000000",
        "since": "1795428000000",
        "node": "account",
        "queue": "",
        "tries": "0",
        "silences": "0",
        "variables": store.sealer.seal('{"variables":{"account":"42"},"entry":"7","confirming":false}'),
        "shown": '{"account":"**"}',
        "holding": "",
        **fields,
    }
    await redis_client.hset(store.keys.call("c1").call, items=[v for field in record.items() for v in field])
    await redis_client.rpush(store.keys.call("c1").transcript, encode_line(Line("caller", "hi", timestamp())))


async def test_a_call_an_earlier_version_wrote_loads_and_its_next_commit_moves_its_fields(
    store: RedisCallStore, redis_client: Redis
) -> None:
    keys = store.keys.call("c1")
    await legacy_call(store, redis_client)
    loaded = (await store.load("c1")).call
    assert loaded is not None and loaded.version == 3
    assert (loaded.reference, loaded.variables, loaded.entry) == (REFERENCE, {"account": "42"}, "7")
    assert (await store.record("c1"))["reference"] == REFERENCE
    turn = turn_for(loaded)  # the reference unchanged: the store does not send it
    receipt = await store.commit(turn, "a1", outbox="replies")
    assert receipt.outcome is Commit.APPLIED
    record = await redis_client.hgetall(keys.call)
    assert not {"reference", "variables", "attempts", "deadline", "target", "failure"} & set(record)
    assert await redis_client.get(keys.reference) == REFERENCE
    assert 0 < await redis_client.ttl(keys.reference) <= 3600
    assert await redis_client.exists(keys.variables)
    moved = (await store.load("c1")).call
    assert moved is not None and moved.version == 4
    assert (moved.reference, moved.variables, moved.entry) == (REFERENCE, {"account": "42"}, "7")
    entry = await store.outbox_entry("c1", receipt.outbox_key)
    assert entry is not None and entry.reference == REFERENCE


async def test_an_earlier_versions_reference_written_after_the_key_wins(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """Mid-upgrade, an instance of the earlier version may write a new reference into the
    record after this version wrote the key: every commit of this version deletes the field,
    so a field there is the newer, and the next commit moves it over the key."""
    keys = store.keys.call("c1")
    await redis_client.set(keys.reference, "older")
    await legacy_call(store, redis_client, reference=REFERENCE)
    loaded = (await store.load("c1")).call
    assert loaded is not None and loaded.reference == REFERENCE
    await store.commit(turn_for(loaded), "a1")
    assert await redis_client.get(keys.reference) == REFERENCE
    assert not await redis_client.hexists(keys.call, "reference")


async def test_a_conflict_on_a_call_an_earlier_version_wrote_hands_back_its_reference(
    store: RedisCallStore, redis_client: Redis
) -> None:
    await legacy_call(store, redis_client)
    receipt = await store.commit(turn_for(Call(id="c1")), "a1")  # computed from version 0
    assert receipt.outcome is Commit.CONFLICT and receipt.current is not None
    assert (receipt.current.reference, receipt.current.variables) == (REFERENCE, {"account": "42"})


async def test_an_earlier_versions_empty_variables_hide_nothing_the_key_holds(
    store: RedisCallStore, redis_client: Redis
) -> None:
    """An instance of the earlier version never reads the variables key and writes the
    field as "" on its commit: the values in the key are still the call's, and the next
    commit keeps them."""
    keys = store.keys.call("c1")
    await legacy_call(store, redis_client, variables="", reference="")
    sealed = store.sealer.seal('{"variables":{"account":"42"},"entry":"","confirming":false}')
    await redis_client.set(keys.variables, sealed)
    await redis_client.set(keys.reference, REFERENCE)
    loaded = (await store.load("c1")).call
    assert loaded is not None and (loaded.variables, loaded.reference) == ({"account": "42"}, REFERENCE)
    await store.commit(turn_for(loaded), "a1")
    moved = (await store.load("c1")).call
    assert moved is not None and (moved.variables, moved.reference) == ({"account": "42"}, REFERENCE)
