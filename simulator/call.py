"""One simulated call against one or more bots: the caller's side and the agent side of
the Telephony channel, with what the bot sent back read in order.

A bot's replies arrive at the channel stand-in (its ``serviceUrl``). Each call reads
its conversation's activities with a cursor, so ``expect_*`` checks the next thing the
bot said, and anything never read is what the bot sent that nobody expected.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from orchestrator.ssml import SSML_NAMESPACE
from simulator.channel import Caller, ChannelStandIn

Protocol = Literal["telephony", "generic"]
Transport = Literal["http", "websocket"]  # POSTs, or the Telephony channel's streaming socket
TURN_SECONDS = 15.0  # the channel gives a bot this long to answer a post
EXPECT_SECONDS = 5.0  # how long an expect_* waits for the bot's next activity, unless told
MAX_SILENCE = 120.0  # the longest a caller may stay silent in one step


class Mismatch(AssertionError):
    """The bot did not do what the scenario expected."""


@dataclass
class Tally:
    """What a run of calls did, for the load summary."""

    turns: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per post to the bot
    errors: Counter[str] = field(default_factory=lambda: Counter())
    transfers: int = 0
    unexpected: list[str] = field(default_factory=list)


class Bots:
    """The bots' ``/api/messages`` URLs, used round-robin over one HTTP session."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession, tally: Tally | None = None) -> None:
        if not urls:
            raise ValueError("at least one bot URL is needed")
        self.urls = [messages_url(url) for url in urls]
        self._next = itertools.cycle(self.urls)
        self.session = session
        self.tally = tally or Tally()
        self.last_error = ""  # why the last refused post was refused, as the bot said
        self.sent: Counter[str] = Counter({url: 0 for url in self.urls})  # posts per bot (0: never reached)
        self._agent_side = itertools.cycle(self.urls)

    def agent_url(self, path: str) -> str:
        """``path`` on the next bot, round-robin: the agent side may ask any instance."""
        return next(self._agent_side).removesuffix("/api/messages") + path

    async def post(self, activity: dict[str, Any]) -> int:
        """Post one activity to the next bot; its HTTP status (0: not reached)."""
        started = time.perf_counter()
        url = next(self._next)
        self.sent[url] += 1
        try:
            timeout = aiohttp.ClientTimeout(total=TURN_SECONDS)
            async with self.session.post(url, json=activity, timeout=timeout) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            return self.unreached(e)
        return self.answered(status, body, started)

    def answered(self, status: int, body: bytes, started: float) -> int:
        """Count a bot's answer (any status) to an activity sent at ``started``; the status."""
        self.tally.turns += 1
        self.tally.latencies.append(time.perf_counter() - started)
        if status >= 300:
            self.tally.errors[f"HTTP {status}"] += 1
            self.last_error = body[:300].decode(errors="replace")
        return status

    def unreached(self, error: Exception) -> int:
        """Count an activity no bot answered; 0, the status that says so."""
        self.tally.errors[type(error).__name__] += 1
        self.last_error = f"{type(error).__name__}: {error}"
        return 0


def messages_url(url: str) -> str:
    """A bot's base URL or its messages endpoint, as the messages endpoint."""
    url = url.rstrip("/")
    return url if url.endswith("/api/messages") else f"{url}/api/messages"


def voice_of(activity: dict[str, Any]) -> str:
    """The voice a reply's SSML speaks in ("" when it has none, or it is not SSML)."""
    try:
        voice = ET.fromstring(activity.get("speak") or "").find(f"{{{SSML_NAMESPACE}}}voice")
    except ET.ParseError:
        return ""
    return voice.attrib.get("name", "") if voice is not None else ""


def is_transfer(activity: dict[str, Any]) -> bool:
    return activity.get("type") == "event" and activity.get("name") == "handoff.initiate"


def is_hangup(activity: dict[str, Any]) -> bool:
    return activity.get("type") == "endOfConversation"


