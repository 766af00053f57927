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
that step was committed), each instance's ``cc_timers_fired``, and the CPU seconds
the bots, Redis and this process spent during the drain. Every key under the bench's
prefix is deleted and every bot stopped at the end.

Two variants, one after the other in the same run, each on fresh bots and keys of its
own (``<prefix>-http``, ``<prefix>-ws``), side by side in the report:

- ``http``: the calls' ``serviceUrl`` is the stand-in's; each prompt is an HTTP POST.
- ``socket``: the calls were started over streaming sockets (``simulator.streaming.
  SocketBots``, ``--sockets`` per instance, the calls spread over them in turn): each
  call's ``conversationUpdate`` and "agent" went over its socket to a real bot, so the
  bot instance behind that socket holds the call. Each prompt then goes over the call's
  socket: sent there by the holder when its own scheduler fires the watchdog, or routed
  through Redis (the holder's inbox) when the other instance's does. How many were sent
  each way is read from each bot's ``cc_streaming_sends{route=...}`` (``/metrics``,
  Bearer ``OPERATOR_TOKEN``) before T and after the drain: ``local``, ``routed`` (fired
  here, sent by the holder) and ``served`` (sent here for the other instance), with
  ``cc_streaming_send_failures``.

Both variants' bots run one flow: the default with a one-hour transfer timeout, so no
watchdog comes due while the socket variant's 2 x N turns are still being taken.

Lining the timers up: the fill takes seconds, so no one transfer timeout could make N
commits come due together. After the fill, one pipeline sets each call's ``deadline``
field and its member's score in its shard's due set to the same T (Redis time, ms, a
couple of seconds ahead). That is exactly the state ``commit.lua`` leaves after a
transfer started ``timeout_seconds`` before T: the watchdog turn fences on the record's
``deadline`` (``0 < deadline <= claim time``), never on when the transfer began.

    .venv/bin/python -m bench.timers [--calls 10000] [--instances 2] [--transport http socket]
                                     [--sockets 4] [--redis-url URL] [--json PATH] [--smoke]
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
import yaml
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount
from prometheus_client.parser import text_string_to_metric_families
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
from simulator.channel import Caller, ChannelStandIn
from simulator.streaming import SERVICE_URL, SocketBots
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
HTTP, SOCKET = "http", "socket"
TRANSPORTS = (HTTP, SOCKET)
SUFFIX = {HTTP: "-http", SOCKET: "-ws"}  # each variant's keys: <prefix><suffix>:...
PREFIX_MAX = 32 - max(len(s) for s in SUFFIX.values())  # REDIS_KEY_PREFIX allows 32
TRANSFER_TIMEOUT_SECONDS = 3600  # the flow's longest: nothing comes due before the line-up
SOCKETS_PER_INSTANCE = 4
FILL_IN_FLIGHT = 64  # calls being started over the sockets at once


# --- the channel ---------------------------------------------------------------------


