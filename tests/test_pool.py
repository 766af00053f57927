"""Number pool leases, on the embedded fake, a real Redis server and a Redis Cluster alike."""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from adapters.keys import Keyspace
from adapters.pool import Lease, PoolStatus, PoolStore
from orchestrator.errors import StoreUnavailable

POOL = "agents"
NUMBERS = [f"+1425555{i:04d}" for i in range(20)]
LONG = 30.0  # a lease no test outlives
SHORT = 0.2  # a lease a test waits out


@pytest.fixture
def pool(redis_client: Redis, key_prefix: str) -> PoolStore:
    return PoolStore(redis_client, Keyspace(key_prefix))


@pytest.fixture
def instances(instance_clients: list[Redis | RedisCluster], key_prefix: str) -> list[PoolStore]:
    """Three instances' stores, each on a client of its own to the same Redis."""
    return [PoolStore(client, Keyspace(key_prefix)) for client in instance_clients]


async def check_invariants(redis: Redis, store: PoolStore) -> None:
    """The holders index points at exactly the leases stored, and each held number comes
    free at its lease's end."""
    keys = store.keys.pool(POOL)
    leases: dict[str, str] = await redis.hgetall(keys.leases)  # type: ignore[assignment]
    holders: dict[str, str] = await redis.hgetall(keys.holders)  # type: ignore[assignment]
    expected = {}
    for number, raw in leases.items():
        lease = Lease.parse(number, raw)
        expected[lease.call, lease.key] = number
        assert await redis.zscore(keys.free_at, number) == lease.until
    assert {tuple(json.loads(holder)): number for holder, number in holders.items()} == expected


async def wait_for(store: PoolStore, done: Callable[[PoolStatus], bool]) -> PoolStatus:
    """The pool's status once ``done`` holds (leases lapse by Redis time, so poll it)."""
    for _ in range(200):
        status = await store.status(POOL, NUMBERS)
        if done(status):
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"the pool never got there: {status}")


def test_a_pools_keys_share_one_slot_and_its_name_cannot_move_it() -> None:
    keys = Keyspace("cc")
    for name in ["agents", "sales-EU_2"]:
        assert len({key_slot(k.encode()) for k in keys.pool(name)}) == 1
    assert keys.pool("a").leases != keys.pool("b").leases
    for bad in ["", "a}b", "{x}", "a:b", "é"]:
        with pytest.raises(ValueError, match="pool name"):
            keys.pool(bad)


async def test_a_lease_is_idempotent_by_call_and_key(pool: PoolStore, redis_client: Redis) -> None:
    first = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG)
    assert first is not None and first.number == NUMBERS[0]
    assert (first.call, first.key, first.claimed) == ("c1", "t1", 0)
    assert first.until - first.since == LONG * 1000
    again = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG)  # a rerun turn: the same number,
    assert again is not None and (again.number, again.since) == (first.number, first.since)
    assert again.until >= first.until  # for as long from now (its commit comes later)
    retry = await pool.lease(POOL, NUMBERS, "c1", "t2", LONG)  # the call's next attempt
    other = await pool.lease(POOL, NUMBERS, "c2", "t1", LONG)
    assert retry is not None and other is not None
    assert [retry.number, other.number] == NUMBERS[1:3]
    assert await pool.status(POOL, NUMBERS) == PoolStatus(free=17, leased=3, claimed=0, lapsed=0)
    await check_invariants(redis_client, pool)


async def test_an_exhausted_pool_leases_nothing_until_a_number_is_released(pool: PoolStore) -> None:
    numbers = NUMBERS[:2]
    held = [await pool.lease(POOL, numbers, f"c{i}", "t", LONG) for i in range(2)]
    assert await pool.lease(POOL, numbers, "c2", "t", LONG) is None
    assert held[1] is not None
    assert await pool.release(POOL, held[1].number, "c1", "t") is not None
    again = await pool.lease(POOL, numbers, "c2", "t", LONG)
    assert again is not None and again.number == held[1].number


