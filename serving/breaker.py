"""Per-voice canary circuit breaker.

Every request served by a canary version is recorded here (its synthesis compute time, server error, bad
audio: never wall time, which holds the queue wait a flood by any tenant adds to every variant). Over a
sliding window of ``breaker_window_seconds``, once at least ``breaker_min_requests`` canary requests are
in it, the breaker trips when any of these is exceeded:

- error rate (non-finite output, exceptions, timeouts) > ``breaker_max_error_rate``
- p95 compute time of the successful requests > ``breaker_max_p95_ms``
- bad-audio rate (silent or clipped output) > ``breaker_max_bad_audio_rate``
- canary more than ``breaker_max_latency_ratio`` x slower than production (same voice, same window), by the
  median real-time factor: synthesis compute seconds per second of audio, as the engine measures it for
  each request (production's is observed with ``observe_production``, never judged). Per second of audio,
  because two versions of one voice may speak the same text at different lengths: in benchmarks/soak.py a
  healthy canary whose adapter speaks 1.7x longer took 1.8x production's time per request and was rolled
  back by a per-request latency ratio. Compute, not wall time, because the queue wait every variant shares
  is no property of the version (and divided by audio length it would favour long speech). The median,
  because a p95 over the canary's ~20 samples is its second-largest sample, against production's ~8th of
  ~150. A canary slow only in its tail is the absolute p95 rule's to catch.

Tripping takes effect in this process at once (routing reads ``is_open`` on every request, so the
canary's effective weight is 0 from the next request on), is exported as a metric and logged, and is
written to the registry by a background thread (never on the request path): the version gets the tags
``breaker_tripped=true`` and ``breaker_reason``, and the voice's canary weight is set to 0 so every
replica and the canary_promotion DAG see it. Production versions are never recorded here and never tripped.
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voice_lib.core.config import ServingSettings
from voice_lib.release.registry import Registry, RegistryError

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (voice_id, version)
_WRITE_ATTEMPTS = 6  # about a minute of backoff before giving up on the registry write


@dataclass
class _Sample:
    at: float
    latency_ms: float
    error: bool
    bad_audio: bool
    rtf: float | None = None  # compute seconds per audio second


@dataclass
class _State:
    samples: deque = field(default_factory=deque)
    open: bool = False
    code: str | None = None  # error_rate | p95_latency | latency_ratio | bad_audio | registry
    reason: str | None = None
    tripped_at: float | None = None


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]  # nearest rank, as voice_lib/release/rollout.py computes it


def _canary_rtf(samples: list[_Sample], at_least: int) -> float | None:
    """The canary's median real-time factor over its successful samples."""
    rtfs = [x.rtf for x in samples if not x.error and x.rtf is not None]
    return statistics.median(rtfs) if len(rtfs) >= at_least else None


