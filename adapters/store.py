"""The call store: calls in Redis, committed one turn at a time by compare-and-set.

Takes any ``redis.asyncio`` client made with ``decode_responses=True`` (a server, a
cluster, or the embedded fakeredis), so every backend runs the same code: every
script and transaction touches the keys of one call's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypedDict

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from adapters.keys import (
    HISTORY_ENTRY,
    HOUR,
    MINUTE,
    RECORD_VALUE_MAX,
    SHARDS,
    CallField,
    CallKeys,
    Due,
    Keyspace,
)
from adapters.sealing import Sealer
from orchestrator.call import BOT, CALLER, Call, Line, Step
from orchestrator.config import Settings
from orchestrator.engine import Commit, Loaded, Receipt
from orchestrator.errors import StoreUnavailable
from orchestrator.scheduler import DueItem, OutboxEntry
from orchestrator.turn import Turn
from states import State

# Connection loss, timeouts, a read-only replica after failover, OOM, CLUSTERDOWN, ...:
# the turn is not applied and the channel's redelivery will try again.
log = logging.getLogger(__name__)

UNAVAILABLE = (RedisError, RedisClusterException, OSError)
KNOWN_STATES = frozenset(s.value for s in State)
MAX_LIFETIME_SECONDS = 86_400  # a live call's keys expire at the latest this long after it started


@contextlib.contextmanager
def unavailable_while(action: str) -> Iterator[None]:
    """Translate a Redis failure into StoreUnavailable, saying what was being done."""
    try:
        yield
    except UNAVAILABLE as e:
        raise StoreUnavailable(f"Redis unavailable while {action}: {e}") from e


# commit.lua's status codes: applied, applied earlier by this same token, duplicate, conflict.
_OUTCOMES = {1: Commit.APPLIED, 2: Commit.APPLIED, 0: Commit.DUPLICATE, -1: Commit.CONFLICT}


def load_script(name: str) -> str:
    return resources.files("adapters").joinpath(name).read_text(encoding="utf-8")


COMMIT_SCRIPT = load_script("commit.lua")
# commit.lua's KEYS, in order (its first line of code names them the same).
COMMIT_KEYS = (
    *CallKeys._fields,
    *("due", "was_index", "is_index", "feed", "minute", "hour", "was_node", "is_node", "nodes"),
)


class CommitArgs(TypedDict):
    """commit.lua's ARGV[1], by name (its header says what each is)."""

    version: int
    loaded_state: str
    loaded_node: str
    activity: str
    token: str
    ttl: int
    lifetime: int
    transcript_max: int
    history_max: int
    seen_max: int
    fields: dict[str, str]
    timer_ms: int
    timer: str
    outbox: str
    outbox_due: str
    outbox_grace_ms: int
    lines: list[str]
    steps: list[list[str]]
    counters: list[str]
    buckets: list[list[int]]
    feed_max: int
    feed_seconds: int


CLAIM_SCRIPT = load_script("claim.lua")
RESCHEDULE_SCRIPT = load_script("reschedule.lua")
RELEASE_SCRIPT = load_script("release.lua")
KEEP_SCRIPT = load_script("keep.lua")
PRUNE_SCRIPT = load_script("prune.lua")


