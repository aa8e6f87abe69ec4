"""Training steps as the DAGs and the CLI call them: pretrain and register the base, fine-tune a voice.

Each step writes its outputs to the artifact store and MLflow, keyed by what it was computed from
(``training_key``), and returns a small JSON-able dict for the next step. The base a voice is tuned on
is resolved here (the registry's ``voice-base@production``, else the shipped one), above the training layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from voice_lib import __version__
from voice_lib.core.config import Settings
from voice_lib.core.handoffs import TrainedVoice
from voice_lib.core.storage import artifact_store, download_prefix, upload_folder

log = logging.getLogger(__name__)
CORPUS_MARKER = "corpus.list"  # written last by generate_corpus and uploaded last: the corpus is complete


def build_pretrain_corpus(settings: Settings, sentences_per_voice: int, language: str = "en") -> dict:
    """Render the pretraining corpus and put it in the artifact store, where any worker's pretrain step finds it.

    Keyed by what it is rendered from; a retry or re-run finds the committed corpus and renders nothing.
    """
    from voice_lib.data.corpus import generate_corpus, pretrain_voices

    voices = pretrain_voices(language)
    key = hashlib.sha256(json.dumps([voices, sentences_per_voice, language, settings.sample_rate, __version__]).encode()).hexdigest()[:16]
    prefix, store = f"pretrain/corpora/{key}", artifact_store(settings)
    if not store.exists(f"{prefix}/{CORPUS_MARKER}"):
        local = settings.cache_dir / "corpora" / key
        generate_corpus(local, voices, sentences_per_voice, language, settings.sample_rate, progress=False)
        keys = upload_folder(store, local, prefix, marker=CORPUS_MARKER)
        log.info("pretraining corpus: %d files to %s/%s", len(keys), store.uri, prefix)
    else:
        log.info("pretraining corpus %s already in the store", prefix)
    return {"corpus_prefix": prefix, "speakers": voices, "sentences_per_voice": sentences_per_voice}


def pretrain_from_store(corpus_prefix: str, settings: Settings, out_dir: Path, steps: int = 3000,
                        batch_size: int = 16, log_to_mlflow: bool = True) -> dict:
    """``pretrain_and_register`` on a corpus from the store (``build_pretrain_corpus``), fetched to this worker."""
    store = artifact_store(settings)
    if not store.exists(f"{corpus_prefix}/{CORPUS_MARKER}"):
        raise FileNotFoundError(f"{store.uri}/{corpus_prefix} holds no complete corpus (no {CORPUS_MARKER}); "
                                "run the build_corpus step first.")
    local = download_prefix(store, corpus_prefix, settings.cache_dir / "corpora" / corpus_prefix.rsplit("/", 1)[-1])
    return pretrain_and_register(local, settings, out_dir, steps=steps, batch_size=batch_size, log_to_mlflow=log_to_mlflow)


def pretrain_and_register(corpus_dir: Path, settings: Settings, out_dir: Path, steps: int = 3000, batch_size: int = 16,
             log_to_mlflow: bool = True, register: bool = True) -> dict:
    """Pretrain the base on a corpus; with a tracked run, register it as ``voice-base@production``."""
    from voice_lib.release.registration import register_base
    from voice_lib.train.pretrain import pretrain_base

    info = pretrain_base(corpus_dir, settings, out_dir, steps=steps, batch_size=batch_size, log_to_mlflow=log_to_mlflow)
    return register_base(settings, info) if info["run_id"] and register else info


DEFAULT_STEPS = {"two_stage": 400, "end_to_end": 600}  # measured: 800 two-stage steps cost 0.02-0.06 WER


def finetune_voice(voice_id: str, manifest_key: str, settings: Settings, rank: int = 8, steps: int | None = None,
                   base_dir: Path | None = None, log_to_mlflow: bool = True, backend: str | None = None) -> TrainedVoice:
    """LoRA-adapt the base of ``backend`` (default ``model.backend``; the base given, or resolved) to one
    voice, for ``steps`` (default: the backend's); resumes when retried."""
    from voice_lib.release.models import base_model_dir

    backend = backend or settings.model.backend
    steps = steps or DEFAULT_STEPS[backend]
    base_dir = base_dir or base_model_dir(settings, backend)
    if backend == "two_stage":
        from voice_lib.eval.rendering import choose_synthesis
        from voice_lib.train.finetune_two_stage import finetune_two_stage_voice

        return finetune_two_stage_voice(voice_id, manifest_key, settings, base_dir, rank=rank, steps=steps,
                                        log_to_mlflow=log_to_mlflow, choose_rendering=choose_synthesis)
    from voice_lib.train import finetune

    return finetune.finetune_voice(voice_id, manifest_key, settings, base_dir, rank=rank, steps=steps,
                                   log_to_mlflow=log_to_mlflow)
