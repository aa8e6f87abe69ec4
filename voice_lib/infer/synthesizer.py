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

from voice_lib.data.datasets import split_features
from voice_lib.data.features import FeatureConfig, world_synthesis
from voice_lib.model.checkpoints import load_base
from voice_lib.model.network import VoiceModel


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
        from voice_lib.data.text import phonemes_to_ids, phonemize

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
