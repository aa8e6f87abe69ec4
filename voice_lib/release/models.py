"""Registered models as the serving and evaluation sides load them: the base to tune on, a voice version."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.infer.synthesizer import Synthesizer
from voice_lib.model.checkpoints import SHIPPED_BASE

log = logging.getLogger(__name__)


def base_model_dir(settings: Settings) -> Path:
    """The base the voices are fine-tuned on: the registry's voice-base@production, else the shipped one."""
    from voice_lib.release.registry import Registry, RegistryError

    try:
        registry = Registry(settings)
        if registry.version_by_alias("voice-base", "production") is not None:
            return registry.download("voice-base", "production", settings.cache_dir / "models" / "voice-base")
    except RegistryError as exc:
        log.info("no registered base model (%s); using the shipped one", exc)
    if not (SHIPPED_BASE / "model.safetensors").exists():
        raise FileNotFoundError(f"no base model: neither voice-base@production in MLflow nor {SHIPPED_BASE}; run `voiceops pretrain`.")
    return SHIPPED_BASE


def load_registered_voice(settings, voice_id: str, alias_or_version: str = "production") -> tuple[Synthesizer, dict]:
    """A Synthesizer for ``voice-<voice_id>@alias`` (or a version number) from the MLflow registry.

    The base it was trained on is resolved from the version's lineage: the registered voice-base
    version whose weights hash matches, else the shipped base if its hash matches; never another base.
    """
    from voice_lib.core.hashing import sha256_file
    from voice_lib.model.checkpoints import SHIPPED_BASE
    from voice_lib.release.registry import Registry, RegistryError

    registry = Registry(settings)
    name = f"voice-{voice_id}"
    voice_dir = registry.download(name, alias_or_version, settings.cache_dir / "models" / name / str(alias_or_version))
    meta = json.loads((voice_dir / "voice.json").read_text()) if (voice_dir / "voice.json").exists() else {}
    base_sha = meta.get("base_sha256")
    candidates = []
    if meta.get("base_version") not in (None, "", "shipped"):
        try:
            candidates.append(registry.download("voice-base", meta["base_version"], settings.cache_dir / "models" / "voice-base" / meta["base_version"]))
        except RegistryError:
            pass
    candidates.append(SHIPPED_BASE)
    for base_dir in candidates:
        if (base_dir / "model.safetensors").exists() and (base_sha is None or sha256_file(base_dir / "model.safetensors") == base_sha):
            speaker = np.load(voice_dir / "speaker_embedding.npy")
            return Synthesizer.load(base_dir, speaker, adapter_dir=voice_dir), {**meta, "resolved_base_dir": str(base_dir)}
    raise FileNotFoundError(
        f"{name}@{alias_or_version} was trained on base sha256 {base_sha}, which is neither registered nor shipped; "
        "register that base (voiceops pretrain) or re-onboard the voice."
    )
