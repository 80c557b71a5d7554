"""pt-serve's Prometheus metrics, in a registry of their own (one per server)."""

from __future__ import annotations

import heapq
import threading
from typing import Callable

OTHER = "other"


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("prefixkit_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.batch_rows = Histogram("prefixkit_batch_rows", "Rows in each forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_prefixes = Histogram("prefixkit_batch_prefixes",
                                        "Different prefixes (users) in each forward pass, the bare backbone as one",
                                        buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.latency = Histogram("prefixkit_request_latency_seconds", "Completion latency, end to end",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.tokens = Counter("prefixkit_tokens_generated", "Tokens generated", registry=self.registry)
        self.queue_depth = Gauge("prefixkit_queue_depth", "Rows waiting to start", registry=self.registry)
        self.active_rows = Gauge("prefixkit_active_rows", "Rows being decoded or prefilled", registry=self.registry)
        self.prefixes = Gauge("prefixkit_prefixes", "Prefixes in memory", registry=self.registry)
        self.decode_loop = Gauge("prefixkit_decode_loop_up", "1 while the decode loop runs", registry=self.registry)

    def watch(self, queue_depth: Callable[[], float], active_rows: Callable[[], float],
              prefixes: Callable[[], float], decode_loop_up: Callable[[], float]) -> None:
        """Gauges read when /metrics is scraped."""
        self.queue_depth.set_function(queue_depth)
        self.active_rows.set_function(active_rows)
        self.prefixes.set_function(prefixes)
        self.decode_loop.set_function(decode_loop_up)

    def watch_prefixes(self, per_prefix: "PrefixCounts", cache) -> None:
        """Per-prefix counts, and the prefix cache's (a registry.PrefixRegistry), read at each scrape."""
        self.registry.register(_PrefixCollector(per_prefix, cache))

    def observe_batch(self, rows: int, prefixes: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_prefixes.observe(prefixes)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class PrefixCounts:
    """Requests, tokens and cold loads per prefix, with at most `labels` names shown as their own
    label and every other name counted under "other".

    Names earn a label by being busy: requests of unlabelled names are tallied (for at most
    `tracked` names; when more come, the least requested half is forgotten), and at each scrape,
    or when the tally is full, the most requested ones, with 2 requests or more, take the free
    labels. A label is kept until the server stops, and a name's counts before it earned one
    stay in "other", so that every series only grows, as Prometheus counters must.
    """

    def __init__(self, labels: int = 100, tracked: int = 10_000):
        self.labels, self.tracked = labels, tracked
        self.named: dict[str, list[int]] = {}  # name: [requests, tokens, cold loads]
        self.other = [0, 0, 0]
        self._tally: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, name: str, requests: int = 0, tokens: int = 0, loads: int = 0) -> None:
        with self._lock:
            counts = self.named.get(name)
            if counts is None:
                counts = self.other
                if requests and len(self.named) < self.labels:
                    self._tally[name] = self._tally.get(name, 0) + requests
                    if len(self._tally) > self.tracked:
                        self._promote()
                        keep = heapq.nlargest(self.tracked // 2, self._tally.items(), key=lambda kv: kv[1])
                        self._tally = dict(keep)
            counts[0] += requests
            counts[1] += tokens
            counts[2] += loads

    def series(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            self._promote()
            return [(n, list(c)) for n, c in self.named.items()] + [(OTHER, list(self.other))]

    def _promote(self) -> None:
        free = self.labels - len(self.named)
        if free <= 0 or not self._tally:
            return
        for name, n in heapq.nlargest(free, self._tally.items(), key=lambda kv: kv[1]):
            if n >= 2 and name != OTHER:
                self.named[name] = [0, 0, 0]
                del self._tally[name]
        if len(self.named) >= self.labels:
            self._tally = {}


class _PrefixCollector:
    def __init__(self, per_prefix: PrefixCounts, cache):
        self.per_prefix, self.cache = per_prefix, cache

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = [CounterMetricFamily("prefixkit_prefix_requests", "Completion requests by prefix "
                                        "(the busiest names, then 'other')", labels=["prefix"]),
                    CounterMetricFamily("prefixkit_prefix_tokens", "Tokens generated by prefix", labels=["prefix"]),
                    CounterMetricFamily("prefixkit_prefix_cold_loads", "Prefix reads from the store by prefix",
                                        labels=["prefix"])]
        for name, counts in self.per_prefix.series():
            for family, value in zip(families, counts):
                family.add_metric([name], value)
        yield from families
        stats = self.cache.stats
        for name, help_, value in (("hits", "Prefix lookups answered from memory", stats.hits),
                                   ("misses", "Prefix lookups that read the store", stats.misses),
                                   ("evictions", "Prefixes evicted from memory", stats.evictions)):
            yield CounterMetricFamily(f"prefixkit_prefix_cache_{name}", help_, value=value)
        yield GaugeMetricFamily("prefixkit_prefix_cache_bytes", "Bytes of prefixes in memory",
                                value=self.cache.bytes_held)
        yield GaugeMetricFamily("prefixkit_prefix_cache_limit_bytes", "--prefix-cache-mb, in bytes",
                                value=self.cache.max_bytes)
