"""The measurements of held-out evaluation, per clip and aggregated per system.

Per clip: reconstruction with the reference timing → PESQ-wb and STOI against the real recording (intrusive);
free synthesis of the text → Whisper WER (English), GE2E speaker similarity, DNSMOS P.808 / OVRL; bad-output
flags (silent, clipped, truncated/runaway). The ``real`` row scores the recording itself (the instruments' own
floor: Whisper's WER and DNSMOS of real speech) and the ``vocoder`` row its WORLD resynthesis (the ceiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.data.audio import audio_defects, resample

SR = 16000  # PESQ-wb, STOI, Whisper, DNSMOS and the speaker encoder all work at 16 kHz
REAL, VOCODER = "real", "vocoder"
NAN = float("nan")
# Plotted per system, in this order.
METRICS = ("pesq", "stoi", "wer", "speaker_similarity", "p808_mos", "ovrl_mos", "rtf", "bad_output_rate")
_MEANS = ("pesq", "stoi", "speaker_similarity", "p808_mos", "ovrl_mos", "rtf", "rtf_reconstruct", "duration")


@dataclass
class ClipRow:
    """Metrics of one system on one clip (``real`` / ``vocoder`` rows carry only what applies to them)."""

    system: str
    clip_id: str
    language: str
    reference_duration: float
    duration: float = NAN  # free synthesis (real: the recording; vocoder: resynthesis)
    pesq: float = NAN
    stoi: float = NAN
    wer: float | None = None
    transcript: str | None = None
    asr_confidence: float = NAN  # exp(Whisper's mean token log-probability)
    speaker_similarity: float = NAN
    p808_mos: float = NAN  # DNSMOS of free synthesis (real: the recording; vocoder: the resynthesis)
    ovrl_mos: float = NAN
    rtf: float = NAN  # free synthesis (vocoder: resynthesis)
    rtf_reconstruct: float = NAN
    silent: bool = False
    clipped: bool = False
    truncated: bool = False
    bad_reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    synthesis_path: str | None = None
    reconstruction_path: str | None = None

    @property
    def bad(self) -> bool:
        return bool(self.bad_reasons)


def eval_settings(settings: Settings | EvalSettings) -> EvalSettings:
    return settings if isinstance(settings, EvalSettings) else settings.eval


def json_safe(obj: Any) -> Any:
    """NaN and numpy scalars → JSON-safe values (None, int, float); task results must be strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return json_safe(obj.item())
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return resample(np.asarray(audio, dtype=np.float32).reshape(-1), sample_rate, SR)


def intrusive_scores(reference: np.ndarray, degraded: np.ndarray, notes: list[str]) -> tuple[float, float]:
    """(PESQ-wb, STOI) of ``degraded`` against ``reference`` (16 kHz, trimmed to the shorter). NaN + note on failure."""
    from pesq import PesqError, pesq
    from pystoi import stoi

    n = min(len(reference), len(degraded))
    ref, deg = reference[:n].astype(np.float64), degraded[:n].astype(np.float64)
    if n < SR // 4 or not np.any(deg) or not np.any(ref):
        notes.append(f"PESQ/STOI not computed: {'signal shorter than 0.25 s' if n < SR // 4 else 'digital silence'}")
        return NAN, NAN
    try:
        p = float(pesq(SR, ref, deg, "wb"))
    except (PesqError, ValueError) as exc:  # NoUtterancesError, BufferTooShortError, NaN levels inside cypesq
        notes.append(f"PESQ failed: {type(exc).__name__}: {exc}")
        p = NAN
    return p, float(stoi(ref, deg, SR, extended=False))


def bad_output_reasons(audio: np.ndarray, reference_duration: float, ev: EvalSettings, what: str) -> dict[str, str]:
    """{"silent"|"clipped"|"truncated": reason} for a 16 kHz output, empty when it looks like usable speech."""
    return audio_defects(audio, ev.silence_dbfs, ev.clipping_fraction, sample_rate=SR, reference_seconds=reference_duration,
                         duration_range=(ev.min_duration_ratio, ev.max_duration_ratio), what=what)


def speech_metrics(row: ClipRow, audio: np.ndarray, text: str, reference_embedding: np.ndarray, silent: bool,
                   settings: Settings | None = None) -> None:
    """WER (English only), speaker similarity and DNSMOS of free synthesis, a recording or a resynthesis, into ``row``.

    Silent output gets WER 1.0 (Whisper hallucinates words into silence) and no similarity or MOS: a gate on a
    metric nobody could measure fails as n/a instead of passing on a score of silence."""
    from voice_lib.data.asr import transcribe, word_error_rate
    from voice_lib.data.speech import cosine, naturalness_mos, speaker_embedding

    if row.language.lower().startswith("en"):
        heard = None if silent else transcribe(audio, SR, settings)
        row.transcript = heard.text if heard else ""
        row.asr_confidence = heard.confidence if heard else NAN
        row.wer = word_error_rate(text, row.transcript)
    else:
        row.notes.append(f"WER not measured: the Whisper model reads English only (language {row.language!r})")
    if silent:
        return
    row.speaker_similarity = cosine(speaker_embedding(audio, SR), reference_embedding)
    mos = naturalness_mos(audio, SR)
    row.p808_mos, row.ovrl_mos = mos.p808, mos.ovrl


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else NAN


def _gap(rows: list[ClipRow], system: str, metric: str, value: float | None) -> float | None:
    """``value`` minus the real recordings' mean ``metric`` over the clips where ``system`` has it."""
    measured = {r.clip_id for r in rows if r.system == system and _finite(getattr(r, metric))}
    real = [getattr(r, metric) for r in rows if r.system == REAL and r.clip_id in measured]
    return value - _mean(real) if _finite(value) and real and _finite(_mean(real)) else None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def aggregate(rows: list[ClipRow], systems: list[str], baseline: str = "base") -> dict[str, dict[str, float | None]]:
    """Mean of each metric per system, plus gaps to the instruments' floor (the real recordings), the vocoder
    ceiling and the baseline."""
    out: dict[str, dict[str, float | None]] = {}
    for system in systems:
        rs = [r for r in rows if r.system == system]
        wers = [r.wer for r in rs if r.wer is not None]
        agg: dict[str, float | None] = {"clips": float(len(rs)), "wer": _mean(wers) if wers else None}
        for metric in _MEANS:
            agg[metric] = _mean([getattr(r, metric) for r in rs])
        if system not in (REAL, VOCODER):
            agg["bad_output_rate"] = sum(r.bad for r in rs) / max(len(rs), 1)
            for flag in ("silent", "clipped", "truncated"):
                agg[f"{flag}_rate"] = sum(getattr(r, flag) for r in rs) / max(len(rs), 1)
        out[system] = agg
    for system in [s for s in systems if s not in (REAL, VOCODER)]:
        agg = out[system]
        agg["wer_gap_over_real"] = _gap(rows, system, "wer", agg["wer"])
        below = _gap(rows, system, "p808_mos", agg["p808_mos"])
        agg["p808_gap_below_real"] = None if below is None else -below
        for metric in ("pesq", "stoi"):
            ceiling = out[VOCODER][metric] if VOCODER in out else NAN
            agg[f"{metric}_of_ceiling"] = agg[metric] / ceiling if ceiling and math.isfinite(ceiling) else NAN
        if baseline in out and system != baseline:
            agg[f"similarity_gain_over_{baseline}"] = agg["speaker_similarity"] - out[baseline]["speaker_similarity"]
    return out
