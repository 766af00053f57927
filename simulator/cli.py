"""``python -m orchestrator simulate``: play the Telephony channel and the agent side
against running bots, interactively, from scenario files, or as a load of many callers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import click
from rich.console import Console

from simulator import scenario as scenarios
from simulator.call import Bots, Protocol, Tally
from simulator.channel import ChannelStandIn


@asynccontextmanager
async def wired(
    urls: list[str], listen: str, tally: Tally | None = None
) -> AsyncIterator[tuple[Bots, ChannelStandIn]]:
    """The channel's serviceUrl endpoint listening, and the bots to post to."""
    host, _, port = listen.rpartition(":")
    channel = await ChannelStandIn().start(host or "127.0.0.1", int(port or 0))
    try:
        async with aiohttp.ClientSession() as session:
            yield Bots(urls, session, tally), channel
    finally:
        await channel.stop()


async def run_scripted(urls: list[str], files: list[Path], listen: str, console: Console) -> int:
    """Run each scenario file as one call; print a pass/fail report; 0 only if all pass."""
    loaded = [scenarios.load(path) for path in files]
    async with wired(urls, listen) as (bots, channel):
        # Each scenario is a call of its own: run them all at once, report in file order.
        results = await asyncio.gather(*(scenarios.run(scenario, bots, channel) for scenario in loaded))
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

            code = asyncio.run(run_load(urls, chosen or scenarios.shipped(), calls, rate, listen, console))
        elif chosen:
            code = asyncio.run(run_scripted(urls, chosen, listen, console))
        else:
            from simulator.interactive import run_interactive

            code = asyncio.run(run_interactive(urls, protocol, listen, console))
    except scenarios.ScenarioError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
