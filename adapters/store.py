"""The call store: calls in Redis, committed one turn at a time by compare-and-set.

Takes any ``redis.asyncio`` client made with ``decode_responses=True`` (a real server
or the embedded fakeredis), so every backend runs the same code.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.keys import CallField, Keyspace
from adapters.keys import HistoryField as H
from orchestrator.call import Call, Line, Step
from orchestrator.engine import Commit, Loaded
from orchestrator.errors import StoreUnavailable
from orchestrator.turn import Turn
from states import State

# Connection loss, timeouts, a read-only replica after failover, OOM, CLUSTERDOWN, ...:
# the turn is not applied and the channel's redelivery will try again.
UNAVAILABLE = (RedisError, OSError)
KNOWN_STATES = frozenset(s.value for s in State)
# commit.lua's status codes: applied, applied earlier by this same token, duplicate, conflict.
_OUTCOMES = {1: Commit.APPLIED, 2: Commit.APPLIED, 0: Commit.DUPLICATE, -1: Commit.CONFLICT}
COMMIT_SCRIPT = resources.files("adapters").joinpath("commit.lua").read_text(encoding="utf-8")


@dataclass(slots=True, frozen=True)
class Retention:
    """How long call keys live and how much of a call is kept."""

    live_seconds: int = 86_400  # refreshed by every commit: a call nobody ends still expires
    ended_seconds: int = 86_400
    transcript_max: int = 50
    history_max: int = 1000


class RedisCallStore:
    """Load and commit calls. One round trip each."""

    def __init__(self, redis: Redis, keyspace: Keyspace, retention: Retention | None = None) -> None:
        self.redis = redis
        self.keys = keyspace
        self.retention = retention or Retention()
        self._commit = redis.register_script(COMMIT_SCRIPT)

    async def load(self, conversation_id: str, activity_id: str = "") -> Loaded:
        """The call and its transcript, and whether ``activity_id`` was already applied."""
        keys = self.keys.call(conversation_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.call)
                pipe.lrange(keys.transcript, 0, -1)
                if activity_id:
                    pipe.hexists(keys.seen, activity_id)
                replies = await pipe.execute()
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"Redis unavailable while loading a call: {e}") from e
        record, lines = replies[0], replies[1]
        if activity_id and replies[2]:
            return Loaded(None, duplicate=True)
        if not record:
            return Loaded(None)
        return Loaded(_call_from(conversation_id, record, lines))

    async def commit(self, turn: Turn, activity_id: str = "") -> Commit:
        """Write the turn if the call is still at the version it was loaded at."""
        call = turn.call
        keys = self.keys.call(call.id)
        token = uuid.uuid4().hex
        # Without an activity id the token itself is the key, so a command redis-py
        # retries after a lost reply is still recognised as this commit.
        args = self._commit_args(turn, activity_id or f"~{token}", token)
        try:
            status, version, deadline = await self._commit(keys=list(keys), args=args)
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"Redis unavailable while committing a turn: {e}") from e
        outcome = _OUTCOMES[status]
        if outcome is Commit.APPLIED:
            call.version = int(version)
            call.deadline_ms = int(deadline)
        return outcome

    def _commit_args(self, turn: Turn, dedupe_key: str, token: str) -> list[Any]:
        call, keep = turn.call, self.retention
        ended = call.state == State.ENDED
        fields: dict[str, Any] = {
            CallField.ID: call.id,
            CallField.STATE: call.state,
            CallField.ATTEMPTS: call.attempts,
            CallField.TARGET: call.target,
            CallField.DEADLINE: call.deadline_ms,
            CallField.FAILURE: call.failure,
        }
        if turn.reference_changed:
            fields[CallField.REFERENCE] = call.reference
        args: list[Any] = [
            call.version,
            dedupe_key,
            token,
            keep.ended_seconds if ended else keep.live_seconds,
            keep.transcript_max,
            keep.history_max,
            int(turn.watchdog_seconds * 1000),
            len(fields),
        ]
        for name, value in fields.items():
            args += [name, value]
        args.append(len(turn.lines))
        args += [encode_line(line) for line in turn.lines]
        args.append(len(turn.steps))
        for step in turn.steps:
            args += [step.trigger, step.source, step.dest, step.reason]
        return args

    async def history(self, conversation_id: str) -> list[tuple[str, Step]]:
        """The call's history, oldest first, as (stream entry id, step)."""
        keys = self.keys.call(conversation_id)
        try:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(keys.history)  # type: ignore[assignment]
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"Redis unavailable while reading history: {e}") from e
        return [
            (entry_id, Step(f[H.TRIGGER], f[H.FROM], f[H.TO], f.get(H.REASON, ""))) for entry_id, f in entries
        ]

    async def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(await self.redis.ping())
        except UNAVAILABLE:
            return False


def encode_line(line: Line) -> str:
    return json.dumps({"role": line.role, "text": line.text, "at": line.at}, ensure_ascii=False)


def decode_line(raw: str) -> Line:
    data = json.loads(raw)
    return Line(data["role"], data["text"], data["at"])


def _call_from(conversation_id: str, record: dict[str, str], lines: list[str]) -> Call:
    state = record.get(CallField.STATE, State.BOT.value)
    if state not in KNOWN_STATES:
        # Written by a newer version (a rolling deploy) or by hand: refuse the turn, so
        # the channel redelivers it, perhaps to an instance that knows the state.
        raise StoreUnavailable(f"call {conversation_id!r} is in state {state!r}, unknown to this version")
    return Call(
        id=conversation_id,
        state=state,
        version=int(record.get(CallField.VERSION, 0)),
        attempts=int(record.get(CallField.ATTEMPTS, 0)),
        target=record.get(CallField.TARGET, ""),
        deadline_ms=int(record.get(CallField.DEADLINE, 0)),
        failure=record.get(CallField.FAILURE, ""),
        reference=record.get(CallField.REFERENCE, ""),
        transcript=[decode_line(raw) for raw in lines],
    )
