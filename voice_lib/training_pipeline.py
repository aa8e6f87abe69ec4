"""Training steps as the DAGs and the CLI call them: pretrain the base, fine-tune a voice, evaluate it.

Each step writes its outputs to the artifact store and MLflow, keyed by what it was computed from
(``training_key``), and returns a small JSON-able dict for the next step.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from voice_lib import __version__
from voice_lib.config import Settings, validate_voice_id
from voice_lib.storage import artifact_store

log = logging.getLogger(__name__)
SHIPPED_BASE = Path(__file__).parent / "assets" / "base"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class MlflowMetrics:
    """Buffers per-step metrics and sends them to an MLflow run in batches (one HTTP call per flush)."""

    def __init__(self, settings: Settings, run_id: str | None):
        self.run_id = run_id
        self.client = None
        if run_id:
            from voice_lib.report import mlflow_client

            self.client = mlflow_client(settings)
        self.buffer: list = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if len(self.buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.client and self.buffer:
            for start in range(0, len(self.buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self.buffer[start:start + 1000])
            self.buffer = []


def start_run(settings: Settings, experiment: str, run_name: str, tags: dict[str, str], params: dict) -> str:
    """An MLflow run for this step, reused when a run with the same ``voiceops.key`` tag exists (retries)."""
    from mlflow.entities import Param

    from voice_lib.report import experiment_id, mlflow_client

    client = mlflow_client(settings)
    exp = experiment_id(client, experiment)
    found = client.search_runs([exp], filter_string=f"tags.`voiceops.key` = '{tags['voiceops.key']}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


# --- base pretraining -----------------------------------------------------------------------------

def pretrain_base(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 3000, batch_size: int = 16,
                  log_to_mlflow: bool = True, register: bool = True) -> dict:
    """Multi-speaker corpus → base model (safetensors + config + model card), MLflow-tracked."""
    from voice_lib.corpus import PRETRAIN_HOLDOUT
    from voice_lib.datasets import featurize_corpus, split_holdout
    from voice_lib.features import FeatureConfig
    from voice_lib.train import TrainConfig, fit, new_base_model, save_base

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
    result = fit(model, model, train, val, cfg, settings.cache_dir / "checkpoints" / f"base-{key}.pt", metrics)
    metrics.flush()
    extra = {
        "feature_config": asdict(FeatureConfig(sample_rate=settings.sample_rate)),
        "training": cfg.to_dict(), "speakers": speakers, "held_out_speakers": list(PRETRAIN_HOLDOUT),
        "corpus_sha256": data_sha, "code_version": __version__, "best_val_loss": result.best_val_loss,
        "steps_trained": result.step, "train_seconds": round(result.seconds, 1), "mlflow_run_id": run_id,
    }
    save_base(model, out_dir, extra)
    write_model_card(out_dir, "voice-base", extra)
    info = {"base_dir": str(out_dir), "base_sha256": sha256_file(out_dir / "model.safetensors"), "run_id": run_id, **extra}
    if run_id and register:
        from voice_lib.registry import Registry

        client = MlflowMetrics(settings, run_id).client
        client.log_artifacts(run_id, str(out_dir), "model")
        registry = Registry(settings)
        version = registry.register("voice-base", run_id, "model", {
            "training_key": key, "base_sha256": info["base_sha256"], "data_sha256": data_sha, "code_version": __version__,
        }, description="VoiceOps reference base model (multi-speaker, WORLD features).")
        registry.promote("voice-base", version.version)
        info["version"] = version.version
        client.set_terminated(run_id)
    return info


def write_model_card(out_dir: Path, name: str, facts: dict) -> None:
    lines = [f"# {name}", "", "VoiceOps reference acoustic model (see voice_lib/model.py): phonemes + GE2E speaker "
             "embedding → WORLD features → waveform. CPU-trained; every number below was measured by the recipe.", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items() if not isinstance(v, dict)]
    lines += ["", "## Reproduce", "", "```bash", "voiceops corpus .voiceops/pretrain-corpus --sentences 80 --pretrain",
              f"voiceops pretrain .voiceops/pretrain-corpus --steps {facts.get('steps_trained', 1200)}", "```"]
    (out_dir / "model_card.md").write_text("\n".join(lines) + "\n")


def base_model_dir(settings: Settings) -> Path:
    """The base the voices are fine-tuned on: the registry's voice-base@production, else the shipped one."""
    from voice_lib.registry import Registry, RegistryError

    try:
        registry = Registry(settings)
        if registry.version_by_alias("voice-base", "production") is not None:
            return registry.download("voice-base", "production", settings.cache_dir / "models" / "voice-base")
    except RegistryError as exc:
        log.info("no registered base model (%s); using the shipped one", exc)
    if not (SHIPPED_BASE / "model.safetensors").exists():
        raise FileNotFoundError(f"no base model: neither voice-base@production in MLflow nor {SHIPPED_BASE}; run `voiceops pretrain`.")
    return SHIPPED_BASE


