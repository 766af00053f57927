"""The signed webhook push: a warm transfer's context document, POSTed to ``PUSH_URL``.

A push must never delay a call, so the call path only ``submit``s (no I/O, no await) to a
bounded queue, and a worker task delivers in the background, retrying what may succeed
later. Each request is signed the way Stripe signs webhooks, and carries an event id that
stays the same on every retry, so a receiver can tell a retry from a new event
(docs/warm-transfer-push.md).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-CC-Signature"
EVENT_ID_HEADER = "X-CC-Event-Id"
RESULTS = ("sent", "retried", "failed", "rejected", "dropped")  # the keys of Pusher.counts()
RETRIED_STATUSES = frozenset({408, 429})  # besides 5xx: the receiver may take it later


class _Push(NamedTuple):
    event_id: str
    body: bytes  # serialised once: every try sends exactly these bytes


def serialise(document: dict[str, Any]) -> bytes:
    """The body: compact, key-sorted, strict JSON (no NaN), UTF-8."""
    return json.dumps(
        document, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    signed = f"{timestamp}.".encode("ascii") + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-CC-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``.

    The timestamp is inside the signed text, so a captured request cannot be replayed
    later with a fresh one."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance_seconds: int = 300, now: float | None = None
) -> bool:
    """What a receiver does: True when ``header`` signs ``body`` with ``secret``, recently.

    ``body`` must be the raw request bytes, before any JSON parsing. The timestamp may be
    at most ``tolerance_seconds`` off this host's clock either way (a replay window), and
    any one of several ``v1=`` entries may match (a sender signing with an old and a new
    secret while they rotate). A malformed header is False, never an error. To accept
    several secrets of your own, call this once per secret."""
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
        # other schemes (a future v2) are not ours to judge: skipped, as Stripe's are
    if len(timestamps) != 1 or not signatures:
        return False
    stamp = timestamps[0]
    if not (stamp.isascii() and stamp.isdigit()):
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    expected = _digest(secret, timestamp, body).encode("ascii")
    # compare with every entry, not stopping at a match: the time taken tells nothing
    matched = [hmac.compare_digest(expected, given.encode("utf-8", "replace")) for given in signatures]
    return any(matched)


def backoff(
    attempt: int,
    retry_after: str | None,
    *,
    first_delay: float,
    max_delay: float,
    rng: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after failed try number ``attempt`` (from 1).

    The receiver's ``Retry-After`` (delta-seconds; an HTTP date is ignored) when it gives
    one, else exponential back-off with full jitter, so that many pushers failing at once
    do not retry in step. Either way at most ``max_delay``."""
    if retry_after is not None:
        seconds = retry_after.strip()
        if seconds.isascii() and seconds.isdigit():
            return min(float(seconds), max_delay)
    return rng(0.0, min(max_delay, first_delay * 2 ** (attempt - 1)))


