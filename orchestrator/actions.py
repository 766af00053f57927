"""Flow actions: a user's own async Python function, run at an ``action`` node.

The function is imported at start-up (a typo stops start-up, naming the node), runs
outside the commit with a time bound, and what it returns is committed like any other
step. An exception or a timeout sends the call to the node's ``on_error``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from orchestrator.callflow import Action, CallFlow
from orchestrator.errors import ConfigError
from orchestrator.turn import ActionOutcome, Turn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ActionCall:
    """What an action is given: the call's collected variables (in clear), the caller's
    number (``from.id``), what they said last (redacted) and the node it runs at."""

    conversation_id: str
    node: str
    variables: Mapping[str, str]
    caller: str
    last_input: str


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an action returns: variables to set (each named in the node's ``sets``) and
    the node to go to (None: the node's ``next``; else one of its ``may_go``)."""

    variables: Mapping[str, str] = field(default_factory=dict)
    next: str | None = None


ActionFunction = Callable[[ActionCall], Awaitable[ActionResult | None]]


def load_actions(flow: CallFlow) -> dict[str, ActionFunction]:
    """Every action the flow names, imported: ``module:function`` -> the function."""
    found: dict[str, ActionFunction] = {}
    for name, node in flow.nodes.items():
        if not isinstance(node, Action) or node.action in found:
            continue
        module_name, _, attribute = node.action.partition(":")
        where = f"nodes.{name}.action"
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # any error importing the user's module: say which and why
            raise ConfigError(where, f"cannot import {module_name!r}: {e!r}") from e
        function = getattr(module, attribute, None)
        if function is None:
            raise ConfigError(where, f"{module_name!r} has no {attribute!r}")
        if not inspect.iscoroutinefunction(function):
            raise ConfigError(where, f"{node.action} must be an async function (async def)")
        found[node.action] = function
    return found


async def run_action(function: ActionFunction, node: Action, turn: Turn) -> ActionOutcome:
    """Run the action of the node ``turn`` stopped at, bounded by its ``timeout_seconds``;
    a failure is an outcome (the call goes to ``on_error``), never an exception."""
    call = turn.call
    request = ActionCall(call.id, turn.action, dict(call.variables), turn.caller, turn.caller_input)
    try:
        async with asyncio.timeout(node.timeout_seconds):
            result = await function(request)
    except TimeoutError:
        return ActionOutcome(error=f"took longer than {node.timeout_seconds:g} s")
    except Exception as e:
        # The message only: the user's exception may quote what it was given.
        log.warning("call %s: action %s raised %s", call.id, node.action, type(e).__name__)
        return ActionOutcome(error=f"raised {type(e).__name__}")
    if result is None:
        return ActionOutcome()
    if not isinstance(result, ActionResult):
        return ActionOutcome(error=f"returned {type(result).__name__}, not an ActionResult")
    variables = {str(k): str(v) for k, v in result.variables.items()}
    return ActionOutcome(variables=variables, next=result.next)
