"""One thin single-utterance class over the inference core, for the CLI and evaluation.

A ``Synthesizer`` is an acoustic backend (a base model), optionally one LoRA adapter, and the voice's GE2E
embedding. It calls the same ``voice_lib.infer.core.synthesize_rows`` the server's batches call, on the
same multi-LoRA layers (a bank of one adapter), so evaluation hears what production serves
(tests/test_serving.py checks the two are bit-identical).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voice_lib.data.features import FeatureConfig
from voice_lib.infer.core import (
    END_TO_END,
    AcousticBackend,
    AcousticRow,
    RowAudio,
    read_frontend,
    synthesize_rows,
    vocode,
)
from voice_lib.infer.backends import load_backend
from voice_lib.infer.multilora import AdapterWeights, LoraBank

ADAPTER = "adapter"  # the key of the one adapter in a Synthesizer's bank


@dataclass
class Synthesis:
    audio: np.ndarray
    sample_rate: int
    seconds_compute: float

    @property
    def rtf(self) -> float:
        return self.seconds_compute / max(1e-6, len(self.audio) / self.sample_rate)


class Synthesizer:
    def __init__(self, backend: AcousticBackend, bank: LoraBank, slot: int, speaker: np.ndarray,
                 frontend: dict | None = None):
        self.backend, self.bank, self.slot, self.frontend = backend, bank, slot, frontend or {}
        self.speaker = torch.from_numpy(np.asarray(speaker, dtype=np.float32).reshape(-1))[None]
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once

    @classmethod
    def load(cls, base_dir: Path, speaker: np.ndarray, adapter_dir: Path | None = None,
             backend: str = END_TO_END, voice_dir: Path | None = None) -> "Synthesizer":
        """The base in ``base_dir`` with the peft adapter folder ``adapter_dir`` (None: the plain base). The
        voice's frontend settings come from ``voice_dir`` (default ``adapter_dir``): a two-stage voice's
        unadapted base still speaks through the voice's reference voice and pitch."""
        model = load_backend(backend, base_dir)
        adapters = [(ADAPTER, AdapterWeights.load(adapter_dir))] if adapter_dir is not None else []
        bank = LoraBank(adapters, model.shapes)
        return cls(model, bank, bank.slot(ADAPTER) if adapters else 0, speaker, read_frontend(voice_dir or adapter_dir))

    @property
    def feature_config(self) -> FeatureConfig:
        return self.backend.feature_config

    @property
    def sample_rate(self) -> int:
        return self.feature_config.sample_rate

    def synthesize(self, text: str, language: str = "en", speed: float = 1.0) -> Synthesis:
        """Raises ``SynthesisError`` when the model's output is unusable (the server answers 500 then)."""
        started = time.perf_counter()
        row = AcousticRow(self.backend.model_inputs(text, language, self.frontend), self.speaker[0], self.slot, speed)
        with self._lock:
            (_, out), = synthesize_rows(self.backend, self.bank, [row])
        if not isinstance(out, RowAudio):
            raise out
        return Synthesis(out.audio, self.sample_rate, time.perf_counter() - started)

    def reconstruct(self, phoneme_ids: np.ndarray, features: np.ndarray, text: str | None = None,
                    language: str = "en") -> Synthesis:
        """Synthesis with the reference recording's timing: durations aligned to its features (end-to-end),
        or the reference rendering of ``text`` warped onto them by DTW (two-stage)."""
        started = time.perf_counter()
        if self.backend.name == END_TO_END:
            inputs = phoneme_ids.astype(np.int64).tolist()
        elif text is None:
            raise ValueError(f"reconstruction with the {self.backend.name} backend needs the recording's text")
        else:
            inputs = self.backend.model_inputs(text, language, self.frontend)
        row = AcousticRow(inputs, self.speaker[0], self.slot)
        with self._lock:
            predicted = self.backend.predict_with_timing(row, self.bank, features)
        return Synthesis(vocode(predicted, self.feature_config), self.sample_rate, time.perf_counter() - started)
