"""The transcript review, end to end on a real Airflow (standalone, as `voiceops up` runs it) and a real MLflow.

A voice whose recordings came without transcripts is onboarded with `voiceops onboard --airflow-url`: QC labels
every clip with Whisper, and the run stops at `review_transcripts`, a Human-in-the-loop task, while the CLI says
where to answer. The reviewer answers through the REST API with one edit and one drop; the manifest training
used has the edited text and not the dropped clip. Settings are conftest.platform_settings, as in test_dag. Left
unanswered, the review approves the texts as they are, or fails saying why, as the run's Params say.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import free_port, platform_settings, wait_until

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data.asr import normalize_words
from voiceops import stack
from voiceops.airflow_client import request_with_retries  # Airflow on SQLite: a 500 while the database is locked

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
VOICE = "review-slt"
DAG = "voice_onboarding"
EDITED = "The words a person corrected by hand."


@pytest.fixture(scope="module")
def airflow_settings(tmp_path_factory, mlflow_server) -> Settings:
    tmp_path = tmp_path_factory.mktemp("review-airflow")
    port = free_port()
    settings = platform_settings(Settings(home=tmp_path / "home", airflow_port=port, airflow_url=f"http://127.0.0.1:{port}",
                                          mlflow_tracking_uri=mlflow_server))
    try:
        stack.up(settings, services=("airflow",), timeout=300)
        yield settings
    finally:
        stack.down(settings)


def _untranscribed(clean_voice: Path, dest: Path) -> Path:
    """The clean voice's recordings without their metadata.csv."""
    dest.mkdir(parents=True)
    for wav in sorted(clean_voice.glob("*.wav")):
        shutil.copyfile(wav, dest / wav.name)
    return dest


def _api(settings: Settings) -> httpx.Client:
    return httpx.Client(base_url=settings.airflow_url, timeout=30,
                        headers={"Authorization": f"Bearer {stack.airflow_api_token(settings)}"})


def _wait(what: str, check, timeout: float):
    return wait_until(what, check, timeout, every=3.0)


