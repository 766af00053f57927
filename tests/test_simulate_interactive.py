"""``simulate`` interactive mode against a real bot: driven through its ``lines`` input
in-process, and once as ``python -m cli simulate`` with commands on its stdin."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from rich.console import Console

from app import create_app
from orchestrator.config import load_settings
from simulator.call import Protocol, Transport
from simulator.interactive import run_interactive
from tests.conftest import BOT_ENVIRONMENT
from tests.process import ROOT, BotProcess, free_port
from tests.test_simulate_scripted import StubBot, says

SAMPLE_FLOW = ROOT / "orchestrator" / "flows" / "transfer-sample.yaml"
FIRST, SECOND = "+14251231234", "+14255550100"
WELCOME = "For the billing department, press 1"
RETRY = "Sorry, the agent could not take your call"
FINAL = "no agent is available right now"
WITHIN = 30.0  # generous: only a bot that never answers reaches it; no timing is asserted


@pytest.fixture
def flow_file(tmp_path: Path) -> Path:
    """The transfer sample flow with two agent numbers, two attempts, and a 2 s no-answer watchdog."""
    data = yaml.safe_load(SAMPLE_FLOW.read_text())
    data["queues"]["agents"].update(targets=[FIRST, SECOND], timeout_seconds=2, max_attempts=2)
    path = tmp_path / "callflow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No developer setting leaks into the bot (REDIS_URL unset: its embedded Redis)."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def bot_url(flow_file: Path, clean_env: None) -> AsyncIterator[str]:
    settings = load_settings(REDIS_URL=None, CALLFLOW_FILE=flow_file, SCHEDULER_POLL_SECONDS=0.05)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def flat(text: str) -> str:
    """Output with line wrapping undone, to match phrases that may wrap."""
    return " ".join(text.split())


def after(text: str, command: str) -> str:
    """What was printed after ``caller> command``, up to the next command."""
    start = text.index(f"caller> {command}\n") + len(f"caller> {command}\n")
    end = text.find("caller> ", start)
    return text[start : end if end >= 0 else None]


def bot_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\s+bot ", line)]


async def until(read: Callable[[], str], predicate: Callable[[str], bool], within: float = WITHIN) -> None:
    """Wait until the output so far satisfies ``predicate``."""
    async with asyncio.timeout(within):
        while not predicate(read()):  # noqa: ASYNC110 - output written by the code under test
            await asyncio.sleep(0.05)


async def interactive(
    bot_url: str,
    script: Callable[[io.StringIO], AsyncIterator[str]],
    protocol: Protocol = "telephony",
    transport: Transport = "http",
) -> tuple[int, str]:
    out = io.StringIO()
    console = Console(file=out, width=200)
    code = await run_interactive([bot_url], protocol, "127.0.0.1:0", console, script(out), transport)
    return code, out.getvalue()


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_a_call_typed_in_shows_prompts_transfers_and_the_watchdog(
    bot_url: str, transport: Transport
) -> None:
    async def script(out: io.StringIO) -> AsyncIterator[str]:
        for command in ["press 1", "agent", "fail busy", "press 0", "noanswer"]:
            yield command
        # The watchdog's prompt comes by itself, while the simulator waits for input.
        await until(out.getvalue, lambda text: FINAL in flat(text))
        yield "hangup"
        yield "quit"

    code, text = await interactive(bot_url, script, transport=transport)
    assert code == 0, text
    assert ("over a streaming socket" in text) == (transport == "websocket")

    welcome = text[: text.index("caller> ")]
    assert WELCOME in flat(welcome) and "voice en-US-JennyNeural" in welcome

    billing = flat(after(text, "press 1"))
    assert (
        'billing department. If you are a current customer, press 1. If you are a new customer, press 2."'
        in (billing)
    )
    assert billing.endswith("voice en-US-JessaNeural")

    transfer = flat(after(text, "agent"))
    first = re.search(rf"TRANSFER to \{FIRST} handoff\.initiate with a transcript of (\d+) lines", transfer)
    assert first, transfer
    assert "the agent side: accept | fail [MESSAGE] | noanswer | complete" in transfer

    failed = flat(after(text, "fail busy"))
    assert "handoff.status failed 'busy'" in failed
    assert RETRY in failed and len(bot_lines(after(text, "fail busy"))) == 1

    second = re.search(
        rf"TRANSFER to \{SECOND} handoff\.initiate with a transcript of (\d+) lines",
        flat(after(text, "press 0")),
    )
    assert second and int(second[1]) > int(first[1])  # the transcript grew with the call

    rang_out = after(text, "noanswer")
    assert "the channel keeps redialling and tells the bot nothing" in flat(rang_out)
    assert FINAL in flat(rang_out) and "(on its own)" in rang_out and len(bot_lines(rang_out)) == 1

    assert "caller hangs up: endOfConversation" in flat(after(text, "hangup"))
    assert after(text, "quit").strip() == ""  # the call had ended: nothing to hang up on the way out
    assert "error" not in text


async def test_agent_and_channel_commands_in_the_generic_protocol(bot_url: str) -> None:
    async def script(out: io.StringIO) -> AsyncIterator[str]:
        for command in [
            "help",
            "what are your hours",
            "dup",
            "press x",
            "say",
            "hangup now",
            "accept",
            "say agent",
            "accept",
            "complete",
            "late failed too late",
            "status bogus",
            "new",
        ]:
            yield command
        # the end of input (Ctrl-D) leaves, hanging up the live call

    code, text = await interactive(bot_url, script, protocol="generic")
    assert code == 0, text

    assert "late STATE [MESSAGE]" in after(text, "help") and "noanswer" in after(text, "help")
    echo = flat(after(text, "what are your hours"))
    assert echo == 'bot "What I heard was "what are your hours"" voice en-US-GuyNeural'

    dup = after(text, "dup")
    assert "delivers message" in dup and bot_lines(dup) == []  # the bot answers a redelivery once

    assert "a keypad has 0-9, * and #" in after(text, "press x")
    assert "usage: say TEXT" in after(text, "say")
    assert "hangup takes nothing" in after(text, "hangup now")
    assert "no transfer is ringing" in text.split("caller> accept\n")[1]

    assert f"TRANSFER to {FIRST}" in flat(after(text, "say agent"))
    accepted = text.split("caller> accept\n")[2]
    accepted = accepted[: accepted.index("caller> ")]
    assert "handoff.status accepted" in accepted and bot_lines(accepted) == []  # silent once accepted
    assert "You are back with the automated assistant" in flat(after(text, "complete"))

    late = after(text, "late failed too late")
    assert "handoff.status failed 'too late' out of turn" in flat(late) and bot_lines(late) == []
    assert bot_lines(after(text, "status bogus")) == []

    renewed = flat(after(text, "new"))
    assert renewed.index("caller hangs up") < renewed.index("call call-") < renewed.index(WELCOME)
    assert renewed.endswith("caller hangs up on the way out: endOfConversation")


async def test_an_unreachable_bot_is_one_line_and_exit_1(clean_env: None) -> None:
    async def nothing() -> AsyncIterator[str]:
        for _ in ():
            yield ""

    out = io.StringIO()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = await run_interactive([url], "telephony", "127.0.0.1:0", Console(file=out, width=80), nothing())
    assert code == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the bot at {url}/api/messages: ")


async def test_http_errors_from_the_bot_show_in_red(bot_url: str) -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system="standard")

    async def script() -> AsyncIterator[str]:
        yield "press 1"  # the second URL: 404
        yield "press 1"  # the first again
        yield "quit"

    # Round-robin over a good URL and one where no bot listens to /api/messages.
    urls = [bot_url, f"{bot_url}/nowhere"]
    code = await run_interactive(urls, "telephony", "127.0.0.1:0", console, script())
    assert code == 0
    first, second = out.getvalue().split("caller> \x1b[0mpress 1\n")[1:]
    assert "\x1b[31mthe bot answered HTTP 404\x1b[0m" in first
    second = second[: second.index("caller> ")]
    assert "billing department" in second and "error" not in second

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system="standard")
    code = await run_interactive(urls[1:], "telephony", "127.0.0.1:0", console, script())
    assert code == 1  # no call could start
    assert "\x1b[31merror: cannot start a call: the bot answered HTTP 404\x1b[0m" in out.getvalue()


async def test_python_m_cli_simulate_reads_its_commands_from_stdin(
    flow_file: Path, tmp_path: Path, clean_env: None
) -> None:
    bot = await BotProcess(
        {"CALLFLOW_FILE": str(flow_file), "SCHEDULER_POLL_SECONDS": "0.05"}, tmp_path
    ).start()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(COLUMNS="200", HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    simulator = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cli", "simulate", "--bot", bot.url),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert simulator.stdin is not None and simulator.stdout is not None
    output: list[str] = []

    async def collect() -> None:
        assert simulator.stdout is not None
        while chunk := await simulator.stdout.read(4096):
            output.append(chunk.decode())

    collector = asyncio.create_task(collect())

    def text() -> str:
        return flat("".join(output))

    async def type_in(command: str, then: str) -> None:
        assert simulator.stdin is not None
        simulator.stdin.write(f"{command}\n".encode())
        await simulator.stdin.drain()
        await until(text, lambda seen: then in seen.split(f"caller> {command}")[-1])

    try:
        await until(text, lambda seen: WELCOME in seen)
        await type_in("press 1", "voice en-US-JessaNeural")
        await type_in("agent", f"TRANSFER to {FIRST}")
        await type_in("noanswer", "(on its own)")
        await type_in("quit", "hangs up on the way out")
        async with asyncio.timeout(WITHIN):
            code = await simulator.wait()
        await collector
    finally:
        if simulator.returncode is None:
            simulator.kill()
            await simulator.wait()
        collector.cancel()
        bot.stop()
    seen = text()
    assert code == 0, seen + bot.log()
    assert 'If you are a new customer, press 2." voice en-US-JessaNeural' in seen
    assert re.search(rf"TRANSFER to \{FIRST} handoff\.initiate with a transcript of \d+ lines", seen)
    assert f"{RETRY}" in seen.split("caller> noanswer")[1]
    assert "\x1b[" not in seen  # not a terminal: no colour codes


@pytest.fixture
async def stub() -> AsyncIterator[StubBot]:
    bot = await StubBot().start()
    yield bot
    await bot.close()


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_keys_silence_and_the_bot_hanging_up(stub: StubBot, transport: Transport) -> None:
    """Against a stub bot: a message per key, a silence the bot speaks into, and the bot
    ending the call, after which the caller may still send, and quit."""

    def answer(activity: dict[str, Any]) -> list[dict[str, Any]]:
        if activity.get("text") == "wait for it":
            return [says("Are you still there?", after=0.01)]  # a no-input prompt, on its own
        if activity.get("text") == "bye":
            return [says("Goodbye"), {"type": "endOfConversation"}]
        return []

    stub.answer = answer
    commands = [
        "help",
        "press 1 2#",
        "press 12a",
        "silence",
        "silence soon",
        "silence 500",
        "say wait for it",
        "silence 0.5",
        "say bye",
        "say hello?",
        "quit",
    ]

    async def script(out: io.StringIO) -> AsyncIterator[str]:
        for command in commands:
            yield command

    code, text = await interactive(stub.url, script, transport=transport)
    assert code == 0, text
    assert "silence SECONDS" in after(text, "help")

    keys = [m for m in stub.messages() if m.get("entities")]
    assert [(k["text"], k["entities"]) for k in keys] == [(key, [{"type": "DTMF"}]) for key in "12#"]
    assert "a keypad has 0-9, * and #; not 'a'" in after(text, "press 12a")
    assert "usage: silence SECONDS" in after(text, "silence")
    assert "silence takes seconds above 0, at most 120; not 'soon'" in after(text, "silence soon")
    assert "not '500'" in after(text, "silence 500")

    # The caller kept quiet: the bot's prompt came during the silence, before the next line.
    silent = flat(after(text, "silence 0.5"))
    assert silent == 'caller says nothing for 0.5 s bot "Are you still there?" (on its own)', silent
    assert stub.events.index("sent message Are you still there?") < stub.events.index("got message bye")

    hung_up = flat(after(text, "say bye"))
    assert (
        hung_up == 'bot "Goodbye" bot [the bot hung up] the call has ended: new starts another, quit leaves'
    )
    assert "this call has ended (new starts another); sent all the same" in after(text, "say hello?")
    assert after(text, "quit").strip() == ""  # the bot ended the call: the caller does not hang up
    assert [a["type"] for a in stub.received].count("endOfConversation") == 0
    assert [m["text"] for m in stub.messages()][-2:] == ["bye", "hello?"]
