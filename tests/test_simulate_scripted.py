"""The simulator's scripted mode: every shipped scenario passes against the bot, a wrong
expectation or an unexpected reply fails, and bad scenario files are clear errors. The
keypad, silence and the bot hanging up are checked against a stub bot of the test's own,
which records what reaches it as the Telephony channel would send it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet
from rich.console import Console

from adapters.framing import CONTENT_TYPE, Request, Response, new_id
from adapters.streaming import StreamingConnection
from app import create_app
from orchestrator.callflow import load_callflow, shipped_flow
from orchestrator.config import load_settings
from simulator import scenario as scenarios
from simulator.call import Transport
from simulator.channel import Caller
from simulator.cli import run_scripted, wired
from tests.conftest import REAL_REDIS_URL, delete_prefix, real_redis_or_skip
from tests.process import ROOT, BotProcess, flow_doc, write_flow

SAMPLE_FLOW = ROOT / "orchestrator" / "flows" / "transfer-sample.yaml"
SAMPLE = "transfer-sample"  # its scenarios, which most tests here play
WARM = "warm-transfer"  # the example warm-transfer flow: a pool of numbers and a context API
AGENT_TOKEN = "agent-token-for-simulator-tests-0123"  # the bots' AGENT_TOKEN, and the simulator's
# The default flow's hours are Monday to Friday, 8 to 18 in New York.
OPEN = datetime.fromisoformat("2026-12-07T10:00-05:00")  # a Monday morning
CLOSED = datetime.fromisoformat("2026-12-05T10:00-05:00")  # a Saturday


@asynccontextmanager
async def serving(
    flow: dict[str, Any], tmp_path: Path, key_prefix: str, **settings: Any
) -> AsyncIterator[str]:
    """The bot as `make run` starts it (embedded Redis) on ``flow``, on a loopback port: its URL."""
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(flow))
    server = TestServer(
        create_app(
            load_settings(
                REDIS_URL=None,
                REDIS_KEY_PREFIX=key_prefix,
                CALLFLOW_FILE=tmp_path / "flow.yaml",
                SCHEDULER_POLL_SECONDS=0.1,
                **settings,
            )
        ),
        host="127.0.0.1",
    )
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


@pytest.fixture
def bot_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's environment kept out of the bots this file starts."""
    for name in (
        *("MicrosoftAppId", "MicrosoftAppPassword", "REDIS_URL", "OPERATOR_TOKEN", "CALLFLOW_FILE"),
        *("AGENT_TOKEN", "AGENT_RATE_LIMIT", "PUSH_URL", "PUSH_SECRET"),
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def bot_url(tmp_path: Path, key_prefix: str, bot_environment: None) -> AsyncIterator[str]:
    """The bot on the transfer sample flow with a 2 s no-answer watchdog, so the no-answer
    scenario ends quickly."""
    flow = yaml.safe_load(SAMPLE_FLOW.read_text())
    flow["queues"]["agents"]["timeout_seconds"] = 2
    async with serving(flow, tmp_path, key_prefix) as url:
        yield url


def quick(flow: dict[str, Any]) -> dict[str, Any]:
    """A shipped flow with its waits shortened (prompts said at once, short timers), so
    its scenarios, written for the real timings, run in seconds."""
    flow["speaking_rate"] = 1000
    if flow.get("defaults", {}).get("no_input"):
        flow["defaults"]["no_input"]["seconds"] = 3
    for node in flow["nodes"].values():
        if node["type"] == "gather":
            node["inter_digit_seconds"] = 2
    for queue in flow["queues"].values():
        queue["timeout_seconds"] = 3
        if "pool_exhausted" in queue:
            queue["pool_exhausted"]["seconds"] = 1
    return flow


def agent_side(flow_name: str, token: str | None = AGENT_TOKEN) -> scenarios.AgentSide:
    """What the simulator knows of a bot on the shipped flow ``flow_name``: its pools, and
    the bots' agent token."""
    return scenarios.AgentSide.of(load_callflow(shipped_flow(f"{flow_name}.yaml")), token, flow_name)


@pytest.fixture(
    params=[("default", OPEN), ("default", CLOSED), ("account-lookup", OPEN), (WARM, OPEN)], ids=str
)
async def flow_bot(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str, bot_environment: None
) -> AsyncIterator[tuple[str, str, datetime]]:
    """The bot on a shipped flow with its clock pinned (HOURS_CLOCK) in or out of opening
    hours: (its URL, the flow's name, its clock)."""
    flow_name, clock = request.param
    flow = quick(yaml.safe_load(shipped_flow(f"{flow_name}.yaml").read_text()))
    async with serving(flow, tmp_path, key_prefix, HOURS_CLOCK=clock, AGENT_TOKEN=AGENT_TOKEN) as url:
        yield url, flow_name, clock


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, highlight=False), out


