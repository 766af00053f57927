"""Operator CLI: ``python -m cli`` (installed as ``cc-orchestrator``).

Reads the same Redis the bots use, through the same key layout, and shows what
``adapters.inspection`` makes of it: rich tables for people, ``--json`` for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from adapters import inspection
from adapters.inspector import CallInspector
from adapters.keys import CallField
from adapters.pool import Lease, PoolStatus
from adapters.store import unavailable_while
from orchestrator import flow_diagram
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.errors import ConfigError
from orchestrator.turn import Outcome
from simulator.cli import simulate
from states import State
from states.diagram import FORMATS, DiagramError, render

T = TypeVar("T")
WATCH_POLL_SECONDS = 0.25


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
@click.option("--redis-username", envvar="REDIS_USERNAME", help="Redis ACL user (env REDIS_USERNAME).")
@click.option(
    "--redis-password",
    envvar="REDIS_PASSWORD",
    help="Its password (env REDIS_PASSWORD; prefer the variable: others can read a command line).",
)
@click.option(
    "--redis-tls-ca-file",
    envvar="REDIS_TLS_CA_FILE",
    help="CA certificate(s) that signed the server's, for rediss:// (env REDIS_TLS_CA_FILE).",
)
@click.option(
    "--redis-tls-cert-file",
    envvar="REDIS_TLS_CERT_FILE",
    help="Client certificate (env REDIS_TLS_CERT_FILE).",
)
@click.option("--redis-tls-key-file", envvar="REDIS_TLS_KEY_FILE", help="Its key (env REDIS_TLS_KEY_FILE).")
@click.option(
    "--redis-tls-check-hostname/--no-redis-tls-check-hostname",
    envvar="REDIS_TLS_CHECK_HOSTNAME",
    default=True,
    help="The server's certificate must name the URL's host (env REDIS_TLS_CHECK_HOSTNAME).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str,
    cluster: bool,
    prefix: str,
    redis_username: str | None,
    redis_password: str | None,
    redis_tls_ca_file: str | None,
    redis_tls_cert_file: str | None,
    redis_tls_key_file: str | None,
    redis_tls_check_hostname: bool,
) -> None:
    """Inspect the calls of a running contact-center orchestrator.

    Connects as the bots do (see docs/redis-security.md); a read-only operator user can
    run every command but ``reconcile``."""
    ctx.obj = {
        "redis_url": redis_url,
        "cluster": cluster,
        "prefix": prefix,
        # load_settings' names, so a bad value is reported as the bots report it.
        "connection": {
            "REDIS_USERNAME": redis_username,
            "REDIS_PASSWORD": redis_password,
            "REDIS_TLS_CA_FILE": redis_tls_ca_file,
            "REDIS_TLS_CERT_FILE": redis_tls_cert_file,
            "REDIS_TLS_KEY_FILE": redis_tls_key_file,
            "REDIS_TLS_CHECK_HOSTNAME": redis_tls_check_hostname,
        },
    }


@cli.group()
def calls() -> None:
    """Live and recently ended calls."""


@calls.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only calls in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_calls(options: dict[str, Any], state: str | None, limit: int, as_json: bool) -> None:
    """Live calls (or those in STATE) with since when, attempts, target and last transition."""
    rows = _run(options, lambda inspector: inspection.list_calls(inspector, state, limit))
    if as_json:
        _echo_json(rows)
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
    call = _run(options, lambda inspector: inspection.call_details(inspector, conversation_id))
    if call is None:
        raise click.ClickException(f"no call {conversation_id!r} (unknown, or expired)")
    if as_json:
        _echo_json(call)
        return
    console = Console()
    record = call["record"]
    console.print(
        f"[bold]{conversation_id}[/bold]  state [bold]{record.get('state')}[/bold]"
        f"  version {record.get('version')}  attempts {record.get('attempts')}"
        f"  target {record.get('target') or '-'}"
    )
    console.print(
        f"created {inspection.when(record.get('created'))}"
        f"  in this state since {inspection.when(record.get('since'))}"
        f"  updated {inspection.when(record.get('updated'))}"
    )
    connected = inspection.connection_line(call["connection"], record.get("state", ""))
    console.print(f"connected by {connected}", markup=False)
    if call["targets_tried"]:
        console.print(f"targets tried: {', '.join(call['targets_tried'])}")
    if record.get("failure"):
        console.print(f"last failure: {record['failure']}")
    transcript = Table("at", "who", "said", title="transcript")
    for line in call["transcript"]:
        transcript.add_row(line["at"], line["role"], line["text"])
    console.print(transcript)
    timeline = Table("at", "trigger", "from", "to", "node", "reason", "target", title="history")
    for step in call["history"]:
        timeline.add_row(
            step["at"],
            step["trigger"],
            step["from"],
            step["to"],
            step["node"],
            step["reason"],
            step["target"],
        )
    console.print(timeline)


@calls.command("watch")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only steps into or out of STATE.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--count", type=click.IntRange(1), help="Stop after this many steps (default: until Ctrl-C).")
@click.pass_obj
def watch(options: dict[str, Any], state: str | None, as_json: bool, count: int | None) -> None:
    """Steps of every call, from every instance, as they are committed, until Ctrl-C."""
    console = Console(highlight=False)

    async def follow(inspector: CallInspector) -> None:
        heads = await inspector.feed_heads()
        shown = 0
        while count is None or shown < count:
            for entry in await inspector.feed_since(heads):
                if state and state not in (entry.source, entry.dest):
                    continue
                row = inspection.transition_row(entry)
                if as_json:
                    click.echo(json.dumps(row, ensure_ascii=False))
                else:
                    reason = f"  ({row['reason']})" if row["reason"] else ""
                    node = f"  @{row['node']}" if row["node"] else ""
                    console.print(
                        f"{row['at']}  [bold]{row['call']}[/bold]  {row['trigger']}  "
                        f"{row['from']} -> [bold]{row['to']}[/bold]{node}{reason}  {row['target']}",
                        markup=True,
                    )
                shown += 1
                if count is not None and shown >= count:
                    return
            await asyncio.sleep(WATCH_POLL_SECONDS)

    # Ctrl-C is how a watch ends, even when started from a script in the background
    # (a shell starts those with SIGINT ignored, and Python then leaves it ignored).
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        _run(options, follow)


@cli.command()
@click.option(
    "--window", default="1h", show_default=True, help="Transfers over the last 90s, 15m, 24h, 7d ..."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def stats(options: dict[str, Any], window: str, as_json: bool) -> None:
    """Calls per state and, with the bot, per flow node now; transfers started, accepted,
    failed, timed out per queue and per target."""
    try:
        inspection.parse_window(window)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--window") from None
    figures = _run(options, lambda inspector: inspection.stats(inspector, window))
    if as_json:
        _echo_json(figures)
        return
    console = Console()
    calls = Table(*figures["calls"], title="calls per state")
    calls.add_row(*(str(n) for n in figures["calls"].values()))
    console.print(calls)
    nodes = Table("node", "calls", title="calls with the bot, per flow node")
    for node, count in figures["nodes"].items():
        nodes.add_row(node, str(count))
    console.print(nodes if figures["nodes"] else "no calls with the bot at a flow node")
    period = f"{figures['from']} to {figures['to']}"
    for column in ("queue", "target"):
        console.print(_transfer_table(column, figures[f"{column}s"], figures["transfers"], period))


def _transfer_table(column: str, rows: list[dict[str, Any]], totals: dict[str, Any], period: str) -> Table:
    """Transfers per ``column`` (queue or target), with their totals last."""
    outcomes = [o.value for o in Outcome]
    table = Table(
        column,
        *(o.replace("_", " ") for o in outcomes),
        "success rate",
        title=f"transfers per {column}, {period}",
    )
    for row in [*rows, {column: "all", **totals}]:
        rate = row["success_rate"]
        table.add_row(
            row[column] or "(none)", *(str(row[o]) for o in outcomes), "-" if rate is None else f"{rate:.0%}"
        )
    return table


# A pool number's states, as pool_lease.lua's status counts them.
POOL_STATES = tuple(state.name for state in dataclasses.fields(PoolStatus))


@cli.group("pool")
def pool_group() -> None:
    """Number pools of warm transfers."""


@pool_group.command("status")
@click.argument("name", required=False)
@click.option(
    "--flow",
    "flow_file",
    default="",
    metavar="FILE",
    help="The pools of the call flow in FILE (default: the bot's, CALLFLOW_FILE, else the built-in one).",
)
@click.option(
    "--numbers", "each", is_flag=True, help="Each number's state too: which call holds it, since when."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def pool_status(options: dict[str, Any], name: str | None, flow_file: str, each: bool, as_json: bool) -> None:
    """How the numbers of each pool of the call flow (or of pool NAME) stand now: free,
    leased (the transfer rings), claimed (by the agent side) or lapsed (never given back:
    leased again like a free one)."""
    flow = _callflow(flow_file)
    if name is not None and name not in flow.pools:
        known = (
            f"this call flow's pools are {', '.join(flow.pools)}" if flow.pools else "this call flow has none"
        )
        raise click.BadParameter(f"no pool {name!r}: {known}", param_hint="NAME")
    names = list(flow.pools) if name is None else [name]
    leases = _run(options, lambda inspector: _pool_leases(inspector, flow, names)) if names else {}
    # This machine's clock: TIME is not a read an operator user may run. The bots judge a
    # lapse by Redis's clock, so a lease within the clocks' skew of its end may show either way.
    now = int(time.time() * 1000)
    figures = {pool: _pool_figures(flow, pool, leases[pool], now, each) for pool in names}
    if as_json:
        _echo_json({"pools": figures})
        return
    console = Console()
    if not figures:
        console.print("this call flow has no number pools")
        return
    table = Table("pool", "numbers", *POOL_STATES, "grace", "queues", title="number pools, now")
    for pool, row in figures.items():
        table.add_row(
            pool,
            str(row["numbers"]),
            *(str(row[state]) for state in POOL_STATES),
            f"{row['grace_seconds']:g} s",
            ", ".join(row["queues"]) or "(none)",
        )
    console.print(table)
    for pool, row in figures.items() if each else ():
        numbers = Table("number", "state", "call", "since", "until", "claimed", title=f"pool {pool}")
        for line in row["by_number"]:
            numbers.add_row(
                line["number"],
                line["state"],
                *(line[k] or "-" for k in ("call", "since", "until", "claimed")),
            )
        console.print(numbers)


async def _pool_leases(
    inspector: CallInspector, flow: CallFlow, names: list[str]
) -> dict[str, list[str | None]]:
    """The stored lease (JSON, None: none) of each number of each pool in ``names``: one
    HMGET per pool, pipelined. Plain reads, not pool_lease.lua's ``status``, so that a
    read-only operator user (no EVALSHA) can run it."""
    with unavailable_while("reading the number pools"):
        async with inspector.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(inspector.keys.pool(name).leases, flow.pools[name].numbers)
            replies = await pipe.execute()
    return dict(zip(names, replies, strict=True))


def _pool_figures(
    flow: CallFlow, name: str, leases: list[str | None], now: int, each: bool
) -> dict[str, Any]:
    """Pool ``name``'s numbers per state at ``now`` (ms) as ``GET /api/pools`` gives them,
    and with ``each`` every number's line: the lease stored for it (times ISO 8601), or
    nulls when none is (a free number's ended lease stays until the number is leased again)."""
    counts = dict.fromkeys(POOL_STATES, 0)
    lines: list[dict[str, Any]] = []
    for number, raw in zip(flow.pools[name].numbers, leases, strict=True):
        lease = Lease.parse(number, raw) if raw else None
        state = lease.state(now) if lease is not None else "free"
        counts[state] += 1
        lines.append(
            {
                "number": number,
                "state": state,
                "call": lease and lease.call,
                "since": lease and inspection.when(lease.since),
                "until": lease and inspection.when(lease.until),
                "claimed": inspection.when(lease.claimed) if lease and lease.claimed else None,
            }
        )
    figures = inspection.pool_figures(flow, name, PoolStatus(**counts))
    if each:
        figures["by_number"] = lines
    return figures


@cli.command()
@click.pass_obj
def reconcile(options: dict[str, Any]) -> None:
    """Drop state- and node-index entries of calls that expired without ending (the bots
    do this every minute too)."""

    async def prune(inspector: CallInspector) -> int:
        total = 0
        while removed := await inspector.store.prune_index():
            total += removed
        return total

    click.echo(f"removed {_run(options, prune)} index entries of expired calls")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="mermaid", show_default=True)
