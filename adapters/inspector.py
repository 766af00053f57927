"""What operators read: calls by state and node, counts, transfer counters and the feed of steps
(``adapters.inspection`` shapes them for people; this module knows only Redis).

Everything is read from the per-shard indexes, counters and feeds the commit script
keeps (never a keyspace scan), a pipelined round trip at a time (two for a listing).
On a Redis Cluster redis-py splits the same pipelines by node.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from adapters.channel_client import is_streaming
from adapters.keys import HOUR, MINUTE, SHARDS, CallField, FeedField, StatsBucket
from adapters.store import RedisCallStore, decode_step, unavailable_while
from states import State

Command = tuple[str, tuple[Any, ...], dict[str, Any]]  # a pipeline method, its args and kwargs
# The longest window a transfer count can cover: the hourly counters (keys.HOUR) live eight days.
MAX_WINDOW_SECONDS = 7 * 86_400


@dataclass(slots=True, frozen=True)
class FeedEntry:
    """One step of some call, as the shard feeds hold it."""

    id: str  # the stream entry id: "<ms>-<seq>", Redis time
    call: str
    trigger: str
    source: str
    dest: str
    reason: str
    target: str
    node: str = ""  # on a move through the call flow: the node reached

    @property
    def at_ms(self) -> int:
        return int(self.id.split("-")[0])


@dataclass(slots=True, frozen=True)
class TransferCounts:
    """Transfer counters summed over a window: per (queue, target), outcome -> count."""

    from_ms: int
    to_ms: int
    by_queue_target: dict[tuple[str, str], Counter[str]]

    @property
    def by_queue(self) -> dict[str, Counter[str]]:
        return _summed(self.by_queue_target, 0)

    @property
    def by_target(self) -> dict[str, Counter[str]]:
        return _summed(self.by_queue_target, 1)


def _summed(counts: dict[tuple[str, str], Counter[str]], position: int) -> dict[str, Counter[str]]:
    """Counters summed over the other part of their (queue, target) key."""
    summed: dict[str, Counter[str]] = {}
    for key, counter in counts.items():
        summed.setdefault(key[position], Counter()).update(counter)
    return summed


class CallInspector:
    """Read-only views of the calls in a store's Redis."""

    def __init__(self, store: RedisCallStore) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys

    async def _pipelined(self, action: str, commands: list[Command]) -> list[Any]:
        with unavailable_while(action):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, args, kwargs in commands:
                    getattr(pipe, name)(*args, **kwargs)
                return list(await pipe.execute())

    async def connection(self, conversation_id: str, reference: str) -> dict[str, Any]:
        """How the call reaches the channel: ``http`` (replies posted to its serviceUrl), or
        a streaming ``websocket`` held by ``instance`` (None: no instance holds it now, its
        replies wait for the channel to reconnect), whose lease is ``live`` or lapsed."""
        try:
            service_url = json.loads(reference).get("serviceUrl") if reference else None
        except (ValueError, AttributeError):
            service_url = None
        if not is_streaming(service_url):
            return {"transport": "http", "service_url": service_url}
        with unavailable_while("reading the call's socket"):
            instance = await self.redis.get(self.keys.socket(conversation_id))
            live = bool(await self.redis.exists(self.keys.instance(str(instance)))) if instance else None
        return {"transport": "websocket", "service_url": service_url, "instance": instance, "live": live}

    async def state_counts(self) -> dict[str, int]:
        """Calls per state: the sizes of every shard's state indexes."""
        states = [s.value for s in State]
        commands: list[Command] = [
            ("zcard", (self.keys.state_index(shard, state),), {})
            for shard in range(SHARDS)
            for state in states
        ]
        sizes = await self._pipelined("counting calls", commands)
        counts = dict.fromkeys(states, 0)
        for (_, (key,), _), size in zip(commands, sizes, strict=True):
            counts[key.rsplit(":", 1)[1]] += int(size)
        return counts

    async def node_counts(self) -> dict[str, int]:
        """Calls in state bot per call flow node, by node name (nodes with none left out):
        the sizes of the node indexes the shards' sets of nodes name."""
        listed = await self.store.listed_nodes()
        commands: list[Command] = [
            ("zcard", (self.keys.node_index(shard, node),), {}) for shard, node in listed
        ]
        sizes = await self._pipelined("counting calls per node", commands) if commands else []
        counts: Counter[str] = Counter()
        for (_, node), size in zip(listed, sizes, strict=True):
            counts[node] += int(size)
        return {node: counts[node] for node in sorted(counts) if counts[node]}

    async def transfer_counts(self, window_seconds: int, now_s: float | None = None) -> TransferCounts:
        """Transfers started, accepted, failed and timed out per queue and target over the
        last ``window_seconds`` (to the minute up to two hours, to the hour beyond)."""
        if not 0 < window_seconds <= MAX_WINDOW_SECONDS:
            raise ValueError(f"the window must be between 1 s and {MAX_WINDOW_SECONDS // 86_400} days")
        now = int(time.time() if now_s is None else now_s)
        kind: StatsBucket = MINUTE if window_seconds <= 2 * 3600 else HOUR
        last = kind.bucket(now)
        first = kind.bucket(now - window_seconds)  # whole buckets: at least the window, at most one more
        commands: list[Command] = [
            ("hgetall", (self.keys.stats(shard, kind, start),), {})
            for shard in range(SHARDS)
            for start in range(kind.hash_of(first), kind.hash_of(last) + 1)
        ]
        counts: dict[tuple[str, str], Counter[str]] = {}
        for counters in await self._pipelined("reading transfer counters", commands):
            for field, value in counters.items():
                bucket, outcome, rest = field.split(":", 2)
                # Queue names hold no ':' (a pool's target, "pool:<name>", does); a counter
                # written before queues were counted is "<target>" alone: queue "".
                queue, counted, target = rest.partition(":")
                if not counted:
                    queue, target = "", rest
                if first <= int(bucket) <= last:
                    counts.setdefault((queue, target), Counter())[outcome] += int(value)
        return TransferCounts(first * kind.seconds * 1000, now * 1000, counts)

    async def recent(self, limit: int) -> list[FeedEntry]:
        """The ``limit`` most recent steps of any call, newest first."""
        commands: list[Command] = [
            ("xrevrange", (self.keys.feed(shard),), {"count": limit}) for shard in range(SHARDS)
        ]
        entries = [_entry(e) for found in await self._pipelined("reading the feed", commands) for e in found]
        entries.sort(key=lambda e: tuple(map(int, e.id.split("-"))), reverse=True)
        return entries[:limit]

    async def feed_heads(self) -> list[str]:
        """Each shard feed's last entry id ("0-0" when empty): where a watcher starts."""
        commands: list[Command] = [
            ("xrevrange", (self.keys.feed(shard),), {"count": 1}) for shard in range(SHARDS)
        ]
        return [
            found[0][0] if found else "0-0" for found in await self._pipelined("reading the feed", commands)
        ]

    async def feed_since(self, heads: list[str], count: int = 500) -> list[FeedEntry]:
        """Steps after ``heads`` (advanced in place), oldest first."""
        commands: list[Command] = [
            ("xread", ({self.keys.feed(shard): heads[shard]},), {"count": count}) for shard in range(SHARDS)
        ]
        entries: list[FeedEntry] = []
        for shard, reply in enumerate(await self._pipelined("reading the feed", commands)):
            for _stream, found in _streams(reply):
                for raw in found:
                    entries.append(_entry(raw))
                    heads[shard] = raw[0]
        entries.sort(key=lambda e: tuple(map(int, e.id.split("-"))))
        return entries

    async def list_calls(self, states: list[str], limit: int) -> list[dict[str, str]]:
        """The listed fields of up to ``limit`` calls in ``states``, latest state change first.

        Reads the newest entries of every shard's indexes of those states (a few per
        index, more only where needed), then those calls' records. An entry whose call
        expired while live (until it is pruned) is skipped, and one more entry read.
        """
        indexes = [self.keys.state_index(shard, state) for shard in range(SHARDS) for state in states]
        want = limit
        while True:
            newest, exhausted = await self._newest(indexes, want)
            records = await self._listed(newest, states)
            if len(records) >= limit or exhausted:
                return records[:limit]
            want += limit - len(records)  # stale entries hid that many calls: read that many more

    async def _listed(self, conversation_ids: list[str], states: list[str]) -> list[dict[str, str]]:
        """The listed fields of these calls, in order, skipping any no longer in ``states``."""
        fields = [CallField.ID, CallField.STATE, CallField.SINCE, CallField.ATTEMPTS, CallField.TARGET]
        commands: list[Command] = []
        for conversation_id in conversation_ids:
            keys = self.keys.call(conversation_id)
            commands += [("hmget", (keys.call, fields), {}), ("lindex", (keys.history, -1), {})]
        replies = await self._pipelined("listing calls", commands) if commands else []
        records: list[dict[str, str]] = []
        for values, last in zip(replies[::2], replies[1::2], strict=True):
            record = {name: value for name, value in zip(fields, values, strict=True) if value is not None}
            if record.get(CallField.STATE) in states:
                if last:
                    step = decode_step(last)
                    record["last_transition"] = f"{step['trigger']} {step['from']} -> {step['to']}"
                records.append(record)
        return records

    async def _newest(self, indexes: list[str], want: int) -> tuple[list[str], bool]:
        """The members of the ``want`` newest entries over ``indexes``, newest first, and
        whether that is all there are (fewer than ``want`` exist).

        Reads a few entries per index; an index that had more may hide entries newer than
        the cut-off, so the indexes are read deeper until what is known to be newest suffices.
        """
        per = min(want, max(8, -(-2 * want // len(indexes))))
        while True:
            ranked = await self._pipelined(
                "listing calls",
                [("zrevrange", (index, 0, per - 1), {"withscores": True}) for index in indexes],
            )
            entries = sorted((e for found in ranked for e in found), key=lambda e: e[1], reverse=True)
            cut_off = max((found[-1][1] for found in ranked if len(found) == per), default=None)
            if cut_off is None or per == want:  # every index read whole, or as deep as asked
                return [str(member) for member, _ in entries[:want]], cut_off is None and len(entries) < want
            # Nothing unread is newer than the cut-off: entries at or above it are in order.
            known = [str(member) for member, score in entries if score >= cut_off]
            if len(known) >= want:
                return known[:want], False
            per = min(want, per * 4)


def _streams(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREAD's reply as (stream, entries) pairs: RESP2 gives a list, RESP3 a dict."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, found) for stream, found in reply]


def _entry(raw: tuple[str, dict[str, str]]) -> FeedEntry:
    entry_id, f = raw
    return FeedEntry(
        entry_id,
        f.get(FeedField.CALL, ""),
        f.get(FeedField.TRIGGER, ""),
        f.get(FeedField.FROM, ""),
        f.get(FeedField.TO, ""),
        f.get(FeedField.REASON, ""),
        f.get(FeedField.TARGET, ""),
        f.get(FeedField.NODE, ""),
    )
