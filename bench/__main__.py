"""Every benchmark in one go: ``python -m bench``.

Runs each bench module's ``bench()`` ``--runs`` times (3 by default) on one real Redis,
then prints, per bench, the median of every figure with its spread, and the issue's
targets against those medians. Everything (medians, each run's figures, each run's
full report) goes to one JSON file for comparing runs. Correctness checks (replies equal
turns, no duplicate timers, counts that match) must hold in every run: the exit status
is 1 if one did not. Targets are reported, not enforced: the machine is shared.

    .venv/bin/python -m bench [--runs 3] [--only turns timers ...] [--redis-url URL]
                              [--json bench/results/bench.json] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.report import DEFAULT_REDIS_URL, RESULTS

# In the order they run: the fast, quiet ones first, the ones that load the machine last.
SUITES = ("machine", "codec", "roundtrips", "memory", "pool", "turns", "inspection", "timers")


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's targets: a figure of a bench, compared with a bound."""

    what: str
    suite: str
    figure: str
    compare: Callable[[float, float], bool]
    bound: float
    sign: str


TARGETS = (
    Target(
        "turns/s ≥ 5x the stock echo bot, c=8", "turns", "ratio orchestrator/echo c=8", operator.ge, 5, "≥"
    ),
    Target("p99 < 25 ms, c=8", "turns", "p99 ms orchestrator c=8", operator.lt, 25, "<"),
    Target(
        "≤ 1 Redis round trip, ordinary turn",
        "roundtrips",
        "1 instance: ordinary message: round trips/turn",
        operator.le,
        1,
        "≤",
    ),
    Target("state machine ≤ 10 µs per turn", "machine", "machine part, worst event", operator.le, 10, "≤"),
    Target(
        "memory per live call < 8 KB (20 turns)", "memory", "call keys: bytes/call", operator.lt, 8192, "<"
    ),
    Target(
        "stats 1h over 100,000 live calls < 1 s",
        "inspection",
        "stats 1h ms at 100,000 calls",
        operator.lt,
        1000,
        "<",
    ),
    Target(
        "stats 24h over 100,000 live calls < 1 s",
        "inspection",
        "stats 24h ms at 100,000 calls",
        operator.lt,
        1000,
        "<",
    ),
    Target("10,000 due timers: 0 duplicates", "timers", "duplicates", operator.eq, 0, "="),
    Target("10,000 due timers: p99 lateness < 1 s", "timers", "lateness p99 s", operator.lt, 1, "<"),
    # The same 10,000 with the calls on streaming sockets: prompts sent there, or routed to them.
    Target(
        "10,000 due timers over sockets: 0 duplicates", "timers", "socket duplicates", operator.eq, 0, "="
    ),
    Target(
        "10,000 due timers over sockets: p99 lateness < 1 s",
        "timers",
        "socket lateness p99 s",
        operator.lt,
        1,
        "<",
    ),
)


def run_suite(
    name: str, runs: int, redis_url: str, smoke: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """``runs`` reports of one bench, and the median of each figure over them."""
    module = importlib.import_module(f"bench.{name}")
    reports = []
    for number in range(1, runs + 1):
        say(f"[bold]{name}[/bold]: run {number} of {runs}")
        began = time.monotonic()
        reports.append(module.bench(redis_url, smoke=smoke, say=say))
        say(f"{name}: run {number} took {time.monotonic() - began:.0f} s")
    figures: dict[str, dict[str, Any]] = {}
    for report in reports:
        for entry in report["rows"]:
            figure = figures.setdefault(entry["name"], {"unit": entry["unit"], "runs": []})
            figure["runs"].append(entry["value"])
    for figure in figures.values():
        figure["median"] = statistics.median(figure["runs"])
    checks: dict[str, bool] = {}
    for report in reports:
        for check, ok in report.get("checks", {}).items():
            checks[check] = checks.get(check, True) and bool(ok)
    return {"figures": figures, "checks": checks, "reports": reports}


def judge(results: dict[str, dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """Each target against its figure's median (not judged at smoke sizes: 200 timers
    are not the 10,000 the target names)."""
    verdicts = []
    for target in TARGETS:
        figure = results.get(target.suite, {}).get("figures", {}).get(target.figure)
        measured = None if figure is None else figure["median"]
        verdicts.append(
            {
                "target": target.what,
                "figure": f"{target.suite}: {target.figure}",
                "bound": f"{target.sign} {target.bound:g}",
                "median": measured,
                "met": None if measured is None or smoke else target.compare(measured, target.bound),
            }
        )
    return verdicts


def show(
    results: dict[str, dict[str, Any]], verdicts: list[dict[str, Any]], runs: int, console: Console
) -> None:
    for name, result in results.items():
        table = Table("figure", f"median of {runs}", "min - max", "unit", title=name)
        for figure_name, figure in result["figures"].items():
            table.add_row(
                figure_name,
                _number(figure["median"]),
                f"{_number(min(figure['runs']))} - {_number(max(figure['runs']))}",
                figure["unit"],
            )
        console.print(table)
        bad = [check for check, ok in result["checks"].items() if not ok]
        if bad:
            console.print(f"[red]{name}: checks FAILED: {', '.join(bad)}[/red]")
    table = Table("target", "bound", "median", "", title="the issue's targets")
    for verdict in verdicts:
        met = verdict["met"]
        mark = (
            "[green]met[/green]"
            if met
            else "[yellow]not run[/yellow]"
            if met is None
            else "[red]missed[/red]"
        )
        median = "-" if verdict["median"] is None else _number(verdict["median"])
        table.add_row(verdict["target"], verdict["bound"], median, mark)
    console.print(table)


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.3g}"


def environment() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parents[1])
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "changed_files": git("status", "--porcelain").splitlines(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each bench; figures are medians (3)")
    parser.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES), help="these benches only")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a single real Redis, redis://")
    default_json = RESULTS / "bench.json"
    parser.add_argument(
        "--json", type=Path, default=default_json, help=f"where the figures go ({default_json})"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to see that it all runs")
    options = parser.parse_args(argv)
    if options.runs < 1:
        parser.error("--runs must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    console = Console()
    began = time.monotonic()
    report: dict[str, Any] = {"environment": environment(), "runs": options.runs, "smoke": options.smoke}
    results = {
        name: run_suite(name, options.runs, options.redis_url, options.smoke, console.print)
        for name in SUITES
        if name in options.only
    }
    verdicts = judge(results, options.smoke)
    report |= {"targets": verdicts, "suites": results, "seconds": round(time.monotonic() - began, 1)}
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    show(results, verdicts, options.runs, console)
    failed = [
        f"{name}: {check}" for name, r in results.items() for check, ok in r["checks"].items() if not ok
    ]
    console.print(f"{report['seconds']:.0f} s; figures in {options.json}")
    if failed:
        console.print(f"[red]correctness checks failed: {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
