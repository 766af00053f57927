"""Turns: throughput and latency of the orchestrator's ordinary turn, beside a stock
botbuilder echo bot (``bench.echo_bot``) in the same run, and scale-out to two instances.

A closed loop: ``c`` simulated calls, each posting one message activity at a time (the
next only once the previous post is answered) to the bots' ``/api/messages``, for a
fixed time after a warm-up. The bots run as their own processes (``python app.py`` on
the real Redis, ``python -m bench.echo_bot``); this process is the channel: one pooled
aiohttp session posts, and a ``ChannelStandIn`` that only counts receives the replies at
the activities' ``serviceUrl``. Each orchestrator call starts with a ``conversationUpdate``
and then says something no route matches, so every measured turn is an ordinary bot turn
with one spoken reply. Per point: turns/s, latency p50/p99 (post sent to answer read,
nearest-rank), CPU per turn of the bot processes (``/proc/<pid>/stat``), of this driver
and of Redis (shared: other clients count too), errors (non-2xx, failed posts), and the
replies the stand-in received (one per turn: checked). Every key under the run's own
prefix is deleted at the end.

    .venv/bin/python -m bench.turns [--seconds 5] [--concurrency 1 8 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from bench.inspection import delete_prefix, glob_escape
from orchestrator.call import timestamp
from simulator.channel import Caller, ChannelStandIn
from simulator.load import percentile
from tests.process import free_port

ROOT = Path(__file__).parents[1]
DEFAULT_JSON = Path(__file__).parent / "results" / "turns.json"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_SECONDS, DEFAULT_WARMUP = 5.0, 1.0
SMOKE_SECONDS, SMOKE_WARMUP, SMOKE_CONCURRENCY = 0.5, 0.2, (1, 4)  # the test suite's size
TEXT = "what are your opening hours"  # no route matches: the fallback prompt, one reply
ORCHESTRATOR, ECHO = "orchestrator", "echo"
SETTLE_SECONDS = 10.0  # how long replies may trail the last answered post
# Settings a caller's environment might hold that would change what is measured.
UNSET = (
    *("MicrosoftAppId", "MicrosoftAppPassword", "MicrosoftAppType", "MicrosoftAppTenantId"),
    *("REDIS_CLUSTER", "CALLFLOW_FILE", "OPERATOR_TOKEN"),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the bot processes ---------------------------------------------------------------


@dataclass
class Server:
    """One bot process on a free loopback port; stopped by its own pid only."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    ready_path: str  # answered 200 once the bot can take turns (any answer if not "/readyz")
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    async def start(self, session: aiohttp.ClientSession, within: float = 30) -> Server:
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        env.update(self.env, HOST="127.0.0.1", PORT=str(self.port), LOG_LEVEL="WARNING")
        argv = [arg.replace("{port}", str(self.port)) for arg in self.argv]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block
                [sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        async with asyncio.timeout(within):
            while True:
                self.check()
                try:
                    async with session.get(f"{self.url}{self.ready_path}") as response:
                        if response.status == 200 or self.ready_path != "/readyz":
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    def check(self) -> None:
        """Raise, with the end of its log, if the process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.name} is not running:\n{log}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far (all its threads)."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def stop(self) -> None:
        """Terminate, then kill after 10 s: only this process, by its pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def orchestrator(name: str, redis_url: str, prefix: str, log_dir: Path) -> Server:
    env = {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix}
    return Server(name, ["app.py"], env, log_dir, "/readyz")


def echo_bot(log_dir: Path) -> Server:
    argv = ["-m", "bench.echo_bot", "--host", "127.0.0.1", "--port", "{port}"]
    return Server(ECHO, argv, {}, log_dir, "/api/messages")  # GET: 405 once it listens


def machine_busy_seconds() -> float:
    """CPU seconds every core spent not idle so far (``/proc/stat``): on a shared machine,
    whether a point had a free core is part of reading it."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest time is inside user


# --- one measured point --------------------------------------------------------------


@dataclass
class Tally:
    """What one phase of posts did."""

    ok: int = 0  # posts answered 2xx: each owes one reply
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, measured phase only


@dataclass
class Point:
    """One bot (one or more instances) at one concurrency: the figures of the measured phase."""

    bot: str
    instances: int
    concurrency: int
    turns: int  # measured posts answered 2xx
    seconds: float  # first post sent to last answer read
    turns_per_s: float
    latency_ms: dict[str, float | None]  # p50, p99, max
    cpu_ms_per_turn: float  # the bot processes, summed
    bot_cores: float  # the bot processes' CPU seconds per second: 1.0 is one core saturated
    machine_cores: float  # every process's (others' too): how busy the machine was
    driver_cpu_ms_per_turn: float  # this process: posting, and the stand-in receiving
    redis_cpu_ms_per_turn: float  # the whole server, whoever else uses it
    errors: dict[str, int]  # measured phase
    replies: int  # activities the stand-in received for the measured turns
    setup_posts: int  # call starts and warm-up turns answered 2xx
    setup_errors: dict[str, int]
    setup_replies: int

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and not self.setup_errors
            and self.replies == self.turns
            and self.setup_replies == self.setup_posts
        )


class Driver:
    """The channel side of every point: one pooled session, one counting stand-in."""

    def __init__(self, session: aiohttp.ClientSession, channel: ChannelStandIn, redis: Redis) -> None:
        self.session = session
        self.channel = channel
        self.redis = redis
        self.run_id = uuid.uuid4().hex[:8]
        self.points = itertools.count(1)

    async def post(self, url: str, activity: dict[str, Any], tally: Tally, timed: bool) -> None:
        body = json.dumps(activity).encode()
        began = time.perf_counter()
        try:
            async with self.session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            tally.errors[type(e).__name__] += 1
            await asyncio.sleep(0.01)  # a bot that is down must not turn the loop into a spin
            return
        if timed:
            tally.latencies.append(time.perf_counter() - began)
        if 200 <= status < 300:
            tally.ok += 1
        else:
            tally.errors[f"HTTP {status}"] += 1

    async def loop(
        self, caller: Caller, urls: Iterator[str], until: float, tally: Tally, timed: bool
    ) -> float:
        """One call, one message at a time, until ``until``; returns when its last answer came."""
        while time.perf_counter() < until:
            await self.post(next(urls), caller.say(TEXT), tally, timed)
        return time.perf_counter()

    async def settle(self, expected: int) -> int:
        """The replies received once ``expected`` arrived (or ``SETTLE_SECONDS`` passed)."""
        with contextlib.suppress(TimeoutError):  # a shortfall shows in the figures and fails the check
            await self.channel.wait_for(expected, within=SETTLE_SECONDS)
        return self.channel.received

    async def redis_cpu(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def point(
        self, bot: str, servers: Sequence[Server], concurrency: int, seconds: float, warmup: float
    ) -> Point:
        """Start the calls (orchestrator), warm up, let replies settle, then measure."""
        urls = itertools.cycle([f"{s.url}/api/messages" for s in servers])  # round-robin, no stickiness
        # Fresh calls every point: a reused activity id is a redelivery, answered with no reply.
        tag = f"{self.run_id}-{next(self.points)}-{bot}-{len(servers)}x{concurrency}"
        callers = [Caller(self.channel.url, f"{tag}-{i}") for i in range(concurrency)]
        base = self.channel.received
        setup = Tally()
        if bot == ORCHESTRATOR:
            await asyncio.gather(*(self.post(next(urls), c.start(), setup, False) for c in callers))
        until = time.perf_counter() + warmup
        await asyncio.gather(*(self.loop(c, urls, until, setup, False) for c in callers))
        before = await self.settle(base + setup.ok)

        cpu = sum(s.cpu_seconds() for s in servers)
        machine = machine_busy_seconds()
        driver_cpu = time.process_time()
        redis_cpu = await self.redis_cpu()
        measured = Tally()
        began = time.perf_counter()
        until = began + seconds
        ended = max(await asyncio.gather(*(self.loop(c, urls, until, measured, True) for c in callers)))
        after = await self.settle(before + measured.ok)
        cpu = sum(s.cpu_seconds() for s in servers) - cpu
        machine = machine_busy_seconds() - machine
        driver_cpu = time.process_time() - driver_cpu
        redis_cpu = await self.redis_cpu() - redis_cpu
        for server in servers:
            server.check()

        turns, elapsed = measured.ok, ended - began
        per_turn = 1000 / max(turns, 1)
        figures = {f"p{p}": percentile(measured.latencies, p) for p in (50, 99)}
        figures["max"] = max(measured.latencies, default=None)
        return Point(
            bot=bot,
            instances=len(servers),
            concurrency=concurrency,
            turns=turns,
            seconds=round(elapsed, 3),
            turns_per_s=round(turns / elapsed, 1),
            latency_ms={k: None if v is None else round(v * 1000, 2) for k, v in figures.items()},
            cpu_ms_per_turn=round(cpu * per_turn, 3),
            bot_cores=round(cpu / elapsed, 2),
            machine_cores=round(machine / elapsed, 2),
            driver_cpu_ms_per_turn=round(driver_cpu * per_turn, 3),
            redis_cpu_ms_per_turn=round(redis_cpu * per_turn, 3),
            errors=dict(measured.errors),
            replies=after - before,
            setup_posts=setup.ok,
            setup_errors=dict(setup.errors),
            setup_replies=before - base,
        )


# --- the run -------------------------------------------------------------------------


def git_commit() -> str:
    """The commit measured, marked ``+dirty`` when the tree has changes (the bot's hot path
    is being rewritten: figures belong to a version)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return head + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures, one per row, for taking medians over runs."""
    out: list[dict[str, Any]] = []

    def row(name: str, value: float | None, unit: str) -> None:
        if value is not None:
            out.append({"name": name, "value": float(value), "unit": unit})

    for c, pair in report["points"].items():
        for bot in (ECHO, ORCHESTRATOR):
            p = pair[bot]
            row(f"turns/s {bot} c={c}", p["turns_per_s"], "turns/s")
            row(f"p50 ms {bot} c={c}", p["latency_ms"]["p50"], "ms")
            row(f"p99 ms {bot} c={c}", p["latency_ms"]["p99"], "ms")
            row(f"cpu ms/turn {bot} c={c}", p["cpu_ms_per_turn"], "ms")
            row(f"cores {bot} c={c}", p["bot_cores"], "cores")
        row(f"ratio orchestrator/echo c={c}", pair["ratio"], "x")
        row(f"redis cpu ms/turn orchestrator c={c}", pair[ORCHESTRATOR]["redis_cpu_ms_per_turn"], "ms")
    scale = report["scale_out"]
    for n, key in ((1, "one"), (2, "two")):
        row(
            f"turns/s orchestrator {n} instance(s) c={scale['concurrency']}",
            scale[key]["turns_per_s"],
            "turns/s",
        )
    row("scale-out 2/1 instances", scale["ratio"], "x")
    return out


async def run(
    redis_url: str, seconds: float, warmup: float, concurrency: Sequence[int], say: Callable[[str], None]
) -> dict[str, Any]:
    prefix = f"bench-turns-{uuid.uuid4().hex[:10]}"
    redis = Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    info = await redis.info("server")
    report: dict[str, Any] = {
        "parameters": {
            "seconds": seconds,
            "warmup": warmup,
            "concurrency": list(concurrency),
            "scale_out_concurrency": max(concurrency),
            "text": TEXT,
            "prefix": prefix,
        },
        "environment": {
            "commit": git_commit(),
            "redis_version": info.get("redis_version"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "started": timestamp(),
            "load_average_1m": [round(os.getloadavg()[0], 2)],
        },
        "points": {},
    }
    channel = await ChannelStandIn(record=False).start()
    # No pool limit: aiohttp's default of 100 would queue 2 x 64 posts in the client.
    connector = aiohttp.TCPConnector(limit=0)
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-turns-") as logs:
            log_dir = Path(logs)
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=30)
            ) as session:
                try:
                    echo = await echo_bot(log_dir).start(session)
                    servers.append(echo)
                    first = await orchestrator("orchestrator-1", redis_url, prefix, log_dir).start(session)
                    servers.append(first)
                    say(f"bots up: echo {echo.url}, orchestrator {first.url} (prefix {prefix})")
                    driver = Driver(session, channel, redis)
                    for c in concurrency:
                        pair: dict[str, Any] = {}
                        for bot, server in ((ECHO, echo), (ORCHESTRATOR, first)):
                            pair[bot] = await driver.point(bot, [server], c, seconds, warmup)
                            say(f"c={c} {bot}: {pair[bot].turns_per_s:,.0f} turns/s")
                        ratio = pair[ORCHESTRATOR].turns_per_s / max(pair[ECHO].turns_per_s, 1e-9)
                        report["points"][str(c)] = {
                            **{bot: {**asdict(p), "ok": p.ok} for bot, p in pair.items()},
                            "ratio": round(ratio, 3),
                        }
                    c = max(concurrency)
                    one = await driver.point(ORCHESTRATOR, [first], c, seconds, warmup)
                    second = await orchestrator("orchestrator-2", redis_url, prefix, log_dir).start(session)
                    servers.append(second)
                    two = await driver.point(ORCHESTRATOR, [first, second], c, seconds, warmup)
                    say(f"scale-out c={c}: {one.turns_per_s:,.0f} -> {two.turns_per_s:,.0f} turns/s")
                    report["scale_out"] = {
                        "concurrency": c,
                        "one": {**asdict(one), "ok": one.ok},
                        "two": {**asdict(two), "ok": two.ok},
                        "ratio": round(two.turns_per_s / max(one.turns_per_s, 1e-9), 3),
                    }
                finally:
                    for server in servers:
                        server.stop()
    finally:
        await channel.stop()
        # After the bots stopped, so nothing writes a key behind the clean-up.
        report["deleted_keys"] = await delete_prefix(redis, prefix)
        report["keys_left"] = len([k async for k in redis.scan_iter(match=f"{glob_escape(prefix)}:*")])
        await redis.aclose()
    report["environment"]["load_average_1m"].append(round(os.getloadavg()[0], 2))
    every = [p for pair in report["points"].values() for p in (pair[ECHO], pair[ORCHESTRATOR])]
    every += [report["scale_out"]["one"], report["scale_out"]["two"]]
    report["ok"] = all(p["ok"] for p in every) and report["keys_left"] == 0
    report["rows"] = rows(report)
    return report


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Every point once (``smoke``: a tiny run for the tests); JSON-able, with ``rows``."""
    if smoke:
        return asyncio.run(run(redis_url, SMOKE_SECONDS, SMOKE_WARMUP, SMOKE_CONCURRENCY, say))
    return asyncio.run(run(redis_url, DEFAULT_SECONDS, DEFAULT_WARMUP, DEFAULT_CONCURRENCY, say))


# --- output --------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _errors(point: dict[str, Any]) -> str:
    errors = Counter(point["errors"]) + Counter(point["setup_errors"])
    return ", ".join(f"{k}: {n}" for k, n in errors.items()) or "0"


def _replies(point: dict[str, Any]) -> str:
    text = f"{point['replies']:,} / {point['turns']:,}"
    return text if point["ok"] else f"[red]{text}[/red]"


COLUMNS = (
    *(
        "turns/s",
        "p50 ms",
        "p99 ms",
        "bot cpu\nms/turn",
        "cores: bot\n/ machine",
        "driver cpu\nms/turn",
        "redis cpu\nms/turn",
    ),
    *("errors", "replies /\nturns"),
)


def _cells(point: dict[str, Any]) -> list[str]:
    return [
        f"{point['turns_per_s']:,.0f}",
        _ms(point["latency_ms"]["p50"]),
        _ms(point["latency_ms"]["p99"]),
        f"{point['cpu_ms_per_turn']:.3f}",
        f"{point['bot_cores']:.2f} / {point['machine_cores']:.2f}",
        f"{point['driver_cpu_ms_per_turn']:.3f}",
        f"{point['redis_cpu_ms_per_turn']:.3f}",
        _errors(point),
        _replies(point),
    ]


def show(report: dict[str, Any], console: Console) -> None:
    params = report["parameters"]
    table = Table(
        "c",
        "bot",
        *COLUMNS,
        "orchestrator\n÷ echo",
        title=f"turns, closed loop: {params['seconds']:g} s per point after {params['warmup']:g} s warm-up",
    )
    for c, pair in report["points"].items():
        table.add_row(c, ECHO, *_cells(pair[ECHO]), "")
        table.add_row(
            "", ORCHESTRATOR, *_cells(pair[ORCHESTRATOR]), f"{pair['ratio']:.2f}x", end_section=True
        )
    console.print(table)
    scale = report["scale_out"]
    out = Table("instances", *COLUMNS, title=f"scale-out: orchestrator at c={scale['concurrency']}")
    out.add_row("1", *_cells(scale["one"]))
    out.add_row("2", *_cells(scale["two"]))
    console.print(out)
    env = report["environment"]
    console.print(
        f"2 instances ÷ 1: {scale['ratio']:.2f}x; {env['cpus']} CPUs, 1-min load average "
        f"{env['load_average_1m']}, commit {env['commit']}"
    )
    verdict = "[green]every turn answered 2xx with one reply[/green]" if report["ok"] else "[red]FAILED[/red]"
    console.print(f"{verdict}; deleted {report['deleted_keys']:,} keys under {params['prefix']}:")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured seconds per point")
    parser.add_argument(
        "--warmup", type=float, default=DEFAULT_WARMUP, help="warm-up seconds before each point"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY), help="calls in flight"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="the Redis the orchestrator uses")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0 or min(options.concurrency) < 1:
        parser.error("--seconds must be positive, --warmup not negative, --concurrency at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run every point, print the tables, write the JSON; exit status 1 if a check failed."""
    options = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: the tables' natural width, not 80 columns
        console = Console(width=160)
    report = asyncio.run(
        run(options.redis_url, options.seconds, options.warmup, options.concurrency, console.print)
    )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(report, console)
    console.print(f"figures in {options.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
