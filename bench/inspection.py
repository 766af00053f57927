"""Inspection at scale: ``stats`` and ``calls list`` on N live calls, against a keyspace scan.

Fills a real Redis with N calls through the product's write path (real ``Turn``s from
``TurnRunner`` on the default call flow, committed by ``commit.lua`` in pipelined
batches), then times the operator reads (``adapters.inspection``) and, as the
same-run baseline, what an operator would do without the state indexes: SCAN the
keyspace and read every call's state. It measures once at ``--small`` calls and again
at ``--calls``, so the listing's cost can be seen not to follow the total. Round trips
and replies are counted on the client's connections; the memory of the state indexes
is read with ``MEMORY USAGE``. Every key under the bench's prefix is deleted at the end.

    .venv/bin/python -m bench.inspection [--calls 100000] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from adapters import inspection
from adapters.bot import conversation_reference
from adapters.inspector import CallInspector
from adapters.keys import HOUR, MINUTE, SHARDS, Keyspace
from adapters.store import RedisCallStore, Retention
from bench.report import row
from bench.wire import CountingConnection, Wire
from orchestrator.call import Call, timestamp
from orchestrator.callflow import SAMPLE_CALLFLOW, CallFlow, load_callflow, shipped_flow
from orchestrator.events import CallEnded, CallerInput, CallStarted, Event, HandoffStatus
from orchestrator.turn import Turn, TurnRunner
from states import State

DEFAULT_JSON = Path(__file__).parent / "results" / "inspection.json"
# Three targets, so per-target stats are not one row: attempt n dials targets[(n-1) % 3].
TARGETS = ("+14251231234", "+14255550100", "+14255550142")
STATES = [s.value for s in State]
# Keys of an interrupted run still go away: call keys by their TTL (the indexes, feeds
# and schedules have none, which is why the bench deletes its prefix at the end).
RETENTION = Retention(live_seconds=7200, ended_seconds=7200)

AGENT = CallerInput("agent")
BUSY = HandoffStatus("failed", "busy")
ACCEPTED = HandoffStatus("accepted")


# --- the calls -----------------------------------------------------------------------


def bench_flow() -> CallFlow:
    """The default call flow with three transfer targets."""
    flow = load_callflow(shipped_flow(SAMPLE_CALLFLOW))
    agents = flow.queues["agents"].model_copy(update={"targets": list(TARGETS)})
    return flow.model_copy(update={"queues": {**flow.queues, "agents": agents}})


def script(i: int) -> list[Event]:
    """What happens on call ``i``: by ``i % 10`` 60% end in bot, 10% each in transferring,
    accepted, failed and ended. ``(i // 10) % 6`` varies the path, and with it how many
    transfers failed first (0 to 2), so transfers reach all three targets."""
    kind, variant = i % 10, (i // 10) % 6
    retries: list[Event] = [AGENT, BUSY] * (variant % 3)
    if kind < 6:  # bot: an ordinary exchange, or back from a transfer
        if variant == 4:
            return [CallStarted(), AGENT, BUSY, CallerInput("what are your hours")]  # failed -> resume
        if variant == 5:
            return [CallStarted(), AGENT, ACCEPTED, HandoffStatus("completed")]  # handed back
        return [CallStarted(), CallerInput("1" if variant % 2 else "my order has not arrived")]
    if kind == 6:
        return [CallStarted(), *retries, AGENT]
    if kind == 7:
        return [CallStarted(), *retries, AGENT, ACCEPTED]
    if kind == 8:
        return [CallStarted(), *retries, AGENT, BUSY]
    ends: list[list[Event]] = [
        [CallerInput("1")],
        [AGENT],
        [AGENT, ACCEPTED],
    ]  # from bot, transferring, accepted
    return [CallStarted(), *ends[variant % 3], CallEnded()]


KIND_STATES = [State.BOT] * 6 + [State.TRANSFERRING, State.ACCEPTED, State.FAILED, State.ENDED]


def expected_state(i: int) -> str:
    return KIND_STATES[i % 10].value


def expected_counts(calls: int) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for i in range(calls):
        counts[expected_state(i)] += 1
    return counts


def conversation_id(seed: str, i: int) -> str:
    """A GUID-like id (as long as the channel's), so index memory is realistic."""
    return str(uuid.UUID(bytes=hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest()))


_CONVERSATION, _CALLER = "bench-conversation-id", "+14255550000"


@functools.cache
def _reference_template() -> str:
    activity = Activity(
        type=ActivityTypes.message,
        channel_id="telephony",
        service_url="https://smba.trafficmanager.net/amer/",
        conversation=ConversationAccount(id=_CONVERSATION),
        from_property=ChannelAccount(id=_CALLER),
        recipient=ChannelAccount(id="28:bench-bot"),
        locale="en-US",
    )
    return conversation_reference(activity)


def reference_for(call_id: str, i: int) -> str:
    """The stored conversation reference, as the bot makes it from an activity (made once
    and filled in per call: msrest's serializer would cost more than the commit)."""
    caller = f"+1425555{i % 10_000:04d}"
    return _reference_template().replace(_CONVERSATION, call_id).replace(_CALLER, caller)


# --- filling -------------------------------------------------------------------------


@dataclass(slots=True)
class Filler:
    """Commits the calls' turns in pipelined batches: turn k of every call of a batch in one
    pipeline. No load round trip (each call is kept as its last commit left it) and no
    rendered replies (so nothing is kept in an outbox, as after every acknowledgement)."""

    store: RedisCallStore
    runner: TurnRunner
    seed: str
    committed: Counter[tuple[str, str]]  # (target, outcome) -> transfers, as the commits counted them
    commits: int = 0

    async def fill(self, start: int, stop: int, batch: int, workers: int) -> dict[str, Any]:
        """Calls ``start`` to ``stop`` - 1; ``workers`` batches in flight, so Redis runs one
        while Python builds the next."""
        ranges = iter(range(lo, min(lo + batch, stop)) for lo in range(start, stop, batch))
        commits_before = self.commits

        async def work() -> None:
            for numbers in ranges:  # a shared iterator: each batch goes to one worker
                await self.fill_batch(numbers)

        began = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(workers)))
        seconds = time.perf_counter() - began
        commits = self.commits - commits_before
        return {
            "from": start,
            "to": stop,
            "calls": stop - start,
            "commits": commits,
            "seconds": round(seconds, 3),
            "calls_per_s": round((stop - start) / seconds, 1),
            "commits_per_s": round(commits / seconds, 1),
        }

    async def fill_batch(self, numbers: range) -> None:
        store = self.store
        calls = {i: Call(id=conversation_id(self.seed, i)) for i in numbers}
        references = {i: reference_for(call.id, i) for i, call in calls.items()}
        scripts = {i: script(i) for i in numbers}
        for wave in range(max(len(events) for events in scripts.values())):
            pending: list[tuple[int, Turn, str]] = []
            for i, events in scripts.items():
                if wave < len(events):
                    # ``run`` never awaits, so the workers can share the runner.
                    turn = self.runner.run(calls[i], events[wave], now=timestamp(), reference=references[i])
                    pending.append((i, turn, f"{calls[i].id[:8]}-{wave}"))
            # What RedisCallStore.commit does for one turn, for a batch in one round trip.
            now_s = int(time.time())
            replies = await store.run_each(
                store._commit,
                [
                    (store._commit_keys(turn, now_s), store._commit_args(turn, key, uuid.uuid4().hex, now_s))
                    for _, turn, key in pending
                ],
            )
            for (i, turn, _), reply in zip(pending, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                status, version, deadline, *_ = reply
                if status != 1:
                    raise RuntimeError(f"call {i}: commit returned {reply!r}, not applied")
                turn.call.version, turn.call.deadline_ms = int(version), int(deadline)
                calls[i] = turn.call
                self.committed.update((o.target, o.outcome.value) for o in turn.outcomes)
            self.commits += len(pending)


# --- measuring -----------------------------------------------------------------------


async def measure(action: Callable[[], Awaitable[Any]], runs: int) -> dict[str, Any]:
    """Median and max wall time of ``runs`` runs after a warm-up, and the round trips and
    replies of one run."""
    await action()  # warm-up: a pooled connection, Redis's and Python's caches
    times: list[float] = []
    wire: set[tuple[int, int]] = set()
    for _ in range(runs):
        trips, replies = Wire.snapshot()
        began = time.perf_counter()
        await action()
        times.append((time.perf_counter() - began) * 1000)
        wire.add((Wire.round_trips - trips, Wire.replies - replies))
    trips, replies = max(wire)  # the same every run, unless the keyspace scan's pages vary
    return {
        "runs_ms": [round(t, 2) for t in times],
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
        "round_trips": trips,
        "commands": replies,
    }


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def scan_states(redis: Redis, prefix: str, wanted: str) -> tuple[Counter[str], list[str]]:
    """The baseline: every call record found by SCAN, its state read, those in ``wanted``
    listed; one pipeline of HMGETs per SCAN page."""
    counts: Counter[str] = Counter()
    found: list[str] = []
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=f"{glob_escape(prefix)}:*:call", count=1000)
        if keys:
            async with redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, ["state", "id"])
                for state, call_id in await pipe.execute():
                    counts[state] += 1
                    if state == wanted:
                        found.append(call_id)
        if cursor == 0:
            return counts, found


