"""Number pools for warm transfers: a number leased to one call at a time, on every instance.

A transfer to a pooled queue dials a number leased from the pool, and the agent side
looks the call up by the number it sees dialled. Each operation is one run of
pool_lease.lua on the pool's keys, which share one hash slot.

Design:

- The lease is taken before the call's commit, not inside it: the call's keys and the
  pool's are in different Cluster slots, so no one script can write both.
- That is safe because a lease is idempotent by (conversation id, lease key): a turn that
  is redelivered, or rerun after a commit conflict, leases again with the same key (the
  call's transfer attempt) and gets the number it already holds, not a second one.
- A lease lapses at its ``until`` (Redis time), and a lapsed number is leased again: an
  instance that dies between lease and release, or whose commit never lands, loses the
  number for one lease at most, with nothing left to clean up. Release is the fast path;
  lapse is what makes the pool safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.keys import Keyspace
from adapters.sealing import Sealer
from adapters.store import load_script, unavailable_while

POOL_SCRIPT = load_script("pool_lease.lua")


@dataclass(slots=True, frozen=True)
class Lease:
    """A number's lease, as stored: times in ms, Redis time."""

    number: str
    call: str  # the conversation id holding it
    key: str  # the holder's lease key (its transfer attempt)
    since: int
    until: int  # it lapses then
    claimed: int  # when the agent side first claimed it; 0 = not yet
    settled: int = 0  # when its transfer connected; 0 = not (yet)
    # Not stored in the lease: its context as opened (a claim's, "" when none or it cannot be
    # opened), and whether this operation reclaimed a lapsed lease or made the first claim.
    context: str = field(default="", compare=False)
    fresh: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, number: str, raw: str) -> Lease:
        data = json.loads(raw)
        return cls(
            number=number,
            call=str(data["call"]),
            key=str(data["lease"]),
            since=int(data["since"]),
            until=int(data["until"]),
            claimed=int(data["claimed"]),
            settled=int(data.get("settled") or 0),
        )

    @property
    def given_back(self) -> bool:
        """Whether it ends as it should (its transfer connected, or the agent side claimed
        it): once ended, it is no lapse (pool_lease.lua's ``given_back``)."""
        return bool(self.claimed or self.settled)

    def state(self, now: int) -> str:
        """How its number stands at ``now`` (ms), as pool_lease.lua's ``status`` counts it."""
        if self.until <= now:
            return "free" if self.given_back else "lapsed"
        return "claimed" if self.claimed else "leased"


@dataclass(slots=True, frozen=True)
class PoolStatus:
    """How a pool's configured numbers stand; each is counted once.

    ``lapsed`` numbers are as available as ``free`` ones, but their lease ended with nobody
    giving them back (no release, no connect, no claim): an instance died, or a release
    failed. A lease that ended after its transfer connected or was claimed counts free."""

    free: int
    leased: int  # live and not yet claimed
    claimed: int  # live and claimed by the agent side
    lapsed: int


class PoolStore:
    """Lease, release, claim and count a pool's numbers; one round trip each.

    A lease's context (what the agent is told) is sealed with ``sealer`` in Redis: it holds
    what the call flow collected."""

    def __init__(self, redis: Redis | RedisCluster, keyspace: Keyspace, sealer: Sealer | None = None) -> None:
        self.keys = keyspace
        self.sealer = sealer or Sealer.from_setting(None)
        self._script = redis.register_script(POOL_SCRIPT)

    async def _run(self, action: str, pool: str, args: list[str | int], numbers: Sequence[str] = ()) -> Any:
        keys = [*self.keys.pool(pool), *(self.keys.pool_context(pool, n) for n in numbers)]
        with unavailable_while(action):
            return await self._script(keys=keys, args=args)

    async def lease(
        self,
        pool: str,
        numbers: list[str],
        conversation_id: str,
        lease_key: str,
        seconds: float,
        context: str = "",
        previous: str = "",
    ) -> Lease | None:
        """Lease one of ``numbers`` (the pool's, in order) to the call for ``seconds``: the one
        this (call, lease key) already holds, else the one free longest; None when every
        number is held. ``context`` (JSON) is kept, sealed, under the number as long as the
        lease. The call's lease under ``previous`` (its last attempt), if it still holds it,
        is released first, in the same step. The lease is ``fresh`` when it reclaimed
        another call's lapsed one (ended with nobody giving it back)."""
        if seconds <= 0:
            raise ValueError(f"a lease lasts a positive time, not {seconds}")
        ms = max(1, round(seconds * 1000))
        sealed = self.sealer.seal(context) if context else ""
        args: list[str | int] = ["lease", conversation_id, lease_key, ms, sealed, previous, *numbers]
        reply = await self._run("leasing a pool number", pool, args, numbers)
        if not reply:
            return None
        number, raw, reclaimed = reply
        return replace(Lease.parse(number, raw), fresh=bool(reclaimed))

    async def release(self, pool: str, number: str, conversation_id: str, lease_key: str) -> int | None:
        """End the call's lease on ``number``: when it ended (ms, Redis time), or None when
        the call does not hold it (it lapsed and another call leased it, or was released)."""
        args: list[str | int] = ["release", conversation_id, lease_key, number]
        ended = await self._run("releasing a pool number", pool, args, [number])
        return None if ended is None else int(ended)

    async def settle(
        self, pool: str, number: str, conversation_id: str, lease_key: str, seconds: float
    ) -> int | None:
        """Bring the call's live lease on ``number`` to end within ``seconds`` (a connected
        transfer's grace for the agent side): its new end (ms), or None if it holds none."""
        args: list[str | int] = ["settle", conversation_id, lease_key, number, round(seconds * 1000)]
        ends = await self._run("settling a pool number", pool, args, [number])
        return None if ends is None else int(ends)

    async def claim(self, pool: str, number: str, grace_seconds: float = 0) -> Lease | None:
        """The live lease on ``number`` and its context, for the agent side; the first claim
        (``fresh``) marks it claimed and, with a grace, shortens it (and the context) to
        lapse that long after. None if no call holds it."""
        args: list[str | int] = ["claim", number, round(grace_seconds * 1000)]
        reply = await self._run("claiming a pool number", pool, args, [number])
        if not reply:
            return None
        raw, sealed, first = reply
        context = (self.sealer.open(sealed) or "") if sealed else ""
        return replace(Lease.parse(number, raw), context=context, fresh=bool(first))

    async def status(self, pool: str, numbers: list[str]) -> PoolStatus:
        """How ``numbers`` (the pool's) stand now."""
        counts = await self._run("reading a pool", pool, ["status", *numbers])
        return PoolStatus(*(int(n) for n in counts))
