"""TD-PSOLA (pitch-synchronous overlap-add): a waveform's pitch moved, its formants kept.

The two-stage backend re-pitches its reference rendering to the target's F0 with it (infer.source_filter), and
choosing a reference voice measures how intelligible each candidate stays once moved to the target's pitch
(train.finetune_two_stage.choose_source): both layers use this one implementation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import butter, sosfiltfilt

UNVOICED_HOP_S = 0.005  # grain spacing in unvoiced stretches: noise has no period to follow
MIN_F0 = 40.0


@lru_cache(maxsize=512)
def _hann(length: int) -> np.ndarray:
    return np.hanning(length)


def pitch_marks(audio: np.ndarray, sample_rate: int, f0: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Analysis marks (sample positions) and each mark's period in samples. Voiced runs get one mark per
    period, each snapped to the largest peak of the low-passed signal near where the period predicts it (so
    grains cut at the same point of every cycle); unvoiced runs get a mark every 5 ms."""
    n, frames = len(audio), len(f0)
    low = sosfiltfilt(butter(4, 900, fs=sample_rate, output="sos"), audio.astype(np.float64))
    marks: list[int] = []
    periods: list[float] = []
    start = 0
    while start < frames:
        end = start
        while end < frames and (f0[end] > 0) == (f0[start] > 0):
            end += 1
        lo, hi = start * hop, min(n, end * hop)
        if f0[start] > 0:
            t, first = float(lo), True
            while t < hi:
                period = sample_rate / max(float(f0[min(frames - 1, int(t) // hop)]), MIN_F0)
                if not first:  # snap within ±30% of a period
                    a, b = max(lo, int(t - 0.3 * period)), min(hi, int(t + 0.3 * period) + 1)
                    if b > a:
                        t = float(a + int(np.argmax(low[a:b])))
                marks.append(int(t))
                periods.append(period)
                t, first = max(t + period, marks[-1] + 1.0), False
        else:
            step = int(sample_rate * UNVOICED_HOP_S)
            marks.extend(range(lo, hi, step))
            periods.extend([float(step)] * len(range(lo, hi, step)))
        start = end
    return np.asarray(marks, dtype=np.int64), np.asarray(periods)


def psola(audio: np.ndarray, sample_rate: int, f0: np.ndarray, target_f0: np.ndarray, frame_period_ms: float,
          speed: float = 1.0) -> np.ndarray:
    """TD-PSOLA: ``audio`` with its pitch moved from ``f0`` to ``target_f0`` (Hz per analysis frame, 0 where
    unvoiced) and its duration divided by ``speed``. Grains two analysis periods long, Hann-windowed, are
    laid at the target's periods; the overlap-added window sum is divided out (far upwards, partly
    incoherent grains then come out a little quieter: the envelope filter sets the converted level anyway)."""
    hop = int(round(sample_rate * frame_period_ms / 1000.0))
    marks, periods = pitch_marks(audio, sample_rate, f0, hop)
    if len(marks) == 0:
        return audio.astype(np.float32)
    n = len(audio)
    out_n = max(1, int(round(n / speed)))
    out = np.zeros(out_n + 2 * int(sample_rate / MIN_F0), dtype=np.float64)
    weight = np.zeros_like(out)
    frames = len(target_f0)
    s = 0.0
    while s < out_n:
        u = s * speed  # where in the source this output instant comes from
        k = int(np.clip(np.searchsorted(marks, u), 0, len(marks) - 1))
        if k > 0 and abs(marks[k - 1] - u) < abs(marks[k] - u):
            k -= 1
        centre, half = int(marks[k]), max(1, int(periods[k]))
        window = _hann(2 * half + 1)
        lo, hi = max(0, centre - half), min(n, centre + half + 1)
        w = window[lo - (centre - half): hi - (centre - half)]
        at = int(s) - (centre - lo)
        if at >= 0:
            out[at: at + len(w)] += audio[lo:hi] * w
            weight[at: at + len(w)] += w
        target = float(target_f0[min(frames - 1, int(u) // hop)])
        s += sample_rate / target if target > 0 else sample_rate * UNVOICED_HOP_S
    return (out[:out_n] / np.maximum(weight[:out_n], 0.5)).astype(np.float32)
