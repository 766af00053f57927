"""A call's record: what is persisted between turns, and what a turn adds to it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from states import State


@dataclass(slots=True, frozen=True)
class Line:
    """One transcript line: who spoke (``caller`` or ``bot``), what, and when (ISO 8601).

    ``text`` is redacted (``orchestrator.redact``); ``full``, the words as said, is kept in
    memory only, and only for a flow with ``agent_transcript: full``: it is never stored,
    compared or printed.
    """

    role: str
    text: str
    at: str
    full: str = field(default="", compare=False, repr=False)


def timestamp(epoch_ms: int | None = None) -> str:
    """ISO 8601 in UTC to the millisecond (``...Z``): now, or an epoch time in ms."""
    moment = datetime.now(UTC) if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


CALLER = "caller"
BOT = "bot"


def reference_user(reference: str) -> dict[str, Any]:
    """The caller's account (``user``: on the Telephony channel, ``id`` is their number) in
    a call's stored JSON conversation reference; {} when there is none."""
    try:
        user = json.loads(reference).get("user") if reference else None
    except (ValueError, AttributeError):
        return {}
    return user if isinstance(user, dict) else {}


@dataclass(slots=True, frozen=True)
class Step:
    """One history entry: a transition, or an event that changed nothing and why."""

    trigger: str
    source: str
    dest: str
    reason: str = ""
    target: str = ""  # as read back: the number dialled, on a step into transferring
    node: str = ""  # on a move through the call flow: the node the call arrived at


@dataclass(slots=True)
class Call:
    """The persisted state of one call. ``version`` grows by one with every commit."""

    id: str
    state: str = State.BOT.value
    version: int = 0
    attempts: int = 0
    target: str = ""
    deadline_ms: int = 0  # Redis server time; 0 when no watchdog is armed
    failure: str = ""  # the last failed transfer's reason
    reference: str = ""  # JSON conversation reference, to reach the call proactively
    since_ms: int = 0  # Redis server time the call entered its state (as loaded)
    transcript: list[Line] = field(default_factory=list)
    # Where the call is in the call flow, and how it is getting on there.
    node: str = ""  # the node the call is at ("" before the flow starts)
    queue: str = ""  # the queue of the current (or last) transfer; ``attempts`` count for it
    tries: int = 0  # at this node: input no route took, or gathered digits that did not fit
    silences: int = 0  # at this node: no-input timeouts
    entry: str = ""  # a gather's digits so far, or awaiting confirmation (``confirming``)
    confirming: bool = False
    variables: dict[str, str] = field(default_factory=dict)  # collected: kept sealed in Redis
    shown: dict[str, str] = field(default_factory=dict)  # the same, masked: what views show
    # A warm transfer waiting for a free pool number: the transfer node it holds for, and
    # how many holds so far ("", 0: not holding).
    holding: str = ""
    holds: int = 0
    transfers: int = 0  # transfers started, to any queue: the n-th is leased as "t<n>"
    created_ms: int = 0  # Redis server time the call was first committed (0: not yet)

    @property
    def is_new(self) -> bool:
        """Never committed: the bot has not seen this call before (or it expired)."""
        return self.version == 0
