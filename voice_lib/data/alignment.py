"""Alignment of a speaker's clip to the reference synthesizer's rendering of the same transcript.

The converter learns frame pairs: the target's frames on the source's timeline. DTW between two
different speakers fails on raw cepstra (the speaker difference dominates the distance: WER 1.1 in an
early experiment), so the distance uses

1. low-order envelope coefficients 1..n (no energy term), mean removed per utterance (cepstral mean
   normalisation removes the average vocal-tract difference), plus voicing; and
2. optionally the source as already converted towards the target (``source_for_distance``): DTW
   between the converted source and the target compares like with like (iterative DTW refinement).

The path comes from ``librosa.sequence.dtw`` inside a Sakoe-Chiba band.
"""

from __future__ import annotations

import numpy as np

VUV = 1
ENVELOPE = slice(2, 62)  # columns of a feature matrix (voice_lib.data.datasets.feature_matrix)


def alignment_features(frames: np.ndarray, order: int = 20, voicing_weight: float = 2.0) -> np.ndarray:
    """(T, 63) feature matrix → (T, order + 1) speaker-normalised features for the DTW distance."""
    cep = frames[:, ENVELOPE][:, 1:order + 1].astype(np.float64)
    cep = cep - cep.mean(axis=0, keepdims=True)
    vuv = frames[:, VUV:VUV + 1].astype(np.float64) * voicing_weight
    return np.concatenate([cep, vuv], axis=1)


def dtw_path(source: np.ndarray, target: np.ndarray, band: float = 0.3) -> np.ndarray:
    """(k, 2) monotonic path of (source frame, target frame), start to end."""
    import librosa

    _, path = librosa.sequence.dtw(X=source.T, Y=target.T, metric="euclidean", global_constraints=True, band_rad=band)
    return path[::-1]


def warp_to_source(path: np.ndarray, n_source: int, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target frames on the source timeline (for each source frame, the middle of its matched target
    frames) and a per-frame weight: lowered where DTW stretched one target frame over many source frames,
    a sign of a poor match."""
    first = np.full(n_source, -1, dtype=np.int64)
    last = np.zeros(n_source, dtype=np.int64)
    for i, j in path:
        if first[i] < 0:
            first[i] = j
        last[i] = j
    middle = (first + last) // 2
    _, inverse, share = np.unique(middle, return_inverse=True, return_counts=True)
    weight = np.where(share[inverse] > 4, 0.3, 1.0).astype(np.float32)
    return target[middle], weight


def align_to_source(source: np.ndarray, target: np.ndarray, source_for_distance: np.ndarray | None = None,
                    order: int = 20, band: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The target's frames warped onto the source's timeline, and per-frame training weights (halved
    where the two disagree on voicing)."""
    a = alignment_features(source if source_for_distance is None else source_for_distance, order)
    path = dtw_path(a, alignment_features(target, order), band)
    aligned, weight = warp_to_source(path, len(source), target)
    weight = weight * np.where(aligned[:, VUV] == source[:, VUV], 1.0, 0.5)
    return aligned, weight.astype(np.float32)


def warp_to_target(path: np.ndarray, n_target: int, source: np.ndarray) -> np.ndarray:
    """The source's frames on the target's timeline (for timed reconstruction against a recording)."""
    index = np.zeros(n_target, dtype=np.int64)
    for i, j in path:
        index[j] = i
    return source[index]