# --- LoRA fine-tuning -----------------------------------------------------------------------------

def finetune_voice(voice_id: str, manifest_key: str, settings: Settings, rank: int = 8, steps: int = 600,
                   base_dir: Path | None = None, log_to_mlflow: bool = True) -> dict:
    """LoRA-adapt the frozen base to one voice. Resumes from its checkpoint when retried."""
    from voice_lib.datasets import load_manifest, split_holdout, voice_examples
    from voice_lib.train import TrainConfig, fit, load_base, lora_model, trainable_parameters

    validate_voice_id(voice_id)
    store = artifact_store(settings)
    manifest = load_manifest(settings, manifest_key)
    base_dir = base_dir or base_model_dir(settings)
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
        return json.loads(store.read_bytes(f"{prefix}/voice.json"))
    base = load_base(base_dir)
    model = lora_model(base, rank)
    lineage = {"base_model": "voice-base", "base_version": str(base_config.get("version", "shipped")), "base_sha256": base_sha,
               "data_sha256": manifest["data_sha256"], "manifest_sha256": manifest["manifest_sha256"],
               "code_version": __version__, "lora_rank": str(rank), "training_key": key}
    params = {**lineage, "clips_train": len(train), "clips_val": len(val), "clips_held_out": len(held_out),
              "adapter_parameters": trainable_parameters(model), **{f"train.{k}": v for k, v in cfg.to_dict().items()}}
    run_id = start_run(settings, f"voice-{voice_id}", f"train-{key[:8]}", {"voiceops.key": f"train-{key}", "voiceops.step": "train"}, params) if log_to_mlflow else None
    metrics = MlflowMetrics(settings, run_id)
    log.info("fine-tuning %s: %d train / %d validation / %d held-out clips, %d adapter parameters (rank %d)",
             voice_id, len(train), len(val), len(held_out), trainable_parameters(model), rank)
    local, remote = settings.cache_dir / "checkpoints" / f"{voice_id}-{key}.pt", f"voices/{voice_id}/checkpoints/{key}.pt"
    result = fit(model, base, train, val, cfg, restore_checkpoint(store, remote, local), metrics,
                 on_checkpoint=lambda path, step: mirror_checkpoint(store, path, remote, step))
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
    summary = {"voice_id": voice_id, "training_key": key, "model_prefix": prefix, "run_id": run_id, "lineage": lineage,
               "held_out": [e.clip_id for e in held_out], "manifest_key": manifest_key, "base_dir": str(base_dir), **facts}
    store.write_bytes(f"{prefix}/voice.json", json.dumps(summary, indent=2).encode())  # commit marker, last
    return summary


def restore_checkpoint(store, key: str, local: Path) -> Path:
    """The local checkpoint path, first fetched from the store when this machine has none: a retry of the
    train task may run on another worker than the one that died, and must resume all the same."""
    if not local.exists() and store.exists(key):
        store.download_to(key, local)
        log.info("fetched checkpoint %s from the artifact store to resume on this worker", key)
    return local