async def memory(store: RedisCallStore, seed: str, calls: int) -> dict[str, Any]:
    """Bytes held by the inspection structures (exact: ``MEMORY USAGE ... SAMPLES 0`` of
    every shard's keys), and of the calls' own keys (a sample of calls), per call."""
    keys, redis = store.keys, store.redis
    now = int(time.time())
    groups = {
        "state_indexes": [keys.state_index(shard, state) for shard in range(SHARDS) for state in STATES],
        "feeds": [keys.feed(shard) for shard in range(SHARDS)],
        "due": [keys.due(shard) for shard in range(SHARDS)],
        "transfer_counters": [
            keys.stats(shard, bucket, start)
            for shard in range(SHARDS)
            for bucket in (MINUTE, HOUR)  # every hash a run of up to a day wrote
            for start in range(
                bucket.hash_of(bucket.bucket(now - 86_400)), bucket.hash_of(bucket.bucket(now)) + 1
            )
        ],
    }
    sample = [conversation_id(seed, i) for i in range(0, calls, max(1, calls // 200))]
    groups["call_keys_sample"] = [key for call_id in sample for key in keys.call(call_id)]
    sizes: dict[str, int] = {}
    for name, names in groups.items():
        async with redis.pipeline(transaction=False) as pipe:
            for key in names:
                pipe.memory_usage(key, samples=0)
            sizes[name] = sum(int(n or 0) for n in await pipe.execute())
    per_call = {name: round(size / calls, 1) for name, size in sizes.items() if name != "call_keys_sample"}
    per_call["call_keys"] = round(sizes.pop("call_keys_sample") / len(sample), 1)
    return {
        "bytes": sizes,
        "bytes_per_call": per_call,
        "state_index_keys": len(groups["state_indexes"]),
        "call_keys_sampled_calls": len(sample),
    }


INDEXED: dict[str, Callable[[CallInspector], Awaitable[Any]]] = {
    "stats 1h": lambda inspector: inspection.stats(inspector, "1h"),
    "stats 24h": lambda inspector: inspection.stats(inspector, "24h"),
    "list transferring 50": lambda inspector: inspection.list_calls(inspector, "transferring", 50),
    "list failed 1000": lambda inspector: inspection.list_calls(inspector, "failed", 1000),
    "state_counts": lambda inspector: inspector.state_counts(),
}
BASELINE = "baseline: SCAN + HMGET state"


async def checkpoint(
    inspector: CallInspector, filler: Filler, prefix: str, calls: int, runs: int
) -> dict[str, Any]:
    """Every measurement at the current size, and checks that the figures are right."""
    load_before = os.getloadavg()[0]
    timings: dict[str, dict[str, Any]] = {}
    for name, read in INDEXED.items():
        timings[name] = await measure(functools.partial(read, inspector), runs)
    redis: Redis = inspector.redis  # type: ignore[assignment]
    timings[BASELINE] = await measure(functools.partial(scan_states, redis, prefix, State.TRANSFERRING), runs)
    baseline_ms = timings[BASELINE]["median_ms"]
    ratios = {name: round(baseline_ms / max(timings[name]["median_ms"], 1e-3), 1) for name in INDEXED}

    # The checks, untimed.
    counts = await inspector.state_counts()
    scanned, scanned_transferring = await scan_states(redis, prefix, State.TRANSFERRING)
    transferring = counts[State.TRANSFERRING]
    indexed_all = await inspector.list_calls([State.TRANSFERRING], max(transferring, 1))
    listed = await inspection.list_calls(inspector, State.TRANSFERRING, 50)
    failed = await inspection.list_calls(inspector, State.FAILED, 1000)
    committed = {
        target: {outcome: n for (t, outcome), n in filler.committed.items() if t == target}
        for target in {t for t, _ in filler.committed}
    }
    stats = {window: await inspection.stats(inspector, window) for window in ("1h", "24h")}
    per_target = {
        window: {
            line["target"]: {o: line[o] for o in ("started", "accepted", "failed", "timeout") if line[o]}
            for line in figures["targets"]
        }
        for window, figures in stats.items()
    }
    checks = {
        "states_add_up": sum(counts.values()) == calls,
        "state_counts_match_mix": counts == expected_counts(calls),
        "baseline_counts_match_indexes": {s: scanned.get(s, 0) for s in STATES} == counts,
        "baseline_and_index_found_the_same_transferring_calls": (
            sorted(r["id"] for r in indexed_all) == sorted(scanned_transferring)
        ),
        "listing_50_is_latest_transferring": (
            len(listed) == min(50, transferring) and {r["id"] for r in listed} <= set(scanned_transferring)
        ),
        "listing_failed_1000_rows": len(failed) == min(1000, counts[State.FAILED]),
        "stats_per_target_match_commits": per_target["1h"] == committed == per_target["24h"],
        "every_target_transferred": set(committed) == set(TARGETS),
    }
    return {
        "calls": calls,
        "state_counts": counts,
        "baseline_counts": dict(scanned),
        "transfers_per_target": per_target["24h"],
        "timings_ms": timings,
        "baseline_over_indexed": ratios,
        "memory": await memory(inspector.store, filler.seed, calls),
        "checks": checks,
        "keyspace_keys": int(await redis.dbsize()),  # what the baseline's SCAN walks, other users' keys too
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def growth(points: list[dict[str, Any]]) -> dict[str, Any]:
    """How much longer each read took at the last checkpoint than at the first."""
    if len(points) < 2:
        return {}
    first, last = points[0], points[-1]
    return {
        "calls": round(last["calls"] / first["calls"], 2),
        "median_ms": {
            name: round(last["timings_ms"][name]["median_ms"] / max(timing["median_ms"], 1e-3), 2)
            for name, timing in first["timings_ms"].items()
        },
    }


async def delete_prefix(redis: Redis, prefix: str) -> int:
    """UNLINK every key under ``prefix:`` (SCAN by pages, only this prefix)."""
    deleted = 0
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=f"{glob_escape(prefix)}:*", count=1000)
        if keys:
            deleted += int(await redis.unlink(*keys))
        if cursor == 0:
            return deleted


async def run(options: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    sizes = sorted({n for n in (options.small, options.calls) if n > 0})
    redis = Redis.from_url(
        options.redis_url, decode_responses=True, socket_timeout=60, connection_class=CountingConnection
    )
    store = RedisCallStore(redis, Keyspace(options.prefix), RETENTION)
    inspector = CallInspector(store)
    filler = Filler(store, TurnRunner(bench_flow(), RETENTION.transcript_max), options.prefix, Counter())
    info = await redis.info("server")
    report: dict[str, Any] = {
        "parameters": {
            "calls": options.calls,
            "small": options.small,
            "runs": options.runs,
            "batch": options.batch,
            "workers": options.workers,
            "prefix": options.prefix,
            "targets": list(TARGETS),
            "mix": expected_counts(options.calls),
        },
        "environment": {
            "redis_version": info.get("redis_version"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "started": timestamp(),
        },
        "fill": [],
        "checkpoints": [],
    }
    # Refuse a prefix that holds anything, before the clean-up below could delete it.
    async for _ in redis.scan_iter(match=f"{glob_escape(options.prefix)}:*", count=10_000):
        await redis.aclose()
        raise SystemExit(f"prefix {options.prefix!r} already holds keys: pick another --prefix")
    try:
        filled = 0
        for size in sizes:
            fill = await filler.fill(filled, size, options.batch, options.workers)
            report["fill"].append(fill)
            say(f"filled {size:,} calls ({fill['calls_per_s']:,.0f} calls/s); measuring")
            filled = size
            report["checkpoints"].append(
                await checkpoint(inspector, filler, options.prefix, size, options.runs)
            )
        report["growth"] = growth(report["checkpoints"])
    finally:
        if not options.keep:
            report["deleted_keys"] = await delete_prefix(redis, options.prefix)
        await redis.aclose()
    return report


# --- output --------------------------------------------------------------------------


def show(report: dict[str, Any], console: Console) -> None:
    fill = Table("calls", "commits", "seconds", "calls/s", "commits/s", title="fill (commit.lua, pipelined)")
    for batch in report["fill"]:
        fill.add_row(
            f"{batch['from']:,} to {batch['to']:,}",
            f"{batch['commits']:,}",
            f"{batch['seconds']:.1f}",
            f"{batch['calls_per_s']:,.0f}",
            f"{batch['commits_per_s']:,.0f}",
        )
    console.print(fill)
    points = report["checkpoints"]
    table = Table(
        "inspection",
        *(f"{p['calls']:,} calls\nmedian / max ms" for p in points),
        *(f"baseline ÷ this\nat {p['calls']:,}" for p in points),
        "round trips",
        "commands",
        title=f"inspection, {report['parameters']['runs']} runs each",
    )
    for name in [*INDEXED, BASELINE]:
        timing = points[-1]["timings_ms"][name]
        table.add_row(
            name,
            *(
                f"{p['timings_ms'][name]['median_ms']:.1f} / {p['timings_ms'][name]['max_ms']:.1f}"
                for p in points
            ),
            *(f"{p['baseline_over_indexed'][name]:,.1f}x" if name in INDEXED else "-" for p in points),
            str(timing["round_trips"]),
            f"{timing['commands']:,}",
        )
    console.print(table)
    state = Table("calls", *STATES, "transfers per target (started/accepted/failed)", title="calls")
    for p in points:
        targets = ", ".join(
            f"{t[-4:]}: {c.get('started', 0)}/{c.get('accepted', 0)}/{c.get('failed', 0)}"
            for t, c in sorted(p["transfers_per_target"].items())
        )
        state.add_row(f"{p['calls']:,}", *(f"{p['state_counts'][s]:,}" for s in STATES), targets)
    console.print(state)
    mem = Table("calls", *points[-1]["memory"]["bytes_per_call"], title="memory, bytes per call")
    for p in points:
        mem.add_row(f"{p['calls']:,}", *(f"{v:,.1f}" for v in p["memory"]["bytes_per_call"].values()))
    console.print(mem)
    if report.get("growth"):
        grown = report["growth"]
        console.print(
            f"{grown['calls']:g}x the calls: "
            + ", ".join(f"{name} {times:g}x as long" for name, times in grown["median_ms"].items())
        )
    for p in points:
        bad = [name for name, ok in p["checks"].items() if not ok]
        verdict = "[green]all checks pass[/green]" if not bad else f"[red]FAILED: {', '.join(bad)}[/red]"
        console.print(f"{p['calls']:,} calls: {verdict}; 1-min load average {p['load_average_1m']}")
    if "deleted_keys" in report:
        console.print(f"deleted {report['deleted_keys']:,} keys under {report['parameters']['prefix']}:")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.inspection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="live calls at the big checkpoint")
    parser.add_argument(
        "--small", type=int, help="calls at the first checkpoint (default: calls / 10; 0: none)"
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each inspection")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="a single Redis, redis:// (not a cluster)"
    )
    parser.add_argument(
        "--prefix", default=f"bench-{uuid.uuid4().hex[:8]}", help="key prefix (must be unused)"
    )
    parser.add_argument("--batch", type=int, default=1000, help="calls per pipelined batch while filling")
    parser.add_argument("--workers", type=int, default=2, help="batches in flight while filling")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument("--keep", action="store_true", help="leave the keys in Redis (delete them yourself)")
    options = parser.parse_args(argv)
    if options.small is None:
        options.small = options.calls // 10
    if not options.redis_url.startswith("redis://"):
        # Round trips are counted on plain TCP connections (CountingConnection).
        parser.error("--redis-url must be a redis:// URL")
    if options.calls < 1 or options.runs < 1 or options.batch < 1 or options.workers < 1:
        parser.error("--calls, --runs, --batch and --workers must be at least 1")
    return options


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures, for ``python -m bench`` (medians over runs)."""
    found = []
    for point in report["checkpoints"]:
        calls = f"{point['calls']:,} calls"
        for name in [*INDEXED, BASELINE]:
            found.append(row(f"{name} ms at {calls}", point["timings_ms"][name]["median_ms"], "ms"))
        for name in INDEXED:
            found.append(row(f"baseline ÷ {name} at {calls}", point["baseline_over_indexed"][name], "x"))
    return found


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One run at 10,000 and 100,000 calls (``smoke``: 30 and 300), with ``rows`` and ``checks``."""
    options = parse_args(["--calls", "300" if smoke else "100000", "--runs", "1" if smoke else "5"])
    options.redis_url = redis_url
    report = asyncio.run(run(options, say))
    report["rows"] = rows(report)
    report["checks"] = {
        f"{point['calls']:,} calls: {name}": ok
        for point in report["checkpoints"]
        for name, ok in point["checks"].items()
    }
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the tables, write the JSON; exit status 1 if a check failed."""
    options = parse_args(argv)
    console = Console()
    console.print(
        f"filling {options.calls:,} calls under {options.prefix}: on {options.redis_url} "
        f"(first checkpoint at {options.small:,})"
    )
    report = asyncio.run(run(options, console.print))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(report, console)
    console.print(f"figures in {options.json}")
    return 0 if all(all(p["checks"].values()) for p in report["checkpoints"]) else 1


if __name__ == "__main__":
    sys.exit(main())
