"""The fast turn path against the reference: ``Dispatch`` (the machine's transitions,
pre-resolved) against transitions' own trigger on a Machine built per turn, and the cached
prompt rendering against rendering from scratch. Hypothesis drives random calls (any
state, attempt count, deadline, transcript) through random event sequences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import transitions
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.call import BOT, CALLER, Call, Line
from orchestrator.callflow import BARGE_IN_HINTS, CallFlow, SpokenPrompt, load_callflow
from orchestrator.events import (
    CallEnded,
    CallerInput,
    CallStarted,
    Event,
    HandoffStatus,
    InvalidStatus,
    TimerExpired,
)
from orchestrator.ssml import clean_text, speak, xml_text
from orchestrator.turn import Turn, TurnRunner, copy_call
from states import State, Trigger
from states.dispatch import Dispatch
from tests.conftest import SAMPLE_FLOW

NOW = "2026-11-23T10:00:00.000Z"


def flow_with(**transfer: object) -> CallFlow:
    data = load_callflow(SAMPLE_FLOW).model_dump()
    data["queues"]["agents"].update(transfer)
    return CallFlow.model_validate(data)


FLOWS = [
    load_callflow(SAMPLE_FLOW),
    flow_with(targets=["+14251231234", "+14255550100"], max_attempts=2, announce="handback"),
    flow_with(max_attempts=1, timeout_seconds=5),
]
# One shared (fast) runner per flow, as the engine keeps one: state must not leak between turns.
FAST = [TurnRunner(flow, transcript_max=6) for flow in FLOWS]

texts = st.sampled_from(
    ["agent", "0", "1", "one", "hello", "Talk to agent.", '<b> & "', "", " AGENT "]
) | st.text(max_size=12)
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(CallStarted),
    st.builds(CallerInput, texts),
    st.builds(
        HandoffStatus,
        st.sampled_from(["accepted", "failed", "completed"]),
        st.sampled_from(["", "busy", "x" * 600]),
    ),
    st.builds(InvalidStatus, st.sampled_from(["unknown state 'x'", "value is str, not an object"])),
    st.builds(TimerExpired, st.integers(0, 2000)),
    st.builds(CallEnded),
)
lines = st.builds(Line, st.sampled_from([CALLER, BOT]), st.text(max_size=5), st.just(NOW))
calls = st.builds(
    Call,
    id=st.just("c"),
    state=st.sampled_from([s.value for s in State]),
    version=st.integers(0, 3),
    attempts=st.integers(0, 4),
    target=st.sampled_from(["", "+14251231234"]),
    deadline_ms=st.integers(0, 2000),
    failure=st.sampled_from(["", "busy"]),
    reference=st.sampled_from(["", "ref-1"]),
    since_ms=st.integers(0, 5),
    transcript=st.lists(lines, max_size=8),
)


def outcome(work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What ``work(*args, **kwargs)`` returned, or the exception it raised (type and message),
    to compare like for like."""
    try:
        return work(*args, **kwargs)
    except Exception as e:
        return (type(e).__name__, str(e))


@settings(max_examples=300, deadline=None)
@given(
    flow=st.integers(0, len(FLOWS) - 1),
    call=calls,
    script=st.lists(st.tuples(events, st.sampled_from(["", "ref-1", "ref-2"])), min_size=1, max_size=12),
)
def test_dispatch_and_a_machine_built_per_turn_make_identical_turns(
    flow: int, call: Call, script: list[tuple[Event, str]]
) -> None:
    fast = FAST[flow]
    for event, reference in script:
        baseline = TurnRunner(FLOWS[flow], transcript_max=6, compiled=False)
        expected = outcome(baseline.run, call, event, now=NOW, reference=reference)
        got = outcome(fast.run, call, event, now=NOW, reference=reference)
        assert got == expected, (call, event)
        assert isinstance(got, Turn)
        call = got.call
        call.version += 1  # as a commit would


