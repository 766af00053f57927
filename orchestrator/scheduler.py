"""Due work kept in Redis, done by whichever instance claims it first.

Two kinds: a call's **timer** (a transferring call's no-answer watchdog: the Telephony
channel redials an unanswered agent forever and never says so; a node's no-input or
inter-digit timeout; a hang-up after its goodbye), and the **re-send** of replies
a call's outbox keeps because they were never acknowledged as sent (the instance died,
or the channel was unreachable). Work is claimed with a lease in Redis time; a claimer that
dies lets the lease lapse and another instance takes the work. Firing is a normal
turn, fenced by the call's version and deadline, so it takes effect exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.engine import Engine, Replies
from orchestrator.errors import StoreUnavailable
from orchestrator.events import TimerExpired
from orchestrator.turn import Turn
from states import State

log = logging.getLogger(__name__)

TIMER = "timer"
OUTBOX = "outbox"


# A proactive send that takes longer is given up (and retried later): longer than the
# transport's own bounds (a socket's 5 s, routed to another instance 6 s), so they end first.
SEND_SECONDS = 8.0
MAX_KEPT_MS = 10 * 60 * 1000  # outbox entries older than this are dropped, not sent
PRUNE_SECONDS = 60.0  # how often an instance reconciles the state and node indexes with the records


@dataclass(slots=True, frozen=True)
class DueItem:
    """One claimed piece of work."""

    kind: str  # TIMER or OUTBOX
    conversation_id: str
    key: str  # for OUTBOX: the outbox key
    shard: int
    member: str  # as stored in the schedule
    now_ms: int  # Redis time of the claim, on the node holding the shard


@dataclass(slots=True, frozen=True)
class OutboxEntry:
    """Replies a call's outbox keeps, and what the call looks like now."""

    reference: str
    payload: str  # opaque here: the bot side wrote it and reads it back
    state: str
    version: int  # the call's, now
    kept_ms: int  # Redis time they were put in the outbox


class ScheduleStore(Protocol):
    """The schedule side of the call store (``adapters.store.RedisCallStore``)."""

    async def claim_due(self, limit: int, lease_ms: int) -> list[DueItem]: ...

    async def release(self, items: list[DueItem], lease_ms: int) -> None: ...

    async def forget(self, item: DueItem) -> None: ...

    async def reschedule_timer(self, conversation_id: str) -> None: ...

    async def prune_index(self) -> int: ...

    async def outbox_entry(self, conversation_id: str, key: str) -> OutboxEntry | None: ...

    async def acknowledge(self, conversation_id: str, key: str) -> None: ...

    async def acknowledge_many(self, sent: list[tuple[str, str]]) -> None: ...


class Channel(Protocol):
    """How the scheduler speaks to a call (``adapters.bot.CallBot``)."""

    def render(self, turn: Turn) -> Replies: ...

    async def send(self, reference: str, replies: list[Any]) -> None: ...

    def from_outbox(self, payload: str, version: int, *, ended: bool = False) -> list[Any]:
        """The replies of an outbox entry still worth saying to the call at ``version``
        (``ended``: the call has ended, so only the bot's own hang-up is)."""
        ...


