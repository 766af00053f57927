"""Load mode: many simulated callers through a mix of scenarios, started at a steady
rate against one or more bots (round-robin), with a live progress bar and a summary.

Call ``i`` runs scenario ``i % len(mix)`` (the files in the order given) and starts at
``t0 + i / rate``, open loop: a call does not wait for the one before it. At most
``concurrency`` calls are in flight; past that the scheduler waits for a slot, then
starts the overdue calls at once to catch up, and the achieved rate shows the shortfall.

Latency percentiles are nearest-rank: the p-th percentile of n sorted values is the
value at rank ``ceil(p * n / 100)``, always one of the measured values.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from simulator import cli
from simulator import scenario as scenarios
from simulator.call import Bots, Tally, Transport
from simulator.channel import ChannelStandIn

DEFAULT_CONCURRENCY = 1000  # calls in flight at once
UNEXPECTED_EXAMPLES = 5


@dataclass(frozen=True)
class FailureGroup:
    """Failed calls that failed for the same reason, in whichever scenario or step: one
    cause (a bot down, a wrong prompt) is one group."""

    reason: str  # what went wrong, without the step it went wrong at
    count: int
    example: str  # where it went wrong first: the scenario, the step number and the step


@dataclass(frozen=True)
class Unexpected:
    """Something a bot sent that no step of the scenario read, and how often."""

    scenario: str
    activity: str
    count: int


@dataclass
class LoadSummary:
    """What a load run did; ``as_dict()`` gives the same figures as plain data."""

    calls: int
    passed: int
    failed: int
    rate: float  # calls per second asked for
    achieved_rate: float | None  # calls started per second, first start to last (None: one call)
    duration: float  # seconds from the first start to the last call's end
    turns: int  # posts a bot answered (any HTTP status)
    turns_per_second: float  # turns / duration
    transfers: int  # handoff.initiate events the callers read
    received: int  # activities the bots sent to the channel, expected or not
    latency_ms: dict[str, float | None]  # p50, p95, p99, max of a turn (post to answer)
    errors: dict[str, int]  # "HTTP 503", or the exception of a post that got no answer
    posts_per_bot: dict[str, int]  # each bot URL: posts sent to it
    scenarios: dict[str, dict[str, int]]  # scenario name: {"passed": n, "failed": n}
    unexpected: int  # activities no step read, over all calls
    unexpected_examples: list[Unexpected] = field(default_factory=list)  # the most frequent few
    failures: list[FailureGroup] = field(default_factory=list)  # most frequent first

    @property
    def ok(self) -> bool:
        """Every call passed and no post failed."""
        return self.failed == 0 and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (0 < p <= 100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


def latency_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max, in milliseconds, of latencies in seconds."""
    figures = {f"p{p}": percentile(latencies, p) for p in (50, 95, 99)}
    figures["max"] = max(latencies, default=None)
    return {name: None if value is None else round(value * 1000, 2) for name, value in figures.items()}


