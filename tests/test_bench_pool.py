"""The warm-transfer benchmark, run small against the real Redis: its checks hold and
every figure is reported. No timing is asserted (the machine is shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import run_bench

pytestmark = pytest.mark.real_redis


def test_the_pool_bench_compares_warm_with_cold_and_contends_without_overlaps(tmp_path: Path) -> None:
    require_real_redis_sync()
    out, report = run_bench("bench.pool", ["--smoke", "--redis-url", REAL_REDIS_URL], tmp_path / "pool.json")
    assert "all checks pass" in out
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    figures = {r["name"]: r["value"] for r in report["rows"]}
    assert figures["ratio warm/cold turns/s"] > 0
    assert figures["contended: overlaps"] == figures["contended: lapses"] == 0
    assert (
        figures["contended: leased"] + figures["contended: exhausted (cold)"]
        == figures["contended: transfers"]
    )
    assert report["deleted_keys"] > 0  # its keys are gone
