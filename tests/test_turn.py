"""The call state machine and the pure turn: every state against every event, no I/O."""

from __future__ import annotations

from unittest import mock

import pytest
import transitions

from orchestrator.call import Call
from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.events import (
    CallEnded,
    CallerInput,
    CallStarted,
    Event,
    HandoffStatus,
    InvalidStatus,
    status_from_value,
)
from orchestrator.turn import TELEPHONY_TRANSFERRED, Handoff, Speak, Turn, TurnRunner
from states import TRANSITIONS, State, Trigger, build_machine
from states.call import callback_names
from tests.conftest import SAMPLE_FLOW


@pytest.fixture(scope="module")
def runner() -> TurnRunner:
    return TurnRunner(load_callflow(SAMPLE_FLOW))


def run(runner: TurnRunner, call: Call, event: Event) -> Turn:
    turn = runner.run(call, event, now="2026-11-23T10:00:00.000Z")
    turn.call.version += 1  # as a commit would
    return turn


def flow_with_transfer(**changes: object) -> CallFlow:
    data = load_callflow(SAMPLE_FLOW).model_dump()
    data["queues"]["agents"].update(changes)
    return CallFlow.model_validate(data)


def said(turn: Turn) -> list[str]:
    return [
        e.prompt.name
        if isinstance(e, Speak)
        else f"transfer:{e.target}"
        if isinstance(e, Handoff)
        else "hang up"
        for e in turn.effects
    ]


def test_definition_names_the_contract_states_and_no_auto_transitions() -> None:
    assert [s.value for s in State] == ["bot", "transferring", "accepted", "failed", "ended"]
    model = TurnRunner(load_callflow(SAMPLE_FLOW))
    assert not any(name.startswith("to_") for name in model.machine.events)
    assert set(model.machine.events) == {t.value for t in Trigger}


def test_build_machine_rejects_a_model_without_the_callbacks() -> None:
    with pytest.raises(TypeError, match="record_step"):
        build_machine(object())
    assert "start_transfer" in callback_names()


def test_transitions_table_only_uses_known_states() -> None:
    states = {s.value for s in State}
    for row in TRANSITIONS:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        assert {str(s) for s in sources} <= states
        assert row["dest"] is None or str(row["dest"]) in states


def test_turns_never_construct_a_machine(runner: TurnRunner) -> None:
    with mock.patch.object(transitions.Machine, "__init__", side_effect=AssertionError("built")):
        call = Call(id="c")
        events: list[Event] = [CallStarted(), CallerInput("agent"), HandoffStatus("accepted"), CallEnded()]
        for event in events:
            call = run(runner, call, event).call
    assert call.state == State.ENDED


def test_welcome_billing_and_echo(runner: TurnRunner) -> None:
    turn = run(runner, Call(id="c"), CallStarted())
    assert said(turn) == ["welcome"] and turn.call.state == State.BOT
    turn = run(runner, turn.call, CallerInput(" One "))
    assert said(turn) == ["billing"]
    prompt = turn.effects[0]
    assert isinstance(prompt, Speak) and "en-US-JessaNeural" in prompt.prompt.ssml
    turn = run(runner, turn.call, CallerInput('<b> & "'))
    echo = turn.effects[0]
    assert isinstance(echo, Speak) and echo.prompt.text == 'What I heard was "<b> & ""'
    assert "&lt;b&gt; &amp; &quot;" in echo.prompt.ssml and "en-US-GuyNeural" in echo.prompt.ssml
    assert [(line.role, line.text) for line in turn.call.transcript][-2:] == [
        ("caller", '<b> & "'),
        ("bot", 'What I heard was "<b> & ""'),
    ]


def test_a_repeated_call_start_is_recorded_and_silent(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallStarted()).call
    turn = run(runner, call, CallStarted())
    assert turn.effects == [] and turn.steps[0].reason.startswith("ignored")


