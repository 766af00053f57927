"""Every Redis key and hash field the product uses, in one place.

Calls are spread over ``SHARDS`` Redis Cluster hash tags by a hash of the conversation
id (never the raw id: a ``{`` or ``}`` in it would move the slot). All keys of one call,
and the due-work schedule of its shard, carry that tag, so every script and
transaction on a call touches one slot, and no schedule key holds every call's timers.
A number pool's keys share the tag ``{pool:<name>}``, so its script touches one slot too.
See docs/redis-keys.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import NamedTuple

from orchestrator.scheduler import OUTBOX, TIMER

SHARDS = 64  # part of every key name: changing it orphans existing calls
POOL_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a flow name: nothing that could end a hash tag


class CallKeys(NamedTuple):
    """The keys of one call, in the order the commit script takes them."""

    call: str  # HASH: the call record (fields below)
    transcript: str  # LIST: compact JSON transcript lines, oldest first, capped
    history: str  # LIST: a JSON array per transition or ignored event, capped
    seen: str  # HASH: activity id -> "<version>:<commit token>", for de-duplication, bounded
    outbox: str  # HASH: outbox key (the activity id) -> "<ms>:<JSON activities>" not yet acknowledged
    # The record's long values, each a STRING of its own, so the record stays a compact
    # listpack (Redis keeps a hash one only while every value is <= hash-max-listpack-value,
    # 64 bytes by default): absent when there is none.
    reference: str  # STRING: the JSON conversation reference, written when it changes
    variables: str  # STRING: what the flow collected, sealed (see CallField.VARIABLES)


class PoolKeys(NamedTuple):
    """The keys of one number pool, in the order pool_lease.lua takes them (one hash slot)."""

    leases: str  # HASH: number -> its lease, JSON {"call", "lease" (key), "since", "until", "claimed"}
    holders: str  # HASH: JSON [conversation id, lease key] -> the number that lease holds
    free_at: str  # ZSET: number -> when it comes free (ms, Redis time): its lease's end, or release


# The longest value the record stores: Redis' default hash-max-listpack-value. One value
# longer makes the hash a hashtable (~1 KB more, and it never converts back).
RECORD_VALUE_MAX = 64

# commit.lua spells the field names below too; tests/test_store.py checks it uses no others.
# A field whose value is "" (or, for a count or time, 0) is not stored: readers take an
# absent field as its default. REFERENCE and VARIABLES are named here, but their values live
# in their own keys (CallKeys.reference, CallKeys.variables); a record written by an
# earlier version may still hold them, and its next commit moves them.


class CallField:
    """Fields of the call record hash."""

    ID = "id"  # the conversation id
    STATE = "state"
    VERSION = "version"
    ATTEMPTS = "attempts"
    TARGET = "target"
    DEADLINE = "deadline"  # ms since the epoch, Redis server time; 0 = none
    FAILURE = "failure"  # cut to RECORD_VALUE_MAX bytes (the history keeps the whole reason)
    REFERENCE = "reference"  # JSON conversation reference (own key)
    CREATED = "created"  # ms, Redis server time
    UPDATED = "updated"  # ms, Redis server time
    SINCE = "since"  # ms, Redis server time, when the call entered its state
    NODE = "node"  # where the call is in the call flow
    QUEUE = "queue"  # the queue of its current (or last) transfer
    TRIES = "tries"  # at this node: input no route took, or entries that did not fit
    SILENCES = "silences"  # at this node: no-input timeouts
    VARIABLES = "variables"  # sealed JSON: what the flow collected, a gather's entry so far (own key)
    SHOWN = "shown"  # JSON: the collected variables, masked, for views
    TRANSFERS = "transfers"  # transfers started, to any queue (absent: none)
    HOLDING = "holding"  # "<holds> <transfer node>" while a warm transfer waits for a pool number, else ""


class HistoryField:
    """Fields of each history entry: a JSON array in ``HISTORY_ENTRY`` order (no names stored)."""

    AT = "at"  # ms, Redis server time of the commit that wrote it
    TRIGGER = "trigger"
    FROM = "from"
    TO = "to"
    REASON = "reason"
    ACTIVITY = "activity"  # the id of the activity whose turn wrote it
    VERSION = "version"  # the call version that turn produced
    TARGET = "target"  # on entries into transferring: the number dialled ("" or absent otherwise)
    NODE = "node"  # on moves through the call flow: the node arrived at (absent otherwise)


# The positions of a history entry's array: the target and node only where there is one.
HISTORY_ENTRY: tuple[str, ...] = (
    HistoryField.AT,
    HistoryField.TRIGGER,
    HistoryField.FROM,
    HistoryField.TO,
    HistoryField.REASON,
    HistoryField.ACTIVITY,
    HistoryField.VERSION,
    HistoryField.TARGET,
    HistoryField.NODE,
)


class FeedField:
    """Fields of each entry of a shard's feed stream (the entry id is the Redis time)."""

    CALL = "call"  # the conversation id
    TRIGGER = HistoryField.TRIGGER
    FROM = HistoryField.FROM
    TO = HistoryField.TO
    REASON = HistoryField.REASON
    TARGET = HistoryField.TARGET  # the call's current (or last) transfer target
    NODE = HistoryField.NODE  # on a move through the call flow: the node arrived at