class TimedStandIn(ChannelStandIn):
    """The stand-in, stamping each activity with when this process took it: a POST's body
    read, or a socket request read (both reach ``take``)."""

    async def take(self, conversation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        arrived = time.time()
        status, answer = await super().take(conversation, body)
        if status == 200:
            # The super call appended it and returned without yielding: it is the last one.
            self.activities[-1]["_arrived"] = arrived
        return status, answer


class FillStandIn(ChannelStandIn):
    """Where the socket variant's start-up replies go: counted, and the transfers apart;
    ``transferred`` is set once ``expected`` transfers came."""

    def __init__(self, expected: int) -> None:
        super().__init__(record=False)
        self.expected = expected
        self.transfers = 0
        self.transferred = asyncio.Event()

    async def take(self, conversation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if b'"handoff.initiate"' in body:
            self.transfers += 1
            if self.transfers >= self.expected:
                self.transferred.set()
        return await super().take(conversation, body)


def flow_file(directory: Path) -> Path:
    """The default call flow with the longest transfer timeout, for the bots and the fill."""
    data = yaml.safe_load(
        (ROOT / "orchestrator" / "flows" / "transfer-sample.yaml").read_text(encoding="utf-8")
    )
    data["queues"]["agents"]["timeout_seconds"] = TRANSFER_TIMEOUT_SECONDS
    path = directory / "callflow.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


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


async def fill(
    store: RedisCallStore, ids: list[str], reference: Callable[[str], str], batch: int, flow: Path
) -> float:
    """Every call started and transferred (two real turns, the second arms the watchdog),
    committed by commit.lua, a batch of calls per pipelined round trip. Seconds taken."""
    runner = TurnRunner(load_callflow(flow), RETENTION.transcript_max)
    began = time.perf_counter()
    for lo in range(0, len(ids), batch):
        calls = [Call(id=call_id) for call_id in ids[lo : lo + batch]]
        events: list[Event] = [CallStarted(), CallerInput("agent")]
        for wave, event in enumerate(events):
            turns = [runner.run(call, event, now=timestamp(), reference=reference(call.id)) for call in calls]
            now_s = int(time.time())
            replies = await store.run_each(
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


async def fill_over_sockets(
    sockets: SocketBots, channel: FillStandIn, store: RedisCallStore, ids: list[str]
) -> float:
    """Every call started and transferred by the bots, over the streaming sockets: the
    channel's ``conversationUpdate``, then the caller saying "agent" (the watchdog armed),
    ``FILL_IN_FLIGHT`` calls at a time. The bot behind each call's socket now holds it.
    Seconds taken, once every call's ``handoff.initiate`` has come back."""
    pending = iter(ids)
    began = time.perf_counter()

    async def starter() -> None:
        for call_id in pending:  # shared by the starters: each call taken once
            caller = Caller(SERVICE_URL, call_id)
            for activity in (caller.start(), caller.say("agent")):
                status = await sockets.post(activity)
                if not 200 <= status < 300:
                    raise RuntimeError(f"call {call_id}: the bot answered {status}: {sockets.last_error}")

    await asyncio.gather(*(starter() for _ in range(min(FILL_IN_FLIGHT, len(ids)))))
    try:  # sent in the turns, so normally all in already
        await asyncio.wait_for(channel.transferred.wait(), 30)
    except TimeoutError:
        raise RuntimeError(
            f"{channel.transfers} of {len(ids)} transfers came back over the sockets"
        ) from None
    seconds = time.perf_counter() - began
    async with store.redis.pipeline(transaction=False) as pipe:
        for call_id in ids:
            pipe.hget(store.keys.call(call_id).call, CallField.STATE)
        states = Counter(await pipe.execute())
    if states != {State.TRANSFERRING.value: len(ids)}:
        raise RuntimeError(f"the calls started over the sockets are not all transferring: {dict(states)}")
    return seconds


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
            by_shard.setdefault(keys.due_for(call_id), {})[Due.timer(call_id)] = due_at
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


Samples = dict[str, dict[str, float]]  # metric -> label value ("" unlabelled) -> value
COUNTERS = ("cc_timers_fired", "cc_streaming_sends", "cc_streaming_send_failures")
GAUGES = ("cc_streaming_connections", "cc_streaming_calls")


def samples(text: str) -> Samples:
    """The counters and gauges the bench reads, from a /metrics text."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        wanted = f"{family.name}_total" if family.name in COUNTERS else family.name
        if family.name not in COUNTERS + GAUGES:
            continue
        for sample in family.samples:
            if sample.name == wanted:
                label = next(iter(sample.labels.values()), "")
                found.setdefault(family.name, {})[label] = sample.value
    return found


async def metrics_of(bots: list[BotProcess], token: str) -> list[Samples | None]:
    """Each instance's figures from its /metrics (None: unreadable)."""
    found: list[Samples | None] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for bot in bots:
            try:
                async with session.get(f"{bot.url}/metrics", headers=headers) as response:
                    found.append(samples(await response.text()) if response.status == 200 else None)
            except aiohttp.ClientError:
                found.append(None)
    return found


def counted(after: Samples | None, before: Samples | None, name: str) -> dict[str, int] | None:
    """What one counter grew by between two readings, per label value (None: unreadable)."""
    if after is None or before is None:
        return None
    was = before.get(name, {})
    return {label: int(value - was.get(label, 0)) for label, value in sorted(after.get(name, {}).items())}


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
    what is still scheduled (a leftover outbox entry would be re-sent: a later repeat)."""
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


def variant_prefix(prefix: str, transport: str) -> str:
    return f"{prefix}{SUFFIX[transport]}"


async def run(options: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Each variant asked for, one after the other; the report has both side by side."""
    redis = Redis.from_url(options.redis_url, decode_responses=True, socket_timeout=60)
    try:
        for transport in options.transport:
            prefix = variant_prefix(options.prefix, transport)
            async for _ in redis.scan_iter(match=f"{glob_escape(prefix)}:*", count=10_000):
                raise SystemExit(f"prefix {prefix!r} already holds keys: pick another --prefix")
        info = await redis.info("server")
        report: dict[str, Any] = {
            "parameters": {
                "calls": options.calls,
                "instances": options.instances,
                "transports": list(options.transport),
                "sockets_per_instance": options.sockets,
                "batch": options.batch,
                "prefix": options.prefix,
                "lead_ms": LEAD_MS,
                "transfer_timeout_seconds": TRANSFER_TIMEOUT_SECONDS,
                "scheduler_poll_seconds": float(os.environ.get("SCHEDULER_POLL_SECONDS", 0.2)),
            },
            "environment": {
                "redis_version": info.get("redis_version"),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "started": timestamp(),
                "code": code_version(),
            },
            "variants": {},
        }
        for transport in options.transport:
            say(f"[bold]{transport}[/bold]: {options.calls:,} watchdogs, {options.instances} instances")
            report["variants"][transport] = await run_variant(options, transport, redis, say)
    finally:
        await redis.aclose()
    variants = report["variants"]
    report["checks"] = {
        f"{transport}: {name}": ok for transport, v in variants.items() for name, ok in v["checks"].items()
    }
    report["targets"] = {
        f"{transport}: p99 lateness < {TARGET_P99_SECONDS:g} s": v["drain"]["lateness_s"]["p99"]
        < TARGET_P99_SECONDS
        for transport, v in variants.items()
    }
    report["rows"] = rows(report)
    return report


async def run_variant(
    options: argparse.Namespace, transport: str, redis: Redis, say: Callable[[str], None]
) -> dict[str, Any]:
    """One variant on bots and keys of its own: fill, line up, drain, read, clean up."""
    prefix = variant_prefix(options.prefix, transport)
    store = RedisCallStore(redis, Keyspace(prefix), RETENTION)
    load_before = os.getloadavg()[0]
    stand_in = TimedStandIn()
    if transport == HTTP:  # over sockets the prompts reach it on the sockets only
        await stand_in.start("127.0.0.1")
    token = secrets.token_hex(16)
    logs = Path(tempfile.mkdtemp(prefix=f"bench-timers-{transport}-"))
    flow = flow_file(logs)
    env = {
        "REDIS_URL": options.redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "CALL_IDLE_TTL_SECONDS": str(RETENTION.live_seconds),
        "CALL_RETENTION_SECONDS": str(RETENTION.ended_seconds),
        "CALLFLOW_FILE": str(flow),
        "OPERATOR_TOKEN": token,
        "LOG_LEVEL": "WARNING",
    }
    ids = [conversation_id(prefix, i) for i in range(options.calls)]
    bots: list[BotProcess] = []
    session: aiohttp.ClientSession | None = None
    sockets: SocketBots | None = None
    variant: dict[str, Any] = {"transport": transport, "prefix": prefix, "logs": str(logs)}
    try:
        if transport == HTTP:
            fill_s = await fill(store, ids, reference_maker(stand_in.url), options.batch, flow)
            say(f"{options.calls:,} calls transferring ({options.calls / fill_s:,.0f}/s); starting the bots")
            bots = [BotProcess(env, logs, f"bot-{n}") for n in range(options.instances)]
            await asyncio.gather(*(bot.start() for bot in bots))
        else:
            bots = [BotProcess(env, logs, f"bot-{n}") for n in range(options.instances)]
            await asyncio.gather(*(bot.start() for bot in bots))
            # No pool limit: the sockets, and nothing else, go through this session.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            fill_channel = FillStandIn(len(ids))
            sockets = SocketBots([bot.url for bot in bots], session, fill_channel, sockets=options.sockets)
            fill_s = await fill_over_sockets(sockets, fill_channel, store, ids)
            sockets.channel = stand_in  # from now on what the bots send is timed
            say(
                f"{options.calls:,} calls started and transferring over {len(sockets.sockets)} sockets "
                f"({options.calls / fill_s:,.0f}/s)"
            )
            variant["fill_replies"] = fill_channel.received
            variant["fill_reconnects"] = sockets.reconnects
        variant["fill"] = {"seconds": round(fill_s, 3), "calls_per_s": round(options.calls / fill_s, 1)}
        pids = [bot.proc.pid for bot in bots if bot.proc is not None]
        metrics_before = await metrics_of(bots, token)
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
        metrics_after = await metrics_of(bots, token)
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
        variant["drain"] = {
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
        variant["records"] = records
        variant["instances"] = []
        for pid, before, after, cpu_was, cpu_is in zip(
            pids, metrics_before, metrics_after, cpu_before, cpu_after, strict=True
        ):
            fired = counted(after, before, "cc_timers_fired")
            variant["instances"].append(
                {
                    "pid": pid,
                    "fired": None if fired is None else fired.get("", 0),
                    "cpu_s": round(cpu_is - cpu_was, 2),
                    # What went over streaming sockets from T to the end of the drain.
                    "sends": counted(after, before, "cc_streaming_sends"),
                    "send_failures": counted(after, before, "cc_streaming_send_failures"),
                    "calls_held": None
                    if after is None
                    else int(after.get("cc_streaming_calls", {}).get("", 0)),
                }
            )
        variant["sends"] = {
            route: sum((i["sends"] or {}).get(route, 0) for i in variant["instances"])
            for route in ("local", "routed", "served")
        }
        failures: Counter[str] = Counter()
        for instance in variant["instances"]:
            failures.update(instance["send_failures"] or {})
        variant["send_failures"] = dict(failures)
        variant["cpu_s"] = {
            "bots": round(sum(a - b for a, b in zip(cpu_after, cpu_before, strict=True)), 2),
            "redis": round(redis_after - redis_before, 2),
            "bench_and_stand_in": round(own_after - own_before, 2),
        }
        # Server-wide (other users of this Redis count too): calls and µs per command.
        calls_after, usec_after = commands_after
        calls_before, usec_before = commands_before
        variant["redis_commands"] = {
            name: {
                "calls": calls_after[name] - calls_before[name],
                "usec": usec_after[name] - usec_before[name],
            }
            for name, _ in (usec_after - usec_before).most_common(12)
        }
        variant["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    finally:
        if sockets is not None:
            with contextlib.suppress(Exception):
                await sockets.close()
        if session is not None:
            await session.close()
        for bot in bots:
            bot.stop()
        for bot in bots:
            if bot.proc is not None and bot.proc.returncode not in (0, None, -15):
                say(f"{bot.log_path.name} exited {bot.proc.returncode}: {bot.log()[-2000:]}")
        with contextlib.suppress(Exception):
            await stand_in.stop()
        if not options.keep:
            variant["deleted_keys"] = await delete_prefix(redis, prefix)
    variant["checks"] = checks(variant, options.calls, transport)
    return variant


def checks(variant: dict[str, Any], calls: int, transport: str) -> dict[str, bool]:
    """What must hold whatever the timings: every watchdog fired once, nothing twice; over
    sockets, every prompt went over one (local or routed), and every routed one was served."""
    drain, records = variant["drain"], variant["records"]
    fired = [i["fired"] for i in variant["instances"]]
    found = {
        "every_call_prompted": drain["drained"] and drain["calls_prompted"] == calls,
        "one_prompt_per_call": drain["prompts_received"] == calls and drain["unknown_calls_prompted"] == 0,
        "no_duplicates": drain["duplicates"] == 0,
        "every_call_failed": records["states"] == {State.FAILED.value: calls},
        "one_timeout_step_per_call": records["timeout_steps_per_call"] == {"1": calls},
        "nothing_left_scheduled": records["still_scheduled"] == 0,
        "instances_fired_add_up": None not in fired and sum(fired) == calls,
    }
    if transport == SOCKET:
        sends = variant["sends"]
        found["metrics_read"] = all(i["sends"] is not None for i in variant["instances"])
        found["every_prompt_over_a_socket"] = sends["local"] + sends["routed"] >= calls
        found["routed_sends_served"] = sends["served"] == sends["routed"]
    return found


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures, for bench/__main__ (medians over runs): the HTTP variant's
    under their names of old, the socket variant's after ``socket ``."""
    found: list[dict[str, Any]] = []
    for transport, variant in report["variants"].items():
        first = "" if transport == HTTP else f"{transport} "
        drain, late = variant["drain"], variant["drain"]["lateness_s"]
        found += [
            row(f"{first}timers drained", float(drain["calls_prompted"]), "timers"),
            row(f"{first}drain s", float(drain["drain_s"]), "s"),
            row(f"{first}lateness p50 s", float(late["p50"]), "s"),
            row(f"{first}lateness p99 s", float(late["p99"]), "s"),
            row(f"{first}lateness max s", float(late["max"]), "s"),
            row(f"{first}duplicates", float(drain["duplicates"]), "activities"),
            row(
                f"{first}failed once",
                float(variant["records"]["timeout_steps_per_call"].get("1", 0)),
                "calls",
            ),
            row(f"{first}watchdogs per s", float(drain["watchdogs_per_s"]), "1/s"),
            row(f"{first}bot CPU s", float(variant["cpu_s"]["bots"]), "s"),
        ]
        for n, instance in enumerate(variant["instances"]):
            found.append(row(f"{first}fired by bot {n}", float(instance["fired"] or 0), "timers"))
        if transport == SOCKET:
            for route, n in variant["sends"].items():
                found.append(row(f"{first}sends {route}", float(n), "sends"))
            found.append(row(f"{first}send failures", float(sum(variant["send_failures"].values())), "sends"))
    return found


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One run of each variant at 10,000 calls (``smoke``: 200) on two instances; the
    report, with ``rows``."""
    options = parse_args(["--redis-url", redis_url, "--calls", str(SMOKE_CALLS if smoke else 10_000)])
    return asyncio.run(run(options, say))


# --- output --------------------------------------------------------------------------


def _s(value: float) -> str:
    return f"{value:.3f}"


def show(report: dict[str, Any], console: Console) -> None:
    params, variants = report["parameters"], report["variants"]
    names = list(variants)
    each = [variants[name] for name in names]
    title = (
        f"{params['calls']:,} watchdogs due at once, {params['instances']} instances: "
        f"{' and '.join(names)} side by side (seconds after T unless said)"
    )
    table = Table("figure", *names, title=title)

    def add(name: str, cells: list[str], end: bool = False) -> None:
        table.add_row(name, *cells, end_section=end)

    add("timers drained", [f"{v['drain']['calls_prompted']:,} of {params['calls']:,}" for v in each])
    add("drain (last arrival - T)", [_s(v["drain"]["drain_s"]) for v in each])
    for p in ("min", "p50", "p90", "p99", "max"):
        add(f"prompt arrived {p}", [_s(v["drain"]["lateness_s"][p]) for v in each], end=p == "max")
    for p in ("p50", "p99"):
        add(f"timeout committed {p}", [_s(v["records"]["commit_lateness_s"][p]) for v in each])
    for p in ("p50", "p99"):
        add(
            f"commit to arrival {p}", [_s(v["drain"]["commit_to_arrival_s"][p]) for v in each], end=p == "p99"
        )
    add("watchdogs per second", [f"{v['drain']['watchdogs_per_s']:,.0f}" for v in each])
    add("duplicates", [str(v["drain"]["duplicates"]) for v in each])
    add("records", [", ".join(f"{s}: {n:,}" for s, n in v["records"]["states"].items()) for v in each])
    add("left scheduled", [str(v["records"]["still_scheduled"]) for v in each], end=True)
    for n in range(params["instances"]):
        add(
            f"bot {n}: fired, CPU s",
            [f"{v['instances'][n]['fired']}, {v['instances'][n]['cpu_s']:.2f}" for v in each],
        )
    add(
        "socket sends: local / routed / served",
        [" / ".join(f"{v['sends'][r]:,}" for r in ("local", "routed", "served")) for v in each],
    )
    for n in range(params["instances"]):
        add(f"bot {n}: sends, calls held", [_sends(v["instances"][n]) for v in each])
    add(
        "socket send failures",
        [", ".join(f"{k}: {n}" for k, n in v["send_failures"].items() if n) or "0" for v in each],
        end=True,
    )
    add(
        "CPU s: bots / Redis / bench",
        [" / ".join(f"{v['cpu_s'][k]:.2f}" for k in ("bots", "redis", "bench_and_stand_in")) for v in each],
    )
    add("fill", [f"{v['fill']['seconds']:.1f} s ({v['fill']['calls_per_s']:,.0f} calls/s)" for v in each])
    add("load average (1 min): before, after", [str(v["load_average_1m"]) for v in each])
    console.print(table)
    for name, ok in report["targets"].items():
        console.print(f"target {name}: {'[green]met[/green]' if ok else '[red]missed[/red]'}")
    bad = [name for name, ok in report["checks"].items() if not ok]
    console.print("[green]all checks pass[/green]" if not bad else f"[red]FAILED: {', '.join(bad)}[/red]")
    for variant in each:
        if "deleted_keys" in variant:
            console.print(f"deleted {variant['deleted_keys']:,} keys under {variant['prefix']}:")


def _sends(instance: dict[str, Any]) -> str:
    sends = instance["sends"]
    if sends is None:
        return "unreadable"
    shown = ", ".join(f"{route} {n:,}" for route, n in sends.items() if n) or "0"
    return f"{shown}; {instance['calls_held']:,} held"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.timers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="watchdogs due at once")
    parser.add_argument("--instances", type=int, default=2, help="bot processes draining them")
    parser.add_argument(
        "--transport",
        nargs="+",
        choices=TRANSPORTS,
        default=list(TRANSPORTS),
        help="the variants, run in this order (both)",
    )
    parser.add_argument(
        "--sockets",
        type=int,
        default=SOCKETS_PER_INSTANCE,
        help=f"streaming sockets to each instance, socket variant ({SOCKETS_PER_INSTANCE})",
    )
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="a single Redis (not a cluster)"
    )
    parser.add_argument(
        "--prefix",
        default=unique_prefix("timers"),
        help=f"key prefix (must be unused; each variant adds {' or '.join(SUFFIX.values())})",
    )
    parser.add_argument("--batch", type=int, default=1000, help="calls per pipelined batch while filling")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument("--keep", action="store_true", help="leave the keys in Redis (delete them yourself)")
    parser.add_argument(
        "--smoke", action="store_true", help=f"the tests' size: {SMOKE_CALLS} calls (unless --calls is given)"
    )
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(calls=SMOKE_CALLS)
    options = parser.parse_args(argv)
    if options.calls < 1 or options.instances < 1 or options.batch < 1 or options.sockets < 1:
        parser.error("--calls, --instances, --batch and --sockets must be at least 1")
    if not re.fullmatch(rf"[A-Za-z0-9_.-]{{1,{PREFIX_MAX}}}", options.prefix):
        parser.error(f"--prefix: 1 to {PREFIX_MAX} of A-Z a-z 0-9 _ . - (REDIS_KEY_PREFIX, with a suffix)")
    options.transport = list(dict.fromkeys(options.transport))  # each variant once
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the tables, write the JSON; exit status 1 if a check failed."""
    options = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: the table's natural width, not 80 columns
        console = Console(width=140)
    console.print(f"{options.calls:,} watchdogs under {options.prefix}-*: on {options.redis_url}")
    report = asyncio.run(run(options, console.print))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(report, console)
    console.print(f"figures in {options.json}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
