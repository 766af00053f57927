"""``python -m cli simulate``: play the Telephony channel and the agent side
against running bots, interactively, from scenario files, or as a load of many callers."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import click
from rich.console import Console

from orchestrator.callflow import load_callflow, shipped_flow
from simulator import scenario as scenarios
from simulator.call import Bots, Protocol, Tally, Transport
from simulator.channel import ChannelStandIn
from simulator.streaming import SERVICE_URL, SocketBots


@asynccontextmanager
async def wired(
    urls: list[str],
    listen: str,
    tally: Tally | None = None,
    transport: Transport = "http",
    session: aiohttp.ClientSession | None = None,
) -> AsyncIterator[tuple[Bots, ChannelStandIn]]:
    """The bots to send to, and the channel that records what they send back: its
    serviceUrl endpoint listening (HTTP), or the sockets themselves (websocket)."""
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        channel = ChannelStandIn()
        stack.push_async_callback(channel.stop)
        if transport == "websocket":
            channel.url = SERVICE_URL
            bots: Bots = SocketBots(urls, session, channel, tally)
            stack.push_async_callback(bots.close)  # type: ignore[attr-defined]
        else:
            host, _, port = listen.rpartition(":")
            await channel.start(host or "127.0.0.1", int(port or 0))
            bots = Bots(urls, session, tally)
        yield bots, channel


async def run_scripted(
    urls: list[str],
    files: list[Path],
    listen: str,
    console: Console,
    transport: Transport = "http",
    hours: scenarios.BotHours | None = None,
    agents: scenarios.AgentSide | None = None,
) -> int:
    """Run each scenario file as one call, over its own transport or ``transport``; print
    a pass/fail report; 0 only if none fails. With ``hours``, a scenario that needs the
    flow's hours otherwise is skipped and says why; so is one that asks the context API
    when ``agents`` (the bot's pools and agent token) has no token."""
    loaded = [scenarios.load(path) for path in files]
    agents = agents or scenarios.AgentSide()
    skips = {id(s): (hours.skip_reason(s) if hours else "") or agents.skip_reason(s) for s in loaded}
    runnable = [s for s in loaded if not skips[id(s)]]
    async with contextlib.AsyncExitStack() as stack:
        links = {
            kind: await stack.enter_async_context(wired(urls, listen, transport=kind))
            for kind in {scenario.transport or transport for scenario in runnable}
        }
        # Each scenario is a call of its own: run them all at once, report in file order.
        ran = await asyncio.gather(
            *(
                scenarios.run(scenario, *links[scenario.transport or transport], agents)
                for scenario in runnable
            )
        )
    by_scenario = {id(r.scenario): r for r in ran}
    results = [
        by_scenario.get(id(s)) or scenarios.Result(s, True, reason=skips[id(s)], skipped=True) for s in loaded
    ]
    for result in results:
        scenario = result.scenario
        mark = (
            "[yellow]SKIP[/yellow]"
            if result.skipped
            else ("[green]PASS[/green]" if result.passed else "[red]FAIL[/red]")
        )
        console.print(f"{mark}  {Path(scenario.source).name}: {scenario.name}")
        if result.skipped:
            console.print(f"      {result.reason}", markup=False)
        elif not result.passed:
            where = f"step {result.step}" if result.step else "after the last step"
            console.print(f"      {where}: {result.reason}", markup=False)
            for activity in result.unexpected:
                console.print(f"      unexpected: {activity}", markup=False)
    failed = sum(not r.passed for r in results)
    skipped = sum(r.skipped for r in results)
    colour = "red" if failed else "green"
    tail = f", {skipped} skipped" if skipped else ""
    console.print(f"[{colour}]{len(ran) - failed} passed, {failed} failed{tail}[/{colour}]")
    return 1 if failed else 0


def _clock(_context: click.Context, _param: click.Parameter, value: str | None) -> datetime:
    """--clock: an ISO 8601 moment with its zone (the bot's HOURS_CLOCK); unset: now."""
    if value is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date and time") from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no zone: add one, such as -05:00 or Z")
    return moment