def test_a_scenario_for_every_documented_behaviour_is_shipped() -> None:
    assert scenarios.shipped_flows() == ["account-lookup", "default", SAMPLE, WARM]
    assert {path.stem for path in scenarios.shipped("account-lookup")} == {
        "gold-customer-priority",
        "standard-customer",
        "unknown-account",
        "lookup-fails",
    }
    assert {path.stem for path in scenarios.shipped()} == {
        "notice-menu-and-goodbye",
        "billing-current-customer",
        "account-number-retries",
        "billing-new-customer-retry",
        "support-next-agent",
        "agent-final-failure-goodbye",
        "agent-no-answer",
        "not-understood-then-agent",
        "silence-then-goodbye",
        "closed",
        "handback",
        "caller-hangs-up",
    }
    names = {path.stem for path in scenarios.shipped(SAMPLE)}
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
    assert {path.stem for path in scenarios.shipped(WARM)} == {
        "welcome-and-billing",
        "echo",
        "unknown-call",
        "agent-warm-transfer",
        "failed-then-retry-leases-again",
    }
    for flow in scenarios.shipped_flows():
        for path in scenarios.shipped(flow):
            assert scenarios.load(path).steps  # every one parses


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_every_shipped_scenario_passes(bot_url: str, transport: Transport) -> None:
    """Over POSTs and over the Telephony channel's streaming socket alike."""
    screen, out = console()
    code = await run_scripted([bot_url], scenarios.shipped(SAMPLE), "127.0.0.1:0", screen, transport)
    report = out.getvalue()
    assert code == 0, report
    assert f"{len(scenarios.shipped(SAMPLE))} passed, 0 failed" in report
    assert report.count("PASS") == len(scenarios.shipped(SAMPLE))


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_each_flows_scenarios_pass_at_the_bots_clock(
    flow_bot: tuple[str, str, datetime], transport: Transport
) -> None:
    """The default flow open runs every scenario but the closed one; closed, the closed one
    and those that need no hours, and the others are skipped, saying why. The example
    flows that run user code and that warm-transfer through a pool have no hours: all of
    their scenarios run (the warm transfer's with the bot's agent token)."""
    url, flow_name, clock = flow_bot
    hours = scenarios.BotHours.of(load_callflow(shipped_flow(f"{flow_name}.yaml")), clock)
    files = scenarios.shipped(flow_name)
    needs = {path.stem: scenarios.load(path).hours for path in files}
    runnable = [name for name, need in needs.items() if need in (None, hours.said)]
    screen, out = console()
    code = await run_scripted([url], files, "127.0.0.1:0", screen, transport, hours, agent_side(flow_name))
    report = out.getvalue()
    assert code == 0, report
    skipped = len(files) - len(runnable)
    assert f"{len(runnable)} passed, 0 failed" in report and report.count("PASS") == len(runnable)
    assert report.count("SKIP") == skipped and (skipped > 0) is (flow_name == "default")
    if skipped:
        assert "(pin the bot's clock with HOURS_CLOCK and pass the same --clock)" in report
    assert ("closed" in runnable) is (clock == CLOSED)


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
    code = await run_scripted(["http://127.0.0.1:9"], [scenarios.shipped(SAMPLE)[0]], "127.0.0.1:0", screen)
    assert code == 1 and "HTTP no answer" in out.getvalue()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"name": "x", "steps": [{"jump": 1}]}, "steps: step 1: unknown step 'jump'"),
        ({"name": "x", "steps": [{"say": "a", "press": "1"}]}, "one key per step"),
        ({"name": "x", "steps": [{"agent": "dance"}]}, "step 1: agent.answer"),
        ({"name": "x", "steps": [{"wait": "soon"}]}, "step 1: wait takes a number"),
        (
            {"name": "x", "steps": ["start", {"press": "12a"}]},
            "step 2: press: a keypad has 0-9, * and #; not 'a'",
        ),
        ({"name": "x", "steps": [{"press": "1 2"}]}, "step 1: press: a keypad has 0-9, * and #; not ' '"),
        ({"name": "x", "steps": [{"press": ""}]}, "step 1: press: no key to press"),
        ({"name": "x", "steps": [{"silence": 0}]}, "step 1: silence: seconds above 0, at most 120; not 0"),
        ({"name": "x", "steps": [{"silence": 121}]}, "step 1: silence: seconds above 0, at most 120"),
        ({"name": "x", "steps": [{"silence": "long"}]}, "step 1: silence takes a number"),
        ({"name": "x", "steps": ["silence"]}, "step 1: silence takes a number"),
        ({"name": "x", "steps": [{"expect_hangup": "soon"}]}, "step 1: expect_hangup takes a number"),
        (
            {"name": "x", "steps": [{"expect_hangup": 0}]},
            "step 1: expect_hangup: seconds above 0, at most 600",
        ),
        (
            {"name": "x", "steps": ["start", "expect_context"]},
            "step 2: expect_context asks about the number a transfer dialled: an expect_transfer must "
            "come before it",
        ),
        (
            {"name": "x", "steps": [{"expect_transfer": {}}, {"expect_context": {"atempt": 1}}]},
            "step 2: expect_context.atempt: Extra inputs are not permitted",
        ),
        (
            {"name": "x", "steps": [{"expect_transfer": {}}, {"expect_context": {"attempt": 0}}]},
            "step 2: expect_context.attempt: Input should be greater than or equal to 1",
        ),
        (
            {"name": "x", "steps": [{"expect_transfer": {}}, {"expect_context": {"variables": ["a"]}}]},
            "step 2: expect_context.variables: Input should be a valid dictionary",
        ),
        ({"name": "x", "steps": [{"expect_transfer": {"pools": "agents"}}]}, "step 1: expect_transfer.pools"),
        ({"name": "x", "steps": [{"expect_context": "agents"}]}, "step 1: expect_context"),
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
        "shipped": [*base, "--shipped", "--flow", SAMPLE],
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