def test_review_answered_through_the_rest_api_decides_what_training_uses(airflow_settings: Settings, clean_voice: Path,
                                                                         tmp_path: Path) -> None:
    settings = airflow_settings
    data = _untranscribed(clean_voice, tmp_path / "recordings")
    with _api(settings) as api:
        _wait("the dag processor to parse voice_onboarding", lambda: api.get(f"/api/v2/dags/{DAG}").status_code == 200, 180)
    env = {**os.environ, **stack.settings_env(settings)}
    cli = subprocess.Popen([sys.executable, "-m", "voiceops.cli", "onboard", str(data), "--voice-id", VOICE,
                            "--airflow-url", settings.airflow_url, "--shards", "1", "--min-speech-seconds", "50",
                            "--train-steps", "30"],
                           env={**env, "COLUMNS": "400"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        assert cli.stdout is not None
        for line in cli.stdout:  # the CLI follows the run until it says where to answer the review
            output.append(line)
            if "through the REST API: PATCH" in line:
                break
        printed = "".join(output)
        assert "review_transcripts: awaiting_input" in printed, printed[-3000:]
        run_id = next(line.split(" run ", 1)[1].rsplit(": http", 1)[0] for line in output if line.startswith("triggered "))
        endpoint = f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/review_transcripts/-1/hitlDetails"
        assert "Required Actions: " + settings.airflow_url in printed and endpoint in printed

        with _api(settings) as api:
            detail = api.get(endpoint).json()
            # The form: a text per auto-labelled clip, prefilled with Whisper's label, and the clips to drop.
            fields = {k: v for k, v in detail["params"].items() if k != "drop"}
            assert len(fields) >= 15 and detail["params"]["drop"]["value"] == []
            assert all(f["value"] and "Whisper avg log-prob" in f["description"] and "get-artifact" in f["description"]
                       for f in fields.values()), fields
            assert "Whisper heard" in detail["body"] and "[listen](" in detail["body"]
            listen = next(iter(fields.values()))["description"].split("Listen: ", 1)[1].split(" ", 1)[0]
            assert httpx.get(listen, timeout=30).content[:4] == b"RIFF"  # the link plays the clip's audio
            edited, dropped = sorted(fields)[:2]
            answer = request_with_retries(api, "PATCH", endpoint, json={"chosen_options": ["OK"],
                                                                        "params_input": {edited: EDITED, "drop": [dropped]}})
            assert answer.status_code == 200, answer.text
        for line in cli.stdout:  # an answer is never lost: a retry of the task resumes with it, it does not ask again
            output.append(line)
            assert "waits for you" not in line, "asked again after the answer:\n" + "".join(output)[-3000:]
        assert cli.wait(timeout=60) == 0, "".join(output)[-5000:]
    finally:
        if cli.poll() is None:
            cli.kill()

    # What training used: the manifest named by the train task's result.
    with _api(settings) as api:
        run = f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"
        assert api.get(run).json()["state"] == "success"
        trained = api.get(f"{run}/taskInstances/train/xcomEntries/return_value").json()
    trained = trained["value"] if isinstance(trained["value"], dict) else json.loads(trained["value"])
    manifest = json.loads(artifact_store(settings).read_bytes(trained["manifest_key"]))
    clips = {c["clip_id"]: c for c in manifest["clips"]}
    assert dropped not in clips
    assert clips[edited]["text"] == EDITED and clips[edited]["text_source"] == "reviewed"
    assert normalize_words(fields[edited]["value"]) != normalize_words(EDITED)  # the edit changed the text
    # Its features were computed from the edited text, in a file of their own (the unreviewed ones stay valid).
    assert clips[edited]["features"].endswith(".npz") and f"/{edited}-" in clips[edited]["features"]
    others = set(fields) - {edited, dropped}
    assert {c: clips[c]["text"] for c in others} == {c: fields[c]["value"] for c in others}  # approved as heard
    assert manifest["review"]["edited"] == [edited] and manifest["review"]["dropped"] == [dropped]
    assert manifest["review"]["by"] == settings.airflow_username


def test_an_answer_given_the_moment_the_review_asks_is_used_not_asked_for_again(airflow_settings: Settings,
                                                                                short_voice: Path,
                                                                                tmp_path: Path) -> None:
    """A script answers the review as soon as it asks. Airflow 3.3 fails a try whose answer lands within about a
    second of it parking and retries it; the retry resumes with that answer (it was given, so it is never lost and
    never asked for twice)."""
    settings = airflow_settings
    conf = {"voice_id": "review-fast", "data_uri": str(_untranscribed(short_voice, tmp_path / "recordings")),
            "shards": 1, "min_speech_seconds": 10, "train_steps": 30}
    with _api(settings) as api:
        _wait("the dag processor to parse voice_onboarding", lambda: api.get(f"/api/v2/dags/{DAG}").status_code == 200, 180)
        created = request_with_retries(api, "POST", f"/api/v2/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
        assert created.status_code == 200, created.text
        run_id = created.json()["dag_run_id"]
        run = f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"
        review = f"{run}/taskInstances/review_transcripts"

        def state(task_id: str) -> str | None:
            return api.get(f"{run}/taskInstances/{task_id}").json().get("state")

        wait_until("the review to ask", lambda: state("review_transcripts") == "awaiting_input", 600, every=0.1)
        edited = min(k for k in api.get(f"{review}/-1/hitlDetails").json()["params"] if k != "drop")
        answered = request_with_retries(api, "PATCH", f"{review}/-1/hitlDetails",
                                        json={"chosen_options": ["OK"], "params_input": {edited: EDITED}})
        assert answered.status_code == 200, answered.text
        assert _wait("apply_review", lambda: state("apply_review") in ("success", "failed", "upstream_failed")
                     and state("apply_review"), 600) == "success"
        tries = api.get(review).json()["try_number"]
        assert state("review_transcripts") == "success", f"try {tries}"
        reviewed = api.get(f"{run}/taskInstances/apply_review/xcomEntries/return_value").json()["value"]
        reviewed = reviewed if isinstance(reviewed, dict) else json.loads(reviewed)
        assert reviewed["review"]["edited"] == [edited] and reviewed["review"]["by"] == settings.airflow_username

        request_with_retries(api, "PATCH", run, json={"state": "failed"})  # end it: nothing more to see
    print(f"review_transcripts answered on try {tries}")  # 2 when the answer landed in Airflow's parking window


@pytest.mark.parametrize("on_timeout", ["fail", "approve"])
def test_an_unanswered_review_fails_or_approves_as_the_params_say(airflow_settings: Settings, short_voice: Path,
                                                                  tmp_path: Path, on_timeout: str) -> None:
    settings = airflow_settings
    voice = f"review-timeout-{on_timeout}"
    conf = {"voice_id": voice, "data_uri": str(_untranscribed(short_voice, tmp_path / "recordings")), "shards": 1,
            "min_speech_seconds": 10, "train_steps": 30, "review_timeout_hours": 0.001, "review_on_timeout": on_timeout}
    with _api(settings) as api:
        _wait("the dag processor to parse voice_onboarding", lambda: api.get(f"/api/v2/dags/{DAG}").status_code == 200, 180)
        created = request_with_retries(api, "POST", f"/api/v2/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
        assert created.status_code == 200, created.text
        run = f"/api/v2/dags/{DAG}/dagRuns/{quote(created.json()['dag_run_id'], safe='')}"

        def state(task_id: str) -> str | None:
            return api.get(f"{run}/taskInstances/{task_id}").json().get("state")

        if on_timeout == "fail":
            assert _wait("the review to time out", lambda: state("review_transcripts") in ("failed", "success")
                         and state("review_transcripts"), 600) == "failed"
            log = api.get(f"{run}/taskInstances/review_transcripts/logs/1", params={"full_content": True},
                          headers={"Accept": "application/x-ndjson"}).text
            assert "no answer in time and review_on_timeout is 'fail'" in log, log[-3000:]
            assert _wait("the run to fail", lambda: api.get(run).json()["state"] in ("failed", "success")
                         and api.get(run).json()["state"], 120) == "failed"
            assert state("apply_review") == "upstream_failed" and state("train") == "upstream_failed"
            return
        assert _wait("apply_review after the timeout", lambda: state("apply_review") in ("success", "failed")
                     and state("apply_review"), 600) == "success"
        reviewed = api.get(f"{run}/taskInstances/apply_review/xcomEntries/return_value").json()["value"]
    reviewed = reviewed if isinstance(reviewed, dict) else json.loads(reviewed)
    assert reviewed["review"]["by"] is None and reviewed["review"]["edited"] == reviewed["review"]["dropped"] == []
    report = json.loads(artifact_store(settings).read_bytes(reviewed["report_key"]))
    asked = [c for c in report["clips"] if c["review"] == "auto_transcribed"]
    assert asked and all(c["reviewed"] == "timed_out" and c["status"] == "accepted" for c in asked)