@click.command()
@click.option(
    "--bot",
    "bots",
    multiple=True,
    required=True,
    metavar="URL",
    help="A bot's base URL (or its /api/messages); more URLs after it, or --bot again: used round-robin.",
)
@click.argument("more_bots", nargs=-1, metavar="[URL]...")
@click.option(
    "--scenario",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run this scenario file (again for more). Scripted mode.",
)
@click.option("--shipped", is_flag=True, help="Run every scenario shipped for the bot's flow (--flow).")
@click.option(
    "--flow",
    type=click.Choice(scenarios.shipped_flows()),
    help=f"The shipped flow the bot runs (its CALLFLOW_FILE): whose scenarios --shipped runs, and whose "
    f"opening hours say which of them can run. Default: {scenarios.DEFAULT_FLOW}.",
)
@click.option(
    "--clock",
    callback=_clock,
    metavar="ISO-8601",
    help="The bot's clock for opening hours (its HOURS_CLOCK, if pinned). Default: now.",
)
@click.option(
    "--agent-token",
    envvar="AGENT_TOKEN",
    metavar="TOKEN",
    help="The bot's AGENT_TOKEN, for expect_context steps (they ask the bot's context API); "
    "default: $AGENT_TOKEN. Without it, scenarios with expect_context are skipped.",
)
@click.option("--calls", type=click.IntRange(1), help="Load mode: this many simulated callers ...")
@click.option(
    "--rate", type=click.FloatRange(min=0.01), default=10, show_default=True, help="... started per second."
)
@click.option(
    "--protocol",
    type=click.Choice(["telephony", "generic"]),
    default="telephony",
    show_default=True,
    help="How an accepted transfer shows: the call ends (Telephony) or handoff.status accepted.",
)
@click.option(
    "--transport",
    type=click.Choice(["http", "websocket"]),
    default="http",
    show_default=True,
    help="How activities reach the bots: POSTs (replies to our serviceUrl), or the Telephony "
    "channel's streaming WebSocket (replies on the socket). A scenario's own transport wins.",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="host:port of the channel's serviceUrl endpoint the bots post to (0: any free port).",
)
def simulate(
    bots: tuple[str, ...],
    more_bots: tuple[str, ...],
    files: tuple[Path, ...],
    shipped: bool,
    flow: str | None,
    clock: datetime,
    agent_token: str | None,
    calls: int | None,
    rate: float,
    protocol: Protocol,
    transport: Transport,
    listen: str,
) -> None:
    """Play the Telephony channel and the agent side against running bots.

    With --scenario (or --shipped): scripted calls and a pass/fail report (exit 0 only if
    all pass). With --calls: a load of simulated callers through a scenario mix.
    Otherwise: one interactive call.
    """
    urls = [*bots, *more_bots]
    console = Console(highlight=False)
    name = flow or scenarios.DEFAULT_FLOW
    if calls is not None and not files:
        shipped = True  # a load with no scenario named plays the flow's shipped mix
    chosen = [*files, *(scenarios.shipped(name) if shipped else [])]
    # Shipped scenarios are for a known flow: its hours decide which can run at the bot's clock.
    known = shipped or flow is not None
    bot_flow = load_callflow(shipped_flow(f"{name}.yaml"))
    hours = scenarios.BotHours.of(bot_flow, clock) if known else None
    # Its pools say which numbers a warm transfer may dial; the token opens its context API.
    agents = scenarios.AgentSide.of(bot_flow, agent_token, name)
    try:
        if calls is not None:
            from simulator.load import run_load

            mix = []
            for path in chosen:
                loaded = scenarios.load(path)
                why = (hours.skip_reason(loaded) if hours else "") or agents.skip_reason(loaded)
                if why:
                    console.print(f"left out: {path.name}: {why}", markup=False)
                else:
                    mix.append(path)
            if not mix:
                raise click.ClickException("no scenario can run: each was left out (above)")
            code = asyncio.run(run_load(urls, mix, calls, rate, listen, console, transport, agents))
        elif chosen:
            code = asyncio.run(run_scripted(urls, chosen, listen, console, transport, hours, agents))
        else:
            from simulator.interactive import run_interactive

            code = asyncio.run(run_interactive(urls, protocol, listen, console, transport=transport))
    except scenarios.ScenarioError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
