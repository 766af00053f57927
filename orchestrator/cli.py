"""Operator CLI: ``python -m orchestrator`` (or ``cc-orchestrator``).

Reads the same Redis the bots use, through the same store and key layout.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from orchestrator.call import timestamp
from states import LIVE_STATES, State
from states.diagram import mermaid

T = TypeVar("T")

# Runs of 8 or more digits (spaces and dashes allowed between them): card, account and
# phone numbers a caller may have said. The last four stay readable.
_LONG_DIGITS = re.compile(r"\d(?:[ -]?\d){7,}")


def redact(text: str) -> str:
    """Text for operator eyes: long digit runs masked but for their last four digits."""

    def mask(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        return "*" * (len(digits) - 4) + digits[-4:]

    return _LONG_DIGITS.sub(mask, text)


@click.group()
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    show_default=True,
    help="The Redis the bots use (env REDIS_URL).",
)
@click.option(
    "--cluster/--no-cluster", envvar="REDIS_CLUSTER", default=False, help="REDIS_URL is a cluster node."
)
@click.option("--prefix", envvar="REDIS_KEY_PREFIX", default="cc", show_default=True, help="Key prefix.")
@click.pass_context
def cli(ctx: click.Context, redis_url: str, cluster: bool, prefix: str) -> None:
    """Inspect the calls of a running contact-center orchestrator."""
    ctx.obj = {"redis_url": redis_url, "cluster": cluster, "prefix": prefix}


@cli.group()
def calls() -> None:
    """Live and recently ended calls."""


@calls.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only calls in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_calls(options: dict[str, Any], state: str | None, limit: int, as_json: bool) -> None:
    """Calls with their state, since when, attempts, target and last transition."""
    states = [state] if state else [s.value for s in LIVE_STATES]
    records = _run(options, lambda store: store.list_calls(states, limit))
    rows = [
        {
            "id": r.get("id", ""),
            "state": r.get("state", ""),
            "since": _time(r.get("since")),
            "attempts": int(r.get("attempts", 0)),
            "target": r.get("target", ""),
            "last_transition": r.get("last_transition", ""),
        }
        for r in records
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("call", "state", "since", "attempts", "target", "last transition")
    for row in rows:
        table.add_row(
            row["id"], row["state"], row["since"], str(row["attempts"]), row["target"], row["last_transition"]
        )
    Console().print(table)


@calls.command("show")
@click.argument("conversation_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def show(options: dict[str, Any], conversation_id: str, as_json: bool) -> None:
    """One call whole: state, attempts, targets, times, transcript and history."""
    call = _run(options, lambda store: _call_details(store, conversation_id))
    if call is None:
        raise click.ClickException(f"no call {conversation_id!r} (unknown, or expired)")
    if as_json:
        click.echo(json.dumps(call, indent=2, ensure_ascii=False))
        return
    console = Console()
    record = call["record"]
    console.print(
        f"[bold]{conversation_id}[/bold]  state [bold]{record.get('state')}[/bold]"
        f"  version {record.get('version')}  attempts {record.get('attempts')}"
        f"  target {record.get('target') or '-'}"
    )
    console.print(
        f"created {_time(record.get('created'))}  in this state since {_time(record.get('since'))}"
        f"  updated {_time(record.get('updated'))}"
    )
    if record.get("failure"):
        console.print(f"last failure: {record['failure']}")
    transcript = Table("at", "who", "said", title="transcript")
    for line in call["transcript"]:
        transcript.add_row(line["at"], line["role"], line["text"])
    console.print(transcript)
    timeline = Table("at", "trigger", "from", "to", "reason", title="history")
    for step in call["history"]:
        timeline.add_row(step["at"], step["trigger"], step["from"], step["to"], step["reason"])
    console.print(timeline)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["mermaid"]), default="mermaid", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
def diagram(fmt: str, output: Path | None) -> None:
    """The call state machine, drawn from the definition the bot runs."""
    text = mermaid()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


async def _call_details(store: Any, conversation_id: str) -> dict[str, Any] | None:
    record = await store.record(conversation_id)
    if not record:
        return None
    loaded = (await store.load(conversation_id)).call
    history = await store.history(conversation_id)
    return {
        "record": {k: (v if k != "reference" else json.loads(v)) for k, v in record.items()},
        "transcript": [
            {"role": line.role, "text": redact(line.text), "at": line.at} for line in loaded.transcript
        ],
        "history": [
            {
                "at": _time(entry_id.split("-")[0]),
                "trigger": step.trigger,
                "from": step.source,
                "to": step.dest,
                "reason": redact(step.reason),
            }
            for entry_id, step in history
        ],
    }


def _time(ms: str | None) -> str:
    if not ms or not ms.isdigit() or ms == "0":
        return "-"
    return timestamp(int(ms))


def _run(options: dict[str, Any], action: Callable[[Any], Awaitable[T]]) -> T:
    """Run one store action; an unreachable Redis is one line and exit status 1."""
    from adapters.keys import Keyspace
    from adapters.redis_client import create_redis
    from adapters.store import RedisCallStore
    from orchestrator.config import load_settings
    from orchestrator.errors import ConfigError, StoreUnavailable

    async def go() -> T:
        settings = load_settings(
            REDIS_URL=options["redis_url"], REDIS_CLUSTER=options["cluster"], REDIS_TIMEOUT_SECONDS=3
        )
        store = RedisCallStore(create_redis(settings), Keyspace(options["prefix"]))
        try:
            if not await store.ping():
                raise StoreUnavailable(f"Redis at {options['redis_url']} is not reachable")
            return await action(store)
        finally:
            await store.redis.aclose()

    try:
        return asyncio.run(go())
    except (StoreUnavailable, ConfigError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
