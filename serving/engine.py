"""Batched synthesis on the shared base: one model pass for every voice in a batch, then the vocoder.

``run_batch`` is what the micro-batcher (serving/batcher.py) calls. The vocoder (WORLD) takes most of the
time (about 80 ms of a 20-word sentence's 95 ms here) and pyworld releases the GIL, so the rows of a batch
are vocoded in parallel on a thread pool when one is given (measured: 8 vocodes 636 ms in one thread,
415 ms in two, on 2 cores). Rows of a batch may use different LoRA adapters (serving/multilora.py) and have
different lengths; the padding guard makes each row's output the same as if it ran alone. A row whose
model output is unusable (non-finite) fails alone, as a ``SynthesisError``; the other rows are unaffected.
Durations are capped so that a diverged duration predictor cannot allocate gigabytes, and F0 is kept inside
WORLD's range before vocoding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass

import numpy as np
import torch

from serving.multilora import LoraBank, activate
from voice_lib.data.audio import CLIP_LEVEL
from voice_lib.data.datasets import split_features
from voice_lib.data.features import FeatureConfig, world_synthesis
from voice_lib.model.network import VoiceModel

log = logging.getLogger(__name__)
MAX_STEPS_PER_PHONE = 50  # 1 s at 20 ms steps: a duration predictor gone wild must not allocate gigabytes


class SynthesisError(RuntimeError):
    """The model produced unusable output (non-finite features) for one item of a batch."""


@dataclass(frozen=True, eq=False)
class BaseBundle:
    """A resident base model with its LoRA target layers wrapped for multi-adapter inference."""

    sha256: str
    model: VoiceModel
    shapes: dict[str, tuple[int, int]]
    feature_config: FeatureConfig
    source: str


@dataclass(eq=False)
class SynthesisJob:
    """One sentence for the batcher: phoneme ids plus the adapter slot and bank of the request's snapshot."""

    phoneme_ids: Sequence[int]
    speed: float
    base: BaseBundle
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
    """Cheap per-request check (no VAD): RMS below ``silence_dbfs`` or too many full-scale samples."""
    if len(audio) == 0:
        return "silent"
    rms_db = 20 * math.log10(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) + 1e-12)
    if rms_db < silence_dbfs:
        return "silent"
    return "clipped" if float(np.mean(np.abs(audio) >= CLIP_LEVEL)) > clipping_fraction else None


def _vocode(base: BaseBundle, normalized: torch.Tensor) -> np.ndarray:
    features = base.model.denormalize(normalized).numpy()
    if not np.isfinite(features).all():
        raise SynthesisError("the model produced non-finite acoustic features")
    lf0, vuv, env, bap = split_features(features)
    fc = base.feature_config
    # WORLD is only defined for F0 inside its analysis range; keep a wild prediction from reaching it.
    lf0 = np.clip(lf0, math.log(fc.f0_floor), math.log(fc.f0_ceil))
    return world_synthesis(lf0, vuv, env, bap, fc)


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
        base, net = group[0].base, group[0].base.model
        started = time.perf_counter()
        try:
            pred, steps, broken = _infer(net, group)
        except Exception as exc:
            log.exception("batch of %d failed", len(group))
            for i in indices:
                yield i, exc
            continue
        shared = (time.perf_counter() - started) / len(group)

        def finish(row: int) -> SynthesisOutput:
            t0 = time.perf_counter()
            audio = _vocode(base, pred[row, : steps[row]])
            return SynthesisOutput(audio, base.feature_config.sample_rate, shared + time.perf_counter() - t0,
                                   bad_audio_kind(audio, silence_dbfs, clipping_fraction), len(jobs))

        rows = [row for row in range(len(indices)) if not broken[row]]
        for row in range(len(indices)):
            if broken[row]:
                yield indices[row], SynthesisError("the model produced non-finite durations")
        if vocoder is None or len(rows) < 2:
            for row in rows:
                try:
                    yield indices[row], finish(row)
                except Exception as exc:  # noqa: BLE001 - this row's failure is its own
                    yield indices[row], exc
            continue
        pending = {vocoder.submit(finish, row): row for row in rows}
        for future in as_completed(pending):
            exc = future.exception()
            yield indices[pending[future]], exc if exc is not None else future.result()


def _infer(net: VoiceModel, group: Sequence[SynthesisJob]) -> tuple[torch.Tensor, list[int], list[bool]]:
    """VoiceModel.infer for a padded batch, with a speed per row and guarded durations."""
    lengths = torch.tensor([len(j.phoneme_ids) for j in group])
    ids = torch.zeros(len(group), int(lengths.max()), dtype=torch.long)
    for row, job in enumerate(group):
        ids[row, : len(job.phoneme_ids)] = torch.as_tensor(list(job.phoneme_ids), dtype=torch.long)
    speaker = torch.stack([j.speaker for j in group])
    speed = torch.tensor([[j.speed] for j in group], dtype=torch.float32)
    phone_mask = torch.arange(ids.shape[1])[None] >= lengths[:, None]
    with torch.inference_mode(), activate(group[0].bank, [j.slot for j in group]):
        h, mean, log_dur = net.encode(ids, phone_mask, speaker)
        broken = (~torch.isfinite(log_dur).masked_fill(phone_mask, True).all(1)).tolist()
        raw = torch.nan_to_num(torch.expm1(log_dur) / speed, nan=1.0, posinf=MAX_STEPS_PER_PHONE)
        durations = torch.clamp(torch.round(raw), 1, MAX_STEPS_PER_PHONE).long().masked_fill(phone_mask, 0)
        limit = net.cfg.max_positions  # the decoder's position table is this long
        totals = durations.sum(1)
        if bool((totals > limit).any()):
            durations = torch.where((totals > limit)[:, None], (durations * limit // totals[:, None]).clamp(min=1),
                                    durations).masked_fill(phone_mask, 0)
        pred, _ = net.decode(h, mean, durations, speaker)
    steps = (durations.sum(1) * net.cfg.reduction).tolist()
    return pred, steps, broken