async def test_the_command_line_plays_a_flow_at_the_bots_clock(flow_bot: tuple[str, str, datetime]) -> None:
    """`--shipped` plays a flow's scenarios (the default flow's unless `--flow` says);
    `--clock` says what the bot's clock is."""
    url, flow_name, clock = flow_bot
    base = [sys.executable, "-m", "cli", "simulate", "--bot", url, "--shipped"]
    if flow_name != scenarios.DEFAULT_FLOW:
        base += ["--flow", flow_name]
    runs = {
        "at its clock": [*base, "--clock", clock.isoformat()],
        "no zone": [*base, "--clock", "2026-12-07T10:00"],
        "unknown flow": [*base, "--flow", "nonesuch"],
    }
    # The agent token from the environment, as the bot's own AGENT_TOKEN would be.
    env = {**os.environ, "AGENT_TOKEN": AGENT_TOKEN}
    done = {}
    for name, command in runs.items():
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), 120)
        done[name] = (process.returncode, output.decode())
    code, report = done["at its clock"]
    assert code == 0 and " 0 failed" in report, report
    assert ("PASS  closed.yaml" in report) is (clock == CLOSED), report
    assert ("PASS  agent-warm-transfer.yaml" in report) is (flow_name == WARM), report
    assert done["no zone"][0] == 2 and "has no zone" in done["no zone"][1]
    assert (
        done["unknown flow"][0] == 2
        and "'nonesuch' is not one of 'account-lookup', 'default', 'transfer-sample', 'warm-transfer'"
        in (done["unknown flow"][1])
    )


