"""The Telephony channel's side of the wire: its ``serviceUrl`` endpoint, which receives
what a bot sends, and callers, which build the activities the channel posts to a bot."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter, defaultdict
from typing import Any

from aiohttp import web

KEYPAD = "0123456789*#"  # the keys of a phone, each sent as a message of its own


class ChannelStandIn:
    """The channel's ``serviceUrl``: records every activity the bot sends, per conversation.

    ``record=False`` only counts them (``received``), unparsed, so a long benchmark's
    memory does not grow with its turns; ``activities`` then stays empty."""

    def __init__(self, *, record: bool = True) -> None:
        self.record = record
        self.received = 0  # activities accepted (answered 200), recorded or not
        self.activities: list[dict[str, Any]] = []
        self._by_conversation: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._ids = itertools.count(1)
        self._changed: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.refuse_next = 0  # answer this many posts with a 503, as a failing channel
        self.delay = 0.0  # seconds to wait before answering, as a slow channel

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> ChannelStandIn:
        """Listen on ``host:port`` (0: a free port); ``url`` is then the serviceUrl to give."""
        app = web.Application()
        app.router.add_post("/v3/conversations/{conversation}/activities", self._receive)
        app.router.add_post("/v3/conversations/{conversation}/activities/{reply_to}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}/"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        status, answer = await self.take(request.match_info["conversation"], await request.read())
        return web.json_response(answer, status=status)

    async def take(self, conversation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """What the channel answers an activity the bot sent to ``conversation`` (over HTTP
        or a streaming socket): the status, and the JSON body (the activity's new id)."""
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return 503, {"error": "unavailable"}
        if not self.record:
            self.received += 1
            self._changed[""].set()
            return 200, {"id": f"sent-{next(self._ids)}"}
        try:
            activity = json.loads(body)
        except ValueError:
            activity = None
        if not isinstance(activity, dict):
            return 400, {"error": "the body must be a JSON activity"}
        activity["_path_conversation"] = conversation
        self.activities.append(activity)
        self.received += 1
        self._by_conversation[conversation].append(activity)
        for key in (conversation, ""):  # "" wakes whoever waits for any conversation
            self._changed[key].set()
        return 200, {"id": f"sent-{next(self._ids)}"}

    def for_conversation(self, conversation_id: str) -> list[dict[str, Any]]:
        return self._by_conversation.get(conversation_id, [])

    async def wait_for(self, count: int, conversation_id: str | None = None, within: float = 10) -> None:
        """Wait until at least ``count`` activities (for one conversation: recording only)
        have arrived."""

        def enough() -> bool:
            if not conversation_id:
                return self.received >= count
            return len(self.for_conversation(conversation_id)) >= count

        changed = self._changed[conversation_id or ""]
        async with asyncio.timeout(within):
            while not enough():
                changed.clear()
                await changed.wait()

    def deliveries(self, conversation_id: str) -> dict[str, dict[str, Any]]:
        """What reached this conversation, once per reply key (``channelData.replyKey``), in
        the order the bot produced it (a re-sent reply may arrive late)."""
        by_key = {a["channelData"]["replyKey"]: a for a in self.for_conversation(conversation_id)}
        return dict(sorted(by_key.items(), key=lambda item: tuple(map(int, item[0].split(".")))))

    def repeats(self) -> int:
        """Activities that arrived more than once (the same call and reply key)."""
        keys = Counter((a["_path_conversation"], a["channelData"]["replyKey"]) for a in self.activities)
        return sum(count - 1 for count in keys.values())

    def reply_counts(self) -> Counter[str]:
        """How many activities the bot sent in reply to each incoming activity id."""
        return Counter(a.get("replyToId", "") for a in self.activities)


class Caller:
    """Builds the activities the Telephony channel posts for one call."""

    _seq = itertools.count(1)

    def __init__(self, service_url: str, conversation_id: str | None = None, number: str = "+14255550123"):
        self.service_url = service_url
        self.conversation_id = conversation_id or f"call-{next(self._seq)}-{id(self):x}"
        self.number = number
        self._ids = itertools.count(1)

    def _base(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "id": f"{self.conversation_id}|{next(self._ids):04d}",
            "timestamp": "2026-11-23T10:00:00.000Z",
            "channelId": "telephony",
            "serviceUrl": self.service_url,
            "from": {"id": self.number, "role": "user"},
            "recipient": {"id": "contoso-bot", "name": "Contoso", "role": "bot"},
            "conversation": {"id": self.conversation_id},
            "locale": "en-US",
            **fields,
        }

    def start(self) -> dict[str, Any]:
        return self._base(
            "conversationUpdate",
            membersAdded=[{"id": "contoso-bot", "role": "bot"}, {"id": self.number, "role": "user"}],
        )

    def say(self, text: str) -> dict[str, Any]:
        """Speech: a message with no DTMF entity, which is how a bot tells it from a key."""
        return self._base("message", text=text)

    def press(self, digits: str) -> list[dict[str, Any]]:
        """Keypad tones as the Telephony channel sends them: one message per key, its text
        the key, tagged with a ``DTMF`` entity (docs/research/telephony-channel.md)."""
        return [self._base("message", text=key, entities=[{"type": "DTMF"}]) for key in check_keys(digits)]

    def status(self, value: Any) -> dict[str, Any]:
        return self._base("event", name="handoff.status", value=value)

    def hang_up(self) -> dict[str, Any]:
        return self._base("endOfConversation", code="completedSuccessfully")


def check_keys(keys: str) -> str:
    """``keys`` when all are keys of a phone's keypad; a ValueError that says why not, so
    a typo is refused before anything is sent."""
    if not keys:
        raise ValueError("no key to press: 0-9, * or #")
    wrong = sorted({key for key in keys if key not in KEYPAD})
    if wrong:
        raise ValueError(f"a keypad has 0-9, * and #; not {''.join(wrong)!r} (in {keys!r})")
    return keys
