"""What operators see of calls, as plain JSON-ready data: one shape for the CLI, the HTTP
operator API and the dashboard, made from what ``adapters.inspector`` reads.

Caller words were redacted where they entered the call; every view here applies the same
rule again (``redact``), so nothing shown escapes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections import Counter
from typing import Any

from adapters.inspector import MAX_WINDOW_SECONDS, CallInspector, FeedEntry
from adapters.pool import PoolStatus
from orchestrator.call import timestamp
from orchestrator.callflow import CallFlow
from orchestrator.redact import Redactor, masked
from orchestrator.turn import Outcome
from states import LIVE_STATES, State
from states.diagram import arrows

# The redactor's own rule at its defaults (the default call flow's): text it stored shows
# unchanged, and no view shows a digit run it would mask, whatever a flow's privacy says.
_SHOWN = Redactor()
_WINDOW = re.compile(r"^\s*(\d{1,9})\s*([smhd]?)\s*$", re.ASCII)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
CONCLUDED = (Outcome.ACCEPTED, Outcome.FAILED, Outcome.TIMEOUT)


def redact(text: str) -> str:
    """Text for operator eyes: digit runs masked as they are where caller words are stored."""
    return _SHOWN(text)


def mask_account(text: str) -> str:
    """A caller's account id or name for operator eyes: a ``*`` per digit but the last four,
    as the digit-run rule does (``+14255550123`` -> ``*******0123``); a value with four
    digits or fewer (not a phone number: a Web Chat id, a name), a ``*`` per character."""
    digits = re.sub(r"\D", "", text)
    if len(digits) > 4:
        return masked(digits)
    return "*" * len(text)


def shown_reference(raw: str) -> Any:
    """The stored conversation reference for operator eyes: its ``user`` (the caller: on
    Telephony ``id`` is their number) masked, the rest as stored; None for none."""
    if not raw:
        return None
    try:
        reference = json.loads(raw)
    except ValueError:
        return "(unreadable)"
    user = reference.get("user") if isinstance(reference, dict) else None
    if isinstance(user, dict):
        masked = ("id", "name", "aadObjectId")
        reference["user"] = {k: mask_account(str(v)) if k in masked and v else v for k, v in user.items()}
    return reference


def parse_window(text: str) -> int:
    """``90s``, ``15m``, ``1h``, ``7d`` (or plain seconds) -> seconds."""
    match = _WINDOW.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(
            f"a window is a positive number with a unit s, m, h or d (like 15m or 24h), not {text!r}"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_WINDOW_SECONDS:
        raise ValueError(f"a window is at most 7d (counters are kept by the hour for 8 days), not {text!r}")
    return seconds


def when(ms: str | int | None) -> str:
    """An epoch time in ms (as stored) as ISO 8601, or "-" for none."""
    text = str(ms or "")
    return timestamp(int(text)) if text.isdigit() and int(text) else "-"


def call_row(record: dict[str, str]) -> dict[str, Any]:
    """One line of a calls listing."""
    return {
        "id": record.get("id", ""),
        "state": record.get("state", ""),
        "since": when(record.get("since")),
        "attempts": int(record.get("attempts", 0)),
        "target": record.get("target", ""),
        "last_transition": record.get("last_transition", ""),
    }


async def list_calls(inspector: CallInspector, state: str | None, limit: int) -> list[dict[str, Any]]:
    """Calls in ``state`` (default: every live state), latest state change first."""
    states = [state] if state else [s.value for s in LIVE_STATES]
    return [call_row(record) for record in await inspector.list_calls(states, limit)]


async def call_details(inspector: CallInspector, conversation_id: str) -> dict[str, Any] | None:
    """One call whole: record, redacted transcript and history timeline; None if unknown."""
    store = inspector.store
    record = await store.record(conversation_id)
    if not record:
        return None
    transcript = await store.transcript(conversation_id)
    history = await store.history(conversation_id)
    shown: dict[str, Any] = {k: v for k, v in record.items() if k != "reference"}
    shown["reference"] = shown_reference(record.get("reference", ""))
    shown["failure"] = redact(record.get("failure", ""))
    return {
        "record": shown,
        "connection": await inspector.connection(conversation_id, record.get("reference", "")),
        "targets_tried": [step.target for _, step in history if step.target],
        "transcript": [{"role": line.role, "text": redact(line.text), "at": line.at} for line in transcript],
        "history": [
            {
                "at": when(at_ms),
                "trigger": step.trigger,
                "from": step.source,
                "to": step.dest,
                "reason": redact(step.reason),
                "target": step.target,
                "node": step.node,  # on a move through the call flow: the node reached
            }
            for at_ms, step in history
        ],
    }


def connection_line(connection: dict[str, Any], state: str) -> str:
    """How a call in ``state`` is connected, for people."""
    if connection["transport"] == "http":
        return f"HTTP: replies are posted to {connection.get('service_url') or '?'}"
    if not connection.get("instance"):
        if state == State.ENDED:
            return "streaming socket: none (the call has ended)"
        return "streaming socket: none now (replies wait for the channel to reconnect)"
    lease = "live" if connection.get("live") else "lapsed: the instance is gone"
    return f"streaming socket on instance {connection['instance']} ({lease})"


def transition_row(entry: FeedEntry) -> dict[str, Any]:
    """One step of the feed, for people."""
    return {
        "at": when(entry.at_ms),
        "call": entry.call,
        "trigger": entry.trigger,
        "from": entry.source,
        "to": entry.dest,
        "reason": redact(entry.reason),
        "target": entry.target,
        "node": entry.node,
    }


async def recent_transitions(inspector: CallInspector, limit: int) -> list[dict[str, Any]]:
    return [transition_row(entry) for entry in await inspector.recent(limit)]


def _rate(counts: dict[str, int]) -> float | None:
    """Transfers that reached an agent over those that ended ringing. A late accept turns
    a transfer already counted as failed into a success, so it adds only above the line."""
    concluded = sum(counts.get(outcome, 0) for outcome in CONCLUDED)
    succeeded = counts.get(Outcome.ACCEPTED, 0) + counts.get(Outcome.LATE_ACCEPTED, 0)
    return round(succeeded / concluded, 4) if concluded else None


def _figures(counter: Counter[str]) -> dict[str, Any]:
    """Transfers by outcome, and their success rate."""
    row: dict[str, Any] = {o.value: counter.get(o.value, 0) for o in Outcome}
    row["success_rate"] = _rate(row)
    return row


def _rows(name: str, counts: dict[str, Counter[str]]) -> list[dict[str, Any]]:
    """One row per ``name`` (a queue or a target)."""
    return [{name: key, **_figures(counter)} for key, counter in sorted(counts.items())]


async def stats(inspector: CallInspector, window: str) -> dict[str, Any]:
    """Calls per state and, in ``bot``, per flow node now; transfers and their success rate
    per queue and per target over ``window``.

    The success rate is (accepted + late accepted) / (accepted + failed + timed out):
    transfers still ringing are not counted against it. A transfer counted without a
    queue is under queue "".
    """
    seconds = parse_window(window)
    calls, nodes, counts = await asyncio.gather(
        inspector.state_counts(), inspector.node_counts(), inspector.transfer_counts(seconds)
    )
    totals = sum(counts.by_queue_target.values(), Counter[str]())
    return {
        "window": window.strip(),
        "from": when(counts.from_ms),
        "to": when(counts.to_ms),
        "calls": calls,
        "nodes": nodes,
        "transfers": _figures(totals),
        "queues": _rows("queue", counts.by_queue),
        "targets": _rows("target", counts.by_target),
    }


def pool_figures(flow: CallFlow, name: str, status: PoolStatus) -> dict[str, Any]:
    """Pool ``name`` as operators see it (``pool status``, ``GET /api/pools``): its numbers
    per state, its grace, and the queues that lease from it."""
    pool = flow.pools[name]
    return {
        "numbers": len(pool.numbers),
        **dataclasses.asdict(status),
        "grace_seconds": pool.grace_seconds,
        "queues": sorted(queue for queue, q in flow.queues.items() if q.pool == name),
    }


def machine() -> dict[str, Any]:
    """The state machine as data, for drawing it (the dashboard does)."""
    return {
        "initial": State.BOT.value,
        "final": State.ENDED.value,
        "states": [s.value for s in State],
        "transitions": [
            {"trigger": a.label.split()[0], "source": a.source, "dest": a.dest, "label": a.label}
            for a in arrows()
        ],
    }
