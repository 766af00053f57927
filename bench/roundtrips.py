"""Redis round trips and commands per turn, through the real app over HTTP.

Runs ``app.create_app`` in-process on a loopback port against the real Redis (its own
key prefix), with a ``ChannelStandIn`` as the activities' serviceUrl, and posts real
activities: per call a conversationUpdate, N ordinary messages, "talk to agent" (the
shipped flow's transfer phrase) and an endOfConversation. Per kind of turn it reports:

- client round trips (and replies) per turn: the store's client is made to build
  ``CountingConnection``s (``bench.wire.count_round_trips``), mean over every turn;
- server commands per turn, the commands run inside Lua scripts included (an EVALSHA
  and the commands its script ran): counted from MONITOR for the store's connections
  only (``bench.wire.ServerTap``), because ``INFO commandstats`` is server-wide and a
  shared Redis serves other clients meanwhile. The ``INFO commandstats`` deltas (median
  over windows of a few turns) are in the JSON too, with what an idle 200 ms window of
  it counted: they agree with MONITOR when that is 0.

The app's scheduler is stopped once started (its polls are background work, not turns;
one poll's cost is reported apart). Run again with two apps on the same Redis and
prefix, posts alternating between them, as behind a load balancer without affinity.

    .venv/bin/python -m bench.roundtrips [--redis-url URL] [--json PATH] [--smoke]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from adapters.http import SCHEDULER_KEY, STORE_KEY
from adapters.keys import Keyspace
from app import create_app
from bench.inspection import conversation_id, delete_prefix
from bench.report import main as bench_main
from bench.report import row, unique_prefix
from bench.wire import ServerTap, Wire, command_stats, count_round_trips
from orchestrator.callflow import SAMPLE_CALLFLOW, shipped_flow
from orchestrator.config import load_settings
from simulator.channel import Caller, ChannelStandIn

START, MESSAGE, TRANSFER, HANG_UP = "call start", "ordinary message", "transfer", "hang-up"
KINDS = (START, MESSAGE, TRANSFER, HANG_UP)
ORDINARY = ("my order has not arrived", "1", "what are your opening hours", "one")  # never a transfer
TRANSFER_TEXT = "talk to agent"  # the shipped flow's transfer phrase
SCHEDULER_TASK = "scheduler"  # the name app.py gives the scheduler's task


@dataclass(slots=True)
class Instance:
    """One in-process app on a loopback port."""

    app: web.Application
    runner: web.AppRunner
    url: str


@dataclass(slots=True)
class Window:
    """What ``turns`` turns of one kind cost."""

    turns: int
    round_trips: int
    replies: int
    commands: Counter[str] = field(default_factory=Counter)  # MONITOR: this bench's
    commandstats: Counter[str] = field(default_factory=Counter)  # INFO: everybody's


async def start_instance(redis_url: str, prefix: str) -> Instance:
    settings = load_settings(
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=prefix,
        CALLFLOW_FILE=shipped_flow(SAMPLE_CALLFLOW),  # what it counts: the how-to's echo and transfer
        SCHEDULER_POLL_SECONDS=10,
        OPERATOR_TOKEN=None,
        MicrosoftAppId="",
        MicrosoftAppPassword="",
    )
    app = create_app(settings)
    store_redis = app[STORE_KEY].redis
    if not isinstance(store_redis, Redis):
        raise SystemExit("round trips are counted on a single Redis: give a redis:// URL, not a cluster")
    count_round_trips(store_redis)  # before it connects: every connection it opens counts
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Instance(app, runner, f"http://127.0.0.1:{port}/api/messages")


def stop_schedulers() -> int:
    """Cancel the apps' scheduler tasks (this process's, all started by this bench)."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == SCHEDULER_TASK and not t.done()]
    for task in tasks:
        task.cancel()
    return len(tasks)


async def settle() -> None:
    """Wait until the store's connections are quiet (work a turn leaves behind its
    response, if any, is then counted with it)."""
    deadline = time.monotonic() + 1.0
    before = Wire.snapshot()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        now = Wire.snapshot()
        if now == before:
            return
        before = now


