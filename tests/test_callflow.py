"""The call flow file (nodes): loading the shipped flows, route matching, prompt rendering,
and validation whose every refusal is one line naming the file, the node and the field."""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.callflow import (
    BARGE_IN_HINTS,
    DEFAULT_CALLFLOW,
    SAMPLE_CALLFLOW,
    CallFlow,
    CheckHours,
    Gather,
    HangUp,
    Menu,
    Privacy,
    Queue,
    Say,
    TransferTo,
    load_callflow,
    normalize_input,
    parse_callflow,
    shipped_flow,
)
from orchestrator.errors import ConfigError
from tests.conftest import SAMPLE_FLOW

LABEL = "flow.yaml"
DEFAULT_TEXT = shipped_flow(DEFAULT_CALLFLOW).read_text(encoding="utf-8")
SAMPLE_TEXT = shipped_flow(SAMPLE_CALLFLOW).read_text(encoding="utf-8")
SSML = "{http://www.w3.org/2001/10/synthesis}"
# Node types, as pydantic puts the discriminator's tag into an error's location
# ("nodes.main.menu.routes.0"): a message may name the field with or without it.
NODE_TYPES = ("menu", "say", "gather", "transfer", "hang_up", "hours", "action")


def default_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DEFAULT_TEXT)
    assert isinstance(doc, dict)
    return copy.deepcopy(doc)


def sample_doc() -> dict[str, Any]:
    doc = yaml.safe_load(SAMPLE_TEXT)
    assert isinstance(doc, dict)
    return doc


def rich_doc() -> dict[str, Any]:
    """The default flow with the node kinds it lacks: an hours check after the notice, and
    an action when closed."""
    doc = default_doc()
    doc["nodes"]["notice"]["next"] = "check"
    doc["nodes"]["check"] = {"type": "hours", "hours": "office", "open": "main", "closed": "lookup"}
    doc["nodes"]["lookup"] = {
        "type": "action",
        "action": "crm.tickets:after_hours",
        "next": "closed",
        "on_error": "goodbye",
        "may_go": ["main", "agent"],
        "sets": ["ticket"],
    }
    return doc


def parse_doc(doc: Any, label: str = LABEL) -> CallFlow:
    return parse_callflow(yaml.safe_dump(doc), label)