# --- warm transfers: a pool's numbers and the context API ---------------------------------


@pytest.fixture
async def warm_bot(
    tmp_path: Path, key_prefix: str, bot_environment: None
) -> AsyncIterator[tuple[str, scenarios.AgentSide]]:
    """The bot on the example warm-transfer flow with short timers and a pool of ten
    numbers (so calls at once never find it exhausted), its context API open with
    AGENT_TOKEN: its URL, and what the simulator knows of it."""
    flow = quick(yaml.safe_load(shipped_flow(f"{WARM}.yaml").read_text()))
    flow["pools"]["agents"]["numbers"] = [f"+1425555{n:04d}" for n in range(200, 210)]
    async with serving(flow, tmp_path, key_prefix, AGENT_TOKEN=AGENT_TOKEN) as url:
        yield url, scenarios.AgentSide.of(load_callflow(tmp_path / "flow.yaml"), AGENT_TOKEN, WARM)


async def test_without_an_agent_token_context_scenarios_are_skipped_saying_why(
    warm_bot: tuple[str, scenarios.AgentSide],
) -> None:
    url, agents = warm_bot
    screen, out = console()
    no_token = scenarios.AgentSide(agents.pools, None, WARM)
    code = await run_scripted([url], scenarios.shipped(WARM), "127.0.0.1:0", screen, agents=no_token)
    report = out.getvalue()
    assert code == 0 and "3 passed, 0 failed, 2 skipped" in report, report
    assert "SKIP  agent-warm-transfer.yaml" in report and "SKIP  failed-then-retry-leases-again" in report
    assert (
        report.count(
            "expect_context asks the bot's context API, which needs the bot's AGENT_TOKEN "
            "(pass --agent-token or set AGENT_TOKEN)"
        )
        == 2
    ), report


async def test_wrong_warm_transfer_expectations_fail_at_their_step(
    warm_bot: tuple[str, scenarios.AgentSide], tmp_path: Path
) -> None:
    url, agents = warm_bot
    transfer = ["start", {"expect_prompt": {}}, {"say": "my order is late"}, {"expect_prompt": {}}]
    transfer += [{"press": "0"}, {"expect_transfer": {"pool": "agents"}}]
    wrong = {
        "attempt": {"attempt": 2},
        "transcript": {"transcript_contains": ["my order is late", "never said"]},
        "caller": {"caller": "+14255550123"},  # shown masked
        "variables": {"variables": {"account": "1234"}},
        "reason": {"reason_contains": "said"},
    }
    files = [
        write(tmp_path, name, {"name": f"wrong {name}", "steps": [*transfer, {"expect_context": context}]})
        for name, context in wrong.items()
    ]
    files.append(
        write(
            tmp_path,
            "pool",
            {"name": "no such pool", "steps": [*transfer[:-1], {"expect_transfer": {"pool": "nonesuch"}}]},
        )
    )
    screen, out = console()
    code = await run_scripted([url], files, "127.0.0.1:0", screen, agents=agents)
    report = out.getvalue()
    assert code == 1 and "0 passed, 6 failed" in report, report
    for expected in (
        "step 7: expect_context: {attempt: 2}: expected",
        "expected the context's attempt 2, it is 1",
        "the context's transcript lacks 'never said': ",
        "expected the context's caller '+14255550123', it is '+********123'",
        "expected the context to carry {'account': '1234'}, it carries {}",
        "expected the context's reason to contain 'said', it is 'pressed 0'",
        "step 6: expect_transfer: {pool: nonesuch}: the flow",
        "the flow warm-transfer has no pool 'nonesuch' (its pools: agents); is --flow the bot's?",
    ):
        assert expected in report, report

    # The agent side with another token, or another idea of the pool's numbers.
    right = write(tmp_path, "right", {"name": "right", "steps": [*transfer, "expect_context"]})
    for agent_side, expected in (
        (
            scenarios.AgentSide(agents.pools, "not-the-agent-token-0123456789", WARM),
            "answered HTTP 401 for +1425555",
        ),
        (
            scenarios.AgentSide({"agents": ("+14255550999",)}, AGENT_TOKEN, WARM),
            "expected a transfer to a number of pool agents (+14255550999), the bot sent transfer to +142",
        ),
        (agents, ""),
    ):
        screen, out = console()
        code = await run_scripted([url], [right], "127.0.0.1:0", screen, agents=agent_side)
        report = out.getvalue()
        assert (code == 0) is (not expected) and expected in report, report


