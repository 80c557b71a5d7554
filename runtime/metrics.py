"""pt-serve's Prometheus metrics, in a registry of their own (one per server)."""

from __future__ import annotations

from typing import Callable


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
        self.prefixes = Gauge("prefixkit_prefixes", "Prefixes loaded", registry=self.registry)
        self.decode_loop = Gauge("prefixkit_decode_loop_up", "1 while the decode loop runs", registry=self.registry)

    def watch(self, queue_depth: Callable[[], float], active_rows: Callable[[], float],
              prefixes: Callable[[], float], decode_loop_up: Callable[[], float]) -> None:
        """Gauges read when /metrics is scraped."""
        self.queue_depth.set_function(queue_depth)
        self.active_rows.set_function(active_rows)
        self.prefixes.set_function(prefixes)
        self.decode_loop.set_function(decode_loop_up)

    def observe_batch(self, rows: int, prefixes: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_prefixes.observe(prefixes)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
