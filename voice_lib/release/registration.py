"""Registration: a trained, evaluated voice becomes a registry version (candidate or rejected); the base becomes voice-base@production."""

from __future__ import annotations

import logging
import math

from voice_lib.core.config import Settings
from voice_lib.core.handoffs import EvaluationSummary, RegisteredVoice, TrainedVoice
from voice_lib.core.tracking import mlflow_client, verify_logged_folder
from voice_lib.release.registry import Registry
from voice_lib.train.finetune import fetch_voice_model

log = logging.getLogger(__name__)


class GatesFailed(RuntimeError):
    """The adapted voice missed one or more evaluation gates; the message names each metric."""

    def __init__(self, voice_id: str, version: str, failures: list[str]):
        self.voice_id, self.version, self.failures = voice_id, version, failures
        super().__init__(f"voice-{voice_id} version {version} rejected by the evaluation gates:\n- " + "\n- ".join(failures))


def gate_metric_tags(aggregates: dict) -> dict[str, str]:
    """Flatten {system: {metric: value}} into version tags like eval_adapted_speaker_similarity."""
    tags = {}
    for system, metrics in aggregates.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not math.isnan(value):
                tags[f"eval_{system}_{metric}"] = f"{float(value):.4f}"
    return tags


def report_tags(trained: TrainedVoice) -> dict[str, str]:
    """Where the version's QC report lives in the store (``qc_prefix``; the manifest is ``<qc_prefix>/features-*/``),
    for the release page's link. The evaluation report is the run's ``eval_report/`` artifact folder."""
    prefix, sep, _ = trained.manifest_key.rpartition("/features-")
    return {"qc_prefix": prefix} if sep else {}


def register_voice(settings: Settings, trained: TrainedVoice, evaluation: EvaluationSummary) -> RegisteredVoice:
    """Register the version; alias `candidate` when the gates passed, else tag it rejected and fail."""
    name = f"voice-{trained.voice_id}"
    registry = Registry(settings)
    if trained.run_id:
        model_dir = fetch_voice_model(settings, trained)
        client = mlflow_client(settings)
        client.log_artifacts(trained.run_id, str(model_dir), "voice")
        verify_logged_folder(client, trained.run_id, "voice", model_dir)
    tags = {**trained.lineage, **gate_metric_tags(evaluation.aggregates), **report_tags(trained)}
    version = registry.register(name, trained.run_id, "voice", tags,
                                description=f"LoRA rank {trained.lineage['lora_rank']} on {trained.lineage['base_model']}")
    if evaluation.passed:
        registry.mark_candidate(name, version.version)
        log.info("%s version %s passed every gate: alias candidate", name, version.version)
        return RegisteredVoice(name=name, version=version.version, alias="candidate")
    registry.reject(name, version.version, evaluation.gate_failures)
    raise GatesFailed(trained.voice_id, version.version, evaluation.gate_failures)


def register_base(settings: Settings, info: dict) -> dict:
    """Log a pretrained base (``pretrain_base``'s result) to its run and make it ``voice-base@production``."""
    run_id, out_dir = info["run_id"], info["base_dir"]
    client = mlflow_client(settings)
    client.log_artifacts(run_id, str(out_dir), "model")
    registry = Registry(settings)
    version = registry.register("voice-base", run_id, "model", {
        "training_key": info["training_key"], "base_sha256": info["base_sha256"], "data_sha256": info["corpus_sha256"],
        "code_version": info["code_version"],
    }, description="VoiceOps reference base model (multi-speaker, WORLD features).")
    registry.promote("voice-base", version.version)
    client.set_terminated(run_id)
    return {**info, "version": version.version}