def config_error(raw: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_callflow(raw, LABEL)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(LABEL)
    return info.value


def doc_error(doc: Any) -> str:
    return str(config_error(yaml.safe_dump(doc)))


def places(where: str) -> list[str]:
    """The spellings a message may name ``where`` by: ``nodes.main.<menu>.routes.0`` is
    ``nodes.main.routes.0``, or with the node's type as pydantic reports it."""
    match = re.fullmatch(r"(nodes\.[\w-]+)\.<(\w+)>(.*)", where)
    if match is None:
        return [where]
    node, tag, rest = match.groups()
    assert tag in NODE_TYPES
    return [f"{node}{rest}", f"{node}.{tag}{rest}"]


def assert_names(message: str, where: str) -> None:
    """The message is ``flow.yaml: <where>: <problem>``."""
    assert any(message.startswith(f"{LABEL}: {place}: ") for place in places(where)), (
        f"{message!r} does not name {where}"
    )


@pytest.fixture(scope="module")
def flow() -> CallFlow:
    return load_callflow()


@pytest.fixture(scope="module")
def sample() -> CallFlow:
    return load_callflow(SAMPLE_FLOW)


# --- loading ---------------------------------------------------------------------------


def test_default_flow_loads(flow: CallFlow) -> None:
    assert flow.start == "notice"
    assert flow.voice == "en-US-JennyNeural" and flow.locale == "en-US"
    kinds = {name: type(node) for name, node in flow.nodes.items()}
    assert kinds["notice"] is Say and kinds["main"] is Menu and kinds["account"] is Gather
    assert kinds["billing_queue"] is TransferTo and kinds["goodbye"] is HangUp
    assert set(flow.queues) == {"billing", "support", "reception"}
    assert flow.queues["support"].targets == ["+14255550102", "+14255550103"]
    assert flow.queues["reception"].timeout_seconds == 45
    assert flow.queues["billing"].hours == "office" and flow.queues["billing"].closed == "closed"
    assert set(flow.hours) == {"office"}
    assert flow.defaults.no_input is not None and flow.defaults.no_input.then == "goodbye"
    assert flow.defaults.no_match.max == 2 and flow.defaults.no_match.then == "agent"
    assert [route.key for route in flow.routes] == ["0", "*", "9", None]
    assert set(flow.reachable()) == set(flow.nodes)
    assert flow.collects_variables  # the account gather


def test_sample_flow_loads(sample: CallFlow) -> None:
    assert sample.start == "main"
    assert set(sample.nodes) == {"main", "billing", "agent"}
    queue = sample.queues["agents"]
    assert queue.targets == ["+14251231234"]
    assert queue.max_attempts == 3 and queue.timeout_seconds == 60
    assert queue.announce == () and queue.retry == ("transfer_retry",)
    assert sample.defaults.no_input is None
    assert sample.defaults.no_match.say == ("echo",) and sample.defaults.no_match.repeat is False
    assert set(sample.prompts) == {
        "welcome",
        "billing",
        "echo",
        "transfer_retry",
        "transfer_final",
        "handback",
    }
    assert len(sample.routes) == 2
    assert not sample.collects_variables
    assert set(sample.reachable()) == set(sample.nodes)


def test_load_callflow_without_a_path_is_the_default(flow: CallFlow) -> None:
    assert load_callflow(shipped_flow(DEFAULT_CALLFLOW)) == flow


@pytest.mark.parametrize("text", [DEFAULT_TEXT, SAMPLE_TEXT], ids=["default", "sample"])
def test_yaml_round_trip_parses_the_same(text: str) -> None:
    assert parse_doc(yaml.safe_load(text)) == parse_callflow(text, LABEL)


def test_the_rich_test_flow_loads() -> None:
    rich = parse_doc(rich_doc())
    assert isinstance(rich.nodes["check"], CheckHours)
    assert set(rich.reachable()) == set(rich.nodes)


def test_load_callflow_from_path(tmp_path: Path) -> None:
    doc = default_doc()
    doc["voice"] = "en-GB-RyanNeural"
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert load_callflow(path).voice == "en-GB-RyanNeural"


def test_load_callflow_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "flow.yaml"
    with pytest.raises(ConfigError) as info:
        load_callflow(path)
    assert info.value.where == str(path)
    assert "\n" not in str(info.value)


def test_load_callflow_errors_are_labelled_with_the_path(tmp_path: Path) -> None:
    doc = default_doc()
    doc["queues"]["billing"]["targets"] = ["+1 425-555-0101"]
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_callflow(path)
    assert str(info.value).startswith(f"{path}: queues.billing.targets.0: ")


def test_target_for_wraps_around(flow: CallFlow) -> None:
    support = flow.queues["support"]
    assert [support.target_for(a) for a in range(1, 6)] == [
        "+14255550102",
        "+14255550103",
        "+14255550102",
        "+14255550103",
        "+14255550102",
    ]
    queue = Queue.model_validate({"targets": ["+14251231234"], "retry": "r", "final": "f", "handback": "h"})
    assert {queue.target_for(a) for a in range(1, 5)} == {"+14251231234"}


# --- route matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("said", "normal"),
    [
        ("  Talk to Agent. ", "talk to agent"),
        ("AGENT!", "agent"),
        ("talk   to\tagent", "talk to agent"),
        ("Agent?!", "agent"),
        ("agent !", "agent"),
        ("0.", "0"),
        ("!!!", ""),
        ("   ", ""),
        ("¿agent", "¿agent"),  # only trailing punctuation goes
    ],
)
def test_normalize_input(said: str, normal: str) -> None:
    assert normalize_input(said) == normal


@pytest.mark.parametrize(
    "said", ["  Talk to Agent. ", "AGENT!", "representative", "0", "talk   to\tagent", "Agent?!", "0."]
)
@pytest.mark.parametrize("node", ["main", "billing"])
def test_sample_agent_inputs_at_every_menu(sample: CallFlow, node: str, said: str) -> None:
    route = sample.route_for(node, said, keypad=False)
    assert route is not None and route.to == "agent"


@pytest.mark.parametrize("said", ["1", "One", " ONE. ", "one!"])
def test_sample_billing_inputs(sample: CallFlow, said: str) -> None:
    route = sample.route_for("main", said, keypad=False)
    assert route is not None and route.to == "billing"


@pytest.mark.parametrize("said", ["x", "", "   ", "!!!", "2", "agents", "talk to", "one two"])
def test_sample_unmatched_inputs(sample: CallFlow, said: str) -> None:
    assert sample.route_for("main", said, keypad=False) is None


@pytest.mark.parametrize(
    ("node", "text", "keypad", "to"),
    [
        ("main", "1", True, "billing"),
        ("main", " 2 ", True, "support"),  # the channel's key, trimmed
        ("main", "Technical Support.", False, "support"),
        ("billing", "1", True, "account"),  # the node's own "1", not main's
        ("billing", "current customer", False, "account"),
        ("billing", "9", True, "main"),  # global routes at every menu
        ("billing", "Main menu!", False, "main"),
        ("main", "Bye.", False, "goodbye"),
        ("account", "agent", False, "agent"),  # a gather still takes spoken global routes
        ("billing_retry", "1", True, "billing_queue"),
        ("agent_retry", "try again", False, "agent"),
    ],
)
def test_default_routes(flow: CallFlow, node: str, text: str, keypad: bool, to: str) -> None:
    route = flow.route_for(node, text, keypad=keypad)
    assert route is not None and route.to == to


@pytest.mark.parametrize(
    ("node", "text", "keypad"),
    [
        ("main", "billing", True),  # a key press matches keys only ...
        ("main", "goodbye", True),
        ("main", "#", True),
        ("billing", "2 ", False),  # ... and speech phrases only: "2" is billing's key, not a phrase
        ("main", "3", True),
        ("main", "press one", False),
    ],
)
def test_default_unmatched(flow: CallFlow, node: str, text: str, keypad: bool) -> None:
    assert flow.route_for(node, text, keypad=keypad) is None