def test_the_warm_transfer_steps_read_as_documented() -> None:
    scenario = scenarios.Scenario.model_validate(
        {
            "name": "x",
            "steps": [
                {"expect_transfer": {"pool": "agents"}},
                "expect_context",
                {"expect_context": {"attempt": 2, "transcript_contains": "late"}},
            ],
        }
    )
    transfer, bare, context = scenario.steps
    assert transfer.arg.pool == "agents" and scenario.needs_agent_token
    assert bare.arg == scenarios.ExpectContext()
    assert context.arg.attempt == 2 and context.arg.transcript_contains == ("late",)  # one, or a list
    assert not scenarios.Scenario.model_validate({"name": "y", "steps": ["start"]}).needs_agent_token


async def test_load_mode_plays_warm_transfers_and_leaves_out_what_needs_a_token(
    warm_bot: tuple[str, scenarios.AgentSide],
) -> None:
    from simulator.load import load

    url, agents = warm_bot
    files = scenarios.shipped(WARM)
    summary = await load([url], files, calls=10, rate=20, agents=agents)
    assert summary.ok and summary.passed == 10, summary.failures
    assert summary.transfers == 2 * (1 + 2)  # each scenario twice: one transfer, and a retry's two
    # Without the token, the command line leaves out the scenarios that ask the context API.
    env = {name: value for name, value in os.environ.items() if name != "AGENT_TOKEN"}
    command = [sys.executable, "-m", "cli", "simulate", "--bot", url, "--flow", WARM, "--calls", "3"]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
    assert process.returncode == 0, output
    assert "left out: agent-warm-transfer.yaml: expect_context asks the bot's context API" in output
    assert "left out: failed-then-retry-leases-again.yaml" in output and "3 passed, 0 failed" in output


async def test_a_refused_post_says_why(bot_url: str) -> None:
    screen, out = console()
    code = await run_scripted([bot_url + "elsewhere"], [scenarios.shipped(SAMPLE)[0]], "127.0.0.1:0", screen)
    assert code == 1 and "with HTTP 404: 404: Not Found" in out.getvalue(), out.getvalue()


def test_the_keypad_silence_and_hangup_steps_read_as_documented() -> None:
    scenario = scenarios.Scenario.model_validate(
        {"name": "x", "steps": [{"press": "0*#"}, {"silence": 6}, "expect_hangup", {"expect_hangup": 10}]}
    )
    assert [str(step) for step in scenario.steps] == [
        "press: 0*#",
        "silence: 6.0",
        "expect_hangup",
        "expect_hangup: 10.0",
    ]


def test_a_caller_presses_one_message_per_key() -> None:
    caller = Caller("http://channel.invalid/")
    keys = caller.press("0*#")
    assert [key["text"] for key in keys] == ["0", "*", "#"]
    assert all(key["type"] == "message" and key["entities"] == [{"type": "DTMF"}] for key in keys)
    assert len({key["id"] for key in keys}) == 3
    assert "entities" not in caller.say("zero")  # speech carries no DTMF entity
    for wrong in ("1a", "", "12 3"):
        with pytest.raises(ValueError, match=r"no key to press|a keypad has 0-9, \* and #"):
            caller.press(wrong)