def mirror_checkpoint(store, path: Path, key: str, step: int) -> None:
    """Copy a step checkpoint to the artifact store (after the local atomic write). A failed copy does not stop
    training: the local checkpoint still serves a retry on this machine, and the next checkpoint tries again."""
    from voice_lib.storage import StorageError

    try:
        store.upload_file(path, key)
        log.info("checkpoint at step %d copied to %s", step, key)
    except (StorageError, OSError) as exc:
        log.warning("could not copy the step-%d checkpoint to the artifact store (%s); training goes on", step, exc)


def fetch_voice_model(settings: Settings, trained: dict) -> Path:
    """Local copy of a trained voice's adapter folder (from the artifact store)."""
    store = artifact_store(settings)
    dest = settings.cache_dir / "models" / trained["voice_id"] / trained["training_key"]
    for key in store.list(trained["model_prefix"]):
        target = dest / key.rsplit("/", 1)[-1]
        if not target.exists():
            store.download_to(key, target)
    return dest


# --- evaluation and registration ------------------------------------------------------------------

class GatesFailed(RuntimeError):
    """The adapted voice missed one or more evaluation gates; the message names each metric."""

    def __init__(self, voice_id: str, version: str, failures: list[str]):
        self.voice_id, self.version, self.failures = voice_id, version, failures
        super().__init__(f"voice-{voice_id} version {version} rejected by the evaluation gates:\n- " + "\n- ".join(failures))


def held_out_clips(settings: Settings, trained: dict) -> list:
    """The voice's held-out recordings with their texts and features (never seen in training)."""
    from voice_lib.audio import decode_audio
    from voice_lib.datasets import load_manifest, voice_examples
    from voice_lib.evaluation import HeldOutClip

    store = artifact_store(settings)
    manifest = load_manifest(settings, trained["manifest_key"])
    entries = {c["clip_id"]: c for c in manifest["clips"]}
    examples = {e.clip_id: e for e in voice_examples(manifest, settings)}
    clips = []
    for clip_id in trained["held_out"]:
        entry = entries[clip_id]
        audio = decode_audio(store.read_bytes(entry["wav"]), settings.sample_rate, entry["wav"]).audio
        ex = examples[clip_id]
        clips.append(HeldOutClip(clip_id=clip_id, text=entry["text"], language=entry["language"], audio=audio,
                                 phoneme_ids=ex.phoneme_ids, features=ex.features))
    return clips


def evaluate_voice(settings: Settings, trained: dict) -> dict:
    """Base vs adapted on the held-out clips; metrics and the HTML report go to the training run."""
    from voice_lib.evaluation import check_gates, evaluate, json_safe, log_eval_to_mlflow
    from voice_lib.inference import Synthesizer

    store = artifact_store(settings)
    marker = f"{trained['model_prefix']}/evaluation.json"
    if store.exists(marker):
        return json_safe(json.loads(store.read_bytes(marker)))
    model_dir = fetch_voice_model(settings, trained)
    speaker = np.load(model_dir / "speaker_embedding.npy")
    base_dir = Path(trained["base_dir"])
    systems = {
        "base": Synthesizer.load(base_dir, speaker),
        "adapted": Synthesizer.load(base_dir, speaker, adapter_dir=model_dir),
    }
    out_dir = settings.cache_dir / "work" / trained["voice_id"] / f"eval-{trained['training_key']}"
    shutil.rmtree(out_dir, ignore_errors=True)
    result = evaluate(systems, held_out_clips(settings, trained), speaker, settings, out_dir)
    failures = [str(f) for f in check_gates(result.aggregates, settings)]
    if trained.get("run_id"):
        log_eval_to_mlflow(result, out_dir, settings, trained["run_id"])
    # NaN (metrics that don't apply, e.g. PESQ of the real recordings) becomes null: the summary is a task's
    # return value, and Airflow's Execution API only takes strict JSON.
    summary = {"aggregates": json_safe(result.aggregates), "gate_failures": failures, "passed": not failures,
               "report_dir": str(out_dir)}
    for path in out_dir.rglob("*"):
        if path.is_file():
            store.upload_file(path, f"{trained['model_prefix']}/eval_report/{path.relative_to(out_dir).as_posix()}")
    store.write_bytes(marker, json.dumps(summary, indent=2, default=float).encode())
    return summary


