"""The turns benchmark, run at smoke size against the real Redis and two real bots, the
orchestrator over HTTP and over streaming sockets (one, and one per caller): every figure
is reported, every turn got a 2xx and exactly one reply, and no key is left. No timing is
asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.turns import ECHO, HTTP, ORCHESTRATOR, SMOKE_CONCURRENCY, SOCKET, bench
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT, run_bench

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


def assert_point(point: dict[str, Any], bot: str, instances: int, concurrency: int, sockets: int = 0) -> None:
    assert (point["bot"], point["instances"], point["concurrency"]) == (bot, instances, concurrency)
    assert (point["transport"], point["sockets"]) == (SOCKET if sockets else HTTP, sockets)
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

    # The streaming path beside HTTP at every concurrency above 1: one socket, then one per caller.
    over_sockets = [c for c in SMOKE_CONCURRENCY if c > 1]
    assert report["parameters"]["socket_concurrency"] == over_sockets
    assert list(report["streaming"]) == [str(c) for c in over_sockets]
    for c, streaming in report["streaming"].items():
        assert_point(streaming["one"], ORCHESTRATOR, 1, int(c), sockets=1)
        assert_point(streaming["many"], ORCHESTRATOR, 1, int(c), sockets=int(c))
        for kind in ("one", "many"):
            assert set(streaming["ratios"][kind]) == {"turns_per_s", "p50", "p99"}
            assert all(r is not None and r > 0 for r in streaming["ratios"][kind].values())

    names = {row["name"] for row in report["rows"]}
    for c in SMOKE_CONCURRENCY:
        for bot in (ECHO, ORCHESTRATOR):
            assert {f"turns/s {bot} c={c}", f"p99 ms {bot} c={c}", f"cpu ms/turn {bot} c={c}"} <= names
        assert f"ratio orchestrator/echo c={c}" in names
    assert "scale-out 2/1 instances" in names
    for c in over_sockets:
        for label in ("socket x1", f"socket x{c}"):
            assert {f"turns/s orchestrator {label} c={c}", f"p99 ms orchestrator {label} c={c}"} <= names
            assert {f"ratio {label}/http c={c}", f"p99 ratio {label}/http c={c}"} <= names
    assert all(isinstance(r["value"], float) and isinstance(r["unit"], str) for r in report["rows"])

    # The orchestrator wrote call state under the run's prefix, and it is all gone.
    assert report["deleted_keys"] > 0 and report["keys_left"] == 0


def test_cli_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    require_real_redis_sync()
    output = tmp_path / "turns.json"
    args = ["--seconds", "0.2", "--warmup", "0", "--concurrency", "2", "--redis-url", REAL_REDIS_URL]
    args += ["--many-sockets", "2"]
    out, report = run_bench("bench.turns", args, output, timeout=100)
    assert "turns/s" in out and "scale-out" in out and "streaming socket" in out
    assert list(report["points"]) == ["2"] and report["scale_out"]["concurrency"] == 2
    assert list(report["streaming"]) == ["2"]
    assert [report["streaming"]["2"][kind]["sockets"] for kind in ("one", "many")] == [1, 2]
    assert report["ok"] and report["keys_left"] == 0


def test_cli_measures_http_only_when_asked(tmp_path: Path) -> None:
    """``--socket-concurrency`` with no values: no streaming points."""
    require_real_redis_sync()
    output = tmp_path / "turns.json"
    args = ["--seconds", "0.1", "--warmup", "0", "--concurrency", "2", "--socket-concurrency"]
    _, report = run_bench("bench.turns", [*args, "--redis-url", REAL_REDIS_URL], output, timeout=100)
    assert report["streaming"] == {} and report["parameters"]["socket_concurrency"] == []
    assert report["ok"] and report["keys_left"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "1", "8", "--socket-concurrency", "64"],  # no HTTP point beside it
        ["--concurrency", "1", "8", "--socket-concurrency", "1"],  # one socket is many
        ["--many-sockets", "1"],
    ],
)
def test_cli_refuses_streaming_points_it_cannot_compare(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.turns", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "socket" in done.stderr