class Pusher:
    """Delivers pushes in the background: ``submit`` on the call path, ``run`` as a task.

    Every submitted push ends as exactly one of ``sent``, ``failed`` (gave up after
    ``attempts`` tries, or not serialisable), ``rejected`` (a final answer: a 4xx other
    than 408 and 429, or a redirect, which is not followed) or ``dropped`` (pushed out of
    a full queue by a newer one, or still undelivered at ``close``); ``retried`` counts
    the tries after the first."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        attempts: int = 5,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        timeout: float = 5.0,
        queue_max: int = 1000,
        concurrency: int = 4,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        target = URL(url)
        if not target.absolute or target.scheme not in ("http", "https"):
            raise ValueError("the push URL must be an absolute http(s) URL")
        if not secret:
            raise ValueError("the push secret must not be empty: pushes are always signed")
        if min(attempts, queue_max, concurrency) < 1:
            raise ValueError("attempts, queue_max and concurrency must each be at least 1")
        self.url = url
        self._secret = secret
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._session_factory = session_factory or self._default_session
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._queue: asyncio.Queue[_Push] = asyncio.Queue(maxsize=queue_max)
        # one slot per push in flight: a slow receiver holds at most this many
        self._slots = asyncio.Semaphore(concurrency)
        self._sending: set[asyncio.Task[str]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._counts = dict.fromkeys(RESULTS, 0)

    def __repr__(self) -> str:
        # the origin only: a URL's path or query may hold a token of the receiver's
        return f"Pusher(to={URL(self.url).origin()}, queued={self._queue.qsize()}, counts={self._counts})"

    def counts(self) -> dict[str, int]:
        """A copy of the counters, by result (for ``cc_push_total{result}``)."""
        return dict(self._counts)

    def submit(self, event_id: str, document: dict[str, Any]) -> None:
        """Queue a push; returns at once, never raises, never waits on the receiver.

        The document is serialised now, so later changes to it are not sent. When the
        queue is full the oldest queued push is dropped: the newest context matters most."""
        try:
            if not (event_id and event_id.isascii() and event_id.isprintable()):
                raise ValueError("the event id must be printable ASCII, to go in a header")
            push = _Push(event_id, serialise(document))
        except Exception as e:  # a bug of the caller's: the call goes on regardless
            self._counts["failed"] += 1
            log.error("push %r not sent: %s", event_id, e)  # the error names types, not values
            return
        if self._closed:
            self._drop(push, "the pusher is closed")
            return
        if self._queue.full():
            self._drop(self._queue.get_nowait(), "the queue is full")
            self._queue.task_done()
        self._queue.put_nowait(push)

    def _drop(self, push: _Push, why: str) -> None:
        self._counts["dropped"] += 1
        log.warning("push %s dropped: %s", push.event_id, why)

    async def join(self) -> None:
        """Wait until every push submitted so far has ended (sent, failed, rejected or dropped)."""
        await self._queue.join()

    def start(self) -> asyncio.Task[None]:
        """``run`` as a task that ``close`` knows from the start, even before it first runs."""
        self._worker = asyncio.create_task(self.run(), name="pusher")
        return self._worker

    async def run(self) -> None:
        """The worker: takes pushes from the queue and sends a few at a time, until cancelled.

        Prefer ``start``: ``close`` flushes only through a worker it knows of, and knows of
        a task running this only once the task has begun."""
        self._worker = asyncio.current_task()
        try:
            while True:
                # a slot first, then a push: while every slot is busy, pushes stay in the
                # queue, where newer ones can still push out the oldest
                await self._slots.acquire()
                try:
                    push = await self._queue.get()
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.create_task(self._send(push), name=f"push {push.event_id}")
                self._sending.add(task)
                task.add_done_callback(functools.partial(self._settle, push))
        finally:
            for task in self._sending:
                task.cancel()
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def close(self, *, flush_timeout: float = 2.0) -> None:
        """Stop the worker after letting it flush the queue for at most ``flush_timeout``
        seconds; what is still undelivered then is dropped. Closes the HTTP session."""
        self._closed = True
        worker = self._worker
        if worker is not None and not worker.done():
            try:
                async with asyncio.timeout(flush_timeout):
                    await self._queue.join()
            except TimeoutError:
                pass
            worker.cancel()
            await asyncio.wait({worker})  # not ``await worker``: our own cancellation must still reach us
        while not self._queue.empty():  # never started, or stopped before it got to these
            self._drop(self._queue.get_nowait(), "still queued at close")
            self._queue.task_done()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _default_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    def _settle(self, push: _Push, task: asyncio.Task[str]) -> None:
        """Counts a push's end and frees its slot: a done callback, so that it runs even
        for a task cancelled before it started."""
        self._sending.discard(task)
        self._slots.release()
        self._queue.task_done()
        if task.cancelled():
            self._drop(push, "stopped while sending")
        elif (error := task.exception()) is not None:  # a bug; the body stays out of the log
            self._counts["failed"] += 1
            log.error("push %s failed unexpectedly", push.event_id, exc_info=error)
        else:
            self._counts[task.result()] += 1

    async def _send(self, push: _Push) -> str:
        """Tries until an answer is final or the tries run out: the result to count."""
        if self._session is None:
            self._session = self._session_factory()
        for attempt in range(1, self.attempts + 1):
            retry_after: str | None = None
            headers = {
                "Content-Type": "application/json",
                EVENT_ID_HEADER: push.event_id,
                SIGNATURE_HEADER: sign(self._secret, push.body, int(self._clock())),  # fresh each try
            }
            try:
                async with self._session.post(
                    self.url,
                    data=push.body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                    allow_redirects=False,  # a redirect would re-send the signed body elsewhere
                ) as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = type(e).__name__
            else:
                if 200 <= status < 300:
                    return "sent"
                if status < 500 and status not in RETRIED_STATUSES:
                    log.warning("push %s rejected by the receiver: HTTP %d", push.event_id, status)
                    return "rejected"
                reason = f"HTTP {status}"
            if attempt == self.attempts:
                log.warning("push %s failed after %d tries, last: %s", push.event_id, attempt, reason)
                return "failed"
            self._counts["retried"] += 1
            delay = backoff(attempt, retry_after, first_delay=self.first_delay, max_delay=self.max_delay)
            log.info("push %s try %d: %s; again in %.2f s", push.event_id, attempt, reason, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last try returns")
