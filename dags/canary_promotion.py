"""canary_promotion: staged rollout of a voice version with analysis at every step.

Each step moves the `canary` alias and weight through voice_lib.release.registry, waits out the observation
window in a rescheduling sensor (no worker held between pokes), then compares canary with production
(latency, errors, RTF, bad audio, an online quality probe). Pass → next step; fail → rollback, tag and
alert; too few requests → the window is extended, then the rollout pauses for a human. At 100% the
version becomes production and the old one `previous`. All state lives in the registry, so a
re-triggered run resumes the rollout where it stood.

With `manual_approval` the rollout stops before its last step (100%) and `approve`, a Human-in-the-loop task,
asks a human: in Airflow's *Required Actions*, on the release page or with `voiceops promote` (all three answer
this same task). While it waits (`awaiting_input`) it holds no worker slot. Approve → `finish` takes the canary
to 100% and production after one more window; Reject → the canary is rolled back; no answer within
`approval_timeout_hours` → paused or rolled back (`approval_timeout_action`). Thin wiring over
``voice_lib.release.rollout`` and ``voice_lib.release.approvals``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
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
SENSOR = {"poke_interval": RELEASE.poke_seconds, "timeout": int(timedelta(days=14).total_seconds()), "mode": "reschedule"}


def _poke(started: dict, params: dict, approved: bool) -> PokeReturnValue:
    from dataclasses import asdict

    from voice_lib.data.corpus import listening_texts
    from voice_lib.release.rollout import advance_rollout

    probe = listening_texts("en") if params["quality_probe"] else None
    decision = advance_rollout(_settings(params), started["voice_id"], started["version"], probe_texts=probe,
                               approved=approved)
    # Before the approval a hold ends this sensor (the approve task asks); after it, only the end does.
    return PokeReturnValue(is_done=decision.done if approved else decision.held, xcom_value=asdict(decision))


class ReleaseApproval(ApprovalOperator):
    """Asks a human about the canary the rollout held, and acts on the answer (voice_lib.release.approvals).

    Skips itself when the rollout was not held (no manual approval, or it ended first). Unlike ApprovalOperator's
    Reject (skip downstream), a Reject rolls the canary back and the run concludes as rolled back."""

    @staticmethod
    def _held(context) -> dict:
        return context["ti"].xcom_pull(task_ids="rollout")

    @staticmethod
    def _timeout(context) -> tuple[float, str]:
        # This task's own params are its form (HITLOperator drops the dag's): read the run's conf, then the defaults.
        conf, defaults = context["dag_run"].conf or {}, context["dag"].params
        hours = conf.get("approval_timeout_hours", defaults.get("approval_timeout_hours", RELEASE.approval_timeout_hours))
        action = conf.get("approval_timeout_action", defaults.get("approval_timeout_action", RELEASE.approval_timeout_action))
        return float(hours), str(action)

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from voice_lib.core.airflow import unused_hitl_answer
        from voice_lib.core.config import get_settings
        from voice_lib.release.approvals import approval_body, approval_subject

        held = self._held(context)
        if held["outcome"] != "awaiting_approval":
            raise AirflowSkipException(f"nothing to approve: the rollout ended {held['outcome']}")
        hours, action = self._timeout(context)
        self.subject = approval_subject(held["voice_id"], held["version"])
        self.body = approval_body(held, hours, action)
        self.response_timeout = timedelta(hours=hours)
        if (earlier := unused_hitl_answer(get_settings(), context["ti"], self.params, self.log)) is not None:
            return self.execute_complete(context, earlier)
        return super().execute(context)

    def execute_complete(self, context, event: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from voice_lib.core.config import get_settings
        from voice_lib.release.approvals import on_answer, on_timeout

        held = self._held(context)
        if event.get("error_type") == "timeout":
            hours, action = self._timeout(context)
            raise AirflowFailException(on_timeout(get_settings(), held, hours, action))
        answer = HITLOperator.execute_complete(self, context, event)
        user = answer["responded_by_user"] or {}
        chosen, reason = answer["chosen_options"][0], (answer["params_input"] or {}).get("reason", "")
        message = on_answer(get_settings(), held["voice_id"], held["version"], chosen, user.get("name"), reason)
        self.log.info(message)
        return {"chosen": chosen, "by": user.get("name"), "reason": reason, "message": message}


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
        "manual_approval": Param(RELEASE.manual_approval, type="boolean",
                                 description="Hold before 100% for a human (the `approve` task: Required Actions)."),
        "approval_timeout_hours": Param(RELEASE.approval_timeout_hours, type="number", exclusiveMinimum=0,
                                        description="How long the approval waits for an answer."),
        "approval_timeout_action": Param(RELEASE.approval_timeout_action, type="string", enum=["pause", "rollback"],
                                         description="What an unanswered approval does to the canary."),
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

    @task.sensor(**SENSOR)
    def rollout(started: dict, params=None) -> PokeReturnValue:
        return _poke(started, params, approved=False)

    # Runs after an approval, or (skipped approval) passes the rollout's end on.
    @task.sensor(**SENSOR, trigger_rule="none_failed")
    def finish(held: dict, params=None) -> PokeReturnValue:
        if held["outcome"] != "awaiting_approval":
            return PokeReturnValue(is_done=True, xcom_value=held)
        return _poke(held, params, approved=True)

    @task
    def conclude(decision: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        if decision["outcome"] != "promoted":
            # A rolled-back or paused release is a run that needs someone's attention.
            raise AirflowFailException(f"voice-{decision['voice_id']} v{decision['version']}: {decision['outcome']}: {decision['detail']}")
        return decision

    held = rollout(start())
    # retries=1: a try that failed after its answer arrived resumes with that answer (unused_hitl_answer); an
    # unanswered one asks again. A run that failed here resumes at the held step when re-triggered.
    approve = ReleaseApproval(task_id="approve", retries=1, subject="Release approval", params={
        "reason": Param("", type="string", description="Why; recorded on the version with your name.")})
    done = finish(held)
    held >> approve >> done
    conclude(done)


canary_promotion()
