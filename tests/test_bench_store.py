"""The round-trip, memory and machine benches at smoke size: their rows' shape and the
facts they check (never a timing, nor a byte count that varies with the Redis version)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis

from bench import machine, memory, roundtrips
from states import State
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync

pytestmark = pytest.mark.real_redis


def check_rows(report: dict[str, Any]) -> dict[str, float]:
    rows = report["rows"]
    assert rows and all(set(r) == {"name", "value", "unit"} for r in rows)
    assert all(isinstance(r["value"], int | float) and math.isfinite(r["value"]) for r in rows)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    return {r["name"]: r["value"] for r in rows}


def no_keys_left(prefix: str) -> bool:
    client = redis.Redis.from_url(REAL_REDIS_URL)
    try:
        return not list(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


def test_roundtrips_per_kind_of_turn() -> None:
    require_real_redis_sync()
    report = roundtrips.bench(REAL_REDIS_URL, smoke=True, say=lambda _: None)
    rows = check_rows(report)
    for variant in report["variants"]:
        assert variant["deleted_keys"] > 0 and no_keys_left(variant["prefix"])
        for kind in roundtrips.KINDS:
            figures = variant["kinds"][kind]
            trips = figures["round_trips_per_turn"]
            assert trips >= 1 and abs(trips - round(trips)) < 0.01  # the same every turn
            # Every turn loads and commits: the server ran the commit script at least.
            assert figures["commands_by_name_per_turn"].get("evalsha", 0) >= 1
            assert figures["commands_per_turn"] > trips
    assert {v["instances"] for v in report["variants"]} == {1, 2}
    assert rows["1 instance: ordinary message: round trips/turn"] > 0


def test_memory_per_call_by_key_kind() -> None:
    require_real_redis_sync()
    report = memory.bench(REAL_REDIS_URL, smoke=True, say=lambda _: None)
    rows = check_rows(report)
    assert report["deleted_keys"] > 0 and no_keys_left(report["prefix"])
    for kind, figures in report["call_keys"].items():
        if kind in memory.NONE_HERE:  # no call of the bench has one (no variables: no gather)
            assert figures["calls_holding_it"] == 0, kind
            continue
        assert figures["bytes_per_call_holding_it"] > 0, kind
        assert figures["encodings"], kind
    # The record holds no long value (its reference is in a key of its own): a compact hash
    # (a listpack; a ziplist before Redis 7), never a hashtable.
    assert set(report["call_keys"]["call"]["encodings"]) <= {"listpack", "ziplist"}
    assert report["call_keys"]["outbox"]["calls_holding_it"] < report["parameters"]["calls"]
    for name, figures in report["shared"].items():
        assert figures["keys"] > 0 and figures["bytes"] > 0, name
    assert rows["all: bytes/call"] > rows["call keys: bytes/call"] > 0


def test_machine_runs_the_shipped_flow_both_ways() -> None:
    report = machine.bench("", smoke=True, say=lambda _: None)
    rows = check_rows(report)
    assert {c["state_after"] for c in report["cases"].values()} == {s.value for s in State}
    for name, case in report["cases"].items():
        # An event that fires no trigger (plain input to the bot) has no machine part.
        assert (rows[f"{name}: machine part, Dispatch"] > 0) == bool(case["triggers"]), name
    assert all(v > 0 for name, v in rows.items() if "machine part" not in name)
