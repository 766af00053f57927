"""The operator CLI, through click's runner, against the Redis the bots use."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.inspection import redact
from adapters.inspector import CallInspector
from adapters.keys import Keyspace
from adapters.pool import PoolStatus, PoolStore
from adapters.store import RedisCallStore
from cli import _pool_figures, _pool_leases, cli
from orchestrator import flow_diagram
from orchestrator.callflow import Pool, load_callflow, shipped_flow
from orchestrator.engine import Engine
from orchestrator.events import CallerInput, HandoffStatus
from states.diagram import mermaid
from tests.conftest import REAL_REDIS_URL, SAMPLE_FLOW, delete_prefix, require_real_redis_sync

pytestmark = pytest.mark.real_redis

# A stored reference names the caller: on Telephony, by their number.
REFERENCE = json.dumps({"user": {"id": "+14255550123", "name": "+1 425 555 0123", "role": "user"}, "x": 1})


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def call_in_redis(key_prefix: str) -> Iterator[str]:
    """A call with a transfer that failed, written by the engine as a bot would.

    The CLI runs its own event loop, so this fixture and the tests are synchronous."""
    require_real_redis_sync()

    async def setup() -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        engine = Engine(RedisCallStore(client, Keyspace(key_prefix)), load_callflow(SAMPLE_FLOW))
        await engine.handle("call-42", CallerInput("my card is 4111 1111 1111 1111"), activity_id="a1")
        await engine.handle("call-42", CallerInput("agent"), activity_id="a2", reference=REFERENCE)
        await engine.handle("call-42", HandoffStatus("failed", "busy"), activity_id="a3")
        await client.aclose()

    async def cleanup() -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        await delete_prefix(client, key_prefix)
        await client.aclose()

    asyncio.run(setup())
    yield key_prefix
    asyncio.run(cleanup())


def test_calls_show_json_has_the_whole_call_redacted(call_in_redis: str) -> None:
    result = invoke(
        "--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "calls", "show", "call-42", "--json"
    )
    assert result.exit_code == 0, result.output
    call = json.loads(result.output)
    assert call["record"]["state"] == "failed" and call["record"]["attempts"] == "1"
    assert call["record"]["failure"] == "busy"
    masked = {"id": "*******0123", "name": "*******0123", "role": "user"}
    assert call["record"]["reference"] == {"user": masked, "x": 1}  # the caller's number masked
    assert "5550123" not in result.output and "555 0123" not in result.output
    said = [line["text"] for line in call["transcript"] if line["role"] == "caller"]
    assert said == ["my card is ************1111", "agent"]
    assert [(s["trigger"], s["from"], s["to"], s["node"]) for s in call["history"]] == [
        ("move", "bot", "bot", "agent"),  # through the flow's transfer node
        ("request_agent", "bot", "transferring", ""),
        ("fail", "transferring", "failed", ""),
    ]
    assert all(s["at"].endswith("Z") for s in call["history"])
    assert call["targets_tried"] == ["+14251231234"] and call["history"][1]["target"] == "+14251231234"


def test_calls_show_for_people(call_in_redis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: no cell wraps
    result = invoke("--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "calls", "show", "call-42")
    assert result.exit_code == 0, result.output
    assert "state failed" in result.output and "last failure: busy" in result.output
    assert "targets tried: +14251231234" in result.output and "transferring" in result.output
    assert "4111" not in result.output.replace("************1111", "")


def test_an_unknown_call_is_an_error(call_in_redis: str) -> None:
    result = CliRunner().invoke(
        cli, ["--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "calls", "show", "nope"]
    )
    assert result.exit_code == 1 and "no call 'nope'" in result.output


def test_an_unreachable_redis_is_one_line_and_exit_1() -> None:
    result = CliRunner().invoke(cli, ["--redis-url", "redis://127.0.0.1:1/0", "calls", "show", "x"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: Redis at redis://127.0.0.1:1/0 is not reachable"]


def test_diagram_prints_the_machine(tmp_path: Any) -> None:
    assert invoke("diagram").output == mermaid()
    target = tmp_path / "machine.mmd"
    assert invoke("diagram", "-o", str(target)).exit_code == 0
    assert target.read_text() == mermaid()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111111111111111 ok", "card ************1111 ok"),
        ("call me on 425-555-0123", "call me on ******0123"),
        ("account 1234-5678-9012", "account ********9012"),
        ("press 1 then 0", "press 1 then 0"),
        ("member 1234567", "member ***4567"),  # seven digits: the redactor's threshold
        ("order 123456", "order 123456"),
    ],
)
def test_long_digit_runs_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert load_callflow(SAMPLE_FLOW).redact(text) == expected  # the rule caller words are stored under


def test_calls_list_by_state(call_in_redis: str) -> None:
    base = ["--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "calls", "list"]
    rows = json.loads(invoke(*base, "--state", "failed", "--json").output)
    assert [(r["id"], r["state"], r["attempts"], r["target"]) for r in rows] == [
        ("call-42", "failed", 1, "+14251231234")
    ]
    assert rows[0]["last_transition"] == "fail transferring -> failed" and rows[0]["since"].endswith("Z")
    assert json.loads(invoke(*base, "--state", "transferring", "--json").output) == []
    table = invoke(*base).output
    assert "call-42" in table and "failed" in table


def test_stats_counts_calls_per_state_and_node_and_transfers_per_queue_and_target(
    call_in_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: no cell wraps
    base = ["--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "stats"]
    table = invoke(*base).output
    assert "no calls with the bot at a flow node" in table

    async def at_billing() -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        engine = Engine(RedisCallStore(client, Keyspace(call_in_redis)), load_callflow(SAMPLE_FLOW))
        await engine.handle("call-43", CallerInput("one"), activity_id="a1")
        await client.aclose()

    asyncio.run(at_billing())
    figures = json.loads(invoke(*base, "--json", "--window", "15m").output)
    assert figures["calls"] == {"bot": 1, "transferring": 0, "accepted": 0, "failed": 1, "ended": 0}
    assert figures["nodes"] == {"billing": 1}
    counted = {
        "started": 1,
        "accepted": 0,
        "failed": 1,
        "timeout": 0,
        "late_accepted": 0,
        "success_rate": 0.0,
    }
    assert figures["targets"] == [{"target": "+14251231234", **counted}]
    assert figures["queues"] == [{"queue": "agents", **counted}]
    assert figures["transfers"]["started"] == 1 and figures["window"] == "15m"
    table = invoke(*base).output
    assert "+14251231234" in table and "0%" in table and "failed" in table
    assert "transfers per queue" in table and "agents" in table
    assert "per flow node" in table and "billing" in table


def test_stats_refuses_a_bad_window(call_in_redis: str) -> None:
    result = CliRunner().invoke(cli, ["--redis-url", REAL_REDIS_URL, "stats", "--window", "soon"])
    assert result.exit_code == 2 and "--window" in result.output and "15m" in result.output


def test_diagram_highlights_a_calls_state(call_in_redis: str) -> None:
    result = invoke("--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "diagram", "--call", "call-42")
    assert result.output == mermaid(highlight="failed")
    dot = invoke(
        "--redis-url",
        REAL_REDIS_URL,
        "--prefix",
        call_in_redis,
        "diagram",
        "--format",
        "dot",
        "--call",
        "call-42",
    )
    assert dot.output.startswith("digraph") and "failed" in dot.output
    missing = CliRunner().invoke(
        cli, ["--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis, "diagram", "--call", "nope"]
    )
    assert missing.exit_code == 1 and "no call 'nope'" in missing.output


def test_diagram_without_graphviz_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    result = CliRunner().invoke(cli, ["diagram", "--format", "svg"])
    assert result.exit_code == 1 and "needs Graphviz" in result.output


def test_diagram_as_svg_with_graphviz(tmp_path: Any) -> None:
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed (scripts/ensure-browser installs it)")
    target = tmp_path / "machine.svg"
    assert invoke("diagram", "--format", "svg", "-o", str(target)).exit_code == 0
    assert "<svg" in target.read_text() and "transferring" in target.read_text()


def test_diagram_flow_draws_a_flow_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = load_callflow(SAMPLE_FLOW)
    assert invoke("diagram", "--flow", str(SAMPLE_FLOW)).output == flow_diagram.mermaid(sample)
    target = tmp_path / "flow.dot"
    assert invoke("diagram", "--flow", str(SAMPLE_FLOW), "--format", "dot", "-o", str(target)).exit_code == 0
    assert target.read_text() == flow_diagram.dot(sample)
    # Without FILE: the flow the bot is configured with, or the built-in one.
    monkeypatch.setenv("CALLFLOW_FILE", str(SAMPLE_FLOW))
    assert invoke("diagram", "--flow").output == flow_diagram.mermaid(sample)
    monkeypatch.delenv("CALLFLOW_FILE")
    assert invoke("diagram", "--flow", "--format", "dot").output == flow_diagram.dot(load_callflow())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "cannot read the call flow file"),
        ("nodes: [", "not valid YAML"),
        ("prompts: {}\nstart: main\nnodes: {main: {type: menu, routes: [{key: '1', to: gone}]}}\n", "gone"),
    ],
)
def test_diagram_flow_of_a_bad_file_is_one_line(tmp_path: Path, text: str | None, error: str) -> None:
    path = tmp_path / "flow.yaml"
    if text is not None:
        path.write_text(text)
    result = CliRunner().invoke(cli, ["diagram", "--flow", str(path)])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: {path}") and error in result.output


def test_diagram_flow_highlights_a_calls_node(call_in_redis: str, tmp_path: Path) -> None:
    base = [
        "--redis-url",
        REAL_REDIS_URL,
        "--prefix",
        call_in_redis,
        "diagram",
        "--call",
        "call-42",
        "--flow",
    ]
    result = invoke(*base, str(SAMPLE_FLOW))  # the call waited at main before its transfer
    assert result.output == flow_diagram.mermaid(load_callflow(SAMPLE_FLOW), "main")
    renamed = tmp_path / "renamed.yaml"  # a flow without that node: the call is not in it
    renamed.write_text(SAMPLE_FLOW.read_text().replace("main", "lobby"))
    missing = CliRunner().invoke(cli, [*base, str(renamed)])
    assert missing.exit_code == 1
    assert "unknown node 'main': this flow's nodes are lobby, billing, agent" in missing.output


def test_calls_watch_shows_steps_committed_after_it_started(call_in_redis: str) -> None:
    """The watch runs in a thread; steps are made until it has shown two of them."""
    result: list[Any] = []
    args = [
        "--redis-url",
        REAL_REDIS_URL,
        "--prefix",
        call_in_redis,
        "calls",
        "watch",
        "--json",
        "--count",
        "2",
    ]
    watcher = threading.Thread(target=lambda: result.append(invoke(*args)))
    watcher.start()

    async def step(n: int) -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        engine = Engine(RedisCallStore(client, Keyspace(call_in_redis)), load_callflow(SAMPLE_FLOW))
        await engine.handle(f"w{n}", CallerInput("agent"), activity_id="a")
        await client.aclose()

    made = 0
    while watcher.is_alive() and made < 200:
        asyncio.run(step(made))
        made += 1
        watcher.join(0.1)
    assert not watcher.is_alive()
    rows = [json.loads(line) for line in result[0].output.splitlines()]
    assert len(rows) == 2
    # Each call's two steps: the move to the flow's transfer node, then into transferring.
    assert all(
        (r["trigger"], r["to"], r["node"])
        in {("move", "bot", "agent"), ("request_agent", "transferring", "")}
        for r in rows
    )
    assert {r["call"] for r in rows} <= {f"w{n}" for n in range(made)}  # never call-42's older steps


def test_reconcile_removes_entries_of_expired_calls(call_in_redis: str) -> None:
    async def expire() -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        keys = Keyspace(call_in_redis)
        shard = keys.locate("call-42")[0]
        await client.delete(keys.call("call-42").call)
        await client.zadd(keys.state_index(shard, "failed"), {"call-42": 1})  # entered long ago
        await client.aclose()

    asyncio.run(expire())
    base = ["--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis]
    assert invoke(*base, "reconcile").output.strip() == "removed 1 index entries of expired calls"
    assert json.loads(invoke(*base, "stats", "--json").output)["calls"]["failed"] == 0


def test_calls_watch_ends_quietly_on_ctrl_c(call_in_redis: str, tmp_path: Path) -> None:
    """As a person runs it: a process, interrupted by SIGINT once it is watching."""
    out = tmp_path / "watch.out"
    command = [sys.executable, "-m", "cli", "--redis-url", REAL_REDIS_URL, "--prefix", call_in_redis]
    with out.open("w") as sink:
        watch = subprocess.Popen([*command, "calls", "watch"], stdout=sink, stderr=subprocess.PIPE, text=True)

    async def step(n: int) -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        engine = Engine(RedisCallStore(client, Keyspace(call_in_redis)), load_callflow(SAMPLE_FLOW))
        await engine.handle(f"i{n}", CallerInput("agent"), activity_id="a")
        await client.aclose()

    try:
        # Steps until one shows: then the watch is surely past its start-up.
        for n in range(100):
            asyncio.run(step(n))
            time.sleep(0.2)
            if "request_agent" in out.read_text():
                break
        assert "bot -> transferring" in out.read_text()
        watch.send_signal(signal.SIGINT)
        _, errors = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0 and "Traceback" not in errors, errors


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    result = CliRunner().invoke(cli, ["--redis-url", "redis://ops:s3cret@127.0.0.1:1/0", "stats"])
    assert result.exit_code == 1 and "s3cret" not in result.output
    assert "redis://ops:***@127.0.0.1:1/0 is not reachable" in result.output


def test_the_entry_points_run_the_cli_from_the_top_level() -> None:
    """``cc-orchestrator`` is ``cli:cli``, installed as a top-level module beside ``app``,
    and ``python -m cli`` runs it; the core has no ``__main__`` of its own."""
    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["cc-orchestrator"] == "cli:cli"
    assert {"app", "cli"} <= set(project["tool"]["setuptools"]["py-modules"])
    assert not (root / "orchestrator" / "__main__.py").exists()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--help"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: python -m cli ") and "simulate" in done.stdout


# Number pools (issue 15): the example warm-transfer flow's pool "agents", three numbers,
# leased by its queue "agents" when a caller says "agent".
WARM_FLOW = shipped_flow("warm-transfer.yaml")
POOL_NUMBERS = load_callflow(WARM_FLOW).pools["agents"].numbers


async def lapsed_once(pools: PoolStore, numbers: list[str]) -> PoolStatus:
    """The pool's status once a lease has lapsed (by Redis time: polled until it has)."""
    for _ in range(200):
        status = await pools.status("agents", numbers)
        if status.lapsed:
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"no lease lapsed: {status}")


