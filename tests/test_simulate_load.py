"""The simulator's load mode: many callers through the shipped scenarios (and two that
fail on purpose) against two real bot processes on the real Redis, counted exactly;
and the same through ``python -m cli simulate --calls``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis
import yaml
from yarl import URL

from simulator import scenario as scenarios
from simulator.load import FailureGroup, Unexpected, load, percentile
from tests.conftest import REAL_REDIS_URL, require_real_redis_sync
from tests.process import ROOT, BotProcess

TOKEN = "load-test-operator-token"
ECHOED = "is anybody there"
NEVER_SAID = "a prompt this bot never says"


@pytest.fixture
async def bots(key_prefix: str, tmp_path: Path) -> AsyncIterator[list[BotProcess]]:
    """Two bot processes on the real Redis, under this test's key prefix, with the default
    flow but a 2 s no-answer watchdog (so the no-answer scenario ends quickly); their keys
    are deleted once they have stopped."""
    require_real_redis_sync()
    flow = yaml.safe_load((ROOT / "orchestrator" / "flows" / "transfer-sample.yaml").read_text())
    flow["queues"]["agents"]["timeout_seconds"] = 2
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    env = {
        "REDIS_URL": REAL_REDIS_URL,
        "REDIS_KEY_PREFIX": key_prefix,
        "CALLFLOW_FILE": str(tmp_path / "flow.yaml"),
        "SCHEDULER_POLL_SECONDS": "0.1",
        "OPERATOR_TOKEN": TOKEN,  # for each instance's own /metrics
    }
    processes = [BotProcess(env, tmp_path, f"bot{i}") for i in range(2)]
    try:
        await asyncio.gather(*(bot.start() for bot in processes))
        yield processes
    finally:
        for bot in processes:
            bot.stop()
        client = redis.Redis.from_url(REAL_REDIS_URL)
        for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
            client.delete(key)
        client.close()


def write(path: Path, name: str, steps: list[object]) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "steps": steps}))
    return path


@pytest.fixture
def unexpected_reply(tmp_path: Path) -> Path:
    """Every step passes, but the echo of what the caller said is never read."""
    steps: list[object] = ["start", {"expect_prompt": {"contains": "Thank you for calling"}}]
    steps += [{"say": ECHOED}, "hang_up"]
    return write(tmp_path / "bad-unexpected.yaml", "bad: an echo nobody expects", steps)


@pytest.fixture
def wrong_prompt(tmp_path: Path) -> Path:
    """Fails at step 2: the welcome prompt is not the one expected."""
    steps: list[object] = ["start", {"expect_prompt": {"contains": NEVER_SAID}}]
    return write(tmp_path / "bad-mismatch.yaml", "bad: a prompt that never comes", steps)


def posts(scenario: scenarios.Scenario, steps: int | None = None) -> int:
    """The activities the caller and agent side post in the first ``steps`` steps."""
    posting = {"start", "hang_up", "redeliver", "say", "press", "status"}
    return sum(
        step.kind in posting or (step.kind == "agent" and step.arg.answer != "no_answer")
        for step in scenario.steps[:steps]
    )


async def turns_answered(bot: BotProcess) -> int:
    """Activities this instance answered, from its own /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{bot.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as response,
    ):
        text = await response.text()
    match = re.search(r"^cc_turn_seconds_count (\S+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match.group(1)))


def test_percentiles_are_nearest_rank() -> None:
    values = [40.0, 15.0, 50.0, 35.0, 20.0]  # unsorted on purpose
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert percentile(list(map(float, range(1, 101))), 95) == 95
    assert percentile(list(map(float, range(1, 101))), 99) == 99
    assert percentile([], 50) is None


async def test_load_over_two_bots_counts_every_call_turn_and_transfer(
    bots: list[BotProcess], unexpected_reply: Path, wrong_prompt: Path
) -> None:
    files = [*scenarios.shipped("transfer-sample"), unexpected_reply, wrong_prompt]
    mix = [scenarios.load(path) for path in files]
    calls = 40
    summary = await load([bot.url for bot in bots], files, calls=calls, rate=20)

    ran = [mix[i % len(mix)] for i in range(calls)]  # call i runs scenario i mod len(mix)
    good = [s for s in ran if s.source not in (str(unexpected_reply), str(wrong_prompt))]
    echoed = sum(s.source == str(unexpected_reply) for s in ran)
    mismatched = sum(s.source == str(wrong_prompt) for s in ran)
    assert echoed and mismatched
    wrong = next((group.reason for group in summary.failures if NEVER_SAID in group.reason), "")
    assert sorted(summary.failures, key=lambda group: group.reason) == [
        FailureGroup(wrong, mismatched, f"{mix[-1].name}, step 2 ({mix[-1].steps[1]})"),
        FailureGroup("the bot sent what no step expected", echoed, f"{mix[-2].name}, after the last step"),
    ], summary.failures
    assert wrong.startswith(f"expected a prompt containing {NEVER_SAID!r}, the bot said"), wrong
    assert (summary.calls, summary.passed, summary.failed) == (calls, len(good), echoed + mismatched)
    assert summary.scenarios == {
        s.name: {
            "passed": 0 if s in mix[-2:] else ran.count(s),
            "failed": ran.count(s) if s in mix[-2:] else 0,
        }
        for s in mix
    }
    assert summary.unexpected == echoed
    [example] = summary.unexpected_examples
    assert example == Unexpected(mix[-2].name, example.activity, echoed) and ECHOED in example.activity
    assert summary.errors == {}
    assert not summary.ok

    # Every post was answered, and each step that expects a transfer read exactly one.
    expected_turns = sum(posts(s) for s in ran if s is not mix[-1]) + mismatched * posts(mix[-1], 1)
    assert summary.turns == expected_turns > 0
    assert summary.transfers == sum(step.kind == "expect_transfer" for s in good for step in s.steps) > 0
    assert summary.received >= summary.transfers + summary.unexpected
    latency = summary.latency_ms
    assert None not in latency.values()
    assert latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]  # type: ignore[operator]

    # Round-robin: both bots took turns, alternately, and each says so in its own metrics.
    per_bot = [summary.posts_per_bot[str(URL(f"{bot.url}/api/messages"))] for bot in bots]
    assert sum(per_bot) == summary.turns and abs(per_bot[0] - per_bot[1]) <= 1
    assert [await turns_answered(bot) for bot in bots] == per_bot

    figures = json.loads(json.dumps(summary.as_dict()))  # plain data, for the benchmarks
    assert figures["calls"] == calls and figures["ok"] is False
    assert sorted(group["count"] for group in figures["failures"]) == sorted([echoed, mismatched])


