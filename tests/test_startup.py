"""Start-up: a bad setting or call flow file stops ``python app.py`` with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.process import ROOT

DEFAULT_FLOW = ROOT / "orchestrator" / "flows" / "transfer-sample.yaml"


def start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CALLFLOW_FILE", "REDIS_URL", "PORT")}
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def bad_flow(tmp_path: Path, **transfer: object) -> str:
    data = yaml.safe_load(DEFAULT_FLOW.read_text())
    data["queues"]["agents"].update(transfer)
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "eighty"}, "configuration error: PORT: "),
        ({"REDIS_URL": "http://redis:6379"}, "configuration error: REDIS_URL: must start with"),
        ({"CALLFLOW_FILE": "/no/such/flow.yaml"}, "configuration error: CALLFLOW_FILE: no such file"),
        # The default flow's watchdog is 60 s: a call must be kept at least twice that.
        (
            {"CALL_IDLE_TTL_SECONDS": "60"},
            "configuration error: CALL_IDLE_TTL_SECONDS: must be at least twice",
        ),
        (
            {"CALL_MAX_LIFETIME_SECONDS": "100"},
            "configuration error: CALL_MAX_LIFETIME_SECONDS: must be at least twice",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it(env: dict[str, str], expected: str) -> None:
    result = start(env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr


def test_a_bad_call_flow_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    path = bad_flow(tmp_path, targets=["+1 425-123-1234"])
    result = start({"CALLFLOW_FILE": path})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"configuration error: {path}: queues.agents.targets.0: '+1 425-123-1234'"), last
    assert "Traceback" not in result.stderr


def test_a_lease_shorter_than_an_action_may_take_stops_start_up() -> None:
    """A timer that runs the account lookup (3 s) must be done before its 5 s claim lapses."""
    flow = str(ROOT / "orchestrator" / "flows" / "account-lookup.yaml")
    result = start({"CALLFLOW_FILE": flow, "SCHEDULER_LEASE_SECONDS": "5"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "configuration error: SCHEDULER_LEASE_SECONDS: must be at least twice "
        "nodes.lookup.timeout_seconds (3 s): a timer that runs the action must be done "
        "before another instance may claim it"
    ), result.stderr


def test_an_action_may_not_take_longer_than_a_turn_allows(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "orchestrator" / "flows" / "account-lookup.yaml").read_text())
    data["nodes"]["lookup"]["timeout_seconds"] = 20
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    last = start({"CALLFLOW_FILE": str(path)}).stderr.strip().splitlines()[-1]
    assert last.startswith(f"configuration error: {path}: nodes.lookup"), last
    assert "timeout_seconds" in last and "10" in last, last
