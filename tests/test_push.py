"""The signed webhook push (adapters/push.py), against a real aiohttp receiver on loopback:
what it receives and how it checks it, retries and give-ups, and that the call path never
waits on the receiver."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters import push
from adapters.push import EVENT_ID_HEADER, SIGNATURE_HEADER, Pusher, backoff, serialise, sign, verify
from tests.process import free_port

SECRET = "push-secret-for-tests-0123456789abcdef"
T = 1_700_000_000
HANG = -1  # a reply that never comes (until the test ends)
DOCUMENT: dict[str, Any] = {
    "call": "call-1",
    "caller": {"name": "Zoë", "number": "+14255550123"},
    "transcript": [{"from": "caller", "text": "agent please"}],
    "queue": "billing",
}


@dataclass
class Receiver:
    """A webhook receiver that answers from a script and records every request."""

    replies: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    seen: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # id, signature, type, body
    url: str = ""
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        self.seen.append((headers[EVENT_ID_HEADER], headers[SIGNATURE_HEADER], headers["Content-Type"], body))
        async with self.arrived:
            self.arrived.notify_all()
        reply = self.replies.pop(0) if self.replies else 200
        status, extra = reply if isinstance(reply, tuple) else (reply, {})
        if status == HANG:
            await self.release.wait()
            status = 200
        return web.Response(status=status, headers=extra)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: len(self.seen) >= count)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    app = web.Application()
    app.router.add_post("/hook", made.handle)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    made.url = str(server.make_url("/hook"))
    yield made
    made.release.set()
    await server.close()


@pytest.fixture
async def pushers() -> AsyncIterator[Callable[..., Pusher]]:
    """Makes pushers with fast retries, their workers running; closes them all at the end."""
    made: list[tuple[Pusher, asyncio.Task[None] | None]] = []

    def make(url: str, *, start: bool = True, **options: Any) -> Pusher:
        options = {"first_delay": 0.01, "max_delay": 0.05, "attempts": 3, **options}
        pusher = Pusher(url, SECRET, **options)
        made.append((pusher, pusher.start() if start else None))
        return pusher

    yield make
    for pusher, task in made:
        await pusher.close(flush_timeout=0)
        assert task is None or task.done()


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, float]]:
    """Every back-off the pushers choose: (the Retry-After they were given, the delay)."""
    chosen: list[tuple[str | None, float]] = []

    def recorded(attempt: int, retry_after: str | None, **options: Any) -> float:
        delay = backoff(attempt, retry_after, **options)
        chosen.append((retry_after, delay))
        return delay

    monkeypatch.setattr(push, "backoff", recorded)
    return chosen


async def settled(pusher: Pusher) -> dict[str, int]:
    async with asyncio.timeout(10):
        await pusher.join()
    return pusher.counts()


def ended(counts: dict[str, int]) -> int:
    """How many pushes have ended: each ends exactly one way."""
    return counts["sent"] + counts["failed"] + counts["rejected"] + counts["dropped"]


# -- what the receiver gets, and how it checks it


async def test_the_receiver_verifies_the_signature_and_gets_the_exact_document(
    receiver: Receiver, pushers: Callable[..., Pusher]
) -> None:
    pusher = pushers(receiver.url)
    pusher.submit("evt-1", DOCUMENT)

    assert await settled(pusher) == {"sent": 1, "retried": 0, "failed": 0, "rejected": 0, "dropped": 0}
    [(event_id, signature, content_type, body)] = receiver.seen
    assert (event_id, content_type) == ("evt-1", "application/json")
    assert verify(SECRET, signature, body)
    assert json.loads(body) == DOCUMENT
    assert body == json.dumps(DOCUMENT, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def test_verify_accepts_a_fresh_signature_within_the_tolerance_either_way() -> None:
    body = serialise(DOCUMENT)
    header = sign(SECRET, body, T)
    assert verify(SECRET, header, body, now=T)
    assert verify(SECRET, header, body, now=T + 300)
    assert verify(SECRET, header, body, now=T - 300)
    assert verify(SECRET, header.replace(",", ", "), body, now=T)
    assert verify(SECRET, header, body, now=T + 30, tolerance_seconds=60)


def test_verify_rejects_a_tampered_body_a_wrong_secret_and_stale_or_future_timestamps() -> None:
    body = serialise(DOCUMENT)
    header = sign(SECRET, body, T)
    assert not verify(SECRET, header, body.replace(b"billing", b"sales"), now=T)
    assert not verify(SECRET, header, body + b" ", now=T)
    assert not verify("another-secret-0123456789abcdef", header, body, now=T)
    assert not verify(SECRET, header, body, now=T + 301)  # stale: a replay
    assert not verify(SECRET, header, body, now=T - 301)  # from the future
    assert not verify(SECRET, header, body, now=T + 61, tolerance_seconds=60)
    # the timestamp is signed: a fresh one on an old signature does not pass
    assert not verify(SECRET, header.replace(f"t={T}", f"t={T + 400}"), body, now=T + 400)


def digest(timestamp: int = T) -> str:
    return sign(SECRET, serialise(DOCUMENT), timestamp).partition("v1=")[2]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"t={T}",
        f"v1={digest()}",
        f"t=,v1={digest()}",
        f"t={T},v1",
        f"t={T};v1={digest()}",
        f"t={T},t={T},v1={digest()}",
        f"t=-{T},v1={digest()}",
        f"t={T}.0,v1={digest()}",
        f"t=0x{T:x},v1={digest()}",
        f"t={''.join(chr(ord(c) + 0xFEE0) for c in str(T))},v1={digest()}",  # fullwidth digits
        f"t={T},v1=",
        f"t={T},v1=é{digest()}",
        f"t={T},v1={digest().upper()}",
        f"t={T},v0={digest()}",
    ],
)
def test_verify_rejects_malformed_headers(header: str) -> None:
    assert not verify(SECRET, header, serialise(DOCUMENT), now=T)


def test_verify_accepts_any_of_several_signatures_while_secrets_rotate() -> None:
    body = serialise(DOCUMENT)
    old = sign("the-old-secret-0123456789abcdef", body, T).partition(",")[2]
    new = sign(SECRET, body, T).partition(",")[2]
    assert verify(SECRET, f"t={T},{old},{new}", body, now=T)
    assert verify(SECRET, f"t={T},{new},{old}", body, now=T)
    assert verify(SECRET, f"t={T},v2=future-scheme,{new}", body, now=T)
    assert not verify(SECRET, f"t={T},{old},{old}", body, now=T)


# -- retries and give-ups


async def test_a_push_answered_500_twice_is_retried_and_delivered_once(
    receiver: Receiver, pushers: Callable[..., Pusher], delays: list[tuple[str | None, float]]
) -> None:
    receiver.replies = [500, 500, 200]
    ticks = itertools.count(T, 7)
    pusher = pushers(receiver.url, clock=lambda: next(ticks))
    pusher.submit("evt-1", DOCUMENT)

    assert await settled(pusher) == {"sent": 1, "retried": 2, "failed": 0, "rejected": 0, "dropped": 0}
    assert [event_id for event_id, *_ in receiver.seen] == ["evt-1"] * 3  # the receiver de-duplicates by it
    assert len({body for *_, body in receiver.seen}) == 1  # the same bytes every time
    stamps = [int(signature.split(",")[0].removeprefix("t=")) for _, signature, _, _ in receiver.seen]
    assert stamps == [T, T + 7, T + 14]  # each try signed anew
    for stamp, (_, signature, _, body) in zip(stamps, receiver.seen, strict=True):
        assert verify(SECRET, signature, body, now=stamp)
    assert [retry_after for retry_after, _ in delays] == [None, None]
    assert all(0 <= delay <= 0.05 for _, delay in delays)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_temporary_failures_are_retried(
    receiver: Receiver, pushers: Callable[..., Pusher], status: int
) -> None:
    receiver.replies = [status, 200]
    pusher = pushers(receiver.url)
    pusher.submit("evt-1", DOCUMENT)
    assert await settled(pusher) == {"sent": 1, "retried": 1, "failed": 0, "rejected": 0, "dropped": 0}


async def test_a_429_with_retry_after_waits_what_the_receiver_asks(
    receiver: Receiver, pushers: Callable[..., Pusher], delays: list[tuple[str | None, float]]
) -> None:
    receiver.replies = [(429, {"Retry-After": "0"}), 200]
    pusher = pushers(receiver.url, first_delay=60, max_delay=60)  # back-off alone could wait a minute
    pusher.submit("evt-1", DOCUMENT)
    assert await settled(pusher) == {"sent": 1, "retried": 1, "failed": 0, "rejected": 0, "dropped": 0}
    assert delays == [("0", 0.0)]
    assert len(receiver.seen) == 2


async def test_a_push_nobody_accepts_is_retried_then_failed_and_logged_without_its_body(
    pushers: Callable[..., Pusher], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.push")
    pusher = pushers(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    pusher.submit("evt-refused", DOCUMENT)

    assert await settled(pusher) == {"sent": 0, "retried": 2, "failed": 1, "rejected": 0, "dropped": 0}
    assert "evt-refused failed after 3 tries" in caplog.text
    assert "Zoë" not in caplog.text and "billing" not in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(pusher)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 301, 307])
async def test_a_final_answer_is_not_retried(
    receiver: Receiver, pushers: Callable[..., Pusher], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.replies = [status]
    pusher = pushers(receiver.url)
    pusher.submit("evt-1", DOCUMENT)
    assert await settled(pusher) == {"sent": 0, "retried": 0, "failed": 0, "rejected": 1, "dropped": 0}
    assert len(receiver.seen) == 1
    assert f"evt-1 rejected by the receiver: HTTP {status}" in caplog.text


def highest(low: float, high: float) -> float:
    return high


def lowest(low: float, high: float) -> float:
    return low


def test_back_off_is_exponential_with_full_jitter_and_capped() -> None:
    ceiling = [backoff(n, None, first_delay=0.5, max_delay=30, rng=highest) for n in range(1, 9)]
    assert ceiling == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert {backoff(n, None, first_delay=0.5, max_delay=30, rng=lowest) for n in range(1, 9)} == {0}
    assert backoff(1, "7", first_delay=0.5, max_delay=30) == 7
    assert backoff(1, "120", first_delay=0.5, max_delay=30) == 30
    # an HTTP date, or nonsense, is not seconds: back-off as if none came
    for given in ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "1.5", ""]:
        assert backoff(3, given, first_delay=0.5, max_delay=30, rng=highest) == 2


# -- the call path never waits


async def test_submit_returns_at_once_while_the_receiver_hangs_and_overflow_drops_the_oldest(
    receiver: Receiver, pushers: Callable[..., Pusher]
) -> None:
    assert not inspect.iscoroutinefunction(Pusher.submit)
    receiver.replies = [HANG] * 100
    pusher = pushers(receiver.url, queue_max=10, concurrency=4, timeout=3600)
    await asyncio.sleep(0)  # the worker waits for pushes

    for n in range(100):
        pusher.submit(f"evt-{n}", DOCUMENT)  # never yields to the loop: nothing is sent yet
    assert pusher.counts()["dropped"] == 90  # the queue holds the newest 10

    await receiver.until(4)  # as many in flight as allowed, all hanging
    await asyncio.sleep(0.05)  # room for a fifth, which must not come
    assert sorted(event_id for event_id, *_ in receiver.seen) == [f"evt-{n}" for n in range(90, 94)]
    assert pusher.counts()["dropped"] == 90

    for n in range(100, 105):  # 6 queued: room for 4 more, then the oldest queued goes
        pusher.submit(f"evt-{n}", DOCUMENT)
    assert pusher.counts()["dropped"] == 91


async def test_a_full_queue_drops_its_oldest_push(receiver: Receiver, pushers: Callable[..., Pusher]) -> None:
    pusher = pushers(receiver.url, start=False, queue_max=3, concurrency=1)
    for n in range(5):
        pusher.submit(f"evt-{n}", DOCUMENT)
    assert pusher.counts()["dropped"] == 2

    worker = pusher.start()
    counts = await settled(pusher)
    assert counts == {"sent": 3, "retried": 0, "failed": 0, "rejected": 0, "dropped": 2}
    assert [event_id for event_id, *_ in receiver.seen] == ["evt-2", "evt-3", "evt-4"]
    await pusher.close()
    assert worker.done()


async def test_close_returns_within_its_bound_while_the_receiver_hangs(
    receiver: Receiver, pushers: Callable[..., Pusher]
) -> None:
    receiver.replies = [HANG] * 10
    pusher = pushers(receiver.url, concurrency=2, timeout=3600)
    for n in range(5):
        pusher.submit(f"evt-{n}", DOCUMENT)
    await receiver.until(2)

    async with asyncio.timeout(10):  # a safety net: the bound is close()'s own
        await pusher.close(flush_timeout=0.05)
    counts = pusher.counts()
    assert counts == {"sent": 0, "retried": 0, "failed": 0, "rejected": 0, "dropped": 5}

    pusher.submit("evt-late", DOCUMENT)  # after close: counted, not raised
    assert pusher.counts()["dropped"] == 6
    assert len(receiver.seen) == 2


async def test_close_flushes_what_is_queued(receiver: Receiver, pushers: Callable[..., Pusher]) -> None:
    receiver.replies = [503]
    pusher = pushers(receiver.url, concurrency=1)
    for n in range(3):
        pusher.submit(f"evt-{n}", DOCUMENT)
    await pusher.close(flush_timeout=10)
    assert pusher.counts() == {"sent": 3, "retried": 1, "failed": 0, "rejected": 0, "dropped": 0}


async def test_the_worker_is_cancelled_cleanly(receiver: Receiver, pushers: Callable[..., Pusher]) -> None:
    receiver.replies = [HANG]
    pusher = pushers(receiver.url, start=False, timeout=3600, concurrency=1)
    worker = asyncio.create_task(pusher.run())  # as an app may run it, without start()
    pusher.submit("evt-0", DOCUMENT)
    pusher.submit("evt-1", DOCUMENT)
    await receiver.until(1)

    worker.cancel()
    await asyncio.wait({worker})
    assert worker.cancelled()
    assert pusher.counts()["dropped"] == 1  # the one in flight; the queued one waits for close()
    await pusher.close()
    counts = pusher.counts()
    assert counts["dropped"] == 2 and ended(counts) == 2


async def test_submit_never_raises_on_a_bad_push(pushers: Callable[..., Pusher]) -> None:
    pusher = pushers("http://127.0.0.1:9/hook", start=False)
    pusher.submit("evt-0", {"when": object()})
    pusher.submit("evt-1", {"ratio": float("nan")})
    pusher.submit("evt-2\r\nX-Injected: 1", DOCUMENT)
    pusher.submit("", DOCUMENT)
    pusher.submit(7, DOCUMENT)  # type: ignore[arg-type]
    assert pusher.counts() == {"sent": 0, "retried": 0, "failed": 5, "rejected": 0, "dropped": 0}


def test_a_pusher_needs_an_http_url_and_a_secret() -> None:
    for url, secret in [("ftp://example.com/", SECRET), ("/relative", SECRET), ("http://example.com/", "")]:
        with pytest.raises(ValueError):
            Pusher(url, secret)
