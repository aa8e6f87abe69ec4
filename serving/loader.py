"""Loading voice versions for the server: download, the exact base, the adapter, warm-up.

Each version is downloaded once into ``cache_dir/serving`` (versions are immutable), its base is resolved
by the weights hash in its lineage (voice_lib.release.models.trained_base_dir) and kept resident, shared by
every version trained on it, and only its LoRA factors are held per version. A version that fails to load
is retried with exponential backoff, not on every poll. The versions of one reload are fetched and prepared on
``serving.load_workers`` threads (MLflow downloads wait on the network, the reference synthesizer on a subprocess):
with 50 voices a serial start spent most of its time there (benchmarks/cold_start.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from serving.engine import SynthesisError, SynthesisJob, SynthesisOutput
from serving.snapshot import Key, LoadedVersion
from voice_lib.core.config import Settings
from voice_lib.infer.core import END_TO_END, AcousticBackend, read_frontend
from voice_lib.infer.backends import load_backend
from voice_lib.infer.multilora import AdapterWeights, LoraBank
from voice_lib.release.models import trained_base_dir
from voice_lib.release.registry import Registry, RegistryError

log = logging.getLogger(__name__)
RunBatch = Callable[[Sequence[SynthesisJob]], Iterator[tuple[int, SynthesisOutput | Exception]]]


class VersionLoader:
    """Loads versions and keeps the resident backends (by base sha256). One reload at a time (the pool serialises
    them); within one, versions load on ``serving.load_workers`` threads."""

    def __init__(self, settings: Settings, registry: Registry, breaker: Any | None = None) -> None:
        self.settings, self.registry = settings, registry
        self.breaker = breaker  # restore(voice_id, version, reason) for versions tagged breaker_tripped
        self.cache_dir = settings.cache_dir / "serving"
        self.bases: dict[str, AcousticBackend] = {}  # resident backends by base sha256; pruned at each swap
        self._failed: dict[Key, tuple[float, int, str]] = {}  # key -> (retry after, attempts, error)
        # Seconds the last load_missing spent per step, summed over its versions (the pool reports them).
        self.last_timings: dict[str, float] = {}
        self._lock = threading.Lock()  # the resident bases and the timings, shared by the loading threads

    def _workers(self, jobs: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, min(self.settings.serving.load_workers, jobs)),
                                  thread_name_prefix="version-loader")

    def load_missing(self, keys: Sequence[Key], errors: list[str]) -> dict[Key, LoadedVersion]:
        """Load ``keys`` in parallel; a failure goes to ``errors`` and is not retried before its backoff ends."""
        fresh: dict[Key, LoadedVersion] = {}
        now = time.monotonic()
        self.last_timings = {"fetch_s": 0.0, "base_s": 0.0, "adapter_s": 0.0}
        due = []  # (key, its earlier failure or None)
        for key in keys:
            failed = self._failed.get(key)
            if failed is not None and failed[0] > now:  # versions are immutable: don't re-download every poll
                errors.append(failed[2])
            else:
                due.append((key, failed))
        if not due:
            return fresh
        with self._workers(len(due)) as pool:
            futures = [(key, failed, pool.submit(self.load_version, *key)) for key, failed in due]
        for key, failed, future in futures:
            try:
                fresh[key] = future.result()
                self._failed.pop(key, None)
            except Exception as exc:  # noqa: BLE001 - one bad version must not block the others
                message = f"voice-{key[0]} version {key[1]}: {exc}"
                errors.append(message)
                tries = failed[1] + 1 if failed else 1
                self._failed[key] = (now + min(300.0, 5.0 * 2 ** tries), tries, message)
                log.warning("could not load voice-%s version %s (retry in %.0f s): %s", *key,
                            min(300.0, 5.0 * 2 ** tries), exc)
        return fresh

    def load_version(self, voice_id: str, version: str) -> LoadedVersion:
        name = f"voice-{voice_id}"
        started = time.perf_counter()
        info = self.registry.version(name, version)
        folder = self.cache_dir / name / version
        if not (folder / "adapter_model.safetensors").exists():  # versions are immutable: a complete copy is reusable
            self.registry.download(name, version, folder)
        meta = json.loads((folder / "voice.json").read_text()) if (folder / "voice.json").exists() else {}
        lineage = {**meta, **info.tags}
        downloaded = time.perf_counter()
        base = self.backend_for(lineage, name, version)
        based = time.perf_counter()
        weights = AdapterWeights.load(folder)
        speaker = torch.from_numpy(np.load(folder / "speaker_embedding.npy").astype(np.float32)).reshape(-1)
        LoraBank([((voice_id, version), weights)], base.shapes)  # fails now if shapes do not fit the base
        if info.tags.get("breaker_tripped") == "true" and self.breaker is not None:
            self.breaker.restore(voice_id, version, info.tags.get("breaker_reason", "tripped earlier"))
        self._add_timings(fetch_s=downloaded - started, base_s=based - downloaded, adapter_s=time.perf_counter() - based)
        fault = info.tags.get("fault_injection") if self.settings.serving.fault_injection else None
        if fault:
            log.warning("fault injection %r is active for %s version %s (serving.fault_injection is on)", fault, name, version)
        return LoadedVersion(voice_id, version, base.sha256, speaker, weights, dict(info.tags), time.time(),
                             fault=parse_fault(fault) if fault else None, backend=base.name,
                             frontend=read_frontend(folder))

    def _add_timings(self, **seconds: float) -> None:
        with self._lock:
            for step, value in seconds.items():
                self.last_timings[step] = self.last_timings.get(step, 0.0) + value

    def backend_for(self, lineage: Mapping[str, Any], name: str, version: str) -> AcousticBackend:
        """The exact base a version was trained on (by sha256), loaded once: never an adapter on another base."""
        sha = str(lineage.get("base_sha256") or "")
        if not sha:
            raise RegistryError(f"{name} version {version} has no base_sha256 lineage tag; cannot pick its base.")
        backend = str(lineage.get("backend") or END_TO_END)
        with self._lock:  # loading threads that need the same base wait for the first to load it
            return self._resident_backend(sha, backend, lineage, name, version)

    def _resident_backend(self, sha: str, backend: str, lineage: Mapping[str, Any], name: str, version: str) -> AcousticBackend:
        resident = self.bases.get(sha)
        if resident is not None and resident.name == backend:
            return resident
        try:
            folder = trained_base_dir(self.settings, lineage, f"{name} version {version}", self.registry)
        except FileNotFoundError as exc:
            raise RegistryError(str(exc)) from None
        loaded = load_backend(backend, folder, sha)
        self.bases = {**self.bases, sha: loaded}
        log.info("loaded base %s (sha256 %s…, backend %s) from %s", lineage.get("base_model", "voice-base"), sha[:12],
                 backend, folder)
        return loaded

    def warm_up(self, fresh: dict[Key, LoadedVersion], canaries: set[Key], ids: Sequence[int], run_batch: RunBatch,
                errors: list[str], text: str = "") -> dict[Key, LoadedVersion]:
        """One synthesis per new version before it takes traffic.

        A version that raises is not swapped in. Non-finite output refuses a production version (nothing
        else protects production); a canary with bad output is still loaded: judging a canary on live
        traffic is the breaker's job, and its requests fall back to production (serving/synthesis.py).
        """
        by_base: dict[str, list[LoadedVersion]] = {}
        for v in fresh.values():
            by_base.setdefault(v.base_sha256, []).append(v)
        kept: dict[Key, LoadedVersion] = {}
        for sha, versions in by_base.items():
            base = self.bases[sha]
            bank = LoraBank([(v.key, v.weights) for v in versions], base.shapes)
            # The warm-up sentence through each version's own frontend (two-stage: its reference voice renders it).
            def job(v: LoadedVersion, base: AcousticBackend = base, bank: LoraBank = bank) -> SynthesisJob:
                inputs = ids if v.backend == END_TO_END else base.model_inputs(text, "en", v.frontend)
                return SynthesisJob(inputs, 1.0, base, bank, bank.slot(v.key), v.speaker)

            with self._workers(len(versions)) as pool:
                jobs = list(pool.map(job, versions))
            started = time.perf_counter()
            for i, out in run_batch(jobs):
                v = versions[i]
                if isinstance(out, SynthesisError) and v.key in canaries:
                    kept[v.key] = replace(v, warmup={"error": str(out)})
                elif isinstance(out, Exception):
                    message = f"voice-{v.voice_id} version {v.version}: warm-up failed: {out}"
                    errors.append(message)
                    self._failed[v.key] = (time.monotonic() + 60.0, 1, message)
                else:
                    kept[v.key] = replace(v, warmup={"seconds": round(time.perf_counter() - started, 3),
                                                     "audio_seconds": round(len(out.audio) / out.sample_rate, 3),
                                                     "bad_audio": out.bad})
        return kept


def parse_fault(value: str) -> str:
    """Validate a ``fault_injection`` tag: ``raise``, ``silence`` or ``slow:<factor>`` (factor > 1)."""
    kind, _, arg = value.strip().partition(":")
    if kind in ("raise", "silence") and not arg:
        return kind
    if kind == "slow":
        try:
            if float(arg) > 1:
                return f"slow:{float(arg):g}"
        except ValueError:
            pass
    raise ValueError(f"fault_injection tag {value!r} is not one of raise, silence, slow:<factor greater than 1>")
