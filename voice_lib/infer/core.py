"""The one inference core: model inputs → WORLD feature matrices → guarded vocoding.

Evaluation (``Synthesizer``, one utterance) and the server (``serving/engine.py``, micro-batches of mixed
voices) both call ``synthesize_rows``, so a version sounds in production as it sounded at its gates. The
guards live here and nowhere else:

- durations are predicted with a cap per phone and per utterance (``AcousticBackend.predict``), so a
  diverged duration predictor cannot allocate gigabytes;
- a row whose features are not finite fails alone, as a ``SynthesisError``;
- F0 is kept inside WORLD's analysis range before vocoding.

An acoustic backend turns text into model inputs and predicts, per batch row and per row's adapter, a
WORLD feature matrix (frames × [lf0, vuv, envelope, aperiodicity], denormalised); the vocoder is shared.
Two implementations: the end-to-end network (voice_lib/infer/end_to_end.py) and the two-stage backend (a
reference synthesiser's WORLD analysis mapped to the voice by a LoRA-adapted converter,
voice_lib/infer/two_stage.py); ``voice_lib/infer/backends.py`` loads either by name. Each registered
version names its backend in the lineage tag ``backend`` (``end_to_end`` when absent).

The WORLD vocoder takes most of the time (about 80 ms of a 20-word sentence's 95 ms) and pyworld releases
the GIL, so the rows of a batch are vocoded in parallel on a thread pool when one is given (measured: 8
vocodes 636 ms in one thread, 415 ms in two, on 2 cores). ``synthesize_rows`` is the two stages in one call:
``predict_rows`` (the model pass, which gives each row a ``RowRender``) and ``render_rows``; the server runs
them apart, so its next batch's model pass overlaps this batch's rendering (serving/batcher.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from voice_lib.data.datasets import split_features
from voice_lib.data.features import FeatureConfig, world_synthesis
from voice_lib.infer.multilora import LoraBank

END_TO_END = "end_to_end"  # the registry lineage tag ``backend`` of versions that predate the tag
T = TypeVar("T")
MAX_STEPS_PER_PHONE = 50  # 1 s at 20 ms steps: a duration predictor gone wild must not allocate gigabytes


class SynthesisError(RuntimeError):
    """The model produced unusable output (non-finite durations or features) for one row of a batch."""


@dataclass(frozen=True, eq=False)
class AcousticRow:
    """One utterance of a batch: model inputs, the voice's speaker embedding and its adapter slot."""

    inputs: Any  # what the backend's text frontend made: phoneme ids (end-to-end), source frames (two-stage)
    speaker: torch.Tensor  # (speaker_dim,) GE2E embedding of the voice
    slot: int  # the row's adapter in the bank (0: none, the plain base)
    speed: float = 1.0


class AcousticBackend(Protocol):
    """What the core needs of an acoustic model; one resident instance serves every voice on it."""

    name: ClassVar[str]  # the lineage tag ``backend`` of the versions it serves
    sha256: str  # of the weights adapters were trained on: an adapter is never served on another base
    feature_config: FeatureConfig
    shapes: dict[str, tuple[int, int]]  # {layer path: (in, out)} an adapter of this backend may touch

    def model_inputs(self, text: str, language: str, frontend: Mapping[str, Any] | None = None) -> Any:
        """The text frontend: what ``AcousticRow.inputs`` holds for ``text``. ``frontend`` is the voice's own
        part of it (``read_frontend`` of its folder; empty for the end-to-end backend)."""
        ...

    def predict(self, rows: Sequence[AcousticRow], bank: LoraBank) -> list[np.ndarray | SynthesisError]:
        """One batched pass: per row a denormalised WORLD feature matrix, or the row's error."""
        ...

    def render(self, row: AcousticRow, features: np.ndarray) -> np.ndarray:
        """One row's audio from what ``predict`` gave it (the vocoder step; runs on the vocoder threads)."""
        ...

    def predict_with_timing(self, row: AcousticRow, bank: LoraBank, reference: np.ndarray) -> np.ndarray:
        """Features on a reference recording's timing (its WORLD features): evaluation's reconstruction."""
        ...


def read_frontend(folder: Path | None) -> dict[str, Any]:
    """A voice folder's own part of the text frontend (two-stage: ``two_stage.json``, its reference voice and
    pitch), or {} for a voice without any (end-to-end)."""
    import json

    from voice_lib.data.reference import VOICE_FILE

    path = None if folder is None else folder / VOICE_FILE
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-run the voice's onboarding to write it again") from exc