# --- a stub bot: what reaches it, and what it says back --------------------------------

Answer = Callable[[dict[str, Any]], list[dict[str, Any]]]


def label(activity: dict[str, Any]) -> str:
    return f"{activity['type']} {activity.get('text') or ''}".strip()


class StubBot:
    """A bot of the test's own, over POSTs (replying to the serviceUrl) and over the
    streaming socket (replying on it). ``answer`` gives its replies to each activity; a
    reply with ``after`` is sent that many seconds later, on its own. ``events`` is what
    reached it and what it sent, in order."""

    def __init__(self) -> None:
        self.answer: Answer = lambda _: []
        self.received: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.sockets: dict[str, StreamingConnection] = {}  # conversation -> the socket it came on
        self.later: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> StubBot:
        app = web.Application()
        app.router.add_post("/api/messages", self._post)
        app.router.add_get("/api/messages", self._socket)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        self.url = str(self.server.make_url("/"))
        return self

    async def close(self) -> None:
        for task in self.later:
            task.cancel()
        await asyncio.gather(*self.later, return_exceptions=True)
        await self.session.close()
        await self.server.close()

    def messages(self) -> list[dict[str, Any]]:
        return [a for a in self.received if a["type"] == "message"]

    async def _post(self, request: web.Request) -> web.Response:
        await self._take(await request.json())
        return web.Response(status=200)

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            return web.Response(status=400)  # the simulator's check that a bot is there
        await ws.prepare(request)
        await StreamingConnection(ws, self._streamed, name="stub").run()
        return ws

    async def _streamed(self, connection: StreamingConnection, request: Request) -> Response:
        activity = json.loads(request.body or b"{}")
        self.sockets[activity["conversation"]["id"]] = connection
        await self._take(activity)
        return Response(request.id, 200)

    async def _take(self, activity: dict[str, Any]) -> None:
        self.received.append(activity)
        self.events.append(f"got {label(activity)}")
        await asyncio.sleep(0.01)  # a turn takes a while: a key posted meanwhile would show here
        for reply in self.answer(activity):
            if "after" in reply:
                task = asyncio.create_task(self._later(activity, reply))
                self.later.add(task)
                task.add_done_callback(self.later.discard)
            else:
                await self.send(activity, reply)
        self.events.append(f"answered {label(activity)}")

    async def _later(self, to: dict[str, Any], reply: dict[str, Any]) -> None:
        await asyncio.sleep(reply.pop("after"))
        await self.send(to, reply)

    async def send(self, to: dict[str, Any], reply: dict[str, Any]) -> None:
        conversation = to["conversation"]["id"]
        activity = {"type": "message", **reply, "conversation": {"id": conversation}, "replyToId": to["id"]}
        self.events.append(f"sent {label(activity)}")
        path = f"v3/conversations/{conversation}/activities"
        body = json.dumps(activity).encode()
        if to["serviceUrl"].startswith("http"):
            headers = {"Content-Type": "application/json"}
            async with self.session.post(to["serviceUrl"] + path, data=body, headers=headers) as response:
                assert response.status == 200
        else:
            request = Request(new_id(), "POST", f"/{path}", body, CONTENT_TYPE)
            assert (await self.sockets[conversation].request(request, 10)).status == 200


@pytest.fixture
async def stub() -> AsyncIterator[StubBot]:
    bot = await StubBot().start()
    yield bot
    await bot.close()


@pytest.fixture(params=["http", "websocket"])
def transport(request: pytest.FixtureRequest) -> Transport:
    """The new behaviour over both of the channel's transports."""
    return request.param  # type: ignore[no-any-return]


async def play(bot: StubBot, steps: list[Any], transport: Transport) -> scenarios.Result:
    """Run ``steps`` as one call against ``bot``."""
    scenario = scenarios.Scenario.model_validate({"name": "stub", "steps": steps})
    async with wired([bot.url], "127.0.0.1:0", transport=transport) as (bots, channel):
        return await scenarios.run(scenario, bots, channel)


