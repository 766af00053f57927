"""Warm transfers against cold ones, through the engine on a real Redis.

Three engines (each with a Redis client of its own, as three instances) run calls that
ask for an agent and whose transfer fails, again and again: once with the sample flow's
queue (a cold transfer: one round trip, the commit) and once with that queue leasing
from a pool (the lease before the commit, and the release after it, in the background).
It reports transfer turns a second and the p99 of the "agent" turn for both, and their
ratio; then, with ten times as many callers as numbers, how the pool holds up under
contention: leases, exhausted transfers (dialled cold), lapses (0: every number given
back), and that no two calls were dialled the same number at once.

    .venv/bin/python -m bench.pool [--redis-url URL] [--json PATH] [--smoke]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from adapters.keys import Keyspace
from adapters.pool import PoolStore
from adapters.store import RedisCallStore
from bench.inspection import delete_prefix
from bench.report import main as bench_main
from bench.report import row, unique_prefix
from orchestrator.callflow import SAMPLE_CALLFLOW, CallFlow, Pool, load_callflow, shipped_flow
from orchestrator.engine import Engine
from orchestrator.events import CallerInput, CallStarted, HandoffStatus
from orchestrator.turn import Handoff

POOL = "bench"
INSTANCES = 3


def flows(numbers: int) -> dict[str, CallFlow]:
    """The sample flow as it ships (cold), and with its queue leasing from a pool (warm)."""
    cold = load_callflow(shipped_flow(SAMPLE_CALLFLOW))
    queue = cold.queues["agents"].model_copy(update={"pool": POOL, "max_attempts": 20})
    pool = Pool(numbers=[f"+1425557{i:04d}" for i in range(numbers)], grace_seconds=30)
    warm = cold.model_copy(update={"queues": {"agents": queue}, "pools": {POOL: pool}})
    cold = cold.model_copy(update={"queues": {"agents": queue.model_copy(update={"pool": None})}})
    return {
        "cold": CallFlow.model_validate(cold.model_dump()),
        "warm": CallFlow.model_validate(warm.model_dump()),
    }


async def run(
    clients: list[Redis], prefix: str, flow: CallFlow, *, calls: int, cycles: int, concurrency: int
) -> dict[str, Any]:
    """``calls`` calls, ``concurrency`` at once, each asking for an agent ``cycles`` times
    (the transfer failing each time), spread over the instances."""
    keys = Keyspace(prefix)
    engines = []
    for client in clients:
        store = RedisCallStore(client, keys)
        engines.append(Engine(store, flow, pools=PoolStore(client, keys, store.sealer), cache_size=4096))
    agent_turns: list[float] = []
    held: dict[str, str] = {}  # number -> call, from dial to the failure's turn
    overlaps = dialled_cold = 0
    lines = asyncio.Semaphore(concurrency)

    async def call(i: int) -> None:
        nonlocal overlaps, dialled_cold
        async with lines:
            conversation = f"call-{i}"
            engine = engines[i % len(engines)]
            await engine.handle(conversation, CallStarted(), activity_id=f"{conversation}-s")
            for cycle in range(cycles):
                began = time.perf_counter()
                turn = await engine.handle(
                    conversation, CallerInput("agent"), activity_id=f"{conversation}-a{cycle}"
                )
                agent_turns.append(time.perf_counter() - began)
                targets = [e.target for e in (turn.effects if turn else []) if isinstance(e, Handoff)]
                number = targets[0] if targets else ""
                if number in flow.pool_of_number:
                    overlaps += number in held
                    held[number] = conversation
                else:
                    dialled_cold += bool(number)
                if held.get(number) == conversation:
                    del held[number]
                failed = HandoffStatus("failed", "busy")
                await engine.handle(conversation, failed, activity_id=f"{conversation}-f{cycle}")

    began = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(calls)))
    seconds = time.perf_counter() - began
    for engine in engines:
        await engine.settled()
    status = await PoolStore(clients[0], keys).status(POOL, flow.pools[POOL].numbers) if flow.pools else None
    turns = calls * (1 + 2 * cycles)
    agent_turns.sort()
    return {
        "turns_per_s": turns / seconds,
        "agent_p50_ms": statistics.median(agent_turns) * 1000,
        "agent_p99_ms": agent_turns[int(len(agent_turns) * 0.99) - 1] * 1000,
        "leases": sum(e.leases[POOL] for e in engines),
        "exhausted": sum(e.exhausted[POOL] for e in engines),
        "lapses": sum(e.lapses[POOL] for e in engines),
        "dialled_cold": dialled_cold,
        "overlaps": overlaps,
        "free_after": status.free if status else 0,
    }


async def measure(redis_url: str, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    numbers = 20
    calls, cycles = (40, 2) if smoke else (400, 5)
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(INSTANCES)]
    results: dict[str, dict[str, Any]] = {}
    deleted = 0
    try:
        for name, flow in flows(numbers).items():
            # A third as many callers as numbers: a failed transfer's number comes back just
            # after its turn, so a caller who asks again at once may hold two for a moment.
            for label, concurrency in ((name, numbers // 3), (f"{name} contended", numbers * 10)):
                if name == "cold" and concurrency > numbers:
                    continue  # a cold transfer has nothing to contend for
                prefix = unique_prefix(f"pool{label[:3]}")
                say(f"{label}: {calls} calls, {cycles} transfers each, {concurrency} at once")
                results[label] = await run(
                    clients, prefix, flow, calls=calls, cycles=cycles, concurrency=concurrency
                )
                deleted += await delete_prefix(clients[0], prefix)
    finally:
        for client in clients:
            await client.aclose()
    cold, warm, contended = results["cold"], results["warm"], results["warm contended"]
    checks = {
        "no number dialled to two calls at once": warm["overlaps"] == contended["overlaps"] == 0,
        "every warm transfer leased (three numbers a caller)": warm["exhausted"] == 0
        and warm["leases"] == calls * cycles,
        "exhausted transfers dialled the target cold": contended["exhausted"]
        == contended["dialled_cold"]
        > 0,
        "no lapses: every number given back": warm["lapses"] == contended["lapses"] == 0
        and warm["free_after"] == contended["free_after"] == numbers,
    }
    rows = [
        row("cold transfers: turns/s", round(cold["turns_per_s"]), "turns/s"),
        row("warm transfers: turns/s", round(warm["turns_per_s"]), "turns/s"),
        row("ratio warm/cold turns/s", round(warm["turns_per_s"] / cold["turns_per_s"], 2), "x"),
        row("cold agent turn p99", round(cold["agent_p99_ms"], 2), "ms"),
        row("warm agent turn p99", round(warm["agent_p99_ms"], 2), "ms"),
        row("contended: transfers", calls * cycles, "transfers"),
        row("contended: leased", contended["leases"], "leases"),
        row("contended: exhausted (cold)", contended["exhausted"], "transfers"),
        row("contended: overlaps", contended["overlaps"], "overlaps"),
        row("contended: lapses", contended["lapses"], "lapses"),
        row("contended: turns/s", round(contended["turns_per_s"]), "turns/s"),
    ]
    return {
        "bench": "pool",
        "parameters": {
            "calls": calls,
            "transfers_per_call": cycles,
            "numbers": numbers,
            "instances": INSTANCES,
        },
        "results": results,
        "checks": checks,
        "deleted_keys": deleted,
        "rows": rows,
    }


def bench(redis_url: str, *, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Warm transfers' cost against cold ones, and a pool under contention."""
    return asyncio.run(measure(redis_url, smoke, say))


if __name__ == "__main__":
    sys.exit(bench_main("pool", __doc__ or "", bench))
