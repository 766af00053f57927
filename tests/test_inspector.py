"""Operator reads (indexes, counts, transfer counters, the feed) and index pruning, on
the embedded fake, a real Redis and a Redis Cluster."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
import yaml

from adapters import inspection
from adapters.inspector import CallInspector
from adapters.keys import HOUR, MINUTE, SHARDS
from adapters.store import RedisCallStore, Retention
from orchestrator.callflow import CallFlow, load_callflow, parse_callflow
from orchestrator.engine import Engine
from orchestrator.events import CallEnded, CallerInput, HandoffStatus, TimerExpired
from tests.conftest import SAMPLE_FLOW, with_agents

TARGETS = ("+14251231234", "+14255550100")
OVERFLOW = "+14255550199"


def two_target_flow() -> CallFlow:
    flow = load_callflow(SAMPLE_FLOW)
    return with_agents(flow, targets=list(TARGETS))


async def populate(store: RedisCallStore) -> Engine:
    """c0 ended, c1 failed (busy), c2/c4 bot, c3 transferring, c5 timed out then accepted on retry."""
    engine = Engine(store, two_target_flow())
    for i in range(6):
        await engine.handle(f"c{i}", CallerInput("agent" if i % 2 else "hello"), activity_id="a")
    await engine.handle("c1", HandoffStatus("failed", "busy"), activity_id="b")
    await engine.handle("c0", CallEnded(), activity_id="c")
    await engine.handle("c5", TimerExpired(now_ms=2**62))
    await engine.handle("c5", CallerInput("agent"), activity_id="d")
    await engine.handle("c5", HandoffStatus("accepted"), activity_id="e")
    return engine


async def test_calls_are_listed_by_state_from_the_indexes(store: RedisCallStore) -> None:
    await populate(store)
    inspector = CallInspector(store)

    def ids(records: list[dict[str, str]]) -> list[str]:
        return [r["id"] for r in records]

    assert ids(await inspector.list_calls(["transferring"], 10)) == ["c3"]
    assert ids(await inspector.list_calls(["failed"], 10)) == ["c1"]
    assert ids(await inspector.list_calls(["ended"], 10)) == ["c0"]
    assert ids(await inspector.list_calls(["accepted"], 10)) == ["c5"]
    assert sorted(ids(await inspector.list_calls(["bot"], 10))) == ["c2", "c4"]
    assert len(await inspector.list_calls(["bot", "transferring", "failed"], 3)) == 3
    failed = (await inspector.list_calls(["failed"], 1))[0]
    assert failed["last_transition"] == "fail transferring -> failed" and failed["attempts"] == "1"


async def test_state_counts_match_the_calls(store: RedisCallStore) -> None:
    await populate(store)
    counts = await CallInspector(store).state_counts()
    assert counts == {"bot": 2, "transferring": 1, "accepted": 1, "failed": 1, "ended": 1}


async def test_calls_in_bot_are_counted_at_their_node_as_they_move(store: RedisCallStore) -> None:
    engine = await populate(store)
    inspector = CallInspector(store)
    # c2 and c4 talk with the bot at the first menu; the other calls are in other states.
    assert await inspector.node_counts() == {"main": 2}
    await engine.handle("c2", CallerInput("1"), activity_id="x")  # on to the billing menu
    assert await inspector.node_counts() == {"billing": 1, "main": 1}
    await engine.handle("c4", CallerInput("agent"), activity_id="x")  # transferring: at no node
    assert await inspector.node_counts() == {"billing": 1}
    await engine.handle("c4", HandoffStatus("failed", "busy"), activity_id="y")
    assert await inspector.node_counts() == {"billing": 1}
    await engine.handle("c4", CallerInput("hello"), activity_id="z")  # back with the bot, at main
    await engine.handle("c5", HandoffStatus("completed"), activity_id="x")  # handed back, at main
    assert await inspector.node_counts() == {"billing": 1, "main": 2}
    await engine.handle("c2", CallEnded(), activity_id="y")
    assert await inspector.node_counts() == {"main": 2}
    # A node's index and its name in the shard's set of nodes go with its last call.
    assert {node for _, node in await store.listed_nodes()} == {"main"}
    assert await store.redis.exists(store.keys.node_index(store.keys.locate("c2")[0], "billing")) == 0


async def test_transfer_counters_per_target(store: RedisCallStore) -> None:
    await populate(store)
    inspector = CallInspector(store)
    counts = await inspector.transfer_counts(3600)
    first, second = TARGETS
    # Attempt 1 of c1, c3, c5 dialled the first target; c5's retry the second.
    assert counts.by_target[first] == {"started": 3, "failed": 1, "timeout": 1}
    assert counts.by_target[second] == {"started": 1, "accepted": 1}
    assert counts.from_ms <= time.time() * 1000 - 3540_000 and counts.to_ms >= counts.from_ms
    # Longer windows are summed from hour buckets, with the same totals.
    assert (await inspector.transfer_counts(86_400)).by_target == counts.by_target
    # A window that ended before any of it: nothing (the buckets of an hour from now).
    later = await inspector.transfer_counts(60, now_s=time.time() + 7200)
    assert later.by_target == {}
    # The sample flow's one queue took every transfer.
    assert counts.by_queue == {"agents": {"started": 4, "failed": 1, "timeout": 1, "accepted": 1}}


def overflow_flow() -> CallFlow:
    """The sample flow, whose queue ``agents`` sends a failed transfer on to queue ``overflow``."""
    doc = yaml.safe_load(SAMPLE_FLOW.read_text(encoding="utf-8"))
    doc["nodes"]["overflow"] = {"type": "transfer", "queue": "overflow"}
    doc["queues"]["agents"]["on_failure"] = "overflow"
    doc["queues"]["overflow"] = {**doc["queues"]["agents"], "targets": [OVERFLOW]}
    return parse_callflow(yaml.safe_dump(doc))


async def test_transfer_counters_per_queue_count_each_outcome_where_it_happened(
    store: RedisCallStore,
) -> None:
    """A failure and the overflow transfer it starts are one turn: the failure counts for
    the queue and target that failed, the start for the next."""
    engine = Engine(store, overflow_flow())
    await engine.handle("o1", CallerInput("agent"), activity_id="a")
    await engine.handle("o1", HandoffStatus("failed", "busy"), activity_id="b")
    await engine.handle("o1", HandoffStatus("accepted"), activity_id="c")
    counts = await CallInspector(store).transfer_counts(3600)
    assert counts.by_queue_target == {
        ("agents", TARGETS[0]): {"started": 1, "failed": 1},
        ("overflow", OVERFLOW): {"started": 1, "accepted": 1},
    }
    figures = await inspection.stats(CallInspector(store), "1h")
    assert [
        (q["queue"], q["started"], q["failed"], q["accepted"], q["success_rate"]) for q in figures["queues"]
    ] == [
        ("agents", 1, 1, 0, 0.0),
        ("overflow", 1, 0, 1, 1.0),
    ]
    assert [t["target"] for t in figures["targets"]] == [TARGETS[0], OVERFLOW]
    assert (figures["transfers"]["started"], figures["transfers"]["success_rate"]) == (2, 0.5)


async def test_counters_are_kept_for_their_bucket_only(store: RedisCallStore) -> None:
    before = int(time.time())
    await populate(store)
    after = int(time.time())
    shard = store.keys.locate("c1")[0]
    fields: dict[str, str] = {}
    for moment in (before, after):  # the minute (even the hour) may turn during the test
        minutes = store.keys.stats(shard, MINUTE, MINUTE.hash_of(MINUTE.bucket(moment)))
        hours = store.keys.stats(shard, HOUR, HOUR.hash_of(HOUR.bucket(moment)))
        if await store.redis.exists(minutes):
            assert 0 < await store.redis.ttl(minutes) <= MINUTE.keep_seconds
            assert MINUTE.keep_seconds < await store.redis.ttl(hours) <= HOUR.keep_seconds
            fields |= {str(k): str(v) for k, v in (await store.redis.hgetall(minutes)).items()}
    failed = {f"{MINUTE.bucket(moment)}:failed:agents:{TARGETS[0]}" for moment in (before, after)}
    assert failed & set(fields), fields


async def test_a_late_accept_turns_a_failure_into_a_success(store: RedisCallStore) -> None:
    """Timed out, then accepted after all: one transfer, one success, rate 100%."""
    engine = Engine(store, two_target_flow())
    await engine.handle("late", CallerInput("agent"), activity_id="a")
    await engine.handle("late", TimerExpired(now_ms=2**62))
    await engine.handle("late", HandoffStatus("accepted"), activity_id="b")
    figures = await inspection.stats(CallInspector(store), "1h")
    counted = {
        "started": 1,
        "accepted": 0,
        "failed": 0,
        "timeout": 1,
        "late_accepted": 1,
        "success_rate": 1.0,
    }
    assert figures["targets"] == [{"target": TARGETS[0], **counted}]
    assert figures["queues"] == [{"queue": "agents", **counted}]


@pytest.mark.parametrize("window", [0, -5, 8 * 86_400])
async def test_a_window_out_of_range_is_refused(store: RedisCallStore, window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        await CallInspector(store).transfer_counts(window)


async def test_the_feed_holds_every_calls_steps_newest_first(store: RedisCallStore) -> None:
    await populate(store)
    # Moves through the call flow are in the feed too, each naming the node it reached.
    steps = await CallInspector(store).recent(100)
    assert {e.node for e in steps if e.trigger == "move"} == {"agent"}
    everything = [e for e in steps if e.trigger != "move"]
    assert len(everything) == 8 and ("c0", "hang_up") in {(e.call, e.trigger) for e in everything}
    assert all(a.at_ms >= b.at_ms for a, b in itertools.pairwise(everything))
    # Steps of one call keep their order (steps of different calls in one ms may tie).
    recent = [e for e in everything if e.call == "c5"][:3]
    assert [(e.call, e.trigger, e.source, e.dest) for e in recent] == [
        ("c5", "accept", "transferring", "accepted"),
        ("c5", "request_agent", "failed", "transferring"),
        ("c5", "fail", "transferring", "failed"),
    ]
    assert recent[0].target == TARGETS[1] and recent[2].reason == "timeout"
    assert len(await CallInspector(store).recent(4)) == 4


async def test_a_watcher_sees_only_what_happens_after_it_starts(store: RedisCallStore) -> None:
    engine = await populate(store)
    inspector = CallInspector(store)
    heads = await inspector.feed_heads()
    assert len(heads) == SHARDS
    assert await inspector.feed_since(heads) == []
    await engine.handle("c3", HandoffStatus("failed", "no answer"), activity_id="f")
    await engine.handle("c9", CallerInput("agent"), activity_id="g")
    seen = [e for e in await inspector.feed_since(heads) if e.trigger != "move"]
    assert sorted((e.call, e.source, e.dest, e.reason) for e in seen) == [
        ("c3", "transferring", "failed", "no answer"),
        ("c9", "bot", "transferring", "transfer to agents"),
    ]
    assert await inspector.feed_since(heads) == []  # the heads moved on


async def test_pruning_drops_only_entries_of_expired_calls(store: RedisCallStore) -> None:
    await populate(store)
    inspector = CallInspector(store)
    # c2 and c3 expire without ending (nobody called again within the idle TTL).
    for conversation_id in ("c2", "c3"):
        await store.redis.delete(store.keys.call(conversation_id).call)
    assert await store.prune_index() == 0  # their entries are younger than any TTL: untouched
    store.retention = type(store.retention)(live_seconds=1, ended_seconds=1)
    await _age_entries(store, ["c2", "c3", "c4"], by_ms=5_000)
    assert await store.prune_index() == 3  # c2's in bot and at its node, c3's in transferring
    assert await inspector.node_counts() == {"main": 1}
    assert await inspector.state_counts() == {
        "bot": 1,
        "transferring": 0,
        "accepted": 1,
        "failed": 1,
        "ended": 1,
    }
    assert await store.prune_index() == 0


async def test_pruning_the_last_call_of_a_node_unlists_the_node(store: RedisCallStore) -> None:
    engine = Engine(store, two_target_flow())
    await engine.handle("lone", CallerInput("1"), activity_id="a")  # at the billing menu
    nodes = store.keys.nodes(store.keys.locate("lone")[0])
    assert await store.redis.smembers(nodes) == {"billing"}
    await store.redis.delete(store.keys.call("lone").call)  # it expired
    store.retention = Retention(live_seconds=1, ended_seconds=1)
    await _age_entries(store, ["lone"], by_ms=5_000)
    assert await store.prune_index() == 2  # in bot, and at billing
    assert await store.redis.smembers(nodes) == set()
    assert await CallInspector(store).node_counts() == {}


async def _age_entries(store: RedisCallStore, ids: list[str], by_ms: int) -> None:
    """Move index entries back in time, as if the calls entered their state (or reached
    their node) long ago."""
    listed = await store.listed_nodes()
    for conversation_id in ids:
        shard = store.keys.locate(conversation_id)[0]
        indexes = [store.keys.state_index(shard, state) for state in ("bot", "transferring")]
        indexes += [store.keys.node_index(shard, node) for at, node in listed if at == shard]
        for index in indexes:
            score = await store.redis.zscore(index, conversation_id)
            if score is not None:
                await store.redis.zadd(index, {conversation_id: score - by_ms})


async def test_listing_reads_deeper_where_a_shard_has_more_recent_calls(
    store: RedisCallStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 calls in one state: ~9 per shard, more than the first read takes from each."""
    engine = Engine(store, two_target_flow())
    for chunk in range(0, 600, 100):
        await asyncio.gather(
            *(engine.handle(f"n{i}", CallerInput("hi"), activity_id="a") for i in range(chunk, chunk + 100))
        )
    scores: list[int] = []
    for shard in range(SHARDS):
        found = await store.redis.zrange(store.keys.state_index(shard, "bot"), 0, -1, withscores=True)
        scores += [int(score) for _, score in found]  # type: ignore[str-unpack]
    inspector = CallInspector(store)
    reads: list[int] = []
    pipelined = inspector._pipelined

    async def counting(action: str, commands: list[Any]) -> list[Any]:
        reads.extend(1 for name, _, _ in commands[:1] if name == "zrevrange")
        return await pipelined(action, commands)

    monkeypatch.setattr(inspector, "_pipelined", counting)
    for limit in (1, 50, 300, 600, 700):
        reads.clear()
        listed = await inspector.list_calls(["bot"], limit)
        assert [int(r["since"]) for r in listed] == sorted(scores, reverse=True)[:limit], limit
        # 8 entries per shard settle the newest 50; the newest 300 need a deeper read.
        assert len(reads) == {1: 1, 50: 1, 300: 2}.get(limit, len(reads)), (limit, reads)
    assert {r["id"] for r in await inspector.list_calls(["bot"], 600)} == {f"n{i}" for i in range(600)}


