"""Held-out evaluation of cloned voices: every system on every held-out clip, aggregated, gated once, reported.

Per system (typically ``{"base": ..., "adapted": ...}``) and held-out clip the measurements of
voice_lib/eval/metrics.py; the gates of voice_lib/eval/gates.py, computed here once and carried by the result;
the report and MLflow logging of voice_lib/eval/report.py. Two ceiling rows give context: ``real`` (the
instruments on the recordings themselves) and ``vocoder`` (WORLD analysis → resynthesis).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.data.audio import write_wav
from voice_lib.data.features import FeatureConfig, world_synthesis
from voice_lib.eval.gates import GateCheck, ProductionReference, gate_checks
from voice_lib.eval.metrics import (
    REAL,
    SR,
    VOCODER,
    ClipRow,
    aggregate,
    bad_output_reasons,
    eval_settings,
    fmt,
    intrusive_scores,
    json_safe,
    speech_metrics,
    to_16k,
)
from voice_lib.eval.report import render_eval_report, safe_name, write_result_json

log = logging.getLogger(__name__)


class SynthesizerLike(Protocol):
    """What evaluation needs of ``inference.Synthesizer``: both return Synthesis(audio, sample_rate, seconds_compute)."""

    def synthesize(self, text: str, language: str = "en") -> Any: ...
    def reconstruct(self, phoneme_ids: np.ndarray, features: np.ndarray, text: str | None = None,
                    language: str = "en") -> Any: ...


@dataclass
class HeldOutClip:
    clip_id: str
    text: str
    language: str
    audio: np.ndarray  # float32, 16 kHz, the real recording
    phoneme_ids: np.ndarray
    features: np.ndarray  # (T, 63) raw feature matrix of the clip (``train.feature_matrix``)


@dataclass
class EvalResult:
    rows: list[ClipRow]
    aggregates: dict[str, dict[str, float | None]]
    gates: list[GateCheck]  # every gate on the gated system, computed once by ``evaluate``
    systems: list[str]
    thresholds: dict[str, Any]
    files: list[str] = field(default_factory=list)
    production: ProductionReference | None = None  # what the production-relative gate compared with

    @property
    def failures(self) -> list[GateCheck]:
        return [g for g in self.gates if g.passed is False]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        """Plain JSON types only: NaN becomes null."""
        return json_safe({
            "passed": self.passed, "systems": self.systems, "thresholds": self.thresholds,
            "aggregates": self.aggregates, "failures": [g.message for g in self.failures],
            "gates": [asdict(g) | {"env_var": g.env_var} for g in self.gates],
            "production": asdict(self.production) if self.production else None,
            "rows": [asdict(r) | {"bad": r.bad} for r in self.rows], "files": self.files,
        })


def _ceiling_rows(clip: HeldOutClip, reference_embedding: np.ndarray, fcfg: FeatureConfig, samples: Path,
                  settings: Settings | None) -> tuple[ClipRow, ClipRow]:
    """The recording itself (``real``) and its WORLD resynthesis (``vocoder``)."""
    from voice_lib.data.datasets import split_features

    ref, name, ref_dur = np.asarray(clip.audio, dtype=np.float32), safe_name(clip.clip_id), len(clip.audio) / SR
    real = ClipRow(REAL, clip.clip_id, clip.language, ref_dur, duration=ref_dur,
                   synthesis_path=str(write_wav(samples / REAL / f"{name}.wav", ref, SR)))
    speech_metrics(real, ref, clip.text, reference_embedding, silent=False, settings=settings)
    voc, t0 = ClipRow(VOCODER, clip.clip_id, clip.language, ref_dur), time.perf_counter()
    resynth = to_16k(world_synthesis(*split_features(np.asarray(clip.features, dtype=np.float32)), fcfg), fcfg.sample_rate)
    voc.duration = len(resynth) / SR
    voc.rtf = voc.rtf_reconstruct = (time.perf_counter() - t0) / max(voc.duration, 1e-6)
    voc.pesq, voc.stoi = intrusive_scores(ref, resynth, voc.notes)
    voc.reconstruction_path = str(write_wav(samples / VOCODER / f"{name}.wav", resynth, SR))
    speech_metrics(voc, resynth, clip.text, reference_embedding, silent=False, settings=settings)
    return real, voc


def _system_row(system: str, synth: SynthesizerLike, clip: HeldOutClip, reference_embedding: np.ndarray,
                ev: EvalSettings, samples: Path, settings: Settings | None) -> ClipRow:
    """One system on one clip: timed reconstruction (PESQ/STOI), free synthesis (WER, similarity, DNSMOS, RTF)."""
    ref, name, ref_dur = np.asarray(clip.audio, dtype=np.float32), safe_name(clip.clip_id), len(clip.audio) / SR
    row = ClipRow(system, clip.clip_id, clip.language, ref_dur)
    rec = synth.reconstruct(clip.phoneme_ids, clip.features, text=clip.text, language=clip.language)
    rec_audio = to_16k(rec.audio, rec.sample_rate)
    row.rtf_reconstruct = float(rec.seconds_compute) / max(len(rec_audio) / SR, 1e-6)
    row.pesq, row.stoi = intrusive_scores(ref, rec_audio, row.notes)
    out = synth.synthesize(clip.text, clip.language)
    audio = to_16k(out.audio, out.sample_rate)
    row.duration = len(audio) / SR
    row.rtf = float(out.seconds_compute) / max(row.duration, 1e-6)
    synth_flags = bad_output_reasons(audio, ref_dur, ev, "synthesis")
    for key, reason in [*bad_output_reasons(rec_audio, ref_dur, ev, "reconstruction").items(), *synth_flags.items()]:
        setattr(row, key, True)
        row.bad_reasons.append(reason)
    speech_metrics(row, audio, clip.text, reference_embedding, silent="silent" in synth_flags, settings=settings)
    row.synthesis_path = str(write_wav(samples / system / f"{name}.wav", audio, SR))
    row.reconstruction_path = str(write_wav(samples / system / f"{name}.timed.wav", rec_audio, SR))
    return row


def _listening_samples(synth: SynthesizerLike | None, language: str, out_dir: Path) -> list[str]:
    """The gated system speaking ``listening_texts``: ``listen/<i>.wav`` and ``listen/listen.json`` (logged with the
    report, so the release page plays the same sentences for production, canary and candidate side by side)."""
    import json

    from voice_lib.data.corpus import listening_texts

    if synth is None:
        return []
    folder, entries = out_dir / "listen", []
    for i, text in enumerate(listening_texts(language)):
        out = synth.synthesize(text, language)
        audio = to_16k(out.audio, out.sample_rate)
        write_wav(folder / f"{i}.wav", audio, SR)
        entries.append({"file": f"{i}.wav", "text": text, "seconds": round(len(audio) / SR, 2)})
    (folder / "listen.json").write_text(json.dumps({"language": language, "samples": entries}, indent=2))
    return [str(folder / e["file"]) for e in entries] + [str(folder / "listen.json")]


def evaluate(synthesizers: Mapping[str, SynthesizerLike], clips: list[HeldOutClip], reference_embedding: np.ndarray,
             settings: Settings | EvalSettings, out_dir: Path, feature_config: FeatureConfig | None = None,
             render: bool = True, production: ProductionReference | None = None) -> EvalResult:
    """Score every system on every clip, aggregate, apply the gates once, and (``render``) write the report.

    ``production``: the voice's production version when this is a new version of an existing voice (the gate
    ``max_p808_drop_below_production`` compares with it; without one that gate is skipped). Every output is saved
    under ``out_dir/samples/<system>/``; ``result.json`` and the report go to ``out_dir``."""
    ev = eval_settings(settings)
    full = settings if isinstance(settings, Settings) else None  # the ASR settings; EvalSettings alone: defaults
    if not clips or REAL in synthesizers or VOCODER in synthesizers:
        raise ValueError(f"evaluate needs held-out clips, and system names other than {REAL!r}/{VOCODER!r} (the ceiling rows)")
    out_dir, started, rows = Path(out_dir), time.perf_counter(), list[ClipRow]()
    samples = out_dir / "samples"
    # The vocoder ceiling resynthesises the clips' own features: onboarding's features step makes them with
    # FeatureConfig at the settings' rate, whatever the backend under test uses (two-stage: 10 ms frames).
    fcfg = feature_config or FeatureConfig(sample_rate=full.sample_rate if full else SR)
    for synth in synthesizers.values():  # warm-up: a first call's lazy initialisation must not count as RTF
        synth.synthesize(clips[0].text, clips[0].language)
    for i, clip in enumerate(clips, 1):
        real, voc = _ceiling_rows(clip, reference_embedding, fcfg, samples, full)
        rows += [real, voc]
        summary = [f"real WER {fmt(real.wer)} sim {fmt(real.speaker_similarity)} P.808 {fmt(real.p808_mos)}",
                   f"vocoder PESQ {fmt(voc.pesq)} P.808 {fmt(voc.p808_mos)}"]
        for system, synth in synthesizers.items():
            row = _system_row(system, synth, clip, reference_embedding, ev, samples, full)
            rows.append(row)
            summary.append(f"{system} PESQ {fmt(row.pesq)} STOI {fmt(row.stoi)} WER {fmt(row.wer)} "
                           f"sim {fmt(row.speaker_similarity)} P.808 {fmt(row.p808_mos)} RTF {fmt(row.rtf, 3)}"
                           f"{' BAD' if row.bad else ''}")
        log.info("eval clip %d/%d %s: %s", i, len(clips), clip.clip_id, "; ".join(summary))

    listen = _listening_samples(synthesizers.get(ev.gated_system), clips[0].language, out_dir)
    systems = [REAL, VOCODER, *synthesizers]
    aggregates = aggregate(rows, systems, baseline=ev.baseline_system)
    result = EvalResult(rows, aggregates, gate_checks(aggregates, ev, production=production), systems, ev.model_dump(),
                        production=production)
    log.info("evaluated %d systems on %d clips in %.1f s: %s", len(synthesizers), len(clips),
             time.perf_counter() - started, "PASSED" if result.passed else "; ".join(g.message for g in result.failures))
    result.files += listen
    out_dir.mkdir(parents=True, exist_ok=True)
    if render:
        render_eval_report(result, out_dir, ev)
    else:
        write_result_json(result, out_dir)
    return result