@asynccontextmanager
async def wired(
    urls: list[str], listen: str, tally: Tally, concurrency: int, transports: set[Transport]
) -> AsyncIterator[dict[Transport, tuple[Bots, ChannelStandIn]]]:
    """``simulator.cli.wired`` for each transport the mix uses, sharing one connection pool
    as large as the calls in flight (aiohttp's default of 100 would queue posts in the
    client and count the wait as the bots' latency)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session, contextlib.AsyncExitStack() as stack:
        yield {
            kind: await stack.enter_async_context(cli.wired(urls, listen, tally, kind, session))
            for kind in transports
        }


def _cause(result: scenarios.Result) -> tuple[str, str]:
    """A failed call's reason without its step (so a bot that is down is one reason, not
    one per step it broke), and where it happened."""
    if not result.step:  # after the last step: the reason names no step
        return result.reason, f"{result.scenario.name}, after the last step"
    step = str(result.scenario.steps[result.step - 1])
    where = f"{result.scenario.name}, step {result.step} ({step})"
    return result.reason.removeprefix(f"{step}: "), where


async def load(
    urls: list[str],
    files: list[Path],
    calls: int,
    rate: float,
    listen: str = "127.0.0.1:0",
    console: Console | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    transport: Transport = "http",
    agents: scenarios.AgentSide | None = None,
) -> LoadSummary:
    """Run ``calls`` simulated calls through the scenario mix in ``files``, ``rate`` new
    calls a second; a progress bar on ``console`` if given. Raises ``ScenarioError`` for a
    scenario file that cannot be read (before any call starts). ``agents``: the bot's
    pools and agent token, for warm transfers' ``expect_transfer: {pool}`` and
    ``expect_context`` (each call's context request counts against the bot's
    AGENT_RATE_LIMIT, per client address)."""
    if calls < 1 or rate <= 0 or concurrency < 1:
        raise ValueError("calls and concurrency must be at least 1, rate above 0")
    mix = [scenarios.load(path) for path in files]
    if not mix:
        raise scenarios.ScenarioError("no scenario files to run")
    tally = Tally()
    results: list[scenarios.Result] = []
    starts: list[float] = []
    tallied: Counter[bool] = Counter()  # calls finished, by passed (kept up as they end)
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    progress = Progress(
        TextColumn("calls"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("started {task.fields[started]}"),
        TextColumn("[green]passed {task.fields[passed]}[/green]"),
        TextColumn("[red]failed {task.fields[failed]}[/red]"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    bar = progress.add_task("calls", total=calls, started=0, passed=0, failed=0)

    async def call(scenario: scenarios.Scenario, bots: Bots, channel: ChannelStandIn) -> None:
        try:
            result = await scenarios.run(scenario, bots, channel, agents)
        except Exception as e:  # a bug in a step must fail its call, not the whole run
            result = scenarios.Result(scenario, False, 0, f"crashed: {type(e).__name__}: {e}")
        finally:
            slots.release()
        results.append(result)
        tallied[result.passed] += 1
        progress.update(bar, advance=1, passed=tallied[True], failed=tallied[False])

    transports = {scenario.transport or transport for scenario in mix}
    async with wired(urls, listen, tally, concurrency, transports) as links:
        with progress:
            t0 = loop.time()
            async with asyncio.TaskGroup() as group:
                for i in range(calls):
                    await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
                    await slots.acquire()
                    starts.append(loop.time())
                    scenario = mix[i % len(mix)]
                    group.create_task(call(scenario, *links[scenario.transport or transport]))
                    progress.update(bar, started=i + 1)
            duration = loop.time() - t0
        received = sum(len(channel.activities) for _, channel in links.values())
        posts: Counter[str] = Counter()
        for bots, _ in links.values():
            posts.update(bots.sent)  # update, not +: a bot never reached keeps its 0

    failures: dict[str, list[str]] = {}  # reason: where each call failed so
    for result in results:
        if not result.passed:
            reason, where = _cause(result)
            failures.setdefault(reason, []).append(where)
    unexpected = Counter((r.scenario.name, activity) for r in results for activity in r.unexpected)
    per_scenario = {s.name: {"passed": 0, "failed": 0} for s in mix}
    for result in results:
        per_scenario[result.scenario.name]["passed" if result.passed else "failed"] += 1
    span = starts[-1] - starts[0]
    return LoadSummary(
        calls=len(results),
        passed=tallied[True],
        failed=tallied[False],
        rate=rate,
        achieved_rate=(len(starts) - 1) / span if span > 0 else None,
        duration=duration,
        turns=tally.turns,
        turns_per_second=tally.turns / duration if duration > 0 else 0.0,
        transfers=tally.transfers,
        received=received,
        latency_ms=latency_ms(tally.latencies),
        errors=dict(tally.errors.most_common()),
        posts_per_bot=dict(posts),
        scenarios=per_scenario,
        unexpected=sum(unexpected.values()),
        unexpected_examples=[
            Unexpected(name, activity, count)
            for (name, activity), count in unexpected.most_common(UNEXPECTED_EXAMPLES)
        ],
        failures=[
            FailureGroup(reason, len(wheres), wheres[0])
            for reason, wheres in sorted(failures.items(), key=lambda item: (-len(item[1]), item[0]))
        ],
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def report(summary: LoadSummary, console: Console) -> None:
    """Print the summary as tables."""
    table = Table(title="Load summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("calls", f"{summary.calls} ({summary.passed} passed, {summary.failed} failed)")
    achieved = "-" if summary.achieved_rate is None else f"{summary.achieved_rate:.1f}/s"
    table.add_row("call rate", f"{achieved} achieved ({summary.rate:g}/s asked)")
    table.add_row("duration", f"{summary.duration:.1f} s")
    table.add_row("turns", f"{summary.turns} ({summary.turns_per_second:.1f}/s)")
    table.add_row("transfers", str(summary.transfers))
    table.add_row("activities received", str(summary.received))
    figures = ", ".join(f"{name} {_ms(value)}" for name, value in summary.latency_ms.items())
    table.add_row("turn latency", figures)
    errors = ", ".join(f"{kind}: {n}" for kind, n in summary.errors.items())
    table.add_row("errors", Text(errors or "none"))
    table.add_row("posts per bot", Text("\n".join(f"{url}: {n}" for url, n in summary.posts_per_bot.items())))
    table.add_row("unexpected", str(summary.unexpected))
    console.print(table)

    outcomes = Table(title="Scenarios", title_justify="left")
    outcomes.add_column("scenario")
    outcomes.add_column("passed", justify="right")
    outcomes.add_column("failed", justify="right")
    for name, counts in summary.scenarios.items():
        failed = counts["failed"]
        outcomes.add_row(Text(name), str(counts["passed"]), f"[red]{failed}[/red]" if failed else "0")
    console.print(outcomes)

    if summary.failures:
        failures = Table(title="Failures", title_justify="left")
        failures.add_column("calls", justify="right")
        failures.add_column("reason")
        failures.add_column("first in")
        for group in summary.failures:
            failures.add_row(str(group.count), Text(group.reason), Text(group.example))
        console.print(failures)
    if summary.unexpected_examples:
        unexpected = Table(title="Unexpected (most frequent)", title_justify="left")
        unexpected.add_column("times", justify="right")
        unexpected.add_column("scenario")
        unexpected.add_column("the bot sent")
        for item in summary.unexpected_examples:
            unexpected.add_row(str(item.count), Text(item.scenario), Text(item.activity))
        console.print(unexpected)

    colour = "green" if summary.ok else "red"
    console.print(f"[{colour}]{summary.passed} passed, {summary.failed} failed[/{colour}]")


async def run_load(
    urls: list[str],
    files: list[Path],
    calls: int,
    rate: float,
    listen: str,
    console: Console,
    transport: Transport = "http",
    agents: scenarios.AgentSide | None = None,
) -> int:
    """The CLI's load mode: run the load, print the summary; 0 only if every call passed
    and no post failed."""
    summary = await load(urls, files, calls, rate, listen, console, transport=transport, agents=agents)
    report(summary, console)
    return 0 if summary.ok else 1