def test_a_repeat_route(flow: CallFlow) -> None:
    route = flow.route_for("billing", "*", keypad=True)
    assert route is not None and route.repeat and route.to is None
    assert flow.route_for("main", "Say that again?", keypad=False) is route


def test_a_nodes_own_routes_win_over_global_ones() -> None:
    doc = default_doc()
    doc["nodes"]["main"]["routes"].append({"key": "0", "phrases": ["Agent."], "to": "support"})
    own = parse_doc(doc)
    for text, keypad in (("0", True), ("AGENT", False)):
        at_main = own.route_for("main", text, keypad=keypad)
        at_billing = own.route_for("billing", text, keypad=keypad)
        assert at_main is not None and at_main.to == "support"
        assert at_billing is not None and at_billing.to == "agent"
    operator = own.route_for("main", "operator", keypad=False)  # globals main does not override
    assert operator is not None and operator.to == "agent"


def test_global_routes_false_turns_them_off_at_that_menu() -> None:
    doc = default_doc()
    doc["nodes"]["billing"]["global_routes"] = False
    off = parse_doc(doc)
    assert off.route_for("billing", "0", keypad=True) is None
    assert off.route_for("billing", "agent", keypad=False) is None
    route = off.route_for("billing", "1", keypad=True)  # its own routes still work
    assert route is not None and route.to == "account"
    at_main = off.route_for("main", "0", keypad=True)
    assert at_main is not None and at_main.to == "agent"


def test_route_phrases_in_the_file_are_normalised_too() -> None:
    doc = default_doc()
    doc["nodes"]["main"]["routes"][0]["phrases"] = ["  Billing   Please. "]
    route = parse_doc(doc).route_for("main", "billing please", keypad=False)
    assert route is not None and route.to == "billing"


def test_route_keys_written_as_numbers() -> None:
    raw = DEFAULT_TEXT.replace('{key: "1", phrases: [billing, one]', "{key: 1, phrases: [billing, one]")
    assert raw != DEFAULT_TEXT
    route = parse_callflow(raw, LABEL).route_for("main", "1", keypad=True)
    assert route is not None and route.to == "billing"


# --- prompts ---------------------------------------------------------------------------


def ssml_text(ssml: str) -> tuple[str, str, str]:
    """(locale, voice, text) of a rendered prompt, parsed as XML."""
    root = ET.fromstring(ssml)
    voice = root.find(f"{SSML}voice")
    assert root.tag == f"{SSML}speak" and voice is not None
    return root.attrib["{http://www.w3.org/XML/1998/namespace}lang"], voice.attrib["name"], voice.text or ""


def test_a_fixed_prompt_is_rendered_once(flow: CallFlow) -> None:
    spoken = flow.render("goodbye")
    assert flow.is_fixed("goodbye")
    assert spoken.text == "Thank you for calling Contoso. Goodbye."
    assert spoken.transcript_text == spoken.text and spoken.shown == ""
    assert ssml_text(spoken.ssml) == ("en-US", "en-US-JennyNeural", f" {spoken.text} ")
    assert flow.render("goodbye", {"input": "ignored"}) is spoken
    assert spoken.seconds == pytest.approx(len(spoken.text) / 14.0)


def test_the_speaking_rate_times_every_prompt(flow: CallFlow) -> None:
    """A flow's voices may speak slower or faster: no-input counts from the estimated end."""
    slower = flow.model_copy(update={"speaking_rate": 7.0})
    fixed, filled = slower.render("goodbye"), slower.render("confirm_account", {"account": "123456"})
    assert fixed.seconds == pytest.approx(2 * flow.render("goodbye").seconds)
    assert filled.seconds == pytest.approx(len(filled.text) / 7.0) and "1 2 3 4 5 6" in filled.text
    assert "speaking_rate" in doc_error({**default_doc(), "speaking_rate": 0})


def test_a_prompt_in_its_own_voice(flow: CallFlow) -> None:
    assert ssml_text(flow.render("billing").ssml)[1] == "en-US-JessaNeural"


@pytest.mark.parametrize(
    ("barge_in", "hint"),
    [
        ("any", "acceptingInput"),
        ("keys", "ignoringSpeechInput"),
        ("speech", "ignoringNonSpeechInput"),
        ("none", "ignoringInput"),
    ],
)
def test_barge_in_sets_the_input_hint(barge_in: str, hint: str) -> None:
    doc = sample_doc()
    doc["prompts"]["welcome"]["barge_in"] = barge_in
    doc["prompts"]["echo"]["barge_in"] = barge_in
    flow = parse_doc(doc)
    assert BARGE_IN_HINTS[barge_in] == hint
    assert flow.render("welcome").hint == hint
    assert flow.render("echo", {"input": "hi"}).hint == hint  # with placeholders too


