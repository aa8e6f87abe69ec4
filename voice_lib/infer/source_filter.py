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

import numpy as np
from scipy.ndimage import uniform_filter1d

PEAK = 0.98  # the filtered rendering's largest sample, at most


def envelope_filter(audio: np.ndarray, sample_rate: int, change: np.ndarray, frame_period_ms: float,
                    n_fft: int = 512) -> np.ndarray:
    """``audio`` filtered, frame by frame, by a change of its WORLD coded envelope (zero phase).

    The coded envelope is a linear transform of the log spectrum, so the power gain of a change is the decoded
    change itself: decode(target) / decode(source) = decode(target - source), one decode instead of two."""
    import librosa
    import pyworld

    hop = int(round(sample_rate * frame_period_ms / 1000.0))
    gain = np.sqrt(pyworld.decode_spectral_envelope(np.ascontiguousarray(change, np.float64), sample_rate, n_fft)).T
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
