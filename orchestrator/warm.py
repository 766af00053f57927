"""What the agent is told before picking up a warm transfer: the call's context document.

It is stored (sealed) under the pool number the call was transferred to, and handed to
the agent side by the context API and the push. Its schema is documented in
docs/warm-transfer.md; ``CONTEXT_VERSION`` changes when a field changes meaning or goes.
"""

from __future__ import annotations

from typing import Any

from orchestrator.call import Call, reference_user, timestamp
from orchestrator.callflow import Privacy

CONTEXT_VERSION = 1


def context_document(
    call: Call,
    *,
    pool: str,
    queue: str,
    reason: str,
    attempt: int,
    privacy: Privacy,
    now: str,
) -> dict[str, Any]:
    """The context of ``call`` as its transfer ``attempt`` to ``queue`` starts: the collected
    variables as collected (the agent needs them; Redis only ever holds them sealed), the
    caller's number masked or full per ``privacy``, and the transcript as stored (redacted)."""
    return {
        "version": CONTEXT_VERSION,
        "pool": pool,
        "queue": queue,
        "reason": reason,
        "attempt": attempt,
        "caller": privacy.caller_for_agent(str(reference_user(call.reference).get("id") or "")),
        "started": timestamp(call.created_ms) if call.created_ms else now,
        "transferred": now,
        "variables": dict(call.variables),
        "transcript": [{"role": line.role, "text": line.text, "at": line.at} for line in call.transcript],
    }
