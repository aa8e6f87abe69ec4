"""The offline speech models QC and evaluation use: silero VAD, pocketsphinx ASR, GE2E speaker encoder.

Each ships its weights inside its PyPI package, so nothing is downloaded. Models load lazily, once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_asr_lock = threading.Lock()


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


@lru_cache(maxsize=1)
def _asr_decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=16000, loglevel="FATAL")


def transcribe_english(audio: np.ndarray, sample_rate: int) -> str:
    """Offline English ASR (pocketsphinx default model). Its WER on clean read speech is ~0.36 here."""
    from voice_lib.data.audio import resample

    wav = resample(audio, sample_rate, 16000)
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
    with _asr_lock:  # one decoder per process; pocketsphinx decoders are not thread-safe
        decoder = _asr_decoder()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
    return hyp.hypstr.strip().lower() if hyp is not None else ""


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words / reference length, on lowercased words without punctuation."""
    import re

    ref = re.findall(r"[a-z']+", reference.lower())
    hyp = re.findall(r"[a-z']+", hypothesis.lower())
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


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
