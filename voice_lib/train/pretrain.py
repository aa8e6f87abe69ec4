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
# The reference voices the shipped converter learns to convert from: two men (flite) and a woman (SVOX Pico), so a
# female target needs no octave-wide re-pitch of a male rendering (docs/model.md).
CONVERTER_SOURCES: tuple[str, ...] = ("flite-awb", "flite-kal16", "pico-en-us")
CONVERTER_CARD = ("VoiceOps two-stage backend, timbre stage (see voice_lib/model/converter.py): a reference synthesizer's "
                  "WORLD frames + a GE2E speaker embedding → the target speaker's envelope and aperiodicity; F0 mapped by "
                  "log-F0 statistics. CPU-trained; every number below was measured by the recipe.")


def corpus_examples(corpus_dir: Path, settings: Settings, config=None) -> tuple[list, list[str], str]:
    """Every clip of a pretraining corpus as examples, its speakers and the corpus hash. Refuses a corpus
    with a held-out speaker: cloning is measured on those, so they must stay unseen."""
    from voice_lib.data.corpus import PRETRAIN_HOLDOUT
    from voice_lib.data.datasets import featurize_corpus

    examples = featurize_corpus(corpus_dir, settings, config=config)
    speakers = sorted({e.clip_id.split("/")[0] for e in examples})
    leaked = sorted(set(speakers) & set(PRETRAIN_HOLDOUT))
    if leaked:
        raise ValueError(f"{corpus_dir}: the corpus contains held-out speakers {leaked}; build it from pretrain_voices().")
    return examples, speakers, hashlib.sha256((corpus_dir / "corpus.list").read_bytes()).hexdigest()


def training_run(settings: Settings, kind: str, data_sha: str, recipe: dict, params: dict, log_to_mlflow: bool
                 ) -> tuple[str, str | None]:
    """The content key of a pretraining (corpus, recipe without the step budget, code version: re-running
    with more steps resumes the same run) and its MLflow run, reused on retries."""
    key = hashlib.sha256(json.dumps([data_sha, recipe, __version__]).encode()).hexdigest()[:16]
    tags = {"voiceops.key": f"{kind}-{key}", "voiceops.step": kind}
    run_id = start_run(settings, "voice-base", f"{kind}-{key[:8]}", tags, params) if log_to_mlflow else None
    return key, run_id


def pretrain_base(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 3000, batch_size: int = 16,
                  log_to_mlflow: bool = True) -> dict:
    """Multi-speaker corpus → base model (safetensors + config + model card), MLflow-tracked."""
    from voice_lib.data.corpus import PRETRAIN_HOLDOUT
    from voice_lib.data.datasets import split_holdout
    from voice_lib.data.features import FeatureConfig
    from voice_lib.model.checkpoints import new_base_model, save_base
    from voice_lib.train.loop import TrainConfig, fit

    examples, speakers, data_sha = corpus_examples(corpus_dir, settings)
    train, val = split_holdout(examples, fraction=0.05, minimum=8)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, patience=8, eval_every=200, checkpoint_every=100)
    model = new_base_model(train)
    params = {"speakers": ",".join(speakers), "clips": len(examples), "parameters": model.n_params(),
              **{f"model.{k}": v for k, v in model.cfg.to_dict().items()}, **{f"train.{k}": v for k, v in cfg.to_dict().items()}}
    recipe = {k: v for k, v in cfg.to_dict().items() if k != "steps"}
    key, run_id = training_run(settings, "pretrain", data_sha, recipe, params, log_to_mlflow)
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
    return {"base_dir": str(out_dir), "base_sha256": sha256_file(out_dir / "model.safetensors"), "run_id": run_id,
            "training_key": key, **extra}


def parallel_pairs(examples: list, sources: list[str]) -> dict[int, list]:
    """Conversion pairs of a parallel corpus by sentence index: every source voice's clip of a sentence with
    every speaker's clip of it (the clip id's ``_NNNN`` suffix is the sentence's index in the stream)."""
    from voice_lib.train.convert import make_pair

    by_sentence: dict[int, dict[str, object]] = {}
    for e in examples:
        speaker, stem = e.clip_id.split("/", 1)
        by_sentence.setdefault(int(stem.rsplit("_", 1)[1]), {})[speaker] = e
    missing = sorted(set(sources) - {s for clips in by_sentence.values() for s in clips})
    if missing:
        raise ValueError(f"the corpus has no clips of the source voices {missing}: include them in the corpus")
    pairs: dict[int, list] = {}
    for index, clips in sorted(by_sentence.items()):
        for source in sources:
            if source in clips:
                pairs[index] = pairs.get(index, []) + [make_pair(clips[source].features, tgt.features, tgt.speaker)
                                                       for tgt in clips.values()]
    return pairs


