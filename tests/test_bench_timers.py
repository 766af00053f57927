"""The timers benchmark, run small against the real Redis with real bot processes, over
HTTP and over streaming sockets: every watchdog fired exactly once, over sockets every
prompt went over one (sent there, or routed to the holder and served), the report has
every figure, no key is left. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.timers import SMOKE_CALLS, SUFFIX, TRANSPORTS, bench
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import run_bench

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


def assert_every_watchdog_fired_once(
    report: dict[str, Any], calls: int, instances: int, transports: tuple[str, ...] = TRANSPORTS
) -> None:
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    assert list(report["variants"]) == list(transports)
    for transport, variant in report["variants"].items():
        assert_variant(variant, transport, calls, instances)

    named = {r["name"]: r for r in report["rows"]}
    assert all(isinstance(r["value"], float) and isinstance(r["unit"], str) for r in report["rows"])
    for transport in transports:
        first = "" if transport == "http" else f"{transport} "
        assert {f"{first}{name}" for name in ROWS} <= set(named)
        assert {f"{first}fired by bot {n}" for n in range(instances)} <= set(named)
        assert named[f"{first}timers drained"]["value"] == named[f"{first}failed once"]["value"] == calls
        assert named[f"{first}duplicates"]["value"] == 0
    if "socket" in transports:
        assert {"socket sends local", "socket sends routed", "socket sends served"} <= set(named)
        assert named["socket send failures"]["value"] == 0
    json.dumps(report)  # JSON-able, as bench/__main__ writes it


def assert_variant(variant: dict[str, Any], transport: str, calls: int, instances: int) -> None:
    assert variant["checks"] and all(variant["checks"].values()), (transport, variant["checks"])
    drain, records = variant["drain"], variant["records"]
    assert drain["drained"] and drain["calls_prompted"] == drain["prompts_received"] == calls
    assert drain["duplicates"] == 0
    assert records["states"] == {"failed": calls}
    assert records["timeout_steps_per_call"] == {"1": calls}
    assert records["still_scheduled"] == 0
    assert len(variant["instances"]) == instances
    assert sum(i["fired"] for i in variant["instances"]) == calls
    for figures in (drain["lateness_s"], drain["commit_to_arrival_s"], records["commit_lateness_s"]):
        assert set(figures) == {"min", "p50", "p90", "p99", "max"}
        assert figures["min"] <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    assert sum(drain["arrivals_per_second"]) == calls
    assert set(variant["cpu_s"]) == {"bots", "redis", "bench_and_stand_in"}
    assert variant["deleted_keys"] > 0
    sends = variant["sends"]
    if transport == "http":  # POSTed: nothing went over a socket
        assert sends == {"local": 0, "routed": 0, "served": 0}
        assert all(i["calls_held"] == 0 for i in variant["instances"])
    else:
        # Each prompt went once over a socket: by the holder itself, or routed to it and
        # served there; with none failed, and every call held by one instance.
        assert sends["local"] + sends["routed"] == calls and sends["served"] == sends["routed"]
        assert not any(variant["send_failures"].values())
        assert sum(i["calls_held"] for i in variant["instances"]) == calls
        assert variant["fill_replies"] >= 2 * calls  # the welcome and the handoff, at least


def assert_no_key_left(prefix: str) -> None:
    """Nor under either variant's prefix."""
    client = redis.Redis.from_url(REAL_REDIS_URL)
    try:
        for suffix in ("", *SUFFIX.values()):
            assert list(client.scan_iter(match=f"{prefix}{suffix}:*", count=1000)) == []
    finally:
        client.close()


def test_command_line_drains_every_watchdog_once(key_prefix: str, tmp_path: Path) -> None:
    require_real_redis_sync()
    output = tmp_path / "timers.json"
    calls = 60
    args = ["--calls", str(calls), "--instances", "2", "--redis-url", REAL_REDIS_URL, "--prefix", key_prefix]
    out, report = run_bench("bench.timers", args, output, timeout=110)
    assert "all checks pass" in out and "watchdogs due at once" in out
    assert_every_watchdog_fired_once(report, calls, instances=2)
    assert_no_key_left(key_prefix)


def test_command_line_runs_one_variant_when_asked(key_prefix: str, tmp_path: Path) -> None:
    """``--transport socket``: only the socket variant, over one socket to each instance."""
    require_real_redis_sync()
    output = tmp_path / "timers.json"
    calls = 40
    args = ["--calls", str(calls), "--transport", "socket", "--sockets", "1", "--prefix", key_prefix]
    _, report = run_bench("bench.timers", [*args, "--redis-url", REAL_REDIS_URL], output, timeout=110)
    assert report["parameters"]["sockets_per_instance"] == 1
    assert_every_watchdog_fired_once(report, calls, instances=2, transports=("socket",))
    assert_no_key_left(key_prefix)


def test_bench_entry_point_at_smoke_size() -> None:
    require_real_redis_sync()
    said: list[str] = []
    report = bench(REAL_REDIS_URL, smoke=True, say=said.append)
    assert said
    assert report["parameters"]["calls"] == SMOKE_CALLS
    assert_every_watchdog_fired_once(report, SMOKE_CALLS, instances=2)
    assert report["parameters"]["transports"] == ["http", "socket"]
    assert_no_key_left(report["parameters"]["prefix"])
