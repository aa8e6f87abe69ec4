"""The content stage of the two-stage backend: an offline reference synthesizer says the text.

flite, festival or espeak-ng (``voice_lib.data.corpus``) render the sentence; a fast WORLD analysis of
that rendering gives the source frames the converter turns into the target voice. The frames use the
platform's feature layout (``voice_lib.data.datasets.feature_matrix``: continuous log F0, voicing, 60
coded envelope dims, band aperiodicity) at 10 ms, with dio + stonemask F0 instead of harvest, measured
on this machine (one core, 16 kHz, RTF): dio(speed 4) + stonemask ~0.003, harvest ~0.3; cheaptrick at
10 ms ~0.005; d4c ~0.024, skipped for source frames because the converter predicts aperiodicity.

The speaker's pitch is not the converter's job: ``map_f0`` moves the source's log-F0 contour to the
target's mean and spread (Gaussian mapping, the standard voice-conversion baseline).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from voice_lib.data.datasets import feature_matrix
from voice_lib.data.features import FeatureConfig, world_analysis

LF0, VUV = 0, 1  # columns of a feature matrix (voice_lib.data.datasets.feature_matrix)
# Source frames and the converter's targets: 10 ms frames (half the converter's work of 5 ms) with the fast F0.
TWO_STAGE_FEATURES = FeatureConfig(frame_period_ms=10.0, f0_method="dio", dio_speed=4, f0_ceil=500.0)


@dataclass(frozen=True)
class PitchStats:
    """Mean and standard deviation of a speaker's voiced log F0."""

    mean: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)


def trim_silence(audio: np.ndarray, sample_rate: int, threshold: float = 0.02, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading and trailing silence: engines pad unevenly, and alignment must not match pad to speech."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= 0.0:
        return audio
    loud = np.flatnonzero(np.abs(audio) > threshold * peak)
    pad = int(margin_s * sample_rate)
    return audio[max(0, loud[0] - pad): loud[-1] + pad + 1]


def render_source(text: str, source_voice: str, sample_rate: int = 16000, lufs: float = -23.0) -> np.ndarray:
    """The reference synthesizer's rendering of ``text`` (float32 mono), silence trimmed and at the loudness
    QC gives every clip (the converter's training data), so envelope levels match."""
    from voice_lib.data.audio import normalize_loudness
    from voice_lib.data.corpus import synthesize

    audio, _ = normalize_loudness(trim_silence(synthesize(text, source_voice, sample_rate), sample_rate), sample_rate, lufs)
    return audio


def analyze_frames(audio: np.ndarray, config: FeatureConfig = TWO_STAGE_FEATURES, aperiodicity: bool = False) -> np.ndarray:
    """Audio → (T, 63) feature matrix. ``aperiodicity`` runs D4C too (training targets only)."""
    from voice_lib.data.features import ClipFeatures

    lf0, vuv, env, bap = world_analysis(audio, config, aperiodicity=aperiodicity)
    clip = ClipFeatures(phonemes=[], phoneme_ids=np.zeros(0, np.int32), lf0=lf0, vuv=vuv, envelope=env,
                        aperiodicity=bap, cache_key="")
    return feature_matrix(clip)


def pitch_stats(frames: list[np.ndarray]) -> PitchStats:
    """Voiced log-F0 statistics over a speaker's clips (feature matrices)."""
    lf0 = np.concatenate([f[f[:, VUV] > 0.5, LF0] for f in frames])
    if lf0.size == 0:
        raise ValueError("no voiced frames: cannot measure the speaker's pitch (is the audio speech?)")
    return PitchStats(float(lf0.mean()), float(lf0.std()) + 1e-6)


def map_f0(frames: np.ndarray, source: PitchStats, target: PitchStats) -> np.ndarray:
    """The source's log-F0 contour moved to the target's mean and spread (voiced and unvoiced frames
    alike: the contour is continuous, and voicing decides what the vocoder uses)."""
    out = frames.copy()
    out[:, LF0] = (out[:, LF0] - source.mean) / source.std * target.std + target.mean
    return out


VOICE_FILE = "two_stage.json"
SYNTHESIS_MODES = ("world", "source_filter")


@dataclass(frozen=True)
class TwoStageVoice:
    """What one two-stage voice needs beside the converter and its LoRA (saved as ``two_stage.json``)."""

    source_voice: str  # the reference synthesizer voice, e.g. "flite-awb"
    source_pitch: PitchStats
    target_pitch: PitchStats
    # Global-variance post-filter: per envelope dimension, how much to stretch the converted envelope around its
    # utterance mean (regression over imperfect alignments over-smooths it, which listeners and DNSMOS hear as
    # muffled). None: no post-filter (voices adapted before it existed).
    envelope_scale: tuple[float, ...] | None = None
    # How the converted frames become audio (voice_lib.infer.source_filter): "world" resynthesises them;
    # "source_filter" re-pitches the reference rendering itself and filters it by the converter's envelope
    # change (its first ``envelope_order`` dims, averaged over ``envelope_smoothing`` frames). Chosen per voice by
    # measurement at adaptation; voices adapted before the choice existed are "world".
    synthesis: str = "world"
    envelope_order: int = 30
    envelope_smoothing: int = 5
    # The source filter's post-filter is ``envelope_scale`` to this power (WORLD renderings, and the timed WORLD
    # reconstruction evaluation scores PESQ/STOI on, use the scale as measured).
    envelope_scale_power: float = 1.0

    def __post_init__(self) -> None:
        if self.synthesis not in SYNTHESIS_MODES:
            raise ValueError(f"synthesis {self.synthesis!r} is not one of {SYNTHESIS_MODES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TwoStageVoice:
        scale = data.get("envelope_scale")
        return cls(data["source_voice"], PitchStats(**data["source_pitch"]), PitchStats(**data["target_pitch"]),
                   tuple(float(v) for v in scale) if scale is not None else None,
                   str(data.get("synthesis", "world")), int(data.get("envelope_order", 30)),
                   int(data.get("envelope_smoothing", 5)), float(data.get("envelope_scale_power", 1.0)))

    def save(self, folder: Path) -> Path:
        path = folder / VOICE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> TwoStageVoice:
        try:
            return cls.from_dict(json.loads((folder / VOICE_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder / VOICE_FILE}: not a readable two-stage voice file ({exc}); "
                             "re-run the voice's onboarding to write it again") from exc


def apply_envelope_scale(frames: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The global-variance post-filter: the envelope stretched around its utterance mean, per dimension."""
    if scale is None:
        return frames
    out = frames.copy()
    env = out[:, 2:62]
    mean = env.mean(0, keepdims=True)
    out[:, 2:62] = mean + (env - mean) * np.asarray(scale, dtype=np.float32)
    return out