class CanaryBreaker:
    """Thread-safe; ``record`` and ``is_open`` are cheap in-memory calls meant for the request path."""

    def __init__(self, settings: ServingSettings, registry: Registry | None = None, metrics: Any | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.registry = registry  # None: trips stay in this process (tests, no MLflow)
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[Key, _State] = {}
        self._production: dict[str, deque] = {}  # voice_id -> (at, latency_ms) of production requests
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self.registry_writes_done = 0

    # --- request path ----------------------------------------------------------------------------

    def is_open(self, voice_id: str, version: str) -> bool:
        state = self._states.get((voice_id, version))
        return bool(state and state.open)

    def record(self, voice_id: str, version: str, latency_ms: float, error: bool = False,
               bad_audio: bool = False, rtf: float | None = None) -> str | None:
        """Add one canary request; returns the trip reason if this request tripped the breaker."""
        now = self._clock()
        with self._lock:
            state = self._states.setdefault((voice_id, version), _State())
            if state.open:
                return None
            state.samples.append(_Sample(now, latency_ms, error, bad_audio, rtf))
            self._prune(state, now)
            found = self._verdict(state, self._production_rtf(voice_id, now))
            if found is None:
                return None
            state.open, (state.code, state.reason), state.tripped_at = True, found, time.time()
        log.warning("canary breaker tripped for voice-%s version %s: %s; canary traffic stopped", voice_id, version,
                    state.reason)
        if self.metrics is not None:
            self.metrics.breaker_open.labels(voice_id).set(1)
            self.metrics.canary_weight.labels(voice_id).set(0)
            self.metrics.rollbacks.labels(voice_id, state.code).inc()
        self._persist(voice_id, version, state.reason or "")
        return state.reason

    def observe_production(self, voice_id: str, rtf: float | None) -> None:
        """A production request's real-time factor: the latency-ratio rule's yardstick (never judged)."""
        if rtf is None:
            return
        now = self._clock()
        with self._lock:
            window = self._production.setdefault(voice_id, deque())
            window.append((now, rtf))
            horizon = now - self.settings.breaker_window_seconds
            while window and window[0][0] < horizon:
                window.popleft()

    def _production_rtf(self, voice_id: str, now: float) -> float | None:
        """Production's median real-time factor in the window (with enough samples, else None)."""
        horizon = now - self.settings.breaker_window_seconds
        values = [rtf for at, rtf in self._production.get(voice_id, ()) if at >= horizon]
        return statistics.median(values) if len(values) >= self.settings.breaker_min_requests else None

    def _prune(self, state: _State, now: float) -> None:
        horizon = now - self.settings.breaker_window_seconds
        while state.samples and state.samples[0].at < horizon:
            state.samples.popleft()

    def _verdict(self, state: _State, production_rtf: float | None = None) -> tuple[str, str] | None:
        s, samples = self.settings, list(state.samples)
        n = len(samples)
        if n < s.breaker_min_requests:
            return None
        window = f"over {n} canary requests in {s.breaker_window_seconds:g} s"
        errors = sum(x.error for x in samples) / n
        if errors > s.breaker_max_error_rate:
            return "error_rate", f"error rate {errors:.0%} > {s.breaker_max_error_rate:.0%} {window}"
        bad = sum(x.bad_audio for x in samples) / n
        if bad > s.breaker_max_bad_audio_rate:
            return "bad_audio", f"bad-audio rate {bad:.0%} > {s.breaker_max_bad_audio_rate:.0%} {window}"
        p95 = _p95([x.latency_ms for x in samples if not x.error])
        if p95 is not None and p95 > s.breaker_max_p95_ms:
            return "p95_latency", f"p95 latency {p95:.0f} ms > {s.breaker_max_p95_ms:.0f} ms {window}"
        rtf = _canary_rtf(samples, s.breaker_min_requests)
        if rtf is not None and production_rtf and rtf > s.breaker_max_latency_ratio * production_rtf:
            return "latency_ratio", (f"median real-time factor {rtf:.3f} (compute s per audio s) is "
                                     f"{rtf / production_rtf:.1f}x production's {production_rtf:.3f} "
                                     f"(limit {s.breaker_max_latency_ratio:g}x) {window}")
        return None

    # --- state for routing, status and reloads --------------------------------------------------

    def restore(self, voice_id: str, version: str, reason: str) -> None:
        """Mark a version open because the registry says it tripped earlier (this or another replica)."""
        with self._lock:
            state = self._states.setdefault((voice_id, version), _State())
            if not state.open:
                state.open, state.code, state.reason, state.tripped_at = True, "registry", reason, time.time()
        if self.metrics is not None:
            self.metrics.breaker_open.labels(voice_id).set(1)

    def state(self, voice_id: str, version: str) -> dict[str, Any]:
        with self._lock:
            state = self._states.get((voice_id, version)) or _State()
            self._prune(state, self._clock())
            samples = list(state.samples)
            production_rtf = self._production_rtf(voice_id, self._clock())
        n = len(samples)
        return {"open": state.open, "code": state.code, "reason": state.reason, "tripped_at": state.tripped_at,
                "window": {"requests": n, "rtf": _canary_rtf(samples, 1), "production_rtf": production_rtf,
                           "error_rate": sum(x.error for x in samples) / n if n else 0.0,
                           "bad_audio_rate": sum(x.bad_audio for x in samples) / n if n else 0.0,
                           "p95_ms": _p95([x.latency_ms for x in samples if not x.error])}}

    def forget_except(self, keys: set[Key]) -> None:
        """Drop state of versions no longer loaded (a version that returns is restored from its registry tag)."""
        with self._lock:
            for key in [k for k in self._states if k not in keys]:
                del self._states[key]
            voices = {voice for voice, _ in keys}
            for voice in [v for v in self._production if v not in voices]:
                del self._production[voice]

    # --- registry write, off the request path -----------------------------------------------------

    def _persist(self, voice_id: str, version: str, reason: str) -> None:
        if self.registry is None:
            return
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="breaker-registry-writer", daemon=True)
            self._writer.start()
        self._writes.put((voice_id, version, reason))

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                return
            voice_id, version, reason = item
            name = f"voice-{voice_id}"
            for attempt in range(_WRITE_ATTEMPTS):
                try:
                    self.registry.set_version_tags(name, version, {"breaker_tripped": "true", "breaker_reason": reason})
                    # Only zero the weight if the alias still points here: a newer canary keeps its own share.
                    if self.registry.aliases(name).get("canary") == version:
                        self.registry.set_canary_weight(name, 0)
                    self.registry_writes_done += 1
                    log.info("recorded the breaker trip of %s version %s in the registry", name, version)
                    break
                except (RegistryError, OSError) as exc:
                    delay = min(2 ** attempt, 20)
                    log.warning("recording the breaker trip of %s version %s failed (%s); retry in %d s",
                                name, version, exc, delay)
                    time.sleep(delay)
            else:
                log.error("gave up recording the breaker trip of %s version %s; it stays open in this process only",
                          name, version)

    def close(self, timeout: float = 10.0) -> None:
        """Finish pending registry writes (graceful shutdown)."""
        if self._writer is not None and self._writer.is_alive():
            self._writes.put(None)
            self._writer.join(timeout)
