"""The voice_onboarding DAG: it parses cleanly and cheaply, validates its Params, and runs end to end
with real Airflow (`airflow dags test`), a real S3 server and a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import platform_settings

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store

DAGBAG_PROBE = r"""
import json, sys, time
start = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
parse_seconds = time.perf_counter() - start
dag = bag.dags.get("voice_onboarding")
bad = {}
for voice_id in ["../etc", "Bad_ID", "a", "ok-voice"]:
    import copy
    params = copy.deepcopy(dag.params)
    try:
        params.update({"voice_id": voice_id, "data_uri": "/data"})
        params.validate()
        bad[voice_id] = "valid"
    except Exception as exc:  # ParamValidationError; its import path moved between Airflow versions
        bad[voice_id] = type(exc).__name__
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": sorted(t.task_id for t in dag.tasks),
    "heavy_modules": sorted(m for m in ("torch", "mlflow", "voice_lib.data.qc", "voice_lib.data.speech", "librosa") if m in sys.modules),
    "params": sorted(dag.params.keys()),
    "voice_id_validation": bad,
    "retries": {t.task_id: [t.retries, bool(t.retry_exponential_backoff)] for t in dag.tasks},
    "queues": {f"{d.dag_id}.{t.task_id}": t.queue for d in bag.dags.values() for t in d.tasks},
}))
"""


def _airflow_env(settings: Settings) -> dict:
    from voiceops.stack import airflow_env

    env = airflow_env(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    return env


def _probe_dagbag(settings: Settings, **extra_env: str) -> dict:
    env = {**_airflow_env(settings), **extra_env}
    out = subprocess.run([sys.executable, "-c", DAGBAG_PROBE, str(settings.dags_folder)], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dagbag_imports_cleanly_without_heavy_modules(settings):
    probe = _probe_dagbag(settings)
    assert probe["errors"] == {}
    # The DAG ids of shared/CONTRACTS.md
    assert set(probe["dags"]) >= {"voice_onboarding", "base_model_pretrain", "canary_promotion", "nightly_reevaluation", "voice_intake"}
    assert {"ingest", "qc_shard", "qc_report", "features_shard", "features_manifest", "train", "evaluate", "register"} <= set(probe["tasks"])
    # DAG files are parsed every 30 s by the dag processor: no ML or MLflow import at parse time.
    assert probe["heavy_modules"] == []
    # Infrastructure faults (S3, MLflow down; a worker killed) are retried with backoff, every task
    # (tests/test_faults_onboarding.py shows the retried steps resume and register nothing partial).
    assert all(retries >= 1 and backoff for retries, backoff in probe["retries"].values()), probe["retries"]
    assert {"voice_id", "data_uri", "language", "min_speech_seconds", "owner", "allow_other_owner"} <= set(probe["params"])
    assert probe["voice_id_validation"]["ok-voice"] == "valid"
    for bad in ("../etc", "Bad_ID", "a"):
        assert probe["voice_id_validation"][bad] != "valid", bad
    assert set(probe["queues"].values()) == {"default"}  # no VOICEOPS_TRAIN__QUEUE: every task on the default queue


def test_training_tasks_go_to_the_queue_the_setting_names(settings):
    queues = _probe_dagbag(settings, VOICEOPS_TRAIN__QUEUE="gpu")["queues"]
    training = {"voice_onboarding.train", "base_model_pretrain.pretrain"}
    assert {task for task, queue in queues.items() if queue == "gpu"} == training  # docker-compose's gpu worker
    assert all(queue == "default" for task, queue in queues.items() if task not in training)


def _dags_test(settings: Settings, conf: dict) -> subprocess.CompletedProcess:
    from voiceops.stack import _executable

    env = _airflow_env(settings)
    airflow = _executable("airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return subprocess.run([airflow, "dags", "test", "voice_onboarding", "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def e2e_settings(s3_settings, mlflow_server) -> Settings:
    """S3 artifacts, a real MLflow server, and conftest.platform_settings: a 30-step fine-tune is no release
    candidate in quality, but the pipeline must carry it to one (the gates themselves are tested in test_gates.py)."""
    return platform_settings(s3_settings.model_copy(update={"mlflow_tracking_uri": mlflow_server}))


@pytest.mark.slow
def test_onboarding_end_to_end_on_s3_and_mlflow(e2e_settings, clean_voice):
    """ingest → qc → features → train → evaluate → register, ending with alias `candidate` in MLflow."""
    conf = {"voice_id": "e2e-slt", "data_uri": str(clean_voice), "language": "en", "min_speech_seconds": 60,
            "shards": 2, "lora_rank": 4, "train_steps": 30}
    started = time.monotonic()
    run = _dags_test(e2e_settings, conf)
    first_seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "state=success" in run.stdout + run.stderr or "success" in (run.stdout + run.stderr)[-2000:]

    store = artifact_store(e2e_settings)
    assert store.uri.startswith("s3://")
    keys = store.list("voices/e2e-slt")
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert len(manifests) == 1, keys[:20]
    manifest = json.loads(store.read_bytes(manifests[0]))
    assert manifest["speech_seconds"] >= 60
    assert len(manifest["clips"]) >= 15
    for clip in manifest["clips"][:3]:
        assert clip["phonemes"] and clip["frames"] > 0 and len(clip["wav_sha256"]) == 64
        assert store.exists(clip["features"]) and store.exists(clip["wav"])
    assert store.exists(manifest["speaker_embedding"])
    assert any(k.endswith("/report/report.html") for k in keys)
    assert any(k.endswith("/staged.json") for k in keys)

    # The QC report is an MLflow run of the voice's experiment, with the HTML, plots and audio.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=e2e_settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("voice-e2e-slt")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`voiceops.step` = 'qc'")
    assert len(runs) == 1
    assert runs[0].data.tags["qc.passed"] == "true"
    assert runs[0].data.metrics["speech_seconds"] >= 60
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "qc_report")}
    assert {"qc_report/report.html", "qc_report/qc_overview.png", "qc_report/report.json"} <= artifacts

    # The version is registered with complete lineage and the candidate alias, and it synthesises.
    from voice_lib.release.models import load_registered_voice
    from voice_lib.release.registry import Registry

    registry = Registry(e2e_settings)
    candidate = registry.version_by_alias("voice-e2e-slt", "candidate")
    assert candidate is not None
    for tag in ("base_model", "base_version", "base_sha256", "data_sha256", "code_version", "lora_rank"):
        assert candidate.tags.get(tag), tag
    assert candidate.tags["lora_rank"] == "4" and candidate.tags["data_sha256"] == manifest["data_sha256"]
    assert "eval_adapted_speaker_similarity" in candidate.tags
    assert registry.version_by_alias("voice-e2e-slt", "production") is None  # release is a separate step
    synth, meta = load_registered_voice(e2e_settings, "e2e-slt", "candidate")
    assert len(synth.synthesize("Please remember to water the plants.").audio) > 16000 * 0.5
    assert meta["lora_rank"] == "4"
    train_runs = client.search_runs([exp.experiment_id], filter_string="tags.`voiceops.step` = 'train'")
    assert len(train_runs) == 1
    assert {"eval_report/report.html"} <= {a.path for a in client.list_artifacts(train_runs[0].info.run_id, "eval_report")}

    # Re-running on unchanged input does no work and writes no new objects, runs or versions.
    manifest_etag = store.client.head_object(Bucket=store.bucket, Key=store._key(manifests[0]))["ETag"]
    started = time.monotonic()
    rerun = _dags_test(e2e_settings, conf)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "already done" in rerun.stdout + rerun.stderr
    assert "manifest unchanged" in rerun.stdout + rerun.stderr
    assert store.list("voices/e2e-slt") == keys
    assert store.client.head_object(Bucket=store.bucket, Key=store._key(manifests[0]))["ETag"] == manifest_etag
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`voiceops.step` = 'qc'")) == 1
    assert "already trained" in rerun.stdout + rerun.stderr
    assert registry.version_by_alias("voice-e2e-slt", "candidate").version == candidate.version
    print(f"first run {first_seconds:.1f} s, cached re-run {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_onboarding_rejects_too_little_speech_without_retrying(e2e_settings, short_voice):
    conf = {"voice_id": "e2e-short", "data_uri": str(short_voice), "language": "en", "min_speech_seconds": 60, "shards": 1}
    run = _dags_test(e2e_settings, conf)
    output = run.stdout + run.stderr
    assert "rejected by QC" in output
    assert "of usable speech; at least 60 s are needed" in output
    # Bad data fails fast: qc_report ran once (AirflowFailException, no retries), features never ran.
    assert 1 <= output.count("task_id=qc_report map_index=-1") <= 2
    store = artifact_store(e2e_settings)
    keys = store.list("voices/e2e-short")
    assert any(k.endswith("/report.json") for k in keys)
    assert not any(k.endswith("/manifest.json") for k in keys)



def test_a_data_uri_outside_the_ingest_roots_fails_the_run_at_once(settings, clean_voice):
    """A Param naming a folder outside the workers' ingest roots (here: no extra root, so only the intake
    prefix and the upload folder) fails ingest without retries, naming the setting; nothing is read or stored."""
    confined = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"allowed_roots": []})})
    conf = {"voice_id": "outsider", "data_uri": str(clean_voice), "shards": 1}
    run = _dags_test(confined, conf)
    output = run.stdout + run.stderr
    assert "is outside the folders onboarding may read" in output and "VOICEOPS_INGEST__ALLOWED_ROOTS" in output
    assert 1 <= output.count("task_id=ingest map_index=-1") <= 2, output[-3000:]  # failed fast: not retried
    assert "state=failed" in output or run.returncode != 0
    assert artifact_store(confined).list("voices/outsider") == []