async def test_only_the_holder_releases(pool: PoolStore, redis_client: Redis) -> None:
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG)
    assert lease is not None
    assert await pool.release(POOL, lease.number, "c2", "t1") is None
    assert await pool.release(POOL, lease.number, "c1", "t2") is None
    assert await pool.release(POOL, NUMBERS[5], "c1", "t1") is None
    assert (await pool.status(POOL, NUMBERS)).leased == 1
    ended = await pool.release(POOL, lease.number, "c1", "t1")
    assert ended is not None and lease.since <= ended < lease.until
    assert await pool.release(POOL, lease.number, "c1", "t1") is None  # once
    assert await pool.status(POOL, NUMBERS) == PoolStatus(free=20, leased=0, claimed=0, lapsed=0)
    await check_invariants(redis_client, pool)


async def test_the_number_free_longest_goes_first(pool: PoolStore) -> None:
    numbers = NUMBERS[:3]
    for i in range(3):
        await pool.lease(POOL, numbers, f"c{i}", "t", LONG)
    for i in (1, 0):  # numbers[1] is free the longest, then numbers[0]
        await pool.release(POOL, numbers[i], f"c{i}", "t")
        await asyncio.sleep(0.005)  # free times are in ms: the same ms would tie (then in order)
    picked = [await pool.lease(POOL, numbers, f"n{i}", "t", LONG) for i in range(3)]
    assert [p.number if p else None for p in picked] == [numbers[1], numbers[0], None]
    # A number never leased is free longest of all.
    fresh = await pool.lease(POOL, [*numbers, NUMBERS[3]], "n3", "t", LONG)
    assert fresh is not None and fresh.number == NUMBERS[3]


async def test_a_lapsed_lease_is_reclaimed_and_its_late_release_frees_nothing(
    pool: PoolStore, redis_client: Redis
) -> None:
    numbers = NUMBERS[:1]
    dead = await pool.lease(POOL, numbers, "dead", "t", SHORT)  # its instance dies holding it
    assert dead is not None and await pool.lease(POOL, numbers, "c2", "t", LONG) is None
    await wait_for(pool, lambda s: s.lapsed == 1)
    assert await pool.claim(POOL, dead.number) is None
    taken = await pool.lease(POOL, numbers, "c2", "t", LONG)
    assert taken is not None and taken.number == dead.number and taken.since >= dead.until
    assert taken.fresh  # a lapse: nobody gave it back
    assert await pool.release(POOL, dead.number, "dead", "t") is None
    claimed = await pool.claim(POOL, dead.number)
    assert claimed is not None and claimed.call == "c2"
    await check_invariants(redis_client, pool)


async def test_a_holder_leases_again_after_its_lease_lapsed(pool: PoolStore, redis_client: Redis) -> None:
    first = await pool.lease(POOL, NUMBERS, "c1", "t", SHORT)
    assert first is not None
    await wait_for(pool, lambda s: s.lapsed == 1)
    again = await pool.lease(POOL, NUMBERS, "c1", "t", LONG)
    assert again is not None and again.since >= first.until and again.until > again.since
    assert await pool.status(POOL, NUMBERS) == PoolStatus(free=19, leased=1, claimed=0, lapsed=0)
    await check_invariants(redis_client, pool)


async def test_a_claim_answers_the_same_within_the_lease(pool: PoolStore, redis_client: Redis) -> None:
    assert await pool.claim(POOL, NUMBERS[0]) is None  # a free number
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG)
    assert lease is not None
    claimed = await pool.claim(POOL, lease.number)
    assert claimed is not None and claimed.claimed >= lease.since
    assert (claimed.call, claimed.key, claimed.since, claimed.until) == ("c1", "t1", lease.since, lease.until)
    assert await pool.claim(POOL, lease.number, grace_seconds=SHORT) == claimed  # claimed once
    assert await pool.lease(POOL, NUMBERS, "c1", "t1", LONG) == claimed
    assert await pool.status(POOL, NUMBERS) == PoolStatus(free=19, leased=0, claimed=1, lapsed=0)
    await check_invariants(redis_client, pool)


async def test_a_first_claim_with_a_grace_shortens_the_lease(pool: PoolStore, redis_client: Redis) -> None:
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG)
    assert lease is not None
    claimed = await pool.claim(POOL, lease.number, grace_seconds=SHORT)
    assert claimed is not None and claimed.until == claimed.claimed + SHORT * 1000 < lease.until
    await check_invariants(redis_client, pool)
    await wait_for(pool, lambda s: s.free == len(NUMBERS))  # claimed, then ended: no lapse
    assert await pool.claim(POOL, lease.number) is None  # a lapsed number
    assert (await pool.lease(POOL, NUMBERS[:1], "c2", "t", LONG)) is not None


