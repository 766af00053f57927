"""The turn loop: load the call, run the machine, commit atomically, hand back the effects.

Nothing is sent from here: the caller sends the turn's effects only after the commit
has succeeded, so a turn that loses a race, or meets a Redis outage, says nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from orchestrator.actions import ActionFunction, run_action
from orchestrator.call import Call, timestamp
from orchestrator.callflow import Action, CallFlow
from orchestrator.errors import CommitConflict, StoreUnavailable
from orchestrator.events import CallStarted, Event
from orchestrator.metrics import Metrics
from orchestrator.turn import ActionOutcome, PoolRelease, Turn, TurnRunner, lease_key
from states import State

log = logging.getLogger(__name__)

MAX_COMMIT_ATTEMPTS = 64


class Commit(Enum):
    """How a commit ended."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # the activity was already applied by another delivery
    CONFLICT = "conflict"  # the call moved on since it was loaded: reload and rerun


@dataclass(slots=True, frozen=True)
class Receipt:
    """How a commit ended. Applied: what Redis made of the call (its version, the watchdog's
    deadline, when it entered its state, in Redis time) and the outbox key its replies wait
    under ("" if none); a conflict: the call as it now stands (None: no such call)."""

    outcome: Commit
    version: int = 0
    deadline_ms: int = 0
    since_ms: int = 0
    outbox_key: str = ""
    current: Call | None = None


@dataclass(slots=True, frozen=True)
class Replies:
    """A turn's effects as the bot side sends them, and as the outbox keeps them (opaque
    here: "" when the replies need not be kept)."""

    activities: list[Any]
    outbox: str = ""


@dataclass(slots=True, frozen=True)
class Loaded:
    """A call as loaded for a turn (None if unknown), and whether the activity was seen."""

    call: Call | None
    duplicate: bool = False


class CallStore(Protocol):
    """Where calls live (``adapters.store.RedisCallStore``): all the engine needs of it."""

    async def load(self, conversation_id: str, activity_id: str = "") -> Loaded: ...

    async def commit(self, turn: Turn, activity_id: str = "", outbox: str = "") -> Receipt: ...


class Leased(Protocol):
    """A number leased from a pool (``adapters.pool.Lease``)."""

    @property
    def number(self) -> str: ...

    @property
    def fresh(self) -> bool: ...  # it reclaimed another call's lapsed lease


class NumberPools(Protocol):
    """Where warm transfers lease their numbers (``adapters.pool.PoolStore``)."""

    async def lease(
        self,
        pool: str,
        numbers: list[str],
        conversation_id: str,
        lease_key: str,
        seconds: float,
        context: str = "",
        previous: str = "",
    ) -> Leased | None: ...

    async def release(self, pool: str, number: str, conversation_id: str, lease_key: str) -> int | None: ...

    async def settle(
        self, pool: str, number: str, conversation_id: str, lease_key: str, seconds: float
    ) -> int | None: ...


@dataclass(slots=True, frozen=True)
class Leasing:
    """What a lease this activity asked for got (None: the pool was exhausted), and the
    context it stored."""

    got: Leased | None
    context: Mapping[str, Any]


Render = Callable[[Turn], Replies]
# Told of each warm transfer that starts: an id for it (the same on every delivery) and
# its context document, with the number dialled (the optional push, ``adapters.push``).
Notify = Callable[[str, Mapping[str, Any]], None]


def dials(call: Call, key: str, number: str) -> bool:
    """Whether the committed ``call``'s current transfer is the one leased ``number`` under ``key``."""
    return number == call.target and key == lease_key(call.transfers)


