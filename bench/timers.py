"""Timers at scale: N no-answer watchdogs due at the same instant, drained by the bots.

Puts N calls into ``transferring`` through the product's write path (real ``Turn``s from
``TurnRunner`` on the default call flow, committed by ``commit.lua`` in pipelined
batches, each with a conversation reference whose ``serviceUrl`` is a ``ChannelStandIn``
in this process), starts ``--instances`` real bots (``python app.py``), and once they are
polling makes every watchdog due at one instant T. Each fired watchdog is a real turn
(``transferring -> failed``, reason ``timeout``) whose retry prompt the bot sends
proactively to the stand-in. Measured: when each prompt arrived (lateness = arrival - T),
the drain time (last arrival - T), duplicates (same call and ``replyKey`` twice), the
calls' records and histories (every call ``failed`` by exactly one timeout step, and when
that step was committed), each instance's ``cc_watchdogs_fired``, and the CPU seconds
the bots, Redis and this process spent during the drain. Every key under the bench's
prefix is deleted and every bot stopped at the end.

Lining the timers up: the fill takes seconds, so no one transfer timeout could make N
commits come due together. After the fill, one pipeline sets each call's ``deadline``
field and its member's score in its shard's due set to the same T (Redis time, ms, a
couple of seconds ahead). That is exactly the state ``commit.lua`` leaves after a
transfer started ``timeout_seconds`` before T: the watchdog turn fences on the record's
``deadline`` (``0 < deadline <= claim time``), never on when the transfer began.

    .venv/bin/python -m bench.timers [--calls 10000] [--instances 2] [--redis-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from adapters.bot import conversation_reference
from adapters.keys import CallField, Due, Keyspace
from adapters.store import RedisCallStore, Retention, decode_step
from bench.inspection import conversation_id, delete_prefix, glob_escape
from bench.report import row, unique_prefix
from bench.wire import command_stats
from orchestrator.call import Call, timestamp
from orchestrator.callflow import load_callflow
from orchestrator.events import CallerInput, CallStarted, Event
from orchestrator.turn import TurnRunner
from simulator.channel import ChannelStandIn
from states import State
from tests.process import ROOT, BotProcess

DEFAULT_JSON = Path(__file__).parent / "results" / "timers.json"
SMOKE_CALLS = 200
# Long enough that no key of the run expires under it; an interrupted run's keys still go.
RETENTION = Retention(live_seconds=7200, ended_seconds=7200)
LEAD_MS = 2500  # T is this far ahead of the rewrite: the bots are polling when it comes
SETTLE_SECONDS = 0.5  # after the last expected prompt: a duplicate in flight still lands
TARGET_P99_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_FIRED = re.compile(r"^cc_watchdogs_fired(?:_total)?\s+([0-9.e+]+)$", re.MULTILINE)


# --- the channel ---------------------------------------------------------------------


class TimedStandIn(ChannelStandIn):
    """The stand-in, stamping each activity with when its request reached this process."""

    async def _receive(self, request: web.Request) -> web.Response:
        arrived = time.time()
        response = await super()._receive(request)
        if response.status == 200:
            # The super call appended it and returned without yielding: it is the last one.
            self.activities[-1]["_arrived"] = arrived
        return response


def reference_maker(service_url: str) -> Callable[[str], str]:
    """Conversation references as the bot stores them, pointing at ``service_url``: one made
    by the bot's own code, then filled in per call (msrest's serializer costs more than a
    commit)."""
    placeholder = "bench-conversation-id"
    template = conversation_reference(
        Activity(
            type=ActivityTypes.message,
            channel_id="telephony",
            service_url=service_url,
            conversation=ConversationAccount(id=placeholder),
            from_property=ChannelAccount(id="+14255550000"),
            recipient=ChannelAccount(id="28:bench-bot"),
            locale="en-US",
        )
    )
    return lambda call_id: template.replace(placeholder, call_id)


# --- filling -------------------------------------------------------------------------


async def fill(store: RedisCallStore, ids: list[str], reference: Callable[[str], str], batch: int) -> float:
    """Every call started and transferred (two real turns, the second arms the watchdog),
    committed by commit.lua, a batch of calls per pipelined round trip. Seconds taken."""
    runner = TurnRunner(load_callflow(), RETENTION.transcript_max)
    began = time.perf_counter()
    for lo in range(0, len(ids), batch):
        calls = [Call(id=call_id) for call_id in ids[lo : lo + batch]]
        events: list[Event] = [CallStarted(), CallerInput("agent")]
        for wave, event in enumerate(events):
            turns = [runner.run(call, event, now=timestamp(), reference=reference(call.id)) for call in calls]
            now_s = int(time.time())
            replies = await store._run_each(
                store._commit,
                [
                    (
                        store._commit_keys(turn, now_s),
                        store._commit_args(turn, f"{turn.call.id[:8]}-{wave}", uuid.uuid4().hex, now_s),
                    )
                    for turn in turns
                ],
            )
            for turn, reply in zip(turns, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                if reply[0] != 1:
                    raise RuntimeError(f"call {turn.call.id}: commit returned {reply!r}, not applied")
                turn.call.version, turn.call.deadline_ms = int(reply[1]), int(reply[2])
            calls = [turn.call for turn in turns]
        if any(call.state != State.TRANSFERRING or not call.deadline_ms for call in calls):
            raise RuntimeError("a filled call is not transferring with a deadline")
    return time.perf_counter() - began


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def line_up(store: RedisCallStore, ids: list[str], lead_ms: int) -> int:
    """Make every call's watchdog due at one instant T, ``lead_ms`` from now (Redis time):
    the record's ``deadline`` and the due-set score, in one pipeline. Returns T."""
    redis, keys = store.redis, store.keys
    due_at = await redis_ms(redis) + lead_ms  # type: ignore[arg-type]
    by_shard: dict[str, dict[str, int]] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for call_id in ids:
            pipe.hset(keys.call(call_id).call, CallField.DEADLINE, due_at)
            by_shard.setdefault(keys.due_for(call_id), {})[Due.watchdog(call_id)] = due_at
        for due, members in by_shard.items():
            pipe.zadd(due, members, xx=True, ch=True)  # xx: only the members the commits put there
        replies = await pipe.execute()
    changed = sum(int(n) for n in replies[len(ids) :])
    if changed != len(ids):
        raise RuntimeError(f"{changed} of {len(ids)} due members rescored: the schedule is not as filled")
    if await redis_ms(redis) >= due_at:  # type: ignore[arg-type]
        raise RuntimeError(f"lining up took longer than the {lead_ms} ms lead: raise LEAD_MS")
    return due_at