def pretrain_converter(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 1200,
                       sources: tuple[str, ...] = CONVERTER_SOURCES, refine_at: int | None = None,
                       log_to_mlflow: bool = True) -> dict:
    """A parallel multi-speaker corpus (``voiceops corpus --pretrain --parallel``) → the two-stage backend's
    converter (safetensors + config + model card), MLflow-tracked and resumable."""
    from voice_lib.data.corpus import PRETRAIN_HOLDOUT
    from voice_lib.data.reference import TWO_STAGE_FEATURES, pitch_stats
    from voice_lib.model.checkpoints import save_converter
    from voice_lib.model.converter import ConverterConfig
    from voice_lib.train.convert import ConverterTask, fit_converter, new_converter
    from voice_lib.train.loop import TrainConfig

    examples, speakers, data_sha = corpus_examples(corpus_dir, settings, config=TWO_STAGE_FEATURES)
    by_sentence = parallel_pairs(examples, list(sources))
    held = set(sorted(by_sentence)[:: max(2, len(by_sentence) // max(1, round(len(by_sentence) * 0.05)))])
    train = [p for i, ps in by_sentence.items() if i not in held for p in ps]
    val = [p for i, ps in by_sentence.items() if i in held for p in ps]
    # The recipe measured in the two-stage experiment (docs/model.md): small batches of short crops, a high
    # rate, re-alignment half-way; one thread (two cores shared with the vocoder and the tests: measured faster).
    cfg = TrainConfig(steps=steps, batch_size=8, learning_rate=2e-3, warmup_steps=100, eval_every=200,
                      checkpoint_every=100, patience=10**6, threads=1)
    refine_at = steps // 2 if refine_at is None else refine_at
    model = new_converter(train, ConverterConfig(d_model=64, ffn_dim=256))
    params = {"speakers": ",".join(speakers), "sources": ",".join(sources), "pairs": len(train) + len(val),
              "parameters": model.n_params(), "refine_at": refine_at,
              **{f"model.{k}": v for k, v in model.cfg.to_dict().items()}, **{f"train.{k}": v for k, v in cfg.to_dict().items()}}
    recipe = {"backend": "two_stage", "sources": list(sources), "refine_at": refine_at, "model": model.cfg.to_dict(),
              **{k: v for k, v in cfg.to_dict().items() if k not in ("steps", "threads")}}
    key, run_id = training_run(settings, "pretrain-converter", data_sha, recipe, params, log_to_mlflow)
    metrics = MlflowMetrics(settings, run_id)
    log.info("pretraining the converter on %d pairs (%d for validation) from %d speakers, %d parameters",
             len(train), len(val), len(speakers), model.n_params())
    result = fit_converter(model, ConverterTask(train, val, batch_size=cfg.batch_size, crop_frames=160), cfg, settings.cache_dir / "checkpoints" / f"converter-{key}.pt",
                           refine_at=refine_at, on_metrics=metrics)
    metrics.flush()
    source_pitch = {s: pitch_stats([e.features for e in examples if e.clip_id.startswith(f"{s}/")]).to_dict() for s in sources}
    extra = {
        "feature_config": asdict(TWO_STAGE_FEATURES), "training": cfg.to_dict(), "refine_at": refine_at,
        "sources": list(sources), "source_pitch": source_pitch, "speakers": speakers,
        "held_out_speakers": list(PRETRAIN_HOLDOUT), "corpus_sha256": data_sha, "code_version": __version__,
        "best_val_loss": result.best_val_loss, "steps_trained": result.step, "train_seconds": round(result.seconds, 1),
        "mlflow_run_id": run_id,
    }
    save_converter(model, out_dir, extra)
    write_model_card(out_dir, "voice-base (two-stage converter)", extra, description=CONVERTER_CARD,
                     reproduce=["voiceops corpus .voiceops/converter-corpus --sentences 140 --pretrain --parallel",
                                f"voiceops pretrain .voiceops/converter-corpus --backend two-stage --steps {result.step}"])
    return {"base_dir": str(out_dir), "base_sha256": sha256_file(out_dir / "converter.safetensors"), "run_id": run_id,
            "training_key": key, **extra}