def test_the_shipped_hints(flow: CallFlow) -> None:
    assert flow.render("notice").hint == "ignoringInput"
    assert flow.render("ask_account").hint == "ignoringSpeechInput"
    assert flow.render("confirm_account", {"account": "123456"}).hint == "ignoringSpeechInput"
    assert flow.render("welcome").hint == "acceptingInput"


def test_input_is_escaped_into_ssml(sample: CallFlow) -> None:
    said = '<b>Tom & "Jerry\'s"</b>\x07'
    spoken = sample.render("echo", {"input": said})
    assert not sample.is_fixed("echo")
    assert spoken.text == 'What I heard was "<b>Tom & "Jerry\'s"</b>"'  # the control character goes
    assert "&lt;b&gt;Tom &amp; &quot;Jerry&apos;s&quot;&lt;/b&gt;" in spoken.ssml
    assert ssml_text(spoken.ssml) == ("en-US", "en-US-GuyNeural", f" {spoken.text} ")
    assert spoken.shown == ""  # nothing masked: the transcript keeps the text
    assert spoken.transcript_text == spoken.text


def test_a_missing_value_renders_empty(sample: CallFlow) -> None:
    assert sample.render("echo").text == 'What I heard was ""'


def test_variables_digits_and_the_masked_copy(flow: CallFlow) -> None:
    spoken = flow.render("confirm_account", {"account": "12345678"}, {"account": "****5678"})
    assert spoken.text.startswith("You entered 1 2 3 4 5 6 7 8. If that is right")
    assert ssml_text(spoken.ssml)[2] == f" {spoken.text} "
    assert spoken.shown.startswith("You entered * * * * 5 6 7 8. If that is right")
    assert spoken.transcript_text == spoken.shown
    assert "1 2 3 4" not in spoken.shown


def test_caller_and_variables_with_xml_in_the_prompt_itself() -> None:
    doc = sample_doc()
    doc["prompts"]["echo"]["text"] = "Tom & Jerry's <line>: {caller}, order {order}, {order:digits}"
    doc["nodes"]["main"] = {
        "type": "gather",
        "say": "welcome",
        "into": "order",
        "next": "billing",
        "on_fail": "agent",
    }
    flow = parse_doc(doc)
    spoken = flow.render("echo", {"caller": "0123", "order": "42<"}, {"order": "**"})
    assert spoken.text == "Tom & Jerry's <line>: 0123, order 42<, 4 2 <"
    assert "Tom &amp; Jerry&apos;s &lt;line&gt;: 0123, order 42&lt;, 4 2 &lt;" in spoken.ssml
    assert ssml_text(spoken.ssml)[2] == f" {spoken.text} "
    assert spoken.shown == "Tom & Jerry's <line>: 0123, order **, * *"


# --- privacy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "value", "shown"),
    [
        (4, "4111111111111111", "************1111"),
        (4, "123456789012", "********9012"),
        (4, "123456", "****56"),  # never more than a third of it
        (4, "123", "**3"),
        (4, "12", "**"),
        (4, "", ""),
        (2, "123456789012", "**********12"),
        (0, "123456789012", "************"),
    ],
)
def test_mask_value(keep: int, value: str, shown: str) -> None:
    assert Privacy(keep_last_digits=keep).mask_value(value) == shown