@pytest.fixture
def pool_in_use(key_prefix: str) -> Iterator[dict[str, str]]:
    """The pool "agents" with a number leased to a ringing transfer, one claimed by the
    agent side and one lapsed (its instance died holding it): the calls' ids by state."""
    require_real_redis_sync()

    async def setup() -> dict[str, str]:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        store = RedisCallStore(client, Keyspace(key_prefix))
        pools = PoolStore(client, store.keys, store.sealer)
        engine = Engine(store, load_callflow(WARM_FLOW), pools=pools)
        for call in ("ringing", "answered"):
            await engine.handle(call, CallerInput("agent"), activity_id=f"{call}-agent")
        answered = await store.record("answered")
        assert await pools.claim("agents", answered["target"]) is not None
        assert await pools.lease("agents", POOL_NUMBERS, "dead", "t", 0.2) is not None
        assert await lapsed_once(pools, POOL_NUMBERS) == PoolStatus(free=0, leased=1, claimed=1, lapsed=1)
        ringing = await store.record("ringing")
        await client.aclose()
        return {"leased": ringing["target"], "claimed": answered["target"]}

    async def cleanup() -> None:
        client = Redis.from_url(REAL_REDIS_URL, decode_responses=True)
        await delete_prefix(client, key_prefix)
        await client.aclose()

    dialled = asyncio.run(setup())
    yield {"prefix": key_prefix, **dialled}
    asyncio.run(cleanup())


