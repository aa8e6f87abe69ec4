"""Reports people read: plots, tables and audio players, written as HTML and logged to MLflow."""

from __future__ import annotations

import html
import json
import logging
import shutil
from pathlib import Path

from voice_lib.core.config import Settings
from voice_lib.core.tracking import experiment_id, mlflow_client
from voice_lib.data.qc import QCReport

log = logging.getLogger(__name__)


def _plot_qc(report: QCReport, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    th = report.thresholds
    colors = ["tab:green" if c.status == "accepted" else "tab:red" for c in report.clips]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist([c.duration for c in report.clips], bins=20, color="tab:blue")
    axes[0].axvline(th.get("min_clip_seconds", 0.6), color="k", ls="--")
    axes[0].axvline(th.get("max_clip_seconds", 15), color="k", ls="--")
    axes[0].set(title="Clip durations", xlabel="seconds", ylabel="clips")
    axes[1].hist([c.snr_db for c in report.clips], bins=20, color="tab:purple")
    axes[1].axvline(th.get("reject_snr_db", 5), color="tab:red", ls="--", label="reject")
    axes[1].axvline(th.get("min_snr_db", 15), color="tab:orange", ls="--", label="denoise below")
    axes[1].set(title="Estimated SNR", xlabel="dB")
    axes[1].legend()
    sims = [c.speaker_similarity if c.speaker_similarity is not None else 0 for c in report.clips]
    axes[2].scatter(range(len(sims)), sims, c=colors, s=14)
    axes[2].axhline(th.get("min_speaker_similarity", 0.7), color="tab:red", ls="--", label="threshold")
    axes[2].set(title="Speaker similarity to the voice", xlabel="clip", ylabel="GE2E cosine", ylim=(0, 1.02))
    axes[2].legend(loc="lower left")
    fig.suptitle(f"{report.voice_id}: {'PASSED' if report.passed else 'REJECTED'} - {report.speech_seconds:.0f} s of usable speech")
    fig.tight_layout()
    paths.append(out_dir / "qc_overview.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def render_qc_report(report: QCReport, clip_dir: Path, out_dir: Path, worst: int = 8) -> list[Path]:
    """Write report.json, report.html, plots and the worst clips' audio into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(exist_ok=True)
    files = [out_dir / "report.json"]
    files[0].write_text(json.dumps(report.to_json(), indent=2, default=str))
    files += _plot_qc(report, out_dir)

    def badness(c) -> float:  # rejected first, then low similarity, then low SNR
        return (c.status == "rejected") * 10 + (1 - (c.speaker_similarity or 0)) * 3 + max(0.0, 30 - c.snr_db) / 30

    worst_clips = sorted(report.clips, key=badness, reverse=True)[:worst]
    # The transcript review links to each of its clips' audio here (voice_lib/pipelines/review.py).
    for c in worst_clips + [c for c in report.to_review if c not in worst_clips]:
        src = clip_dir / f"{c.clip_id}.wav"
        if src.exists():
            shutil.copyfile(src, out_dir / "audio" / src.name)
            files.append(out_dir / "audio" / src.name)

    esc = html.escape
    verdict = "PASSED" if report.passed else "REJECTED"
    rows = "".join(
        f"<tr class='{c.status}'><td>{esc(c.file)}</td><td>{c.start:.1f}-{c.end:.1f}</td><td>{c.duration:.2f}</td>"
        f"<td>{c.snr_db:.1f}</td><td>{'yes' if c.clipped else ''}</td><td>{'' if c.speaker_similarity is None else f'{c.speaker_similarity:.2f}'}</td>"
        f"<td>{'' if c.phones_per_second is None else c.phones_per_second}</td><td>{esc(c.text or '')}"
        f"{' <em>(ASR)</em>' if c.text_source == 'auto_transcribed' else ''}</td><td>{c.status}</td><td>{esc('; '.join(c.reasons))}</td></tr>"
        for c in report.clips
    )
    review = "".join(
        f"<figure id='{esc(c.clip_id)}'><figcaption><code>{esc(c.clip_id)}</code> {esc(c.text or '')} "
        f"({'Whisper label' if c.review == 'auto_transcribed' else 'aligned with low confidence: held'}"
        f"{'' if c.asr_logprob is None else f', log-prob {c.asr_logprob:.2f}'})</figcaption>"
        f"<audio controls preload='none' src='audio/{esc(c.clip_id)}.wav'></audio></figure>"
        for c in report.to_review
    )
    players = "".join(
        f"<figure><figcaption>{esc(c.file)} [{c.start:.1f}-{c.end:.1f} s] - {c.status}"
        f"{': ' + esc(c.reasons[0]) if c.reasons else ''}</figcaption>"
        f"<audio controls preload='none' src='audio/{esc(c.clip_id)}.wav'></audio></figure>"
        for c in worst_clips
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>QC report: {esc(report.voice_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} tr.rejected{{background:#fde8e8}} .passed{{color:#167a2c}} .rejected{{color:#b3261e}}</style>
</head><body>
<h1>QC report: {esc(report.voice_id)} <span class="{verdict.lower()}">{verdict}</span></h1>
<p>{report.speech_seconds:.1f} s of usable speech (minimum {report.min_speech_seconds:g} s);
{len(report.accepted)} of {len(report.clips)} clips accepted. Data sha256 <code>{esc(report.data_sha256[:16])}</code>.</p>
{"<h2>Why it was rejected</h2><ul>" + "".join(f"<li>{esc(r)}</li>" for r in report.reasons) + "</ul>" if report.reasons else ""}
{"<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in report.warnings) + "</ul>" if report.warnings else ""}
<img src="qc_overview.png" alt="durations, SNR and speaker similarity" style="max-width:100%">
{"<h2>Clips to review</h2><p>Their texts wait for the transcript review (Airflow: Required Actions).</p>" + review if review else ""}
<h2>Worst clips</h2>{players}
<h2>All clips</h2><table><tr><th>file</th><th>span s</th><th>dur s</th><th>SNR dB</th><th>clipped</th><th>speaker sim</th><th>phones/s</th><th>text</th><th>status</th><th>reasons</th></tr>{rows}</table>
</body></html>"""
    (out_dir / "report.html").write_text(page)
    files.append(out_dir / "report.html")
    return files






def log_qc_report(report: QCReport, report_dir: Path, settings: Settings) -> dict:
    """Log the QC report as an MLflow run in the voice's experiment (reused on retry)."""
    import time

    from mlflow.entities import Metric, Param

    client = mlflow_client(settings)
    exp_id = experiment_id(client, f"voice-{report.voice_id}")
    run_name = f"qc-{report.data_sha256[:12]}"
    found = client.search_runs([exp_id], filter_string=f"tags.`voiceops.step` = 'qc' and tags.`voiceops.data_sha256` = '{report.data_sha256}'", max_results=1)
    run = found[0] if found else client.create_run(
        exp_id, run_name=run_name,
        tags={"voiceops.step": "qc", "voiceops.data_sha256": report.data_sha256, "voiceops.voice_id": report.voice_id},
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    accepted = report.accepted
    metrics = {
        "speech_seconds": report.speech_seconds,
        "clips_total": len(report.clips),
        "clips_accepted": len(accepted),
        "clips_rejected": len(report.clips) - len(accepted),
        "passed": float(report.passed),
    }
    if accepted:
        metrics["snr_db_mean"] = sum(c.snr_db for c in accepted) / len(accepted)
        sims = [c.speaker_similarity for c in accepted if c.speaker_similarity is not None]
        if sims:
            metrics["speaker_similarity_min"] = min(sims)
    params = {f"qc.{k}": str(v) for k, v in report.thresholds.items()} | {"voice_id": report.voice_id, "language": report.language}
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()] if not found else [],
        tags=[],
    )
    client.set_tag(run_id, "qc.passed", str(report.passed).lower())
    client.log_artifacts(run_id, str(report_dir), "qc_report")
    client.set_terminated(run_id)
    url = f"{settings.mlflow_tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    log.info("QC report logged to MLflow: %s", url)
    return {"mlflow_run_id": run_id, "mlflow_run_url": url}
