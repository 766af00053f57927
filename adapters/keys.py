"""Every Redis key and hash field the product uses, in one place.

All keys of one call share a Redis Cluster hash tag made from a hash of the
conversation id (never the raw id: a ``{`` or ``}`` in it would move the slot), so
every script and transaction on a call touches one slot. See docs/redis-keys.md.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class CallKeys(NamedTuple):
    """The keys of one call, in the order the commit script takes them."""

    call: str  # HASH: the call record (fields below)
    transcript: str  # LIST: JSON transcript lines, oldest first, capped
    history: str  # STREAM: one entry per transition or ignored event
    seen: str  # HASH: activity id -> commit token, for de-duplication


class CallField:
    """Fields of the call record hash."""

    ID = "id"  # the conversation id
    STATE = "state"
    VERSION = "version"
    ATTEMPTS = "attempts"
    TARGET = "target"
    DEADLINE = "deadline"  # ms since the epoch, Redis server time; 0 = none
    FAILURE = "failure"
    REFERENCE = "reference"  # JSON conversation reference
    CREATED = "created"  # ms, Redis server time
    UPDATED = "updated"  # ms, Redis server time
    SINCE = "since"  # ms, Redis server time, when the call entered its state


class HistoryField:
    """Fields of each history stream entry (the entry id is the Redis time it was written)."""

    TRIGGER = "trigger"
    FROM = "from"
    TO = "to"
    REASON = "reason"
    ACTIVITY = "activity"  # the id of the activity whose turn wrote it
    VERSION = "version"  # the call version that turn produced


# commit.lua spells these field names too; tests/test_store.py checks it uses no others.


class Keyspace:
    """Key names under one prefix (``REDIS_KEY_PREFIX``), so deployments can share a Redis."""

    def __init__(self, prefix: str = "cc") -> None:
        self.prefix = prefix

    @staticmethod
    def tag(conversation_id: str) -> str:
        """The call's hash tag: 16 hex digits of BLAKE2b of the conversation id."""
        return hashlib.blake2b(conversation_id.encode("utf-8"), digest_size=8).hexdigest()

    def call(self, conversation_id: str) -> CallKeys:
        base = f"{self.prefix}:{{{self.tag(conversation_id)}}}"
        return CallKeys(f"{base}:call", f"{base}:transcript", f"{base}:history", f"{base}:seen")