@dataclass(slots=True)
class Run:
    """Posts one variant's calls and measures each kind of turn."""

    session: aiohttp.ClientSession
    control: Redis
    tap: ServerTap
    instances: list[Instance]
    statuses: Counter[int] = field(default_factory=Counter)

    async def post(self, post_number: int, activity: dict[str, Any]) -> None:
        # Post k of every call goes to instance k % n: consecutive turns of a call never
        # meet the same app twice in a row when there are two.
        instance = self.instances[post_number % len(self.instances)]
        async with self.session.post(instance.url, json=activity) as response:
            await response.read()
            self.statuses[response.status] += 1

    async def window(self, posts: list[tuple[int, dict[str, Any]]]) -> Window:
        await settle()
        trips, replies = Wire.snapshot()
        before = await command_stats(self.control)
        await self.tap.mark()
        for number, activity in posts:
            await self.post(number, activity)
        await settle()
        commands = await self.tap.mark()
        after = await command_stats(self.control)
        trips_after, replies_after = Wire.snapshot()
        everybody = Counter({name: n - before[name] for name, n in after.items() if n > before[name]})
        return Window(len(posts), trips_after - trips, replies_after - replies, commands, everybody)

    async def calls(self, callers: list[Caller], messages: int, batch: int) -> dict[str, list[Window]]:
        """Every call through every kind of turn, kind by kind; windows of ``batch`` turns."""
        phases: dict[str, list[tuple[int, dict[str, Any]]]] = {
            START: [(0, c.start()) for c in callers],
            MESSAGE: [
                (1 + m, c.say(ORDINARY[(m + i) % len(ORDINARY)]))
                for m in range(messages)
                for i, c in enumerate(callers)
            ],
            TRANSFER: [(1 + messages, c.say(TRANSFER_TEXT)) for c in callers],
            HANG_UP: [(2 + messages, c.hang_up()) for c in callers],
        }
        return {
            kind: [await self.window(posts[lo : lo + batch]) for lo in range(0, len(posts), batch)]
            for kind, posts in phases.items()
        }


def per_turn(windows: list[Window]) -> dict[str, Any]:
    turns = sum(w.turns for w in windows)
    commands: Counter[str] = sum((w.commands for w in windows), Counter())
    names = sorted({name for w in windows for name in w.commandstats})
    stats = {
        name: round(statistics.median(w.commandstats[name] / w.turns for w in windows), 2) for name in names
    }
    return {
        "turns": turns,
        "round_trips_per_turn": round(sum(w.round_trips for w in windows) / turns, 3),
        "replies_per_turn": round(sum(w.replies for w in windows) / turns, 3),
        "commands_per_turn": round(commands.total() / turns, 3),
        "commands_by_name_per_turn": {name: round(n / turns, 3) for name, n in sorted(commands.items())},
        "commandstats_per_turn": round(
            statistics.median(w.commandstats.total() / w.turns for w in windows), 2
        ),
        "commandstats_by_name_per_turn": {name: n for name, n in stats.items() if n},
        "windows": len(windows),
    }


