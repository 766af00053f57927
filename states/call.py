"""The call state machine, declared as data.

This module is the one place that names the states and triggers. The bot, the Redis
records, the operator tools and the diagrams all take them from here. It does no I/O:
the callbacks named in ``TRANSITIONS`` are methods of the model the machine drives
(``orchestrator.turn.TurnRunner``), checked when the machine is built.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from transitions import Machine


class State(StrEnum):
    """Where a call is. The values are stored in Redis and shown to operators."""

    BOT = "bot"
    TRANSFERRING = "transferring"
    ACCEPTED = "accepted"
    FAILED = "failed"
    ENDED = "ended"


class Trigger(StrEnum):
    """What can happen to a call."""

    REQUEST_AGENT = "request_agent"  # the caller asks for a person
    ACCEPT = "accept"  # handoff.status accepted (or Telephony hang-up while transferring)
    FAIL = "fail"  # handoff.status failed, or the no-answer watchdog
    COMPLETE = "complete"  # handoff.status completed: the agent hub hands the call back
    RESUME = "resume"  # the caller says something else after a failed transfer
    HANG_UP = "hang_up"  # the call ends


LIVE_STATES = (State.BOT, State.TRANSFERRING, State.ACCEPTED, State.FAILED)

# Order matters where a trigger has two rows for the same source: the first whose
# conditions pass wins. ``dest: None`` is an internal transition (the state stays).
TRANSITIONS: list[dict[str, Any]] = [
    {
        "trigger": Trigger.REQUEST_AGENT,
        "source": [State.BOT, State.FAILED],
        "dest": State.TRANSFERRING,
        "conditions": "has_attempts_left",
        "after": "start_transfer",
    },
    {
        "trigger": Trigger.REQUEST_AGENT,
        "source": [State.BOT, State.FAILED],
        "dest": None,
        "after": "say_no_agents",
    },
    # A late ``accepted`` for the current attempt means the caller is with an agent.
    {
        "trigger": Trigger.ACCEPT,
        "source": [State.TRANSFERRING, State.FAILED],
        "dest": State.ACCEPTED,
    },
    {
        "trigger": Trigger.FAIL,
        "source": State.TRANSFERRING,
        "dest": State.FAILED,
        "after": "say_retry",
    },
    {
        "trigger": Trigger.COMPLETE,
        "source": State.ACCEPTED,
        "dest": State.BOT,
        "after": "say_handback",
    },
    {"trigger": Trigger.RESUME, "source": State.FAILED, "dest": State.BOT},
    {"trigger": Trigger.HANG_UP, "source": list(LIVE_STATES), "dest": State.ENDED},
]

# Per-state hooks, also resolved on the model.
STATE_HOOKS: list[dict[str, Any]] = [
    {"name": State.BOT},
    {"name": State.TRANSFERRING, "on_exit": "disarm_timer"},
    {"name": State.ACCEPTED},
    {"name": State.FAILED},
    {"name": State.ENDED, "on_enter": "disarm_timer"},
]

AFTER_STATE_CHANGE = "record_step"  # machine-wide: every transition goes in the history


def callback_names() -> set[str]:
    """Every model method the definition refers to."""
    names: set[str] = {AFTER_STATE_CHANGE}
    for row in [*TRANSITIONS, *STATE_HOOKS]:
        for key in ("conditions", "unless", "before", "after", "prepare", "on_enter", "on_exit"):
            value = row.get(key)
            if value:
                names.update([value] if isinstance(value, str) else value)
    return names


def build_machine(model: object) -> Machine:
    """Build the machine once (per call flow) around a long-lived model.

    Calls are attached per turn by setting the model's ``state``, not by building a
    Machine per call: building one costs many times what a whole turn does.
    """
    missing = sorted(name for name in callback_names() if not callable(getattr(model, name, None)))
    if missing:
        raise TypeError(f"{type(model).__name__} lacks state machine callbacks: {', '.join(missing)}")
    return Machine(
        model=model,
        states=[_plain(hook) for hook in STATE_HOOKS],
        transitions=[_plain(row) for row in TRANSITIONS],
        initial=State.BOT.value,
        auto_transitions=False,
        send_event=True,
        model_override=False,
        after_state_change=AFTER_STATE_CHANGE,
    )


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """The row with enum members as their string values (transitions names Enum states by
    member name, and ours are stored by value)."""

    def plain(value: Any) -> Any:
        if isinstance(value, StrEnum):
            return value.value
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in row.items()}
