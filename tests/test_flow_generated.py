"""Generated call flows: every valid one loads, and every node in it can be reached by some
caller input (simulated turn by turn); one mutation of a valid flow is refused with one
line naming the field it broke.

A valid flow is built as a spanning tree from ``start`` (so every node is reachable) and
then given random extra links. Links out of a node that passes the call on in the same
turn (say, hours) go only to a later node or to one that stops the turn, so they make no
loop; a queue's ``closed`` and ``after_final``, followed in the same turn as a transfer,
lead only to nodes that wait or hang up (the validation misses loops through them: see
test_callflow's xfails).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from collections import deque
from collections.abc import Iterator
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.call import Call
from orchestrator.callflow import KEYS, CallFlow, Gather, Menu, load_callflow, parse_callflow
from orchestrator.errors import ConfigError
from orchestrator.events import CallerInput, CallStarted, Event, HandoffStatus, TimerExpired
from orchestrator.turn import MOVE, Turn, TurnRunner
from states import State
from tests.conftest import SAMPLE_FLOW

LABEL = "flow.yaml"
GENERATED = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

TYPES = ("menu", "say", "gather", "transfer", "hang_up", "hours")
PASSING = frozenset({"say", "hours"})  # go on in the same turn
STOPPING = ("menu", "gather", "hang_up")  # what a queue's same-turn links may lead to
LINK_SLOTS = {"menu": 99, "say": 1, "hours": 2, "gather": 2, "transfer": 0, "hang_up": 0}
SLOT_FIELDS = {"say": ("next",), "hours": ("open", "closed"), "gather": ("next", "on_fail")}
WORDS = ("billing", "support", "sales", "agent", "help", "other", "main menu", "talk to someone")
# Every generated schedule is open all of Monday to Friday, local time, in a zone within
# eleven hours of UTC: open on a Wednesday at noon UTC, closed on a Sunday at noon UTC.
ZONES = ("UTC", "Europe/London", "America/New_York", "America/Los_Angeles", "Asia/Tokyo", "Asia/Kolkata")
WEEKS = (
    {"mon-fri": ["00:00-24:00"]},
    {"mon-thu": ["00:00-24:00"], "fri": ["00:00-12:00", "12:00-24:00"]},
    {"mon": ["00:00-24:00"], "tue-fri": ["00:00-09:30", "09:30-24:00"], "sat": []},
)
OPEN_AT = dt.datetime(2026, 3, 11, 12, tzinfo=dt.UTC)
CLOSED_AT = dt.datetime(2026, 3, 15, 12, tzinfo=dt.UTC)
NOW = "2026-03-11T12:00:00.000Z"
CALLER = "+14255550199"
NONSENSE = "zzz"  # no route's phrase, and no digits
COUNTER_CAP = 3  # explore at most this many misses or silences at one node
TIMER = TimerExpired(now_ms=10**13)


# --- valid flows ------------------------------------------------------------------------


def _route(draw: st.DrawFn, keys: list[str], index: int, target: str | None) -> dict[str, Any]:
    """A route to ``target`` (None: a repeat) by a key from ``keys`` (used up), phrases
    unique at this list (by ``index``), or both."""
    kind = draw(st.sampled_from(["key", "phrases", "both"] if keys else ["phrases"]))
    route: dict[str, Any] = {}
    if kind != "phrases":
        route["key"] = keys.pop()
    if kind != "key":
        word = draw(st.sampled_from(WORDS))
        styled = draw(
            st.sampled_from([f"{word} {index}", f"{word.title()} {index}.", f"  {word.upper()} {index}!"])
        )
        route["phrases"] = [styled]
    if target is None:
        route["repeat"] = True
    else:
        route["to"] = target
    return route


def _retry(draw: st.DrawFn, prompts: list[str], names: list[str], *, no_input: bool) -> dict[str, Any]:
    retry: dict[str, Any] = {"say": draw(st.lists(st.sampled_from(prompts), max_size=2))}
    if draw(st.booleans()):
        retry["max"] = draw(st.integers(0, 2))
        retry["then"] = draw(st.sampled_from(names))  # only with max: else never taken
    retry["repeat"] = draw(st.booleans())
    if no_input:
        retry["seconds"] = draw(st.sampled_from([1, 5, 7.5]))
    return retry


@st.composite
def valid_flows(draw: st.DrawFn) -> dict[str, Any]:
    prompts = [f"p{i}" for i in range(draw(st.integers(1, 4)))]
    count = draw(st.integers(2, 8))
    names = [f"n{i}" for i in range(count)]

    # Node types, so that every node after the first finds a parent with a free link.
    types: list[str] = []
    free = 0
    for i in range(count):
        choices = list(TYPES) if i < count - 1 else ["menu", "gather", "transfer", "hang_up"]
        if i < count - 1:
            used = 1 if i else 0
            choices = [t for t in choices if free - used + LINK_SLOTS[t] >= 1]
        kind = draw(st.sampled_from(choices))
        types.append(kind)
        free += LINK_SLOTS[kind] - (1 if i else 0)

    def later_or_stopping(i: int) -> list[str]:
        """Where a say or hours node ``i`` may link: on, or to a node that stops the turn."""
        return [names[j] for j in range(len(names)) if j > i or types[j] not in PASSING]

    gathers = [i for i, kind in enumerate(types) if kind == "gather"]
    variables = [f"v{i}" for i in gathers]
    queues = [f"q{i}" for i in range(draw(st.integers(1, 2)))]
    schedules = [f"h{i}" for i in range(draw(st.integers(1, 2)))]

    nodes: dict[str, dict[str, Any]] = {}
    keys: dict[str, list[str]] = {}
    for i, (name, kind) in enumerate(zip(names, types, strict=True)):
        node: dict[str, Any] = {"type": kind}
        said = draw(st.lists(st.sampled_from(prompts), max_size=2))
        if said:
            node["say"] = said[0] if len(said) == 1 and draw(st.booleans()) else said
        if kind == "menu":
            node["routes"] = []
            keys[name] = list(draw(st.permutations(KEYS)))
            if draw(st.integers(0, 3)) == 0:
                node["global_routes"] = False
        elif kind == "gather":
            low = draw(st.integers(1, 4))
            node.update(
                into=f"v{i}",
                min_digits=low,
                max_digits=draw(st.integers(low, 6)),
                attempts=draw(st.integers(1, 3)),
            )
            if draw(st.booleans()):
                node["finish_key"] = None
            if draw(st.booleans()):
                node["confirm"] = draw(st.sampled_from(prompts))
            if draw(st.booleans()):
                node["invalid"] = draw(st.lists(st.sampled_from(prompts), min_size=1, max_size=2))
        elif kind == "transfer":
            node["queue"] = draw(st.sampled_from(queues))
        elif kind == "hours":
            node["hours"] = draw(st.sampled_from(schedules))
        elif kind == "hang_up" and draw(st.booleans()):
            node["reason"] = "done"
        nodes[name] = node

    # The spanning tree: each node gets a link from an earlier one with a free link.
    for i in range(1, count):
        parents = [
            names[j]
            for j in range(i)
            if types[j] == "menu" or any(f not in nodes[names[j]] for f in SLOT_FIELDS.get(types[j], ()))
        ]
        parent = draw(st.sampled_from(parents))
        node = nodes[parent]
        if node["type"] == "menu":
            node["routes"].append(_route(draw, keys[parent], len(node["routes"]), names[i]))
        else:
            field = draw(st.sampled_from([f for f in SLOT_FIELDS[node["type"]] if f not in node]))
            node[field] = names[i]

    # The links the tree left unset, and random extra routes and retries.
    for i, (name, kind) in enumerate(zip(names, types, strict=True)):
        node = nodes[name]
        for field in SLOT_FIELDS.get(kind, ()):
            if field not in node:
                node[field] = draw(st.sampled_from(later_or_stopping(i) if kind in PASSING else names))
        if kind == "menu":
            for _ in range(draw(st.integers(0, 2))):
                target = draw(st.none() | st.sampled_from(names))
                node["routes"].append(_route(draw, keys[name], len(node["routes"]), target))
        if kind in ("menu", "gather"):
            choice = draw(st.sampled_from(["default", "off", "own"]))
            if choice == "off":
                node["no_input"] = None
            elif choice == "own":
                node["no_input"] = _retry(draw, prompts, names, no_input=True)
            if kind == "menu" and draw(st.booleans()):
                node["no_match"] = _retry(draw, prompts, names, no_input=False)

    global_keys = list(draw(st.permutations(KEYS)))
    global_routes = [
        _route(draw, global_keys, 100 + r, draw(st.none() | st.sampled_from(names)))
        for r in range(draw(st.integers(0, 2)))
    ]

    stopping = [names[i] for i, kind in enumerate(types) if kind in STOPPING]
    queue_docs: dict[str, dict[str, Any]] = {}
    for queue in queues:
        numbers = draw(st.lists(st.integers(0, 9999), min_size=1, max_size=3, unique=True))
        queue_doc: dict[str, Any] = {
            "targets": [f"+1425555{n:04d}" for n in numbers],
            "max_attempts": draw(st.integers(1, 3)),
            "timeout_seconds": draw(st.sampled_from([10, 45, 60])),
            "retry": draw(st.lists(st.sampled_from(prompts), min_size=1, max_size=2)),
            "final": draw(st.sampled_from(prompts)),
            "handback": draw(st.sampled_from(prompts)),
        }
        if draw(st.booleans()):
            queue_doc["announce"] = draw(st.sampled_from(prompts))
        if draw(st.booleans()):
            queue_doc["on_failure"] = draw(st.sampled_from(names))
        if draw(st.booleans()) and stopping:
            queue_doc["after_final"] = draw(st.sampled_from(stopping))
        if draw(st.booleans()) and stopping:
            queue_doc["hours"], queue_doc["closed"] = (
                draw(st.sampled_from(schedules)),
                draw(st.sampled_from(stopping)),
            )
        queue_docs[queue] = queue_doc

    placeholders = [
        "{input}",
        "{caller}",
        *(f"{{{v}}}" for v in variables),
        *(f"{{{v}:digits}}" for v in variables),
    ]
    prompt_docs: dict[str, dict[str, Any]] = {}
    for prompt in prompts:
        parts = draw(st.lists(st.sampled_from(placeholders), max_size=2))
        prompt_doc: dict[str, Any] = {"text": " ".join([f"Prompt {prompt} <&>.", *parts])}
        barge_in = draw(st.sampled_from([None, "any", "keys", "speech", "none"]))
        if barge_in is not None:
            prompt_doc["barge_in"] = barge_in
        prompt_docs[prompt] = prompt_doc

    defaults: dict[str, Any] = {}
    if draw(st.booleans()):
        defaults["no_input"] = draw(st.none() | st.just(_retry(draw, prompts, names, no_input=True)))
    if draw(st.booleans()):
        defaults["no_match"] = _retry(draw, prompts, names, no_input=False)

    flow: dict[str, Any] = {
        "prompts": prompt_docs,
        "start": names[0],
        "nodes": nodes,
        "queues": queue_docs,
        "hours": {
            h: {"time_zone": draw(st.sampled_from(ZONES)), "weekly": draw(st.sampled_from(WEEKS))}
            for h in schedules
        },
    }
    if defaults:
        flow["defaults"] = defaults
    if global_routes:
        flow["routes"] = global_routes
    return flow


def load(doc: dict[str, Any]) -> CallFlow:
    return parse_callflow(yaml.safe_dump(doc, sort_keys=False), LABEL)


# --- reaching every node ------------------------------------------------------------------


class ScriptedClock:
    """What the opening hours read: each check in a turn is answered from ``answers``
    (True: open), open when they run out; ``calls`` counts the checks."""

    def __init__(self) -> None:
        self.answers: tuple[bool, ...] = ()
        self.calls = 0

    def __call__(self) -> dt.datetime:
        i, self.calls = self.calls, self.calls + 1
        return OPEN_AT if i >= len(self.answers) or self.answers[i] else CLOSED_AT


def turns(runner: TurnRunner, clock: ScriptedClock, call: Call, event: Event) -> Iterator[Turn]:
    """The turns ``event`` can make of ``call``: one for every way its hours checks can go."""
    todo: list[tuple[bool, ...]] = [()]
    while todo:
        answers = todo.pop()
        clock.answers, clock.calls = answers, 0
        yield runner.run(call, event, now=NOW, caller=CALLER)
        for i in range(len(answers), clock.calls):  # checks past the script: try them closed
            todo.append(answers + (True,) * (i - len(answers)) + (False,))


def events(flow: CallFlow, call: Call) -> list[Event]:
    """What to try next on ``call``: the timer, and the input its node takes."""
    tried: list[Event] = [TIMER] if call.deadline_ms > 0 else []
    if call.state == State.TRANSFERRING:
        return [*tried, HandoffStatus("failed", "busy")]
    if call.state not in (State.BOT, State.FAILED):
        return tried
    node = flow.nodes.get(call.node)
    routes = list(flow.routes) if not isinstance(node, Menu) or node.global_routes else []
    if isinstance(node, Menu):
        routes = [*node.routes, *routes]
    phrases = [CallerInput(p) for route in routes for p in route.phrases]
    if isinstance(node, Menu):
        keys = [CallerInput(route.key, keypad=True) for route in routes if route.key is not None]
        return [*tried, *keys, *phrases, CallerInput(NONSENSE)]
    if isinstance(node, Gather):
        if call.confirming:
            return [*tried, CallerInput("1", keypad=True), CallerInput("2", keypad=True)]
        return [*tried, *phrases, CallerInput("1" * node.min_digits), CallerInput(NONSENSE)]
    return tried


def where(call: Call) -> tuple[object, ...]:
    return (
        call.node,
        call.state,
        call.queue,
        call.attempts,
        min(call.tries, COUNTER_CAP + 1),
        min(call.silences, COUNTER_CAP + 1),
        call.entry,
        call.confirming,
        call.deadline_ms > 0,
    )


def reached_nodes(flow: CallFlow) -> set[str]:
    """Every node some sequence of caller input, timers and transfer failures takes a call
    to: arrived at (a call's ``node``) or passed through (a ``move`` step's node)."""
    clock = ScriptedClock()
    runner = TurnRunner(flow, clock=clock)
    reached: set[str] = set()
    seen: set[tuple[object, ...]] = set()
    todo: deque[tuple[Call, Event]] = deque([(Call(id="generated"), CallStarted())])
    while todo:
        call, event = todo.popleft()
        for turn in turns(runner, clock, call, event):
            reached.update(step.node for step in turn.steps if step.trigger == MOVE and step.node)
            after = dataclasses.replace(turn.call, version=turn.call.version + 1)
            if turn.timer_seconds > 0:
                after.deadline_ms = 1
            if after.node:
                reached.add(after.node)
            key = where(after)
            if key in seen or after.tries > COUNTER_CAP or after.silences > COUNTER_CAP:
                continue
            seen.add(key)
            todo.extend((after, next_event) for next_event in events(flow, after))
    return reached


@GENERATED
@given(valid_flows())
def test_a_valid_flow_loads_and_every_node_can_be_reached(doc: dict[str, Any]) -> None:
    flow = load(doc)
    assert set(flow.nodes) == set(doc["nodes"])
    assert set(flow.reachable()) == set(flow.nodes)
    missing = set(flow.nodes) - reached_nodes(flow)
    assert not missing, f"never reached: {sorted(missing)}\n{yaml.safe_dump(doc, sort_keys=False)}"


def test_the_simulation_reaches_every_node_of_the_shipped_flows() -> None:
    for flow in (load_callflow(), load_callflow(SAMPLE_FLOW)):
        assert reached_nodes(flow) == set(flow.nodes)


# --- one mutation, one refusal --------------------------------------------------------------


def _references(doc: dict[str, Any]) -> list[tuple[list[Any], str, str]]:
    """(path in the document, field the message names, kind) of every reference a dangling
    value could replace. Not a menu route's ``to``: see test_callflow's xfail."""
    found: list[tuple[list[Any], str, str]] = [(["start"], "start", "node")]
    for i, route in enumerate(doc.get("routes", [])):
        if "to" in route:
            found.append((["routes", i, "to"], f"routes.{i}.to", "node"))
    for name, node in doc["nodes"].items():
        at = ["nodes", name]
        for field in ("next", "on_fail", "open", "closed"):
            if field in node:
                found.append(([*at, field], f"nodes.{name}.{field}", "node"))
        for field, kind in (("queue", "queue"), ("hours", "hours"), ("confirm", "prompt")):
            if field in node:
                found.append(([*at, field], f"nodes.{name}.{field}", kind))
        for field in ("say", "invalid"):
            if isinstance(node.get(field), list) and node[field]:
                found.append(([*at, field, len(node[field]) - 1], f"nodes.{name}.{field}", "prompt"))
            elif isinstance(node.get(field), str):
                found.append(([*at, field], f"nodes.{name}.{field}", "prompt"))
        for field in ("no_input", "no_match"):
            if isinstance(node.get(field), dict) and "then" in node[field]:
                found.append(([*at, field, "then"], f"nodes.{name}.{field}.then", "node"))
    for name, queue in doc["queues"].items():
        at = ["queues", name]
        for field in ("closed", "on_failure", "after_final"):
            if field in queue:
                found.append(([*at, field], f"queues.{name}.{field}", "node"))
        if "hours" in queue:
            found.append(([*at, "hours"], f"queues.{name}.hours", "hours"))
        found.append(([*at, "retry", len(queue["retry"]) - 1], f"queues.{name}.retry", "prompt"))
    for field, retry in doc.get("defaults", {}).items():
        if isinstance(retry, dict) and "then" in retry:
            found.append((["defaults", field, "then"], f"defaults.{field}.then", "node"))
    return found


def _put(doc: Any, path: list[Any], value: Any) -> None:
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


def _route_lists(doc: dict[str, Any]) -> list[tuple[list[dict[str, Any]], str]]:
    lists = [
        (node["routes"], f"nodes.{name}.routes") for name, node in doc["nodes"].items() if node.get("routes")
    ]
    if doc.get("routes"):
        lists.append((doc["routes"], "routes"))
    return lists


@st.composite
def broken_flows(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid flow with one mutation: (document, the field the message must name, words
    of the problem)."""
    doc = copy.deepcopy(draw(valid_flows()))
    start = doc["start"]
    route_lists = _route_lists(doc)
    passing = [
        (name, field)
        for name, node in doc["nodes"].items()
        if node["type"] in PASSING
        for field in SLOT_FIELDS[node["type"]]
    ]
    kinds = ["dangling", "orphan", "loop"]
    if any(route.get("key") for routes, _ in route_lists for route in routes):
        kinds.append("key twice")
    if any(route.get("phrases") for routes, _ in route_lists for route in routes):
        kinds.append("phrase twice")
    kind = draw(st.sampled_from(kinds))

    if kind == "dangling":
        path, field, what = draw(st.sampled_from(_references(doc)))
        missing = {"node": "nowhere", "prompt": "unsaid", "queue": "nobody", "hours": "never"}[what]
        _put(doc, path, missing)
        return doc, field, f"no {what} named {missing!r}"
    if kind == "orphan":
        orphan = draw(
            st.sampled_from(
                [
                    {"type": "hang_up"},
                    {"type": "say", "next": start},
                    {"type": "menu", "routes": [{"key": "1", "to": start}]},
                    {"type": "transfer", "queue": next(iter(doc["queues"]))},
                ]
            )
        )
        doc["nodes"]["orphan"] = orphan
        return doc, "nodes.orphan", "unreachable: no route, next or other node leads to it"
    if kind == "loop":
        if passing:  # through a say or hours node already in the flow
            name, field = draw(st.sampled_from(passing))
            doc["nodes"][name][field] = "loop_a"
            doc["nodes"]["loop_a"] = {"type": "say", "next": "loop_b"}
            doc["nodes"]["loop_b"] = {"type": "say", "next": name}
            return doc, "nodes.loop_a", f"a loop with no input: loop_a -> loop_b -> {name} -> loop_a"
        doc["nodes"]["loop_a"] = {"type": "say", "next": "loop_b"}
        doc["nodes"]["loop_b"] = {"type": "say", "next": "loop_c"}
        doc["nodes"]["loop_c"] = {"type": "say", "next": "loop_a"}
        return doc, "nodes.loop_a", "a loop with no input: loop_a -> loop_b -> loop_c -> loop_a"
    # one input twice in one list of routes
    field = "key" if kind == "key twice" else "phrases"
    choices = [
        (routes, at, i) for routes, at in route_lists for i, route in enumerate(routes) if route.get(field)
    ]
    routes, at, i = draw(st.sampled_from(choices))
    if field == "key":
        again: dict[str, Any] = {"key": routes[i]["key"], "to": start}
        said = repr(routes[i]["key"])
    else:
        phrase = draw(st.sampled_from(routes[i]["phrases"]))
        again = {"phrases": [f" {phrase.upper()}?"], "to": start}
        said = repr(f" {phrase.upper()}?")
    routes.append(again)
    return doc, f"{at}.{len(routes) - 1}.{field}", f"{said} is already used by {at}.{i}"


@GENERATED
@given(broken_flows())
def test_one_mutation_is_refused_naming_the_field(case: tuple[dict[str, Any], str, str]) -> None:
    doc, field, problem = case
    raw = yaml.safe_dump(doc, sort_keys=False)
    try:
        parse_callflow(raw, LABEL)
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError(f"accepted a flow that should be refused at {field}:\n{raw}")
    assert "\n" not in message
    assert message.startswith(f"{LABEL}: {field}: "), (message, field)
    assert problem in message, (message, problem)
