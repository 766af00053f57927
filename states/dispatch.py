"""Fires a built machine's triggers with their callbacks resolved once, not by name on
every trigger as ``transitions`` does, so the machine's part of a turn stays within its
budget (``bench/machine.py`` measures both ways; ``tests/test_dispatch.py`` holds it to
transitions' own results)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transitions import EventData, Machine, MachineError, Transition
from transitions import State as MachineState

Callback = Callable[[EventData], Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    """One of the machine's own ``Transition`` objects with every callback it runs already
    resolved on the model, in the order ``Transition.execute`` runs them."""

    transition: Transition
    prepare: tuple[Callback, ...]
    conditions: tuple[tuple[Callback, bool], ...]  # (predicate, the result that passes)
    before: tuple[Callback, ...]  # machine-wide before_state_change, then the transition's
    dest: MachineState | None  # None: internal, the state stays
    exit: tuple[Callback, ...]  # the source state's on_exit
    enter: tuple[Callback, ...]  # the dest state's on_enter (and on_final if it is final)
    after: tuple[Callback, ...]  # the transition's after, then machine-wide after_state_change


class Dispatch:
    """Fires a built machine's triggers on its one model, as ``model.trigger(name, **kwargs)``
    would.

    ``transitions`` resolves every callback by name, builds partials and logs a dozen
    times on every trigger, before any callback of ours runs. The machine still
    decides: this runs, per (state, trigger), the machine's own ``Transition`` objects in
    its order, checking their conditions and calling their callbacks with a real
    ``EventData``; only the look-ups are done once, here. Built after the machine is
    complete: callbacks added to it later, or model methods replaced later, are not seen.
    Raises on start-up for machine features it does not run.
    """

    def __init__(self, machine: Machine, model: object) -> None:
        unsupported = {
            "queued": machine.has_queue,
            "send_event=False": not machine.send_event,
            "ignore_invalid_triggers": machine.ignore_invalid_triggers
            or any(s.ignore_invalid_triggers for s in machine.states.values()),
            "prepare_event": machine.prepare_event,
            "finalize_event": machine.finalize_event,
            "on_exception": machine.on_exception,
            "enum states": any(s.name != s.value for s in machine.states.values()),
        }
        if any(unsupported.values()):
            names = ", ".join(name for name, used in unsupported.items() if used)
            raise TypeError(f"Dispatch does not run these machine features: {names}")
        if model not in machine.models:
            raise TypeError(f"{type(model).__name__} is not a model of this machine")
        self._machine = machine
        self._model = model
        self._attribute = machine.model_attribute
        self._states: dict[str, MachineState] = dict(machine.states)
        self._events = dict(machine.events)
        lookup = EventData(None, None, machine, model, (), {})

        def resolved(callbacks: Any) -> tuple[Callback, ...]:
            return tuple(machine.resolve_callable(c, lookup) for c in callbacks)

        def plan(transition: Transition) -> _Plan:
            dest = machine.get_state(transition.dest) if transition.dest else None
            return _Plan(
                transition=transition,
                prepare=resolved(transition.prepare),
                conditions=tuple(
                    (machine.resolve_callable(c.func, lookup), c.target) for c in transition.conditions
                ),
                before=resolved([*machine.before_state_change, *transition.before]),
                dest=dest,
                exit=resolved(machine.get_state(transition.source).on_exit) if dest else (),
                enter=resolved([*dest.on_enter, *(machine.on_final if dest.final else [])]) if dest else (),
                after=resolved([*transition.after, *machine.after_state_change]),
            )

        self._plans: dict[tuple[str, str], tuple[_Plan, ...]] = {
            (source, trigger): tuple(plan(t) for t in transitions)
            for trigger, event in machine.events.items()
            for source, transitions in event.transitions.items()
        }
        # Checked against the machine's own queries, not only the tables read above.
        for state in self._states:
            takes = {trigger for source, trigger in self._plans if source == state}
            if takes != set(machine.get_triggers(state)):
                raise AssertionError(f"Dispatch disagrees with the machine on the triggers of {state!r}")
        for (source, trigger), plans in self._plans.items():
            if [p.transition for p in plans] != machine.get_transitions(trigger, source):
                raise AssertionError(f"Dispatch disagrees with the machine on {trigger!r} from {source!r}")

    def _state(self, value: Any) -> MachineState:
        state = self._states.get(value)
        if state is None:
            raise ValueError(f"State '{value}' is not a registered state.")
        return state

    def fire(self, trigger: str, **kwargs: Any) -> bool:
        """Trigger ``trigger``: True if a transition ran, MachineError if the state does not
        take it, exceptions from callbacks propagate; as transitions does."""
        model, attribute = self._model, self._attribute
        if trigger not in self._events:
            self._state(getattr(model, attribute))
            raise AttributeError(f"Do not know event named '{trigger}'.")
        state = self._state(getattr(model, attribute))
        plans = self._plans.get((state.name, trigger))
        if plans is None:
            raise MachineError(f"{self._machine.name}Can't trigger event {trigger} from state {state.name}!")
        event_data = EventData(state, self._events[trigger], self._machine, model, (), kwargs)
        for plan in plans:
            event_data.transition = plan.transition
            for callback in plan.prepare:
                callback(event_data)
            if not _passes(plan.conditions, event_data):
                continue
            for callback in plan.before:
                callback(event_data)
            if plan.dest is not None:
                for callback in plan.exit:
                    callback(event_data)
                setattr(model, attribute, plan.dest.value)
                event_data.state = self._state(getattr(model, attribute))
                for callback in plan.enter:
                    callback(event_data)
            for callback in plan.after:
                callback(event_data)
            event_data.result = True
            return True
        return False


def _passes(conditions: tuple[tuple[Callback, bool], ...], event_data: EventData) -> bool:
    """As ``Transition._eval_conditions``: in order, stopping at the first that fails."""
    for predicate, target in conditions:
        passed = predicate(event_data) == target
        if not passed:
            return False
    return True
