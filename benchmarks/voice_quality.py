"""Voice quality on speakers never seen in pretraining: onboard each held-out voice from 60-90 s of
recordings (QC → features → LoRA → evaluation) and report base vs adapted side by side.

Targets (issue "Onboarding II"): similarity adapted ≥ 0.80 and ≥ base + 0.15; WER within 5 points of
the ASR's WER on the real recordings; PESQ-wb ≥ 3.0 and STOI ≥ 0.90 or within 0.3 of the vocoder
ceiling; onboarding wall time ≤ 15 min; RTF ≤ 0.1. They are goals to report, not asserted.

    .venv/bin/python benchmarks/voice_quality.py [--voices flite-slt,flite-rms] [--seconds 75] [--steps 600]
Prints a table and writes benchmarks/results/voice_quality.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from voice_lib.core.config import Settings
from voice_lib.data.corpus import PRETRAIN_HOLDOUT, make_voice_dataset


def onboard(voice: str, seconds: float, steps: int, settings: Settings, work: Path) -> dict:
    from voice_lib.pipelines import onboarding
    from voice_lib.pipelines.evaluation import evaluate_voice
    from voice_lib.pipelines.training import finetune_voice

    data = make_voice_dataset(work / voice, voice, seconds, layout="metadata")
    started = time.perf_counter()
    dataset = onboarding.ingest(voice, str(data), settings)
    for i in range(len(dataset["shards"])):
        onboarding.qc_shard(dataset, i, settings)
    qc = onboarding.qc_report(dataset, settings, log_to_mlflow=False)
    for i in range(len(dataset["shards"])):
        onboarding.features_shard(dataset, qc, i, len(dataset["shards"]), settings)
    manifest = onboarding.features_manifest(dataset, qc, settings)
    t_features = time.perf_counter() - started
    trained = finetune_voice(voice, manifest["manifest_key"], settings, steps=steps, log_to_mlflow=False)
    t_trained = time.perf_counter() - started
    evaluation = evaluate_voice(settings, trained)
    return {
        "voice": voice, "speech_seconds": qc["speech_seconds"], "clips": manifest["clips"],
        "steps_trained": trained.steps_trained, "stopped_early": trained.stopped_early,
        "adapter_parameters": trained.adapter_parameters,
        "seconds_to_features": round(t_features, 1), "seconds_to_trained": round(t_trained, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
        "aggregates": evaluation.aggregates, "gate_failures": evaluation.gate_failures,
        "report": evaluation.report_dir + "/report.html",
    }


def fmt(value) -> str:
    return "   n/a" if value is None or value != value else f"{value:6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--voices", default=",".join(v for v in PRETRAIN_HOLDOUT))
    parser.add_argument("--seconds", type=float, default=75.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "voice_quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="voice-quality-"))
    settings = Settings(home=work / "home")
    results = [onboard(v, args.seconds, args.steps, settings, work) for v in args.voices.split(",")]
    print(f"\n{'voice':18} {'sys':8} {'sim':>6} {'gain':>6} {'WER':>6} {'WERreal':>7} {'PESQ':>6} {'STOI':>6} {'RTF':>6}  wall s")
    for r in results:
        agg = r["aggregates"]
        real = agg.get("real", {})
        for system in ("vocoder", "base", "adapted"):
            m = agg.get(system, {})
            print(f"{r['voice']:18} {system:8} {fmt(m.get('speaker_similarity'))} {fmt(m.get('similarity_gain_over_base'))} "
                  f"{fmt(m.get('wer'))} {fmt(real.get('wer')):>7} {fmt(m.get('pesq'))} {fmt(m.get('stoi'))} {fmt(m.get('rtf'))}  "
                  f"{r['seconds_total'] if system == 'adapted' else ''}")
        print(f"{'':18} gates: {'PASS' if not r['gate_failures'] else '; '.join(r['gate_failures'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2, default=str))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
