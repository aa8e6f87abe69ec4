"""The end-to-end acoustic backend: phonemes + speaker embedding → WORLD features in one network.

``EndToEndBackend`` is a resident base model (voice_lib.model.network.VoiceModel) whose LoRA target layers
are wrapped for multi-adapter inference (voice_lib/infer/multilora.py): the server keeps one per base
checkpoint for every voice on it, the Synthesizer one per utterance stream. Either way rows are padded into
one batch; the model zeroes padded positions, so a row's output is the same alone or in any batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from voice_lib.data.features import FeatureConfig
from voice_lib.infer.core import END_TO_END, AcousticRow, SynthesisError, guarded_durations, vocode
from voice_lib.infer.multilora import LoraBank, activate, install
from voice_lib.model.checkpoints import load_base
from voice_lib.model.network import VoiceModel


def phoneme_inputs(text: str, language: str) -> list[int]:
    """The end-to-end text frontend: phonemise (espeak-ng) and map to symbol ids."""
    from voice_lib.data.text import phonemes_to_ids, phonemize

    return phonemes_to_ids(phonemize(text, language))  # type: ignore[arg-type]


def _padded(rows: Sequence[AcousticRow]) -> tuple[torch.Tensor, ...]:
    """A batch's phoneme ids padded to the longest row, with lengths, speakers, speeds and the padding mask."""
    lengths = torch.tensor([len(r.inputs) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.inputs)] = torch.as_tensor(list(row.inputs), dtype=torch.long)
    speaker = torch.stack([r.speaker for r in rows])
    speed = torch.tensor([[r.speed] for r in rows], dtype=torch.float32)
    phone_mask = torch.arange(ids.shape[1])[None] >= lengths[:, None]
    return ids, lengths, speaker, speed, phone_mask


@dataclass(frozen=True, eq=False)
class EndToEndBackend:
    """A resident base model with its LoRA target layers wrapped for multi-adapter inference."""

    name: ClassVar[str] = END_TO_END
    sha256: str
    model: VoiceModel
    shapes: dict[str, tuple[int, int]]
    feature_config: FeatureConfig
    source: str  # the folder it was loaded from (shown in /v1/admin/status)

    def model_inputs(self, text: str, language: str, frontend: Mapping[str, Any] | None = None) -> list[int]:
        return phoneme_inputs(text, language)

    def predict(self, rows: Sequence[AcousticRow], bank: LoraBank) -> list[np.ndarray | SynthesisError]:
        net = self.model
        ids, lengths, speaker, speed, phone_mask = _padded(rows)
        with torch.inference_mode(), activate(bank, [r.slot for r in rows]):
            h, mean, log_dur = net.encode(ids, phone_mask, speaker)
            durations, broken = guarded_durations(log_dur, phone_mask, speed, net.cfg.max_positions)
            pred, _ = net.decode(h, mean, durations, speaker)
            steps = (durations.sum(1) * net.cfg.reduction).tolist()
            return [SynthesisError("the model produced non-finite durations") if broken[i]
                    else net.denormalize(pred[i, : steps[i]]).numpy() for i in range(len(rows))]

    @property
    def seconds_per_step(self) -> float:
        """How long one decoder step (``reduction`` WORLD frames) sounds."""
        return self.model.cfg.reduction * self.feature_config.frame_period_ms / 1000

    def predict_durations(self, rows: Sequence[AcousticRow], bank: LoraBank) -> list[np.ndarray]:
        """Decoder steps per phone of each row, exactly as ``predict`` lays them out (the same encoder pass and
        guards): what word timestamps are measured in (voice_lib.data.text.timing)."""
        net = self.model
        ids, lengths, speaker, speed, phone_mask = _padded(rows)
        with torch.inference_mode(), activate(bank, [r.slot for r in rows]):
            _, _, log_dur = net.encode(ids, phone_mask, speaker)
            durations, _ = guarded_durations(log_dur, phone_mask, speed, net.cfg.max_positions)
        return [durations[i, : int(lengths[i])].numpy() for i in range(len(rows))]

    def render(self, row: AcousticRow, features: np.ndarray) -> np.ndarray:
        return vocode(features, self.feature_config)

    def predict_with_timing(self, row: AcousticRow, bank: LoraBank, reference: np.ndarray) -> np.ndarray:
        net = self.model
        r = net.cfg.reduction
        frames = len(reference) // r * r
        ids = torch.as_tensor(np.asarray(row.inputs, dtype=np.int64))[None]
        speaker = row.speaker[None]
        with torch.inference_mode(), activate(bank, [row.slot]):
            target = net.normalize(torch.from_numpy(reference[:frames]))[None]
            phone_mask = torch.zeros_like(ids, dtype=torch.bool)
            _, mean, _ = net.encode(ids, phone_mask, speaker)
            durations = net.align(mean, net.reduce(target), torch.tensor([ids.shape[1]]), torch.tensor([frames // r]))
            pred = net.infer(ids, speaker, durations=durations)
            return net.denormalize(pred[0]).numpy()


def load_end_to_end(folder: Path, sha256: str | None = None) -> EndToEndBackend:
    """The base checkpoint in ``folder`` (voice_lib.model.checkpoints.save_base layout), ready for adapters."""
    from voice_lib.core.hashing import sha256_file

    model = load_base(folder)
    shapes = install(model)
    model.eval()
    config = json.loads((folder / "config.json").read_text()).get("feature_config")
    return EndToEndBackend(sha256 or sha256_file(folder / "model.safetensors"), model, shapes,
                           FeatureConfig(**config) if config else FeatureConfig(), str(folder))
