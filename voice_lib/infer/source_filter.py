"""Source-filter rendering of the two-stage backend: the reference rendering's own waveform, re-pitched and
filtered into the target voice, instead of a WORLD resynthesis from scratch.

Why: WORLD analysis and resynthesis of the reference voice alone cost ~0.25 DNSMOS P.808 (flite-awb's
rendering 3.34 → 3.10 at 10 ms) and ~0.05 Whisper WER before any conversion, and the converter's output
then lost more. Keeping the source's natural excitation and changing only what the converter changed —
the "differential" approach of voice-conversion toolkits such as sprocket — measured better on the
held-out voices (docs/model.md): the waveform is

1. re-pitched to the target's F0 contour (the source's contour under ``reference.map_f0``) and re-timed
   for the requested speed by TD-PSOLA (pitch-synchronous overlap-add: formants stay, pitch moves);
2. filtered frame by frame, in the STFT domain, by the converter's change of the spectral envelope
   (converted − source, both WORLD coded envelopes), low-passed along quefrency (``order``: the timbre,
   not the source's phone-level detail, which the waveform already carries) and along time
   (``smoothing`` frames: the filter must not warble).

The filter is zero-phase (the source's phase is kept). Everything runs in numpy/scipy/librosa.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, sosfiltfilt

UNVOICED_HOP_S = 0.005  # grain spacing in unvoiced stretches: noise has no period to follow
MIN_F0 = 40.0
PEAK = 0.98  # the filtered rendering's largest sample, at most


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


def envelope_filter(audio: np.ndarray, sample_rate: int, source_envelope: np.ndarray, target_envelope: np.ndarray,
                    frame_period_ms: float, n_fft: int = 512) -> np.ndarray:
    """``audio`` filtered, frame by frame, by the ratio of two WORLD coded envelopes (zero phase)."""
    import librosa
    import pyworld

    hop = int(round(sample_rate * frame_period_ms / 1000.0))
    decode = lambda env: pyworld.decode_spectral_envelope(np.ascontiguousarray(env, np.float64), sample_rate, n_fft)  # noqa: E731
    gain = np.sqrt(decode(target_envelope) / np.maximum(decode(source_envelope), 1e-12)).T  # (bins, frames)
    spectrum = librosa.stft(audio, n_fft=n_fft, hop_length=hop, win_length=n_fft)
    frames = spectrum.shape[1]
    if gain.shape[1] < frames:  # the STFT's centred frames may run one or two past the WORLD analysis
        gain = np.concatenate([gain, np.repeat(gain[:, -1:], frames - gain.shape[1], axis=1)], axis=1)
    filtered = librosa.istft(spectrum * gain[:, :frames], hop_length=hop, win_length=n_fft, length=len(audio))
    # A converted voice louder than its source can overshoot full scale: scale the utterance down rather than clip
    # it (hard clipping is audible, and the server counts clipped output as bad audio).
    peak = float(np.max(np.abs(filtered))) if len(filtered) else 0.0
    if peak > PEAK:
        filtered = filtered * (PEAK / peak)
    return filtered.astype(np.float32)


def envelope_change(source_envelope: np.ndarray, converted_envelope: np.ndarray, order: int, smoothing: int) -> np.ndarray:
    """What the converter changed: converted − source coded envelope, the first ``order`` dimensions only,
    averaged over ``smoothing`` frames."""
    n = min(len(source_envelope), len(converted_envelope))
    change = (converted_envelope[:n] - source_envelope[:n]).astype(np.float64)
    change[:, order:] = 0.0
    return uniform_filter1d(change, smoothing, axis=0) if smoothing > 1 else change