# --- the bots ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def command_usec(redis: Redis) -> tuple[Counter[str], Counter[str]]:
    """Calls and µs per command so far (``INFO commandstats``, server-wide)."""
    stats: dict[str, Any] = await redis.info("commandstats")
    calls = await command_stats(redis)
    usec = Counter({name.removeprefix("cmdstat_"): int(f["usec"]) for name, f in stats.items()})
    return calls, usec


def code_version() -> dict[str, Any]:
    """The commit the bots ran, and the product files changed from it in the work tree
    (the figures belong to that code, not to the commit alone)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.rstrip("\n")  # porcelain lines start with a space: keep it

    paths = ["app.py", "adapters", "orchestrator", "states"]
    changed = git("status", "--porcelain", "--", *paths).splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "changed": [line[3:] for line in changed if line]}


async def fired_by(bots: list[BotProcess], token: str) -> list[int | None]:
    """Each instance's ``cc_watchdogs_fired`` from its /metrics (None: unreadable)."""
    found: list[int | None] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for bot in bots:
            try:
                async with session.get(f"{bot.url}/metrics", headers=headers) as response:
                    match = _FIRED.search(await response.text())
                    found.append(int(float(match.group(1))) if match else None)
            except aiohttp.ClientError:
                found.append(None)
    return found


# --- reading the outcome -------------------------------------------------------------


def nearest_rank(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(percent / 100 * len(sorted_values)) - 1)]


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 4) if ordered else math.nan,
        **{f"p{p}": round(nearest_rank(ordered, p), 4) for p in (50, 90, 99)},
        "max": round(ordered[-1], 4) if ordered else math.nan,
    }


