"""voice_onboarding: recordings → QC → transcript review → features → LoRA fine-tuning → evaluation → registration.

Thin wiring over ``voice_lib.pipelines.onboarding`` and ``.review``; heavy imports happen inside the tasks, not at
parse time. The transcript review is a Human-in-the-loop task: answer it in the UI's *Required Actions* or with
``PATCH /api/v2/dags/voice_onboarding/dagRuns/{run_id}/taskInstances/review_transcripts/-1/hitlDetails``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import HITLEntryOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from airflow.sdk.definitions.param import ParamsDict

from voice_lib.core.config import get_settings  # light (pydantic): read at parse time for the queue

VOICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"


def _settings(params: dict):
    settings = get_settings()
    qc = settings.qc.model_copy(update={"min_speech_seconds": float(params["min_speech_seconds"])})
    return settings.model_copy(update={"qc": qc})


# The tasks; voice_onboarding() below wires them (TaskFlow tasks may be defined outside the DAG function).

@task
def ingest(params=None) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from voice_lib.data.staging import IngestError
    from voice_lib.pipelines.onboarding import ingest as run

    try:
        return run(params["voice_id"], params["data_uri"], _settings(params), shards=int(params["shards"]),
                   owner=params.get("owner") or None, allow_other_owner=bool(params.get("allow_other_owner")))
    except IngestError as exc:
        raise AirflowFailException(str(exc)) from exc  # a refused source or owner: retrying cannot help


@task
def shard_ids(dataset: dict) -> list[int]:
    return list(range(len(dataset["shards"])))


@task(max_active_tis_per_dagrun=4)
def qc_shard(dataset: dict, shard_index: int, params=None) -> dict:
    from voice_lib.pipelines.onboarding import qc_shard as run

    return run(dataset, shard_index, _settings(params), params["language"])


@task
def qc_report(dataset: dict, shard_results: list, params=None) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from voice_lib.pipelines.onboarding import QCRejected
    from voice_lib.pipelines.onboarding import qc_report as run

    try:
        return run(dataset, _settings(params), params["language"])
    except QCRejected as exc:
        raise AirflowFailException(str(exc)) from exc  # bad data: retrying cannot help


@task.short_circuit(ignore_downstream_trigger_rules=False)  # skips only the review; apply_review still runs
def needs_review(qc: dict, params=None) -> bool:
    return params["review_transcripts"] == "always" or (params["review_transcripts"] == "auto" and bool(qc["to_review"]))


class TranscriptReviewOperator(HITLEntryOperator):
    """The Human-in-the-loop form of voice_lib.pipelines.review, built when the task runs (the clips are known only
    then). Timeout behaviour comes from the run's Params: approve as is, or fail saying why."""

    def __init__(self, **kwargs) -> None:
        super().__init__(subject="Review the transcripts of {{ params.voice_id }}", options=[self.OK], defaults=[self.OK],
                         **kwargs)

    def execute(self, context):
        from voice_lib.core.airflow import hitl_endpoints, unused_hitl_answer
        from voice_lib.pipelines.review import form_body, form_fields, review_items

        params, ti = context["params"], context["ti"]
        qc = ti.xcom_pull(task_ids="qc_report")
        items = review_items(qc, _settings(params), everything=params["review_transcripts"] == "always")
        self.params = ParamsDict({key: Param(**spec) for key, spec in form_fields(items).items()})
        self.body = form_body(items, qc)
        self.defaults = [self.OK] if params["review_on_timeout"] == "approve" else None
        self.response_timeout = timedelta(hours=float(params["review_timeout_hours"]))
        where = hitl_endpoints(get_settings().airflow_url, ti.dag_id, ti.run_id, ti.task_id)
        if (earlier := unused_hitl_answer(get_settings(), ti, self.params, self.log)) is not None:
            self.params = ParamsDict()  # as on a resume (a fresh operator has no form); apply_review checks the answer
            return self.execute_complete(context, earlier)
        self.log.info("transcript review waiting for %d clip(s): answer in the Airflow UI at %s (Required Actions) "
                      "or PATCH %s; on timeout (%s h): %s", len(items), where["ui"], where["api"],
                      params["review_timeout_hours"], params["review_on_timeout"])
        return super().execute(context)

    def process_trigger_event_error(self, event: dict) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        if event.get("error_type") == "timeout":
            raise AirflowFailException(
                "the transcript review got no answer in time and review_on_timeout is 'fail': nothing was trained on "
                "unreviewed texts. Answer the review sooner (review_timeout_hours) or set review_on_timeout=approve, "
                "then clear this task to ask again.")
        super().process_trigger_event_error(event)


@task(trigger_rule="none_failed")
def apply_review(qc: dict, params=None, ti=None) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from voice_lib.pipelines.review import ReviewError, review_items
    from voice_lib.pipelines.review import apply_review as run

    answer = ti.xcom_pull(task_ids="review_transcripts")  # None: the review was skipped
    settings = _settings(params)
    try:
        asked = [i.clip_id for i in review_items(qc, settings, everything=params["review_transcripts"] == "always")]
        return run(qc, answer, settings, asked)
    except ReviewError as exc:
        raise AirflowFailException(str(exc)) from exc  # the answer is what it is: a retry changes nothing


@task(max_active_tis_per_dagrun=4)
def features_shard(dataset: dict, qc: dict, shard_index: int, params=None) -> dict:
    from voice_lib.pipelines.onboarding import features_shard as run

    return run(dataset, qc, shard_index, len(dataset["shards"]), _settings(params), params["language"])


