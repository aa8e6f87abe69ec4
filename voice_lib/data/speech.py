"""The offline speech models QC, evaluation and the canary probe use: silero VAD, GE2E speaker encoder, DNSMOS.

The speech recogniser (Whisper) is voice_lib/data/asr.py.

Each ships its weights inside its PyPI package, so nothing is downloaded. Models load lazily, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class SpeechSegment:
    start: int  # samples
    end: int

    def seconds(self, sample_rate: int) -> float:
        return (self.end - self.start) / sample_rate


@lru_cache(maxsize=1)
def _vad_model():
    from silero_vad import load_silero_vad

    return load_silero_vad()


def detect_speech(audio: np.ndarray, sample_rate: int, min_silence_ms: int = 250) -> list[SpeechSegment]:
    """Speech regions by silero VAD (works at 8 or 16 kHz; other rates are resampled here)."""
    import torch
    from silero_vad import get_speech_timestamps

    from voice_lib.data.audio import resample

    vad_sr = 16000
    wav = resample(audio, sample_rate, vad_sr) if sample_rate != vad_sr else audio
    with torch.inference_mode():
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wav)),
            _vad_model(),
            sampling_rate=vad_sr,
            min_silence_duration_ms=min_silence_ms,
            speech_pad_ms=30,
        )
    scale = sample_rate / vad_sr
    return [SpeechSegment(int(s["start"] * scale), min(len(audio), int(s["end"] * scale))) for s in stamps]


def speech_mask(segments: list[SpeechSegment], length: int) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for seg in segments:
        mask[seg.start : seg.end] = True
    return mask


@dataclass(frozen=True)
class MOS:
    """DNSMOS scores, 1-5: P.808 (overall MOS as in ITU-T P.808 listening tests) and the P.835 triple
    (OVRL overall, SIG speech signal, BAK background)."""

    p808: float
    ovrl: float
    sig: float
    bak: float


def naturalness_mos(audio: np.ndarray, sample_rate: int) -> MOS:
    """DNSMOS of ``audio`` (speechmos' ONNX models, offline). Clips under 9 s are tiled to 9 s by DNSMOS itself.

    Measured here: clean flite speech P.808 ~3.3, the same speech under white noise at -20 dB ~2.4, digital
    silence ~2.1 (so a floor must sit well above 2.1 to mean anything). About 0.3-1 s per clip on one core.
    """
    from speechmos import dnsmos

    from voice_lib.data.audio import resample

    wav = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate != 16000:
        wav = resample(wav, sample_rate, 16000)
    if len(wav) < 1600:
        raise ValueError(f"DNSMOS needs at least 0.1 s of audio, got {len(wav)} samples")
    scores = dnsmos.run(np.clip(wav, -1.0, 1.0).astype(np.float32), 16000)
    return MOS(float(scores["p808_mos"]), float(scores["ovrl_mos"]), float(scores["sig_mos"]), float(scores["bak_mos"]))


@lru_cache(maxsize=1)
def _speaker_encoder():
    from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)


def speaker_embedding(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """L2-normalised 256-d GE2E embedding (resemblyzer). Short or silent input falls back to the raw clip."""
    from resemblyzer import preprocess_wav

    from voice_lib.data.audio import resample

    wav = resample(audio, sample_rate, 16000)
    trimmed = preprocess_wav(wav, source_sr=16000)
    if len(trimmed) < 16000 * 0.3:  # webrtcvad trimmed almost everything: embed what we have
        trimmed = wav
    return _speaker_encoder().embed_utterance(trimmed).astype(np.float32)


def centroid(embeddings: np.ndarray) -> np.ndarray:
    """Element-wise median then renormalised: robust to a minority of foreign clips."""
    med = np.median(np.asarray(embeddings), axis=0)
    return (med / (np.linalg.norm(med) + 1e-9)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
