"""Memory per live call in Redis, by key kind, against the target of < 8 KB per call.

Makes M calls through the real write path: the app (``app.create_app``) in-process on a
loopback port, on the real Redis under a prefix of its own, each call posted over HTTP
as the channel would: a conversationUpdate, 9 caller messages, "talk to agent", a
``handoff.status`` failed (the call is back in ``bot`` after the next message), 10 more
messages: 20 caller turns, a 41-line transcript, 14 history entries (3 transitions; 11
moves through the call flow: the start, the transfer, and each "1" or "one", which enters
the billing menu again), 22 activities seen; its reference in a key of its own, and no
variables (the sample flow gathers nothing).
Every tenth call's retry prompt is refused by the channel, so its reply stays kept in
the outbox (the scheduler, which would re-send it, is stopped): an outbox exists only
while replies are unacknowledged. Then ``MEMORY USAGE <key> SAMPLES 0`` (exact) and
``OBJECT ENCODING`` of every key of every call (``Keyspace.call``), and of the shards'
shared keys (state indexes, due schedules, feeds, transfer counters), amortised per call:
the feeds are capped per shard, so their share falls as calls grow.

    .venv/bin/python -m bench.memory [--redis-url URL] [--json PATH] [--smoke]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from redis.asyncio import Redis

from adapters.keys import CallKeys, Keyspace
from bench.inspection import conversation_id, delete_prefix, glob_escape
from bench.report import main as bench_main
from bench.report import row, unique_prefix
from bench.roundtrips import ORDINARY, TRANSFER_TEXT, start_instance, stop_schedulers
from orchestrator.callflow import SAMPLE_CALLFLOW, load_callflow, shipped_flow
from simulator.channel import Caller, ChannelStandIn

TARGET_BYTES = 8 * 1024
KINDS = CallKeys._fields  # call (the record hash), transcript, history, seen, outbox, reference, variables
# Kinds no call of this script has: the sample flow gathers nothing, so no call has variables.
NONE_HERE = {"variables"}
SHARED = {
    ":state:": "state indexes",
    ":due": "due schedules",
    ":feed": "feeds",
    ":stats:": "transfer counters",
    ":node:": "node indexes",
    ":nodes": "node lists",
    ":instance:": "instance leases",  # one per running instance, not per call
}
KEPT_EVERY = 10  # every tenth call has a reply kept in its outbox
CONCURRENT_CALLS = 20


def script(caller: Caller, before: int, after: int) -> list[dict[str, Any]]:
    """One call's activities; the status (index ``before + 2``) is the turn whose reply
    the channel may refuse."""
    return [
        caller.start(),
        *(caller.say(ORDINARY[m % len(ORDINARY)]) for m in range(before)),
        caller.say(TRANSFER_TEXT),
        caller.status({"state": "failed", "message": "busy"}),
        *(caller.say(ORDINARY[m % len(ORDINARY)]) for m in range(after)),
    ]


async def make_calls(
    url: str, channel: ChannelStandIn, callers: list[Caller], before: int, after: int
) -> Counter[int]:
    """Every call's activities in order; calls run concurrently, except the status turns,
    posted one at a time so the channel refuses exactly the kept calls' replies."""
    statuses: Counter[int] = Counter()
    scripts = [script(caller, before, after) for caller in callers]
    status_turn = before + 2

    async def post(session: aiohttp.ClientSession, activity: dict[str, Any]) -> None:
        async with session.post(url, json=activity) as response:
            await response.read()
            statuses[response.status] += 1

    async def calls(session: aiohttp.ClientSession, turns: slice) -> None:
        gate = asyncio.Semaphore(CONCURRENT_CALLS)

        async def one(activities: list[dict[str, Any]]) -> None:
            async with gate:
                for activity in activities[turns]:
                    await post(session, activity)

        await asyncio.gather(*(one(activities) for activities in scripts))

    # A refused send is logged with its traceback: expected here, not news.
    bot_log = logging.getLogger("adapters.bot")
    level = bot_log.level
    bot_log.setLevel(logging.CRITICAL + 1)
    try:
        async with aiohttp.ClientSession() as session:
            await calls(session, slice(0, status_turn))
            for i, activities in enumerate(scripts):
                channel.refuse_next = 1 if i % KEPT_EVERY == 0 else 0
                await post(session, activities[status_turn])
            channel.refuse_next = 0
            await calls(session, slice(status_turn + 1, None))
    finally:
        bot_log.setLevel(level)
    return statuses


async def sizes(control: Redis, keys: list[str]) -> list[tuple[int, str]]:
    """(bytes, encoding) of each key; (0, "") for a key that does not exist."""
    async with control.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
            pipe.object("ENCODING", key)
        replies = await pipe.execute(raise_on_error=False)
    found = []
    for used, encoding in zip(replies[::2], replies[1::2], strict=True):
        ok = isinstance(used, int)
        found.append((used if ok else 0, str(encoding) if ok and not isinstance(encoding, Exception) else ""))
    return found