async def test_stale_entries_at_the_top_of_an_index_do_not_hide_calls(store: RedisCallStore) -> None:
    """Entries of expired calls (not pruned yet) newer than most live calls, in one index:
    the first read's cut-off falls inside them, and the calls behind must still be listed."""
    engine = Engine(store, two_target_flow())
    live = [f"live{i}" for i in range(12)]
    for conversation_id in live:
        await engine.handle(conversation_id, CallerInput("hi"), activity_id="a")
    shard_of = {conversation_id: store.keys.locate(conversation_id)[0] for conversation_id in live}
    crowded = shard_of[live[0]]
    newest = [c for c in live if shard_of[c] != crowded][:2]
    scores = {c: 100 + n for n, c in enumerate(live)}  # older than the stale entries ...
    scores |= {newest[0]: 2000, newest[1]: 2001}  # ... but for two, in other shards
    for conversation_id, score in scores.items():
        await store.redis.zadd(
            store.keys.state_index(shard_of[conversation_id], "bot"), {conversation_id: score}
        )
    await store.redis.zadd(store.keys.state_index(crowded, "bot"), {f"gone{i}": 1000 + i for i in range(8)})
    inspector = CallInspector(store)
    for limit in (1, 2, 5, 10, 12, 50):
        listed = [r["id"] for r in await inspector.list_calls(["bot"], limit)]
        expected = sorted(live, key=lambda c: scores[c], reverse=True)[:limit]
        assert listed == expected, (limit, listed)