@dataclass(slots=True, frozen=True)
class Retention:
    """How long call keys live and how much of a call is kept."""

    live_seconds: int = 86_400  # a live call's keys expire this long after its last commit ...
    # ... but never later than this long after it started: a call nobody ends, however
    # busy, still expires (0: no bound)
    max_live_seconds: int = MAX_LIFETIME_SECONDS
    ended_seconds: int = 86_400
    transcript_max: int = 50
    history_max: int = 1000
    # Activities remembered for de-duplication: at least those of the last ``seen_max``
    # turns (the channel redelivers within seconds); at most a quarter more (125 stays a
    # listpack under Redis' default hash-max-listpack-entries 128).
    seen_max: int = 100
    outbox_grace_ms: int = 20_000  # unacknowledged replies are re-sent after this long
    feed_max: int = 1000  # recent steps kept per shard for watchers (about, as MAXLEN ~)

    @property
    def feed_seconds(self) -> int:
        """How long a shard feed entry is kept: as long as any call's keys can be."""
        return max(self.live_seconds, self.ended_seconds)

    @property
    def live_bound_seconds(self) -> int:
        """The longest a live call's keys can outlast its entry into its state."""
        return min(self.live_seconds, self.max_live_seconds) if self.max_live_seconds else self.live_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(
            live_seconds=settings.CALL_IDLE_TTL_SECONDS,
            max_live_seconds=settings.CALL_MAX_LIFETIME_SECONDS,
            ended_seconds=settings.CALL_RETENTION_SECONDS,
            transcript_max=settings.TRANSCRIPT_MAX_ENTRIES,
            history_max=settings.HISTORY_MAX_ENTRIES,
            outbox_grace_ms=int(settings.OUTBOX_GRACE_SECONDS * 1000),
        )