@pytest.mark.parametrize("state", [*(s.value for s in State), "unregistered"])
@pytest.mark.parametrize("trigger", [*(t.value for t in Trigger), "no_such_trigger"])
@pytest.mark.parametrize("attempts", [0, 2, 3, 4])
def test_every_state_and_trigger_alike_including_the_errors(state: str, trigger: str, attempts: int) -> None:
    """``fire_trigger`` straight, outside ``run``: results, exceptions and the attached turn."""
    runners = [TurnRunner(FLOWS[0]), TurnRunner(FLOWS[0], compiled=False)]
    results = []
    for runner in runners:
        runner._turn = Turn(call=Call(id="c", state=state, attempts=attempts, deadline_ms=7))
        fired = outcome(runner.fire_trigger, trigger, reason="why")
        results.append((fired, runner._turn))
    assert results[0] == results[1]


def test_turns_on_the_fast_path_never_go_through_transitions_trigger() -> None:
    runner = TurnRunner(FLOWS[0])
    with mock.patch.object(transitions.Event, "trigger", side_effect=AssertionError("transitions fired")):
        call = Call(id="c")
        script: list[Event] = [
            CallStarted(),
            CallerInput("agent"),
            HandoffStatus("failed"),
            CallerInput("hi"),
            CallEnded(),
        ]
        for event in script:
            call = runner.run(call, event, now=NOW).call
    assert call.state == State.ENDED


def test_dispatch_takes_its_transitions_from_the_machine() -> None:
    runner = TurnRunner(FLOWS[0])
    dispatch = Dispatch(runner.machine, runner)
    for (source, trigger), plans in dispatch._plans.items():
        assert [p.transition for p in plans] == runner.machine.events[trigger].transitions[source]


@pytest.mark.parametrize(
    "option",
    [{"queued": True}, {"send_event": False}, {"ignore_invalid_triggers": True}, {"finalize_event": "f"}],
)
def test_dispatch_refuses_machine_features_it_does_not_run(option: dict[str, Any]) -> None:
    class Model:
        def f(self, *_: object) -> None: ...

    model = Model()
    machine = transitions.Machine(model=model, states=["a", "b"], initial="a", **option)
    with pytest.raises(TypeError, match="does not run"):
        Dispatch(machine, model)


def render_from_scratch(flow: CallFlow, name: str, caller_input: str) -> SpokenPrompt:
    """``CallFlow.render`` as it was before it cached anything."""
    prompt = flow.prompts[name]
    text, ssml_text = clean_text(prompt.text), xml_text(prompt.text)
    if "{input}" in prompt.text:
        text = text.replace("{input}", clean_text(caller_input))
        ssml_text = ssml_text.replace("{input}", xml_text(caller_input))
    ssml = speak(ssml_text, prompt.voice or flow.voice, prompt.locale or flow.locale)
    hint = BARGE_IN_HINTS[prompt.barge_in]
    return SpokenPrompt(name=name, text=text, ssml=ssml, hint=hint, seconds=len(text) / flow.speaking_rate)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FLOWS[0].prompts)), caller_input=st.text(max_size=30))
def test_cached_rendering_matches_rendering_from_scratch(name: str, caller_input: str) -> None:
    for flow in FLOWS:
        assert flow.render(name, {"input": caller_input}) == render_from_scratch(flow, name, caller_input)


def test_copy_call_copies_every_field_and_not_the_transcript_list() -> None:
    call = Call("c", "failed", 3, 2, "+1", 9, "busy", "ref", 5, [Line(CALLER, "hi", NOW)])
    copied = copy_call(call)
    assert copied == call and copied is not call
    assert copied.transcript is not call.transcript


def test_a_copied_flow_does_not_keep_the_originals_caches() -> None:
    flow = load_callflow(SAMPLE_FLOW)
    assert flow.route_for("main", "1", keypad=True) is not None and flow.render("welcome").text.startswith(
        "Thank you"
    )
    prompts = {**flow.prompts, "welcome": flow.prompts["handback"]}
    copied = flow.model_copy(update={"prompts": prompts, "routes": []})
    assert copied.route_for("main", "1", keypad=True) is None
    assert copied.render("welcome").text == flow.render("handback").text
