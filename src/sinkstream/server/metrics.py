"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sinkstream_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("sinkstream_prompt_tokens", "tokens prefilled", registry=r)
        self.generated_tokens = Counter("sinkstream_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "sinkstream_time_to_first_token_seconds",
            "request received to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge("sinkstream_decode_batch_size", "rows in the last decode step", registry=r)
        self.active = Gauge("sinkstream_active_requests", "generation requests in flight", registry=r)
        self.sessions_memory = Gauge(
            "sinkstream_sessions_in_memory", "idle sessions whose cache is in memory", registry=r
        )
        self.sessions = Gauge("sinkstream_sessions", "sessions stored", registry=r)
        self.turns = Counter("sinkstream_turns", "generation requests by outcome", ["outcome"], registry=r)
        self.model_seconds = Counter(
            "sinkstream_model_seconds", "time the worker spent in model forwards", ["phase"], registry=r
        )
        self.replica = Gauge("sinkstream_replica", "1, labelled with this server's replica id", ["replica"], registry=r)
        self.starts = Counter(
            "sinkstream_conversation_starts",
            "chat turns by how they started (new and restarted: nothing kept matched; the rest resumed a state)",
            ["mode"],
            registry=r,
        )
        self.resumed_tokens = Counter(
            "sinkstream_resumed_prompt_tokens", "prompt tokens resumed from kept states instead of fed", registry=r
        )
        self.decode_steps = Counter("sinkstream_decode_steps", "batched decode steps", registry=r)
        self.decode_rows = Counter(
            "sinkstream_decode_rows", "rows fed by decode steps (sum of batch sizes)", registry=r
        )

    # called by the worker thread (prometheus_client is thread-safe)
    def prefilled(self, n: int, seconds: float = 0.0) -> None:
        self.prompt_tokens.inc(n)
        self.model_seconds.labels("prefill").inc(seconds)

    def stepped(self, rows: int, seconds: float) -> None:
        self.decode_steps.inc()
        self.decode_rows.inc(rows)
        self.model_seconds.labels("decode").inc(seconds)

    def resumed(self, mode: str, cached_tokens: int) -> None:
        self.starts.labels(mode).inc()
        self.resumed_tokens.inc(cached_tokens)

    def generated(self, n: int) -> None:
        self.generated_tokens.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def batch(self, rows: int) -> None:
        self.batch_size.set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
