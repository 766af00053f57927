"""Turns: throughput and latency of the orchestrator's ordinary turn, beside a stock
botbuilder echo bot (``bench.echo_bot``) in the same run, over the streaming socket beside
HTTP, and scale-out to two instances.

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

The streaming path: at each concurrency above 1 (``--socket-concurrency``), right after
the orchestrator's HTTP point, the same orchestrator process is measured with the same
closed loop over the Telephony channel's streaming protocol (``simulator.streaming.
SocketBots``: the activities as requests on WebSockets to ``GET /api/messages``, the
replies coming back on them to the same stand-in), first with every call on ONE socket,
then on MANY (one per caller, or ``--many-sockets N``); each call keeps to its socket.
The ratios socket ÷ HTTP (turns/s, p50, p99) are printed. The echo bot stays HTTP-only:
the SDK's own streaming cannot serve a real peer (docs/streaming.md). Latency is timed
the same way on both: from before the activity is encoded to its answer read.

    .venv/bin/python -m bench.turns [--seconds 5] [--concurrency 1 8 64]
                                    [--socket-concurrency 8 64] [--many-sockets N] [--json PATH]
                                    [--smoke]
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from bench.inspection import delete_prefix, glob_escape
from orchestrator.call import timestamp
from orchestrator.callflow import SAMPLE_CALLFLOW, shipped_flow
from simulator.channel import Caller, ChannelStandIn
from simulator.load import percentile
from simulator.streaming import SERVICE_URL, SocketBots
from tests.process import free_port

ROOT = Path(__file__).parents[1]
DEFAULT_JSON = Path(__file__).parent / "results" / "turns.json"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_SECONDS, DEFAULT_WARMUP = 5.0, 1.0
SMOKE_SECONDS, SMOKE_WARMUP, SMOKE_CONCURRENCY = 0.5, 0.2, (1, 4)  # the test suite's size
MANY_SOCKETS = 0  # the MANY point's sockets: 0 is one per caller
TEXT = "what are your opening hours"  # no route matches: the fallback prompt, one reply
ORCHESTRATOR, ECHO = "orchestrator", "echo"
HTTP, SOCKET = "http", "socket"  # how the driver's activities reach the bot
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
        env.setdefault("CALLFLOW_FILE", str(shipped_flow(SAMPLE_CALLFLOW)))  # the how-to's echo
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
    """One bot (one or more instances) at one concurrency, over one transport: the figures
    of the measured phase."""

    bot: str
    instances: int
    concurrency: int
    transport: str  # HTTP (POSTs) or SOCKET (streaming requests on WebSockets)
    sockets: int  # WebSockets the calls were spread over (0: HTTP)
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


Send = Callable[[dict[str, Any]], Awaitable[int]]  # one activity to a bot: its status


class NotReached(Exception):
    """A socket send the bot never answered (``SocketBots.post`` answered 0)."""


class Driver:
    """The channel side of every point: one pooled session, one counting stand-in; the
    activities go as POSTs, or as requests on streaming sockets that the replies come back on."""

    def __init__(self, session: aiohttp.ClientSession, channel: ChannelStandIn, redis: Redis) -> None:
        self.session = session
        self.channel = channel
        self.redis = redis
        self.run_id = uuid.uuid4().hex[:8]
        self.points = itertools.count(1)

    def over_http(self, servers: Sequence[Server]) -> Send:
        """POSTs to the instances' ``/api/messages``, round-robin, no stickiness."""
        urls = itertools.cycle([f"{s.url}/api/messages" for s in servers])

        async def send(activity: dict[str, Any]) -> int:
            body = json.dumps(activity).encode()
            async with self.session.post(
                next(urls), data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                return response.status

        return send

    @staticmethod
    def over_sockets(sockets: SocketBots) -> Send:
        """Streaming requests on the sockets, each call keeping to one."""

        async def send(activity: dict[str, Any]) -> int:
            status = await sockets.post(activity)
            if status == 0:  # the socket went, or the bot never answered
                raise NotReached(sockets.last_error.split(":", 1)[0] or "not reached")
            return status

        return send

    async def post(self, send: Send, activity: dict[str, Any], tally: Tally, timed: bool) -> None:
        began = time.perf_counter()
        try:
            status = await send(activity)
        except (aiohttp.ClientError, TimeoutError, NotReached) as e:
            tally.errors[str(e) if isinstance(e, NotReached) else type(e).__name__] += 1
            await asyncio.sleep(0.01)  # a bot that is down must not turn the loop into a spin
            return
        if timed:
            tally.latencies.append(time.perf_counter() - began)
        if 200 <= status < 300:
            tally.ok += 1
        else:
            tally.errors[f"HTTP {status}"] += 1

    async def loop(self, caller: Caller, send: Send, until: float, tally: Tally, timed: bool) -> float:
        """One call, one message at a time, until ``until``; returns when its last answer came."""
        while time.perf_counter() < until:
            await self.post(send, caller.say(TEXT), tally, timed)
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
        self,
        bot: str,
        servers: Sequence[Server],
        concurrency: int,
        seconds: float,
        warmup: float,
        sockets: int = 0,
    ) -> Point:
        """Start the calls (orchestrator), warm up, let replies settle, then measure: over
        HTTP, or (``sockets`` > 0) over that many streaming sockets to each instance, opened
        for this point (by its first activities) and closed after it."""
        if not sockets:
            return await self._measure(bot, servers, concurrency, seconds, warmup, 0, self.over_http(servers))
        via = SocketBots([s.url for s in servers], self.session, self.channel, sockets=sockets)
        try:
            send = self.over_sockets(via)
            return await self._measure(bot, servers, concurrency, seconds, warmup, len(via.sockets), send)
        finally:
            await via.close()

    async def _measure(
        self,
        bot: str,
        servers: Sequence[Server],
        concurrency: int,
        seconds: float,
        warmup: float,
        sockets: int,
        send: Send,
    ) -> Point:
        transport = SOCKET if sockets else HTTP
        # Fresh calls every point: a reused activity id is a redelivery, answered with no reply.
        tag = f"{self.run_id}-{next(self.points)}-{bot}-{transport}-{len(servers)}x{concurrency}"
        # Streaming activities name no http(s) serviceUrl: the bot replies on the socket.
        service_url = SERVICE_URL if transport == SOCKET else self.channel.url
        callers = [Caller(service_url, f"{tag}-{i}") for i in range(concurrency)]
        base = self.channel.received
        setup = Tally()
        if bot == ORCHESTRATOR:
            await asyncio.gather(*(self.post(send, c.start(), setup, False) for c in callers))
        until = time.perf_counter() + warmup
        await asyncio.gather(*(self.loop(c, send, until, setup, False) for c in callers))
        before = await self.settle(base + setup.ok)

        cpu = sum(s.cpu_seconds() for s in servers)
        machine = machine_busy_seconds()
        driver_cpu = time.process_time()
        redis_cpu = await self.redis_cpu()
        measured = Tally()
        began = time.perf_counter()
        until = began + seconds
        ended = max(await asyncio.gather(*(self.loop(c, send, until, measured, True) for c in callers)))
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
            transport=transport,
            sockets=sockets,
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
    for c, streaming in report["streaming"].items():
        for kind in ("one", "many"):
            p, label = streaming[kind], socket_label(streaming[kind])
            row(f"turns/s orchestrator {label} c={c}", p["turns_per_s"], "turns/s")
            row(f"p50 ms orchestrator {label} c={c}", p["latency_ms"]["p50"], "ms")
            row(f"p99 ms orchestrator {label} c={c}", p["latency_ms"]["p99"], "ms")
            row(f"cpu ms/turn orchestrator {label} c={c}", p["cpu_ms_per_turn"], "ms")
            ratios = streaming["ratios"][kind]
            row(f"ratio {label}/http c={c}", ratios["turns_per_s"], "x")
            row(f"p50 ratio {label}/http c={c}", ratios["p50"], "x")
            row(f"p99 ratio {label}/http c={c}", ratios["p99"], "x")
    scale = report["scale_out"]
    for n, key in ((1, "one"), (2, "two")):
        row(
            f"turns/s orchestrator {n} instance(s) c={scale['concurrency']}",
            scale[key]["turns_per_s"],
            "turns/s",
        )
    row("scale-out 2/1 instances", scale["ratio"], "x")
    return out


