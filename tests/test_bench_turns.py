"""The turns benchmark, run at smoke size against the real Redis and two real bots: every
figure is reported, every turn got a 2xx and exactly one reply, and no key is left. No
timing is asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.turns import ECHO, ORCHESTRATOR, SMOKE_CONCURRENCY, bench
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT

pytestmark = pytest.mark.real_redis

FIGURES = {
    "turns_per_s",
    "latency_ms",
    "cpu_ms_per_turn",
    "bot_cores",
    "machine_cores",
    "driver_cpu_ms_per_turn",
    "redis_cpu_ms_per_turn",
}


def assert_point(point: dict[str, Any], bot: str, instances: int, concurrency: int) -> None:
    assert (point["bot"], point["instances"], point["concurrency"]) == (bot, instances, concurrency)
    assert set(point) >= FIGURES
    assert point["turns"] > 0 and point["turns_per_s"] > 0
    assert point["errors"] == {} and point["setup_errors"] == {}
    assert point["replies"] == point["turns"]  # one reply per turn, none lost, none extra
    assert point["setup_replies"] == point["setup_posts"]
    assert point["latency_ms"]["p50"] <= point["latency_ms"]["p99"] <= point["latency_ms"]["max"]
    assert point["ok"]


def test_bench_function_runs_both_bots_and_scale_out() -> None:
    require_real_redis_sync()
    said: list[str] = []
    report = bench(REAL_REDIS_URL, smoke=True, say=said.append)
    json.dumps(report)  # JSON-able, for bench/__main__.py

    assert list(report["points"]) == [str(c) for c in SMOKE_CONCURRENCY]
    for c, pair in report["points"].items():
        assert_point(pair[ECHO], ECHO, 1, int(c))
        assert_point(pair[ORCHESTRATOR], ORCHESTRATOR, 1, int(c))
        assert pair["ratio"] > 0
    scale = report["scale_out"]
    assert scale["concurrency"] == max(SMOKE_CONCURRENCY)
    assert_point(scale["one"], ORCHESTRATOR, 1, scale["concurrency"])
    assert_point(scale["two"], ORCHESTRATOR, 2, scale["concurrency"])
    assert report["ok"] and said

    names = {row["name"] for row in report["rows"]}
    for c in SMOKE_CONCURRENCY:
        for bot in (ECHO, ORCHESTRATOR):
            assert {f"turns/s {bot} c={c}", f"p99 ms {bot} c={c}", f"cpu ms/turn {bot} c={c}"} <= names
        assert f"ratio orchestrator/echo c={c}" in names
    assert "scale-out 2/1 instances" in names
    assert all(isinstance(r["value"], float) and isinstance(r["unit"], str) for r in report["rows"])

    # The orchestrator wrote call state under the run's prefix, and it is all gone.
    assert report["deleted_keys"] > 0 and report["keys_left"] == 0


def test_cli_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    require_real_redis_sync()
    output = tmp_path / "turns.json"
    args = ["--seconds", "0.2", "--warmup", "0", "--concurrency", "2", "--redis-url", REAL_REDIS_URL]
    done = subprocess.run(
        [sys.executable, "-m", "bench.turns", *args, "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "turns/s" in done.stdout and "scale-out" in done.stdout
    report = json.loads(output.read_text())
    assert list(report["points"]) == ["2"] and report["scale_out"]["concurrency"] == 2
    assert report["ok"] and report["keys_left"] == 0
