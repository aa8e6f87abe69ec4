"""canary_promotion: staged rollout of a voice version with analysis at every step.

Each step moves the `canary` alias and weight through voice_lib.release.registry, waits out the observation
window in a rescheduling sensor (no worker held between pokes), then compares canary with production
(latency, errors, RTF, bad audio, an online quality probe). Pass → next step; fail → rollback, tag and
alert; too few requests → the window is extended, then the rollout pauses for a human. At 100% the
version becomes production and the old one `previous`. All state lives in the registry, so a
re-triggered run resumes the rollout where it stood. Thin wiring over ``voice_lib.release.rollout``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, PokeReturnValue, dag, task

VOICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"


def _settings(params: dict):
    from voice_lib.core.config import get_settings

    settings = get_settings()
    release = settings.release.model_copy(update={
        "steps": [int(s) for s in params["steps"]],
        "window_seconds": float(params["window_seconds"]),
        "blackout_hours": [int(h) for h in params["blackout_hours"]],
        "manual_approval": bool(params["manual_approval"]),
    })
    return settings.model_copy(update={"release": release})


def _release_settings():
    # Parse-time read of the typed settings object (cheap: no heavy imports): the sensor's poke interval and
    # the Params' defaults come from VOICEOPS_RELEASE__*, so a run triggered without them (onboarding's, or a
    # bare trigger) follows the settings instead of overwriting them with constants written here.
    from voice_lib.core.config import get_settings

    return get_settings().release


RELEASE = _release_settings()


@dag(
    dag_id="canary_promotion",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=8,
    tags=["voiceops", "release"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    params={
        "voice_id": Param("demo-slt", type="string", pattern=VOICE_ID_PATTERN),
        "version": Param("", type=["string", "integer"], description="Version number; empty means the `candidate`."),
        "steps": Param(list(RELEASE.steps), type="array", items={"type": "integer", "minimum": 1, "maximum": 100},
                       description="Percent of users per step; each at most double the previous, ending at 100."),
        "window_seconds": Param(RELEASE.window_seconds, type="number", minimum=1,
                                description="Observation window per step."),
        "blackout_hours": Param(list(RELEASE.blackout_hours), type="array", items={"type": "integer", "minimum": 0, "maximum": 23},
                                description="UTC hours in which no step advances."),
        "manual_approval": Param(RELEASE.manual_approval, type="boolean", description="Hold before 100% for a human."),
        "quality_probe": Param(True, type="boolean", description="Synthesise probe texts through the canary each step."),
    },
)
def canary_promotion():
    @task
    def start(params=None) -> dict:
        from dataclasses import asdict

        from voice_lib.release.rollout import start_rollout

        settings = _settings(params)
        decision = start_rollout(settings, params["voice_id"], params["version"] or None, settings.release.steps)
        return asdict(decision)

    @task.sensor(poke_interval=RELEASE.poke_seconds, timeout=int(timedelta(days=14).total_seconds()), mode="reschedule")
    def rollout(started: dict, params=None) -> PokeReturnValue:
        from dataclasses import asdict

        from voice_lib.data.corpus import load_sentences
        from voice_lib.release.rollout import advance_rollout

        probe = load_sentences("en")[:3] if params["quality_probe"] else None
        decision = advance_rollout(_settings(params), started["voice_id"], started["version"], probe_texts=probe)
        return PokeReturnValue(is_done=decision.done, xcom_value=asdict(decision))

    @task
    def conclude(decision: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        if decision["outcome"] != "promoted":
            # A rolled-back or paused release is a run that needs someone's attention.
            raise AirflowFailException(f"voice-{decision['voice_id']} v{decision['version']}: {decision['outcome']}: {decision['detail']}")
        return decision

    conclude(rollout(start()))


canary_promotion()
