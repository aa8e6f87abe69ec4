"""Batched synthesis on the shared bases: one model pass per (base, adapter bank) group, then the vocoder.

``run_batch`` is what the micro-batcher (serving/batcher.py) calls. The prediction, its guards and the
vocoder are voice_lib/infer/core.py's, the same the single-utterance Synthesizer (evaluation, the CLI)
runs; this module only groups the jobs of a batch and adds the server's cheap bad-audio check. Rows of a
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
from voice_lib.infer.core import AcousticBackend, AcousticRow, RowAudio, SynthesisError, synthesize_rows
from voice_lib.infer.multilora import LoraBank

__all__ = ["SynthesisError", "SynthesisJob", "SynthesisOutput", "bad_audio_kind", "run_batch"]
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


def run_batch(jobs: Sequence[SynthesisJob], silence_dbfs: float = -50.0, clipping_fraction: float = 0.001,
              vocoder: Executor | None = None) -> Iterator[tuple[int, SynthesisOutput | Exception]]:
    """Synthesise ``jobs``: one model pass per (base, bank) group, then vocode and yield each item as it is done.

    Items are yielded as ``(index in jobs, output or exception)``, in the order they finish; one bad item
    never fails the others. With ``vocoder`` (a thread pool) the rows of a group are vocoded concurrently.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.base), id(job.bank)), []).append(i)
    for indices in groups.values():
        group = [jobs[i] for i in indices]
        backend = group[0].base
        rows = [AcousticRow(j.phoneme_ids, j.speaker, j.slot, j.speed) for j in group]
        for row, out in synthesize_rows(backend, group[0].bank, rows, vocoder):
            if not isinstance(out, RowAudio):
                if not isinstance(out, SynthesisError):
                    log.warning("batch row of %d failed: %s", len(group), out)
                yield indices[row], out
                continue
            yield indices[row], SynthesisOutput(out.audio, backend.feature_config.sample_rate, out.compute_seconds,
                                                bad_audio_kind(out.audio, silence_dbfs, clipping_fraction), len(jobs))