@click.option(
    "--flow",
    "flow_file",
    is_flag=False,
    flag_value="",
    metavar="[FILE]",
    help="Draw the call flow in FILE instead; without FILE, the bot's (CALLFLOW_FILE, or the built-in one).",
)
@click.option(
    "--call",
    "conversation_id",
    help="Highlight this call's current state, or node with --flow (reads Redis).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
@click.pass_obj
def diagram(
    options: dict[str, Any], fmt: str, flow_file: str | None, conversation_id: str | None, output: Path | None
) -> None:
    """The call state machine, drawn from the definition the bot runs; with --flow, a call flow.

    mermaid and dot need nothing installed; svg and png need Graphviz's `dot`."""
    flow = None if flow_file is None else _callflow(flow_file)
    highlight = None
    if conversation_id is not None:
        record = _run(options, lambda inspector: inspector.store.record(conversation_id))
        if not record:
            raise click.ClickException(f"no call {conversation_id!r} (unknown, or expired)")
        highlight = record.get(CallField.STATE if flow is None else CallField.NODE) or None
    try:
        drawing = render(fmt, highlight) if flow is None else flow_diagram.render(flow, fmt, highlight)
    except DiagramError as e:
        raise click.ClickException(str(e)) from None
    if output is not None:
        output.write_bytes(drawing)
    else:
        click.get_binary_stream("stdout").write(drawing)


def _callflow(path: str) -> CallFlow:
    """The flow in ``path``, or ("") the one the bot is configured with; a bad file or
    setting is one line and exit 1."""
    from orchestrator.config import load_settings

    try:
        return load_callflow(Path(path) if path else load_settings().CALLFLOW_FILE)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _run(options: dict[str, Any], action: Callable[[CallInspector], Awaitable[T]]) -> T:
    """Run one action against the bots' Redis. An unreachable Redis, refused credentials,
    a failed TLS handshake or a user not allowed the command: one line and exit 1."""
    from redis.exceptions import NoPermissionError

    from adapters.keys import Keyspace
    from adapters.redis_client import connection_problem, create_redis
    from adapters.store import RedisCallStore, Retention
    from orchestrator.config import load_settings, redact_url, redis_user
    from orchestrator.errors import ConfigError, StoreUnavailable

    settings = None

    async def go() -> T:
        nonlocal settings
        settings = load_settings(
            REDIS_URL=options["redis_url"],
            REDIS_CLUSTER=options["cluster"],
            REDIS_TIMEOUT_SECONDS=3,
            **options.get("connection", {}),
        )
        # The bots' own retention settings (from the environment), for ``reconcile``.
        store = RedisCallStore(
            create_redis(settings), Keyspace(options["prefix"]), Retention.from_settings(settings)
        )
        try:
            problem = await connection_problem(store.redis, settings)
            if problem is not None:
                shown = redact_url(options["redis_url"])
                if problem.startswith("Redis is not reachable"):
                    raise StoreUnavailable(f"Redis at {shown} is not reachable")
                raise StoreUnavailable(f"Redis at {shown}: {problem}")
            return await action(CallInspector(store))
        finally:
            await store.redis.aclose()

    try:
        return _run_loop(go())
    except (StoreUnavailable, NoPermissionError) as e:
        refused = e if isinstance(e, NoPermissionError) else e.__cause__
        if isinstance(refused, NoPermissionError) and settings is not None:
            # redis-py's text quotes the whole pipeline; the command is what a person needs.
            command = re.search(r"run the '([^']+)' command", str(refused))
            what = f"run {command[1].upper().replace('|', ' ')}" if command else "do this"
            click.echo(
                f"error: Redis user {redis_user(settings)!r} is not allowed to {what} (NOPERM): "
                "a read-only user can inspect calls but not change them",
                err=True,
            )
        else:
            click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


class _ClosingLoop(asyncio.SelectorEventLoop):
    """An event loop that knows the connections it opened, to close them before it ends.

    redis-py closes a connection that failed mid-command (a refused AUTH, a timeout) without
    waiting for the close. Over TLS that close is a round trip (close_notify, then the
    server's answer), which asyncio.run does not wait for: the loop ended first now and
    then, and left the socket open for the garbage collector to find."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super().create_connection(*args, **kwargs)
        self.connections.add(transport)
        return transport, protocol

    async def create_unix_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super().create_unix_connection(*args, **kwargs)
        self.connections.add(transport)
        return transport, protocol


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, and no connection outlives the loop: what is still open or
    closing when ``main`` is done is aborted (a no-op for a connection already closed), and
    the sockets close as the runner shuts the loop down."""
    loop = _ClosingLoop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        try:
            return runner.run(main)
        finally:
            for transport in list(loop.connections):
                transport.abort()


cli.add_command(simulate)


if __name__ == "__main__":
    cli(prog_name="python -m cli")  # click would name the file: a top-level module has no package
