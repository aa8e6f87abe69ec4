"""Base pretraining: the multi-speaker corpus → the shared base model, tracked in MLflow.

Registration of the result as ``voice-base@production`` is the release layer's job
(``voice_lib.release.registration.register_base``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from voice_lib import __version__
from voice_lib.core.config import Settings
from voice_lib.core.hashing import sha256_file
from voice_lib.core.storage import artifact_store
from voice_lib.train.resume import CheckpointLedger, mirror_checkpoint, restore_checkpoint
from voice_lib.core.tracking import MlflowMetrics, start_run
from voice_lib.model.checkpoints import write_model_card

log = logging.getLogger(__name__)


def pretrain_base(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 3000, batch_size: int = 16,
                  log_to_mlflow: bool = True) -> dict:
    """Multi-speaker corpus → base model (safetensors + config + model card), MLflow-tracked."""
    from voice_lib.data.corpus import PRETRAIN_HOLDOUT
    from voice_lib.data.datasets import featurize_corpus, split_holdout
    from voice_lib.data.features import FeatureConfig
    from voice_lib.model.checkpoints import new_base_model, save_base
    from voice_lib.train.loop import TrainConfig, fit

    examples = featurize_corpus(corpus_dir, settings)
    speakers = sorted({e.clip_id.split("/")[0] for e in examples})
    leaked = sorted(set(speakers) & set(PRETRAIN_HOLDOUT))
    if leaked:
        raise ValueError(f"{corpus_dir}: the corpus contains held-out speakers {leaked}; build it from pretrain_voices().")
    train, val = split_holdout(examples, fraction=0.05, minimum=8)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, patience=8, eval_every=200, checkpoint_every=100)
    data_sha = hashlib.sha256((corpus_dir / "corpus.list").read_bytes()).hexdigest()
    # The step budget is left out of the key: re-running with more (or fewer) steps resumes the same run.
    recipe = {k: v for k, v in cfg.to_dict().items() if k != "steps"}
    key = hashlib.sha256(json.dumps([data_sha, recipe, __version__]).encode()).hexdigest()[:16]
    model = new_base_model(train)
    params = {"speakers": ",".join(speakers), "clips": len(examples), "parameters": model.n_params(),
              **{f"model.{k}": v for k, v in model.cfg.to_dict().items()}, **{f"train.{k}": v for k, v in cfg.to_dict().items()}}
    run_id = start_run(settings, "voice-base", f"pretrain-{key[:8]}", {"voiceops.key": f"pretrain-{key}", "voiceops.step": "pretrain"}, params) if log_to_mlflow else None
    metrics = MlflowMetrics(settings, run_id)
    log.info("pretraining on %d clips from %d speakers (%d held for validation), %d parameters", len(train), len(speakers), len(val), model.n_params())
    # Step checkpoints go to the store too, so a retry on another worker resumes instead of starting over.
    store, remote = artifact_store(settings), f"pretrain/checkpoints/{key}.pt"
    ledger = CheckpointLedger(settings, run_id)  # resume only from a checkpoint whose sha256 this run recorded
    local = restore_checkpoint(store, remote, settings.cache_dir / "checkpoints" / f"base-{key}.pt", ledger)
    result = fit(model, model, train, val, cfg, local, metrics,
                 on_checkpoint=lambda path, step: mirror_checkpoint(store, ledger, path, remote, step))
    metrics.flush()
    extra = {
        "feature_config": asdict(FeatureConfig(sample_rate=settings.sample_rate)),
        "training": cfg.to_dict(), "speakers": speakers, "held_out_speakers": list(PRETRAIN_HOLDOUT),
        "corpus_sha256": data_sha, "code_version": __version__, "best_val_loss": result.best_val_loss,
        "steps_trained": result.step, "resumed_from_step": result.resumed_from, "train_seconds": round(result.seconds, 1), "mlflow_run_id": run_id,
    }
    save_base(model, out_dir, extra)
    write_model_card(out_dir, "voice-base", extra)
    info = {"base_dir": str(out_dir), "base_sha256": sha256_file(out_dir / "model.safetensors"), "run_id": run_id, **extra}
    info["training_key"] = key
    return info