async def outcome(store: RedisCallStore, ids: list[str], due_at: int) -> dict[str, Any]:
    """What the records say: states, timeout steps per call, when each was committed, and
    what is still scheduled (a leftover delivery entry would be re-sent: a later repeat)."""
    redis, keys = store.redis, store.keys
    async with redis.pipeline(transaction=False) as pipe:
        for call_id in ids:
            pipe.hget(keys.call(call_id).call, CallField.STATE)
            pipe.lrange(keys.call(call_id).history, 0, -1)
        replies = await pipe.execute()
    states: Counter[str] = Counter()
    steps_per_call: Counter[int] = Counter()
    committed: dict[str, float] = {}  # call -> its timeout step's commit, seconds after T
    for call_id, state, entries in zip(ids, replies[::2], replies[1::2], strict=True):
        states[state or "missing"] += 1
        timeouts = [
            f["at"]  # the Redis time of the commit
            for f in map(decode_step, entries)
            if (f["from"], f["to"], f["reason"]) == (State.TRANSFERRING, State.FAILED, "timeout")
        ]
        steps_per_call[len(timeouts)] += 1
        for at_ms in timeouts:
            committed[call_id] = (at_ms - due_at) / 1000
    async with redis.pipeline(transaction=False) as pipe:
        for shard_key in sorted({keys.due_for(call_id) for call_id in ids}):
            pipe.zcard(shard_key)
        still_due = sum(int(n) for n in await pipe.execute())
    return {
        "states": dict(states),
        "timeout_steps_per_call": {str(k): v for k, v in sorted(steps_per_call.items())},
        "commit_lateness_s": spread(list(committed.values())),
        "committed": committed,
        "still_scheduled": still_due,
    }


# --- the run -------------------------------------------------------------------------


