"""The server's Prometheus metrics, in a registry of its own (several servers in one process stay apart)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ccra_export.runtime.tower_cache import TowerCache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class TowerCacheCollector(Collector):
    """A split bundle's tower cache, read at each scrape (the cache keeps its own counts)."""

    def __init__(self, cache: TowerCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats()
        lookups = CounterMetricFamily(
            "ccra_tower_cache_lookups", "Vision-tower outputs found cached (hit) or computed (miss)", labels=["result"]
        )
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield lookups
        yield CounterMetricFamily("ccra_tower_cache_evictions", "Tower outputs evicted to fit", value=stats.evictions)
        yield GaugeMetricFamily("ccra_tower_cache_bytes", "Bytes of tower outputs held", value=stats.bytes)
        yield GaugeMetricFamily("ccra_tower_cache_images", "Images whose tower output is held", value=stats.entries)


class Metrics:
    def __init__(self, tower_cache: TowerCache | None = None) -> None:
        self.registry = CollectorRegistry()
        if tower_cache is not None:
            self.registry.register(TowerCacheCollector(tower_cache))
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