def stop_if_cancelled() -> None:
    """End a forever loop whose task was cancelled even though the cancellation was lost.

    On Python 3.11 ``asyncio.wait_for``, which redis-py (socket timeouts) and fakeredis
    use, drops a cancellation that arrives as its inner call completes (CPython
    gh-86296): the command returns normally, and a loop that only ever awaits would
    poll on forever, hanging shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
        per_shard: int = 8,
        concurrency: int = 64,
    ) -> None:
        self.engine, self.store, self.channel = engine, store, channel
        self.poll_seconds = poll_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self.per_shard = per_shard
        self._gate = asyncio.Semaphore(concurrency)
        self._held: dict[DueItem, float] = {}  # claimed, not done -> when claimed (monotonic)
        self._sent: list[tuple[str, str]] = []  # (call, outbox key) sent this round, to acknowledge
        self.fired = 0  # timers that changed a call, since start
        self.resent = 0  # outbox entries sent again, since start

    async def run(self) -> None:
        """Poll until cancelled; trouble only pauses it, with a growing back-off."""
        pruning = asyncio.create_task(self._prune_forever(), name="prune")
        try:
            await self._poll_forever()
        finally:
            pruning.cancel()
            await asyncio.gather(pruning, return_exceptions=True)  # ended, not left pending

    async def _prune_forever(self) -> None:
        """Reconcile the state and node indexes with the records now and then, beside the
        polling (a slow prune must not delay a timer)."""
        await asyncio.sleep(PRUNE_SECONDS * random.random())
        while True:
            stop_if_cancelled()
            try:
                if pruned := await self.store.prune_index():
                    log.info("pruned %d index entries of expired calls", pruned)
            except Exception as e:
                log.warning("pruning the indexes failed (tried again later): %r", e)
            await asyncio.sleep(PRUNE_SECONDS * random.uniform(0.75, 1.25))

    async def _poll_forever(self) -> None:
        pause = self.poll_seconds
        while True:
            stop_if_cancelled()
            try:
                claimed = await self.poll()
                pause = self.poll_seconds
            except Exception as e:
                claimed = 0
                pause = min(pause * 2, 5.0)
                log.warning("scheduler paused %.1f s: %r", pause, e)
            if not claimed:
                await asyncio.sleep(pause * random.uniform(0.75, 1.25))

    async def poll(self) -> int:
        """Claim and do one round of due work; how many items were claimed."""
        items = await self.store.claim_due(self.per_shard, self.lease_ms)
        now = time.monotonic()
        self._held.update((item, now) for item in items)
        await asyncio.gather(*(self._do(item) for item in items))
        await self._acknowledge()
        return len(items)

    async def _acknowledge(self) -> None:
        """Acknowledge the round's sent replies together: one round trip, not one each
        (10,000 watchdogs due at once are 10,000 acknowledgements)."""
        sent, self._sent = self._sent, []
        if not sent:
            return
        try:
            await self.store.acknowledge_many(sent)
        except StoreUnavailable as e:
            # Sent but still in the outbox: they are sent again, and the replyKey lets a
            # receiver drop the repeat.
            log.warning("%d sent replies not acknowledged: %s", len(sent), e)

    async def release(self) -> None:
        """Hand back claimed work not done yet (on shutdown), for others to take now."""
        held, self._held = list(self._held), {}
        if held:
            await self.store.release(held, self.lease_ms)
            log.info("released %d claimed items", len(held))

    async def _do(self, item: DueItem) -> None:
        async with self._gate:
            claimed = self._held.get(item, time.monotonic())
            # Waited so long for a slot that the lease is nearly up: another instance may
            # take it now, so leave it rather than do it twice.
            if (time.monotonic() - claimed) * 1000 < self.lease_ms * 0.8:
                try:
                    if item.kind == TIMER:
                        await self._timer(item)
                    elif item.kind == OUTBOX:
                        await self._resend(item)
                except (ConnectionError, TimeoutError) as e:
                    # Nobody to send to now (no socket holds the call, or the channel did
                    # not answer): expected in a failover, so one line, no traceback.
                    log.warning(
                        "due %s for call %s not sent (%s); it comes due again",
                        item.kind,
                        item.conversation_id,
                        e,
                    )
                except Exception:
                    # The lease lapses and the item is claimed again: at least once.
                    log.exception(
                        "due %s for call %s failed; it comes due again", item.kind, item.conversation_id
                    )
            # Not in a finally: work cancelled by shutdown stays held, to be released.
            self._held.pop(item, None)

    async def _timer(self, item: DueItem) -> None:
        turn = await self.engine.handle(
            item.conversation_id,
            TimerExpired(item.now_ms),
            render=self.channel.render,
            only_if_changed=True,
        )
        if turn is None:  # not due yet, the attempt already ended, or the call is gone
            await self.store.reschedule_timer(item.conversation_id)
            return
        self.fired += 1
        if turn.replies:
            await self._send(item.conversation_id, turn.call.reference, turn.replies, turn.outbox_key)

    async def _resend(self, item: DueItem) -> None:
        entry = await self.store.outbox_entry(item.conversation_id, item.key)
        if entry is None:  # acknowledged meanwhile, or expired with the call
            await self.store.forget(item)
            return
        stale = item.now_ms - entry.kept_ms > MAX_KEPT_MS
        if stale or not entry.reference:
            # Nobody to speak to any more: drop the replies rather than retry forever.
            log.warning(
                "call %s: dropping the outbox entry %s (too old or no reference)",
                item.conversation_id,
                item.key,
            )
            await self.store.acknowledge(item.conversation_id, item.key)
            return
        ended = entry.state == State.ENDED
        replies = self.channel.from_outbox(entry.payload, entry.version, ended=ended)
        if not replies:
            log.info(
                "call %s: dropping the outbox entry %s (%s)",
                item.conversation_id,
                item.key,
                "the call ended" if ended else "the call moved on",
            )
            await self.store.acknowledge(item.conversation_id, item.key)
            return
        await self._send(item.conversation_id, entry.reference, replies, item.key)
        self.resent += 1
        log.info("call %s: re-sent the outbox entry %s", item.conversation_id, item.key)

    async def _send(self, conversation_id: str, reference: str, replies: list[Any], key: str) -> None:
        """Speak to the call; the outbox entry under ``key`` (if any) is acknowledged at the
        end of the round."""
        async with asyncio.timeout(SEND_SECONDS):
            await self.channel.send(reference, replies)
        if key:
            self._sent.append((conversation_id, key))