@pytest.mark.parametrize("length", range(0, 25))
def test_mask_value_shows_at_most_a_third(length: int) -> None:
    value = "".join(str(i % 10) for i in range(length))
    shown = Privacy().mask_value(value)
    visible = len(shown.lstrip("*"))
    assert len(shown) == length
    assert visible <= min(4, length // 3)
    assert value.endswith(shown[length - visible :])


# --- validation ------------------------------------------------------------------------


Mutation = Callable[[dict[str, Any]], None]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        parent = _walk(doc, parents)
        if isinstance(parent, list):
            parent[int(last)] = value
        else:
            parent[last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        parent = _walk(doc, parents)
        del parent[int(last) if isinstance(parent, list) else last]

    return mutate


def _add_nodes(**nodes: dict[str, Any]) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        doc["nodes"].update(copy.deepcopy(nodes))

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(doc)

    return mutate


# id: (mutation of rich_doc(), the field the message names, words of the problem).
# "<menu>" in a path: pydantic may name the node's type there (see places()).
ERROR_CASES: dict[str, tuple[Mutation, str, str]] = {
    # references to what is not there
    "start": (_set("start", "nowhere"), "start", "no node named 'nowhere'"),
    "global-route-to": (_set("routes.2.to", "nowhere"), "routes.2.to", "no node named 'nowhere'"),
    "say-next": (_set("nodes.notice.next", "nowhere"), "nodes.notice.next", "no node named 'nowhere'"),
    "gather-next": (_set("nodes.account.next", "nowhere"), "nodes.account.next", "no node named"),
    "gather-on-fail": (_set("nodes.account.on_fail", "nowhere"), "nodes.account.on_fail", "no node named"),
    "hours-open": (_set("nodes.check.open", "nowhere"), "nodes.check.open", "no node named 'nowhere'"),
    "hours-closed": (_set("nodes.check.closed", "nowhere"), "nodes.check.closed", "no node named"),
    "hours-schedule": (_set("nodes.check.hours", "weekend"), "nodes.check.hours", "no hours named 'weekend'"),
    "action-next": (_set("nodes.lookup.next", "nowhere"), "nodes.lookup.next", "no node named"),
    "action-on-error": (_set("nodes.lookup.on_error", "nowhere"), "nodes.lookup.on_error", "no node named"),
    "action-may-go": (_set("nodes.lookup.may_go.1", "nowhere"), "nodes.lookup.may_go.1", "no node named"),
    "transfer-queue": (_set("nodes.agent.queue", "sales"), "nodes.agent.queue", "no queue named 'sales'"),
    "default-no-input-then": (
        _set("defaults.no_input.then", "nowhere"),
        "defaults.no_input.then",
        "no node named 'nowhere'",
    ),
    "default-no-match-say": (
        _set("defaults.no_match.say", "nope"),
        "defaults.no_match.say",
        "no prompt named 'nope'",
    ),
    "node-no-input-then": (
        _set("nodes.main.no_input", {"max": 1, "then": "nowhere"}),
        "nodes.main.no_input.then",
        "no node named 'nowhere'",
    ),
    "node-no-match-then": (
        _set("nodes.billing.no_match", {"say": "not_understood", "max": 0, "then": "nowhere"}),
        "nodes.billing.no_match.then",
        "no node named",
    ),
    "gather-no-input-then": (
        _set("nodes.account.no_input", {"max": 2, "then": "nowhere"}),
        "nodes.account.no_input.then",
        "no node named",
    ),
    "queue-closed": (_set("queues.billing.closed", "nowhere"), "queues.billing.closed", "no node named"),
    "queue-on-failure": (
        _set("queues.support.on_failure", "nowhere"),
        "queues.support.on_failure",
        "no node named 'nowhere'",
    ),
    "queue-after-final": (
        _set("queues.reception.after_final", "nowhere"),
        "queues.reception.after_final",
        "no node named",
    ),
    "queue-hours": (_set("queues.billing.hours", "weekend"), "queues.billing.hours", "no hours named"),
    "say-prompt": (_set("nodes.main.say", "nope"), "nodes.main.say", "no prompt named 'nope'"),
    "say-list-prompt": (_set("nodes.main.say", ["welcome", "nope"]), "nodes.main.say", "no prompt named"),
    "hang-up-say": (_set("nodes.goodbye.say", ["nope"]), "nodes.goodbye.say", "no prompt named 'nope'"),
    "queue-retry-list": (
        _set("queues.billing.retry", ["transfer_retry", "nope"]),
        "queues.billing.retry",
        "no prompt named 'nope'",
    ),
    "queue-announce": (_set("queues.support.announce", "nope"), "queues.support.announce", "no prompt named"),
    "queue-final": (_set("queues.support.final", ["nope"]), "queues.support.final", "no prompt named"),
    "queue-handback": (_set("queues.reception.handback", "nope"), "queues.reception.handback", "no prompt"),
    "gather-confirm": (_set("nodes.account.confirm", "nope"), "nodes.account.confirm", "no prompt named"),
    "gather-invalid": (
        _set("nodes.account.invalid", ["bad_account", "nope"]),
        "nodes.account.invalid",
        "no prompt named 'nope'",
    ),
    # what no call can reach
    "orphan": (_add_nodes(orphan={"type": "hang_up"}), "nodes.orphan", "unreachable"),
    "route-removed": (_drop("nodes.main.routes.1"), "nodes.support", "unreachable"),
    # one input, two routes
    "key-twice": (
        _set("nodes.billing.routes.1.key", "1"),
        "nodes.billing.routes.1.key",
        "'1' is already used",
    ),
    "key-twice-as-a-number": (
        _set("nodes.billing.routes.1.key", 1),
        "nodes.billing.routes.1.key",
        "'1' is already used by nodes.billing.routes.0",
    ),
    "global-key-twice": (_set("routes.3.key", "0"), "routes.3.key", "'0' is already used by routes.0"),
    "phrase-twice": (
        _set("nodes.billing.routes.1.phrases", ["new", " Current   CUSTOMER."]),
        "nodes.billing.routes.1.phrases",
        "' Current   CUSTOMER.' is already used by nodes.billing.routes.0",
    ),
    "global-phrase-twice": (
        _set("routes.3.phrases", ["goodbye", "Agent!"]),
        "routes.3.phrases",
        "is already used by routes.0",
    ),
    # loops with no input
    "say-loop": (
        _all(
            _set("nodes.notice.next", "a"),
            _add_nodes(
                a={"type": "say", "next": "b"},
                b={"type": "say", "say": "support", "next": "c"},
                c={"type": "say", "next": "a"},
            ),
        ),
        "nodes.a",
        "a loop with no input: a -> b -> c -> a",
    ),
    "hours-loop": (
        _set("nodes.check.closed", "notice"),
        "nodes.check",
        "a loop with no input: check -> notice -> check",
    ),
    "action-loop": (
        _set("nodes.lookup.may_go", ["main", "check"]),
        "nodes.check",
        "a loop with no input: check -> lookup -> check",
    ),
    # numbers and hours
    "target-with-spaces": (
        _set("queues.billing.targets", ["+1 425-555-0101"]),
        "queues.billing.targets.0",
        "E.164",
    ),
    "target-without-plus": (
        _set("queues.billing.targets", ["14255550101"]),
        "queues.billing.targets.0",
        "E.164",
    ),
    "second-target-bad": (
        _set("queues.support.targets", ["+14255550102", "+1-425"]),
        "queues.support.targets.1",
        "E.164",
    ),
    "target-too-short": (_set("queues.support.targets", ["+1425"]), "queues.support.targets.0", "possible"),
    "target-unknown-country": (_set("queues.support.targets", ["+999999"]), "queues.support.targets.0", ""),
    "empty-targets": (_set("queues.billing.targets", []), "queues.billing.targets", "at least 1"),
    "max-attempts-zero": (
        _set("queues.billing.max_attempts", 0),
        "queues.billing.max_attempts",
        "greater than",
    ),
    "sub-second-timeout": (
        _set("queues.reception.timeout_seconds", 0),
        "queues.reception.timeout_seconds",
        "greater than 0",
    ),
    "bad-zone": (
        _set("hours.office.time_zone", "America/New_Yrok"),
        "hours.office.time_zone",
        "did you mean 'America/New_York'",
    ),
    "bad-time-range": (
        _set("hours.office.weekly", {"mon-fri": ["08:00-25:00"]}),
        "hours.office",
        "weekly.mon-fri: '08:00-25:00' is not HH:MM-HH:MM",
    ),
    "range-not-a-range": (
        _set("hours.office.weekly", {"mon-fri": ["8 to 6"]}),
        "hours.office",
        "weekly.mon-fri: '8 to 6' is not HH:MM-HH:MM",
    ),
    "bad-day": (
        _set("hours.office.weekly", {"mon-fry": ["08:00-18:00"]}),
        "hours.office",
        "weekly.mon-fry: 'mon-fry' is not a day",
    ),
    "hours-without-closed": (
        _drop("queues.billing.closed"),
        "queues.billing",
        "'hours' and 'closed' go together",
    ),
    "closed-without-hours": (
        _drop("queues.support.hours"),
        "queues.support",
        "'hours' and 'closed' go together",
    ),
    # routes, gathers, retries
    "route-neither-key-nor-phrases": (
        _set("nodes.main.routes.0", {"to": "billing"}),
        "nodes.main.<menu>.routes.0",
        "a route needs a 'key' to press, 'phrases' to say, or both",
    ),
    "global-route-neither": (_set("routes.3", {"to": "goodbye"}), "routes.3", "a route needs a 'key'"),
    "route-to-and-repeat": (
        _set("nodes.main.routes.0", {"key": "1", "to": "billing", "repeat": True}),
        "nodes.main.<menu>.routes.0",
        "exactly one of 'to: <node>' or 'repeat: true'",
    ),
    "route-going-nowhere": (
        _set("routes.0", {"key": "0", "phrases": ["agent"]}),
        "routes.0",
        "exactly one of 'to: <node>' or 'repeat: true'",
    ),
    "route-bad-key": (_set("nodes.main.routes.0.key", "12"), "nodes.main.<menu>.routes.0.key", "keypad key"),
    "route-punctuation-phrase": (
        _set("nodes.main.routes.0.phrases", ["?"]),
        "nodes.main.<menu>.routes.0",
        "phrases: '?' is only spaces and punctuation",
    ),
    "min-over-max": (
        _set("nodes.account.min_digits", 12),
        "nodes.account.<gather>",
        "min_digits 12 is more than max_digits 10",
    ),
    "gather-bad-pattern": (
        _set("nodes.account.pattern", "[0-9"),
        "nodes.account.<gather>.pattern",
        "not a regular expression",
    ),
    "gather-bad-into": (_set("nodes.account.into", "Account"), "nodes.account.<gather>.into", "pattern"),
    "max-without-then": (_set("defaults.no_match", {"max": 2}), "defaults.no_match", "'max' and 'then' go"),
    "say-without-next": (_drop("nodes.notice.next"), "nodes.notice.<say>.next", "Field required"),
    # prompts
    "unknown-variable": (
        _set("prompts.goodbye.text", "Goodbye {name}."),
        "prompts.goodbye.text",
        "{name} is no variable of this flow",
    ),
    "empty-prompt-text": (_set("prompts.billing.text", ""), "prompts.billing.text", "at least 1"),
    "bad-voice": (_set("voice", "en US <Jenny>"), "voice", "pattern"),
    "bad-barge-in": (_set("prompts.notice.barge_in", "never"), "prompts.notice.barge_in", "'any'"),
    # shape
    "unknown-type": (_set("nodes.main.type", "menuu"), "nodes.main", "'menuu'"),
    "no-type": (_drop("nodes.main.type"), "nodes.main", "'type'"),
    "unknown-top-level-field": (_set("nods", {}), "nods", "unknown field"),
    "unknown-node-field": (_set("nodes.main.routs", []), "nodes.main.<menu>.routs", "unknown field"),
    "field-of-another-type": (
        _set("nodes.notice.queue", "billing"),
        "nodes.notice.<say>.queue",
        "unknown field",
    ),
    "unknown-route-field": (
        _set("nodes.main.routes.0.too", "x"),
        "nodes.main.<menu>.routes.0.too",
        "unknown field",
    ),
    "unknown-queue-field": (
        _set("queues.billing.timout_seconds", 5),
        "queues.billing.timout_seconds",
        "unknown",
    ),
    "unknown-prompt-field": (_set("prompts.notice.vioce", "x"), "prompts.notice.vioce", "unknown field"),
    "unknown-hours-field": (_set("hours.office.timezone", "UTC"), "hours.office.timezone", "unknown field"),
    "required-field-absent": (_drop("queues.billing.retry"), "queues.billing.retry", "Field required"),
    "no-nodes": (_drop("nodes"), "nodes", "Field required"),
}


@pytest.mark.parametrize(("mutate", "where", "problem"), list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_invalid_flow_names_the_field(mutate: Mutation, where: str, problem: str) -> None:
    doc = rich_doc()
    mutate(doc)
    message = doc_error(doc)
    assert_names(message, where)
    assert problem.lower() in message.lower()


def test_the_message_for_a_key_used_twice() -> None:
    doc = default_doc()
    doc["nodes"]["billing"]["routes"][1]["key"] = "1"
    assert (
        doc_error(doc)
        == "flow.yaml: nodes.billing.routes.1.key: '1' is already used by nodes.billing.routes.0"
    )


def test_an_unknown_reference_lists_what_is_known() -> None:
    doc = default_doc()
    doc["nodes"]["agent"]["queue"] = "sales"
    assert doc_error(doc) == (
        "flow.yaml: nodes.agent.queue: no queue named 'sales' (known: billing, reception, support)"
    )


def test_nodes_reached_only_through_global_routes_a_menu_turned_off() -> None:
    doc = sample_doc()
    doc["nodes"]["main"]["global_routes"] = False
    # the first unreachable node in the file (safe_dump sorts them: agent, billing, main)
    assert doc_error(doc) == "flow.yaml: nodes.agent: unreachable: no route, next or other node leads to it"


def test_a_menu_route_to_an_unknown_node() -> None:
    doc = default_doc()
    doc["nodes"]["main"]["routes"][0]["to"] = "nowhere"
    assert_names(doc_error(doc), "nodes.main.routes.0.to")


# Flows no call could run as written: the validation refuses them.
LOOP_THROUGH_A_CLOSED_QUEUE = """
prompts: {p: {text: Hello.}}
start: s
nodes:
  s: {type: say, say: p, next: t}
  t: {type: transfer, queue: q}
queues:
  q: {targets: ["+14255550100"], retry: p, final: p, handback: p, hours: h, closed: s}
hours:
  h: {time_zone: UTC, weekly: {}}
"""
LOOP_THROUGH_AFTER_FINAL = """
prompts: {p: {text: Hello.}}
start: m
nodes:
  m: {type: menu, routes: [{key: "1", to: t}]}
  s: {type: say, say: p, next: t}
  t: {type: transfer, queue: q}
queues:
  q: {targets: ["+14255550100"], max_attempts: 1, retry: p, final: p, handback: p, after_final: s}
"""
THEN_WITHOUT_MAX = """
prompts: {p: {text: Hello.}}
start: m
defaults: {no_match: {say: p, then: x}}
nodes:
  m: {type: menu, say: p}
  x: {type: hang_up}
"""
KEY_ONLY_ROUTE_AT_A_GATHER = """
prompts: {p: {text: Hello.}}
start: g
routes: [{key: "*", to: x}]
nodes:
  g: {type: gather, say: p, into: account, next: h, on_fail: h}
  h: {type: hang_up}
  x: {type: hang_up}
"""


@pytest.mark.parametrize(
    "raw", [LOOP_THROUGH_A_CLOSED_QUEUE, LOOP_THROUGH_AFTER_FINAL], ids=["closed", "after_final"]
)
def test_a_loop_through_a_queue_is_refused(raw: str) -> None:
    assert "loop" in str(config_error(raw))


@pytest.mark.parametrize(
    ("raw", "named"),
    [(THEN_WITHOUT_MAX, "defaults.no_match"), (KEY_ONLY_ROUTE_AT_A_GATHER, "nodes.x")],
    ids=["then", "gather-key"],
)
def test_a_node_only_a_link_never_taken_leads_to_is_refused(raw: str, named: str) -> None:
    """A retry's ``then`` without ``max`` is never taken; keys at a gather are digits."""
    assert named in str(config_error(raw))


@pytest.mark.parametrize("text", [DEFAULT_TEXT, SAMPLE_TEXT], ids=["default", "sample"])
def test_invalid_yaml_names_the_line(text: str) -> None:
    lines = text.splitlines()
    target = next(i for i, line in enumerate(lines) if line.startswith("routes:"))
    lines.insert(target + 1, "  - phrases: [unclosed")
    lines.insert(target + 2, "    to: : main")
    error = config_error("\n".join(lines) + "\n")
    assert re.match(rf"^{re.escape(LABEL)}:\d+: not valid YAML: ", str(error))
    line = int(error.where.split(":")[1])
    assert line in (target + 2, target + 3)  # the inserted lines, 1-based


def test_invalid_yaml_on_line_three() -> None:
    error = config_error("voice: en-US-JennyNeural\nlocale: en-US\nprompts: : broken\n")
    assert str(error).startswith(f"{LABEL}:3: not valid YAML")


def test_yaml_with_a_control_character_is_one_line() -> None:
    config_error("voice: en-US\x07JennyNeural\n")


@pytest.mark.parametrize(
    "raw",
    ["- a\n- b\n", "just a string\n", "", "42\n", "null\n"],
    ids=["list", "string", "empty", "number", "null"],
)
def test_non_mapping_document(raw: str) -> None:
    error = config_error(raw)
    assert error.where == LABEL
    assert "mapping" in str(error)


def test_a_gather_has_no_no_match_so_it_reaches_nothing_by_one() -> None:
    """Entries that do not fit go to on_fail by the gather's attempts: a node only the
    default no_match leads to is unreachable from a flow of gathers."""
    doc = {
        "prompts": {"ask": {"text": "Enter digits."}, "bye": {"text": "Bye."}},
        "start": "entry",
        "defaults": {"no_input": None, "no_match": {"max": 1, "then": "only_by_no_match"}},
        "nodes": {
            "entry": {"type": "gather", "say": "ask", "into": "digits", "next": "done", "on_fail": "done"},
            "done": {"type": "hang_up", "say": "bye"},
            "only_by_no_match": {"type": "hang_up", "say": "bye"},
        },
    }
    assert doc_error(doc) == (
        "flow.yaml: nodes.only_by_no_match: unreachable: no route, next or other node leads to it"
    )


def pooled_doc() -> dict[str, Any]:
    doc = sample_doc()
    doc["pools"] = {
        "front": {"numbers": ["+14255550150", "+14255550151"]},
        "back": {"numbers": ["+14255550160"]},
    }
    doc["queues"]["agents"]["pool"] = "front"
    return doc


def test_a_queue_leases_from_its_pool() -> None:
    flow = parse_doc(pooled_doc())
    assert flow.queues["agents"].pool == "front"
    assert flow.queues["agents"].pool_exhausted.then == "target"  # the default: a cold transfer
    assert flow.pools["front"].grace_seconds == 30
    assert flow.pool_of_number == {"+14255550150": "front", "+14255550151": "front", "+14255550160": "back"}


@pytest.mark.parametrize(
    ("change", "where", "problem"),
    [
        (
            lambda d: d["queues"]["agents"].update(pool="nowhere"),
            "queues.agents.pool",
            "no pool named 'nowhere'",
        ),
        (
            lambda d: d["pools"]["back"].update(numbers=["+14255550151"]),
            "pools.front.numbers.1",
            "also in pool 'back'",
        ),
        (
            lambda d: d["pools"]["front"]["numbers"].append("+14255550150"),
            "pools.front.numbers",
            "listed twice",
        ),
        (lambda d: d["pools"]["front"].update(numbers=["425-555-0150"]), "pools.front.numbers.0", "E.164"),
        (lambda d: d["pools"]["front"].update(numbers=[]), "pools.front.numbers", "at least 1"),
        (
            lambda d: d["queues"]["agents"].update(targets=["+14255550151"]),
            "queues.agents.targets.0",
            "a number of pool 'front'",
        ),
        (
            lambda d: d["pools"]["front"].update(grace_seconds=0),
            "pools.front.grace_seconds",
            "greater than 0",
        ),
        (lambda d: d["pools"].update({"a}b": d["pools"]["front"]}), "pools.a}b.[key]", "pattern"),
        (
            lambda d: d["queues"]["agents"].update(pool_exhausted={"then": "queue"}),
            "queues.agents.pool_exhausted.then",
            "'target', 'hold' or 'fail'",
        ),
        (
            lambda d: d["queues"]["agents"].update(pool_exhausted={"then": "hold", "say": "nothing"}),
            "queues.agents.pool_exhausted.say",
            "no prompt named 'nothing'",
        ),
    ],
    ids=[
        "unknown",
        "two-pools",
        "twice",
        "not-e164",
        "empty",
        "target",
        "no-grace",
        "name",
        "then",
        "prompt",
    ],
)
def test_a_bad_pool_stops_start_up_naming_it(change: Any, where: str, problem: str) -> None:
    doc = pooled_doc()
    change(doc)
    message = doc_error(doc)
    assert_names(message, where)
    assert problem in message