async def test_a_window_covers_at_least_the_time_asked(store: RedisCallStore) -> None:
    """A minute bucket that overlaps the window counts; one wholly before it does not."""
    minute = MINUTE.bucket(int(time.time())) - 10
    for bucket, target in ((minute, "+15550000001"), (minute - 1, "+15550000002")):
        key = store.keys.stats(0, MINUTE, MINUTE.hash_of(bucket))
        await store.redis.hset(key, f"{bucket}:started:{target}", 1)
        await store.redis.expire(key, 600)
    # Two minutes after the counted minute began, plus one second: a 120 s window starts
    # one second into that minute.
    now = (minute + 2) * 60 + 1
    counts = await CallInspector(store).transfer_counts(120, now_s=now)
    assert set(counts.by_target) == {"+15550000001"}
    assert counts.from_ms == minute * 60_000 and counts.to_ms == now * 1000
    # A counter without a queue (this test's, written as before queues were counted) is queue "".
    assert counts.by_queue == {"": {"started": 1}}


async def test_how_a_call_is_connected_is_read_from_its_reference_and_socket_key(
    store: RedisCallStore,
) -> None:
    inspector = CallInspector(store)
    over_http = json.dumps({"serviceUrl": "https://smba.example/telephony/"})
    over_socket = json.dumps({"serviceUrl": "urn:botframework:websocket:telephony"})
    http = await inspector.connection("call-http", over_http)
    assert http == {"transport": "http", "service_url": "https://smba.example/telephony/"}
    assert (
        inspection.connection_line(http, "bot")
        == "HTTP: replies are posted to https://smba.example/telephony/"
    )

    waiting = await inspector.connection("call-ws", over_socket)
    assert waiting["transport"] == "websocket" and waiting["instance"] is None
    assert "none now" in inspection.connection_line(waiting, "failed")
    assert "has ended" in inspection.connection_line(waiting, "ended")

    await store.redis.set(store.keys.socket("call-ws"), "host-1-abc", ex=60)
    lapsed = await inspector.connection("call-ws", over_socket)
    assert (lapsed["instance"], lapsed["live"]) == ("host-1-abc", False)
    assert (
        inspection.connection_line(lapsed, "bot")
        == "streaming socket on instance host-1-abc (lapsed: the instance is gone)"
    )
    await store.redis.set(store.keys.instance("host-1-abc"), "{}", ex=60)
    live = await inspector.connection("call-ws", over_socket)
    assert live["live"] is True
    assert inspection.connection_line(live, "bot") == "streaming socket on instance host-1-abc (live)"
    await store.redis.delete(store.keys.instance("host-1-abc"))


