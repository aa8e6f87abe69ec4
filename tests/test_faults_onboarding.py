"""Onboarding under infrastructure faults, on a real S3 server (moto) behind a cuttable TCP link.

- S3 down during onboarding: each step fails with a clear StorageError (after boto's own retries), writes
  no completion marker, and succeeds when retried once S3 is back; a registration retried on another
  worker while S3 is down registers nothing; once S3 is back exactly one version is registered, however
  often the task is retried.
- A training worker killed (SIGKILL) mid-training: the retry, on another worker with an empty local
  cache, fetches the step checkpoint from the artifact store and resumes from it.

The steps are the library functions the voice_onboarding DAG's tasks call (dags/voice_onboarding.py);
the DAG gives every task retries with exponential backoff (checked in tests/test_dag.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import platform_settings, report_fault
from tcp_outage import TcpOutage

from voice_lib.core.config import Settings
from voice_lib.core.storage import StorageError, artifact_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
VOICE = f"faulty-{uuid.uuid4().hex[:6]}"
TRAIN_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from voice_lib.core.config import Settings
from voice_lib.pipelines.training import finetune_voice
result = finetune_voice(sys.argv[1], sys.argv[2], Settings(), rank=4, steps=int(sys.argv[3]), log_to_mlflow=False)
print("RESULT " + json.dumps(result.to_json()))
"""


@pytest.fixture(scope="module")
def s3_link(s3_endpoint) -> TcpOutage:
    host, port = s3_endpoint.removeprefix("http://").split(":")
    link = TcpOutage(host, int(port))
    yield link
    link.down()


@pytest.fixture(scope="module")
def flaky(s3_link, s3_endpoint, mlflow_server, tmp_path_factory) -> Settings:
    """S3 through the cuttable link, a real MLflow, and conftest.platform_settings (a 20-step fine-tune is no real
    candidate)."""
    bucket = f"voiceops-faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    return platform_settings(Settings(home=tmp_path_factory.mktemp("worker-1"), storage_uri=f"s3://{bucket}/store",
                                      s3_endpoint_url=s3_link.url, s3_access_key_id="test", s3_secret_access_key="test",
                                      mlflow_tracking_uri=mlflow_server))


def direct(settings: Settings, s3_endpoint: str, home: Path | None = None) -> Settings:
    """The same store reached without the cuttable link (what the test itself uses to look)."""
    return settings.model_copy(update={"s3_endpoint_url": s3_endpoint, **({"home": home} if home else {})})


def down_fails_cleanly(link: TcpOutage, step, *args) -> tuple[str, float]:
    link.down()
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            step(*args)
    finally:
        link.up()
    return str(err.value), time.monotonic() - started


def prepare_manifest(settings: Settings, data: Path) -> dict:
    """ingest → qc → features, as the DAG runs them (each is a no-op when already done)."""
    from voice_lib.pipelines.onboarding import (
        features_manifest,
        features_shard,
        ingest,
        qc_report,
        qc_shard,
    )

    dataset = ingest(VOICE, str(data), settings)
    for i in range(len(dataset["shards"])):
        qc_shard(dataset, i, settings)
    qc = qc_report(dataset, settings, log_to_mlflow=False)
    for i in range(len(dataset["shards"])):
        features_shard(dataset, qc, i, len(dataset["shards"]), settings)
    return features_manifest(dataset, qc, settings)