@pytest.mark.parametrize("text", ["0", "talk to agent", "Talk to agent.", "AGENT", "representative"])
def test_asking_for_an_agent_transfers_to_the_first_target(runner: TurnRunner, text: str) -> None:
    turn = run(runner, Call(id="c"), CallerInput(text))
    assert turn.call.state == State.TRANSFERRING
    assert turn.effects == [Handoff("+14251231234", 1, "agents")]
    assert turn.call.attempts == 1 and turn.timer_seconds == 60
    assert [(s.trigger, s.source, s.dest, s.node) for s in turn.steps] == [
        ("move", "bot", "bot", "agent"),  # through the flow's transfer node
        ("request_agent", "bot", "transferring", ""),
    ]


def test_failed_retry_prompt_then_next_target_then_final_prompt() -> None:
    runner = TurnRunner(flow_with_transfer(targets=["+14251231234", "+14255550100"], max_attempts=2))
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    turn = run(runner, call, HandoffStatus("failed", "busy"))
    assert turn.call.state == State.FAILED and turn.call.failure == "busy"
    assert said(turn) == ["transfer_retry"] and turn.timer_seconds == 0
    turn = run(runner, turn.call, CallerInput("agent"))
    assert said(turn) == ["transfer:+14255550100"] and turn.call.attempts == 2
    turn = run(runner, turn.call, HandoffStatus("failed", "no answer"))
    assert said(turn) == ["transfer_final"] and turn.call.state == State.FAILED
    turn = run(runner, turn.call, CallerInput("agent"))
    assert said(turn) == ["transfer_final"] and turn.call.state == State.FAILED
    assert turn.steps[-1].reason == "ignored: no transfer attempts left"
    turn = run(runner, turn.call, CallerInput("1"))
    assert said(turn) == ["billing"] and turn.call.state == State.BOT


