"""One thin inference class shared by the CLI, evaluation and the server.

A ``Synthesizer`` is a base model, optionally a LoRA adapter, and the voice's GE2E embedding.
Text → phonemes → model → WORLD features → waveform.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voice_lib.features import FeatureConfig, world_synthesis
from voice_lib.model import VoiceModel
from voice_lib.train import load_base, split_features


@dataclass
class Synthesis:
    audio: np.ndarray
    sample_rate: int
    seconds_compute: float

    @property
    def rtf(self) -> float:
        return self.seconds_compute / max(1e-6, len(self.audio) / self.sample_rate)


class Synthesizer:
    def __init__(self, model: torch.nn.Module, base: VoiceModel, speaker: np.ndarray, feature_config: FeatureConfig | None = None):
        self.model = model.eval()
        self.base = base
        self.speaker = torch.from_numpy(np.asarray(speaker, dtype=np.float32))[None]
        self.feature_config = feature_config or FeatureConfig()
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once

    @classmethod
    def load(cls, base_dir: Path, speaker: np.ndarray, adapter_dir: Path | None = None) -> "Synthesizer":
        base = load_base(base_dir)
        model: torch.nn.Module = base
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(adapter_dir))
        config = json.loads((base_dir / "config.json").read_text()).get("feature_config")
        return cls(model, base, speaker, FeatureConfig(**config) if config else None)

    @property
    def sample_rate(self) -> int:
        return self.feature_config.sample_rate

    def _net(self) -> VoiceModel:
        # Under a PeftModel the LoRA layers live inside the base model's modules; call its methods directly.
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def vocode(self, normalized: torch.Tensor) -> np.ndarray:
        matrix = self.base.denormalize(normalized[0]).numpy()
        lf0, vuv, env, bap = split_features(matrix)
        return world_synthesis(lf0, vuv, env, bap, self.feature_config)

    def synthesize(self, text: str, language: str = "en", speed: float = 1.0) -> Synthesis:
        from voice_lib.text import phonemes_to_ids, phonemize

        started = time.perf_counter()
        ids = torch.tensor([phonemes_to_ids(phonemize(text, language))], dtype=torch.long)
        with self._lock, torch.inference_mode():
            pred = self._net().infer(ids, self.speaker, speed=speed)
        audio = self.vocode(pred)
        return Synthesis(audio, self.sample_rate, time.perf_counter() - started)

    def reconstruct(self, phoneme_ids: np.ndarray, features: np.ndarray) -> Synthesis:
        """Synthesis with the reference recording's timing (durations aligned to its features)."""
        started = time.perf_counter()
        net = self._net()
        r = net.cfg.reduction
        frames = len(features) // r * r
        ids = torch.from_numpy(phoneme_ids.astype(np.int64))[None]
        with self._lock, torch.inference_mode():
            target = net.normalize(torch.from_numpy(features[:frames]))[None]
            phone_mask = torch.zeros_like(ids, dtype=torch.bool)
            _, mean, _ = net.encode(ids, phone_mask, self.speaker)
            durations = net.align(mean, net.reduce(target), torch.tensor([ids.shape[1]]), torch.tensor([frames // r]))
            pred = net.infer(ids, self.speaker, durations=durations)
        return Synthesis(self.vocode(pred), self.sample_rate, time.perf_counter() - started)


def load_registered_voice(settings, voice_id: str, alias_or_version: str = "production") -> tuple[Synthesizer, dict]:
    """A Synthesizer for ``voice-<voice_id>@alias`` (or a version number) from the MLflow registry.

    The base it was trained on is resolved from the version's lineage: the registered voice-base
    version whose weights hash matches, else the shipped base if its hash matches; never another base.
    """
    from voice_lib.registry import Registry, RegistryError
    from voice_lib.training_pipeline import SHIPPED_BASE, sha256_file

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
