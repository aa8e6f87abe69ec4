"""Voice quality on speakers never seen in pretraining, for each acoustic backend side by side.

Each held-out voice (flite-slt, festival-slt-hts, flite-rms) gives 75 s of recordings that go through
onboarding as a user's would (ingest → QC → features → fine-tuning → the platform's own evaluation with
the default gates). The table then scores every system on a larger test set: the voice's held-out
clips plus ``--test-sentences`` fixed everyday sentences the voice never read for onboarding (rendered
by the same engine: the "real recordings"), with the instruments users trust: Whisper tiny.en WER,
GE2E similarity, DNSMOS P.808 / OVRL, PESQ-wb / STOI on the recording's timing (end-to-end: durations
aligned to the recording by the model; two-stage: the reference rendering warped onto the recording by
DTW), RTF and onboarding seconds.

Targets (issue "Clones people can understand"), reported, not asserted: WER ≤ real + 0.10; similarity
≥ 0.80 and ≥ base + 0.15; DNSMOS P.808 ≥ real − 0.3; onboarding ≤ 15 min; RTF ≤ 0.05.

    .venv/bin/python benchmarks/voice_quality.py [--voices flite-slt,flite-rms] [--backends two_stage,end_to_end]
Prints a table and writes benchmarks/results/voice_quality.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from common import Bench

from voice_lib.core.config import Settings
from voice_lib.data.corpus import PRETRAIN_HOLDOUT, get_voice, load_sentences, make_voice_dataset



def prepare(voice: str, seconds: float, settings: Settings, work: Path) -> tuple[dict, float]:
    """Ingest → QC → features of a voice's dataset; the manifest and the seconds it took."""
    from voice_lib.pipelines import onboarding

    language = get_voice(voice).language
    data = make_voice_dataset(work / voice, voice, seconds, layout="metadata")
    started = time.perf_counter()
    dataset = onboarding.ingest(voice, str(data), settings.with_ingest_root(work))  # the benchmark's own folder
    for i in range(len(dataset["shards"])):
        onboarding.qc_shard(dataset, i, settings, language)
    qc = onboarding.qc_report(dataset, settings, language, log_to_mlflow=False)
    for i in range(len(dataset["shards"])):
        onboarding.features_shard(dataset, qc, i, len(dataset["shards"]), settings, language)
    manifest = onboarding.features_manifest(dataset, qc, settings)
    return {**manifest, "speech_seconds": qc["speech_seconds"]}, time.perf_counter() - started


def test_clips(voice: str, sentences: list[str], settings: Settings) -> list:
    """Held-out-style clips of sentences the voice did not read for onboarding, as QC would prepare them."""
    from voice_lib.data.audio import normalize_loudness, pcm_sha256
    from voice_lib.data.corpus import synthesize
    from voice_lib.data.datasets import feature_matrix
    from voice_lib.data.features import FeatureConfig, extract_clip_features
    from voice_lib.data.reference import trim_silence
    from voice_lib.eval.evaluation import HeldOutClip

    clips = []
    for i, text in enumerate(sentences):
        audio, _ = normalize_loudness(trim_silence(synthesize(text, voice, settings.sample_rate), settings.sample_rate),
                                      settings.sample_rate, settings.qc.target_lufs)
        language = get_voice(voice).language
        feats = extract_clip_features(audio, text, language, pcm_sha256(audio), FeatureConfig(sample_rate=settings.sample_rate))
        clips.append(HeldOutClip(f"test-{i:02d}", text, language, audio, feats.phoneme_ids, feature_matrix(feats)))
    return clips


