"""msrest's (de)serialization of botbuilder.schema models beside adapters.activity_json.

Per figure, µs per call, msrest and the fast path, and their ratio: a reply's body
(``Activity.serialize()`` as the channel client posted it), an incoming activity
(``Activity().deserialize(data)`` as ``parse_activity`` made it), the conversation
reference stored per turn, and a handoff.initiate with a 20-line transcript. Medians of
several repeats, ``time.perf_counter_ns``. No Redis: ``redis_url`` is unused.

    .venv/bin/python -m bench.codec [--json PATH] [--smoke]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from botbuilder.core import TurnContext
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    Attachment,
    ChannelAccount,
    ConversationReference,
    InputHints,
    Transcript,
)

from adapters import activity_json
from adapters.activity_json import activity_from_json, to_json
from bench.report import main as bench_main
from bench.report import row, timed
from simulator.channel import Caller


def samples() -> dict[str, tuple[Callable[[], object], Callable[[], object], Callable[[], bool]]]:
    """name -> (msrest, fast, whether both give the same result)."""
    caller = Caller("https://telephony.example/", "call-1")
    incoming: dict[str, Any] = caller.say("what are your opening hours")
    incoming["localTimestamp"] = "2026-11-23T11:00:00.000+01:00"
    incoming["channelData"] = {"tenant": {"id": "t"}}
    activity = Activity().deserialize(incoming)
    reference = TurnContext.get_conversation_reference(activity)
    reference.activity_id = None
    reply = Activity(
        type=ActivityTypes.message,
        text="We are open from nine to five.",
        speak="<speak>We are open from nine to five.</speak>",
        input_hint=InputHints.accepting_input,
        channel_data={"replyKey": "3.0"},
    )
    reply.apply_conversation_reference(TurnContext.get_conversation_reference(activity))
    lines = [
        Activity(
            type=ActivityTypes.message,
            text="what are your opening hours",
            timestamp=datetime.now(UTC),
            from_property=ChannelAccount(id="+14255550123", role="user"),
            recipient=ChannelAccount(id="contoso-bot", role="bot"),
            conversation=activity.conversation,
            channel_id="telephony",
        )
        for _ in range(20)
    ]
    handoff = Activity(
        type=ActivityTypes.event,
        name="handoff.initiate",
        value={"TargetPhoneNumber": "+14251231234"},
        timestamp=datetime.now(UTC),
        attachments=[
            Attachment(
                content_type="application/json", name="Transcript", content=Transcript(activities=lines)
            )
        ],
    )
    handoff.apply_conversation_reference(TurnContext.get_conversation_reference(activity))
    stored = json.dumps(reference.serialize(), separators=(",", ":"), sort_keys=True)

    def same_activity() -> bool:
        return bool(
            activity_from_json(incoming) == Activity().deserialize(incoming)
            and to_json(activity_from_json(incoming)) == activity.serialize()
        )

    return {
        "reply serialize": (
            lambda: json.dumps(reply.serialize()),
            lambda: json.dumps(to_json(reply)),
            lambda: json.dumps(to_json(reply)) == json.dumps(reply.serialize()),
        ),
        "incoming activity deserialize": (
            lambda: Activity().deserialize(incoming),
            lambda: activity_from_json(incoming),
            same_activity,
        ),
        "conversation reference serialize": (
            lambda: json.dumps(reference.serialize(), separators=(",", ":"), sort_keys=True),
            lambda: json.dumps(to_json(reference), separators=(",", ":"), sort_keys=True),
            lambda: json.dumps(to_json(reference), separators=(",", ":"), sort_keys=True) == stored,
        ),
        "conversation reference deserialize": (
            lambda: ConversationReference().deserialize(json.loads(stored)),
            lambda: activity_json.model_from_json(ConversationReference, json.loads(stored)),
            lambda: (
                activity_json.model_from_json(ConversationReference, json.loads(stored))
                == ConversationReference().deserialize(json.loads(stored))
            ),
        ),
        "handoff with a 20-line transcript serialize": (
            lambda: json.dumps(handoff.serialize()),
            lambda: json.dumps(to_json(handoff)),
            lambda: json.dumps(to_json(handoff)) == json.dumps(handoff.serialize()),
        ),
    }


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """µs per call, msrest and fast, for each sample."""
    iterations, repeats = (20, 2) if smoke else (2000, 7)
    rows = []
    figures: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    before = dict(activity_json.fallbacks)
    for name, (slow, fast, same) in samples().items():
        checks[f"{name}: same result as msrest"] = same()
        slow_us = timed(slow, max(1, iterations // 4), repeats)
        fast_us = timed(fast, iterations, repeats)
        figures[name] = {"msrest_us": round(slow_us, 2), "fast_us": round(fast_us, 2)}
        rows += [
            row(f"{name}: msrest", round(slow_us, 2), "µs"),
            row(f"{name}: activity_json", round(fast_us, 2), "µs"),
            row(f"{name}: msrest ÷ activity_json", round(slow_us / fast_us, 1), "x"),
        ]
    checks["no fallback to msrest"] = activity_json.fallbacks == before
    say(f"{iterations} iterations (msrest a quarter as many) x {repeats} repeats per figure")
    return {
        "bench": "codec",
        "parameters": {"iterations": iterations, "repeats": repeats},
        "figures": figures,
        "checks": checks,
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(bench_main("codec", __doc__ or "", bench))
