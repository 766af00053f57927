"""Prometheus metrics of one bot instance (``GET /metrics``).

Counters and histograms are this instance's own: Prometheus sums them over instances.
``cc_calls`` and ``cc_pool_numbers`` are read from Redis at scrape time and are the same
on every instance (use ``max``, not ``sum``, across instances).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.turn import Outcome, Turn
from states import State

# Transfers ring for seconds to minutes (the watchdog default is 60 s).
OUTCOME_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)
# A turn is milliseconds; the channel gives it 15 s and the bot answers 503 after 12 s.
TURN_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 12)


# Connections carry one call or hundreds: the Telephony channel does not say which.
CONNECTION_CALL_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


class _Read(Collector):
    """A count some object already keeps, read at scrape time: a counter or a gauge, one
    value or one per label value."""

    def __init__(
        self,
        family: type[CounterMetricFamily | GaugeMetricFamily],
        name: str,
        documentation: str,
        read: Callable[[], int | Mapping[str, int]],
        label: str,
    ) -> None:
        self.family, self.name, self.documentation, self.read, self.label = (
            family,
            name,
            documentation,
            read,
            label,
        )

    def collect(self) -> Iterator[Metric]:
        value = self.read()
        if isinstance(value, Mapping):
            family = self.family(self.name, self.documentation, labels=[self.label])
            for key, count in value.items():
                family.add_metric([key], count)
            yield family
        else:
            yield self.family(self.name, self.documentation, value=value)


class Metrics:
    """The metrics of one instance, in a registry of its own (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Gauge("cc_calls", "Calls per state, in all of Redis", ["state"], registry=self.registry)
        self.pool_numbers = Gauge(
            "cc_pool_numbers",
            "Numbers of each pool per status (free, leased, claimed, lapsed), in all of Redis",
            ["pool", "status"],
            registry=self.registry,
        )
        self.redis_up = Gauge("cc_redis_up", "1 if Redis answered this scrape", registry=self.registry)
        self.transfers = Counter(
            "cc_transfers",
            "Transfers started, accepted, failed and timed out (no answer), per queue and target",
            ["queue", "target", "outcome"],
            registry=self.registry,
        )
        self.outcome_seconds = Histogram(
            "cc_transfer_outcome_seconds",
            "Time from handoff.initiate to the transfer's outcome, per queue",
            ["queue", "outcome"],
            buckets=OUTCOME_BUCKETS,
            registry=self.registry,
        )
        self.turn_seconds = Histogram(
            "cc_turn_seconds",
            "Time to answer an activity posted to /api/messages",
            buckets=TURN_BUCKETS,
            registry=self.registry,
        )
        self.connection_calls = Histogram(
            "cc_streaming_connection_calls",
            "Calls each closed streaming connection carried",
            buckets=CONNECTION_CALL_BUCKETS,
            registry=self.registry,
        )
        self.unavailable = Counter(
            "cc_turns_unavailable",
            "Activities answered 503 (Redis unavailable, turn too slow)",
            registry=self.registry,
        )

    def tally(
        self, name: str, documentation: str, read: Callable[[], int | Mapping[str, int]], label: str = ""
    ) -> None:
        """Export a running count some object keeps (a conflict or re-send count), or
        one per value of ``label`` when ``read`` gives a mapping."""
        self.registry.register(_Read(CounterMetricFamily, name, documentation, read, label))

    def level(
        self, name: str, documentation: str, read: Callable[[], int | Mapping[str, int]], label: str = ""
    ) -> None:
        """Export a level some object keeps (open connections) as a gauge."""
        self.registry.register(_Read(GaugeMetricFamily, name, documentation, read, label))

    def applied(self, turn: Turn) -> None:
        """Count a committed turn's transfer outcomes, and how long each transfer rang."""
        for outcome, queue, target in turn.outcomes:
            self.transfers.labels(queue, target, outcome.value).inc()
            if (
                outcome != Outcome.STARTED
                and turn.loaded_state == State.TRANSFERRING
                and turn.loaded_since_ms
            ):
                rang = max(0.0, time.time() - turn.loaded_since_ms / 1000)
                self.outcome_seconds.labels(queue, outcome.value).observe(rang)

    def exposition(
        self, calls: Mapping[str, int] | None, pools: Mapping[str, Mapping[str, int]] | None = None
    ) -> bytes:
        """The text format, with the state counts and each pool's numbers per status just
        read from Redis (None: unreadable)."""
        self.redis_up.set(calls is not None)
        self.calls.clear()  # stale counts would lie: no samples while Redis is unreadable
        for state, count in (calls or {}).items():
            self.calls.labels(state).set(count)
        self.pool_numbers.clear()
        for pool, statuses in (pools or {}).items():
            for status, count in statuses.items():
                self.pool_numbers.labels(pool, status).set(count)
        return generate_latest(self.registry)
