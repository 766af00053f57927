"""The simulator's scripted mode: every shipped scenario passes against the bot, a wrong
expectation or an unexpected reply fails, and bad scenario files are clear errors."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from rich.console import Console

from app import create_app
from orchestrator.config import load_settings
from simulator import scenario as scenarios
from simulator.call import Transport
from simulator.cli import run_scripted
from tests.process import ROOT

DEFAULT_FLOW = ROOT / "orchestrator" / "callflow.default.yaml"


@pytest.fixture
async def bot_url(tmp_path: Path, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The bot as `make run` starts it (embedded Redis, default flow), but with a 2 s
    no-answer watchdog so the no-answer scenario ends quickly; on a loopback port."""
    for name in ("MicrosoftAppId", "MicrosoftAppPassword", "REDIS_URL", "OPERATOR_TOKEN", "CALLFLOW_FILE"):
        monkeypatch.delenv(name, raising=False)
    flow = yaml.safe_load(DEFAULT_FLOW.read_text())
    flow["transfer"]["timeout_seconds"] = 2
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    settings = load_settings(
        REDIS_URL=None,
        REDIS_KEY_PREFIX=key_prefix,
        CALLFLOW_FILE=tmp_path / "flow.yaml",
        SCHEDULER_POLL_SECONDS=0.1,
    )
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/"))
    await server.close()


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, highlight=False), out


def test_a_scenario_for_every_documented_behaviour_is_shipped() -> None:
    names = {path.stem for path in scenarios.shipped()}
    assert {
        "welcome-and-billing",
        "echo",
        "transfer-accepted",
        "transfer-accepted-generic",
        "transfer-failed-retry-final",
        "transfer-no-answer",
        "failed-then-carry-on",
        "handback",
        "late-and-duplicate-statuses",
        "speech-and-redelivery",
        "unknown-call",
    } <= names
    for path in scenarios.shipped():
        assert scenarios.load(path).steps  # every one parses


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_every_shipped_scenario_passes(bot_url: str, transport: Transport) -> None:
    """Over POSTs and over the Telephony channel's streaming socket alike."""
    screen, out = console()
    code = await run_scripted([bot_url], scenarios.shipped(), "127.0.0.1:0", screen, transport)
    report = out.getvalue()
    assert code == 0, report
    assert f"{len(scenarios.shipped())} passed, 0 failed" in report
    assert report.count("PASS") == len(scenarios.shipped())


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_a_wrong_expectation_fails_at_its_step(bot_url: str, tmp_path: Path) -> None:
    wrong_target = write(
        tmp_path,
        "wrong-target",
        {
            "name": "expects another number",
            "steps": [
                "start",
                {"expect_prompt": {"contains": "Thank you"}},
                {"press": "0"},
                {"expect_transfer": {"target": "+14255550199"}},
            ],
        },
    )
    wrong_voice = write(
        tmp_path,
        "wrong-voice",
        {
            "name": "expects billing in another voice",
            "steps": [
                "start",
                {"expect_prompt": {}},
                {"press": "1"},
                {"expect_prompt": {"voice": "en-US-GuyNeural"}},
            ],
        },
    )
    screen, out = console()
    code = await run_scripted([bot_url], [wrong_target, wrong_voice], "127.0.0.1:0", screen)
    report = out.getvalue()
    assert code == 1 and "0 passed, 2 failed" in report
    assert "step 4: expect_transfer" in report and "expected a transfer to +14255550199" in report
    assert "transfer to +14251231234" in report
    assert "expected voice en-US-GuyNeural" in report and "en-US-JessaNeural" in report


async def test_what_no_step_expected_fails_the_scenario(bot_url: str, tmp_path: Path) -> None:
    unread = write(
        tmp_path,
        "unread",
        {"name": "never reads the welcome", "steps": ["start", {"wait": 0.5}]},
    )
    screen, out = console()
    assert await run_scripted([bot_url], [unread], "127.0.0.1:0", screen) == 1
    report = out.getvalue()
    assert "after the last step: the bot sent what no step expected" in report
    assert 'unexpected: "Thank you for calling.' in report


async def test_a_bot_that_cannot_be_reached_fails_clearly(tmp_path: Path) -> None:
    screen, out = console()
    code = await run_scripted(["http://127.0.0.1:9"], [scenarios.shipped()[0]], "127.0.0.1:0", screen)
    assert code == 1 and "HTTP no answer" in out.getvalue()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"name": "x", "steps": [{"jump": 1}]}, "steps: step 1: unknown step 'jump'"),
        ({"name": "x", "steps": [{"say": "a", "press": "1"}]}, "one key per step"),
        ({"name": "x", "steps": [{"agent": "dance"}]}, "step 1: agent.answer"),
        ({"name": "x", "steps": [{"wait": "soon"}]}, "step 1: wait takes a number"),
        ({"name": "x", "steps": ["start"], "protocol": "sip"}, "protocol"),
        ({"steps": ["start"]}, "name"),
        (["start"], "a scenario is a mapping"),
    ],
)
def test_a_bad_scenario_file_names_the_file_and_the_problem(tmp_path: Path, data: Any, error: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(scenarios.ScenarioError) as caught:
        scenarios.load(path)
    assert str(caught.value).startswith(str(path)) and error in str(caught.value), str(caught.value)


async def test_the_command_line_runs_scenarios_and_exits_by_the_result(bot_url: str, tmp_path: Path) -> None:
    failing = write(tmp_path, "failing", {"name": "wrong", "steps": ["start", {"expect_transfer": {}}]})
    base = [sys.executable, "-m", "cli", "simulate", "--bot", bot_url]
    runs = {
        "shipped": [*base, "--shipped"],
        "failing": [*base, "--scenario", str(failing)],
        "bad file": [*base, "--scenario", str(write(tmp_path, "bad", {"name": "x", "steps": [{"jump": 1}]}))],
    }
    done = {}
    for name, command in runs.items():
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), 120)
        done[name] = (process.returncode, output.decode())
    assert done["shipped"][0] == 0 and "0 failed" in done["shipped"][1], done["shipped"][1]
    assert done["failing"][0] == 1 and "FAIL" in done["failing"][1]
    assert done["bad file"][0] == 1 and "unknown step 'jump'" in done["bad file"][1]


async def test_a_refused_post_says_why(bot_url: str) -> None:
    screen, out = console()
    code = await run_scripted([bot_url + "elsewhere"], [scenarios.shipped()[0]], "127.0.0.1:0", screen)
    assert code == 1 and "with HTTP 404: 404: Not Found" in out.getvalue(), out.getvalue()