def socket_label(point: dict[str, Any]) -> str:
    return f"socket x{point['sockets']}"


def over_http(socket_point: Point, http_point: Point) -> dict[str, float | None]:
    """A socket point's figures ÷ the HTTP point's (turns/s: above 1 is faster; p50, p99:
    below 1 is quicker)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    return {
        "turns_per_s": ratio(socket_point.turns_per_s, http_point.turns_per_s),
        "p50": ratio(socket_point.latency_ms["p50"], http_point.latency_ms["p50"]),
        "p99": ratio(socket_point.latency_ms["p99"], http_point.latency_ms["p99"]),
    }


def socket_points(concurrency: Sequence[int], asked: Sequence[int] | None) -> list[int]:
    """Where the streaming path is measured: the concurrencies asked for (every one above
    1 when not asked; at 1, one socket is many)."""
    return [c for c in concurrency if (c > 1 if asked is None else c in asked)]


async def run(
    redis_url: str,
    seconds: float,
    warmup: float,
    concurrency: Sequence[int],
    say: Callable[[str], None],
    socket_concurrency: Sequence[int] | None = None,
    many_sockets: int = MANY_SOCKETS,
) -> dict[str, Any]:
    prefix = f"bench-turns-{uuid.uuid4().hex[:10]}"
    over_sockets = socket_points(concurrency, socket_concurrency)
    redis = Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    info = await redis.info("server")
    report: dict[str, Any] = {
        "parameters": {
            "seconds": seconds,
            "warmup": warmup,
            "concurrency": list(concurrency),
            "scale_out_concurrency": max(concurrency),
            "socket_concurrency": over_sockets,
            "many_sockets": many_sockets or "one per caller",
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
        "streaming": {},  # at each of socket_concurrency; HTTP is points[c]["orchestrator"]
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
                        if c not in over_sockets:
                            continue
                        # The same process, right after its HTTP point: one socket, then many.
                        streaming: dict[str, Any] = {"ratios": {}}
                        for kind, sockets in (("one", 1), ("many", min(many_sockets or c, c))):
                            point = await driver.point(ORCHESTRATOR, [first], c, seconds, warmup, sockets)
                            streaming[kind] = {**asdict(point), "ok": point.ok}
                            streaming["ratios"][kind] = over_http(point, pair[ORCHESTRATOR])
                            say(
                                f"c={c} {ORCHESTRATOR} over {sockets} socket(s): "
                                f"{point.turns_per_s:,.0f} turns/s"
                            )
                        report["streaming"][str(c)] = streaming
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
    every += [s[kind] for s in report["streaming"].values() for kind in ("one", "many")]
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
    if report["streaming"]:
        console.print(streaming_table(report))
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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def streaming_table(report: dict[str, Any]) -> Table:
    """The orchestrator over HTTP and over sockets, side by side at each concurrency."""
    table = Table(
        "c",
        "transport",
        *COLUMNS,
        "÷ http:\nturns/s",
        "÷ http:\np50",
        "÷ http:\np99",
        title="the orchestrator over the streaming socket and over HTTP (same process, same run)",
    )
    for c, streaming in report["streaming"].items():
        table.add_row(c, HTTP, *_cells(report["points"][c][ORCHESTRATOR]), "", "", "")
        for kind in ("one", "many"):
            point, ratios = streaming[kind], streaming["ratios"][kind]
            table.add_row(
                "",
                socket_label(point),
                *_cells(point),
                *(_ratio(ratios[k]) for k in ("turns_per_s", "p50", "p99")),
                end_section=kind == "many",
            )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured seconds per point")
    parser.add_argument(
        "--warmup", type=float, default=DEFAULT_WARMUP, help="warm-up seconds before each point"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY), help="calls in flight"
    )
    parser.add_argument(
        "--socket-concurrency",
        type=int,
        nargs="*",
        default=None,
        help="where the streaming path is measured too, each one of --concurrency "
        "(default: every --concurrency above 1; none: HTTP only)",
    )
    parser.add_argument(
        "--many-sockets",
        type=int,
        default=MANY_SOCKETS,
        help="sockets of the MANY point, at most one per caller (0, the default: one per caller)",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="the Redis the orchestrator uses")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"the tests' size: {SMOKE_SECONDS:g} s per point after {SMOKE_WARMUP:g} s, concurrency "
        f"{' '.join(map(str, SMOKE_CONCURRENCY))} (options given still win)",
    )
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(seconds=SMOKE_SECONDS, warmup=SMOKE_WARMUP, concurrency=list(SMOKE_CONCURRENCY))
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0 or min(options.concurrency) < 1:
        parser.error("--seconds must be positive, --warmup not negative, --concurrency at least 1")
    if options.socket_concurrency and not set(options.socket_concurrency) <= set(options.concurrency):
        parser.error("each --socket-concurrency must be one of --concurrency (the HTTP point beside it)")
    if options.socket_concurrency and min(options.socket_concurrency) < 2:
        parser.error("--socket-concurrency must be at least 2 (at 1, one socket is many)")
    if options.many_sockets < 0 or options.many_sockets == 1:
        parser.error("--many-sockets must be 0 (one per caller) or at least 2")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run every point, print the tables, write the JSON; exit status 1 if a check failed."""
    options = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: the tables' natural width, not 80 columns
        console = Console(width=160)
    report = asyncio.run(
        run(
            options.redis_url,
            options.seconds,
            options.warmup,
            options.concurrency,
            console.print,
            options.socket_concurrency,
            options.many_sockets,
        )
    )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(report, console)
    console.print(f"figures in {options.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
