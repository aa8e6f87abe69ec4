"""LoRA fine-tuning of one voice on the frozen base, resumable from checkpoints mirrored to the store."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from voice_lib import __version__
from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.handoffs import TrainedVoice
from voice_lib.core.hashing import sha256_file
from voice_lib.core.storage import artifact_store, download_prefix
from voice_lib.core.tracking import MlflowMetrics, start_run
from voice_lib.model.checkpoints import write_model_card
from voice_lib.train.resume import (
    CheckpointLedger,
    mirror_checkpoint,
    restore_checkpoint,
)

log = logging.getLogger(__name__)


def finetune_voice(voice_id: str, manifest_key: str, settings: Settings, base_dir: Path, rank: int = 8, steps: int = 600,
                   log_to_mlflow: bool = True) -> TrainedVoice:
    """LoRA-adapt the frozen base to one voice. Resumes from its checkpoint when retried."""
    from voice_lib.data.datasets import load_manifest, split_holdout, voice_examples
    from voice_lib.model.checkpoints import load_base, lora_model, trainable_parameters
    from voice_lib.train.loop import TrainConfig, fit

    validate_voice_id(voice_id)
    store = artifact_store(settings)
    manifest = load_manifest(settings, manifest_key)
    base_sha = sha256_file(base_dir / "model.safetensors")
    base_config = json.loads((base_dir / "config.json").read_text())
    examples = voice_examples(manifest, settings)
    rest, held_out = split_holdout(examples, 0.1, 3)
    train, val = split_holdout(rest, 0.1, 2, seed=1)
    cfg = TrainConfig(steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=20, eval_every=50, checkpoint_every=50, patience=4)
    key = hashlib.sha256(json.dumps([manifest["manifest_sha256"], base_sha, rank, cfg.to_dict(), __version__]).encode()).hexdigest()[:16]
    prefix = f"voices/{voice_id}/models/{key}"
    if store.exists(f"{prefix}/voice.json"):
        log.info("fine-tune: %s already trained (%s)", voice_id, key)
        return TrainedVoice.from_json(json.loads(store.read_bytes(f"{prefix}/voice.json")), f"{prefix}/voice.json")
    base = load_base(base_dir)
    model = lora_model(base, rank)
    lineage = {"base_model": "voice-base", "base_version": str(base_config.get("version", "shipped")), "base_sha256": base_sha,
               "data_sha256": manifest["data_sha256"], "manifest_sha256": manifest["manifest_sha256"],
               "code_version": __version__, "lora_rank": str(rank), "training_key": key, "backend": "end_to_end"}
    params = {**lineage, "clips_train": len(train), "clips_val": len(val), "clips_held_out": len(held_out),
              "adapter_parameters": trainable_parameters(model), **{f"train.{k}": v for k, v in cfg.to_dict().items()}}
    run_id = start_run(settings, f"voice-{voice_id}", f"train-{key[:8]}", {"voiceops.key": f"train-{key}", "voiceops.step": "train"}, params) if log_to_mlflow else None
    metrics = MlflowMetrics(settings, run_id)
    log.info("fine-tuning %s: %d train / %d validation / %d held-out clips, %d adapter parameters (rank %d)",
             voice_id, len(train), len(val), len(held_out), trainable_parameters(model), rank)
    local, remote = settings.cache_dir / "checkpoints" / f"{voice_id}-{key}.pt", f"voices/{voice_id}/checkpoints/{key}.pt"
    ledger = CheckpointLedger(settings, run_id)  # resume only from a checkpoint whose sha256 this run recorded
    result = fit(model, base, train, val, cfg, restore_checkpoint(store, remote, local, ledger), metrics,
                 on_checkpoint=lambda path, step: mirror_checkpoint(store, ledger, path, remote, step))
    metrics.flush()
    work = settings.cache_dir / "work" / voice_id / f"model-{key}"
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(work))  # adapter_model.safetensors + adapter_config.json
    np.save(work / "speaker_embedding.npy", np.load(io.BytesIO(store.read_bytes(manifest["speaker_embedding"]))))
    facts = {**lineage, "steps_trained": result.step, "best_val_loss": round(result.best_val_loss, 4),
             "stopped_early": result.stopped_early, "resumed_from_step": result.resumed_from,
             "train_seconds": round(result.seconds, 1), "adapter_parameters": trainable_parameters(model)}
    (work / "voice.json").write_text(json.dumps({"voice_id": voice_id, **facts, "held_out": [e.clip_id for e in held_out]}, indent=2))
    write_model_card(work, f"voice-{voice_id}", facts)
    for path in sorted(work.iterdir()):
        if path.name != "voice.json":
            store.upload_file(path, f"{prefix}/{path.name}")
    trained = TrainedVoice(voice_id=voice_id, training_key=key, model_prefix=prefix, manifest_key=manifest_key,
                           base_dir=str(base_dir), held_out=[e.clip_id for e in held_out], lineage=lineage, run_id=run_id,
                           **{k: v for k, v in facts.items() if k not in lineage}, extra=dict(lineage))
    store.write_bytes(f"{prefix}/voice.json", json.dumps(trained.to_json(), indent=2).encode())  # commit marker, last
    return trained


def fetch_voice_model(settings: Settings, trained: TrainedVoice) -> Path:
    """Local copy of a trained voice's adapter folder (from the artifact store)."""
    dest = settings.cache_dir / "models" / trained.voice_id / trained.training_key
    return download_prefix(artifact_store(settings), trained.model_prefix, dest)