async def simulate(*args: str) -> tuple[int, str]:
    """``python -m cli simulate ARGS`` as a process: its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "simulate",
        *args,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},  # wide enough that no line of the tables wraps
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return await process.wait(), out.decode()


def row(out: str, label: str) -> str:
    """The value on the summary table's row ``label``."""
    match = re.search(rf"^│ {label} +│ (.*?) *│$", out, re.MULTILINE)
    return match.group(1) if match else ""


async def test_the_cli_runs_a_load_and_prints_the_summary(
    bots: list[BotProcess], unexpected_reply: Path
) -> None:
    urls = [bot.url for bot in bots]
    accepted = str(scenarios.SHIPPED / "transfer-sample" / "transfer-accepted.yaml")
    code, out = await simulate("--bot", *urls, "--calls", "10", "--rate", "20", "--scenario", accepted)
    assert code == 0, out
    assert "Load summary" in out
    assert row(out, "calls") == "10 (10 passed, 0 failed)", out
    assert row(out, "transfers") == "10" and row(out, "errors") == "none", out
    latency = r"p50 [\d.,]+ ms, p95 [\d.,]+ ms, p99 [\d.,]+ ms, max [\d.,]+ ms"
    assert re.fullmatch(latency, row(out, "turn latency")), out
    assert all(f"{url}/api/messages: " in out for url in urls), out
    assert "10 passed, 0 failed" in out.splitlines()[-1]

    # Half of the calls get a reply they did not expect: exit 1, and the summary says why.
    both = ["--scenario", accepted, "--scenario", str(unexpected_reply)]
    code, out = await simulate("--bot", *urls, "--calls", "10", "--rate", "20", *both)
    assert code == 1, out
    assert row(out, "calls") == "10 (5 passed, 5 failed)", out
    assert row(out, "unexpected") == "5", out
    assert "the bot sent what no step expected" in out and ECHOED in out


async def test_load_over_streaming_sockets_to_two_bots(bots: list[BotProcess]) -> None:
    """The load mode as the Telephony channel would bring it: every call over a socket,
    sockets to both bots, the watchdog's prompts sent over them too."""
    files = scenarios.shipped("transfer-sample")
    calls = 2 * len(files)
    summary = await load([bot.url for bot in bots], files, calls=calls, rate=20, transport="websocket")
    assert (summary.calls, summary.passed, summary.failed) == (calls, calls, 0), summary.failures
    assert summary.errors == {} and summary.unexpected == 0
    per_bot = [summary.posts_per_bot[str(URL(f"{bot.url}/api/messages"))] for bot in bots]
    assert sum(per_bot) == summary.turns and all(per_bot), per_bot  # both bots carried calls
    assert [await turns_answered(bot) for bot in bots] == per_bot
