"""Registered models as the serving and evaluation sides load them: the base to tune on, a voice version."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.infer.core import END_TO_END
from voice_lib.infer.synthesizer import Synthesizer
from voice_lib.model.checkpoints import CONVERTER_WEIGHTS, SHIPPED_BASE, SHIPPED_CONVERTER

log = logging.getLogger(__name__)


def base_model_dir(settings: Settings, backend: str = "end_to_end") -> Path:
    """The base the voices of ``backend`` are fine-tuned on. End-to-end: the registry's voice-base@production,
    else the shipped one. Two-stage: the converter in ``model.converter_dir`` if set, else the shipped one."""
    from voice_lib.release.registry import Registry, RegistryError

    if backend == "two_stage":
        converter = settings.model.converter_dir or SHIPPED_CONVERTER
        if not (converter / CONVERTER_WEIGHTS).exists():
            raise FileNotFoundError(f"no two-stage converter in {converter}: set VOICEOPS_MODEL__CONVERTER_DIR to the output "
                                    "of `voiceops pretrain --backend two-stage`, or use VOICEOPS_MODEL__BACKEND=end_to_end")
        return converter

    try:
        registry = Registry(settings)
        if registry.version_by_alias("voice-base", "production") is not None:
            return registry.download("voice-base", "production", settings.cache_dir / "models" / "voice-base")
    except RegistryError as exc:
        log.info("no registered base model (%s); using the shipped one", exc)
    if not (SHIPPED_BASE / "model.safetensors").exists():
        raise FileNotFoundError(f"no base model: neither voice-base@production in MLflow nor {SHIPPED_BASE}; run `voiceops pretrain`.")
    return SHIPPED_BASE


def trained_base_dir(settings: Settings, lineage: Mapping[str, Any], what: str, registry: Any | None = None) -> Path:
    """The exact base a version was trained on, by the ``base_sha256`` in its lineage: never another base.

    Candidates in order: the registered ``base_model`` (voice-base) version named by ``base_version``
    (downloaded once into the cache: versions are immutable), ``serving.base_dir``, the shipped base. The
    first whose weights hash matches wins; without a ``base_sha256`` (versions older than the tag) the first
    that exists. ``what`` names the version in the error ("voice-x version 3").
    """
    from voice_lib.infer.backends import base_weights_file
    from voice_lib.release.registry import Registry, RegistryError

    sha = str(lineage.get("base_sha256") or "")
    base_version = str(lineage.get("base_version") or "")
    backend = str(lineage.get("backend") or END_TO_END)
    if backend == "two_stage":  # the converter is configured or shipped, not (yet) a registered model
        return _matching_base([settings.model.converter_dir, SHIPPED_CONVERTER], CONVERTER_WEIGHTS, sha, what,
                              "neither VOICEOPS_MODEL__CONVERTER_DIR nor the shipped converter")
    candidates: list[Path] = []
    if base_version.isdigit():
        base_model = str(lineage.get("base_model") or "voice-base")
        # Beside, not inside, base_model_dir's voice-base folder: a download replaces its destination.
        dest = settings.cache_dir / "models" / f"{base_model}-v{base_version}"
        try:
            if not (dest / "model.safetensors").exists():
                (registry or Registry(settings)).download(base_model, base_version, dest)
            candidates.append(dest)
        except RegistryError as exc:  # the configured or shipped base may still be the right one
            log.info("%s: registered base version %s unavailable (%s)", what, base_version, exc)
    return _matching_base([*candidates, settings.serving.base_dir, SHIPPED_BASE], base_weights_file(backend), sha, what,
                          f"neither voice-base version {base_version or '?'}, serving.base_dir nor the shipped base")


def _matching_base(candidates: list[Path | None], weights_file: str, sha: str, what: str, tried: str) -> Path:
    """The first candidate folder whose weights hash is ``sha`` (any that exists when ``sha`` is empty)."""
    from voice_lib.core.hashing import sha256_file

    for folder in candidates:
        weights = None if folder is None else folder / weights_file
        if weights is not None and weights.exists() and (not sha or sha256_file(weights) == sha):
            return folder
    raise FileNotFoundError(
        f"{what} was trained on base sha256 {sha[:12] or '?'}…, which is {tried}; register or configure that base "
        "(voiceops pretrain; VOICEOPS_SERVING__BASE_DIR or VOICEOPS_MODEL__CONVERTER_DIR), or re-onboard the voice.")


def load_registered_voice(settings, voice_id: str, alias_or_version: str = "production") -> tuple[Synthesizer, dict]:
    """A Synthesizer for ``voice-<voice_id>@alias`` (or a version number) from the MLflow registry, on the
    base its lineage names (``trained_base_dir``) and with the backend it names (lineage tag ``backend``)."""
    from voice_lib.release.registry import Registry

    registry = Registry(settings)
    name = f"voice-{voice_id}"
    voice_dir = registry.download(name, alias_or_version, settings.cache_dir / "models" / name / str(alias_or_version))
    meta = json.loads((voice_dir / "voice.json").read_text()) if (voice_dir / "voice.json").exists() else {}
    base_dir = trained_base_dir(settings, meta, f"{name}@{alias_or_version}", registry)
    speaker = np.load(voice_dir / "speaker_embedding.npy")
    backend = meta.get("backend") or END_TO_END
    synthesizer = Synthesizer.load(base_dir, speaker, adapter_dir=voice_dir, backend=backend)
    return synthesizer, {**meta, "resolved_base_dir": str(base_dir), "voice_dir": str(voice_dir), "backend": backend}