def guarded_features(features: np.ndarray, config: FeatureConfig) -> tuple[np.ndarray, ...]:
    """(lf0, vuv, envelope, aperiodicity) of a denormalised feature matrix, refusing non-finite features and
    clipping F0 into the analysis range (the guards every rendering applies before making audio)."""
    if not np.isfinite(features).all():
        raise SynthesisError("the model produced non-finite acoustic features")
    lf0, vuv, env, bap = split_features(features)
    # WORLD is only defined for F0 inside its analysis range; keep a wild prediction from reaching it.
    return np.clip(lf0, math.log(config.f0_floor), math.log(config.f0_ceil)), vuv, env, bap


def vocode(features: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """WORLD synthesis of a denormalised feature matrix, behind the core's guards."""
    return world_synthesis(*guarded_features(features, config), config)


@dataclass
class RowAudio:
    audio: np.ndarray
    compute_seconds: float  # the row's share of the model pass plus its own vocoding


@dataclass(frozen=True, eq=False)
class RowRender:
    """One row after the model pass: calling it renders the row's audio (the vocoder step, no model involved).

    The split lets the server run the next batch's model pass while this batch's rows still render."""

    backend: AcousticBackend
    row: AcousticRow
    features: np.ndarray
    shared_seconds: float  # the row's share of the model pass

    def __call__(self) -> RowAudio:
        started = time.perf_counter()
        audio = self.backend.render(self.row, self.features)
        return RowAudio(audio, self.shared_seconds + time.perf_counter() - started)


def predict_rows(backend: AcousticBackend, bank: LoraBank,
                 rows: Sequence[AcousticRow]) -> list[RowRender | Exception]:
    """The model pass over ``rows``: per row its pending rendering, or the row's error (a failed pass: every row's)."""
    started = time.perf_counter()
    try:
        predicted = backend.predict(rows, bank)
    except Exception as exc:  # noqa: BLE001 - the whole pass failed: every row gets the error
        return [exc] * len(rows)
    shared = (time.perf_counter() - started) / max(1, len(rows))
    return [found if isinstance(found, Exception) else RowRender(backend, row, found, shared)
            for row, found in zip(rows, predicted)]


def render_rows(pending: Sequence[Callable[[], T] | Exception],
                vocoder: Executor | None = None) -> Iterator[tuple[int, T | Exception]]:
    """Run each pending rendering; yields ``(index, result or error)`` as they finish, errors first.

    One failing rendering never fails the others. With ``vocoder`` (a thread pool) they run concurrently.
    """
    good = [i for i, item in enumerate(pending) if not isinstance(item, Exception)]
    for i, item in enumerate(pending):
        if isinstance(item, Exception):
            yield i, item
    if vocoder is None or len(good) < 2:
        for i in good:
            try:
                yield i, pending[i]()  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 - this row's failure is its own
                yield i, exc
        return
    futures = {vocoder.submit(pending[i]): i for i in good}  # type: ignore[arg-type]
    for future in as_completed(futures):
        exc = future.exception()
        yield futures[future], exc if exc is not None else future.result()


def synthesize_rows(backend: AcousticBackend, bank: LoraBank, rows: Sequence[AcousticRow],
                    vocoder: Executor | None = None) -> Iterator[tuple[int, RowAudio | Exception]]:
    """Predict ``rows`` in one pass, then vocode each; yields ``(row index, audio or error)`` as rows finish.

    One bad row never fails the others. With ``vocoder`` (a thread pool) the rows are vocoded concurrently.
    """
    yield from render_rows(predict_rows(backend, bank, rows), vocoder)


def guarded_durations(log_dur: torch.Tensor, phone_mask: torch.Tensor, speed: torch.Tensor,
                      max_positions: int) -> tuple[torch.Tensor, list[bool]]:
    """Steps per phone from predicted log-durations: capped per phone and per row; rows with NaN flagged.

    ``speed`` is (batch, 1); the total of a row is scaled down to the decoder's position table when over it.
    """
    broken = (~torch.isfinite(log_dur).masked_fill(phone_mask, True).all(1)).tolist()
    raw = torch.nan_to_num(torch.expm1(log_dur) / speed, nan=1.0, posinf=MAX_STEPS_PER_PHONE)
    durations = torch.clamp(torch.round(raw), 1, MAX_STEPS_PER_PHONE).long().masked_fill(phone_mask, 0)
    totals = durations.sum(1)
    if bool((totals > max_positions).any()):
        durations = torch.where((totals > max_positions)[:, None],
                                (durations * max_positions // totals[:, None]).clamp(min=1),
                                durations).masked_fill(phone_mask, 0)
    return durations, broken
