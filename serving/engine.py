"""Batched synthesis on the shared bases: one model pass per (base, adapter bank) group, then the vocoder.

A batch runs in two stages: ``predict_batch`` (the model pass, under the pool's infer lock) gives each job a
``PendingOutput``, and calling that renders the row (the vocoder step, on the vocoder threads). The
micro-batcher (serving/batcher.py) hands the renderings to the vocoder pool and goes on to the next batch's
model pass; ``run_batch`` does both stages in one call (warm-up, tests, benchmarks). The prediction, its
guards and the vocoder are voice_lib/infer/core.py's, the same the single-utterance Synthesizer (evaluation,
the CLI) runs; this module only groups the jobs of a batch and adds the server's cheap bad-audio check. Rows of a
batch may use different LoRA adapters (voice_lib/infer/multilora.py) and have different lengths; a row
whose model output is unusable fails alone, as a ``SynthesisError``; the other rows are unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from voice_lib.data.audio import audio_defects
from voice_lib.infer.core import AcousticBackend, AcousticRow, RowRender, SynthesisError, predict_rows, render_rows
from voice_lib.infer.multilora import LoraBank

__all__ = ["PendingOutput", "SynthesisError", "SynthesisJob", "SynthesisOutput", "bad_audio_kind", "predict_batch",
           "run_batch"]
log = logging.getLogger(__name__)


@dataclass(eq=False)
class SynthesisJob:
    """One sentence for the batcher: its model inputs plus the adapter slot and bank of the request's snapshot."""

    phoneme_ids: Any  # the backend's model inputs: phoneme ids (end-to-end) or source frames (two-stage)
    speed: float
    base: AcousticBackend
    bank: LoraBank
    slot: int
    speaker: torch.Tensor


@dataclass
class SynthesisOutput:
    audio: np.ndarray
    sample_rate: int
    compute_seconds: float
    bad: str | None  # "silent" | "clipped" | None
    batch_size: int


def bad_audio_kind(audio: np.ndarray, silence_dbfs: float, clipping_fraction: float) -> str | None:
    """The request path's bad-audio check (no VAD, no reference): "silent", "clipped" or None."""
    return next(iter(audio_defects(audio, silence_dbfs, clipping_fraction)), None)


@dataclass(frozen=True, eq=False)
class PendingOutput:
    """A job whose model pass is done: calling it renders the row into its ``SynthesisOutput`` (vocoder threads)."""

    render: RowRender
    sample_rate: int
    silence_dbfs: float
    clipping_fraction: float
    batch_size: int

    def __call__(self) -> SynthesisOutput:
        out = self.render()
        return SynthesisOutput(out.audio, self.sample_rate, out.compute_seconds,
                               bad_audio_kind(out.audio, self.silence_dbfs, self.clipping_fraction), self.batch_size)


def predict_batch(jobs: Sequence[SynthesisJob], silence_dbfs: float = -50.0,
                  clipping_fraction: float = 0.001) -> list[PendingOutput | Exception]:
    """The model stage of a batch: one pass per (base, bank) group; per job its pending rendering or its error.

    What the micro-batcher runs under the pool's infer lock; the renderings run afterwards, outside it.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.base), id(job.bank)), []).append(i)
    pending: list[PendingOutput | Exception] = [RuntimeError("not predicted")] * len(jobs)
    for indices in groups.values():
        group = [jobs[i] for i in indices]
        backend = group[0].base
        rows = [AcousticRow(j.phoneme_ids, j.speaker, j.slot, j.speed) for j in group]
        for i, found in zip(indices, predict_rows(backend, group[0].bank, rows)):
            if isinstance(found, Exception):
                if not isinstance(found, SynthesisError):
                    log.warning("batch row of %d failed: %s", len(group), found)
                pending[i] = found
            else:
                pending[i] = PendingOutput(found, backend.feature_config.sample_rate, silence_dbfs,
                                           clipping_fraction, len(jobs))
    return pending


def run_batch(jobs: Sequence[SynthesisJob], silence_dbfs: float = -50.0, clipping_fraction: float = 0.001,
              vocoder: Executor | None = None) -> Iterator[tuple[int, SynthesisOutput | Exception]]:
    """Synthesise ``jobs``: ``predict_batch``, then render and yield each item as it is done.

    Items are yielded as ``(index in jobs, output or exception)``, in the order they finish; one bad item
    never fails the others. With ``vocoder`` (a thread pool) the rows are rendered concurrently.
    """
    yield from render_rows(predict_batch(jobs, silence_dbfs, clipping_fraction), vocoder)