async def run(options: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    redis = Redis.from_url(options.redis_url, decode_responses=True, socket_timeout=60)
    store = RedisCallStore(redis, Keyspace(options.prefix), RETENTION)
    async for _ in redis.scan_iter(match=f"{glob_escape(options.prefix)}:*", count=10_000):
        await redis.aclose()
        raise SystemExit(f"prefix {options.prefix!r} already holds keys: pick another --prefix")
    info = await redis.info("server")
    load_before = os.getloadavg()[0]
    stand_in = await TimedStandIn().start("127.0.0.1")
    token = secrets.token_hex(16)
    env = {
        "REDIS_URL": options.redis_url,
        "REDIS_KEY_PREFIX": options.prefix,
        "CALL_IDLE_TTL_SECONDS": str(RETENTION.live_seconds),
        "CALL_RETENTION_SECONDS": str(RETENTION.ended_seconds),
        "OPERATOR_TOKEN": token,
        "LOG_LEVEL": "WARNING",
    }
    ids = [conversation_id(options.prefix, i) for i in range(options.calls)]
    bots: list[BotProcess] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-timers-"))
    report: dict[str, Any] = {
        "parameters": {
            "calls": options.calls,
            "instances": options.instances,
            "batch": options.batch,
            "prefix": options.prefix,
            "lead_ms": LEAD_MS,
            "scheduler_poll_seconds": float(os.environ.get("SCHEDULER_POLL_SECONDS", 0.2)),
        },
        "environment": {
            "redis_version": info.get("redis_version"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "started": timestamp(),
            "code": code_version(),
        },
    }
    try:
        fill_s = await fill(store, ids, reference_maker(stand_in.url), options.batch)
        report["fill"] = {"seconds": round(fill_s, 3), "calls_per_s": round(options.calls / fill_s, 1)}
        say(
            f"{options.calls:,} calls transferring ({options.calls / fill_s:,.0f}/s); "
            f"starting {options.instances} bots"
        )
        bots = [BotProcess(env, logs, f"bot-{n}") for n in range(options.instances)]
        await asyncio.gather(*(bot.start() for bot in bots))
        pids = [bot.proc.pid for bot in bots if bot.proc is not None]
        due_at = await line_up(store, ids, LEAD_MS)
        say(f"every watchdog due at T = {due_at} (Redis ms); waiting for the prompts")
        # CPU from just before T: what the bots spend idle-polling until then is left out.
        await asyncio.sleep(max(0.0, due_at / 1000 - time.time() - 0.05))
        cpu_before = [cpu_seconds(pid) for pid in pids]
        own_before, redis_before = cpu_seconds(os.getpid()), await redis_cpu(redis)
        commands_before = await command_usec(redis)
        within = 60 + options.calls / 50
        drained = True
        try:
            await stand_in.wait_for(options.calls, within=within)
        except TimeoutError:
            drained = False
        cpu_after = [cpu_seconds(pid) for pid in pids]
        own_after, redis_after = cpu_seconds(os.getpid()), await redis_cpu(redis)
        commands_after = await command_usec(redis)
        await asyncio.sleep(SETTLE_SECONDS)
        fired = await fired_by(bots, token)
        records = await outcome(store, ids, due_at)
        arrivals = [a["_arrived"] - due_at / 1000 for a in stand_in.activities]
        first_per_call: dict[str, float] = {}
        for activity in stand_in.activities:
            call = activity["_path_conversation"]
            first_per_call[call] = min(
                first_per_call.get(call, math.inf), activity["_arrived"] - due_at / 1000
            )
        lateness = list(first_per_call.values())
        committed: dict[str, float] = records.pop("committed")
        # Per call, from the commit of its timeout step to its prompt's arrival: the send.
        sending = [first_per_call[c] - committed[c] for c in committed.keys() & first_per_call.keys()]
        report["drain"] = {
            "drained": drained,
            "waited_s": within,
            "prompts_received": len(stand_in.activities),
            "calls_prompted": len(first_per_call),
            "unknown_calls_prompted": len(set(first_per_call) - set(ids)),
            "duplicates": stand_in.repeats(),
            "drain_s": round(max(arrivals), 4) if arrivals else math.nan,
            "lateness_s": spread(lateness),
            "commit_to_arrival_s": spread(sending),
            "watchdogs_per_s": round(len(first_per_call) / max(arrivals), 1) if arrivals else 0.0,
            # Prompts that arrived in each second after T: the drain rate as it went.
            "arrivals_per_second": [
                n for _, n in sorted(Counter(int(max(0.0, a)) for a in arrivals).items())
            ],
        }
        report["records"] = records
        report["instances"] = [
            {
                "pid": pid,
                "fired": n,
                "cpu_s": round(after - before, 2),
            }
            for pid, n, before, after in zip(pids, fired, cpu_before, cpu_after, strict=True)
        ]
        report["cpu_s"] = {
            "bots": round(sum(a - b for a, b in zip(cpu_after, cpu_before, strict=True)), 2),
            "redis": round(redis_after - redis_before, 2),
            "bench_and_stand_in": round(own_after - own_before, 2),
        }
        # Server-wide (other users of this Redis count too): calls and µs per command.
        calls_after, usec_after = commands_after
        calls_before, usec_before = commands_before
        report["redis_commands"] = {
            name: {
                "calls": calls_after[name] - calls_before[name],
                "usec": usec_after[name] - usec_before[name],
            }
            for name, _ in (usec_after - usec_before).most_common(12)
        }
        report["environment"]["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    finally:
        for bot in bots:
            bot.stop()
        for bot in bots:
            if bot.proc is not None and bot.proc.returncode not in (0, None, -15):
                say(f"{bot.log_path.name} exited {bot.proc.returncode}: {bot.log()[-2000:]}")
        with contextlib.suppress(Exception):
            await stand_in.stop()
        if not options.keep:
            report["deleted_keys"] = await delete_prefix(redis, options.prefix)
        await redis.aclose()
    report["checks"] = checks(report, options.calls)
    report["targets"] = {
        f"p99 lateness < {TARGET_P99_SECONDS:g} s": report["drain"]["lateness_s"]["p99"] < TARGET_P99_SECONDS
    }
    report["rows"] = rows(report)
    return report


def checks(report: dict[str, Any], calls: int) -> dict[str, bool]:
    """What must hold whatever the timings: every watchdog fired once, nothing twice."""
    drain, records = report["drain"], report["records"]
    fired = [i["fired"] for i in report["instances"]]
    return {
        "every_call_prompted": drain["drained"] and drain["calls_prompted"] == calls,
        "one_prompt_per_call": drain["prompts_received"] == calls and drain["unknown_calls_prompted"] == 0,
        "no_duplicates": drain["duplicates"] == 0,
        "every_call_failed": records["states"] == {State.FAILED.value: calls},
        "one_timeout_step_per_call": records["timeout_steps_per_call"] == {"1": calls},
        "nothing_left_scheduled": records["still_scheduled"] == 0,
        "instances_fired_add_up": None not in fired and sum(fired) == calls,
    }


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures, for bench/__main__ (medians over runs)."""
    drain, late = report["drain"], report["drain"]["lateness_s"]
    found: list[dict[str, Any]] = [
        row("timers drained", float(drain["calls_prompted"]), "timers"),
        row("drain s", float(drain["drain_s"]), "s"),
        row("lateness p50 s", float(late["p50"]), "s"),
        row("lateness p99 s", float(late["p99"]), "s"),
        row("lateness max s", float(late["max"]), "s"),
        row("duplicates", float(drain["duplicates"]), "activities"),
        {
            "name": "failed once",
            "value": float(report["records"]["timeout_steps_per_call"].get("1", 0)),
            "unit": "calls",
        },
        row("watchdogs per s", float(drain["watchdogs_per_s"]), "1/s"),
        row("bot CPU s", float(report["cpu_s"]["bots"]), "s"),
    ]
    for n, instance in enumerate(report["instances"]):
        found.append(row(f"fired by bot {n}", float(instance["fired"] or 0), "timers"))
    return found


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One run at 10,000 calls (``smoke``: 200) on two instances; the report, with ``rows``."""
    options = parse_args(["--redis-url", redis_url, "--calls", str(SMOKE_CALLS if smoke else 10_000)])
    return asyncio.run(run(options, say))


# --- output --------------------------------------------------------------------------


def show(report: dict[str, Any], console: Console) -> None:
    params, drain = report["parameters"], report["drain"]
    late, commit = drain["lateness_s"], report["records"]["commit_lateness_s"]
    table = Table(
        "",
        "min",
        "p50",
        "p90",
        "p99",
        "max",
        title=f"{params['calls']:,} watchdogs due at once, {params['instances']} instances (seconds after T)",
    )
    sending = drain["commit_to_arrival_s"]
    for name, figures in (
        ("timeout committed", commit),
        ("prompt arrived", late),
        ("commit to arrival", sending),
    ):
        table.add_row(name, *(f"{figures[k]:.3f}" for k in ("min", "p50", "p90", "p99", "max")))
    console.print(table)
    summary = Table("figure", "value", title="drain")
    summary.add_row("timers drained", f"{drain['calls_prompted']:,} of {params['calls']:,}")
    summary.add_row("drain (last arrival - T)", f"{drain['drain_s']:.3f} s")
    summary.add_row("watchdogs per second", f"{drain['watchdogs_per_s']:,.0f}")
    summary.add_row("duplicates", str(drain["duplicates"]))
    summary.add_row("records", ", ".join(f"{s}: {n:,}" for s, n in report["records"]["states"].items()))
    summary.add_row("left scheduled", str(report["records"]["still_scheduled"]))
    for n, instance in enumerate(report["instances"]):
        summary.add_row(
            f"bot {n} (pid {instance['pid']})", f"fired {instance['fired']}, CPU {instance['cpu_s']:.2f} s"
        )
    cpu = report["cpu_s"]
    summary.add_row(
        "CPU during the drain",
        f"bots {cpu['bots']:.2f} s, Redis {cpu['redis']:.2f} s, stand-in {cpu['bench_and_stand_in']:.2f} s",
    )
    summary.add_row(
        "fill", f"{report['fill']['seconds']:.1f} s ({report['fill']['calls_per_s']:,.0f} calls/s)"
    )
    console.print(summary)
    for name, ok in report["targets"].items():
        console.print(f"target {name}: {'[green]met[/green]' if ok else '[red]missed[/red]'}")
    bad = [name for name, ok in report["checks"].items() if not ok]
    console.print("[green]all checks pass[/green]" if not bad else f"[red]FAILED: {', '.join(bad)}[/red]")
    if "deleted_keys" in report:
        console.print(f"deleted {report['deleted_keys']:,} keys under {params['prefix']}:")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.timers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="watchdogs due at once")
    parser.add_argument("--instances", type=int, default=2, help="bot processes draining them")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="a single Redis (not a cluster)"
    )
    parser.add_argument("--prefix", default=unique_prefix("timers"), help="key prefix (must be unused)")
    parser.add_argument("--batch", type=int, default=1000, help="calls per pipelined batch while filling")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument("--keep", action="store_true", help="leave the keys in Redis (delete them yourself)")
    options = parser.parse_args(argv)
    if options.calls < 1 or options.instances < 1 or options.batch < 1:
        parser.error("--calls, --instances and --batch must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the tables, write the JSON; exit status 1 if a check failed."""
    options = parse_args(argv)
    console = Console()
    console.print(f"{options.calls:,} watchdogs under {options.prefix}: on {options.redis_url}")
    report = asyncio.run(run(options, console.print))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(report, console)
    console.print(f"figures in {options.json}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
