"""Aether's Prometheus metrics, in a registry of their own per application.

A registry per ``Metrics`` object (not the process-global one) keeps every ``create_app`` call
independent: tests build many apps in one process. Counters that would tick per delta are added
once per request instead, so the hot path pays nothing for them.

Several workers (``python -m aether --workers N``): the supervisor gives them a directory in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode: each process keeps its
values in files there), and ``exposition`` reports the sum over every worker, those that have
died included for counters and histograms; the gauges (connections, chats in flight) count the
live workers only.

@.architecture
role: metrics
jobs: [observability]
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

COMMIT_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
# prometheus-client's multiprocess mode: read when it is imported.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class Children(Generic[MetricT]):
    """A labelled metric's children, kept once made: ``labels()`` takes a lock and checks its
    arguments on every call, which every chat paid several times. Label values come from
    small fixed sets (paths, outcomes, error codes), so the cache stays small."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: MetricT) -> None:
        self._metric: MetricT = metric
        self._children: dict[tuple[str, ...], MetricT] = {}

    def __call__(self, *values: str) -> MetricT:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "aether_websocket_connections",
            "Open WebSocket connections.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests_in_flight = Gauge(
            "aether_requests_in_flight",
            "Chats running now.",
            ["path"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "aether_requests", "Chats ended, by path and outcome.", ["path", "outcome"], registry=r
        )
        self.deltas_relayed = Counter(
            "aether_chunks_relayed", "LMC chunks relayed to clients.", registry=r
        )
        self.time_to_first_token = Histogram(
            "aether_time_to_first_token_seconds",
            "From a chat's start to its first content relayed.",
            ["path"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stop_latency = Histogram(
            "aether_stop_latency_seconds",
            "From a stop (or disconnect, or shutdown) to the chat's end.",
            ["reason"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.upstream_errors = Counter(
            "aether_upstream_errors",
            "Chats ended by an upstream failure, by code.",
            ["code"],
            registry=r,
        )
        self.history_commits = Histogram(
            "aether_history_commit_seconds",
            "How long each history write batch took: in SQLite, the time it held the event "
            "loop (with several workers, waiting for another's write lock included); in "
            "PostgreSQL, its round trip.",
            buckets=COMMIT_BUCKETS_S,
            registry=r,
        )
        self.history_commit_longest = Gauge(
            "aether_history_commit_longest_seconds",
            "The longest history write batch so far.",
            registry=r,
            multiprocess_mode="max",
        )
        self.history_lock_wait_longest = Gauge(
            "aether_history_lock_wait_longest_seconds",
            "The longest wait of a history write batch for the database's write lock so far "
            "(another worker writing).",
            registry=r,
            multiprocess_mode="max",
        )
        self.control_plane_commands = Counter(
            "aether_control_plane_commands",
            "Round trips to the workers' control plane (Redis): a script or a pipeline is one.",
            registry=r,
        )
        self.rate_limited = Counter(
            "aether_rate_limited",
            "Requests and messages refused by a rate limit.",
            ["tier"],
            registry=r,
        )

        self._longest_commit = self._longest_lock_wait = 0.0
        # The children each chat uses, by their label values.
        self.in_flight_on = Children(self.requests_in_flight)
        self.requests_ended = Children(self.requests)
        self.first_token_on = Children(self.time_to_first_token)
        self.stopped_by = Children(self.stop_latency)
        self.upstream_failed = Children(self.upstream_errors)

    def observe_commit(self, seconds: float, lock_wait_s: float) -> None:
        self.history_commits.observe(seconds)
        if seconds > self._longest_commit:
            self._longest_commit = seconds
            self.history_commit_longest.set(seconds)
        if lock_wait_s > self._longest_lock_wait:
            self._longest_lock_wait = lock_wait_s
            self.history_lock_wait_longest.set(lock_wait_s)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: this process's, or every worker's."""
        if MULTIPROCESS_DIR_VARIABLE in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
