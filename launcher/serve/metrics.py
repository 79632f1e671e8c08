"""Prometheus metrics of `labs serve` (GET /metrics), in a registry of their own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("labs_serve_requests", "Generation requests ended, by finish reason "
                                "(stop, length, cancelled: client gone, cut: shutdown or failure)",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("labs_serve_prompt_tokens", "Prompt tokens of ended requests", registry=r)
        self.generation_tokens = Counter("labs_serve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("labs_serve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("labs_serve_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("labs_serve_queue_length", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("labs_serve_running_requests", "Requests in the running batch", registry=r)
        self.http = Counter("labs_serve_http_responses", "HTTP responses by route and status", ["route", "status"],
                            registry=r)

    def token(self, seq) -> None:
        now = time.monotonic()
        if seq.last_token_at is None:
            self.ttft.observe(now - seq.arrived)
        else:
            self.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.generation_tokens.inc()

    def finished(self, seq) -> None:
        if seq.counted:
            return
        seq.counted = True
        self.requests.labels(seq.finish or ("cancelled" if seq.cancelled else "cut")).inc()
        self.prompt_tokens.inc(len(seq.prompt_ids))

    def render(self) -> bytes:
        return generate_latest(self.registry)
