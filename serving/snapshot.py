"""The immutable routing snapshot requests read, and the builder that makes the next one.

A ``Snapshot`` holds, per voice, the loaded production and canary versions (``VoiceRoute``), the resident
acoustic backends (one per base checkpoint) and one adapter bank per base. The pool replaces it by one
reference assignment; a request keeps the snapshot it started with, so a swap never pulls an adapter from
under an in-flight batch, and the old bank is freed when its last batch ends.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from serving.engine import SynthesisJob
from voice_lib.infer.core import END_TO_END, AcousticBackend
from voice_lib.infer.multilora import AdapterWeights, LoraBank

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
    backend: str = END_TO_END  # the lineage tag ``backend``
    frontend: Mapping[str, Any] = field(default_factory=dict)  # the voice's part of the text frontend (two_stage.json)

    @property
    def key(self) -> Key:
        return (self.voice_id, self.version)


@dataclass(frozen=True)
class WantedVoice:
    """What the registry says one voice should serve (versions as registry strings)."""

    voice_id: str
    production: str | None
    canary: str | None
    weight: int
    state: str
    # The canary version's breaker_tripped reason in the registry (a trip on any replica), else None.
    canary_tripped: str | None = None

    @property
    def keys(self) -> list[Key]:
        return [(self.voice_id, v) for v in (self.production, self.canary) if v]


@dataclass(frozen=True)
class VoiceRoute:
    """What one voice serves. ``canary`` is None when there is no loaded canary."""

    voice_id: str
    production: LoadedVersion
    canary: LoadedVersion | None
    canary_weight: int
    release_state: str
    notes: tuple[str, ...] = ()

    def wanted(self) -> WantedVoice:
        """This route as the registry last said it (used while a voice's registry entry cannot be read)."""
        return WantedVoice(self.voice_id, self.production.version, self.canary and self.canary.version,
                           self.canary_weight, self.release_state)


@dataclass(frozen=True, eq=False)
class Snapshot:
    generation: int
    voices: Mapping[str, VoiceRoute]
    bases: Mapping[str, AcousticBackend]
    banks: Mapping[str, LoraBank]
    created_at: float

    def job(self, version: LoadedVersion, inputs: Any, speed: float = 1.0) -> SynthesisJob:
        """A batcher job for ``inputs`` (what ``version``'s backend frontend made: phoneme ids or source frames)."""
        bank = self.banks[version.base_sha256]
        return SynthesisJob(inputs, speed, self.bases[version.base_sha256], bank, bank.slot(version.key),
                            version.speaker)

    @property
    def versions(self) -> list[LoadedVersion]:
        found = {v.key: v for r in self.voices.values() for v in (r.production, r.canary) if v is not None}
        return list(found.values())


EMPTY = Snapshot(0, MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), 0.0)


def route_voice(w: WantedVoice, available: Mapping[Key, LoadedVersion], previous: VoiceRoute | None,
                errors: list[str]) -> VoiceRoute | None:
    """The route for one voice from what loaded; a production version that failed keeps the last good one."""
    notes: list[str] = []
    production = available.get((w.voice_id, w.production)) if w.production else None
    if production is None:
        if w.production is None:
            if w.canary:
                errors.append(f"voice-{w.voice_id} has a canary but no production version; not served")
            return None
        if previous is None:
            return None
        production = previous.production  # last good: a version that failed to load never takes traffic
        notes.append(f"production version {w.production} failed to load; still serving {production.version}")
    canary = available.get((w.voice_id, w.canary)) if w.canary else None
    if w.canary and canary is None:
        notes.append(f"canary version {w.canary} failed to load; no canary traffic")
    if canary is not None and canary.warmup.get("error"):
        notes.append(f"canary warm-up: {canary.warmup['error']}")
    return VoiceRoute(w.voice_id, production, canary, w.weight, w.state, tuple(notes))


def signature(routes: Mapping[str, VoiceRoute]) -> tuple:
    """Equal for two route sets that serve the same thing (then the pool keeps its snapshot)."""
    return tuple(sorted((v, r.production.key, r.canary and r.canary.key, r.canary_weight, r.release_state, r.notes)
                        for v, r in routes.items()))


def build_snapshot(generation: int, routes: dict[str, VoiceRoute], bases: Mapping[str, AcousticBackend]) -> Snapshot:
    """The next snapshot: the backends its versions use and one adapter bank per backend."""
    versions = {v.key: v for r in routes.values() for v in (r.production, r.canary) if v is not None}
    by_base: dict[str, list[LoadedVersion]] = {}
    for v in versions.values():
        by_base.setdefault(v.base_sha256, []).append(v)
    used = {sha: bases[sha] for sha in by_base}
    banks = {sha: LoraBank([(v.key, v.weights) for v in sorted(vs, key=lambda v: v.key)], used[sha].shapes)
             for sha, vs in by_base.items()}
    return Snapshot(generation, MappingProxyType(routes), MappingProxyType(used), MappingProxyType(banks), time.time())
