"""base_model_pretrain: multi-speaker synthetic corpus → base model `voice-base` (alias production).

Held-out speakers (voice_lib.data.corpus.PRETRAIN_HOLDOUT) never enter pretraining, so cloning quality
is measured on unseen voices. Thin wiring over ``voice_lib.pipelines.training``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from voice_lib.core.config import get_settings  # light (pydantic): read at parse time for the queue


@dag(
    dag_id="base_model_pretrain",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["voiceops", "training"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "sentences_per_voice": Param(80, type="integer", minimum=5, maximum=150),
        "steps": Param(3000, type="integer", minimum=10, maximum=100000),
        "batch_size": Param(16, type="integer", minimum=2, maximum=128),
    },
)
def base_model_pretrain():
    # The corpus and the step checkpoints live in the artifact store, not on a worker's disk: the two tasks
    # (and a retry of either) may run on different workers.
    @task
    def build_corpus(params=None) -> dict:
        from voice_lib.pipelines.training import build_pretrain_corpus

        return build_pretrain_corpus(get_settings(), int(params["sentences_per_voice"]))

    @task(execution_timeout=timedelta(hours=6), **get_settings().train.task_options())  # VOICEOPS_TRAIN__QUEUE=gpu: the gpu worker
    def pretrain(corpus: dict, params=None) -> dict:
        from voice_lib.pipelines.training import pretrain_from_store

        settings = get_settings()
        info = pretrain_from_store(corpus["corpus_prefix"], settings, settings.home / "models" / "voice-base",
                                   steps=int(params["steps"]), batch_size=int(params["batch_size"]))
        return {k: info[k] for k in ("base_dir", "base_sha256", "run_id", "best_val_loss") if k in info} | {"version": info.get("version")}

    pretrain(build_corpus())


base_model_pretrain()
