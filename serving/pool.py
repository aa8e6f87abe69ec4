"""The voices a server holds in memory and the routing snapshot requests read.

One shared base model per base checkpoint (normally exactly one) stays resident; each registry version
aliased ``production`` or ``canary`` adds only its LoRA factors (voice_lib/infer/multilora.py), so a voice
costs its adapter, not a model copy. Versions are keyed ``(voice_id, version)``.

Requests read ``pool.snapshot``: an immutable ``Snapshot`` (serving/snapshot.py) that a reload replaces by
one reference assignment. A request keeps the snapshot it started with, so a swap never pulls an adapter
from under an in-flight batch; the old bank is freed when its last batch ends.

A reload (background poll every ``serving.poll_seconds``, or ``request_reload()`` from the admin
endpoint and the MLflow webhook) reads every ``voice-*`` model's aliases and release tags
(serving/registry_reader.py), downloads versions it does not hold and warms each with one synthesis
(serving/loader.py), then builds the next snapshot and swaps. If the registry or the artifact store fails,
the last good set keeps serving and ``degraded``/``last_error`` say why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from serving.engine import PendingOutput, SynthesisJob, SynthesisOutput, predict_batch
from serving.loader import VersionLoader
from serving.memory import trim_heap
from serving.registry_reader import RegistryReader
from serving.snapshot import EMPTY, Key, LoadedVersion, Snapshot, VoiceRoute, build_snapshot, route_voice, signature
from voice_lib.core.config import Settings
from voice_lib.infer.core import AcousticRow, render_rows
from voice_lib.infer.end_to_end import phoneme_inputs
from voice_lib.release.registry import Registry

log = logging.getLogger(__name__)


class VoicePool:
    """Loads, warms, swaps and unloads voice versions; thread-safe; see the module docstring."""

    def __init__(self, settings: Settings, registry: Registry | None = None,
                 breaker: Any | None = None, phonemize: Callable[[str], Sequence[int]] | None = None) -> None:
        self.settings = settings
        self.loader = VersionLoader(settings, registry or Registry(settings), breaker)
        self.reader = RegistryReader(self.loader.registry)
        self._phonemize = phonemize or (lambda text: phoneme_inputs(text, "auto"))
        self._snapshot: Snapshot = EMPTY
        self._infer_lock = threading.Lock()  # one model pass at a time: the CPU is the bottleneck anyway
        # The rows of a batch are vocoded in parallel (voice_lib/infer/core.py: WORLD releases the GIL), and
        # alongside the next batch's model pass (serving/batcher.py).
        threads = settings.serving.vocoder_threads or len(os.sched_getaffinity(0))
        self._vocoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vocoder")
        self._reload_lock = threading.Lock()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.last_error: str | None = None
        self.last_attempt_at: float | None = None
        self.last_success_at: float | None = None
        # Where the last reload that loaded anything spent its time (seconds per phase; /v1/admin/status).
        self.last_load_timings: dict[str, Any] = {}

    @property
    def registry(self) -> Registry:
        return self.loader.registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self.loader.registry = self.reader.registry = registry

    @property
    def breaker(self) -> Any | None:
        return self.loader.breaker

    @breaker.setter
    def breaker(self, breaker: Any | None) -> None:
        self.loader.breaker = breaker

    # --- what requests read --------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return bool(self._snapshot.voices)

    @property
    def degraded(self) -> bool:
        return self.last_error is not None

    @property
    def vocoder(self) -> Executor:
        """The thread pool rows are rendered on (the batcher submits to it; ``close`` shuts it down)."""
        return self._vocoder

    def predict_batch(self, jobs: Sequence[SynthesisJob]) -> list[PendingOutput | Exception]:
        """The model stage of a batch, one at a time; the renderings it returns need no lock (serving/engine.py)."""
        ev = self.settings.eval
        with self._infer_lock:
            return predict_batch(jobs, ev.silence_dbfs, ev.clipping_fraction)

    def run_batch(self, jobs: Sequence[SynthesisJob]) -> Iterator[tuple[int, SynthesisOutput | Exception]]:
        """Both stages at once (the warm-up): the model pass under the lock, then the rows on the vocoder threads."""
        yield from render_rows(self.predict_batch(jobs), self._vocoder)

    def durations(self, snap: Snapshot, version: Any, chunks: Sequence[Sequence[int]],
                  speed: float) -> tuple[list[np.ndarray], float] | None:
        """Decoder steps per phone of each chunk with ``version``, and seconds per step; None when the version's
        backend does not predict durations (word timestamps then cannot be given)."""
        backend = snap.bases[version.base_sha256]
        predict = getattr(backend, "predict_durations", None)
        if predict is None:
            return None
        bank = snap.banks[version.base_sha256]
        rows = [AcousticRow(ids, version.speaker, bank.slot(version.key), speed) for ids in chunks]
        with self._infer_lock:
            return predict(rows, bank), backend.seconds_per_step

    # --- background polling --------------------------------------------------------------------

    def start(self) -> None:
        """Load in the background now and then every poll_seconds; /readyz turns 200 after the first load."""
        self._thread = threading.Thread(target=self._poll, name="voice-pool-poller", daemon=True)
        self._thread.start()

    def request_reload(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; batches still run (the batcher drains after this), until ``close``."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Release the vocoder threads, once nothing submits batches any more."""
        self._vocoder.shutdown(wait=True)

    def _poll(self) -> None:
        trimmed_at, trim_next = 0.0, False
        while not self._stopping.is_set():
            try:
                swapped = self.reload().get("swapped")
            except Exception as exc:
                log.exception("reload failed")
                self.last_error = f"reload failed: {exc}"
                swapped = False
            # A swap frees the old versions once their last request ends: trim on the next poll after it, and
            # otherwise every heap_trim_seconds (serving/memory.py).
            every = self.settings.serving.heap_trim_seconds
            if every > 0 and (trim_next or time.monotonic() - trimmed_at > every):
                trim_heap()
                trimmed_at = time.monotonic()
            trim_next = bool(swapped)
            self._wake.wait(self.settings.serving.poll_seconds)
            self._wake.clear()

    # --- reload ----------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Bring the loaded set in line with the registry; returns a summary (also kept for /admin/status)."""
        with self._reload_lock:
            self.last_attempt_at = time.time()
            old = self._snapshot
            started = time.perf_counter()
            try:
                wanted = self.reader.read(old.voices)
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving the last good set
                self.last_error = f"registry unreachable, serving the last good set: {exc}"
                log.warning("%s", self.last_error)
                return {"swapped": False, "error": self.last_error}
            if self.breaker is not None:  # a trip on any replica holds here too (serving/registry_reader.py)
                for w in wanted.values():
                    if w.canary_tripped:
                        self.breaker.restore(w.voice_id, w.canary, w.canary_tripped)
            held = {v.key: v for v in old.versions}
            errors: list[str] = []
            missing = sorted({k for w in wanted.values() for k in w.keys} - held.keys())
            read_at = time.perf_counter()
            fresh = self.loader.load_missing(missing, errors)
            loaded_at = time.perf_counter()
            if fresh:
                canaries = {(w.voice_id, w.canary) for w in wanted.values() if w.canary}
                ids = self._phonemize(self.settings.serving.warmup_text)
                fresh = self.loader.warm_up(fresh, canaries, ids, self.run_batch, errors,
                                            text=self.settings.serving.warmup_text)
            if missing:
                self.last_load_timings = {"versions": len(missing), "registry_read_s": round(read_at - started, 3),
                                          "load_s": round(loaded_at - read_at, 3),
                                          **{k: round(v, 3) for k, v in self.loader.last_timings.items()},
                                          "warm_up_s": round(time.perf_counter() - loaded_at, 3)}
            available = {**held, **fresh}
            routes = {voice_id: route for voice_id, w in wanted.items()
                      if (route := route_voice(w, available, old.voices.get(voice_id), errors)) is not None}
            self.last_error = "; ".join(errors) or None
            self.last_success_at = time.time()
            if signature(routes) == signature(old.voices):  # nothing changed: keep the banks, skip the swap
                return {"swapped": False, "generation": old.generation, "voices": sorted(routes), "loaded": [],
                        "errors": errors}
            return self._swap(routes, held, fresh, errors)

    def _swap(self, routes: dict[str, VoiceRoute], held: dict[Key, LoadedVersion], fresh: dict[Key, LoadedVersion],
              errors: list[str]) -> dict[str, Any]:
        self._generation += 1
        new = build_snapshot(self._generation, routes, self.loader.bases)
        self.loader.bases = dict(new.bases)  # bases nobody references any more are dropped here
        self._snapshot = new  # the swap: one reference assignment
        serving = {v.key for v in new.versions}
        for key in sorted(held.keys() - serving):
            log.info("unloaded voice-%s version %s", *key)
        for key in sorted(fresh.keys() & serving):
            log.info("loaded voice-%s version %s", *key)
        for listener in self.listeners:
            listener(new)
        return {"swapped": True, "generation": new.generation, "voices": sorted(routes),
                "loaded": sorted(f"{k[0]}@{k[1]}" for k in fresh if k in serving), "errors": errors}