async def test_a_context_lives_sealed_with_its_lease_and_never_longer(
    pool: PoolStore, redis_client: Redis
) -> None:
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG, context='{"caller": "+14255550199"}')
    assert lease is not None and not lease.fresh
    key = pool.keys.pool_context(POOL, lease.number)
    sealed = await redis_client.get(key)
    assert sealed and "14255550199" not in sealed  # sealed: never in clear in Redis
    assert 0 < await redis_client.pttl(key) <= LONG * 1000
    first = await pool.claim(POOL, lease.number, grace_seconds=SHORT)
    assert first is not None and first.fresh and first.context == '{"caller": "+14255550199"}'
    assert await redis_client.pttl(key) <= SHORT * 1000  # brought in with the lease
    again = await pool.claim(POOL, lease.number)
    assert again == first and not again.fresh and again.context == first.context
    await wait_for(pool, lambda s: s.free == len(NUMBERS))
    assert await redis_client.exists(key) == 0  # gone with the lease's end, not after it


async def test_a_release_takes_the_context_with_it(pool: PoolStore, redis_client: Redis) -> None:
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG, context="{}")
    assert lease is not None
    assert await pool.release(POOL, lease.number, "c1", "t1") is not None
    assert await redis_client.exists(pool.keys.pool_context(POOL, lease.number)) == 0


async def test_a_settled_lease_ends_within_its_grace_for_its_holder_only(
    pool: PoolStore, redis_client: Redis
) -> None:
    lease = await pool.lease(POOL, NUMBERS, "c1", "t1", LONG, context="{}")
    assert lease is not None
    assert await pool.settle(POOL, lease.number, "c2", "t1", SHORT) is None  # not its holder
    assert await pool.settle(POOL, lease.number, "c1", "t9", SHORT) is None  # nor this lease
    ends = await pool.settle(POOL, lease.number, "c1", "t1", SHORT)
    assert ends is not None and ends < lease.until
    assert await pool.settle(POOL, lease.number, "c1", "t1", LONG) == ends  # never lengthened
    assert await redis_client.pttl(pool.keys.pool_context(POOL, lease.number)) <= SHORT * 1000
    await check_invariants(redis_client, pool)
    await wait_for(pool, lambda s: s.free == len(NUMBERS))  # a connected transfer's end: no lapse
    taken = await pool.lease(POOL, [lease.number], "c2", "t", LONG)
    assert taken is not None and not taken.fresh
    assert await pool.settle(POOL, lease.number, "c1", "t1", SHORT) is None


async def test_a_lease_first_releases_the_calls_previous_attempt(
    pool: PoolStore, redis_client: Redis
) -> None:
    """A retry right after a failure, before that failure's release has landed: the call
    does not hold two numbers, even for a moment, and an exhausted pool counts its own."""
    numbers = NUMBERS[:1]
    first = await pool.lease(POOL, numbers, "c1", "q:1", LONG, context="{}")
    assert first is not None
    retry = await pool.lease(POOL, numbers, "c1", "q:2", LONG, context="{}", previous="q:1")
    assert retry is not None and retry.number == first.number and retry.key == "q:2"
    assert await pool.release(POOL, first.number, "c1", "q:1") is None  # gone already
    assert await pool.status(POOL, numbers) == PoolStatus(free=0, leased=1, claimed=0, lapsed=0)
    # Another call's lease is never "previous": only the caller's own goes.
    assert await pool.lease(POOL, numbers, "c2", "q:2", LONG, previous="q:1") is None
    await check_invariants(redis_client, pool)


async def test_an_unreachable_redis_is_reported_as_unavailable() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1", decode_responses=True, socket_connect_timeout=1)
    pool = PoolStore(dead, Keyspace("x"))
    with pytest.raises(StoreUnavailable, match="leasing a pool number"):
        await pool.lease(POOL, NUMBERS, "c1", "t", LONG)
    with pytest.raises(StoreUnavailable):
        await pool.status(POOL, NUMBERS)
    await dead.aclose()


@dataclass
class Churn:
    """What a contention run saw: every lease's interval on its number, in Redis ms."""

    intervals: dict[str, list[tuple[int, int, bool]]] = field(default_factory=lambda: defaultdict(list))
    leases: int = 0
    exhausted: int = 0  # lease attempts that found every number held
    given_up: int = 0  # transfers whose every attempt did
    released: int = 0