def says(text: str, **more: Any) -> dict[str, Any]:
    return {"type": "message", "text": text, **more}


async def test_press_posts_one_dtmf_message_per_key_each_answered_first(
    stub: StubBot, transport: Transport
) -> None:
    result = await play(stub, ["start", {"press": "12#*"}, {"say": "one"}], transport)
    assert result.passed, result.reason
    keys, speech = stub.messages()[:4], stub.messages()[4]
    assert [key["text"] for key in keys] == ["1", "2", "#", "*"]
    assert all(key["entities"] == [{"type": "DTMF"}] for key in keys)
    assert speech["text"] == "one" and "entities" not in speech
    assert len({a["id"] for a in stub.received}) == len(stub.received) == 6
    # Each key is posted once the bot has answered the one before, as a caller presses them.
    turns = ["conversationUpdate", "message 1", "message 2", "message #", "message *", "message one"]
    assert stub.events == [event for turn in turns for event in (f"got {turn}", f"answered {turn}")]


async def test_silence_lets_the_bot_speak_before_the_caller_goes_on(
    stub: StubBot, transport: Transport
) -> None:
    def answer(activity: dict[str, Any]) -> list[dict[str, Any]]:
        if activity["type"] == "conversationUpdate":
            return [says("Welcome"), says("Are you still there?", after=0.01)]  # a no-input prompt
        return [says(f"You said {activity['text']}")]

    stub.answer = answer
    steps = [
        "start",
        {"expect_prompt": {"contains": "Welcome"}},
        {"silence": 0.5},
        {"say": "yes"},
        {"expect_prompt": {"contains": "still there"}},  # said during the silence, read after it
        {"expect_prompt": {"contains": "You said yes"}},
    ]
    result = await play(stub, steps, transport)
    assert result.passed, result.reason
    # The caller said nothing until the bot had spoken on its own.
    assert stub.events == [
        "got conversationUpdate",
        "sent message Welcome",
        "answered conversationUpdate",
        "sent message Are you still there?",
        "got message yes",
        "sent message You said yes",
        "answered message yes",
    ]


def hangs_up_on_bye(activity: dict[str, Any]) -> list[dict[str, Any]]:
    """A bot that ends the call when the caller says bye, as the real one will."""
    if activity.get("text") == "bye":
        return [says("Goodbye"), {"type": "endOfConversation"}]
    return []


async def test_expect_hangup_passes_on_an_end_of_conversation(stub: StubBot, transport: Transport) -> None:
    stub.answer = hangs_up_on_bye
    steps = [
        "start",
        {"say": "bye"},
        {"expect_prompt": {"contains": "Goodbye"}},
        "expect_hangup",
        {"say": "hello?"},  # the caller may still send after the bot hung up
        {"press": "1"},
        {"expect_nothing": 0.2},
    ]
    result = await play(stub, steps, transport)
    assert result.passed, result.reason
    assert [m["text"] for m in stub.messages()] == ["bye", "hello?", "1"]


@pytest.mark.parametrize(
    ("steps", "step", "reason"),
    [
        (
            ["start", {"say": "bye"}, "expect_hangup"],
            3,
            'expect_hangup: expected the bot to hang up (endOfConversation), the bot sent "Goodbye"',
        ),
        (
            ["start", {"expect_hangup": 0.2}],
            2,
            "expect_hangup: 0.2: expected the bot to hang up (endOfConversation); "
            "it sent nothing within 0.2 s",
        ),
        (  # a hang-up is never skipped over where a prompt is expected
            ["start", {"say": "bye"}, {"expect_prompt": {"contains": "Goodbye"}}, {"expect_prompt": {}}],
            4,
            "expected a prompt, the bot sent a hang-up (endOfConversation)",
        ),
    ],
)
async def test_expect_hangup_and_a_hang_up_where_a_prompt_was_expected_fail_clearly(
    stub: StubBot, transport: Transport, steps: list[Any], step: int, reason: str
) -> None:
    stub.answer = hangs_up_on_bye
    result = await play(stub, steps, transport)
    assert not result.passed and result.step == step
    assert reason in result.reason, result.reason


