"""State machine cost per turn: ``TurnRunner.run`` on the one machine built per call flow,
against building a ``transitions`` Machine per turn (``build_machine`` on a fresh model,
which is what ``TurnRunner(flow)`` does), for typical events on the shipped call flow.
Also the bare trigger (the machine alone, no prompt rendering). Medians of several
repeats of many iterations, ``time.perf_counter_ns``. No Redis: ``redis_url`` is unused.

    .venv/bin/python -m bench.machine [--json PATH] [--smoke]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.report import main as bench_main
from bench.report import row
from orchestrator.call import BOT, CALLER, Call, Line, timestamp
from orchestrator.callflow import load_callflow
from orchestrator.events import CallerInput, Event, HandoffStatus
from orchestrator.turn import Turn, TurnRunner
from states import State

TARGET_US = 10.0
TARGET = "+14251231234"  # the shipped flow's agent number
NOW = timestamp()
TRANSCRIPT = [Line(CALLER if n % 2 else BOT, "what are your opening hours", NOW) for n in range(20)]
# (name, the call before the turn, the event, the state after it)
CASES: list[tuple[str, Call, Event, str]] = [
    (
        "caller input",
        Call(id="c", state=State.BOT.value, transcript=TRANSCRIPT),
        CallerInput("my order"),
        "bot",
    ),
    (
        "request for an agent",
        Call(id="c", state=State.BOT.value, transcript=TRANSCRIPT),
        CallerInput("agent"),
        "transferring",
    ),
    (
        "handoff status accepted",
        Call(
            id="c", state=State.TRANSFERRING.value, attempts=1, target="+14251231234", transcript=TRANSCRIPT
        ),
        HandoffStatus("accepted"),
        "accepted",
    ),
]


def timed(work: Callable[[], object], iterations: int, repeats: int) -> float:
    """µs per call of ``work``: the median over ``repeats`` runs of ``iterations`` calls."""
    runs = []
    for _ in range(repeats):
        began = time.perf_counter_ns()
        for _ in range(iterations):
            work()
        runs.append((time.perf_counter_ns() - began) / iterations / 1000)
    return statistics.median(runs)


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """µs per turn, shared machine against a machine built per turn."""
    iterations, repeats = (50, 2) if smoke else (5000, 7)
    flow = load_callflow()
    runner = TurnRunner(flow)
    cases: dict[str, Any] = {}
    rows = []
    for name, call, event, expected in CASES:
        shared = timed(functools.partial(runner.run, call, event, now=NOW), iterations, repeats)

        def per_turn(call: Call = call, event: Event = event) -> Turn:
            return TurnRunner(flow).run(call, event, now=NOW)

        baseline = timed(per_turn, max(1, iterations // 10), repeats)
        turn = runner.run(call, event, now=NOW)
        cases[name] = {
            "us_per_turn": round(shared, 2),
            "baseline_us_per_turn": round(baseline, 2),
            "baseline_over_shared": round(baseline / shared, 1),
            "state_after": turn.call.state,
            "state_after_baseline": TurnRunner(flow).run(call, event, now=NOW).call.state,
            "expected_state": expected,
        }
        rows += [
            row(f"{name}: TurnRunner.run", round(shared, 2), "µs/turn"),
            row(f"{name}: Machine built per turn", round(baseline, 2), "µs/turn"),
            row(f"{name}: built per turn ÷ shared", round(baseline / shared, 1), "x"),
        ]
    # The machine alone: attach a transferring call, fire accept (no prompt to render).
    trigger_runner = TurnRunner(flow)

    def trigger() -> None:
        trigger_runner._turn = Turn(call=Call(id="c", state=State.TRANSFERRING.value))
        trigger_runner.trigger("accept", reason="accepted")  # type: ignore[attr-defined]

    bare = timed(trigger, iterations, repeats)
    trigger()
    rows.append(row("bare trigger (accept)", round(bare, 2), "µs/turn"))
    rows.append(row("target for the machine part", TARGET_US, "µs/turn"))
    say(f"{iterations} iterations x {repeats} repeats per figure (the baseline a tenth as many)")
    return {
        "bench": "machine",
        "parameters": {"iterations": iterations, "repeats": repeats, "transcript_lines": len(TRANSCRIPT)},
        "cases": cases,
        "bare_trigger_us": round(bare, 2),
        "target_us": TARGET_US,
        "checks": {
            **{
                f"{name}: right state": c["state_after"] == c["expected_state"] == c["state_after_baseline"]
                for name, c in cases.items()
            },
            "bare trigger: right state": trigger_runner.state == State.ACCEPTED,
        },
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(bench_main("machine", __doc__ or "", bench))