@task
def features_manifest(dataset: dict, qc: dict, shard_results: list, params=None) -> dict:
    from voice_lib.pipelines.onboarding import features_manifest as run

    return run(dataset, qc, _settings(params))


@task(execution_timeout=timedelta(hours=2), **get_settings().train.task_options())  # VOICEOPS_TRAIN__QUEUE=gpu: the gpu worker
def train(manifest: dict, params=None) -> dict:
    from voice_lib.pipelines.training import finetune_voice

    # A retry resumes from the step checkpoint written every 50 steps.
    backend = params.get("backend", "default")  # "default": VOICEOPS_MODEL__BACKEND
    return finetune_voice(params["voice_id"], manifest["manifest_key"], _settings(params),
                          rank=int(params["lora_rank"]),
                          steps=int(params["train_steps"]) if params.get("train_steps") else None,
                          backend=None if backend == "default" else backend).to_json()

# The hand-offs travel as JSON (XCom); the library takes and returns voice_lib.core.handoffs records.
@task
def evaluate(trained: dict, params=None) -> dict:
    from voice_lib.core.handoffs import TrainedVoice
    from voice_lib.pipelines.evaluation import evaluate_voice

    return evaluate_voice(_settings(params), TrainedVoice.from_json(trained, "the train task's result")).to_json()


@task
def register(trained: dict, evaluation: dict, params=None) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from voice_lib.core.handoffs import EvaluationSummary, TrainedVoice
    from voice_lib.release.registration import GatesFailed, register_voice

    try:
        return register_voice(_settings(params), TrainedVoice.from_json(trained, "the train task's result"),
                              EvaluationSummary.from_json(evaluation, "the evaluate task's result")).to_json()
    except GatesFailed as exc:
        raise AirflowFailException(str(exc)) from exc  # the version is tagged rejected; a retry changes nothing


@task.short_circuit
def auto_release_enabled(registered: dict) -> bool:
    # VOICEOPS_RELEASE__AUTO_PROMOTE_AFTER_ONBOARDING: start the staged canary right away.
    return get_settings().release.auto_promote_after_onboarding


@dag(
    dag_id="voice_onboarding",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["voiceops", "onboarding"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
    params={
        "voice_id": Param("demo-voice", type="string", pattern=VOICE_ID_PATTERN, minLength=2, maxLength=63,
                          description="Lowercase letters, digits and dashes; becomes MLflow model voice-<voice_id>."),
        "data_uri": Param("", type="string", minLength=1,
                          description="Folder, .zip, audio file, or s3://bucket/prefix holding the recordings, "
                                      "under the intake prefix, the upload folder or VOICEOPS_INGEST__ALLOWED_ROOTS."),
        "owner": Param("", type="string", maxLength=200,
                       description="The tenant the voice is onboarded for (voice_intake sets it from the upload's "
                                   "manifest); empty: the operators. A voice id another owner onboarded first is "
                                   "refused unless allow_other_owner."),
        "allow_other_owner": Param(False, type="boolean",
                                   description="Onboard into another owner's voice on purpose: its candidate is "
                                               "replaced, it keeps its owner."),
        "language": Param("en", type="string", enum=["en", "zh", "auto"]),
        "min_speech_seconds": Param(60, type="number", minimum=1, maximum=3600,
                                    description="Reject the dataset with less usable speech than this."),
        "shards": Param(2, type="integer", minimum=1, maximum=64, description="Parallel QC/feature shards."),
        "lora_rank": Param(8, type="integer", minimum=1, maximum=64, description="LoRA rank of the voice adapter."),
        "train_steps": Param(None, type=["null", "integer"], minimum=1, maximum=20000,
                             description="Fine-tuning steps (early stopping may end sooner); empty: the backend's "
                                         "default (two-stage 400, end-to-end 600)."),
        "review_transcripts": Param("auto", type="string", enum=["auto", "always", "never"],
                                    description="auto: a person reviews the texts of auto-labelled and low-confidence "
                                                "aligned clips (Required Actions) when there are any; always: every "
                                                "clip; never: skip (held low-confidence clips stay out of training)."),
        "review_timeout_hours": Param(24, type="number", minimum=0.001, maximum=24 * 30,
                                      description="How long the transcript review waits for an answer."),
        "review_on_timeout": Param("approve", type="string", enum=["approve", "fail"],
                                   description="No answer in time: approve the texts as they are, or fail the run."),
        "backend": Param("default", type="string", enum=["default", "two_stage", "end_to_end"],
                         description="Acoustic backend: two_stage (a reference synthesizer + a LoRA-adapted converter) "
                                     "or end_to_end; default = VOICEOPS_MODEL__BACKEND. See docs/model.md."),
    },
    render_template_as_native_obj=True,
)
def voice_onboarding():
    dataset = ingest()
    shards = shard_ids(dataset)
    shard_results = qc_shard.partial(dataset=dataset).expand(shard_index=shards)
    qc = qc_report(dataset, shard_results)
    review = TranscriptReviewOperator(task_id="review_transcripts")
    reviewed = apply_review(qc)
    needs_review(qc) >> review >> reviewed
    feats = features_shard.partial(dataset=dataset, qc=reviewed).expand(shard_index=shards)
    manifest = features_manifest(dataset, reviewed, feats)
    trained = train(manifest)
    registered = register(trained, evaluate(trained))
    auto_release_enabled(registered) >> TriggerDagRunOperator(
        task_id="start_canary_promotion", trigger_dag_id="canary_promotion",
        conf={"voice_id": "{{ params.voice_id }}", "version": "{{ ti.xcom_pull(task_ids='register')['version'] }}"},
    )


voice_onboarding()