class RedisCallStore:
    """Load and commit calls. One round trip each; a conflicting commit returns the call."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        keyspace: Keyspace,
        retention: Retention | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keyspace
        self.retention = retention or Retention()
        self.sealer = sealer or Sealer.from_setting(None)
        self._commit = redis.register_script(COMMIT_SCRIPT)
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._reschedule = redis.register_script(RESCHEDULE_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._keep = redis.register_script(KEEP_SCRIPT)
        self._prune = redis.register_script(PRUNE_SCRIPT)
        # Where each index's next prune reads from: entries of live calls older than the
        # cut-off stay, so each pass goes on past the last, and wraps round at the end.
        self._prune_offsets: dict[str, int] = {}

    async def load(self, conversation_id: str, activity_id: str = "") -> Loaded:
        """The call and its transcript, and whether ``activity_id`` was already applied."""
        keys = self.keys.call(conversation_id)
        with unavailable_while("loading a call"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.call)
                pipe.lrange(keys.transcript, 0, -1)
                pipe.get(keys.reference)  # a cluster's pipelines refuse MGET, even in one slot
                pipe.get(keys.variables)
                if activity_id:
                    pipe.hexists(keys.seen, activity_id)
                replies = await pipe.execute()
        record, lines, reference, variables = replies[:4]
        if activity_id and replies[4]:
            return Loaded(None, duplicate=True)
        if not record:
            return Loaded(None)
        return Loaded(self._call_from(conversation_id, with_moved(record, reference, variables), lines))

    async def commit(self, turn: Turn, activity_id: str = "", outbox: str = "") -> Receipt:
        """Write the turn if the call is still at the version it was loaded at, with
        ``outbox`` (the bot side's replies, opaque here) kept until acknowledged; if the
        call moved on, the receipt hands it back as it stands."""
        now_s = int(time.time())  # the counters' bucket: this instance's clock is close enough
        keys = self._commit_keys(turn, now_s)
        # Tells this commit from another of the same activity: 48 random bits, within one call.
        token = secrets.token_urlsafe(6)
        # Without an activity id the token itself is the key, so a command redis-py
        # retries after a lost reply is still recognised as this commit.
        key = activity_id or f"~{token}"
        args = self._commit_args(turn, key, token, now_s, outbox)
        with unavailable_while("committing a turn"):
            status, version, deadline, since, *current = await self._commit(keys=keys, args=args)
        outcome = _OUTCOMES[status]
        if outcome is Commit.APPLIED:
            return Receipt(outcome, int(version), int(deadline), int(since), key if outbox else "")
        if outcome is Commit.CONFLICT and current and current[0]:
            flat, lines, reference, variables = current
            record = with_moved(dict(zip(flat[::2], flat[1::2], strict=True)), reference, variables)
            return Receipt(outcome, current=self._call_from(turn.call.id, record, lines))
        return Receipt(outcome)

    async def keep(self, conversation_id: str, key: str, outbox: str, *, at_once: bool = True) -> None:
        """Put replies that were not sent in the call's outbox under ``key`` (the activity's,
        or "" for a new one), due for a re-send now, or after the grace (a send that timed
        out may have been said); with ``outbox`` "", only make the entry the commit kept
        under ``key`` due so. Nothing is kept for an expired call."""
        key = key or f"~{secrets.token_urlsafe(6)}"
        keys = self.keys.call(conversation_id)
        delay_ms = 0 if at_once else self.retention.outbox_grace_ms
        with unavailable_while("keeping unsent replies"):
            await self._keep(
                keys=[keys.call, keys.outbox, self.keys.due_for(conversation_id)],
                args=[key, outbox, Due.outbox(conversation_id, key), delay_ms],
            )

    async def acknowledge(self, conversation_id: str, key: str) -> None:
        """The replies kept under ``key`` reached the channel: forget them."""
        await self.acknowledge_many([(conversation_id, key)])

    async def acknowledge_many(self, sent: list[tuple[str, str]]) -> None:
        """Acknowledge (conversation id, outbox key) pairs in one pipelined round trip.

        Not a transaction: each pair's two deletions are idempotent, and a re-send that
        finds the outbox entry gone just forgets its schedule entry."""
        with unavailable_while("acknowledging sent replies"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for conversation_id, key in sent:
                    pipe.hdel(self.keys.call(conversation_id).outbox, key)
                    pipe.zrem(self.keys.due_for(conversation_id), Due.outbox(conversation_id, key))
                await pipe.execute()

    async def outbox_entry(self, conversation_id: str, key: str) -> OutboxEntry | None:
        """The replies the call's outbox keeps under ``key``, if any."""
        keys = self.keys.call(conversation_id)
        with unavailable_while("reading the outbox"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.outbox, key)
                pipe.hmget(keys.call, [CallField.REFERENCE, CallField.STATE, CallField.VERSION])
                pipe.get(keys.reference)
                entry, (legacy, state, version), reference = await pipe.execute()
        if not entry:
            return None
        reference = legacy or reference  # a record not yet moved: its field wins, as in with_moved
        kept_ms, _, payload = entry.partition(":")  # written as "<Redis ms>:<payload>"
        return OutboxEntry(reference or "", payload, state or "", int(version or 0), int(kept_ms))

    async def claim_due(self, limit: int, lease_ms: int) -> list[DueItem]:
        """The work due in any shard, now leased to this caller.

        One pipelined round trip claims from every shard (on a cluster, one concurrent
        script call per shard); ``limit`` is per shard.
        """
        with unavailable_while("claiming due work"):
            replies = await self.run_each(
                self._claim, [([self.keys.due(shard)], [limit, lease_ms]) for shard in range(SHARDS)]
            )
        items: list[DueItem] = []
        failed = 0
        for shard, reply in enumerate(replies):
            if isinstance(reply, BaseException):  # one bad shard must not stop the others
                failed += 1
                log.warning("claiming due work in shard %d failed: %r", shard, reply)
                continue
            now, *members = reply
            for member in members:
                try:
                    kind, conversation_id, key = Due.parse(member)
                except (ValueError, TypeError):
                    log.warning("shard %d: skipping a due member this version cannot read: %r", shard, member)
                    continue
                items.append(DueItem(kind, conversation_id, key, shard, member, int(now)))
        if failed == SHARDS:
            raise StoreUnavailable("Redis unavailable while claiming due work: every shard failed")
        return items

    async def release(self, items: list[DueItem], lease_ms: int) -> None:
        """Make claimed items due now again, those still under the lease we took."""
        with unavailable_while("releasing claimed work"):
            await self.run_each(
                self._release,
                [([self.keys.due(item.shard)], [item.member, item.now_ms + lease_ms]) for item in items],
            )

    async def run_each(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run a script once per (keys, args), in one pipelined round trip on a single Redis
        (on a cluster, whose pipelines cannot run scripts, concurrently). A failed call's
        reply is its exception, so one bad shard does not sink the others."""
        if isinstance(self.redis, RedisCluster):
            return await asyncio.gather(
                *(script(keys=keys, args=args) for keys, args in calls), return_exceptions=True
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute(raise_on_error=False))

    async def listed_nodes(self) -> list[tuple[int, str]]:
        """(shard, node) of every node index that holds a call, from the shards' sets of nodes."""
        with unavailable_while("reading the node indexes"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in range(SHARDS):
                    pipe.smembers(self.keys.nodes(shard))
                found = await pipe.execute()
        return [(shard, str(node)) for shard, names in enumerate(found) for node in sorted(names)]

    async def prune_index(self, batch: int = 200) -> int:
        """Reconcile the state and node indexes with the records: drop up to ``batch`` entries
        per index whose call expired without a commit to remove them. How many went."""
        now_ms = int(time.time() * 1000)
        keep = self.retention
        # An entry younger than its state's TTL most likely belongs to a live call (one near its
        # maximum lifetime may have expired sooner: its entry goes on a later pass).
        live = now_ms - 1000 * keep.live_bound_seconds
        ended = now_ms - 1000 * keep.ended_seconds
        # (index, the cut-off, and what prune.lua takes after the records for a node index:
        # the shard's set of nodes, and the node)
        indexes: list[tuple[str, int, list[str], list[str]]] = [
            (self.keys.state_index(shard, state), ended if state == State.ENDED else live, [], [])
            for shard in range(SHARDS)
            for state in KNOWN_STATES
        ]
        indexes += [
            (self.keys.node_index(shard, node), live, [self.keys.nodes(shard)], [node])
            for shard, node in await self.listed_nodes()
        ]
        offsets = self._prune_offsets
        with unavailable_while("reconciling the indexes"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for index, older_than, _, _ in indexes:
                    start = offsets.get(index, 0)
                    pipe.zrangebyscore(index, "-inf", older_than, start=start, num=batch, withscores=True)
                found = await pipe.execute()
            calls, read = [], []
            for (index, _, listing, node), entries in zip(indexes, found, strict=True):
                if len(entries) < batch:
                    offsets.pop(index, None)  # reached the end: from the head next time
                if entries:
                    keys = [index, *(self.keys.call(str(member)).call for member, _ in entries), *listing]
                    args = [*(v for member, score in entries for v in (member, int(score))), *node]
                    calls.append((keys, args))
                    read.append((index, len(entries)))
            removed = await self.run_each(self._prune, calls) if calls else []
        for (index, count), gone in zip(read, removed, strict=True):
            if count == batch:  # more may follow: skip what stayed (live calls)
                offsets[index] = offsets.get(index, 0) + count - (gone if isinstance(gone, int) else 0)
        return sum(n for n in removed if isinstance(n, int))

    async def forget(self, item: DueItem) -> None:
        with unavailable_while("updating the schedule"):
            await self.redis.zrem(self.keys.due(item.shard), item.member)

    async def reschedule_timer(self, conversation_id: str) -> None:
        """Schedule the call's timer at its deadline while it has one, else drop it."""
        keys = [self.keys.call(conversation_id).call, self.keys.due_for(conversation_id)]
        with unavailable_while("rescheduling a call's timer"):
            await self._reschedule(keys=keys, args=[Due.timer(conversation_id)])

    def _commit_keys(self, turn: Turn, now_s: int) -> list[str]:
        """``COMMIT_KEYS``, for this turn."""
        shard = self.keys.locate(turn.call.id)[0]
        return [
            *self.keys.call(turn.call.id),
            self.keys.due(shard),
            self.keys.state_index(shard, turn.loaded_state),
            self.keys.state_index(shard, turn.call.state),
            self.keys.feed(shard),
            *(self.keys.stats(shard, b, b.hash_of(b.bucket(now_s))) for b in (MINUTE, HOUR)),
            self.keys.node_index(shard, turn.loaded_node),
            self.keys.node_index(shard, turn.call.node),
            self.keys.nodes(shard),
        ]

    def _commit_args(self, turn: Turn, key: str, token: str, now_s: int, outbox: str = "") -> list[str]:
        """commit.lua's one argument: every name it reads (its header says what each is)."""
        call, keep = turn.call, self.retention
        # "" is not stored (commit.lua deletes the field): nor is a count or time of 0.
        fields: dict[str, str] = {
            CallField.ID: call.id,
            CallField.STATE: call.state,
            CallField.ATTEMPTS: _count(call.attempts),
            CallField.TARGET: call.target,
            CallField.DEADLINE: _count(call.deadline_ms),
            CallField.FAILURE: cut(call.failure),
            CallField.NODE: call.node,
            CallField.QUEUE: call.queue,
            CallField.TRIES: _count(call.tries),
            CallField.SILENCES: _count(call.silences),
            CallField.VARIABLES: self._sealed_variables(call),
            CallField.SHOWN: _compact(call.shown) if call.shown else "",
            CallField.HOLDING: f"{call.holds} {call.holding}" if call.holding else "",
            CallField.TRANSFERS: _count(call.transfers),
        }
        if turn.reference_changed:
            fields[CallField.REFERENCE] = call.reference
        version = call.version + 1
        args: CommitArgs = {
            "version": call.version,
            "loaded_state": turn.loaded_state,
            "loaded_node": turn.loaded_node,
            "activity": key,
            "token": token,
            "ttl": keep.ended_seconds if call.state == State.ENDED else keep.live_seconds,
            "lifetime": keep.max_live_seconds,
            "transcript_max": keep.transcript_max,
            "history_max": keep.history_max,
            "seen_max": keep.seen_max,
            "fields": fields,
            "timer_ms": int(turn.timer_seconds * 1000),
            "timer": Due.timer(call.id),
            "outbox": outbox,
            "outbox_due": Due.outbox(call.id, key) if outbox else "",
            "outbox_grace_ms": keep.outbox_grace_ms,
            "lines": [encode_line(line) for line in turn.lines],
            "steps": [
                [
                    step.trigger,
                    step.source,
                    step.dest,
                    step.reason,
                    encode_step(step, key, version, call.target if _dials(step) else ""),
                    step.node,
                ]
                for step in turn.steps
            ],
            "counters": [f"{o.outcome}:{o.queue}:{o.target}" for o in turn.outcomes],
            "buckets": [[b.bucket(now_s), b.keep_seconds] for b in (MINUTE, HOUR)],
            "feed_max": keep.feed_max,
            "feed_seconds": keep.feed_seconds,
        }
        return [_compact(args)]

    def _sealed_variables(self, call: Call) -> str:
        """The call's variables and a gather's entry so far, sealed ("" when there are none)."""
        if not (call.variables or call.entry):
            return ""
        data = {"variables": call.variables, "entry": call.entry, "confirming": call.confirming}
        return self.sealer.seal(_compact(data))

    def _call_from(self, conversation_id: str, record: dict[str, str], lines: list[str]) -> Call:
        state = record.get(CallField.STATE, State.BOT.value)
        if state not in KNOWN_STATES:
            # Written by a newer version (a rolling deploy) or by hand: refuse the turn, so
            # the channel redelivers it, perhaps to an instance that knows the state.
            raise StoreUnavailable(f"call {conversation_id!r} is in state {state!r}, unknown to this version")
        call = Call(
            id=conversation_id,
            state=state,
            version=int(record.get(CallField.VERSION, 0)),
            attempts=int(record.get(CallField.ATTEMPTS, 0)),
            target=record.get(CallField.TARGET, ""),
            deadline_ms=int(record.get(CallField.DEADLINE, 0)),
            failure=record.get(CallField.FAILURE, ""),
            reference=record.get(CallField.REFERENCE, ""),
            since_ms=int(record.get(CallField.SINCE, 0)),
            transcript=[decode_line(raw) for raw in lines],
            node=record.get(CallField.NODE, ""),
            queue=record.get(CallField.QUEUE, ""),
            tries=int(record.get(CallField.TRIES, 0)),
            silences=int(record.get(CallField.SILENCES, 0)),
            created_ms=int(record.get(CallField.CREATED, 0)),
            transfers=int(record.get(CallField.TRANSFERS, 0)),
        )
        if holding := record.get(CallField.HOLDING):
            holds, _, call.holding = holding.partition(" ")
            call.holds = int(holds)
        if shown := record.get(CallField.SHOWN):
            call.shown = json.loads(shown)
        if sealed := record.get(CallField.VARIABLES):
            opened = self.sealer.open(sealed)
            if opened is None:
                # Sealed with a key this instance lacks: VARIABLES_KEYS differs between
                # instances. The call goes on without what it had collected.
                log.error("call %s: its variables cannot be opened with VARIABLES_KEYS", conversation_id)
            else:
                data = json.loads(opened)
                call.variables = data["variables"]
                call.entry, call.confirming = data["entry"], data["confirming"]
        return call

    async def record(self, conversation_id: str) -> dict[str, str]:
        """The call's record (empty if the call is unknown) with every field, as views show it:
        those not stored at their defaults, the reference and sealed variables from their keys."""
        keys = self.keys.call(conversation_id)
        with unavailable_while("reading a call"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.call)
                pipe.get(keys.reference)
                pipe.get(keys.variables)
                record, reference, variables = await pipe.execute()
        if not record:
            return {}
        return {**RECORD_DEFAULTS, **with_moved(record, reference, variables)}

    async def transcript(self, conversation_id: str) -> list[Line]:
        """The call's transcript, oldest first: what views show, read without opening the
        call's sealed variables (which an operator's tools have no keys for, nor need)."""
        with unavailable_while("reading a transcript"):
            raw: list[str] = await self.redis.lrange(self.keys.call(conversation_id).transcript, 0, -1)  # type: ignore[assignment]
        return [decode_line(line) for line in raw]

    async def history(self, conversation_id: str) -> list[tuple[int, Step]]:
        """The call's history, oldest first, as (ms Redis time of its commit, step)."""
        keys = self.keys.call(conversation_id)
        with unavailable_while("reading history"):
            raw: list[str] = await self.redis.lrange(keys.history, 0, -1)  # type: ignore[assignment]
        return [(entry["at"], step_of(entry)) for entry in map(decode_step, raw)]

    async def ping(self, within: float = 2.0) -> bool:
        """Whether Redis answers (in time: a Redis that accepts and never replies is down)."""
        try:
            async with asyncio.timeout(within):
                return bool(await self.redis.ping())
        except (*UNAVAILABLE, TimeoutError):
            return False


# What a field not stored stands for (commit.lua stores no "", store.py no count or time of 0).
RECORD_DEFAULTS: dict[str, str] = {
    CallField.ATTEMPTS: "0",
    CallField.TARGET: "",
    CallField.DEADLINE: "0",
    CallField.FAILURE: "",
    CallField.REFERENCE: "",
    CallField.NODE: "",
    CallField.QUEUE: "",
    CallField.TRIES: "0",
    CallField.SILENCES: "0",
    CallField.VARIABLES: "",
    CallField.SHOWN: "",
    CallField.HOLDING: "",
    CallField.TRANSFERS: "0",
}
_CUT = "\u2026"  # an ellipsis ends a failure reason cut short


def _count(n: int) -> str:
    """A count or a time as stored: "" (not stored) for 0."""
    return str(n) if n else ""


def cut(text: str, limit: int = RECORD_VALUE_MAX) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes (a longer value would make the record a
    hashtable): cut at a character, ending with an ellipsis, when it is longer."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    room = limit - len(_CUT.encode("utf-8"))
    return encoded[:room].decode("utf-8", errors="ignore") + _CUT


def with_moved(record: dict[str, str], reference: str | None, variables: str | None) -> dict[str, str]:
    """The record with its reference and sealed variables from their own keys. A record
    written by an earlier version (a rolling deploy) holds them as fields: those win when
    not empty, as written after anything in the keys (every commit of this version deletes
    the fields)."""
    # An earlier version writes "variables" as "" when it knows of none (it never reads the
    # key): that hides nothing the key holds.
    if reference and not record.get(CallField.REFERENCE):
        record[CallField.REFERENCE] = reference
    if variables and not record.get(CallField.VARIABLES):
        record[CallField.VARIABLES] = variables
    return record


# Transcript lines are JSON arrays [role, at, text], the role by its initial and the time
# in epoch ms, because a call keeps tens of them (docs/redis-keys.md measures the size).
# An ``at`` that epoch ms would not give back exactly is kept as the string it is.
_ROLE_INITIALS = {CALLER: "c", BOT: "b"}
_ROLES = {initial: role for role, initial in _ROLE_INITIALS.items()}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COMPACT = (",", ":")


def _compact(value: Any) -> str:
    """JSON as stored: no spaces, and text as it is (not \\u-escaped)."""
    return json.dumps(value, ensure_ascii=False, separators=_COMPACT)


@functools.lru_cache(maxsize=4096)
def _second(epoch_seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_seconds))


def _iso(ms: int) -> str:
    """``orchestrator.call.timestamp(ms)`` in integers, because a load decodes every line
    (tests/test_store.py checks the two agree)."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


def _epoch_ms(at: str) -> int | str:
    """``at`` as epoch ms if ``_iso`` gives it back exactly, else ``at`` itself."""
    try:
        ms = (datetime.fromisoformat(at) - _EPOCH) // timedelta(milliseconds=1)
    except (ValueError, TypeError, OverflowError):  # not ISO 8601, or without a zone
        return at
    return ms if _iso(ms) == at else at


def encode_line(line: Line) -> str:
    """``[role initial, epoch ms, text]``; other roles, and times that do not round-trip, whole."""
    role = _ROLE_INITIALS.get(line.role, line.role)
    return _compact([role, _epoch_ms(line.at), line.text])


def decode_line(raw: str) -> Line:
    """A transcript line as ``encode_line`` wrote it."""
    role, at, text = json.loads(raw)
    return Line(_ROLES.get(role, role), text, _iso(at) if isinstance(at, int) else at)


# One history entry as stored (``adapters.keys.HISTORY_ENTRY`` positions), by field name
# ("from" is a keyword: hence the functional form).
HistoryEntry = TypedDict(
    "HistoryEntry",
    {
        "at": int,  # ms, Redis server time of the commit
        "trigger": str,
        "from": str,
        "to": str,
        "reason": str,
        "activity": str,
        "version": int,
        "target": str,
        "node": str,
    },
)


def _dials(step: Step) -> bool:
    """A step into transferring: its history entry names the number dialled."""
    return step.dest == State.TRANSFERRING != step.source


def encode_step(step: Step, activity: str, version: int, target: str) -> str:
    """A history entry but its time, which commit.lua puts first from Redis ``TIME``."""
    entry: list[Any] = [step.trigger, step.source, step.dest, step.reason, activity, version]
    if target or step.node:
        entry.append(target)
    if step.node:
        entry.append(step.node)
    return _compact(entry)


def decode_step(raw: str) -> HistoryEntry:
    """A history entry by field name; ``target`` and ``node`` are "" where none was stored."""
    values = json.loads(raw)
    values += [""] * (len(HISTORY_ENTRY) - len(values))
    return dict(zip(HISTORY_ENTRY, values, strict=True))  # type: ignore[return-value]


def step_of(entry: HistoryEntry) -> Step:
    return Step(entry["trigger"], entry["from"], entry["to"], entry["reason"], entry["target"], entry["node"])
