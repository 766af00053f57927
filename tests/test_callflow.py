"""The call flow file: loading, route matching, and one-line errors that name the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.callflow import DEFAULT_CALLFLOW, CallFlow, Transfer, load_callflow, parse_callflow
from orchestrator.errors import ConfigError
from tests.conftest import SAMPLE_FLOW

LABEL = "flow.yaml"
DEFAULT_TEXT = resources.files("orchestrator").joinpath(DEFAULT_CALLFLOW).read_text(encoding="utf-8")


def default_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DEFAULT_TEXT)
    assert isinstance(doc, dict)
    return copy.deepcopy(doc)


def parse_doc(doc: Any) -> CallFlow:
    return parse_callflow(yaml.safe_dump(doc), LABEL)


def config_error(raw: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_callflow(raw, LABEL)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(LABEL)
    return info.value


@pytest.fixture(scope="module")
def flow() -> CallFlow:
    return load_callflow(SAMPLE_FLOW)


# --- loading ---------------------------------------------------------------------------


def test_default_flow_loads(flow: CallFlow) -> None:
    assert flow.start_prompt == "welcome"
    assert flow.fallback_prompt == "echo"
    assert flow.voice == "en-US-JennyNeural"
    assert flow.locale == "en-US"
    assert flow.transfer.targets == ["+14251231234"]
    assert flow.transfer.max_attempts == 3
    assert flow.transfer.timeout_seconds == 60
    assert flow.transfer.announce_prompt is None
    assert set(flow.prompts) == {"welcome", "billing", "echo", "transfer_retry", "transfer_final", "handback"}
    assert len(flow.routes) == 2


def test_default_yaml_round_trip_parses_the_same(flow: CallFlow) -> None:
    assert parse_doc(default_doc()) == flow


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
    assert str(path) in str(info.value)
    assert info.value.where == str(path)
    assert "\n" not in str(info.value)


def test_load_callflow_errors_are_labelled_with_the_path(tmp_path: Path) -> None:
    doc = default_doc()
    doc["transfer"]["targets"] = ["+1 425-123-1234"]
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_callflow(path)
    assert str(info.value).startswith(f"{path}: transfer.targets.0:")


# --- route matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    "said",
    ["  Talk to Agent. ", "AGENT!", "representative", "0", "talk   to\tagent", "Agent?!", "0."],
)
def test_transfer_inputs(flow: CallFlow, said: str) -> None:
    route = flow.route_for(said)
    assert route is not None
    assert route.transfer is True
    assert route.say is None


@pytest.mark.parametrize("said", ["1", "One", " ONE. ", "one!"])
def test_billing_inputs(flow: CallFlow, said: str) -> None:
    route = flow.route_for(said)
    assert route is not None
    assert route.say == "billing"
    assert route.transfer is False


@pytest.mark.parametrize("said", ["x", "", "   ", "!!!", "2", "agents", "talk to", "one two"])
def test_unmatched_inputs(flow: CallFlow, said: str) -> None:
    assert flow.route_for(said) is None


def test_route_phrases_in_file_are_normalized_too() -> None:
    doc = default_doc()
    doc["routes"][0]["match"] = ["  Billing Please. "]
    route = parse_doc(doc).route_for("billing please")
    assert route is not None and route.say == "billing"


# --- transfer targets ------------------------------------------------------------------


def make_transfer(targets: list[str]) -> Transfer:
    return Transfer.model_validate(
        {"targets": targets, "retry_prompt": "r", "final_prompt": "f", "handback_prompt": "h"}
    )


def test_target_for_wraps_around() -> None:
    transfer = make_transfer(["+14251231234", "+14255550100", "+442079460000"])
    dialed = [transfer.target_for(attempt) for attempt in range(1, 8)]
    assert dialed == [
        "+14251231234",
        "+14255550100",
        "+442079460000",
        "+14251231234",
        "+14255550100",
        "+442079460000",
        "+14251231234",
    ]


def test_target_for_single_target(flow: CallFlow) -> None:
    assert {flow.transfer.target_for(attempt) for attempt in range(1, 5)} == {"+14251231234"}


# --- errors ----------------------------------------------------------------------------


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


ERROR_CASES: dict[str, tuple[Mutation, str, str]] = {
    # id: (mutation, field path the message names, words of the problem)
    "target-with-spaces": (_set("transfer.targets", ["+1 425-123-1234"]), "transfer.targets.0", "E.164"),
    "target-without-plus": (_set("transfer.targets", ["14251231234"]), "transfer.targets.0", "E.164"),
    "target-too-short": (_set("transfer.targets", ["+1425"]), "transfer.targets.0", "possible"),
    "second-target-bad": (
        _set("transfer.targets", ["+14251231234", "+1-425"]),
        "transfer.targets.1",
        "E.164",
    ),
    "say-missing-prompt": (_set("routes.0.say", "nope"), "routes.0.say", "'nope'"),
    "say-and-transfer": (_set("routes.0.transfer", True), "routes.0", "exactly one action"),
    "neither-say-nor-transfer": (_drop("routes.0.say"), "routes.0", "exactly one action"),
    "unknown-top-level-field": (_set("fallback_promt", "echo"), "fallback_promt", "unknown field"),
    "unknown-transfer-field": (
        _set("transfer.timout_seconds", 5),
        "transfer.timout_seconds",
        "unknown field",
    ),
    "unknown-prompt-field": (_set("prompts.echo.vioce", "x"), "prompts.echo.vioce", "unknown field"),
    "empty-targets": (_set("transfer.targets", []), "transfer.targets", "at least 1"),
    "max-attempts-zero": (_set("transfer.max_attempts", 0), "transfer.max_attempts", "greater than or equal"),
    "duplicate-match": (_set("routes.1.match", ["0", "ONE."]), "routes.1.match", "routes.0"),
    "missing-start-prompt": (_set("start_prompt", "missing"), "start_prompt", "'missing'"),
    "missing-retry-prompt": (_set("transfer.retry_prompt", "gone"), "transfer.retry_prompt", "'gone'"),
    "required-field-absent": (_drop("transfer"), "transfer", "required"),
    "empty-prompt-text": (_set("prompts.billing.text", ""), "prompts.billing.text", "at least 1"),
    "bad-voice": (_set("voice", "en US <Jenny>"), "voice", "pattern"),
}


@pytest.mark.parametrize(("mutate", "field", "problem"), list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_invalid_flow_names_the_field(mutate: Mutation, field: str, problem: str) -> None:
    doc = default_doc()
    mutate(doc)
    error = config_error(yaml.safe_dump(doc))
    message = str(error)
    assert f"{field}:" in message
    assert problem.lower() in message.lower()


def test_invalid_yaml_names_the_line() -> None:
    raw = "voice: en-US-JennyNeural\nlocale: en-US\nprompts: : broken\n"
    error = config_error(raw)
    assert str(error).startswith(f"{LABEL}:3:")
    assert "not valid YAML" in str(error)


def test_invalid_yaml_later_in_the_default_file_names_its_line() -> None:
    lines = DEFAULT_TEXT.splitlines()
    target = next(i for i, line in enumerate(lines) if line.startswith("routes:"))
    lines.insert(target + 1, "  - match: [unclosed")
    lines.insert(target + 2, "    say: : billing")
    error = config_error("\n".join(lines) + "\n")
    assert str(error).startswith(f"{LABEL}:")
    line = int(str(error).split(":")[1])
    # the inserted lines are lines target+2 and target+3 (1-based); the parser stops on the second
    assert line in (target + 2, target + 3)


@pytest.mark.parametrize(
    "raw",
    ["- a\n- b\n", "just a string\n", "", "42\n", "null\n"],
    ids=["list", "string", "empty", "number", "null"],
)
def test_non_mapping_document(raw: str) -> None:
    error = config_error(raw)
    assert error.where == LABEL
    assert "mapping" in str(error)


def test_target_with_unknown_country_code_is_a_config_error() -> None:
    doc = default_doc()
    doc["transfer"]["targets"] = ["+999999"]
    error = config_error(yaml.safe_dump(doc))
    assert "transfer.targets.0:" in str(error)


def test_yaml_with_control_character_is_one_line_error() -> None:
    config_error("voice: en-US\x07JennyNeural\n")


@pytest.mark.parametrize("phrase", ["?", "...", "  ! "])
def test_a_route_phrase_of_only_punctuation_is_refused(phrase: str) -> None:
    doc = default_doc()
    doc["routes"][0]["match"] = [phrase]
    error = config_error(yaml.safe_dump(doc))
    assert "routes.0.match" in str(error) and "\n" not in str(error)


def test_a_sub_second_transfer_timeout_is_refused() -> None:
    doc = default_doc()
    doc["transfer"]["timeout_seconds"] = 0.0004
    assert "transfer.timeout_seconds" in str(config_error(yaml.safe_dump(doc)))