def test_pool_status_counts_each_pools_numbers(
    pool_in_use: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: no cell wraps
    base = ["--redis-url", REAL_REDIS_URL, "--prefix", pool_in_use["prefix"], "pool", "status"]
    figures = json.loads(invoke(*base, "--flow", str(WARM_FLOW), "--json").output)
    assert figures == {
        "pools": {
            "agents": {
                "numbers": 3,
                "free": 0,
                "leased": 1,
                "claimed": 1,
                "lapsed": 1,
                "grace_seconds": 30.0,
                "queues": ["agents"],
            }
        }
    }
    # The flow the bot is configured with, by default; one pool by name.
    monkeypatch.setenv("CALLFLOW_FILE", str(WARM_FLOW))
    assert json.loads(invoke(*base, "agents", "--json").output) == figures
    table = invoke(*base).output
    assert "number pools" in table
    assert re.search(r"agents\W+3\W+0\W+1\W+1\W+1\W+30 s\W+agents", table), table


def test_pool_status_numbers_says_who_holds_each(
    pool_in_use: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    base = ["--redis-url", REAL_REDIS_URL, "--prefix", pool_in_use["prefix"], "pool", "status"]
    base += ["--flow", str(WARM_FLOW), "agents", "--numbers"]
    lines = json.loads(invoke(*base, "--json").output)["pools"]["agents"]["by_number"]
    assert [line["number"] for line in lines] == POOL_NUMBERS  # in the flow's order
    by_number = {line["number"]: line for line in lines}
    expected = {pool_in_use["leased"]: ("leased", "ringing"), pool_in_use["claimed"]: ("claimed", "answered")}
    expected[POOL_NUMBERS[2]] = ("lapsed", "dead")
    assert {n: (line["state"], line["call"]) for n, line in by_number.items()} == expected
    assert by_number[pool_in_use["claimed"]]["claimed"].endswith("Z")
    assert by_number[pool_in_use["leased"]]["claimed"] is None
    for line in lines:
        assert line["since"].endswith("Z") and line["since"] < line["until"]
    table = invoke(*base).output
    assert "pool agents" in table and "dead" in table and "lapsed" in table and "answered" in table


def test_pool_status_of_an_unknown_pool_names_the_known_ones() -> None:
    result = CliRunner().invoke(cli, ["pool", "status", "--flow", str(WARM_FLOW), "sales"])
    assert result.exit_code == 2
    assert "no pool 'sales': this call flow's pools are agents" in result.output
    result = CliRunner().invoke(cli, ["pool", "status", "--flow", str(SAMPLE_FLOW), "agents"])
    assert result.exit_code == 2 and "this call flow has none" in result.output


def test_pool_status_of_a_flow_without_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to read: Redis is not even asked (here it is not there)."""
    monkeypatch.setenv("CALLFLOW_FILE", str(SAMPLE_FLOW))
    base = ["--redis-url", "redis://127.0.0.1:1/0", "pool", "status"]
    assert invoke(*base).output.strip() == "this call flow has no number pools"
    assert json.loads(invoke(*base, "--json").output) == {"pools": {}}


def test_pool_status_with_redis_down_is_one_line_and_exit_1() -> None:
    result = CliRunner().invoke(
        cli, ["--redis-url", "redis://127.0.0.1:1/0", "pool", "status", "--flow", str(WARM_FLOW)]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: Redis at redis://127.0.0.1:1/0 is not reachable"]


@pytest.mark.parametrize("redis_client", ["fake", "real", "cluster"], indirect=True)
async def test_pool_status_counts_as_the_lease_script_does(redis_client: Redis, key_prefix: str) -> None:
    """The CLI reads leases with plain reads (a read-only user runs no script) and judges
    them as pool_lease.lua's status does, on the fake, a real Redis and a cluster: a lease
    that ended after its transfer connected or the agent side claimed it is free, one that
    ended with nobody giving it back lapsed."""
    if isinstance(redis_client, RedisCluster):
        await redis_client.initialize()
    numbers = [f"+1425555{i:04d}" for i in range(5)]
    flow = load_callflow(WARM_FLOW)
    flow = flow.model_copy(update={"pools": {"agents": Pool(numbers=numbers, grace_seconds=5)}})
    store = RedisCallStore(redis_client, Keyspace(key_prefix))
    pools = PoolStore(redis_client, store.keys)
    inspector = CallInspector(store)

    async def figures() -> dict[str, int]:
        leases = await _pool_leases(inspector, flow, ["agents"])
        shown = _pool_figures(flow, "agents", leases["agents"], int(time.time() * 1000), each=False)
        return {state: shown[state] for state in ("free", "leased", "claimed", "lapsed")}

    assert await figures() == {"free": 5, "leased": 0, "claimed": 0, "lapsed": 0}
    held = [await pools.lease("agents", numbers, f"c{i}", "t", 30) for i in range(5)]
    assert [lease.number if lease else None for lease in held] == numbers
    assert await pools.claim("agents", numbers[1]) is not None  # claimed, and live
    assert await pools.claim("agents", numbers[2], grace_seconds=0.2) is not None  # ends claimed
    assert await pools.settle("agents", numbers[3], "c3", "t", 0.2) is not None  # ends connected
    assert await pools.release("agents", numbers[4], "c4", "t") is not None
    assert await pools.lease("agents", numbers, "dead", "t", 0.2) is not None  # ends given back by none
    assert await figures() == {"free": 0, "leased": 3, "claimed": 2, "lapsed": 0}
    for _ in range(200):  # leases end by Redis time: polled until the three short ones have
        status = await pools.status("agents", numbers)
        if status.leased + status.claimed == 2:
            break
        await asyncio.sleep(0.02)
    assert await figures() == {"free": 2, "leased": 1, "claimed": 1, "lapsed": 1}
    assert await figures() == {
        name: getattr(status, name) for name in ("free", "leased", "claimed", "lapsed")
    }


@pytest.mark.parametrize("user", ["cc-operator", "cc-operator-strict"])
def test_pool_status_runs_as_the_read_only_operator_users(pool_in_use: dict[str, str], user: str) -> None:
    """The operator users of docs/redis-security.md run no script and no TIME: the CLI
    reads the pools with what they may run. Made on the shared server for this test's
    prefix only, under a name of its own, and deleted after."""
    prefix = pool_in_use["prefix"]
    doc = (Path(__file__).parents[1] / "docs" / "redis-security.md").read_text(encoding="utf-8")
    (line,) = [line for line in doc.splitlines() if line.startswith(f"ACL SETUSER {user} ")]
    name, password = f"{prefix}-{user}", f"pw-{prefix}"
    words = [
        name if i == 2 else f">{password}" if w.startswith("><") else w.replace("~cc:", f"~{prefix}:")
        for i, w in enumerate(shlex.split(line))
    ]
    admin = redis.Redis.from_url(REAL_REDIS_URL)
    admin.execute_command(*words)  # type: ignore[no-untyped-call]
    try:
        base = ["--redis-url", REAL_REDIS_URL, "--prefix", prefix]
        base += ["--redis-username", name, "--redis-password", password]
        result = CliRunner().invoke(cli, [*base, "pool", "status", "--flow", str(WARM_FLOW), "--json"])
        assert result.exit_code == 0, result.output
        agents = json.loads(result.output)["pools"]["agents"]
        assert (agents["free"], agents["leased"], agents["claimed"], agents["lapsed"]) == (0, 1, 1, 1)
    finally:
        admin.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]
        admin.close()
