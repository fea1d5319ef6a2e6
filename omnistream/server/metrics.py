"""Prometheus metrics of one server (its own CollectorRegistry: several apps in one process do
not collide).

Recorded by the server as requests end (never per token): TTFT, inter-token and end-to-end
latency histograms, prompt / cached / generated token counters, requests by finish reason and
HTTP requests by status. Read from the engine on scrape only (Engine.stats() is answered by the
engine loop between steps; /metrics calls it in a worker thread): queue depth, running batch,
KV blocks, prefix- and encoder-cache hits, sessions. Open and live sessions are counted by the
session registry (`state.extras["sessions"].counts()`) when it is installed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from omnistream.engine.protocol import RequestOutput

if TYPE_CHECKING:
    from omnistream.server.state import ServerState

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, state: "ServerState") -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("omnistream_time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("omnistream_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("omnistream_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("omnistream_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("omnistream_prompt_cached_tokens", "Prompt tokens served by the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("omnistream_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("omnistream_requests_finished", "Engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.http = Counter("omnistream_http_requests", "HTTP requests and WebSockets by status", ["status"],
                            registry=r)
        r.register(_EngineCollector(state))

    def observe(self, out: RequestOutput) -> None:
        """One finished engine request (any client of the server may report its own)."""
        m = out.metrics
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        for gap in m.inter_token_s:
            self.itl.observe(gap)
        if m.finished_at is not None:
            self.e2e.observe(m.finished_at - m.arrival)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.cached_tokens.inc(m.cached_tokens)
        self.generation_tokens.inc(len(out.token_ids))
        self.finished.labels(finish_reason=out.finish_reason).inc()

    def observe_http(self, status: int) -> None:
        self.http.labels(status=str(status)).inc()

    def render(self) -> bytes:
        """The exposition text; blocks on the engine loop: call it in a worker thread."""
        return generate_latest(self.registry)


ENGINE_STATS_TIMEOUT_S = 5.0  # a scrape reports the engine down rather than wait for a stuck one


class _EngineCollector:
    """Gauges and counters read from one Engine.stats() snapshot per scrape."""

    def __init__(self, state: "ServerState") -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # registration must not wait for the engine loop

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.state.engine.stats(timeout=ENGINE_STATS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a closed engine still gets scraped
            log.warning("engine stats unavailable: %s", e)
            yield _gauge("omnistream_engine_up", "1 when the engine loop answers", 0)
            return
        yield _gauge("omnistream_engine_up", "1 when the engine loop answers", 1)
        yield _gauge("omnistream_requests_waiting", "Requests queued in the engine (queue depth)", s["requests_waiting"])
        yield _gauge("omnistream_requests_running", "Requests in the running batch", s["requests_running"])
        total, free = s["kv_blocks_total"], s["kv_blocks_free"]
        yield _gauge("omnistream_kv_blocks_total", "KV cache blocks", total)
        yield _gauge("omnistream_kv_blocks_free", "KV cache blocks free (cached-but-unreferenced included)", free)
        yield _gauge("omnistream_kv_blocks_used", "KV cache blocks in use", total - free)
        yield _gauge("omnistream_kv_blocks_retained", "KV blocks kept for idle sessions", s["kv_blocks_retained"])
        pc = s["prefix_cache"]
        yield _counter("omnistream_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", pc["queries"])
        yield _counter("omnistream_prefix_cache_hits", "Prompt tokens found in the prefix cache", pc["hit_tokens"])
        yield _gauge("omnistream_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens", pc["hit_rate"])
        enc = s["encoder_cache"] or {"hits": 0, "misses": 0}
        lookups = enc["hits"] + enc["misses"]
        yield _counter("omnistream_encoder_cache_hits", "Vision-encoder cache lookups served", enc["hits"])
        yield _counter("omnistream_encoder_cache_misses", "Vision-encoder cache lookups not served", enc["misses"])
        yield _gauge("omnistream_encoder_cache_hit_rate", "Encoder-cache hits / lookups",
                     enc["hits"] / lookups if lookups else 0.0)
        yield _counter("omnistream_vision_tokens_encoded", "Tokens produced by the vision tower",
                       s["vision_tokens_encoded"])
        yield _gauge("omnistream_engine_sessions", "Sessions and live sessions open in the engine", s["sessions"])
        registry = self.state.extras.get("sessions")  # session_registry.SessionRegistry, when installed
        counts = registry.counts() if registry is not None else {}
        yield _gauge("omnistream_open_sessions", "Open pinned sessions (HTTP)", counts.get("session", 0))
        yield _gauge("omnistream_live_sessions", "Open live sessions (WebSocket)", counts.get("live", 0))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
