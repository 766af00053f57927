"""A dead instance's pool numbers come back, on real bot processes on the real Redis.

Instance A leases numbers for warm transfers and is killed (``kill -9``, its pid only):
two calls had committed their transfers (their no-answer watchdogs are timers in Redis),
and one had its number leased but died before committing (the window the lease's lapse
is for: no timer, nobody to give it back). Instance B, alive throughout, fails the two
orphaned transfers by their watchdogs (their callers hear the retry prompt) and gives
their numbers back; the third number lapses at its lease's ``until`` (Redis time), no
earlier. Callers on B, holding because the pool is exhausted, lease all three again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from adapters.keys import CallField, Keyspace
from adapters.pool import POOL_SCRIPT, Lease, PoolStatus, PoolStore
from adapters.store import decode_step
from simulator.call import is_transfer, target_of
from simulator.channel import Caller, ChannelStandIn
from tests.conftest import REAL_REDIS_URL, delete_prefix, real_redis_or_skip
from tests.process import BotProcess, flow_doc, write_flow
from tests.proxy import ReplyLosingProxy

pytestmark = pytest.mark.real_redis

POOL = "agents"
WATCHDOG_SECONDS = 3.0  # the queue's no-answer watchdog
GRACE_SECONDS = 1.0  # the pool's grace: a lease lasts watchdog + grace
HOLD_SECONDS = 0.5  # an exhausted pool's hold before leasing again
AGENT_TOKEN = "agent-token-for-pool-instances-0123"
OPERATOR_TOKEN = "operator-token-for-pool-instances-0123"
RETRY = "the agent could not take your call"
HOLD = "All our agents are busy"


class ReplyHoldingProxy(ReplyLosingProxy):
    """Once ``armed``, the next connection that runs the script ``sha`` never gets its reply
    (nor anything after it): the server has run the script and the client waits, until the
    test kills it, as a machine dying just then. The connection stays open, so the client
    does not retry on another. Its url is ``target``'s (user, password, database) but for
    the proxy's address."""

    def __init__(self, target: str, sha: str) -> None:
        self.target = urlsplit(target)
        super().__init__(self.target.port or 6379, sha, host=self.target.hostname or "127.0.0.1")
        self.armed = False
        self.held = asyncio.Event()

    @property
    def url(self) -> str:
        netloc = self.target.netloc.rpartition("@")
        auth = netloc[0] + "@" if netloc[0] else ""
        return urlunsplit(self.target._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    def _arm(self) -> bool:
        armed, self.armed = self.armed, False  # the next one only
        return armed

    async def _lose_reply(self) -> None:
        self.held.set()
        await asyncio.Event().wait()  # the reply never arrives; the connection stays


@dataclass(frozen=True)
class Sample:
    """The pool's leases at one moment, Redis time (ms), read atomically with it."""

    now: int
    leases: dict[str, Lease]


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def sample(redis: Redis, keys: Keyspace) -> Sample:
    async with redis.pipeline(transaction=True) as pipe:  # MULTI: TIME and the leases at once
        pipe.time()
        pipe.hgetall(keys.pool(POOL).leases)
        (seconds, micros), raw = await pipe.execute()
    now = int(seconds) * 1000 + int(micros) // 1000
    return Sample(now, {number: Lease.parse(number, lease) for number, lease in raw.items()})


async def post(session: aiohttp.ClientSession, bot: BotProcess, activity: dict[str, Any]) -> int:
    async with session.post(f"{bot.url}/api/messages", json=activity) as response:
        return response.status


def texts(channel: ChannelStandIn, caller: Caller) -> list[str]:
    return [str(a.get("text") or "") for a in channel.for_conversation(caller.conversation_id)]


def dialled(channel: ChannelStandIn, caller: Caller) -> str:
    transfers = [a for a in channel.for_conversation(caller.conversation_id) if is_transfer(a)]
    return target_of(transfers[-1]) if transfers else ""


async def heard(channel: ChannelStandIn, caller: Caller, text: str, within: float = 15) -> None:
    async with asyncio.timeout(within):
        while not any(text in said for said in texts(channel, caller)):
            count = len(channel.for_conversation(caller.conversation_id))
            await channel.wait_for(count + 1, caller.conversation_id, within)


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await delete_prefix(client, key_prefix)
    await client.aclose()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_a_dead_instances_numbers_come_back_by_the_watchdog_or_by_lapse_and_b_leases_them(
    redis: Redis,
    key_prefix: str,
    tmp_path: Path,
    channel: ChannelStandIn,
    session: aiohttp.ClientSession,
) -> None:
    flow = flow_doc("warm-transfer.yaml")
    flow["speaking_rate"] = 1000  # prompts said at once: a hold lasts its seconds
    queue = flow["queues"]["agents"]
    queue["timeout_seconds"] = WATCHDOG_SECONDS
    queue["pool_exhausted"].update(then="hold", seconds=HOLD_SECONDS, max=40)
    flow["pools"][POOL]["grace_seconds"] = GRACE_SECONDS
    numbers: list[str] = flow["pools"][POOL]["numbers"]
    assert len(numbers) == 3
    env = {
        "REDIS_KEY_PREFIX": key_prefix,
        "CALLFLOW_FILE": write_flow(tmp_path, flow),
        "VARIABLES_KEYS": Fernet.generate_key().decode(),
        "AGENT_TOKEN": AGENT_TOKEN,
        "OPERATOR_TOKEN": OPERATOR_TOKEN,
        "SCHEDULER_POLL_SECONDS": "0.1",
    }
    keys = Keyspace(key_prefix)
    pools = PoolStore(redis, keys)
    sha = await redis.script_load(POOL_SCRIPT)  # loaded: A's first run of it is an EVALSHA
    proxy = await ReplyHoldingProxy(REAL_REDIS_URL, sha).start()
    a = BotProcess({**env, "REDIS_URL": proxy.url}, tmp_path, "a")
    b = BotProcess({**env, "REDIS_URL": REAL_REDIS_URL}, tmp_path, "b")
    try:
        await asyncio.gather(a.start(), b.start())

        # On A: two calls transfer (leases committed, watchdogs in Redis) ...
        transferred = [Caller(channel.url, number=f"+1425555{n:04d}") for n in (301, 302)]
        for caller in transferred:
            assert await post(session, a, caller.start()) == 201, a.log()
            assert await post(session, a, caller.say("agent")) == 201, a.log()
        deadline = {}
        for caller in transferred:
            assert dialled(channel, caller) in numbers
            record = await redis.hgetall(keys.call(caller.conversation_id).call)
            assert record[CallField.STATE] == "transferring"
            deadline[caller.conversation_id] = int(record[CallField.DEADLINE])
        # ... and a third leases its number, but A dies before it commits the transfer.
        orphan = Caller(channel.url, number="+14255550303")
        assert await post(session, a, orphan.start()) == 201, a.log()
        proxy.armed = True
        asking = asyncio.create_task(post(session, a, orphan.say("agent")))
        await asyncio.wait_for(proxy.held.wait(), 10)
        a.kill()
        assert a.proc is not None and a.proc.returncode == -9
        with pytest.raises(aiohttp.ClientError):
            await asking  # the channel never hears back

        before = await sample(redis, keys)
        assert await pools.status(POOL, numbers) == PoolStatus(free=0, leased=3, claimed=0, lapsed=0)
        held_by = {lease.call: lease for lease in before.leases.values()}
        assert set(held_by) == {c.conversation_id for c in [*transferred, orphan]}
        lost = held_by[orphan.conversation_id]  # no commit: no timer, nobody to give it back
        assert lost.until - lost.since == (WATCHDOG_SECONDS + GRACE_SECONDS) * 1000
        assert await redis.hget(keys.call(orphan.conversation_id).call, CallField.STATE) == "bot"

        # On B: three callers ask for an agent; every number is held, so they hold and lease again.
        waiting = [Caller(channel.url, number=f"+1425555{n:04d}") for n in (401, 402, 403)]
        for caller in waiting:
            assert await post(session, b, caller.start()) == 201, b.log()
            assert await post(session, b, caller.say("agent")) == 201, b.log()
            assert HOLD in texts(channel, caller)[-1] and not dialled(channel, caller)

        samples: list[Sample] = []
        statuses: list[tuple[int, PoolStatus, int]] = []  # (Redis time before, the lost number's, after)

        done = asyncio.Event()

        async def watch() -> None:
            # Stopped by an event, not cancelled: redis-py can lose a cancellation (gh-86296).
            while not done.is_set():
                samples.append(await sample(redis, keys))
                start = await redis_ms(redis)
                status = await pools.status(POOL, [lost.number])
                statuses.append((start, status, await redis_ms(redis)))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(20):
                while not all(dialled(channel, caller) for caller in waiting):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            said = {caller.number: texts(channel, caller) for caller in [*transferred, orphan, *waiting]}
            pytest.fail(f"B's callers did not all get a number: {said}\n{samples[-1]}\n{b.log()[-5000:]}")
        finally:
            done.set()
            await asyncio.wait_for(watcher, 10)
        after = await sample(redis, keys)
        for caller in transferred:
            await heard(channel, caller, RETRY)
        # B reclaimed one lapsed lease (never given back), and leased three numbers in all.
        metrics = {
            name: await b.metric(f"cc_pool_{name}_total", OPERATOR_TOKEN)
            for name in ("lapses", "leases", "exhausted")
        }
    finally:
        a.kill()
        b.stop()
        await proxy.stop()

    logs = f"A:\n{a.log()[-3000:]}\nB:\n{b.log()[-3000:]}"
    # B's calls hold all three numbers now, one each.
    new = {lease.call: lease for lease in after.leases.values()}
    assert set(new) == {c.conversation_id for c in waiting}, logs
    assert {dialled(channel, c) for c in waiting} == set(numbers)
    for caller in waiting:
        assert new[caller.conversation_id].number == dialled(channel, caller)

    figures = []
    # The transfers A committed: B's watchdog failed each at its deadline (Redis time), its
    # caller heard the retry prompt, and its number was leased again only after that.
    for caller in transferred:
        call = keys.call(caller.conversation_id)
        record = await redis.hgetall(call.call)
        assert (record[CallField.STATE], record[CallField.FAILURE]) == ("failed", "timeout"), logs
        steps = [decode_step(str(raw)) for raw in await redis.lrange(call.history, 0, -1)]
        (failed,) = [s for s in steps if (s["from"], s["to"]) == ("transferring", "failed")]
        assert failed["at"] >= deadline[caller.conversation_id]
        old = held_by[caller.conversation_id]
        (taker,) = [lease for lease in after.leases.values() if lease.number == old.number]
        assert taker.since >= failed["at"]  # given back by the failure, not before
        figures.append(
            f"{old.number}: watchdog {failed['at'] - deadline[caller.conversation_id]} ms after its "
            f"deadline, leased again {taker.since - failed['at']} ms after the failure "
            f"({old.until - taker.since} ms before its lease would have lapsed)"
        )
    # The lease A took and never committed: held until its 'until', lapsed then, no earlier.
    (taker,) = [lease for lease in after.leases.values() if lease.number == lost.number]
    assert taker.since >= lost.until, (taker, lost)
    for moment in samples:
        if moment.now < lost.until:
            assert moment.leases.get(lost.number) == lost, moment
    early = [s for start, s, end in statuses if end < lost.until and s != PoolStatus(0, 1, 0, 0)]
    assert not early, early  # before its until the status says it is leased, every time
    # Seen lapsed: the script read Redis TIME at or after its until, so before the read's end.
    lapsed_seen = [end - lost.until for _, s, end in statuses if s.lapsed]
    assert all(late >= 0 for late in lapsed_seen)
    first = f"first by {min(lapsed_seen)} ms after its until, " if lapsed_seen else ""
    figures.append(
        f"{lost.number}: leased again {taker.since - lost.until} ms after its until (status showed "
        f"it lapsed {first}in {len(lapsed_seen)} of {len(statuses)} samples, never before)"
    )
    # The watchdog of the call that never committed has nothing to fire: nothing was sent to it.
    assert not dialled(channel, orphan)
    assert metrics["lapses"] == 1 and metrics["leases"] == 3 and metrics["exhausted"] >= 3, (metrics, logs)
    print("\n".join(["", *figures]))  # pytest -s shows how late each number came back
