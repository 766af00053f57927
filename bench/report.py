"""What the small benches share: a unique key prefix, the rows table, the JSON file and
the command line, so ``python -m bench.<name>`` and ``bench.__main__`` see one shape."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Bench = Callable[..., dict[str, Any]]


def unique_prefix(name: str) -> str:
    """A key prefix no other run uses (``REDIS_KEY_PREFIX`` allows 32 characters)."""
    return f"bench-{name[:8]}-{uuid.uuid4().hex[:10]}"


def timed(work: Callable[[], object], iterations: int, repeats: int) -> float:
    """µs per call of ``work``: the median over ``repeats`` runs of ``iterations`` calls."""
    runs = []
    for _ in range(repeats):
        began = time.perf_counter_ns()
        for _ in range(iterations):
            work()
        runs.append((time.perf_counter_ns() - began) / iterations / 1000)
    return statistics.median(runs)


def row(name: str, value: float, unit: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit}


def rows_table(report: dict[str, Any], title: str) -> Table:
    table = Table("figure", "value", "unit", title=title)
    for r in report["rows"]:
        value = r["value"]
        shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.3g}" if value % 1 else f"{value:,.0f}"
        table.add_row(r["name"], shown, r["unit"])
    return table


def main(name: str, doc: str, bench: Bench, argv: list[str] | None = None) -> int:
    """``python -m bench.<name> [--redis-url URL] [--json PATH] [--smoke]``: the table, the
    JSON, and exit status 1 if a correctness check failed."""
    default_json = RESULTS / f"{name}.json"
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a single Redis, redis://")
    parser.add_argument(
        "--json", type=Path, default=default_json, help=f"where the figures go ({default_json})"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (what the tests run)")
    options = parser.parse_args(argv)
    console = Console()
    report = bench(options.redis_url, smoke=options.smoke, say=console.print)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(rows_table(report, name))
    bad = [check for check, ok in report.get("checks", {}).items() if not ok]
    console.print("[green]all checks pass[/green]" if not bad else f"[red]FAILED: {', '.join(bad)}[/red]")
    console.print(f"figures in {options.json}")
    return 0 if not bad else 1
