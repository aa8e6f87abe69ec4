"""Prometheus metrics of the model server, in a registry of their own (several apps can live in one process).

Per-request series carry ``voice``, ``version`` and ``variant`` (production | canary) so dashboards and the
canary analysis can compare the two variants of one voice. ``reason`` and ``kind`` labels take short fixed
codes only (e.g. ``error_rate``, ``p95_latency``, ``bad_audio``, ``manual``; ``silent``, ``clipped``).
"""

from __future__ import annotations

import os
import resource
from typing import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REQUESTS = "voiceops_requests_total"
REQUEST_LATENCY = "voiceops_request_latency_seconds"
RTF = "voiceops_rtf"
SYNTHESIS_SECONDS = "voiceops_synthesis_seconds"
FIRST_CHUNK = "voiceops_first_chunk_seconds"
BAD_AUDIO = "voiceops_bad_audio_total"
BATCH_SIZE = "voiceops_batch_size"
FRONTEND_CACHE_HIT_RATIO = "voiceops_frontend_cache_hit_ratio"
ADAPTERS_LOADED = "voiceops_adapters_loaded"
RESIDENT_MEMORY = "voiceops_resident_memory_bytes"
CANARY_WEIGHT = "voiceops_canary_weight"
BREAKER_OPEN = "voiceops_breaker_open"
ROLLBACKS = "voiceops_rollbacks_total"
AUDIT_DROPPED = "voiceops_audit_dropped_total"
AUDIT_REJECTED = "voiceops_audit_rejected_total"

# The names as written in PromQL. Histograms are queried through their _bucket/_sum/_count series.
METRIC_NAMES: tuple[str, ...] = (
    REQUESTS, REQUEST_LATENCY, RTF, SYNTHESIS_SECONDS, FIRST_CHUNK, BAD_AUDIO, BATCH_SIZE, FRONTEND_CACHE_HIT_RATIO,
    ADAPTERS_LOADED, RESIDENT_MEMORY, CANARY_WEIGHT, BREAKER_OPEN, ROLLBACKS, AUDIT_DROPPED, AUDIT_REJECTED,
)
HISTOGRAMS = frozenset({REQUEST_LATENCY, RTF, SYNTHESIS_SECONDS, FIRST_CHUNK, BATCH_SIZE})
# Every series name a query may use: the names above plus each histogram's sample series.
METRIC_SERIES: frozenset[str] = frozenset(METRIC_NAMES) | {
    f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

VARIANT_LABELS = ("voice", "version", "variant")


def resident_memory_bytes() -> int:
    """Current RSS from /proc/self/statm; elsewhere the peak RSS from getrusage (the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _ScrapeTimeCollector(Collector):
    """Values read when Prometheus scrapes: resident memory and the audit log's dropped and rejected rows."""

    def __init__(self, audit_dropped: Callable[[], int], audit_rejected: Callable[[], int]) -> None:
        self.audit_dropped = audit_dropped
        self.audit_rejected = audit_rejected

    def collect(self) -> Iterable[Metric]:
        memory = GaugeMetricFamily(RESIDENT_MEMORY, "Resident memory of the server process.")
        memory.add_metric([], resident_memory_bytes())
        yield memory
        dropped = CounterMetricFamily(AUDIT_DROPPED.removesuffix("_total"),
                                      "Audit rows dropped because the audit database stayed unreachable.")
        dropped.add_metric([], self.audit_dropped())
        yield dropped
        rejected = CounterMetricFamily(AUDIT_REJECTED.removesuffix("_total"),
                                       "Audit rows set aside because the audit database refused their data.")
        rejected.add_metric([], self.audit_rejected())
        yield rejected


class ServerMetrics:
    """Every series the server exports. Pass ``audit`` (anything with ``dropped``/``rejected`` ints) to export them."""

    def __init__(self, audit: object | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(REQUESTS, "Synthesis requests by outcome.", [*VARIANT_LABELS, "status"], registry=r)
        self.request_latency = Histogram(
            REQUEST_LATENCY, "End-to-end request latency.", VARIANT_LABELS, registry=r,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0))
        self.rtf = Histogram(RTF, "Real-time factor (synthesis seconds per audio second).", VARIANT_LABELS, registry=r,
                             buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0))
        # Compute time without the queue wait: what canary_promotion's p95 rule judges (and the breaker's).
        self.synthesis_seconds = Histogram(
            SYNTHESIS_SECONDS, "Synthesis compute time of a request (queue wait excluded).", VARIANT_LABELS,
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
        self.first_chunk = Histogram(
            FIRST_CHUNK, "Time to the first audio chunk of a streamed response.", VARIANT_LABELS, registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0))
        self.bad_audio = Counter(BAD_AUDIO, "Outputs flagged as bad audio.", [*VARIANT_LABELS, "kind"], registry=r)
        self.batch_size = Histogram(BATCH_SIZE, "Requests per model batch.", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.frontend_cache_hit_ratio = Gauge(FRONTEND_CACHE_HIT_RATIO, "Hit ratio of the text frontend cache.",
                                              registry=r)
        self.adapters_loaded = Gauge(ADAPTERS_LOADED, "Voice adapters resident in memory.", registry=r)
        self.canary_weight = Gauge(CANARY_WEIGHT, "Share of traffic (0-100) routed to the canary.", ["voice"],
                                   registry=r)
        self.breaker_open = Gauge(BREAKER_OPEN, "1 while the voice's canary circuit breaker is open.", ["voice"],
                                  registry=r)
        self.rollbacks = Counter(ROLLBACKS, "Automatic or manual rollbacks.", ["voice", "reason"], registry=r)
        self._audit = audit
        r.register(_ScrapeTimeCollector(lambda: int(getattr(self._audit, "dropped", 0) or 0),
                                        lambda: int(getattr(self._audit, "rejected", 0) or 0)))

    def attach_audit(self, audit: object) -> None:
        self._audit = audit

    # --- helpers for the request path -----------------------------------------------------------

    def observe_request(self, voice: str, version: str, variant: str, status: int, latency_seconds: float,
                        rtf: float | None = None, first_chunk_seconds: float | None = None,
                        compute_ms: float | None = None) -> None:
        labels = (voice, str(version), variant)
        self.requests.labels(*labels, str(status)).inc()
        self.request_latency.labels(*labels).observe(latency_seconds)
        if rtf is not None:
            self.rtf.labels(*labels).observe(rtf)
        if compute_ms is not None:
            self.synthesis_seconds.labels(*labels).observe(compute_ms / 1000)
        if first_chunk_seconds is not None:
            self.first_chunk.labels(*labels).observe(first_chunk_seconds)

    def observe_bad_audio(self, voice: str, version: str, variant: str, kind: str) -> None:
        if kind not in ("silent", "clipped"):
            raise ValueError(f"bad audio kind {kind!r}: use silent or clipped")
        self.bad_audio.labels(voice, str(version), variant, kind).inc()

    def set_release(self, voice: str, canary_weight: float, breaker_open: bool) -> None:
        self.canary_weight.labels(voice).set(canary_weight)
        self.breaker_open.labels(voice).set(1 if breaker_open else 0)

    def forget_voice(self, voice: str) -> None:
        """Drop a retired voice's release gauges (request series keep their history)."""
        for gauge in (self.canary_weight, self.breaker_open):
            try:
                gauge.remove(voice)
            except KeyError:
                pass

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
