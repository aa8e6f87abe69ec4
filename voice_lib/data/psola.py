"""TD-PSOLA (pitch-synchronous overlap-add): a waveform's pitch moved, its formants kept.

The two-stage backend re-pitches its reference rendering to the target's F0 with it (infer.source_filter), and
choosing a reference voice measures how intelligible each candidate stays once moved to the target's pitch
(train.finetune_two_stage.choose_source): both layers use this one implementation.

The two loops (placing the analysis marks, laying the grains) are compiled by numba (a librosa dependency
already), without the GIL: in Python they held it for ~16 ms of a 20-word sentence's ~26 ms rendering, so the
server's vocoder threads could not render two rows at once (2 threads ran 0.79x as fast as one).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.signal import butter, sosfiltfilt

UNVOICED_HOP_S = 0.005  # grain spacing in unvoiced stretches: noise has no period to follow
MIN_F0 = 40.0


@njit(nogil=True, cache=True)
def _place_marks(low: np.ndarray, f0: np.ndarray, sample_rate: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    n, frames = len(low), len(f0)
    marks = np.empty(n + 1, np.int64)  # at most one mark per sample: each mark is at least one sample on
    periods = np.empty(n + 1, np.float64)
    count, start = 0, 0
    step = int(sample_rate * UNVOICED_HOP_S)
    while start < frames:
        end = start
        while end < frames and (f0[end] > 0) == (f0[start] > 0):
            end += 1
        lo, hi = start * hop, min(n, end * hop)
        if f0[start] > 0:
            t, first = float(lo), True
            while t < hi:
                period = sample_rate / max(f0[min(frames - 1, int(t) // hop)], MIN_F0)
                if not first:  # snap within ±30% of a period
                    a, b = max(lo, int(t - 0.3 * period)), min(hi, int(t + 0.3 * period) + 1)
                    if b > a:
                        t = float(a + np.argmax(low[a:b]))
                marks[count], periods[count] = int(t), period
                count += 1
                t, first = max(t + period, marks[count - 1] + 1.0), False
        else:
            for mark in range(lo, hi, step):
                marks[count], periods[count] = mark, float(step)
                count += 1
        start = end
    return marks[:count].copy(), periods[:count].copy()


def pitch_marks(audio: np.ndarray, sample_rate: int, f0: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Analysis marks (sample positions) and each mark's period in samples. Voiced runs get one mark per
    period, each snapped to the largest peak of the low-passed signal near where the period predicts it (so
    grains cut at the same point of every cycle); unvoiced runs get a mark every 5 ms."""
    low = sosfiltfilt(butter(4, 900, fs=sample_rate, output="sos"), audio.astype(np.float64))
    return _place_marks(low, np.ascontiguousarray(f0, np.float64), int(sample_rate), int(hop))


@njit(nogil=True, cache=True)
def _overlap_add(audio: np.ndarray, marks: np.ndarray, periods: np.ndarray, target_f0: np.ndarray,
                 sample_rate: int, hop: int, speed: float, out_n: int) -> np.ndarray:
    n, frames = len(audio), len(target_f0)
    out = np.zeros(out_n + 2 * int(sample_rate / MIN_F0))
    weight = np.zeros_like(out)
    s = 0.0
    while s < out_n:
        u = s * speed  # where in the source this output instant comes from
        k = min(max(np.searchsorted(marks, u), 0), len(marks) - 1)
        if k > 0 and abs(marks[k - 1] - u) < abs(marks[k] - u):
            k -= 1
        centre, half = marks[k], max(1, int(periods[k]))
        lo, hi = max(0, centre - half), min(n, centre + half + 1)
        at = int(s) - (centre - lo)
        if at >= 0:
            for i in range(lo, hi):  # the grain under a Hann window of 2 * half + 1 samples (np.hanning's)
                w = 0.5 - 0.5 * np.cos(2.0 * np.pi * (i - (centre - half)) / (2 * half))
                out[at + i - lo] += audio[i] * w
                weight[at + i - lo] += w
        target = target_f0[min(frames - 1, int(u) // hop)]
        s += sample_rate / target if target > 0 else sample_rate * UNVOICED_HOP_S
    result = np.empty(out_n, np.float32)
    for i in range(out_n):
        result[i] = out[i] / max(weight[i], 0.5)
    return result


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
    out_n = max(1, int(round(len(audio) / speed)))
    return _overlap_add(np.ascontiguousarray(audio, np.float64), marks, periods,
                        np.ascontiguousarray(target_f0, np.float64), int(sample_rate), hop, float(speed), out_n)
