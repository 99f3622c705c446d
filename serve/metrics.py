"""The server's Prometheus metrics, in a registry of its own (several servers in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ccra_requests", "Chat completion requests by HTTP status", ["status"], registry=self.registry
        )
        self.queue_depth = Gauge("ccra_queue_depth", "Requests waiting or generating", registry=self.registry)
        self.ttft = Histogram(
            "ccra_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.tokens_per_second = Histogram(
            "ccra_decode_tokens_per_second", "Decode speed per request", buckets=RATE_BUCKETS, registry=self.registry
        )
        self.completion_tokens = Counter("ccra_completion_tokens", "Generated tokens", registry=self.registry)
        self.cancelled = Counter("ccra_cancelled", "Generations stopped early", ["reason"], registry=self.registry)
        self.conversations = Counter(
            "ccra_conversation_lookups",
            "Held conversations found (hit) or not (miss)",
            ["result"],
            registry=self.registry,
        )

        self.held_bytes = Gauge(
            "ccra_held_conversation_bytes",
            "KV cache bytes of conversations kept for follow-ups",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