def handoff_context(activity: dict[str, Any]) -> dict[str, Any]:
    """What a ``handoff.initiate`` tells the agent hub: target, queue, collected variables."""
    value = activity.get("value")
    return value if isinstance(value, dict) else {}


def target_of(activity: dict[str, Any]) -> str:
    return str(handoff_context(activity).get("TargetPhoneNumber", ""))


def transcript_of(activity: dict[str, Any]) -> list[Any]:
    for attachment in activity.get("attachments") or []:
        if attachment.get("name") == "Transcript":
            return list((attachment.get("content") or {}).get("activities") or [])
    return []


def describe(activity: dict[str, Any]) -> str:
    """What the bot did, for people: a prompt and its voice, or a transfer and its target."""
    if is_transfer(activity):
        return f"transfer to {target_of(activity)} ({len(transcript_of(activity))} transcript lines)"
    if is_hangup(activity):
        return "a hang-up (endOfConversation)"
    if activity.get("type") == "message":
        voice = voice_of(activity)
        return f'"{activity.get("text", "")}"' + (f" [{voice}]" if voice else "")
    return f"{activity.get('type')} {activity.get('name') or ''}".strip()


class SimulatedCall:
    """A caller on the Telephony channel, and the agent side of its transfers."""

    def __init__(
        self,
        bots: Bots,
        channel: ChannelStandIn,
        *,
        protocol: Protocol = "telephony",
        number: str = "+14255550123",
        conversation_id: str | None = None,
        pools: Mapping[str, Collection[str]] | None = None,
        agent_token: str | None = None,
    ) -> None:
        self.bots, self.channel, self.protocol = bots, channel, protocol
        self.caller = Caller(channel.url, conversation_id=conversation_id, number=number)
        self.id = self.caller.conversation_id
        self.cursor = 0  # the bot's activities read so far
        self.last_sent: dict[str, Any] | None = None
        self.last_status: dict[str, Any] | None = None
        self.pools = pools or {}  # the bot's flow's number pools: name -> numbers
        self.agent_token = agent_token  # the bot's AGENT_TOKEN, for its context API
        self.dialled = ""  # the number the last transfer read dialled

    async def send(self, activity: dict[str, Any]) -> int:
        self.last_sent = activity
        status = await self.bots.post(activity)
        if not 200 <= status < 300:
            reason = f": {self.bots.last_error}" if self.bots.last_error else ""
            raise Mismatch(f"the bot answered {activity['type']} with HTTP {status or 'no answer'}{reason}")
        return status

    async def start(self) -> None:
        await self.send(self.caller.start())

    async def say(self, text: str) -> None:
        await self.send(self.caller.say(text))

    async def press(self, digits: str) -> None:
        """One post per key, each answered before the next, as a caller pressing them."""
        for activity in self.caller.press(digits):
            await self.send(activity)

    async def silence(self, seconds: float) -> None:
        """The caller says and presses nothing for ``seconds``; whatever the bot says
        meanwhile is left for the ``expect_*`` after it to read."""
        await asyncio.sleep(check_silence(seconds))

    async def hang_up(self) -> None:
        await self.send(self.caller.hang_up())

    async def status(self, state: str, message: str | None = None) -> None:
        """A ``handoff.status`` from the agent hub (also a late or duplicated one)."""
        value: dict[str, Any] = {"state": state}
        if message is not None:
            value["message"] = message
        self.last_status = self.caller.status(value)
        await self.send(self.last_status)

    async def agent(self, answer: str, message: str | None = None) -> None:
        """The agent side answers the transfer: ``accept``, ``fail``, ``no_answer`` (the
        channel keeps redialling and says nothing) or ``complete`` (hands the caller back).

        On the Telephony channel an accepted transfer simply ends the call for the bot,
        with no status; the generic protocol sends ``handoff.status`` accepted.
        """
        if answer == "accept":
            if self.protocol == "telephony":
                await self.hang_up()
            else:
                await self.status("accepted")
        elif answer == "fail":
            await self.status("failed", message or "the agent did not answer")
        elif answer == "complete":
            await self.status("completed")
        elif answer != "no_answer":
            raise ValueError(f"unknown agent answer {answer!r}: accept, fail, no_answer or complete")

    async def redeliver(self) -> None:
        """The last activity again, same id: the channel (or a load balancer) retrying."""
        if self.last_sent is None:
            raise Mismatch("nothing was sent yet, so nothing can be delivered again")
        await self.send(self.last_sent)

    async def next_activity(self, within: float) -> dict[str, Any] | None:
        """The bot's next activity on this call, waiting up to ``within`` seconds."""
        try:
            await self.channel.wait_for(self.cursor + 1, self.id, within)
        except TimeoutError:
            return None
        activity = self.channel.for_conversation(self.id)[self.cursor]
        self.cursor += 1
        if is_transfer(activity):
            self.bots.tally.transfers += 1
        return activity

    async def expect_prompt(
        self,
        contains: str | None = None,
        voice: str | None = None,
        within: float = EXPECT_SECONDS,
        hint: str | None = None,
    ) -> dict[str, Any]:
        """The bot's next activity is a prompt: containing ``contains``, in ``voice``, with
        the input hint ``hint`` (what may interrupt it), each when given."""
        activity = await self.next_activity(within)
        if activity is None:
            raise Mismatch(f"no prompt within {within:g} s (expected one containing {contains!r})")
        text = str(activity.get("text") or "")
        if activity.get("type") != "message":
            raise Mismatch(f"expected a prompt, the bot sent {describe(activity)}")
        if contains is not None and contains.lower() not in text.lower():
            raise Mismatch(f"expected a prompt containing {contains!r}, the bot said {describe(activity)}")
        if voice is not None and voice_of(activity) != voice:
            raise Mismatch(f"expected voice {voice}, the bot said {describe(activity)}")
        if hint is not None and activity.get("inputHint") != hint:
            said = activity.get("inputHint") or "no input hint"
            raise Mismatch(f"expected input hint {hint}, the bot sent {said} with {describe(activity)}")
        return activity

    async def expect_transfer(
        self,
        target: str | None = None,
        within: float = EXPECT_SECONDS,
        transcript_contains: str | None = None,
        queue: str | None = None,
        variables: dict[str, str] | None = None,
        pool: str | None = None,
    ) -> dict[str, Any]:
        """The bot's next activity is a ``handoff.initiate``: to ``target``, to one of the
        numbers of ``pool`` (a warm transfer), for ``queue``, carrying ``variables`` and a
        transcript with ``transcript_contains``, each when given. The number it dials is
        remembered (``dialled``) for ``expect_context``."""
        activity = await self.next_activity(within)
        if activity is None:
            raise Mismatch(f"no transfer within {within:g} s")
        if not is_transfer(activity):
            raise Mismatch(f"expected a transfer, the bot sent {describe(activity)}")
        if target is not None and target_of(activity) != target:
            raise Mismatch(f"expected a transfer to {target}, the bot sent {describe(activity)}")
        if pool is not None:
            numbers = self.pools.get(pool)
            if numbers is None:
                known = ", ".join(self.pools) or "none"
                raise Mismatch(f"the bot's flow has no pool {pool!r} (its pools: {known})")
            if target_of(activity) not in numbers:
                raise Mismatch(
                    f"expected a transfer to a number of pool {pool} ({', '.join(numbers)}), "
                    f"the bot sent {describe(activity)}"
                )
        said = [str(line.get("text", "")) for line in transcript_of(activity) if isinstance(line, dict)]
        if transcript_contains is not None and not any(transcript_contains in text for text in said):
            raise Mismatch(f"the transcript handed over lacks {transcript_contains!r}: {said}")
        context = handoff_context(activity)
        named, carried = context.get("Queue"), context.get("Variables", {})
        if queue is not None and named != queue:
            raise Mismatch(f"expected a transfer for queue {queue}, the context names {named!r}")
        if variables is not None and carried != variables:
            raise Mismatch(f"expected the transfer to carry {variables}, it carries {carried}")
        self.dialled = target_of(activity)
        return activity

    async def expect_context(
        self,
        *,
        pool: str | None = None,
        queue: str | None = None,
        attempt: int | None = None,
        caller: str | None = None,
        reason_contains: str | None = None,
        transcript_contains: Sequence[str] = (),
        variables: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The agent side asks a bot for the context of the number the last transfer read
        dialled (``GET /api/pool/<number>/context`` with the agent token), which claims it;
        the context is for ``pool`` and ``queue``, of transfer ``attempt``, shows the caller
        as ``caller``, gives a reason containing ``reason_contains``, a transcript with a
        line containing each of ``transcript_contains`` and the collected ``variables``,
        each when given."""
        if not self.dialled:
            raise Mismatch("no transfer was read yet, so no number to ask the context of")
        if not self.agent_token:
            raise Mismatch("no agent token to ask the context API with (--agent-token or AGENT_TOKEN)")
        url = self.bots.agent_url(f"/api/pool/{self.dialled}/context")
        headers = {"Authorization": f"Bearer {self.agent_token}"}
        try:
            timeout = aiohttp.ClientTimeout(total=TURN_SECONDS)
            async with self.bots.session.get(url, headers=headers, timeout=timeout) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Mismatch(f"the context API ({url}) did not answer: {type(e).__name__}: {e}") from None
        text = body[:300].decode(errors="replace")
        if status != 200:
            raise Mismatch(f"the context API answered HTTP {status} for {self.dialled}: {text}")
        try:
            context = json.loads(body)
        except ValueError:
            context = None
        if not isinstance(context, dict):
            raise Mismatch(f"the context API's answer for {self.dialled} is not a JSON object: {text}")
        if context.get("number") != self.dialled:
            raise Mismatch(f"asked for the context of {self.dialled}, got {context.get('number')!r}'s")
        expected = {"pool": pool, "queue": queue, "attempt": attempt, "caller": caller}
        for name, value in expected.items():
            if value is not None and context.get(name) != value:
                raise Mismatch(f"expected the context's {name} {value!r}, it is {context.get(name)!r}")
        reason = str(context.get("reason", ""))
        if reason_contains is not None and reason_contains not in reason:
            raise Mismatch(f"expected the context's reason to contain {reason_contains!r}, it is {reason!r}")
        lines = context.get("transcript")
        lines = lines if isinstance(lines, list) else []
        said = [str(line.get("text", "")) for line in lines if isinstance(line, dict)]
        lacking = [wanted for wanted in transcript_contains if not any(wanted in text for text in said)]
        if lacking:
            raise Mismatch(f"the context's transcript lacks {', '.join(map(repr, lacking))}: {said}")
        carried = context.get("variables")
        if variables is not None and carried != variables:
            raise Mismatch(f"expected the context to carry {variables}, it carries {carried}")
        return context

    async def expect_hangup(self, within: float = EXPECT_SECONDS) -> dict[str, Any]:
        """The bot's next activity ends the call (``endOfConversation``); the caller may
        still send after it, as a channel would post what was already on its way."""
        activity = await self.next_activity(within)
        if activity is None:
            raise Mismatch(
                f"expected the bot to hang up (endOfConversation); it sent nothing within {within:g} s"
            )
        if not is_hangup(activity):
            raise Mismatch(
                f"expected the bot to hang up (endOfConversation), the bot sent {describe(activity)}"
            )
        return activity

    async def expect_nothing(self, seconds: float) -> None:
        activity = await self.next_activity(seconds)
        if activity is not None:
            raise Mismatch(f"expected silence, the bot sent {describe(activity)}")

    def unread(self) -> list[dict[str, Any]]:
        """What the bot sent on this call that nobody has read."""
        return self.channel.for_conversation(self.id)[self.cursor :]


def check_silence(seconds: float) -> float:
    """``seconds`` when it is a silence a caller can keep; a ValueError that says why not."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_SILENCE:
        raise ValueError(f"seconds above 0, at most {MAX_SILENCE:g}; not {seconds!r}")
    return float(seconds)