class CallCache:
    """The calls this instance committed last: a turn on one of them needs no load, so an
    ordinary turn is one round trip (the commit) instead of two.

    A copy goes stale when another instance commits the call (no sticky load balancing
    is assumed); the commit's compare-and-set catches that and hands back the call as it
    stands, so a stale copy costs what a load would have. Bounded, least recently used
    out first; ``size`` 0 turns it off.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._calls: OrderedDict[str, Call] = OrderedDict()
        self.hits = 0  # turns that started from a cached copy
        self.stale = 0  # ... of which the copy was out of date (another instance moved on)

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, conversation_id: str) -> Call | None:
        call = self._calls.get(conversation_id)
        if call is not None:
            self._calls.move_to_end(conversation_id)
            self.hits += 1
        return call

    def put(self, call: Call) -> None:
        """Keep ``call`` as committed; an ended call goes (nothing more will happen to it)."""
        if call.state == State.ENDED or not self.size:
            self._calls.pop(call.id, None)
            return
        self._calls[call.id] = call
        self._calls.move_to_end(call.id)
        if len(self._calls) > self.size:
            self._calls.popitem(last=False)


class Engine:
    """Applies events to calls, exactly once per activity id, with no lost updates."""

    def __init__(
        self,
        store: CallStore,
        flow: CallFlow,
        *,
        transcript_max: int = 50,
        metrics: Metrics | None = None,
        cache_size: int = 4096,
        clock: Callable[[], datetime] | None = None,
        actions: Mapping[str, ActionFunction] | None = None,
        pools: NumberPools | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.store = store
        self.runner = TurnRunner(flow, transcript_max=transcript_max, clock=clock)
        self.actions = dict(actions or {})
        self.pools = pools
        self.notify = notify
        self.cache = CallCache(cache_size)
        self.metrics = metrics
        self.conflicts = 0  # commits lost to a concurrent turn (and rerun), since start
        self.duplicates = 0  # deliveries of an activity already applied, since start
        # Warm transfers, per pool, since start: numbers leased to committed transfers,
        # transfers that found the pool exhausted, and lapsed leases of others reclaimed.
        self.leases: Counter[str] = Counter()
        self.exhausted: Counter[str] = Counter()
        self.lapses: Counter[str] = Counter()
        self._giving_back: set[asyncio.Task[None]] = set()

    async def handle(
        self,
        conversation_id: str,
        event: Event,
        *,
        activity_id: str = "",
        reference: str = "",
        caller: str = "",
        render: Render | None = None,
        only_if_changed: bool = False,
    ) -> Turn | None:
        """Apply one event; None if it was already applied (a redelivery), or, with
        ``only_if_changed`` (a timer), if it changes nothing or the call is unknown.

        ``caller`` is the caller's id (``from.id``): their number is redacted from what
        they say. ``render`` turns the turn's effects into the activities to send, and, for
        replies that must arrive (``Turn.must_arrive``), the outbox entry committed with it.
        """
        # Where the call comes from: a timer always loads (it may do nothing, and must not
        # decide that on a stale copy); a turn starts from the cached copy, or, for a call
        # that is starting, from a new call, and the commit says if that was wrong.
        call: Call | None = None
        if not only_if_changed:
            call = self.cache.get(conversation_id)
            if call is None and isinstance(event, CallStarted):
                call = Call(id=conversation_id)
        guessed = call is not None
        # What the user's code returned this activity, by what it was given: a rerun after a
        # conflict that reaches it with the same node, variables and input reuses it.
        ran: dict[tuple[str, frozenset[tuple[str, str]], str], ActionOutcome] = {}
        # Numbers leased by this activity's runs, by (pool, lease key): None, exhausted.
        leased: dict[tuple[str, str], Leasing] = {}
        for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
            if call is None:
                loaded = await self.store.load(conversation_id, activity_id)
                if loaded.duplicate:
                    self.duplicates += 1
                    return None
                call = loaded.call or Call(id=conversation_id)
            turn = self.runner.run(call, event, now=timestamp(), reference=reference, caller=caller)
            # Outside the commit: leasing a warm transfer's number (idempotent by the call's
            # attempt, so a rerun gets the same number), and the user's code, bounded.
            while turn.action or turn.lease:
                if guessed:
                    # The user's code runs once per activity, and a number is leased for the
                    # transfer the call is really at: a cached copy can tell neither a
                    # redelivery nor a stale attempt, so read the call (and whether the
                    # activity was applied) first.
                    break
                if turn.lease is not None:
                    number = await self._lease(conversation_id, turn, leased)
                    turn = self.runner.after_lease(turn, number)
                    continue
                node = self.runner.flow.nodes[turn.action]
                assert isinstance(node, Action)
                given = (turn.action, frozenset(turn.call.variables.items()), turn.caller_input)
                if given not in ran:
                    ran[given] = await run_action(self.actions[node.action], node, turn)
                turn = self.runner.after_action(turn, ran[given])
            if turn.action or turn.lease:
                call, guessed = None, False
                continue
            if only_if_changed and (turn.is_empty or call.is_new):
                self._give_back(conversation_id, turn, leased)
                return None
            outbox = ""
            if render is not None and turn.effects:
                rendered = render(turn)
                turn.replies, outbox = rendered.activities, rendered.outbox
            receipt = await self.store.commit(turn, activity_id, outbox)
            outcome = receipt.outcome
            if outcome is Commit.APPLIED:
                turn.call.version = receipt.version
                turn.call.deadline_ms = receipt.deadline_ms
                turn.call.since_ms = receipt.since_ms
                if receipt.version == 1:
                    turn.call.created_ms = receipt.since_ms
                turn.outbox_key = receipt.outbox_key
                self.cache.put(turn.call)
                self._leases_committed(turn, leased)
                self._give_back(conversation_id, turn, leased)
                if self.metrics is not None:
                    self.metrics.applied(turn)
                for step in turn.steps:
                    log.info(
                        "call %s v%d: %s %s -> %s (%s)",
                        conversation_id,
                        turn.call.version,
                        step.trigger,
                        step.source,
                        step.dest,
                        step.reason,
                    )
                return turn
            if outcome is Commit.DUPLICATE:
                self.duplicates += 1
                # Applied meanwhile by another delivery of the same activity, which leased
                # with the same keys: what this one leased is that one's (or lapses).
                return None
            call = receipt.current or Call(id=conversation_id)
            if guessed:  # the cached (or new) copy was out of date: no race, no back-off
                guessed = False
                self.cache.stale += 1
                continue
            self.conflicts += 1
            # Back off with jitter so turns racing on one call spread out.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        raise CommitConflict(conversation_id, MAX_COMMIT_ATTEMPTS)

    # --- warm transfers' numbers --------------------------------------------------------------

    async def _lease(
        self, conversation_id: str, turn: Turn, leased: dict[tuple[str, str], Leasing]
    ) -> str | None:
        request = turn.lease
        assert request is not None
        if self.pools is None:
            raise RuntimeError(
                f"the call flow leases from pool {request.pool!r}, but the engine has no pools"
            )
        got = await self.pools.lease(
            request.pool,
            self.runner.flow.pools[request.pool].numbers,
            conversation_id,
            request.key,
            request.seconds,
            json.dumps(request.context, separators=(",", ":")),
            request.previous,
        )
        leased[(request.pool, request.key)] = Leasing(got, request.context)
        return None if got is None else got.number

    def _leases_committed(self, turn: Turn, leased: Mapping[tuple[str, str], Leasing]) -> None:
        """Count the committed turn's leases, and push the context of the transfer it started."""
        call = turn.call
        for (pool, key), leasing in leased.items():
            got = leasing.got
            if got is None:
                self.exhausted[pool] += 1
            elif dials(call, key, got.number):
                self.leases[pool] += 1
                self.lapses[pool] += got.fresh
                if self.notify is not None:
                    self.notify(f"{call.id}:{key}", {**leasing.context, "number": got.number})

    def _give_back(self, conversation_id: str, turn: Turn, leased: Mapping[tuple[str, str], Leasing]) -> None:
        """Release, in the background, the numbers the committed turn gave back, and those
        this activity leased but did not commit (a rerun went another way): release is the
        fast path, and a lease that is not released lapses."""
        call = turn.call
        releases: list[PoolRelease] = list(turn.releases)
        for (pool, key), leasing in leased.items():
            got = leasing.got
            if got is not None and not (call.state != State.ENDED and dials(call, key, got.number)):
                releases.append(PoolRelease(pool, got.number, key))
        if not releases or self.pools is None:
            return
        task = asyncio.create_task(self._release(conversation_id, releases), name="pool-release")
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _release(self, conversation_id: str, releases: Sequence[PoolRelease]) -> None:
        assert self.pools is not None
        for release in releases:
            try:
                if release.grace_seconds > 0:
                    await self.pools.settle(
                        release.pool, release.number, conversation_id, release.key, release.grace_seconds
                    )
                else:
                    await self.pools.release(release.pool, release.number, conversation_id, release.key)
            except StoreUnavailable as e:
                log.warning(
                    "call %s: pool %s number not given back (it lapses): %s", conversation_id, release.pool, e
                )

    async def settled(self) -> None:
        """Wait for the numbers being given back (tests, shutdown)."""
        while self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)
