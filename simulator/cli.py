"""``python -m cli simulate``: play the Telephony channel and the agent side
against running bots, interactively, from scenario files, or as a load of many callers."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import click
from rich.console import Console

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
    urls: list[str], files: list[Path], listen: str, console: Console, transport: Transport = "http"
) -> int:
    """Run each scenario file as one call, over its own transport or ``transport``; print
    a pass/fail report; 0 only if all pass."""
    loaded = [scenarios.load(path) for path in files]
    async with contextlib.AsyncExitStack() as stack:
        links = {
            kind: await stack.enter_async_context(wired(urls, listen, transport=kind))
            for kind in {scenario.transport or transport for scenario in loaded}
        }
        # Each scenario is a call of its own: run them all at once, report in file order.
        results = await asyncio.gather(
            *(scenarios.run(scenario, *links[scenario.transport or transport]) for scenario in loaded)
        )
        for result in results:
            scenario = result.scenario
            mark = "[green]PASS[/green]" if result.passed else "[red]FAIL[/red]"
            console.print(f"{mark}  {Path(scenario.source).name}: {scenario.name}")
            if not result.passed:
                where = f"step {result.step}" if result.step else "after the last step"
                console.print(f"      {where}: {result.reason}", markup=False)
                for activity in result.unexpected:
                    console.print(f"      unexpected: {activity}", markup=False)
    failed = sum(not r.passed for r in results)
    colour = "red" if failed else "green"
    console.print(f"[{colour}]{len(results) - failed} passed, {failed} failed[/{colour}]")
    return 1 if failed else 0


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
@click.option("--shipped", is_flag=True, help="Run every scenario shipped with the simulator.")
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
    chosen = [*files, *(scenarios.shipped() if shipped else [])]
    try:
        if calls is not None:
            from simulator.load import run_load

            code = asyncio.run(
                run_load(urls, chosen or scenarios.shipped(), calls, rate, listen, console, transport)
            )
        elif chosen:
            code = asyncio.run(run_scripted(urls, chosen, listen, console, transport))
        else:
            from simulator.interactive import run_interactive

            code = asyncio.run(run_interactive(urls, protocol, listen, console, transport=transport))
    except scenarios.ScenarioError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