async def measure(redis_url: str, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    calls, before, after = (6, 2, 2) if smoke else (200, 9, 10)
    prefix = unique_prefix("mem")
    keyspace = Keyspace(prefix)
    control = Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    channel = await ChannelStandIn().start()
    instance = await start_instance(redis_url, prefix)
    stop_schedulers()
    callers = [Caller(channel.url, conversation_id(prefix, i)) for i in range(calls)]
    try:
        say(f"{calls} calls of {before + after + 1} caller messages, posted to the app")
        statuses = await make_calls(instance.url, channel, callers, before, after)
        call_keys = [keyspace.call(c.conversation_id) for c in callers]
        measured = await sizes(control, [key for keys in call_keys for key in keys])
        per_kind: dict[str, dict[str, Any]] = {}
        for k, kind in enumerate(KINDS):
            found = measured[k :: len(KINDS)]
            held = [used for used, _ in found if used]
            per_kind[kind] = {
                "bytes_per_call": round(sum(held) / calls, 1),
                "calls_holding_it": len(held),
                "bytes_per_call_holding_it": round(sum(held) / len(held), 1) if held else 0.0,
                "encodings": dict(Counter(encoding for _, encoding in found if encoding)),
            }
        own = {key for keys in call_keys for key in keys}
        shared_keys = [
            key
            async for key in control.scan_iter(match=f"{glob_escape(prefix)}:*", count=1000)
            if key not in own
        ]
        shared_sizes = await sizes(control, shared_keys)
        shared: dict[str, dict[str, Any]] = {}
        for marker, name in SHARED.items():
            found = [s for key, s in zip(shared_keys, shared_sizes, strict=True) if marker in key]
            shared[name] = {
                "keys": len(found),
                "bytes": sum(used for used, _ in found),
                "bytes_per_call": round(sum(used for used, _ in found) / calls, 1),
                "encodings": dict(Counter(encoding for _, encoding in found if encoding)),
            }
        unclassified = [key for key in shared_keys if not any(m in key for m in SHARED)]
        lengths = await _lengths(control, call_keys)
    finally:
        await instance.runner.cleanup()
        deleted = await delete_prefix(control, prefix)
        await channel.stop()
        await control.aclose()
    own_per_call = sum(k["bytes_per_call"] for k in per_kind.values())
    shared_per_call = sum(s["bytes_per_call"] for s in shared.values())
    lines = 1 + 2 * before + 2 + 2 * after  # welcome, exchanges, "talk to agent" + the retry prompt
    flow = load_callflow(shipped_flow(SAMPLE_CALLFLOW))
    said = [ORDINARY[m % len(ORDINARY)] for m in (*range(before), *range(after))]
    # The machine's transitions (transfer, failure, resume) and the flow's moves: the start,
    # the transfer, and each message a route takes.
    steps = 3 + 2 + sum(flow.route_for("main", text, keypad=False) is not None for text in said)
    kept = {i for i in range(calls) if i % KEPT_EVERY == 0}
    checks = {
        "every_post_accepted": all(200 <= status < 300 for status in statuses),
        "every_call_live_in_bot": lengths["states"] == ["bot"] * calls,
        "transcripts_hold_every_line": lengths["transcript"] == [lines] * calls,
        "history_holds_every_step": lengths["history"] == [steps] * calls,
        "seen_holds_every_activity": lengths["seen"] == [before + after + 3] * calls,
        "outbox_only_where_kept": {i for i, n in enumerate(lengths["outbox"]) if n} == kept,
        "every_key_kind_measured": all(
            (figures["calls_holding_it"] > 0) != (kind in NONE_HERE) for kind, figures in per_kind.items()
        ),
        "no_unclassified_shared_keys": not unclassified,
    }
    rows = [
        row(f"{kind} bytes/call", figures["bytes_per_call"], "bytes") for kind, figures in per_kind.items()
    ]
    rows.append(
        row("outbox bytes per call holding one", per_kind["outbox"]["bytes_per_call_holding_it"], "bytes")
    )
    rows.append(row("call keys: bytes/call", round(own_per_call, 1), "bytes"))
    rows += [row(f"shared {name}: bytes/call", s["bytes_per_call"], "bytes") for name, s in shared.items()]
    rows.append(row("all: bytes/call", round(own_per_call + shared_per_call, 1), "bytes"))
    rows.append(row("target: bytes/call", TARGET_BYTES, "bytes"))
    for kind, figures in per_kind.items():
        say(f"{kind}: {figures['encodings']}")
    for name, figures in shared.items():
        say(f"shared {name}: {figures['keys']} keys, {figures['encodings']}")
    return {
        "bench": "memory",
        "parameters": {"calls": calls, "caller_messages": before + after, "transcript_lines": lines},
        "prefix": prefix,
        "call_keys": per_kind,
        "shared": shared,
        "bytes_per_call": {"call_keys": round(own_per_call, 1), "shared": round(shared_per_call, 1)},
        "target_bytes_per_call": TARGET_BYTES,
        "http_statuses": {str(k): v for k, v in statuses.items()},
        "unclassified_shared_keys": unclassified[:10],
        "checks": checks,
        "deleted_keys": deleted,
        "rows": rows,
    }


async def _lengths(control: Redis, call_keys: list[CallKeys]) -> dict[str, list[Any]]:
    async with control.pipeline(transaction=False) as pipe:
        for keys in call_keys:
            pipe.hget(keys.call, "state")
            pipe.llen(keys.transcript)
            pipe.llen(keys.history)
            pipe.hlen(keys.seen)
            pipe.hlen(keys.outbox)
        replies = await pipe.execute()
    names = ("states", "transcript", "history", "seen", "outbox")
    return {name: replies[i :: len(names)] for i, name in enumerate(names)}


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Bytes per live call, by key kind, and the shards' shared keys amortised per call."""
    return asyncio.run(measure(redis_url, smoke, say))


if __name__ == "__main__":
    sys.exit(bench_main("memory", __doc__ or "", bench))
