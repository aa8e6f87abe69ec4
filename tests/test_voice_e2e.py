"""Upload -> onboarding -> served, for a fixture voice, with the user on the HTTP API only.

The user uploads the recordings with POST /v1/voices, follows GET /v1/voices/{id}, and finally speaks with the
new voice through the official openai client. Between those, what the platform does on its own: voice_intake's
scan (voice_lib.pipelines.intake.find_ready_datasets, what its DAG calls) hands the upload to a real
voice_onboarding run (`airflow dags test`, as tests/test_dag.py runs it), and a release step promotes the
candidate (the registry call `voiceops promote` makes). Gates are relaxed as in test_dag's end-to-end test: a
30-step fine-tune is no release candidate in quality, but the pipeline must carry it to one.
"""
from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RELAXED_GATES
from serving_stack import ServerStack

from serving.tenants import TenantDirectory
from voice_lib.core.config import Settings
from voice_lib.pipelines.intake import claim, find_ready_datasets

VOICE = "e2e-http"
# conftest.RELAXED_GATES only: this onboarding makes the model's measured choices as a user's does (the defaults).
RELAXED = {f"VOICEOPS_EVAL__{gate.upper()}": str(value) for gate, value in RELAXED_GATES.items()}


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def onboard(settings: Settings, dataset: dict) -> subprocess.CompletedProcess:
    from voiceops.stack import _executable, airflow_env

    env = {**airflow_env(settings), **RELAXED}
    airflow = _executable("airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    conf = {"voice_id": dataset["voice_id"], "data_uri": dataset["data_uri"], "language": dataset["language"],
            "owner": dataset["owner"],  # as voice_intake passes them: the uploading tenant owns the voice
            "min_speech_seconds": 60, "shards": 2, "lora_rank": 4, "train_steps": 30}
    return subprocess.run([airflow, "dags", "test", "voice_onboarding", "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_upload_onboard_and_speak_through_the_http_api(mlflow_server: str, tmp_path_factory, clean_voice: Path) -> None:
    stack = ServerStack(mlflow_server, tmp_path_factory.mktemp("e2e-http-home"), env=RELAXED)
    try:
        stack.publish_default_voices(0)
        stack.start(need_canary=False)
        key = TenantDirectory(stack.settings.resolved_tenants_file).create_key("studio", [VOICE])[0]
        auth = {"Authorization": f"Bearer {key}"}

        # 1. The user uploads the recordings.
        r = httpx.post(f"{stack.url}/v1/voices", headers=auth, timeout=120,
                       files=[("files", ("voice.zip", zip_folder(clean_voice), "application/zip"))],
                       data={"voice_id": VOICE, "language": "en", "description": "flite slt"})
        assert r.status_code == 202, r.text
        status_url = f"{stack.url}{r.json()['status_url']}"
        assert httpx.get(status_url, headers=auth, timeout=30).json()["state"] == "queued"

        # 2. The platform: voice_intake finds it and onboarding runs on it.
        (dataset,) = [d for d in find_ready_datasets(stack.settings) if d["voice_id"] == VOICE]
        run = onboard(stack.settings, dataset)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
        claim(stack.settings, dataset, "manual__e2e")
        status = httpx.get(status_url, headers=auth, timeout=30).json()
        assert status["state"] == "registered", status
        (version,) = status["registry"]["versions"]
        assert "candidate" in version["aliases"] and version["metrics"] and status["reports"]["qc"]

        # 3. A release step makes it production; the server picks it up on its next poll.
        stack.registry.promote(f"voice-{VOICE}", version["version"])
        listed = lambda: httpx.get(f"{stack.url}/v1/voices", headers=auth, timeout=30).json()["voices"]  # noqa: E731
        stack.wait("the server to load the new voice", lambda: bool(listed()), timeout=180)
        assert [(v["voice_id"], v["language"], v["description"]) for v in listed()] == [(VOICE, "en", "flite slt")]
        assert httpx.get(status_url, headers=auth, timeout=30).json()["state"] == "serving"
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)
        speech = client.audio.speech.create(model="tts-1", voice=VOICE, input="Please remember to water the plants.",
                                            response_format="wav")
        assert speech.response.headers["x-voice-version"] == version["version"]
        assert len(speech.content) > 44 + 2 * 24000 * 0.5  # half a second of 24 kHz speech at least
    finally:
        stack.stop()
