"""Training steps as the DAGs and the CLI call them: pretrain and register the base, fine-tune a voice.

Each step writes its outputs to the artifact store and MLflow, keyed by what it was computed from
(``training_key``), and returns a small JSON-able dict for the next step. The base a voice is tuned on
is resolved here (the registry's ``voice-base@production``, else the shipped one), above the training layer.
"""

from __future__ import annotations

from pathlib import Path

from voice_lib.core.config import Settings


def pretrain_and_register(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 3000, batch_size: int = 16,
             log_to_mlflow: bool = True, register: bool = True) -> dict:
    """Pretrain the base on a corpus; with a tracked run, register it as ``voice-base@production``."""
    from voice_lib.release.registration import register_base
    from voice_lib.train.pretrain import pretrain_base

    info = pretrain_base(corpus_dir, settings, out_dir, steps=steps, batch_size=batch_size, log_to_mlflow=log_to_mlflow)
    return register_base(settings, info) if info["run_id"] and register else info


def finetune_voice(voice_id: str, manifest_key: str, settings: Settings, rank: int = 8, steps: int = 600,
                   base_dir: Path | None = None, log_to_mlflow: bool = True) -> dict:
    """LoRA-adapt the base (given, or resolved from the registry) to one voice; resumes when retried."""
    from voice_lib.release.models import base_model_dir
    from voice_lib.train import finetune

    return finetune.finetune_voice(voice_id, manifest_key, settings, base_dir or base_model_dir(settings), rank=rank,
                                   steps=steps, log_to_mlflow=log_to_mlflow)
