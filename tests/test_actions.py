"""Flow actions, the user's own code: imported at start-up (mistakes name the node), run
bounded and outside the commit, failures sent to ``on_error``, and run once per activity
however it is delivered. The shipped example (examples/account_lookup.py) is the subject."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import examples.account_lookup as lookup
from adapters.store import RedisCallStore
from orchestrator.actions import ActionCall, ActionResult, load_actions, run_action
from orchestrator.call import Call, timestamp
from orchestrator.callflow import Action, CallFlow, load_callflow, parse_callflow, shipped_flow
from orchestrator.engine import Engine
from orchestrator.errors import ConfigError
from orchestrator.events import CallerInput, CallStarted
from orchestrator.turn import Handoff, Speak, Turn, TurnRunner

FLOW_FILE = shipped_flow("account-lookup.yaml")
ACTION = "examples.account_lookup:find_account"


@pytest.fixture(scope="module")
def flow() -> CallFlow:
    return load_callflow(FLOW_FILE)


def with_action(flow: CallFlow, **changes: Any) -> CallFlow:
    """The example flow with its action node changed."""
    doc = yaml.safe_load(FLOW_FILE.read_text())
    doc["nodes"]["lookup"].update(changes)
    return parse_callflow(yaml.safe_dump(doc), "flow.yaml")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of the user's own, importable as ``useractions``."""
    (tmp_path / "useractions.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            from orchestrator.actions import ActionResult

            def not_async(call):
                return ActionResult()

            async def slow(call):
                await asyncio.sleep(60)

            async def raises(call):
                raise RuntimeError("account 12345678 not found")  # the message quotes a secret

            async def returns_nothing(call):
                return None

            async def returns_a_dict(call):
                return {"next": "priority"}

            async def sets_undeclared(call):
                return ActionResult(variables={"balance": "10"})

            async def goes_astray(call):
                return ActionResult(next="billing")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "useractions"
    sys.modules.pop("useractions", None)


# --- loading ---------------------------------------------------------------------------


def test_the_example_flow_names_its_action_and_it_loads(flow: CallFlow) -> None:
    node = flow.nodes["lookup"]
    assert isinstance(node, Action) and node.action == ACTION
    assert node.sets == ["name"] and node.may_go == ["priority", "not_found"]
    assert load_actions(flow) == {ACTION: lookup.find_account}
    assert set(flow.reachable()) == set(flow.nodes)


@pytest.mark.parametrize(
    ("action", "problem"),
    [
        ("nosuchpackage.lookup:find", "cannot import 'nosuchpackage.lookup'"),
        ("examples.account_lookup:nonesuch", "'examples.account_lookup' has no 'nonesuch'"),
        ("useractions:not_async", "useractions:not_async must be an async function"),
    ],
)
def test_a_wrong_action_stops_start_up_naming_the_node(
    flow: CallFlow, user_module: str, action: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_actions(with_action(flow, action=action))
    assert info.value.where == "nodes.lookup.action" and problem in info.value.problem


def test_an_action_that_is_not_module_colon_function_is_refused(flow: CallFlow) -> None:
    with pytest.raises(ConfigError, match=r"nodes\.lookup.*action"):
        with_action(flow, action="examples.account_lookup.find_account")


def test_an_action_may_only_go_where_the_flow_says(flow: CallFlow) -> None:
    with pytest.raises(ConfigError, match=r"nodes\.lookup\.may_go"):
        with_action(flow, may_go=["priority", "nowhere"])


# --- running ---------------------------------------------------------------------------


def turn_at_action(flow: CallFlow, account: str) -> Turn:
    """A turn that reached the lookup: the caller keyed ``account`` and the gather took it."""
    runner = TurnRunner(flow)
    started = runner.run(Call(id="call-1"), CallStarted(), now=timestamp())
    turn = runner.run(started.call, CallerInput(account), now=timestamp())  # spoken digits: one message
    assert turn.action == "lookup", turn.action
    return turn


@pytest.mark.parametrize(
    ("account", "variables", "next_node"),
    [
        ("12345678", {"name": "Ada"}, "priority"),
        ("87654321", {"name": "Grace"}, None),
        ("11112222", {}, "not_found"),
    ],
)
async def test_the_example_finds_accounts(
    account: str, variables: dict[str, str], next_node: str | None
) -> None:
    call = ActionCall("call-1", "lookup", {"account": account}, "+14255550123", "")
    assert await lookup.find_account(call) == ActionResult(variables=variables, next=next_node)


async def test_the_example_raises_when_the_crm_is_down() -> None:
    with pytest.raises(lookup.CrmUnavailable):
        await lookup.find_account(ActionCall("call-1", "lookup", {"account": lookup.OUTAGE}, "", ""))


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("slow", "took longer than 0.2 s"),
        ("raises", "raised RuntimeError"),
        ("returns_a_dict", "returned dict, not an ActionResult"),
    ],
)
async def test_a_failing_action_is_an_outcome_not_an_exception(
    flow: CallFlow, user_module: str, function: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    changed = with_action(flow, action=f"{user_module}:{function}", timeout_seconds=0.2)
    node = changed.nodes["lookup"]
    assert isinstance(node, Action)
    functions = load_actions(changed)
    with caplog.at_level(logging.INFO):
        outcome = await run_action(functions[node.action], node, turn_at_action(changed, "12345678"))
    assert outcome.error == error and not outcome.variables
    assert "12345678" not in caplog.text  # an exception's message may quote what it was given


async def test_an_action_returning_nothing_goes_on_to_next(flow: CallFlow, user_module: str) -> None:
    changed = with_action(flow, action=f"{user_module}:returns_nothing")
    node = changed.nodes["lookup"]
    assert isinstance(node, Action)
    runner = TurnRunner(changed)
    turn = turn_at_action(changed, "12345678")
    outcome = await run_action(load_actions(changed)[node.action], node, turn)
    turn = runner.after_action(turn, outcome)
    assert [e.prompt.name for e in turn.effects if isinstance(e, Speak)][-1:] == ["hello"]
    assert [e.queue for e in turn.effects if isinstance(e, Handoff)] == ["billing"]


@pytest.mark.parametrize(
    ("function", "why"),
    [("sets_undeclared", "does not declare in 'sets': balance"), ("goes_astray", "neither its 'next' nor")],
)
async def test_an_action_outside_its_declaration_goes_to_on_error(
    flow: CallFlow, user_module: str, function: str, why: str
) -> None:
    changed = with_action(flow, action=f"{user_module}:{function}")
    node = changed.nodes["lookup"]
    assert isinstance(node, Action)
    runner = TurnRunner(changed)
    turn = turn_at_action(changed, "12345678")
    turn = runner.after_action(turn, await run_action(load_actions(changed)[node.action], node, turn))
    assert any(why in step.reason for step in turn.steps), [s.reason for s in turn.steps]
    said = [e.prompt.name for e in turn.effects if isinstance(e, Speak)]
    assert "lookup_failed" in said
    assert [e.queue for e in turn.effects if isinstance(e, Handoff)] == ["billing"]
    assert "balance" not in turn.call.variables


# --- once per activity, through the engine and the store ------------------------------


class Counting:
    """The example action, counting its runs; ``hold`` keeps it running until set."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def __call__(self, call: ActionCall) -> ActionResult:
        self.runs += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        return await lookup.find_account(call)


def engine_for(store: RedisCallStore, flow: CallFlow, action: Counting) -> Engine:
    return Engine(store, flow, actions={ACTION: action})


async def test_a_redelivered_activity_does_not_run_the_action_again(
    store: RedisCallStore, flow: CallFlow
) -> None:
    """An unknown account sends the call back to the gather, where the same digits would
    run the lookup again: delivered again, they must not."""
    action = Counting()
    engine = engine_for(store, flow, action)
    await engine.handle("call-1", CallStarted(), activity_id="start")
    first = await engine.handle("call-1", CallerInput("11112222"), activity_id="keys")
    assert first is not None and action.runs == 1
    assert [e.prompt.name for e in first.effects if isinstance(e, Speak)] == ["not_found", "ask_account"]
    again = await engine.handle("call-1", CallerInput("11112222"), activity_id="keys")  # the cached copy
    fresh = Engine(store, flow, actions={ACTION: action})  # another instance: no cache
    elsewhere = await fresh.handle("call-1", CallerInput("11112222"), activity_id="keys")
    assert again is None and elsewhere is None and action.runs == 1
    assert engine.duplicates == 1 and fresh.duplicates == 1
    known = await engine.handle("call-1", CallerInput("12345678"), activity_id="keys-2")
    assert known is not None and action.runs == 2
    assert [e.queue for e in known.effects if isinstance(e, Handoff)] == ["priority"]
    call = (await store.load("call-1")).call
    assert call is not None and call.variables == {"account": "12345678", "name": "Ada"}


async def test_a_conflict_reruns_the_turn_but_not_the_action(store: RedisCallStore, flow: CallFlow) -> None:
    """Another turn commits while the action runs: the turn is run again on the new call,
    with what the action already returned."""
    action = Counting()
    engine = engine_for(store, flow, action)
    await engine.handle("call-1", CallStarted(), activity_id="start")
    action.hold = asyncio.Event()
    keyed = asyncio.create_task(engine.handle("call-1", CallerInput("87654321"), activity_id="keys"))
    await asyncio.wait_for(action.started.wait(), 10)
    other = Engine(store, flow, actions={ACTION: action})
    assert await other.handle("call-1", CallerInput("*"), activity_id="star") is not None
    action.hold.set()
    turn = await keyed
    assert turn is not None and action.runs == 1
    assert engine.conflicts + engine.cache.stale >= 1, "the keyed turn must have lost the race once"
    assert [e.queue for e in turn.effects if isinstance(e, Handoff)] == ["billing"]