def onboard(voice: str, backend: str, manifest: dict, t_prepare: float, sentences: list[str], settings: Settings,
            work: Path, steps: int | None = None, rank: int = 8) -> dict:
    from voice_lib.eval.evaluation import evaluate
    from voice_lib.eval.metrics import json_safe
    from voice_lib.infer.synthesizer import Synthesizer
    from voice_lib.pipelines.evaluation import evaluate_voice, held_out_clips
    from voice_lib.pipelines.training import finetune_voice
    from voice_lib.release.registration import GatesFailed, register_voice
    from voice_lib.train.finetune import fetch_voice_model

    started = time.perf_counter()
    trained = finetune_voice(voice, manifest["manifest_key"], settings, rank=rank, steps=steps, backend=backend)
    t_trained = time.perf_counter() - started + t_prepare
    platform = evaluate_voice(settings, trained)  # what onboarding decides, with the default gates
    try:
        registered = register_voice(settings, trained, platform).version
    except GatesFailed:
        registered = None  # tagged rejected in the registry, with the reasons
    t_registered = time.perf_counter() - started + t_prepare
    model_dir = fetch_voice_model(settings, trained)
    speaker = np.load(model_dir / "speaker_embedding.npy")
    base_dir = Path(trained.base_dir)
    systems = {"base": Synthesizer.load(base_dir, speaker, backend=backend, voice_dir=model_dir),
               "adapted": Synthesizer.load(base_dir, speaker, model_dir, backend=backend)}
    clips = held_out_clips(settings, trained) + test_clips(voice, sentences, settings)
    result = evaluate(systems, clips, speaker, settings, work / f"eval-{voice}-{backend}")
    return {
        "voice": voice, "backend": backend, "speech_seconds": manifest["speech_seconds"], "clips": manifest["clips"],
        "test_clips": len(clips), "steps_trained": trained.steps_trained, "source_voice": trained.extra.get("source_voice"),
        "seconds_to_trained": round(t_trained, 1), "seconds_to_candidate": round(t_registered, 1),
        "aggregates": json_safe(result.aggregates), "platform_gate_failures": platform.gate_failures,
        "registered_candidate": registered,
        "report": str(work / f"eval-{voice}-{backend}" / "report.html"),
    }


def fmt(value, digits: int = 3) -> str:
    return "  n/a" if value is None or value != value else f"{value:.{digits}f}"


COLUMNS = [("wer", "WER"), ("speaker_similarity", "sim"), ("p808_mos", "P.808"), ("ovrl_mos", "OVRL"),
           ("pesq", "PESQ"), ("stoi", "STOI"), ("rtf", "RTF")]


def print_table(results: list[dict]) -> None:
    print("\n| voice | system | " + " | ".join(h for _, h in COLUMNS) + " | onboarding s |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for voice in dict.fromkeys(r["voice"] for r in results):
        rows = [r for r in results if r["voice"] == voice]
        first = rows[0]["aggregates"]
        for label, agg in (("real", first.get("real", {})), ("vocoder ceiling", first.get("vocoder", {}))):
            print(f"| {voice} | {label} | " + " | ".join(fmt(agg.get(k)) for k, _ in COLUMNS) + " | |")
        for r in rows:
            for system in ("base", "adapted"):
                agg = r["aggregates"].get(system, {})
                wall = r["seconds_to_candidate"] if system == "adapted" else ""
                print(f"| {voice} | {r['backend']} {system} | " + " | ".join(fmt(agg.get(k)) for k, _ in COLUMNS) + f" | {wall} |")
    for r in results:
        gates = "PASS" if not r["platform_gate_failures"] else "; ".join(r["platform_gate_failures"])
        print(f"- {r['voice']} {r['backend']} (source {r['source_voice']}): default gates {gates}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--voices", default=",".join(PRETRAIN_HOLDOUT))
    parser.add_argument("--backends", default="two_stage,end_to_end")
    parser.add_argument("--seconds", type=float, default=75.0)
    parser.add_argument("--test-sentences", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "voice_quality.json")
    parser.add_argument("--train-steps", type=int, default=None, help="LoRA steps (default: the backend's, as onboarding)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--keep", action="store_true",
                        help="keep the working folder (the clones, their reports and audio) instead of deleting it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bench = Bench("voice-quality", keep=args.keep)  # a private MLflow: onboarding registers each clone, as it would for a user
    work = bench.home
    settings = Settings(home=work / "home", mlflow_tracking_uri=bench.start_mlflow())
    # Fixed everyday sentences from the end of the bundled list; make_voice_dataset draws the 75 s from
    # a seeded shuffle of all of them, so any it happens to share are dropped from the test set.
    results = []
    for voice in args.voices.split(","):
        manifest, t_prepare = prepare(voice, args.seconds, settings, work)
        read = {line.split("|", 1)[1] for line in (work / voice / "metadata.csv").read_text().splitlines() if "|" in line}
        # Mandarin voices (e.g. espeak-cmn-m3) get Mandarin sentences; tiny.en cannot score their WER (n/a).
        sentences = [s for s in load_sentences(get_voice(voice).language)[::-1] if s not in read][: args.test_sentences]
        for backend in args.backends.split(","):
            results.append(onboard(voice, backend, manifest, t_prepare, sentences, settings, work,
                                   steps=args.train_steps, rank=args.lora_rank))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results},
                                           indent=2, default=str))
    print_table(results)
    print(f"written {args.out}" + (f"; reports and clones kept in {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
