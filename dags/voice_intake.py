"""voice_intake: each newly complete dataset under the incoming prefix starts one voice_onboarding run.

A dataset is ``<incoming>/<voice_id>/`` with a ``_READY`` (or ``manifest.json``) file written last.
Incoming is ``VOICEOPS_INTAKE_URI`` (local folder or s3:// prefix). Thin wiring over voice_lib.pipelines.intake.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task


@dag(
    dag_id="voice_intake",
    schedule=timedelta(minutes=5),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["voiceops", "onboarding"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
)
def voice_intake():
    @task
    def scan() -> list[dict]:
        from voice_lib.core.config import get_settings
        from voice_lib.pipelines.intake import find_ready_datasets

        return find_ready_datasets(get_settings())

    @task
    def onboarding_confs(datasets: list[dict]) -> list[dict]:
        # The language and the owner ride along when the upload's manifest names them (POST /v1/voices); else
        # the DAG's defaults (English, the operators).
        return [{"voice_id": d["voice_id"], "data_uri": d["data_uri"],
                 **{k: d[k] for k in ("language", "owner") if k in d}} for d in datasets]

    @task
    def claim_all(datasets: list[dict], run_id=None) -> int:
        from voice_lib.core.config import get_settings
        from voice_lib.pipelines.intake import claim

        for d in datasets:
            claim(get_settings(), d, run_id)
        return len(datasets)

    datasets = scan()
    triggered = TriggerDagRunOperator.partial(
        task_id="trigger_onboarding", trigger_dag_id="voice_onboarding", wait_for_completion=False,
    ).expand(conf=onboarding_confs(datasets))
    triggered >> claim_all(datasets)


voice_intake()