def test_other_input_after_a_failure_goes_back_to_the_bot_and_is_answered(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    call = run(runner, call, HandoffStatus("failed")).call
    turn = run(runner, call, CallerInput("what are your hours"))
    assert turn.call.state == State.BOT and said(turn) == ["echo"]
    assert [(s.trigger, s.source, s.dest) for s in turn.steps] == [("resume", "failed", "bot")]


def test_accepted_is_silent_and_completed_hands_back(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    turn = run(runner, call, HandoffStatus("accepted"))
    assert turn.call.state == State.ACCEPTED and turn.effects == []
    turn = run(runner, turn.call, CallerInput("hello?"))
    assert turn.effects == [] and turn.call.transcript[-1].text == "hello?"
    turn = run(runner, turn.call, HandoffStatus("completed"))
    assert turn.call.state == State.BOT and said(turn) == ["handback"]


def test_a_late_accepted_after_a_failure_wins(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    call = run(runner, call, HandoffStatus("failed", "timeout")).call
    turn = run(runner, call, HandoffStatus("accepted"))
    assert turn.call.state == State.ACCEPTED


def test_telephony_hang_up_while_transferring_is_recorded_as_accepted_then_ended(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    turn = run(runner, call, CallEnded())
    assert turn.call.state == State.ENDED
    assert [(s.trigger, s.source, s.dest, s.reason) for s in turn.steps] == [
        ("accept", "transferring", "accepted", TELEPHONY_TRANSFERRED),
        ("hang_up", "accepted", "ended", "caller hung up"),
    ]
    assert turn.call.deadline_ms == 0 and turn.timer_seconds == 0


@pytest.mark.parametrize("state", ["bot", "accepted", "failed"])
def test_hang_up_ends_the_call_from_any_live_state(runner: TurnRunner, state: str) -> None:
    turn = run(runner, Call(id="c", state=state, version=3), CallEnded())
    assert turn.call.state == State.ENDED and turn.steps[-1].source == state


@pytest.mark.parametrize(
    ("state", "event"),
    [
        ("bot", HandoffStatus("accepted")),
        ("bot", HandoffStatus("failed", "x")),
        ("bot", HandoffStatus("completed")),
        ("transferring", HandoffStatus("completed")),
        ("accepted", HandoffStatus("accepted")),
        ("accepted", HandoffStatus("failed")),
        ("failed", HandoffStatus("failed")),
        ("ended", HandoffStatus("accepted")),
        ("ended", CallEnded()),
        ("ended", CallerInput("agent")),
        ("bot", InvalidStatus("value is str, not an object")),
    ],
)
def test_events_that_do_not_fit_are_recorded_and_change_nothing(
    runner: TurnRunner, state: str, event: Event
) -> None:
    call = Call(id="c", state=state, version=5, attempts=1, target="+14251231234")
    turn = run(runner, call, event)
    assert turn.call.state == state and turn.effects == [] and turn.lines == []
    assert turn.call.attempts == 1 and turn.call.target == "+14251231234"
    assert len(turn.steps) == 1 and turn.steps[0].reason.startswith("ignored")
    assert turn.steps[0].source == turn.steps[0].dest == state


def test_input_while_transferring_is_kept_but_not_answered(runner: TurnRunner) -> None:
    call = run(runner, Call(id="c"), CallerInput("agent")).call
    turn = run(runner, call, CallerInput("hello?"))
    assert turn.effects == [] and turn.call.state == State.TRANSFERRING
    assert turn.lines[0].text == "hello?"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"state": "accepted"}, HandoffStatus("accepted")),
        ({"state": "failed", "message": "busy"}, HandoffStatus("failed", "busy")),
        ({"state": "completed", "message": 5}, HandoffStatus("completed")),
        ({"state": "bogus"}, InvalidStatus("unknown state 'bogus'")),
        ({}, InvalidStatus("unknown state None")),
        ("accepted", InvalidStatus("value is str, not an object")),
        (None, InvalidStatus("value is NoneType, not an object")),
        ([{"state": "accepted"}], InvalidStatus("value is list, not an object")),
    ],
)
def test_status_values_are_read_defensively(value: object, expected: Event) -> None:
    assert status_from_value(value) == expected


def test_the_transcript_is_capped() -> None:
    runner = TurnRunner(load_callflow(SAMPLE_FLOW), transcript_max=5)
    call = Call(id="c")
    for i in range(10):
        call = run(runner, call, CallerInput(f"said {i}")).call
    assert len(call.transcript) == 5
    assert call.transcript[-1].text == 'What I heard was "said 9"'


def test_the_loaded_call_is_not_mutated(runner: TurnRunner) -> None:
    call = Call(id="c")
    run(runner, call, CallerInput("agent"))
    assert call.state == State.BOT and call.attempts == 0 and call.transcript == []


@pytest.mark.parametrize(
    ("spoken", "kept", "entry"),
    [
        (
            "my account is nine eight seven seven nine eight six two",
            "my account is * * * * * * * *",
            "98779862",
        ),
        ("Nine-Eight-Seven, seven 9 8 6 oh", "*-*-*, * * * * *", "98779860"),
        ("98779862.", "********.", "98779862"),
    ],
)
def test_digits_said_at_a_gather_are_kept_masked_words_too(spoken: str, kept: str, entry: str) -> None:
    """The transcript keeps no digit of an entry said at a gather, as numerals or as words;
    the digits themselves are collected (and read back)."""
    runner = TurnRunner(load_callflow(None))  # the default flow: its account gather
    call = Call(id="call-1")
    for event in (CallStarted(), CallerInput("1", keypad=True), CallerInput("1", keypad=True)):
        call = run(runner, call, event).call
    assert call.node == "account"
    turn = run(runner, call, CallerInput(spoken))
    assert turn.lines[0].text == kept
    assert (turn.call.entry, turn.call.confirming) == (entry, True)
    assert said(turn) == ["confirm_account"]
