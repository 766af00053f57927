"""Callers who go quiet on the default flow, for the scale tests of the call timer (over
HTTP in tests/test_scale.py, over streaming sockets in tests/test_streaming_scale.py).

Three kinds of call, each ended by the bot after its no-input reprompts run out, so every
prompt after the caller's last key is the timer's:

- ``silent``: says nothing at the main menu: two no-input reprompts, then the goodbye
  and the hang-up (4 firings);
- ``short``: reaches the account gather, presses 3 digits and stops: the inter-digit
  timeout takes them, too few (``bad_account``), then the same silence (5 firings);
- ``unfinished``: presses 7 digits and no ``#``: the inter-digit timeout takes them and
  reads them back, then the confirmation goes unanswered (5 firings).

The flow is the shipped default with 1 s timeouts and each prompt's text its own name
(short, so a prompt's estimated speaking time adds little to the wait, and a reply is
known by its text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from simulator.channel import Caller
from tests.process import flow_doc, write_flow

END = "endOfConversation"
TOKEN = "operator-token-0123456789"  # for each instance's own /metrics


def timers_settings(tmp_path: Path) -> dict[str, str]:
    """Bot settings for these calls: the flow, the key that seals what its gather collects
    (shared by the instances), and the operator token."""
    keys = Fernet.generate_key().decode()
    return {"CALLFLOW_FILE": timers_flow(tmp_path), "VARIABLES_KEYS": keys, "OPERATOR_TOKEN": TOKEN}


def timers_flow(tmp_path: Path) -> str:
    """The default flow with 1 s no-input and inter-digit timeouts, its prompts their names."""
    data = flow_doc("default.yaml")
    data["defaults"]["no_input"]["seconds"] = 1
    data["nodes"]["account"]["inter_digit_seconds"] = 1
    for name, prompt in data["prompts"].items():
        prompt["text"] = "confirm {account:digits}" if name == "confirm_account" else name
    return write_flow(tmp_path, data)


@dataclass(frozen=True, slots=True)
class Kind:
    """What a kind of caller presses after the call starts, and what it must come to."""

    keys: str  # pressed one by one after the greeting ("": none)
    said: list[str]  # every reply, in order: a prompt's text, or END
    timers: int  # call timer firings that change the call
    steps: list[tuple[str, str, str]]  # its history, as tests.test_scale.history reads it


GOODBYE = [("no_input", "bot", "bot"), ("move", "goodbye", ""), ("hang_up", "bot", "ended")]
AT_MAIN = [("move", "notice", ""), ("move", "main", "")]
AT_ACCOUNT = [*AT_MAIN, ("move", "billing", ""), ("move", "account", "")]
REPROMPTS = [("no_input", "bot", "bot")] * 2

KINDS = {
    "silent": Kind(
        keys="",
        said=["notice", "welcome", *["not_heard", "welcome"] * 2, "goodbye", END],
        timers=4,
        steps=[*AT_MAIN, *REPROMPTS, *GOODBYE],
    ),
    "short": Kind(
        keys="11123",
        said=["notice", "welcome", "billing", "ask_account", "bad_account", "ask_account"]
        + ["not_heard", "ask_account"] * 2
        + ["goodbye", END],
        timers=5,
        steps=[*AT_ACCOUNT, *REPROMPTS, *GOODBYE],
    ),
    "unfinished": Kind(
        keys="111234567",
        said=["notice", "welcome", "billing", "ask_account", "confirm 1 2 3 4 5 6 7"]
        + ["not_heard", "confirm 1 2 3 4 5 6 7"] * 2
        + ["goodbye", END],
        timers=5,
        steps=[*AT_ACCOUNT, *REPROMPTS, *GOODBYE],
    ),
}


def kind_of(i: int) -> str:
    """The kind of the ``i``-th call: the kinds in turn."""
    return list(KINDS)[i % len(KINDS)]


def script(caller: Caller, kind: str) -> list[dict[str, Any]]:
    """The activities the caller sends: the call's start, then each key."""
    return [caller.start(), *(caller.press(key)[0] for key in KINDS[kind].keys)]


def said(activity: dict[str, Any]) -> str:
    """A reply as ``Kind.said`` names it."""
    return END if activity.get("type") == END else str(activity.get("text"))
