"""The inspection benchmark, run small against the real Redis: every figure is in its
JSON and the counts are right. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bench.inspection import BASELINE, INDEXED, TARGETS
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT, run_bench

pytestmark = pytest.mark.real_redis

CALLS = 300


def test_bench_reports_every_figure_and_leaves_no_key(key_prefix: str, tmp_path: Path) -> None:
    require_real_redis_sync()
    output = tmp_path / "inspection.json"
    args = ["--calls", str(CALLS), "--runs", "1", "--redis-url", REAL_REDIS_URL, "--prefix", key_prefix]
    out, report = run_bench("bench.inspection", args, output, timeout=100)
    assert "calls/s" in out and "baseline" in out

    assert [(f["from"], f["to"]) for f in report["fill"]] == [(0, CALLS // 10), (CALLS // 10, CALLS)]
    assert all(f["calls_per_s"] > 0 and f["commits"] > f["calls"] for f in report["fill"])
    small, big = report["checkpoints"]
    assert (small["calls"], big["calls"]) == (CALLS // 10, CALLS)
    assert set(report["growth"]["median_ms"]) == {*INDEXED, BASELINE}

    for point in report["checkpoints"]:
        assert point["checks"] and all(point["checks"].values()), point["checks"]
        counts = point["state_counts"]
        assert sum(counts.values()) == point["calls"]
        assert counts["transferring"] == counts["accepted"] == counts["failed"] == point["calls"] // 10
        assert point["baseline_counts"] == counts  # the keyspace scan and the indexes agree
        assert set(point["transfers_per_target"]) == set(TARGETS)
        for name in [*INDEXED, BASELINE]:
            timing = point["timings_ms"][name]
            assert len(timing["runs_ms"]) == 1
            assert {"median_ms", "max_ms", "round_trips", "commands"} <= set(timing)
        assert set(point["baseline_over_indexed"]) == set(INDEXED)
        # One pipelined round trip per question: stats asks three at once (state counts,
        # counters, node counts: the shards' sets of nodes, then their indexes).
        trips = {name: point["timings_ms"][name]["round_trips"] for name in INDEXED}
        assert trips == {
            "stats 1h": 4,
            "stats 24h": 4,
            "list transferring 50": 2,
            "list failed 1000": 2,
            "state_counts": 1,
        }
        assert point["memory"]["bytes"]["state_indexes"] > 0
        assert point["memory"]["bytes_per_call"]["state_indexes"] > 0

    assert report["deleted_keys"] > 0
    client = redis.Redis.from_url(REAL_REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"{key_prefix}:*", count=1000)) == []
    finally:
        client.close()


def test_bench_refuses_a_prefix_in_use_and_leaves_its_keys(key_prefix: str) -> None:
    require_real_redis_sync()
    client = redis.Redis.from_url(REAL_REDIS_URL)
    client.set(f"{key_prefix}:somebody-else", "1")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.inspection",
                "--calls",
                "10",
                "--redis-url",
                REAL_REDIS_URL,
                "--prefix",
                key_prefix,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0 and "already holds keys" in done.stdout + done.stderr
        assert client.get(f"{key_prefix}:somebody-else") == b"1"
    finally:
        client.delete(f"{key_prefix}:somebody-else")
        client.close()


def test_the_one_bench_command_runs_every_bench_it_is_given_and_judges_nothing_at_smoke_size(
    tmp_path: Path,
) -> None:
    """``python -m bench``: medians over the runs, each run's figures kept, targets listed
    but not judged at smoke size."""
    require_real_redis_sync()
    output = tmp_path / "bench.json"
    args = ["--smoke", "--runs", "2", "--only", "machine", "memory", "--redis-url", REAL_REDIS_URL]
    out, report = run_bench("bench", args, output, timeout=100)
    assert "the issue's targets" in out

    assert set(report["suites"]) == {"machine", "memory"} and report["runs"] == 2
    for suite in report["suites"].values():
        assert len(suite["reports"]) == 2 and all(suite["checks"].values())
        for figure in suite["figures"].values():
            assert len(figure["runs"]) == 2
            assert min(figure["runs"]) <= figure["median"] <= max(figure["runs"])
    judged = {t["target"]: t for t in report["targets"]}
    assert judged["memory per live call < 8 KB (20 turns)"]["median"] > 0
    assert all(t["met"] is None for t in report["targets"])  # smoke sizes are not the targets' sizes