def test_s3_outage_during_onboarding_retries_and_never_registers_a_partial_version(flaky, s3_link, s3_endpoint,
                                                                                   clean_voice, tmp_path, request):
    from voice_lib.pipelines.evaluation import evaluate_voice
    from voice_lib.pipelines.onboarding import (
        features_shard,
        ingest,
        qc_report,
        qc_shard,
    )
    from voice_lib.pipelines.training import finetune_voice
    from voice_lib.release.registration import register_voice
    from voice_lib.release.registry import Registry

    store = artifact_store(direct(flaky, s3_endpoint))
    message, took = down_fails_cleanly(s3_link, ingest, VOICE, str(clean_voice), flaky)
    failed_after = {"ingest": round(took, 1)}
    assert "S3" in message and "voices/" in message, message
    assert not [k for k in store.list(f"voices/{VOICE}") if k.endswith("staged.json")]  # no completion marker
    print(f"ingest with S3 down failed after {took:.1f} s: {message}")

    dataset = ingest(VOICE, str(clean_voice), flaky)  # the retry
    for i in range(len(dataset["shards"])):
        qc_shard(dataset, i, flaky)
    qc = qc_report(dataset, flaky, log_to_mlflow=False)
    message, took = down_fails_cleanly(s3_link, features_shard, dataset, qc, 0, len(dataset["shards"]), flaky)
    failed_after["features"] = round(took, 1)
    assert "S3" in message, message
    manifest = prepare_manifest(flaky, clean_voice)  # the retry; earlier steps are no-ops
    trained = finetune_voice(VOICE, manifest["manifest_key"], flaky, rank=4, steps=20)
    evaluation = evaluate_voice(flaky, trained)

    # The register task retried on another worker (empty local cache) while S3 is down: nothing registered.
    registry, name = Registry(flaky), f"voice-{VOICE}"
    worker_2 = flaky.model_copy(update={"home": tmp_path / "worker-2"})
    message, took = down_fails_cleanly(s3_link, register_voice, worker_2, trained, evaluation)
    failed_after["register"] = round(took, 1)
    assert not registry.exists(name) or registry._versions(name) == []
    first = register_voice(worker_2, trained, evaluation)  # S3 back: the retry registers
    again = register_voice(flaky, trained, evaluation)  # a duplicate retry changes nothing
    assert first.version == again.version and first.alias == "candidate"
    assert [v.version for v in registry._versions(name)] == [first.version]
    from voice_lib.release.models import load_registered_voice

    synth, _ = load_registered_voice(flaky, VOICE, "candidate")  # the registered version is complete
    assert len(synth.synthesize("The version loads and speaks.").audio) > 8000
    print(f"register with S3 down failed after {took:.1f} s: {message}; then version {first.version} once")
    report_fault(request, "s3 outage during onboarding", True, seconds_to_fail_with_s3_down=failed_after,
                 versions_registered=len(registry._versions(name)), registered_version_loads=True)


def test_verify_logged_folder_refuses_an_incomplete_upload(mlflow_server, tmp_path):
    from voice_lib.core.tracking import (
        experiment_id,
        mlflow_client,
        verify_logged_folder,
    )

    client = mlflow_client(Settings(home=tmp_path, mlflow_tracking_uri=mlflow_server))
    run_id = client.create_run(experiment_id(client, "verify-upload")).info.run_id
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (folder / "voice.json").write_text("{}")
    client.log_artifact(run_id, str(folder / "voice.json"), "voice")  # half of the folder made it
    with pytest.raises(RuntimeError, match="adapter_model.safetensors \\(missing\\).*nothing was registered"):
        verify_logged_folder(client, run_id, "voice", folder)
    client.log_artifacts(run_id, str(folder), "voice")
    verify_logged_folder(client, run_id, "voice", folder)


def test_a_killed_training_worker_resumes_from_the_checkpoint_on_another_worker(flaky, s3_endpoint, clean_voice, tmp_path,
                                                                               request):
    from voiceops.stack import settings_env

    settings = direct(flaky, s3_endpoint)
    manifest = prepare_manifest(settings, clean_voice)
    store = artifact_store(settings)
    steps = 100  # checkpoints every 50 steps (finetune_voice)

    def worker(home: Path) -> subprocess.Popen:
        env = {**os.environ, **settings_env(settings.model_copy(update={"home": home})), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, VOICE, manifest["manifest_key"], str(steps)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def checkpoints() -> list[str]:
        return [k for k in store.list(f"voices/{VOICE}/checkpoints") if k.endswith(".pt")]

    for key in checkpoints():  # the S3 test above trained 20 steps with another config: another key
        assert "checkpoints/" in key
    before = set(checkpoints())
    first = worker(tmp_path / "worker-a")
    deadline = time.monotonic() + 600
    while not set(checkpoints()) - before:
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # the worker dies mid-training
    first.wait(10)
    killed_log = first.stdout.read()
    assert "RESULT" not in killed_log  # it really died before finishing

    second = worker(tmp_path / "worker-b")  # another machine: nothing local
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    result = json.loads(out.split("RESULT ", 1)[1])
    assert "fetched checkpoint" in out and "resumed from" in out
    assert result["resumed_from_step"] == 50 and result["steps_trained"] == steps
    print(f"killed after the step-50 checkpoint; the retry on another worker resumed at step "
          f"{result['resumed_from_step']} and finished {steps} steps")
    report_fault(request, "training worker killed", True,
                 resumed_from_step=result["resumed_from_step"], steps_trained=result["steps_trained"])