async def test_a_hang_up_nobody_expected_is_named(stub: StubBot) -> None:
    stub.answer = hangs_up_on_bye
    result = await play(stub, ["start", {"say": "bye"}, {"expect_prompt": {"contains": "Goodbye"}}], "http")
    assert not result.passed and result.unexpected == ("a hang-up (endOfConversation)",)


@pytest.mark.parametrize(
    ("flow_name", "clock"),
    [("default", OPEN), ("default", CLOSED), ("account-lookup", OPEN), (SAMPLE, OPEN), (WARM, OPEN)],
    ids=["default-open", "default-closed", "account-lookup", SAMPLE, WARM],
)
async def test_the_shipped_scenarios_pass_across_real_instances_on_real_redis(
    flow_name: str, clock: datetime, tmp_path: Path, key_prefix: str, bot_environment: None
) -> None:
    """Two `python app.py` processes on the real Redis, behind a round-robin "load
    balancer" (the simulator's), over both transports: every activity of a call may land
    on either instance, and the timers fire on whichever claims them; a warm transfer
    leases its number on one and the agent side claims its context on either."""
    redis = await real_redis_or_skip()
    keys = Fernet.generate_key().decode()
    env = {
        "REDIS_URL": REAL_REDIS_URL,
        "REDIS_KEY_PREFIX": key_prefix,
        "CALLFLOW_FILE": write_flow(tmp_path, quick(flow_doc(f"{flow_name}.yaml"))),
        "HOURS_CLOCK": clock.isoformat(),
        "VARIABLES_KEYS": keys,
        "AGENT_TOKEN": AGENT_TOKEN,
        "SCHEDULER_POLL_SECONDS": "0.1",
    }
    bots = [BotProcess(env, tmp_path, f"bot-{n}") for n in range(2)]
    try:
        await asyncio.gather(*(bot.start() for bot in bots))
        hours = scenarios.BotHours.of(load_callflow(shipped_flow(f"{flow_name}.yaml")), clock)
        files = scenarios.shipped(flow_name)
        for transport in ("http", "websocket"):
            screen, out = console()
            code = await run_scripted(
                [bot.url for bot in bots],
                files,
                "127.0.0.1:0",
                screen,
                transport,
                hours,
                agent_side(flow_name),
            )
            report = out.getvalue()
            assert code == 0, f"{transport}:\n{report}\n" + "\n".join(bot.log()[-3000:] for bot in bots)
            ran = sum(not hours.skip_reason(scenarios.load(path)) for path in files)
            assert f"{ran} passed, 0 failed" in report and ran > 0
    finally:
        for bot in bots:
            bot.stop()
        await delete_prefix(redis, key_prefix)
        await redis.aclose()


def test_a_scenario_that_needs_hours_says_why_it_cannot_run() -> None:
    needs_open = scenarios.Scenario.model_validate({"name": "x", "hours": "open", "steps": ["start"]})
    anytime = scenarios.Scenario.model_validate({"name": "y", "steps": ["start"]})
    default = load_callflow(shipped_flow("default.yaml"))
    closed = scenarios.BotHours.of(default, CLOSED)
    assert closed.said == "closed" and scenarios.BotHours.of(default, OPEN).said == "open"
    assert (
        closed.skip_reason(anytime) == ""
        and scenarios.BotHours.of(default, OPEN).skip_reason(needs_open) == ""
    )
    assert closed.skip_reason(needs_open) == (
        "needs the flow's hours open; at 2026-12-05T10:00-05:00 the flow's hours are closed "
        "(pin the bot's clock with HOURS_CLOCK and pass the same --clock)"
    )
    no_hours = scenarios.BotHours.of(load_callflow(SAMPLE_FLOW), OPEN)
    assert no_hours.skip_reason(needs_open) == "needs the flow's hours open; the flow has no opening hours"
