"""Due work kept in Redis, done by whichever instance claims it first.

Two kinds: the no-answer **watchdog** of a transferring call (the Telephony channel
redials an unanswered agent forever and never says so), and the **re-delivery** of
replies that were committed but never acknowledged as sent (the instance died, or the
channel was unreachable). Work is claimed with a lease in Redis time; a claimer that
dies lets the lease lapse and another instance takes the work. Firing is a normal
turn, fenced by the call's version and deadline, so it takes effect exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.engine import Engine
from orchestrator.errors import StoreUnavailable
from orchestrator.events import WatchdogExpired
from orchestrator.turn import Turn

log = logging.getLogger(__name__)

WATCHDOG = "watchdog"
DELIVERY = "delivery"


@dataclass(slots=True, frozen=True)
class DueItem:
    """One claimed piece of work."""

    kind: str  # WATCHDOG or DELIVERY
    conversation_id: str
    key: str  # for DELIVERY: the outbox entry
    shard: int
    member: str  # as stored in the schedule


class ScheduleStore(Protocol):
    """The schedule side of the call store (``adapters.store.RedisCallStore``)."""

    shards: int

    async def claim_due(self, limit: int, lease_ms: int) -> tuple[int, list[DueItem]]: ...

    async def release(self, items: list[DueItem]) -> None: ...

    async def forget(self, item: DueItem) -> None: ...

    async def reschedule_watchdog(self, conversation_id: str) -> None: ...

    async def parked(self, conversation_id: str, key: str) -> tuple[str, str] | None: ...

    async def acknowledge(self, conversation_id: str, key: str) -> None: ...


class Channel(Protocol):
    """How the scheduler speaks to a call (``adapters.bot.CallBot``)."""

    def render(self, turn: Turn) -> list[Any]: ...

    async def send(self, reference: str, replies: list[Any]) -> None: ...

    def unpark(self, payload: str) -> list[Any]: ...


class Scheduler:
    """Polls every shard's schedule, claims what is due and does it."""

    def __init__(
        self,
        engine: Engine,
        store: ScheduleStore,
        channel: Channel,
        *,
        poll_seconds: float = 0.2,
        lease_seconds: float = 15.0,
        batch: int = 500,
        concurrency: int = 64,
    ) -> None:
        self.engine, self.store, self.channel = engine, store, channel
        self.poll_seconds = poll_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self.batch = batch
        self._gate = asyncio.Semaphore(concurrency)
        self._held: set[DueItem] = set()
        self.fired = 0  # watchdogs that failed a transfer, since start
        self.redelivered = 0  # parked replies sent again, since start

    async def run(self) -> None:
        """Poll until cancelled; a Redis outage only pauses it."""
        while True:
            try:
                done = await self.poll()
            except StoreUnavailable as e:
                log.warning("scheduler paused: %s", e)
                done = 0
            if done < self.batch:
                await asyncio.sleep(self.poll_seconds * random.uniform(0.75, 1.25))

    async def poll(self) -> int:
        """Claim and do one batch of due work; how many items were claimed."""
        now_ms, items = await self.store.claim_due(self.batch, self.lease_ms)
        self._held.update(items)
        await asyncio.gather(*(self._do(now_ms, item) for item in items))
        return len(items)

    async def release(self) -> None:
        """Hand back claimed work not done yet (on shutdown), for others to take now."""
        held, self._held = list(self._held), set()
        if held:
            await self.store.release(held)
            log.info("released %d claimed items", len(held))

    async def _do(self, now_ms: int, item: DueItem) -> None:
        async with self._gate:
            try:
                if item.kind == WATCHDOG:
                    await self._watchdog(now_ms, item)
                else:
                    await self._redeliver(item)
            except Exception:
                # The lease lapses and the item is claimed again: at least once.
                log.exception(
                    "due %s for call %s failed; it will be retried", item.kind, item.conversation_id
                )
            # Not in a finally: work cancelled by shutdown stays held, to be released.
            self._held.discard(item)

    async def _watchdog(self, now_ms: int, item: DueItem) -> None:
        turn = await self.engine.handle(
            item.conversation_id, WatchdogExpired(now_ms), render=self.channel.render
        )
        if turn is None:  # not due yet, the attempt already ended, or the call is gone
            await self.store.reschedule_watchdog(item.conversation_id)
            return
        self.fired += 1
        if turn.replies:
            await self.channel.send(turn.call.reference, turn.replies)
            if turn.delivery_key:
                await self.store.acknowledge(item.conversation_id, turn.delivery_key)

    async def _redeliver(self, item: DueItem) -> None:
        parked = await self.store.parked(item.conversation_id, item.key)
        if parked is None:  # acknowledged meanwhile, or expired with the call
            await self.store.forget(item)
            return
        reference, payload = parked
        await self.channel.send(reference, self.channel.unpark(payload))
        await self.store.acknowledge(item.conversation_id, item.key)
        self.redelivered += 1
        log.info("call %s: re-sent parked replies %s", item.conversation_id, item.key)
