"""The voices a server holds in memory and the routing snapshot requests read.

One shared base model per base checkpoint (normally exactly one) stays resident; each registry version
aliased ``production`` or ``canary`` adds only its LoRA factors (serving/multilora.py), so a voice costs
its adapter, not a model copy. Versions are keyed ``(voice_id, version)``.

Requests read ``pool.snapshot``: an immutable ``Snapshot`` (routes, bases, adapter banks) that a reload
replaces by one reference assignment. A request keeps the snapshot it started with, so a swap never
pulls an adapter from under an in-flight batch; the old bank is freed when its last batch ends.

A reload (background poll every ``serving.poll_seconds``, or ``request_reload()`` from the admin
endpoint and the MLflow webhook) reads every ``voice-*`` model's aliases and release tags, downloads
versions it does not hold, warms each with one synthesis, then swaps. If the registry or the artifact
store fails, the last good set keeps serving and ``degraded``/``last_error`` say why.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from serving.engine import (
    BaseBundle,
    SynthesisError,
    SynthesisJob,
    SynthesisOutput,
    run_batch,
)
from serving.memory import trim_heap
from serving.multilora import AdapterWeights, LoraBank, install
from voice_lib.core.config import Settings, redact_url
from voice_lib.data.features import FeatureConfig
from voice_lib.model.checkpoints import load_base
from voice_lib.release.registry import Registry, RegistryError

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (voice_id, version)


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    voice_id: str
    version: str
    base_sha256: str
    speaker: torch.Tensor  # (speaker_dim,) GE2E embedding of the voice
    weights: AdapterWeights
    tags: Mapping[str, str]
    loaded_at: float
    warmup: Mapping[str, Any] = field(default_factory=dict)
    fault: str | None = None  # game-day fault injection (serving.fault_injection): raise | silence | slow:<factor>

    @property
    def key(self) -> Key:
        return (self.voice_id, self.version)


@dataclass(frozen=True)
class VoiceRoute:
    """What one voice serves. ``canary`` is None when there is no loaded canary."""

    voice_id: str
    production: LoadedVersion
    canary: LoadedVersion | None
    canary_weight: int
    release_state: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Snapshot:
    generation: int
    voices: Mapping[str, VoiceRoute]
    bases: Mapping[str, BaseBundle]
    banks: Mapping[str, LoraBank]
    created_at: float

    def job(self, version: LoadedVersion, phoneme_ids: Sequence[int], speed: float = 1.0) -> SynthesisJob:
        bank = self.banks[version.base_sha256]
        return SynthesisJob(phoneme_ids, speed, self.bases[version.base_sha256], bank, bank.slot(version.key),
                            version.speaker)

    @property
    def versions(self) -> list[LoadedVersion]:
        found = {v.key: v for r in self.voices.values() for v in (r.production, r.canary) if v is not None}
        return list(found.values())


EMPTY = Snapshot(0, MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), 0.0)


class VoicePool:
    """Loads, warms, swaps and unloads voice versions; thread-safe; see the module docstring."""

    def __init__(self, settings: Settings, registry: Registry | None = None,
                 breaker: Any | None = None, phonemize: Callable[[str], Sequence[int]] | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings)
        self.breaker = breaker  # restore(voice_id, version, reason) for versions tagged breaker_tripped
        self._phonemize = phonemize or _phoneme_ids
        self._snapshot: Snapshot = EMPTY
        self._infer_lock = threading.Lock()  # one batch at a time: the CPU is the bottleneck anyway
        # The rows of a batch are vocoded in parallel (serving/engine.py: WORLD releases the GIL).
        threads = settings.serving.vocoder_threads or len(os.sched_getaffinity(0))
        self._vocoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vocoder")
        self._reload_lock = threading.Lock()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._bases_seen: dict[str, BaseBundle] = {}  # resident bases by sha256; pruned at each swap
        self._failed: dict[Key, tuple[float, int, str]] = {}  # key -> (retry after, attempts, error)
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.last_error: str | None = None
        self.last_attempt_at: float | None = None
        self.last_success_at: float | None = None
        self.cache_dir = settings.cache_dir / "serving"

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

    def run_batch(self, jobs: Sequence[SynthesisJob]) -> Iterator[tuple[int, SynthesisOutput | Exception]]:
        ev = self.settings.eval
        with self._infer_lock:
            yield from run_batch(jobs, ev.silence_dbfs, ev.clipping_fraction, self._vocoder)

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
            try:
                wanted = self._read_registry(old)
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving the last good set
                self.last_error = f"registry unreachable, serving the last good set: {exc}"
                log.warning("%s", self.last_error)
                return {"swapped": False, "error": self.last_error}
            held = {v.key: v for v in old.versions}
            errors: list[str] = []
            fresh: dict[Key, LoadedVersion] = {}
            now = time.monotonic()
            for key in sorted({k for w in wanted.values() for k in w["keys"]} - held.keys()):
                failed = self._failed.get(key)
                if failed is not None and failed[0] > now:  # versions are immutable: don't re-download every poll
                    errors.append(failed[2])
                    continue
                try:
                    fresh[key] = self._load_version(*key)
                    self._failed.pop(key, None)
                except Exception as exc:  # noqa: BLE001 - one bad version must not block the others
                    message = f"voice-{key[0]} version {key[1]}: {exc}"
                    errors.append(message)
                    tries = failed[1] + 1 if failed else 1
                    self._failed[key] = (now + min(300.0, 5.0 * 2 ** tries), tries, message)
                    log.warning("could not load voice-%s version %s (retry in %.0f s): %s", *key,
                                min(300.0, 5.0 * 2 ** tries), exc)
            fresh = self._warm_up(fresh, wanted, errors)
            available = {**held, **fresh}
            routes: dict[str, VoiceRoute] = {}
            for voice_id, w in wanted.items():
                route = self._route(voice_id, w, available, old.voices.get(voice_id), errors)
                if route is not None:
                    routes[voice_id] = route
            self.last_error = "; ".join(errors) or None
            self.last_success_at = time.time()
            if _signature(routes) == _signature(old.voices):  # nothing changed: keep the banks, skip the swap
                return {"swapped": False, "generation": old.generation, "voices": sorted(routes), "loaded": [],
                        "errors": errors}
            new = self._build_snapshot(routes, old)
            self._snapshot = new  # the swap: one reference assignment
            for key in sorted(held.keys() - {v.key for v in new.versions}):
                log.info("unloaded voice-%s version %s", *key)
            for key in sorted(fresh.keys() & {v.key for v in new.versions}):
                log.info("loaded voice-%s version %s", *key)
            for listener in self.listeners:
                listener(new)
            return {"swapped": True, "generation": new.generation, "voices": sorted(routes),
                    "loaded": sorted(f"{k[0]}@{k[1]}" for k in fresh if k in {v.key for v in new.versions}),
                    "errors": errors}

    def _read_registry(self, old: Snapshot) -> dict[str, dict[str, Any]]:
        _probe_mlflow(self.registry.uri)
        wanted: dict[str, dict[str, Any]] = {}
        for name in self.registry.list_voice_models():
            voice_id = name.removeprefix("voice-")
            try:
                state = self.registry.release_state(name)
            except RegistryError as exc:
                if voice_id in old.voices:  # keep what this voice served; the next poll retries
                    r = old.voices[voice_id]
                    wanted[voice_id] = {"production": r.production.version, "canary": r.canary and r.canary.version,
                                        "weight": r.canary_weight, "state": r.release_state,
                                        "keys": [v.key for v in (r.production, r.canary) if v]}
                log.warning("reading %s failed: %s", name, exc)
                continue
            aliases = state["aliases"]
            production, canary = aliases.get("production"), aliases.get("canary")
            if canary == production:
                canary = None
            keys = [(voice_id, v) for v in (production, canary) if v]
            wanted[voice_id] = {"production": production, "canary": canary, "weight": int(state["canary_weight"]),
                                "state": state["release_state"], "keys": keys}
        return wanted

    def _route(self, voice_id: str, w: dict[str, Any], available: dict[Key, LoadedVersion],
               previous: VoiceRoute | None, errors: list[str]) -> VoiceRoute | None:
        notes: list[str] = []
        production = available.get((voice_id, w["production"])) if w["production"] else None
        if production is None:
            if w["production"] is None:
                if w["canary"]:
                    errors.append(f"voice-{voice_id} has a canary but no production version; not served")
                return None
            if previous is None:
                return None
            production = previous.production  # last good: a version that failed to load never takes traffic
            notes.append(f"production version {w['production']} failed to load; still serving {production.version}")
        canary = available.get((voice_id, w["canary"])) if w["canary"] else None
        if w["canary"] and canary is None:
            notes.append(f"canary version {w['canary']} failed to load; no canary traffic")
        if canary is not None and canary.warmup.get("error"):
            notes.append(f"canary warm-up: {canary.warmup['error']}")
        return VoiceRoute(voice_id, production, canary, w["weight"], w["state"], tuple(notes))

    def _build_snapshot(self, routes: dict[str, VoiceRoute], old: Snapshot) -> Snapshot:
        versions = {v.key: v for r in routes.values() for v in (r.production, r.canary) if v is not None}
        by_base: dict[str, list[LoadedVersion]] = {}
        for v in versions.values():
            by_base.setdefault(v.base_sha256, []).append(v)
        bases = {sha: self._bases_seen[sha] for sha in by_base}
        banks = {sha: LoraBank([(v.key, v.weights) for v in sorted(vs, key=lambda v: v.key)], bases[sha].shapes)
                 for sha, vs in by_base.items()}
        self._bases_seen = dict(bases)  # bases nobody references any more are dropped here
        self._generation += 1
        return Snapshot(self._generation, MappingProxyType(routes), MappingProxyType(bases), MappingProxyType(banks),
                        time.time())

    # --- loading ----------------------------------------------------------------------------------

    def _load_version(self, voice_id: str, version: str) -> LoadedVersion:
        name = f"voice-{voice_id}"
        info = self.registry.version(name, version)
        folder = self.cache_dir / name / version
        if not (folder / "adapter_model.safetensors").exists():  # versions are immutable: a complete copy is reusable
            self.registry.download(name, version, folder)
        meta = json.loads((folder / "voice.json").read_text()) if (folder / "voice.json").exists() else {}
        lineage = {**meta, **info.tags}
        base = self._resolve_base(lineage, name, version)
        weights = AdapterWeights.load(folder)
        speaker = torch.from_numpy(np.load(folder / "speaker_embedding.npy").astype(np.float32)).reshape(-1)
        LoraBank([((voice_id, version), weights)], base.shapes)  # fails now if shapes do not fit the base
        if info.tags.get("breaker_tripped") == "true" and self.breaker is not None:
            self.breaker.restore(voice_id, version, info.tags.get("breaker_reason", "tripped earlier"))
        fault = info.tags.get("fault_injection") if self.settings.serving.fault_injection else None
        if fault:
            log.warning("fault injection %r is active for %s version %s (serving.fault_injection is on)", fault, name, version)
        return LoadedVersion(voice_id, version, base.sha256, speaker, weights, dict(info.tags), time.time(),
                             fault=parse_fault(fault) if fault else None)

    def _resolve_base(self, lineage: Mapping[str, Any], name: str, version: str) -> BaseBundle:
        """The exact base a version was trained on (by sha256): never serve an adapter on another base."""
        from voice_lib.core.hashing import sha256_file
        from voice_lib.model.checkpoints import SHIPPED_BASE

        sha = str(lineage.get("base_sha256") or "")
        if not sha:
            raise RegistryError(f"{name} version {version} has no base_sha256 lineage tag; cannot pick its base.")
        if sha in self._bases_seen:
            return self._bases_seen[sha]
        candidates: list[Path] = []
        base_version = str(lineage.get("base_version") or "")
        if base_version.isdigit():
            dest = self.cache_dir / "voice-base" / base_version
            try:
                if not (dest / "model.safetensors").exists():
                    self.registry.download(str(lineage.get("base_model") or "voice-base"), base_version, dest)
                candidates.append(dest)
            except RegistryError as exc:  # the configured or shipped base may still be the right one
                log.info("%s version %s: registered base version %s unavailable (%s)", name, version, base_version, exc)
        candidates += [p for p in (self.settings.serving.base_dir, SHIPPED_BASE) if p is not None]
        for folder in candidates:
            if (folder / "model.safetensors").exists() and sha256_file(folder / "model.safetensors") == sha:
                model = load_base(folder)
                shapes = install(model)
                model.eval()
                config = json.loads((folder / "config.json").read_text()).get("feature_config")
                bundle = BaseBundle(sha, model, shapes, FeatureConfig(**config) if config else FeatureConfig(), str(folder))
                self._bases_seen = {**self._bases_seen, sha: bundle}
                log.info("loaded base %s (sha256 %s…) from %s", lineage.get("base_model", "voice-base"), sha[:12], folder)
                return bundle
        raise RegistryError(f"{name} version {version} was trained on base sha256 {sha[:12]}…, which is neither "
                            f"voice-base version {base_version or '?'}, serving.base_dir nor the shipped base; "
                            "register that base or point VOICEOPS_SERVING__BASE_DIR at it.")

    def _warm_up(self, fresh: dict[Key, LoadedVersion], wanted: dict[str, dict[str, Any]],
                 errors: list[str]) -> dict[Key, LoadedVersion]:
        """One synthesis per new version before it takes traffic.

        A version that raises is not swapped in. Non-finite output refuses a production version (nothing
        else protects production); a canary with bad output is still loaded: judging a canary on live
        traffic is the breaker's job, and its requests fall back to production (serving/app.py).
        """
        if not fresh:
            return fresh
        ids = self._phonemize(self.settings.serving.warmup_text)
        canaries = {(v, w["canary"]) for v, w in wanted.items() if w["canary"]}
        by_base: dict[str, list[LoadedVersion]] = {}
        for v in fresh.values():
            by_base.setdefault(v.base_sha256, []).append(v)
        kept: dict[Key, LoadedVersion] = {}
        for sha, versions in by_base.items():
            base = self._bases_seen[sha]
            bank = LoraBank([(v.key, v.weights) for v in versions], base.shapes)
            jobs = [SynthesisJob(ids, 1.0, base, bank, bank.slot(v.key), v.speaker) for v in versions]
            started = time.perf_counter()
            for i, out in self.run_batch(jobs):
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


def _signature(routes: Mapping[str, VoiceRoute]) -> tuple:
    return tuple(sorted((v, r.production.key, r.canary and r.canary.key, r.canary_weight, r.release_state, r.notes)
                        for v, r in routes.items()))


def _phoneme_ids(text: str) -> list[int]:
    from voice_lib.data.text import phonemes_to_ids, phonemize

    return phonemes_to_ids(phonemize(text, "auto"))


def bound_registry_requests(retries: int, timeout_seconds: int) -> None:
    """Bound every MLflow client request of this process: MLflow's own retries (7, exponential backoff) hold a
    request to a server that died after the probe below for over two minutes, and with it the reload, so
    readiness said nothing about the outage. MLflow's client is configured only through its environment, so
    the server writes these two variables once, at start-up, from its settings."""
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_seconds)


def _probe_mlflow(uri: str) -> None:
    # A dead server fails this 5 s probe before a reload makes its MLflow calls (bound_registry_requests
    # bounds those for a server that dies mid-reload).
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            shown = redact_url(uri)
            raise RegistryError(f"MLflow at {shown} is not reachable ({str(exc).replace(uri.rstrip('/'), shown.rstrip('/'))})") from None