async def churn(stores: list[PoolStore], transfers: int, concurrency: int, seed: int = 15) -> Churn:
    """``transfers`` transfers by ``concurrency`` workers spread over the instances: each
    leases (twice at once, as a redelivered turn would), holds the number a moment and
    releases it, but one in ten dies holding it and lets its short lease lapse. An
    exhausted pool is retried a few times after a pause, as a "please hold" would."""
    seen, rng = Churn(), random.Random(seed)
    pending = iter(range(transfers))

    async def transfer(store: PoolStore, call: str, seconds: float) -> Lease | None:
        for attempt in range(4):
            key = f"attempt-{attempt}"
            first, again = await asyncio.gather(
                *(store.lease(POOL, NUMBERS, call, key, seconds) for _ in range(2))
            )
            if first is not None and again is not None:
                # One lease: the later of the two runs made it last as long from its now.
                assert (first.number, first.since) == (again.number, again.since), (first, again)
                return max(first, again, key=lambda lease: lease.until)
            if lease := first or again:
                return lease
            seen.exhausted += 1
            await asyncio.sleep(rng.random() / 20)
        seen.given_up += 1
        return None

    async def worker(store: PoolStore) -> None:
        for i in pending:
            dies = rng.random() < 0.1
            call = f"call-{i}"
            lease = await transfer(store, call, SHORT if dies else LONG)
            if lease is None:
                continue
            seen.leases += 1
            await asyncio.sleep(rng.random() / 500)
            ended = None if dies else await store.release(POOL, lease.number, call, lease.key)
            if ended is not None:
                seen.released += 1
            seen.intervals[lease.number].append((lease.since, lease.until if ended is None else ended, dies))

    await asyncio.gather(*(worker(stores[w % len(stores)]) for w in range(concurrency)))
    return seen


async def check_churn(instances: list[PoolStore], redis: Redis, transfers: int, concurrency: int) -> None:
    seen = await churn(instances, transfers, concurrency)
    overlaps = 0
    for spans in seen.intervals.values():
        spans.sort()
        overlaps += sum(later[0] < earlier[1] for earlier, later in pairwise(spans))
    assert overlaps == 0
    assert seen.leases + seen.given_up == transfers and seen.exhausted > 0 and seen.released > 0
    assert seen.leases == seen.released + sum(dies for spans in seen.intervals.values() for *_, dies in spans)
    # Every lease was released or has lapsed: the numbers whose last lease lapsed are the lapsed ones.
    last_lapsed = sum(spans[-1][2] for spans in seen.intervals.values())
    status = await wait_for(instances[0], lambda s: s.leased == s.claimed == 0)
    assert status == PoolStatus(free=len(NUMBERS) - last_lapsed, leased=0, claimed=0, lapsed=last_lapsed)
    await check_invariants(redis, instances[0])
    # The pool, all free again, serves as many callers at once as it has numbers, each once.
    callers = len(NUMBERS) + 10
    got = await asyncio.gather(
        *(instances[i % 3].lease(POOL, NUMBERS, f"new-{i}", "t", LONG) for i in range(callers))
    )
    numbers = [lease.number for lease in got if lease]
    assert sorted(numbers) == sorted(NUMBERS) and got.count(None) == callers - len(NUMBERS)
    print(
        f"\ncontention: {transfers} transfers by {concurrency} workers on 3 instances, pool of "
        f"{len(NUMBERS)}: {seen.leases} leases ({seen.released} released, "
        f"{seen.leases - seen.released} lapsed), {seen.exhausted} found it exhausted "
        f"({seen.given_up} gave up), overlaps {overlaps}, "
        f"leaks 0"
    )


async def test_concurrent_leases_never_share_a_number(
    instances: list[PoolStore], redis_client: Redis
) -> None:
    await check_churn(instances, redis_client, transfers=300, concurrency=30)


@pytest.mark.heavy
async def test_concurrent_leases_never_share_a_number_at_scale(
    instances: list[PoolStore], redis_client: Redis
) -> None:
    # 40 workers per instance, each with two leases at once, stay within a client's 100 connections.
    await check_churn(instances, redis_client, transfers=3000, concurrency=120)