async def test_live_entries_older_than_the_cut_off_do_not_starve_the_pruning(store: RedisCallStore) -> None:
    """A call that stays in one state longer than the cut-off (no lifetime bound) keeps an
    old index entry that is still live. Pruning read each index from its head every pass,
    so enough of them hid the entries of expired calls behind them for ever."""
    store.retention = Retention(live_seconds=1, ended_seconds=1, max_live_seconds=0)
    ids = [cid for cid in (f"starve-{n}" for n in range(2000)) if store.keys.locate(cid)[0] == 0][:12]
    live, expired = ids[:8], ids[8:]
    index = store.keys.state_index(0, "bot")
    for n, cid in enumerate(live):
        await store.redis.zadd(index, {cid: 1000 + n})
        await store.redis.hset(store.keys.call(cid).call, "state", "bot")
    for n, cid in enumerate(expired):
        await store.redis.zadd(index, {cid: 2000 + n})
    removed = [await store.prune_index(batch=5) for _ in range(4)]
    assert sum(removed) == len(expired), removed
    assert sorted(await store.redis.zrange(index, 0, -1)) == sorted(live)


async def test_a_pools_transfers_count_against_the_pool_as_their_target(store: RedisCallStore) -> None:
    """Pooled transfers count as target ``pool:<name>``: its ':' is no queue's."""
    minute = MINUTE.bucket(int(time.time()))
    key = store.keys.stats(0, MINUTE, MINUTE.hash_of(minute))
    await store.redis.hset(key, f"{minute}:started:agents:pool:front", 3)
    await store.redis.hset(key, f"{minute}:started:agents:+15550000001", 1)
    await store.redis.hset(key, f"{minute}:started:+15550000002", 1)  # before queues
    await store.redis.expire(key, 600)
    counts = await CallInspector(store).transfer_counts(120)
    assert counts.by_queue == {"agents": {"started": 4}, "": {"started": 1}}
    assert counts.by_target == {
        "pool:front": {"started": 3},
        "+15550000001": {"started": 1},
        "+15550000002": {"started": 1},
    }