async def variant(
    redis_url: str, channel: ChannelStandIn, control: Redis, count: int, sizes: dict[str, int]
) -> dict[str, Any]:
    """One run with ``count`` app instances, under a prefix of its own."""
    prefix = unique_prefix("rt")
    keys = Keyspace(prefix)
    instances = [await start_instance(redis_url, prefix) for _ in range(count)]
    stopped = stop_schedulers()
    try:
        async with aiohttp.ClientSession() as session, ServerTap(control) as tap:
            run = Run(session, control, tap, instances)
            # Warm up (scripts loaded, connections opened): a call starting on each instance.
            warm = [Caller(channel.url, conversation_id(prefix, -1 - i)) for i in range(count)]
            for i, caller in enumerate(warm):
                await run.post(i, caller.start())
            for n, caller in enumerate(warm):
                for k, activity in enumerate((caller.say(ORDINARY[0]), caller.say(TRANSFER_TEXT))):
                    await run.post(n + 1 + k, activity)
                await run.post(n + 3, caller.hang_up())
            await settle()
            idle_before = await command_stats(control)
            await asyncio.sleep(0.2)
            idle = sum((await command_stats(control) - idle_before).values())

            callers = [Caller(channel.url, conversation_id(prefix, i)) for i in range(sizes["calls"])]
            windows = await run.calls(callers, sizes["messages"], sizes["batch"])

            # One scheduler poll, measured apart: background work, per instance.
            scheduler = instances[0].app[SCHEDULER_KEY]
            poll = await run_poll(control, tap, scheduler.poll)
            states = [await control.hget(keys.call(c.conversation_id).call, "state") for c in callers]
            replies = [len(channel.for_conversation(c.conversation_id)) for c in callers]
    finally:
        for instance in instances:
            await instance.runner.cleanup()
        deleted = await delete_prefix(control, prefix)
    kinds = {kind: per_turn(found) for kind, found in windows.items()}
    statuses = dict(run.statuses)
    return {
        "instances": count,
        "prefix": prefix,
        "schedulers_stopped": stopped,
        "kinds": kinds,
        "scheduler_poll": poll,
        "foreign_commands_in_idle_200ms": idle,
        "http_statuses": {str(k): v for k, v in statuses.items()},
        "checks": {
            "every_post_accepted": all(200 <= status < 300 for status in statuses),
            "every_call_ended": states == ["ended"] * len(callers),
            # welcome, one answer per message, the handoff.initiate; nothing for the hang-up
            "replies_per_call": replies == [sizes["messages"] + 2] * len(callers),
            "round_trips_counted": all(k["round_trips_per_turn"] > 0 for k in kinds.values()),
        },
        "deleted_keys": deleted,
    }


async def run_poll(control: Redis, tap: ServerTap, poll: Callable[[], Any]) -> dict[str, Any]:
    await settle()
    trips, replies = Wire.snapshot()
    await tap.mark()
    await poll()
    commands = await tap.mark()
    trips_after, replies_after = Wire.snapshot()
    return {
        "round_trips": trips_after - trips,
        "replies": replies_after - replies,
        "commands": commands.total(),
        "commands_by_name": dict(sorted(commands.items())),
    }


async def measure(redis_url: str, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    sizes = {"calls": 4, "messages": 2, "batch": 4} if smoke else {"calls": 60, "messages": 8, "batch": 15}
    control = Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    channel = await ChannelStandIn().start()
    try:
        info = await control.info("server")
        variants = []
        for count in (1, 2):
            say(f"{count} instance(s): {sizes['calls']} calls, {sizes['messages']} messages each")
            variants.append(await variant(redis_url, channel, control, count, sizes))
    finally:
        await channel.stop()
        await control.aclose()
    rows = []
    for v in variants:
        label = "1 instance" if v["instances"] == 1 else f"{v['instances']} instances"
        for kind in KINDS:
            figures = v["kinds"][kind]
            rows.append(
                row(f"{label}: {kind}: round trips/turn", figures["round_trips_per_turn"], "round trips")
            )
            rows.append(
                row(f"{label}: {kind}: Redis commands/turn", figures["commands_per_turn"], "commands")
            )
    poll = variants[0]["scheduler_poll"]
    rows.append(row("scheduler poll (background): round trips", poll["round_trips"], "round trips"))
    rows.append(row("scheduler poll (background): Redis commands", poll["commands"], "commands"))
    return {
        "bench": "roundtrips",
        "parameters": sizes | {"smoke": smoke},
        "redis_version": info.get("redis_version"),
        "variants": variants,
        "checks": {f"{v['instances']}x {name}": ok for v in variants for name, ok in v["checks"].items()},
        "rows": rows,
    }


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Round trips and server commands per kind of turn, with one app and with two."""
    return asyncio.run(measure(redis_url, smoke, say))


if __name__ == "__main__":
    sys.exit(bench_main("roundtrips", __doc__ or "", bench))
