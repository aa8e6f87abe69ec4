"""Held-out evaluation of cloned voices: objective metrics, release gates, an HTML report and MLflow logging.

Per system (typically ``{"base": ..., "adapted": ...}``) and held-out clip: reconstruction with the reference
timing → PESQ-wb and STOI against the real recording; free synthesis of the text → WER (offline English ASR),
GE2E speaker similarity, RTF; bad-output flags (silent, clipped, truncated/runaway). Two ceiling rows give
context: ``real`` (the ASR's own WER on the recordings) and ``vocoder`` (WORLD analysis → resynthesis).
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.data.audio import audio_defects, resample, write_wav
from voice_lib.data.features import FeatureConfig, world_synthesis

log = logging.getLogger(__name__)
SR = 16000  # PESQ-wb, STOI, ASR and the speaker encoder all work at 16 kHz
REAL, VOCODER = "real", "vocoder"
METRICS = ("pesq", "stoi", "wer", "speaker_similarity", "rtf", "bad_output_rate")
NAN = float("nan")


class SynthesizerLike(Protocol):
    """What evaluation needs of ``inference.Synthesizer``: both return Synthesis(audio, sample_rate, seconds_compute)."""

    def synthesize(self, text: str, language: str = "en") -> Any: ...
    def reconstruct(self, phoneme_ids: np.ndarray, features: np.ndarray) -> Any: ...


@dataclass
class HeldOutClip:
    clip_id: str
    text: str
    language: str
    audio: np.ndarray  # float32, 16 kHz, the real recording
    phoneme_ids: np.ndarray
    features: np.ndarray  # (T, 63) raw feature matrix of the clip (``train.feature_matrix``)


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
    speaker_similarity: float = NAN
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


@dataclass
class GateCheck:
    """One gate applied to one system; ``passed`` is None when it could not apply (e.g. no English clips)."""

    gate: str  # EvalSettings field name
    system: str
    metric: str
    value: float | None
    threshold: float
    passed: bool | None
    message: str

    @property
    def env_var(self) -> str:
        return f"VOICEOPS_EVAL__{self.gate.upper()}"

    def __str__(self) -> str:
        return self.message


GateFailure = GateCheck  # a GateCheck with passed == False


@dataclass
class EvalResult:
    rows: list[ClipRow]
    aggregates: dict[str, dict[str, float | None]]
    gates: list[GateCheck]
    systems: list[str]
    thresholds: dict[str, Any]
    files: list[str] = field(default_factory=list)

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
            "rows": [asdict(r) | {"bad": r.bad} for r in self.rows], "files": self.files,
        })


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


def _eval_settings(settings: Settings | EvalSettings) -> EvalSettings:
    return settings if isinstance(settings, EvalSettings) else settings.eval


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return resample(np.asarray(audio, dtype=np.float32).reshape(-1), sample_rate, SR)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


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


def _speech_metrics(row: ClipRow, audio: np.ndarray, text: str, reference_embedding: np.ndarray, silent: bool) -> None:
    """WER (English only) and speaker similarity of free synthesis or a real recording, into ``row``."""
    from voice_lib.data.speech import (
        cosine,
        speaker_embedding,
        transcribe_english,
        word_error_rate,
    )

    if row.language.lower().startswith("en"):
        row.transcript = "" if silent else transcribe_english(audio, SR)  # the ASR hallucinates words in silence
        row.wer = word_error_rate(text, row.transcript)
    else:
        row.notes.append(f"WER not measured: the offline ASR is English-only (language {row.language!r})")
    row.speaker_similarity = NAN if silent else cosine(speaker_embedding(audio, SR), reference_embedding)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "clip"


def evaluate(synthesizers: Mapping[str, SynthesizerLike], clips: list[HeldOutClip], reference_embedding: np.ndarray,
             settings: Settings | EvalSettings, out_dir: Path, feature_config: FeatureConfig | None = None,
             render: bool = True) -> EvalResult:
    """Score every system on every clip, aggregate, apply the gates, and (``render``) write the report.
    Every output is saved under ``out_dir/samples/<system>/``; ``result.json`` and the report go to ``out_dir``."""
    from voice_lib.data.datasets import split_features
    from voice_lib.data.speech import cosine, speaker_embedding

    ev = _eval_settings(settings)
    if not clips or REAL in synthesizers or VOCODER in synthesizers:
        raise ValueError(f"evaluate needs held-out clips, and system names other than {REAL!r}/{VOCODER!r} (the ceiling rows)")
    out_dir, started, rows = Path(out_dir), time.perf_counter(), list[ClipRow]()
    samples = out_dir / "samples"
    fcfg = feature_config or getattr(next(iter(synthesizers.values()), None), "feature_config", None) or FeatureConfig()
    for synth in synthesizers.values():  # warm-up: a first call's lazy initialisation must not count as RTF
        synth.synthesize(clips[0].text, clips[0].language)
    for i, clip in enumerate(clips, 1):
        ref, name, ref_dur = np.asarray(clip.audio, dtype=np.float32), _safe_name(clip.clip_id), len(clip.audio) / SR
        real = ClipRow(REAL, clip.clip_id, clip.language, ref_dur, duration=ref_dur,
                       synthesis_path=str(write_wav(samples / REAL / f"{name}.wav", ref, SR)))
        _speech_metrics(real, ref, clip.text, reference_embedding, silent=False)
        voc, t0 = ClipRow(VOCODER, clip.clip_id, clip.language, ref_dur), time.perf_counter()
        resynth = _to_16k(world_synthesis(*split_features(np.asarray(clip.features, dtype=np.float32)), fcfg), fcfg.sample_rate)
        voc.duration = len(resynth) / SR
        voc.rtf = voc.rtf_reconstruct = (time.perf_counter() - t0) / max(voc.duration, 1e-6)
        voc.pesq, voc.stoi = intrusive_scores(ref, resynth, voc.notes)
        voc.reconstruction_path = str(write_wav(samples / VOCODER / f"{name}.wav", resynth, SR))
        voc.speaker_similarity = cosine(speaker_embedding(resynth, SR), reference_embedding)
        rows += [real, voc]
        summary = [f"real WER {_fmt(real.wer)} sim {_fmt(real.speaker_similarity)}", f"vocoder PESQ {_fmt(voc.pesq)}"]
        for system, synth in synthesizers.items():
            row = ClipRow(system, clip.clip_id, clip.language, ref_dur)
            rec = synth.reconstruct(clip.phoneme_ids, clip.features)
            rec_audio = _to_16k(rec.audio, rec.sample_rate)
            row.rtf_reconstruct = float(rec.seconds_compute) / max(len(rec_audio) / SR, 1e-6)
            row.pesq, row.stoi = intrusive_scores(ref, rec_audio, row.notes)
            out = synth.synthesize(clip.text, clip.language)
            audio = _to_16k(out.audio, out.sample_rate)
            row.duration = len(audio) / SR
            row.rtf = float(out.seconds_compute) / max(row.duration, 1e-6)
            synth_flags = bad_output_reasons(audio, ref_dur, ev, "synthesis")
            for key, reason in [*bad_output_reasons(rec_audio, ref_dur, ev, "reconstruction").items(), *synth_flags.items()]:
                setattr(row, key, True)
                row.bad_reasons.append(reason)
            _speech_metrics(row, audio, clip.text, reference_embedding, silent="silent" in synth_flags)
            row.synthesis_path = str(write_wav(samples / system / f"{name}.wav", audio, SR))
            row.reconstruction_path = str(write_wav(samples / system / f"{name}.timed.wav", rec_audio, SR))
            rows.append(row)
            summary.append(f"{system} PESQ {_fmt(row.pesq)} STOI {_fmt(row.stoi)} WER {_fmt(row.wer)} "
                           f"sim {_fmt(row.speaker_similarity)} RTF {_fmt(row.rtf, 3)}{' BAD' if row.bad else ''}")
        log.info("eval clip %d/%d %s: %s", i, len(clips), clip.clip_id, "; ".join(summary))

    systems = [REAL, VOCODER, *synthesizers]
    aggregates = aggregate(rows, systems, baseline=ev.baseline_system)
    result = EvalResult(rows, aggregates, gate_checks(aggregates, ev), systems, ev.model_dump())
    log.info("evaluated %d systems on %d clips in %.1f s: %s", len(synthesizers), len(clips),
             time.perf_counter() - started, "PASSED" if result.passed else "; ".join(g.message for g in result.failures))
    out_dir.mkdir(parents=True, exist_ok=True)
    if render:
        render_eval_report(result, out_dir, ev)
    else:
        _write_result_json(result, out_dir)
    return result


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else NAN


def aggregate(rows: list[ClipRow], systems: list[str], baseline: str = "base") -> dict[str, dict[str, float | None]]:
    """Mean of each metric per system, plus gaps to the ASR floor, the vocoder ceiling and the baseline."""
    out: dict[str, dict[str, float | None]] = {}
    for system in systems:
        rs = [r for r in rows if r.system == system]
        wers = [r.wer for r in rs if r.wer is not None]
        agg: dict[str, float | None] = {"clips": float(len(rs)), "wer": _mean(wers) if wers else None}
        for metric in ("pesq", "stoi", "speaker_similarity", "rtf", "rtf_reconstruct", "duration"):
            agg[metric] = _mean([getattr(r, metric) for r in rs])
        if system not in (REAL, VOCODER):
            agg["bad_output_rate"] = sum(r.bad for r in rs) / max(len(rs), 1)
            for flag in ("silent", "clipped", "truncated"):
                agg[f"{flag}_rate"] = sum(getattr(r, flag) for r in rs) / max(len(rs), 1)
        out[system] = agg
    for system in systems[2:]:
        agg = out[system]
        en = {r.clip_id for r in rows if r.system == system and r.wer is not None}
        real_wer = [r.wer for r in rows if r.system == REAL and r.clip_id in en]
        agg["wer_gap_over_real"] = agg["wer"] - _mean(real_wer) if agg["wer"] is not None and real_wer else None
        for metric in ("pesq", "stoi"):
            ceiling = out[VOCODER][metric]
            agg[f"{metric}_of_ceiling"] = agg[metric] / ceiling if ceiling and math.isfinite(ceiling) else NAN
        if baseline in out and system != baseline:
            agg[f"similarity_gain_over_{baseline}"] = agg["speaker_similarity"] - out[baseline]["speaker_similarity"]
    return out


def _check(gate: str, system: str, metric: str, value: float | None, threshold: float, minimum: bool, extra: str = "",
           optional: bool = False) -> GateCheck:  # a missing value fails (n/a), unless the gate is optional: skipped
    env = f"VOICEOPS_EVAL__{gate.upper()}"
    if value is None and optional:
        return GateCheck(gate, system, metric, None, threshold, None, f"{metric} not measured{extra}: gate {env} skipped")
    value = NAN if value is None else float(value)
    ok = math.isfinite(value) and (value >= threshold if minimum else value <= threshold)
    op = (">=" if ok else "<") if minimum else ("<=" if ok else ">")
    return GateCheck(gate, system, metric, value, threshold, ok, f"{metric} {_fmt(value)} {op} {threshold:g} ({env}){extra}")


def gate_checks(aggregates: Mapping[str, Mapping[str, float | None]], settings: Settings | EvalSettings,
                system: str | None = None, baseline: str | None = None) -> list[GateCheck]:
    """Every gate applied to ``system`` (default ``settings.gated_system``), passed or not."""
    ev = _eval_settings(settings)
    system = system or ev.gated_system
    baseline = ev.baseline_system if baseline is None else baseline
    agg = aggregates.get(system)
    if agg is None:
        return [GateCheck("gated_system", system, "system", None, 0.0, False,
                          f"system {system!r} was not evaluated (VOICEOPS_EVAL__GATED_SYSTEM); have {sorted(aggregates)}")]
    checks = [_check(f"{bound}_{metric}", system, metric, agg.get(metric), getattr(ev, f"{bound}_{metric}"), bound == "min")
              for bound, metric in (("min", "speaker_similarity"), ("min", "pesq"), ("min", "stoi"),
                                    ("max", "bad_output_rate"), ("max", "rtf"))]
    real_wer = aggregates.get(REAL, {}).get("wer")
    gap = agg.get("wer_gap_over_real")
    checks.append(_check("max_wer_gap_over_real", system, "wer_gap_over_real", gap, ev.max_wer_gap_over_real, False,
                         f": {system} WER {_fmt(agg.get('wer'))} vs real recordings {_fmt(real_wer)}" if gap is not None else "",
                         optional=True))
    if baseline and baseline != system and baseline in aggregates:
        base_sim = aggregates[baseline].get("speaker_similarity")
        gain = agg["speaker_similarity"] - base_sim if agg.get("speaker_similarity") is not None and base_sim is not None else None
        checks.append(_check("min_similarity_gain_over_base", system, f"similarity_gain_over_{baseline}", gain,
                             ev.min_similarity_gain_over_base, True,
                             f": {system} {_fmt(agg.get('speaker_similarity'))} vs {baseline} {_fmt(base_sim)}"))
    return checks


def check_gates(aggregates: Mapping[str, Mapping[str, float | None]], settings: Settings | EvalSettings,
                system: str | None = None, baseline: str | None = None) -> list[GateFailure]:
    """The failed gates; each message names the metric, its value, the threshold and the setting that sets it."""
    return [g for g in gate_checks(aggregates, settings, system, baseline) if g.passed is False]


def _write_result_json(result: EvalResult, out_dir: Path) -> Path:
    path = out_dir / "result.json"
    result.files = list(dict.fromkeys([*result.files, str(path)]))
    path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    return path


def _thresholds(ev: EvalSettings, real_wer: float | None) -> dict[str, float]:
    """Gate value per displayed metric (WER: the real recordings' WER plus the allowed gap)."""
    th = {"pesq": ev.min_pesq, "stoi": ev.min_stoi, "speaker_similarity": ev.min_speaker_similarity,
          "rtf": ev.max_rtf, "bad_output_rate": ev.max_bad_output_rate, "wer_gap_over_real": ev.max_wer_gap_over_real,
          f"similarity_gain_over_{ev.baseline_system}": ev.min_similarity_gain_over_base}
    if real_wer is not None and math.isfinite(real_wer):
        th["wer"] = real_wer + ev.max_wer_gap_over_real
    return th


def _plot_eval(result: EvalResult, ev: EvalSettings, out_dir: Path) -> list[Path]:
    from matplotlib.figure import (
        Figure,  # no pyplot: no global figure state, no display backend on servers
    )

    agg, systems = result.aggregates, result.systems
    th = _thresholds(ev, agg[REAL].get("wer"))
    fixed = {REAL: "tab:gray", VOCODER: "tab:olive", ev.baseline_system: "tab:blue", ev.gated_system: "tab:green"}
    palette = itertools.cycle(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:red"])
    colors = {s: fixed[s] if s in fixed else next(palette) for s in systems}
    fig = Figure(figsize=(3.2 * len(METRICS), 3.8))
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        values = [agg[s].get(metric) for s in systems]
        ax.bar(range(len(systems)), [NAN if v is None else v for v in values], color=[colors[s] for s in systems])
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        if metric in th:
            ax.axhline(th[metric], color="tab:red", ls="--", lw=1)
        bound = f" (gate {'<=' if metric in ('wer', 'rtf', 'bad_output_rate') else '>='} {th[metric]:.2g})" if metric in th else ""
        ax.set_title(metric + bound, fontsize=9)
    fig.suptitle(f"Held-out evaluation: {ev.gated_system} {'PASSED' if result.passed else 'FAILED'}")
    paths = [_save(fig, out_dir / "eval_metrics.png")]

    clip_ids = list(dict.fromkeys(r.clip_id for r in result.rows))
    fig = Figure(figsize=(max(6.0, 0.35 * len(clip_ids) + 3), 3.8))
    ax = fig.subplots()
    for s in [*systems[2:], REAL]:  # the real recordings last and dashed, so a system equal to them stays visible
        sims = {r.clip_id: r.speaker_similarity for r in result.rows if r.system == s}
        ax.plot(range(len(clip_ids)), [sims.get(c, NAN) for c in clip_ids], "x--" if s == REAL else "o-",
                color=colors[s], label=s, ms=4, lw=1)
    ax.axhline(ev.min_speaker_similarity, color="tab:red", ls="--", lw=1, label="gate")
    ax.set_xticks(range(len(clip_ids)), clip_ids, rotation=45, ha="right", fontsize=7)
    ax.set(title="Speaker similarity per clip (GE2E cosine to the voice)", ylabel="cosine", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    return paths + [_save(fig, out_dir / "eval_similarity.png")]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def render_eval_report(result: EvalResult, out_dir: Path, settings: Settings | EvalSettings | None = None) -> list[Path]:
    """Write report.html, result.json, plots and audio of up to ``report_clips`` clips into ``out_dir``."""
    ev = _eval_settings(settings) if settings is not None else EvalSettings(**result.thresholds)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "audio", ignore_errors=True)  # no stale players from an earlier run into this folder
    (out_dir / "audio").mkdir(parents=True)
    files = _plot_eval(result, ev, out_dir)
    esc, agg, systems, models = html.escape, result.aggregates, result.systems, result.systems[2:]

    def audio_tag(src: str | None, label: str) -> str:
        if not src or not Path(src).is_file():
            return ""
        files.append(Path(shutil.copyfile(src, out_dir / "audio" / f"{Path(src).parent.name}__{Path(src).name}")))
        return f"<div><small>{esc(label)}</small><br><audio controls preload='none' src='audio/{esc(files[-1].name)}'></audio></div>"

    by_key = {(r.system, r.clip_id): r for r in result.rows}
    clip_ids = list(dict.fromkeys(r.clip_id for r in result.rows))
    players = []
    for cid in clip_ids[: ev.report_clips]:
        cells = [audio_tag(by_key[(REAL, cid)].synthesis_path, "recording"), audio_tag(by_key[(VOCODER, cid)].reconstruction_path, "WORLD resynthesis")]
        cells += [audio_tag(by_key[(s, cid)].synthesis_path, "free synthesis") + audio_tag(by_key[(s, cid)].reconstruction_path, "reference timing")
                  for s in models]
        players.append(f"<tr><td>{esc(cid)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")

    failed = {(g.system, g.metric) for g in result.failures}
    th = _thresholds(ev, agg[REAL].get("wer"))
    metric_rows = []
    for metric in ("pesq", "stoi", "wer", "wer_gap_over_real", "speaker_similarity", f"similarity_gain_over_{ev.baseline_system}",
                   "pesq_of_ceiling", "stoi_of_ceiling", "rtf", "rtf_reconstruct", "bad_output_rate", "duration"):
        cells = "".join(
            f"<td class='{'fail' if (s, metric) in failed else ''}'>{_fmt(agg[s].get(metric), 3)}</td>" for s in systems)
        metric_rows.append(f"<tr><th>{esc(metric)}</th>{cells}<td>{_fmt(th.get(metric), 3) if metric in th else ''}</td></tr>")
    head = "".join(f"<th>{esc({REAL: 'real (ASR floor)', VOCODER: 'vocoder ceiling'}.get(s, s))}</th>" for s in systems)

    clip_rows = "".join(
        f"<tr class='{'bad' if r.bad else ''}'><td>{esc(r.clip_id)}</td><td>{esc(r.system)}</td><td>{_fmt(r.pesq)}</td>"
        f"<td>{_fmt(r.stoi)}</td><td>{_fmt(r.wer)}</td><td>{esc(r.transcript or '')}</td><td>{_fmt(r.speaker_similarity)}</td>"
        f"<td>{_fmt(r.rtf, 3)}</td><td>{_fmt(r.duration)} / {_fmt(r.reference_duration)}</td>"
        f"<td>{esc('; '.join(r.bad_reasons + r.notes))}</td></tr>"
        for r in result.rows
    )
    verdict = "PASSED" if result.passed else "FAILED"
    gates = "".join(f"<li class='{'fail' if g.passed is False else ''}'>{esc(g.system)}: {esc(g.message)}</li>" for g in result.gates)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation: {esc(ev.gated_system)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 6px}} .fail{{background:#fde8e8;color:#b3261e}} tr.bad{{background:#fff4e0}}
.passed{{color:#167a2c}} .failed{{color:#b3261e}} audio{{height:28px;width:220px}}</style></head><body>
<h1>Held-out evaluation <span class="{verdict.lower()}">{verdict}</span></h1>
<p>{len(clip_ids)} held-out clips; systems {esc(', '.join(models))}; gates judge <b>{esc(ev.gated_system)}</b>
against <b>{esc(ev.baseline_system)}</b>. PESQ/STOI score reconstruction with the reference timing; WER, similarity and RTF
score free synthesis. Read WER against the real recordings' WER (the offline ASR's own floor) and PESQ/STOI against the
vocoder ceiling (WORLD analysis &rarr; resynthesis of the real clip).</p>
<h2>Gates</h2><ul>{gates}</ul>
<h2>Metrics</h2><table><tr><th>metric</th>{head}<th>gate</th></tr>{''.join(metric_rows)}</table>
<img src="eval_metrics.png" alt="metrics per system with gate thresholds" style="max-width:100%">
<img src="eval_similarity.png" alt="speaker similarity per clip" style="max-width:100%">
<h2>Listen</h2><table><tr><th>clip</th><th>reference</th><th>vocoder</th>{''.join(f'<th>{esc(s)}</th>' for s in models)}</tr>{''.join(players)}</table>
<h2>All clips</h2><table><tr><th>clip</th><th>system</th><th>PESQ</th><th>STOI</th><th>WER</th><th>ASR transcript</th>
<th>speaker sim</th><th>RTF</th><th>dur / real s</th><th>flags and notes</th></tr>{clip_rows}</table>
</body></html>"""
    (out_dir / "report.html").write_text(page)
    files.append(out_dir / "report.html")
    result.files = list(dict.fromkeys(result.files + [str(f) for f in files]))
    files.append(_write_result_json(result, out_dir))
    return files


def log_eval_to_mlflow(result: EvalResult, out_dir: Path, settings: Settings, run_id: str) -> dict:
    """Log ``eval_<system>_<metric>`` metrics, thresholds and the report (as ``eval_report``) into an existing run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval_{_safe_name(system)}_{name}", float(value), now, 0)
               for system, agg in result.aggregates.items() for name, value in agg.items()
               if value is not None and math.isfinite(value)]
    metrics.append(Metric("eval_passed", float(result.passed), now, 0))
    existing = client.get_run(run_id).data.params
    params = [Param(f"eval.{k}", str(v)) for k, v in result.thresholds.items() if f"eval.{k}" not in existing]
    for start in range(0, max(len(metrics), len(params)), 100):  # log_batch caps metrics at 1000 and params at 100
        client.log_batch(run_id, metrics=metrics[start : start + 100], params=params[start : start + 100], tags=[])
    client.set_tag(run_id, "eval.passed", str(result.passed).lower())
    client.set_tag(run_id, "eval.failures", "; ".join(g.message for g in result.failures)[:5000] or "none")
    # Every output of every clip (samples/) stays local; the report's audio/ holds the ones to listen to.
    for item in sorted(p for p in Path(out_dir).iterdir() if p.name != "samples"):
        if item.is_dir():
            client.log_artifacts(run_id, str(item), f"eval_report/{item.name}")
        else:
            client.log_artifact(run_id, str(item), "eval_report")
    log.info("evaluation logged to MLflow run %s (%d metrics)", run_id, len(metrics))
    return {"mlflow_run_id": run_id, "metrics": len(metrics), "passed": result.passed}
