"""nightly_reevaluation: re-evaluate every production and canary version; flag regressions.

Compares each version with the metrics recorded at registration and with the previous night, tags
regressions through voice_lib.release.registry (plus an alert in the log), and logs a trend plot per voice
to MLflow. Thin wiring over voice_lib.pipelines.nightly.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="nightly_reevaluation",
    schedule="0 3 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["voiceops", "release"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
)
def nightly_reevaluation():
    @task
    def versions() -> list[dict]:
        from voice_lib.core.config import get_settings
        from voice_lib.pipelines.nightly import versions_to_check

        return versions_to_check(get_settings())

    @task(max_active_tis_per_dagrun=2)
    def reevaluate(item: dict) -> dict:
        from voice_lib.core.config import get_settings
        from voice_lib.pipelines.nightly import reevaluate as run

        return run(get_settings(), item)

    @task
    def trends(results: list[dict]) -> list[str]:
        from voice_lib.core.config import get_settings
        from voice_lib.pipelines.nightly import log_trends

        return log_trends(get_settings(), list(results))

    trends(reevaluate.expand(item=versions()))


nightly_reevaluation()
