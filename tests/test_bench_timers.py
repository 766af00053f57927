"""The timers benchmark, run small against the real Redis with real bot processes: every
watchdog fired exactly once, the report has every figure, no key is left. No timing is
asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.timers import SMOKE_CALLS, bench
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT

pytestmark = pytest.mark.real_redis

ROWS = {
    "timers drained",
    "drain s",
    "lateness p50 s",
    "lateness p99 s",
    "lateness max s",
    "duplicates",
    "failed once",
    "watchdogs per s",
    "bot CPU s",
}


def assert_every_watchdog_fired_once(report: dict[str, Any], calls: int, instances: int) -> None:
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    drain, records = report["drain"], report["records"]
    assert drain["drained"] and drain["calls_prompted"] == drain["prompts_received"] == calls
    assert drain["duplicates"] == 0
    assert records["states"] == {"failed": calls}
    assert records["timeout_steps_per_call"] == {"1": calls}
    assert records["still_scheduled"] == 0
    assert len(report["instances"]) == instances
    assert sum(i["fired"] for i in report["instances"]) == calls
    for figures in (drain["lateness_s"], drain["commit_to_arrival_s"], records["commit_lateness_s"]):
        assert set(figures) == {"min", "p50", "p90", "p99", "max"}
        assert figures["min"] <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    assert sum(drain["arrivals_per_second"]) == calls
    assert set(report["cpu_s"]) == {"bots", "redis", "bench_and_stand_in"}
    assert report["deleted_keys"] > 0

    named = {r["name"]: r for r in report["rows"]}
    assert set(named) >= ROWS
    assert {f"fired by bot {n}" for n in range(instances)} <= set(named)
    assert all(isinstance(r["value"], float) and isinstance(r["unit"], str) for r in report["rows"])
    assert named["timers drained"]["value"] == named["failed once"]["value"] == calls
    assert named["duplicates"]["value"] == 0
    json.dumps(report)  # JSON-able, as bench/__main__ writes it


def assert_no_key_left(prefix: str) -> None:
    client = redis.Redis.from_url(REAL_REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"{prefix}:*", count=1000)) == []
    finally:
        client.close()


def test_command_line_drains_every_watchdog_once(key_prefix: str, tmp_path: Path) -> None:
    require_real_redis_sync()
    output = tmp_path / "timers.json"
    calls = 60
    args = ["--calls", str(calls), "--instances", "2", "--redis-url", REAL_REDIS_URL, "--prefix", key_prefix]
    done = subprocess.run(
        [sys.executable, "-m", "bench.timers", *args, "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks pass" in done.stdout and "watchdogs due at once" in done.stdout
    assert_every_watchdog_fired_once(json.loads(output.read_text()), calls, instances=2)
    assert_no_key_left(key_prefix)


def test_bench_entry_point_at_smoke_size() -> None:
    require_real_redis_sync()
    said: list[str] = []
    report = bench(REAL_REDIS_URL, smoke=True, say=said.append)
    assert said
    assert report["parameters"]["calls"] == SMOKE_CALLS
    assert_every_watchdog_fired_once(report, SMOKE_CALLS, instances=2)
    assert_no_key_left(report["parameters"]["prefix"])
