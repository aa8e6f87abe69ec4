"""Evaluation steps: a trained voice's held-out clips, base vs adapted with the gates, re-evaluation of a registered version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.core.handoffs import EvaluationSummary, TrainedVoice
from voice_lib.core.storage import artifact_store
from voice_lib.eval.gates import ProductionReference
from voice_lib.train.finetune import fetch_voice_model


def production_reference(settings: Settings, voice_id: str, evaluated: str | None = None) -> ProductionReference | None:
    """The voice's production version and its registered P.808 (gate-metric tag ``eval_<gated system>_p808_mos``),
    for the gate ``max_p808_drop_below_production``. None for a new voice, or when ``evaluated`` (the alias or
    version being re-evaluated) is the production version itself."""
    from voice_lib.release.registry import Registry

    production = Registry(settings).version_by_alias(f"voice-{voice_id}", "production")
    if production is None or str(evaluated) in ("production", production.version):
        return None
    tag = production.tags.get(f"eval_{settings.eval.gated_system}_p808_mos")
    return ProductionReference(production.version, float(tag) if tag not in (None, "") else None)


def _summary(result, out_dir: Path) -> EvaluationSummary:
    """The task result: strict JSON (NaN → null; Airflow's Execution API only takes strict JSON), with the gates
    as evaluated (callers read them here instead of checking again)."""
    from voice_lib.eval.metrics import json_safe

    return EvaluationSummary(aggregates=json_safe(result.aggregates), gate_failures=[g.message for g in result.failures],
                             gates=json_safe(result.to_json()["gates"]), passed=result.passed, report_dir=str(out_dir),
                             production_version=result.production.version if result.production else None)


def held_out_clips(settings: Settings, trained: TrainedVoice) -> list:
    """The voice's held-out recordings with their texts and features (never seen in training)."""
    from voice_lib.data.audio import decode_audio
    from voice_lib.data.datasets import load_manifest, voice_examples
    from voice_lib.eval.evaluation import HeldOutClip

    store = artifact_store(settings)
    manifest = load_manifest(settings, trained.manifest_key)
    entries = {c["clip_id"]: c for c in manifest["clips"]}
    examples = {e.clip_id: e for e in voice_examples(manifest, settings)}
    clips = []
    for clip_id in trained.held_out:
        entry = entries[clip_id]
        audio = decode_audio(store.read_bytes(entry["wav"]), settings.sample_rate, entry["wav"]).audio
        ex = examples[clip_id]
        clips.append(HeldOutClip(clip_id=clip_id, text=entry["text"], language=entry["language"], audio=audio,
                                 phoneme_ids=ex.phoneme_ids, features=ex.features))
    return clips


def evaluate_voice(settings: Settings, trained: TrainedVoice) -> EvaluationSummary:
    """Base vs adapted on the held-out clips; metrics and the HTML report go to the training run."""
    from voice_lib.eval.evaluation import evaluate
    from voice_lib.eval.metrics import json_safe
    from voice_lib.eval.report import log_eval_to_mlflow
    from voice_lib.infer.synthesizer import Synthesizer

    store = artifact_store(settings)
    marker = f"{trained.model_prefix}/evaluation.json"
    if store.exists(marker):
        return EvaluationSummary.from_json(json_safe(json.loads(store.read_bytes(marker))), marker)
    model_dir = fetch_voice_model(settings, trained)
    speaker = np.load(model_dir / "speaker_embedding.npy")
    base_dir, backend = Path(trained.base_dir), trained.backend
    systems = {
        "base": Synthesizer.load(base_dir, speaker, backend=backend, voice_dir=model_dir),
        "adapted": Synthesizer.load(base_dir, speaker, adapter_dir=model_dir, backend=backend),
    }
    out_dir = settings.cache_dir / "work" / trained.voice_id / f"eval-{trained.training_key}"
    shutil.rmtree(out_dir, ignore_errors=True)
    result = evaluate(systems, held_out_clips(settings, trained), speaker, settings, out_dir,
                      production=production_reference(settings, trained.voice_id))
    if trained.run_id:
        log_eval_to_mlflow(result, out_dir, settings, trained.run_id)
    summary = _summary(result, out_dir)
    for path in out_dir.rglob("*"):
        if path.is_file():
            store.upload_file(path, f"{trained.model_prefix}/eval_report/{path.relative_to(out_dir).as_posix()}")
    store.write_bytes(marker, json.dumps(summary.to_json(), indent=2, default=float).encode())
    return summary


def evaluate_registered(settings: Settings, voice_id: str, alias_or_version: str) -> EvaluationSummary:
    """Evaluate a registered version again (same held-out clips, same gates) without registering anything."""
    from voice_lib.eval.evaluation import evaluate
    from voice_lib.infer.synthesizer import Synthesizer
    from voice_lib.release.models import load_registered_voice

    adapted, meta = load_registered_voice(settings, voice_id, alias_or_version)
    speaker = np.load(Path(meta["voice_dir"]) / "speaker_embedding.npy")
    # A separate copy: peft injects LoRA into the adapted model's own modules.
    base = Synthesizer.load(Path(meta["resolved_base_dir"]), speaker, backend=meta.get("backend") or "end_to_end",
                            voice_dir=Path(meta["voice_dir"]))
    out_dir = settings.cache_dir / "work" / voice_id / f"eval-{alias_or_version}"
    shutil.rmtree(out_dir, ignore_errors=True)
    production = production_reference(settings, voice_id, alias_or_version)
    trained = TrainedVoice.from_json(meta, f"voice-{voice_id}@{alias_or_version}/voice.json")
    result = evaluate({"base": base, "adapted": adapted}, held_out_clips(settings, trained), speaker, settings, out_dir,
                      production=production)
    return _summary(result, out_dir)