def gate_metric_tags(aggregates: dict) -> dict[str, str]:
    """Flatten {system: {metric: value}} into version tags like eval_adapted_speaker_similarity."""
    tags = {}
    for system, metrics in aggregates.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and value == value:  # skip NaN
                tags[f"eval_{system}_{metric}"] = f"{float(value):.4f}"
    return tags


def register_voice(settings: Settings, trained: dict, evaluation: dict) -> dict:
    """Register the version; alias `candidate` when the gates passed, else tag it rejected and fail."""
    from voice_lib.registry import Registry

    voice_id = trained["voice_id"]
    name = f"voice-{voice_id}"
    registry = Registry(settings)
    if trained.get("run_id"):
        model_dir = fetch_voice_model(settings, trained)
        from voice_lib.report import mlflow_client

        client = mlflow_client(settings)
        client.log_artifacts(trained["run_id"], str(model_dir), "voice")
        verify_logged_folder(client, trained["run_id"], "voice", model_dir)
    tags = {**trained["lineage"], **gate_metric_tags(evaluation["aggregates"])}
    version = registry.register(name, trained["run_id"], "voice", tags,
                                description=f"LoRA rank {trained['lineage']['lora_rank']} on {trained['lineage']['base_model']}")
    if evaluation["passed"]:
        registry.mark_candidate(name, version.version)
        log.info("%s version %s passed every gate: alias candidate", name, version.version)
        return {"name": name, "version": version.version, "alias": "candidate"}
    registry.reject(name, version.version, evaluation["gate_failures"])
    raise GatesFailed(voice_id, version.version, evaluation["gate_failures"])


def verify_logged_folder(client, run_id: str, artifact_path: str, folder: Path) -> None:
    """Refuse to register from an incomplete upload: every local file must be in the run with its exact size.

    An artifact store that failed half-way (S3 down) must never leave a registered version that cannot load.
    """
    logged = {a.path.rsplit("/", 1)[-1]: a.file_size for a in client.list_artifacts(run_id, artifact_path) if not a.is_dir}
    wrong = [f"{p.name} ({'missing' if p.name not in logged else f'{logged[p.name]} of {p.stat().st_size} bytes'})"
             for p in sorted(folder.iterdir()) if p.is_file() and logged.get(p.name) != p.stat().st_size]
    if wrong:
        raise RuntimeError(f"run {run_id} artifacts under {artifact_path!r} are incomplete: {', '.join(wrong)}; "
                           "nothing was registered. Retry the task once the artifact store is reachable.")


def evaluate_registered(settings: Settings, voice_id: str, alias_or_version: str) -> dict:
    """Evaluate a registered version again (same held-out clips, same gates) without registering anything."""
    from voice_lib.evaluation import check_gates, evaluate, json_safe
    from voice_lib.inference import Synthesizer, load_registered_voice

    adapted, meta = load_registered_voice(settings, voice_id, alias_or_version)
    speaker = adapted.speaker[0].numpy()
    # A separate copy: peft injects LoRA into the adapted model's own modules.
    base = Synthesizer.load(Path(meta["resolved_base_dir"]), speaker)
    out_dir = settings.cache_dir / "work" / voice_id / f"eval-{alias_or_version}"
    shutil.rmtree(out_dir, ignore_errors=True)
    result = evaluate({"base": base, "adapted": adapted}, held_out_clips(settings, meta), speaker, settings, out_dir)
    failures = [str(f) for f in check_gates(result.aggregates, settings)]
    return {"aggregates": json_safe(result.aggregates), "gate_failures": failures, "passed": not failures, "report_dir": str(out_dir)}
