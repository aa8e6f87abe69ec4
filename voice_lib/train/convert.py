"""Training the two-stage backend's converter: many-to-many pretraining and few-shot LoRA adaptation.

Pairs are free on a parallel corpus: every pretraining voice reads the same sentences, so each
(source voice, target voice, sentence) gives the source's frames and the target's frames warped onto
the source's timeline (``voice_lib.data.alignment``). Half-way through pretraining every pair is
re-aligned with the converter's own conversion of the source (iterative DTW: the distance then compares
like with like), and training goes on. Adaptation pairs the user's clips with the reference voice's
renderings of their transcripts, aligned through the pretrained converter, and trains a peft LoRA on
``qkv``/``proj``/``fc1``/``fc2`` with the loop every model uses (``voice_lib.train.loop.fit_task``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voice_lib.data.alignment import align_to_source
from voice_lib.model.converter import Converter, conversion_loss, convert_frames
from voice_lib.train.loop import FitResult, MetricsCallback, TrainConfig, fit_task

log = logging.getLogger(__name__)


@dataclass
class ConversionPair:
    source: np.ndarray  # (t, 63) the reference voice's frames
    aligned: np.ndarray  # (t, 63) the target's frames on the source's timeline
    weight: np.ndarray  # (t,) per-frame confidence of the alignment
    speaker: np.ndarray  # (256,) the target's GE2E embedding
    target: np.ndarray  # (t', 63) the target's own frames, kept for re-alignment


def make_pair(source: np.ndarray, target: np.ndarray, speaker: np.ndarray) -> ConversionPair:
    aligned, weight = align_to_source(source, target)
    return ConversionPair(source, aligned, weight, np.asarray(speaker, np.float32), target)


def realign(model: torch.nn.Module, pairs: list[ConversionPair]) -> None:
    """Iterative DTW: each target aligned to the source as the current model converts it."""
    was_training = model.training
    model.eval()
    for p in pairs:
        converted = convert_frames(model, p.source, p.speaker)
        p.aligned, p.weight = align_to_source(p.source, p.target, source_for_distance=converted)
    model.train(was_training)


@dataclass
class ConverterTask:
    """Random crops of conversion pairs, zero-weight padded; the validation loss on whole pairs."""

    train: list[ConversionPair]
    val: list[ConversionPair]
    batch_size: int = 12
    crop_frames: int = 200  # 2 s at 10 ms

    def _tensors(self, rows: list[tuple[ConversionPair, int, int]]) -> tuple[torch.Tensor, ...]:
        n, t = len(rows), max(stop - start for _, start, stop in rows)
        src, tgt = np.zeros((n, t, 63), np.float32), np.zeros((n, t, 63), np.float32)
        weight, speaker = np.zeros((n, t), np.float32), np.zeros((n, 256), np.float32)
        lengths = np.zeros(n, np.int64)
        for k, (p, start, stop) in enumerate(rows):
            length = stop - start
            src[k, :length], tgt[k, :length] = p.source[start:stop], p.aligned[start:stop]
            weight[k, :length], speaker[k], lengths[k] = p.weight[start:stop], p.speaker, length
        return tuple(torch.from_numpy(a) for a in (src, tgt, weight, speaker, lengths))

    def _losses(self, model: torch.nn.Module, rows: list[tuple[ConversionPair, int, int]]) -> dict[str, torch.Tensor]:
        net = model.get_base_model() if hasattr(model, "get_base_model") else model
        src, tgt, weight, speaker, lengths = self._tensors(rows)
        return {"loss": conversion_loss(model(src, speaker, lengths), net.targets(tgt), weight)}

    def batch_losses(self, model: torch.nn.Module, rng: random.Random) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            p = self.train[rng.randrange(len(self.train))]
            start = rng.randrange(max(1, len(p.source) - self.crop_frames + 1))
            rows.append((p, start, min(len(p.source), start + self.crop_frames)))
        return self._losses(model, rows)

    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module) -> float | None:
        if not self.val:
            return None
        was_training = model.training
        model.eval()
        losses = [float(self._losses(model, [(p, 0, len(p.source))])["loss"]) for p in self.val]
        model.train(was_training)
        return float(np.mean(losses))


def fit_converter(model: torch.nn.Module, task: ConverterTask, cfg: TrainConfig, checkpoint: Path, refine_at: int = 0,
                  on_metrics: MetricsCallback | None = None,
                  on_checkpoint: Callable[[Path, int], None] | None = None) -> FitResult:
    """``fit_task`` with one re-alignment of every pair at step ``refine_at`` (0: never). A retry that resumes
    past ``refine_at`` re-aligns with the checkpoint's model before it continues."""
    from dataclasses import replace

    if 0 < refine_at < cfg.steps:
        first = fit_task(model, task, replace(cfg, steps=refine_at, patience=10**6), checkpoint, on_metrics, on_checkpoint)
        log.info("re-aligning %d pairs with the converter at step %d", len(task.train) + len(task.val), first.step)
        realign(model, task.train + task.val)
        model.train()
    return fit_task(model, task, cfg, checkpoint, on_metrics, on_checkpoint)


def new_converter(pairs: list[ConversionPair], cfg=None) -> Converter:
    """A converter whose normalisation statistics come from the pairs' source and target frames."""
    from voice_lib.model.converter import ConverterConfig

    model = Converter(cfg or ConverterConfig())
    model.set_statistics(np.concatenate([p.source for p in pairs] + [p.target for p in pairs]))
    return model