class StatsBucket(NamedTuple):
    """Transfer counters bucketed by ``seconds``; one hash holds the buckets of ``span`` seconds
    (fewer, fuller hashes make a window cheap to read); a hash lives ``keep_seconds`` after
    its last count."""

    name: str
    seconds: int
    span: int
    keep_seconds: int

    def bucket(self, epoch_seconds: int) -> int:
        """The bucket number (epoch minutes or hours) of a moment."""
        return epoch_seconds // self.seconds

    def hash_of(self, bucket: int) -> int:
        """The start of the hash holding ``bucket``, in units of ``span``."""
        return bucket * self.seconds // self.span


# Each counted event goes into its minute and its hour: windows up to two hours are summed
# from minutes (hour-long hashes), longer ones (up to a week) from whole hours (day hashes).
MINUTE = StatsBucket("m", 60, 3600, 3 * 3600 + 120)
HOUR = StatsBucket("h", 3600, 86_400, 8 * 86_400 + 3600)


class Due:
    """Members of a shard's due schedule: JSON arrays, so any conversation id fits."""

    TIMER = TIMER  # the call's one timer: no-answer watchdog, no-input or inter-digit timeout, hang-up
    OUTBOX = OUTBOX  # an outbox entry, re-sent until acknowledged

    @staticmethod
    def timer(conversation_id: str) -> str:
        return json.dumps([Due.TIMER, conversation_id])

    @staticmethod
    def outbox(conversation_id: str, key: str) -> str:
        return json.dumps([Due.OUTBOX, conversation_id, key])

    @staticmethod
    def parse(member: str) -> tuple[str, str, str]:
        """(kind, conversation id, outbox key or "")."""
        kind, conversation_id, *rest = json.loads(member)
        return str(kind), str(conversation_id), str(rest[0]) if rest else ""


class Keyspace:
    """Key names under one prefix (``REDIS_KEY_PREFIX``), so deployments can share a Redis."""

    def __init__(self, prefix: str = "cc") -> None:
        self.prefix = prefix

    @staticmethod
    def locate(conversation_id: str) -> tuple[int, str]:
        """(shard, call hash): the shard from, and the hash of, BLAKE2b-64 of the id."""
        digest = hashlib.blake2b(conversation_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % SHARDS, digest.hex()

    def call(self, conversation_id: str) -> CallKeys:
        shard, call_hash = self.locate(conversation_id)
        base = f"{self.prefix}:{{{shard}}}:{call_hash}"
        return CallKeys(*(f"{base}:{name}" for name in CallKeys._fields))

    def due(self, shard: int) -> str:
        """ZSET of a shard's due work: member (see ``Due``) -> when (ms, Redis time)."""
        return f"{self.prefix}:{{{shard}}}:due"

    def state_index(self, shard: int, state: str) -> str:
        """ZSET of the shard's calls in ``state``: conversation id -> since (ms, Redis time)."""
        return f"{self.prefix}:{{{shard}}}:state:{state}"

    def node_index(self, shard: int, node: str) -> str:
        """ZSET of the shard's calls in state ``bot`` at call flow ``node``: conversation id ->
        when they arrived there (ms, Redis time)."""
        return f"{self.prefix}:{{{shard}}}:node:{node}"

    def nodes(self, shard: int) -> str:
        """SET of the nodes whose index in the shard holds a call (where to read counts)."""
        return f"{self.prefix}:{{{shard}}}:nodes"

    def feed(self, shard: int) -> str:
        """STREAM of the shard's recent transitions, every call's (see ``FeedField``), capped."""
        return f"{self.prefix}:{{{shard}}}:feed"

    def stats(self, shard: int, bucket: StatsBucket, start: int) -> str:
        """HASH of the shard's transfer counters ``<bucket>:<outcome>:<queue>:<target>`` -> n,
        for the buckets of one span; ``start`` is ``bucket.hash_of(...)`` (epoch hours or days)."""
        return f"{self.prefix}:{{{shard}}}:stats:{bucket.name}:{start}"

    def socket(self, conversation_id: str) -> str:
        """STRING: the instance whose streaming socket carries the call (absent: none, or HTTP)."""
        shard, call_hash = self.locate(conversation_id)
        return f"{self.prefix}:{{{shard}}}:{call_hash}:socket"

    def instance(self, name: str) -> str:
        """STRING with a TTL: a running instance's lease, ``{"sockets", "calls"}`` as JSON."""
        return f"{self.prefix}:instance:{name}"

    def inbox(self, name: str) -> str:
        """Sharded Pub/Sub channel: sends other instances route to ``name``'s sockets."""
        return f"{self.prefix}:inbox:{{{name}}}"

    def pool(self, name: str) -> PoolKeys:
        """A number pool's keys, under the tag ``{pool:<name>}``: a pool's script touches one slot."""
        if not POOL_NAME.fullmatch(name):
            raise ValueError(f"pool name {name!r}: letters, digits, '_' and '-' only")
        base = f"{self.prefix}:{{pool:{name}}}"
        return PoolKeys(*(f"{base}:{field}" for field in PoolKeys._fields))

    def agent_requests(self, client: str, minute: int) -> str:
        """STRING with a TTL: the context API requests of one client (its address) in one
        epoch minute, for the rate limit, shared by every instance."""
        return f"{self.prefix}:agent-requests:{client}:{minute}"

    def pool_context(self, name: str, number: str) -> str:
        """STRING with a TTL: the sealed context of the call holding ``number`` (it lapses
        with the lease, never later)."""
        return f"{self.pool(name).leases.rpartition(':')[0]}:context:{number}"

    def due_for(self, conversation_id: str) -> str:
        return self.due(self.locate(conversation_id)[0])
