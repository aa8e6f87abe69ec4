"""The evaluation report: plots, an HTML page with audio players, result.json, and logging to MLflow."""

from __future__ import annotations

import html
import itertools
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.eval.gates import display_thresholds
from voice_lib.eval.metrics import METRICS, NAN, REAL, VOCODER, eval_settings, fmt

if TYPE_CHECKING:
    from voice_lib.eval.evaluation import EvalResult

log = logging.getLogger(__name__)
# Rows of the metrics table, in this order.
TABLE_METRICS = ("pesq", "stoi", "wer", "wer_gap_over_real", "speaker_similarity", "similarity_gain_over_{base}",
                 "p808_mos", "p808_gap_below_real", "ovrl_mos", "pesq_of_ceiling", "stoi_of_ceiling", "rtf",
                 "rtf_reconstruct", "bad_output_rate", "duration")
_LOWER_IS_BETTER = ("wer", "rtf", "bad_output_rate")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "clip"


def write_result_json(result: "EvalResult", out_dir: Path) -> Path:
    path = out_dir / "result.json"
    result.files = list(dict.fromkeys([*result.files, str(path)]))
    path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    return path


def _colors(systems: list[str], ev: EvalSettings) -> dict[str, str]:
    fixed = {REAL: "tab:gray", VOCODER: "tab:olive", ev.baseline_system: "tab:blue", ev.gated_system: "tab:green"}
    palette = itertools.cycle(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:red"])
    return {s: fixed[s] if s in fixed else next(palette) for s in systems}


def _plot_metrics(result: "EvalResult", ev: EvalSettings, out_dir: Path, colors: dict[str, str]) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend on servers

    agg, systems = result.aggregates, result.systems
    th = display_thresholds(ev, agg.get(REAL, {}))
    fig = Figure(figsize=(3.0 * len(METRICS), 3.8))
    for ax, metric in zip(fig.subplots(1, len(METRICS)), METRICS):
        values = [agg[s].get(metric) for s in systems]
        ax.bar(range(len(systems)), [NAN if v is None else v for v in values], color=[colors[s] for s in systems])
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        if metric in th:
            ax.axhline(th[metric], color="tab:red", ls="--", lw=1)
        bound = f" (gate {'<=' if metric in _LOWER_IS_BETTER else '>='} {th[metric]:.2g})" if metric in th else ""
        ax.set_title(metric + bound, fontsize=9)
        if metric.endswith("_mos"):
            ax.set_ylim(1, 5)
    fig.suptitle(f"Held-out evaluation: {ev.gated_system} {'PASSED' if result.passed else 'FAILED'}")
    return _save(fig, out_dir / "eval_metrics.png")


def _plot_per_clip(result: "EvalResult", ev: EvalSettings, out_dir: Path, colors: dict[str, str]) -> Path:
    """Speaker similarity and DNSMOS P.808 per clip, for every system and the real recordings."""
    from matplotlib.figure import Figure

    clip_ids = list(dict.fromkeys(r.clip_id for r in result.rows))
    fig = Figure(figsize=(max(6.0, 0.35 * len(clip_ids) + 3), 6.8))
    panels = (("speaker_similarity", "Speaker similarity per clip (GE2E cosine to the voice)", "cosine", (0, 1.02),
               ev.min_speaker_similarity),
              ("p808_mos", "DNSMOS P.808 per clip (free synthesis; real: the recording)", "MOS", (1, 5), ev.min_p808_mos))
    for ax, (metric, title, unit, ylim, gate) in zip(fig.subplots(2, 1, sharex=True), panels):
        for s in [*result.systems[2:], REAL]:  # the real recordings last and dashed, so a system equal to them stays visible
            values = {r.clip_id: getattr(r, metric) for r in result.rows if r.system == s}
            ax.plot(range(len(clip_ids)), [values.get(c, NAN) for c in clip_ids], "x--" if s == REAL else "o-",
                    color=colors[s], label=s, ms=4, lw=1)
        ax.axhline(gate, color="tab:red", ls="--", lw=1, label="gate")
        ax.set(title=title, ylabel=unit, ylim=ylim)
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xticks(range(len(clip_ids)), clip_ids, rotation=45, ha="right", fontsize=7)
    return _save(fig, out_dir / "eval_similarity.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _players(result: "EvalResult", ev: EvalSettings, out_dir: Path, files: list[Path]) -> list[str]:
    """One table row per reported clip: recording, vocoder, and free + timed synthesis of every system."""
    esc = html.escape

    def audio_tag(src: str | None, label: str) -> str:
        if not src or not Path(src).is_file():
            return ""
        files.append(Path(shutil.copyfile(src, out_dir / "audio" / f"{Path(src).parent.name}__{Path(src).name}")))
        return f"<div><small>{esc(label)}</small><br><audio controls preload='none' src='audio/{esc(files[-1].name)}'></audio></div>"

    by_key = {(r.system, r.clip_id): r for r in result.rows}
    rows = []
    for cid in list(dict.fromkeys(r.clip_id for r in result.rows))[: ev.report_clips]:
        real, voc = by_key[(REAL, cid)], by_key[(VOCODER, cid)]
        cells = [audio_tag(real.synthesis_path, f"recording (P.808 {fmt(real.p808_mos)})"),
                 audio_tag(voc.reconstruction_path, f"WORLD resynthesis (P.808 {fmt(voc.p808_mos)})")]
        for s in result.systems[2:]:
            row = by_key[(s, cid)]
            cells.append(audio_tag(row.synthesis_path, f"free synthesis (P.808 {fmt(row.p808_mos)})")
                         + audio_tag(row.reconstruction_path, "reference timing"))
        rows.append(f"<tr><td>{esc(cid)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return rows


def _metric_rows(result: "EvalResult", ev: EvalSettings) -> list[str]:
    agg, systems = result.aggregates, result.systems
    failed = {(g.system, g.metric) for g in result.failures}
    th = display_thresholds(ev, agg.get(REAL, {}))
    rows = []
    for metric in (m.format(base=ev.baseline_system) for m in TABLE_METRICS):
        cells = "".join(f"<td class='{'fail' if (s, metric) in failed else ''}'>{fmt(agg[s].get(metric), 3)}</td>"
                        for s in systems)
        rows.append(f"<tr><th>{html.escape(metric)}</th>{cells}<td>{fmt(th.get(metric), 3) if metric in th else ''}</td></tr>")
    return rows


def _clip_rows(result: "EvalResult") -> str:
    esc = html.escape
    return "".join(
        f"<tr class='{'bad' if r.bad else ''}'><td>{esc(r.clip_id)}</td><td>{esc(r.system)}</td><td>{fmt(r.pesq)}</td>"
        f"<td>{fmt(r.stoi)}</td><td>{fmt(r.wer)}</td><td>{esc(r.transcript or '')}</td><td>{fmt(r.asr_confidence)}</td>"
        f"<td>{fmt(r.speaker_similarity)}</td><td>{fmt(r.p808_mos)}</td><td>{fmt(r.ovrl_mos)}</td><td>{fmt(r.rtf, 3)}</td>"
        f"<td>{fmt(r.duration)} / {fmt(r.reference_duration)}</td><td>{esc('; '.join(r.bad_reasons + r.notes))}</td></tr>"
        for r in result.rows)


def render_eval_report(result: "EvalResult", out_dir: Path, settings: Settings | EvalSettings | None = None) -> list[Path]:
    """Write report.html, result.json, plots and audio of up to ``report_clips`` clips into ``out_dir``."""
    ev = eval_settings(settings) if settings is not None else EvalSettings(**result.thresholds)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "audio", ignore_errors=True)  # no stale players from an earlier run into this folder
    (out_dir / "audio").mkdir(parents=True)
    colors = _colors(result.systems, ev)
    files = [_plot_metrics(result, ev, out_dir, colors), _plot_per_clip(result, ev, out_dir, colors)]
    esc, models = html.escape, result.systems[2:]
    players = _players(result, ev, out_dir, files)
    head = "".join(f"<th>{esc({REAL: 'real (ASR floor)', VOCODER: 'vocoder ceiling'}.get(s, s))}</th>" for s in result.systems)
    verdict = "PASSED" if result.passed else "FAILED"
    gates = "".join(f"<li class='{'fail' if g.passed is False else ''}'>{esc(g.system)}: {esc(g.message)}</li>" for g in result.gates)
    n_clips = len({r.clip_id for r in result.rows})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation: {esc(ev.gated_system)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 6px}} .fail{{background:#fde8e8;color:#b3261e}} tr.bad{{background:#fff4e0}}
.passed{{color:#167a2c}} .failed{{color:#b3261e}} audio{{height:28px;width:220px}}</style></head><body>
<h1>Held-out evaluation <span class="{verdict.lower()}">{verdict}</span></h1>
<p>{n_clips} held-out clips; systems {esc(', '.join(models))}; gates judge <b>{esc(ev.gated_system)}</b>
against <b>{esc(ev.baseline_system)}</b>. PESQ/STOI score reconstruction with the reference timing; WER (Whisper),
similarity (GE2E), DNSMOS P.808/OVRL (automatic MOS, 1-5) and RTF score free synthesis. Read WER and P.808 against
the real recordings' (the instruments' own reading of real speech) and PESQ/STOI against the vocoder ceiling
(WORLD analysis &rarr; resynthesis of the real clip).</p>
<h2>Gates</h2><ul>{gates}</ul>
<h2>Metrics</h2><table><tr><th>metric</th>{head}<th>gate</th></tr>{''.join(_metric_rows(result, ev))}</table>
<img src="eval_metrics.png" alt="metrics per system with gate thresholds" style="max-width:100%">
<img src="eval_similarity.png" alt="speaker similarity and DNSMOS P.808 per clip" style="max-width:100%">
<h2>Listen</h2><table><tr><th>clip</th><th>reference</th><th>vocoder</th>{''.join(f'<th>{esc(s)}</th>' for s in models)}</tr>{''.join(players)}</table>
<h2>All clips</h2><table><tr><th>clip</th><th>system</th><th>PESQ</th><th>STOI</th><th>WER</th><th>Whisper transcript</th>
<th>ASR confidence</th><th>speaker sim</th><th>P.808</th><th>OVRL</th><th>RTF</th><th>dur / real s</th><th>flags and notes</th></tr>{_clip_rows(result)}</table>
</body></html>"""
    (out_dir / "report.html").write_text(page)
    files.append(out_dir / "report.html")
    result.files = list(dict.fromkeys(result.files + [str(f) for f in files]))
    files.append(write_result_json(result, out_dir))
    return files


def log_eval_to_mlflow(result: "EvalResult", out_dir: Path, settings: Settings, run_id: str) -> dict:
    """Log ``eval_<system>_<metric>`` metrics, thresholds and the report (as ``eval_report``) into an existing run."""
    import math

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval_{safe_name(system)}_{name}", float(value), now, 0)
               for system, agg in result.aggregates.items() for name, value in agg.items()
               if value is not None and math.isfinite(value)]
    metrics.append(Metric("eval_passed", float(result.passed), now, 0))
    existing = client.get_run(run_id).data.params
    params = [Param(f"eval.{k}", str(v)) for k, v in result.thresholds.items() if f"eval.{k}" not in existing]
    for start in range(0, max(len(metrics), len(params)), 100):  # log_batch caps metrics at 1000 and params at 100
        client.log_batch(run_id, metrics=metrics[start : start + 100], params=params[start : start + 100], tags=[])
    client.set_tag(run_id, "eval.passed", str(result.passed).lower())
    client.set_tag(run_id, "eval.failures", "; ".join(g.message for g in result.failures)[:5000] or "none")
    if result.production is not None:
        client.set_tag(run_id, "eval.production_version", result.production.version)
    # Every output of every clip (samples/) stays local; the report's audio/ holds the ones to listen to.
    for item in sorted(p for p in Path(out_dir).iterdir() if p.name != "samples"):
        if item.is_dir():
            client.log_artifacts(run_id, str(item), f"eval_report/{item.name}")
        else:
            client.log_artifact(run_id, str(item), "eval_report")
    log.info("evaluation logged to MLflow run %s (%d metrics)", run_id, len(metrics))
    return {"mlflow_run_id": run_id, "metrics": len(metrics), "passed": result.passed}
