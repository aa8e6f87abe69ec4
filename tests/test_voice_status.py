"""voice_lib.release.voices: GET /v1/voices/{id}'s view of a voice, from a real upload, the real intake scan, a
real MLflow registry and the artifact store (Airflow is not running here: the run's state says so)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from test_registry import register
from test_uploads import files, wav_bytes

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data.uploads import accept_upload
from voice_lib.pipelines.intake import claim, find_ready_datasets
from voice_lib.release.registry import Registry
from voice_lib.release.voices import voice_owner, voice_status


@pytest.fixture
def settings(mlflow_server: str, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server, intake_uri=(tmp_path / "in").as_uri(),
                    airflow_url="http://127.0.0.1:9", airflow_password="x")


def test_a_voice_from_upload_to_archive(settings: Settings, tmp_path: Path) -> None:
    registry = Registry(settings)
    voice = f"st-{uuid.uuid4().hex[:8]}"
    assert voice_status(settings, registry, voice) is None  # nothing anywhere: a 404
    accept_upload(files(tmp_path, {"a.wav": wav_bytes()}), voice, "en", settings, tenant="acme", description="calm")
    status = voice_status(settings, registry, voice)
    assert status["state"] == "queued" and status["onboarding"] == {"state": "waiting for voice_intake", "run_id": None}
    assert status["upload"]["tenant"] == "acme" and status["upload"]["files"] == ["a.wav"]
    assert voice_owner(settings, voice) == "acme" and voice_owner(settings, "nobody-here") is None

    (dataset,) = [d for d in find_ready_datasets(settings) if d["voice_id"] == voice]
    claim(settings, dataset, "manual__2026-12-02T00:00:00")
    status = voice_status(settings, registry, voice)
    assert status["state"] == "onboarding" and status["onboarding"]["run_id"] == "manual__2026-12-02T00:00:00"
    assert status["onboarding"]["state"] == "unknown" and "Cannot reach Airflow" in status["onboarding"]["note"]

    store = artifact_store(settings)
    store.write_bytes(f"voices/{voice}/datasets/abcd/qc-1234/report/report.html", b"<html></html>")
    name = registry.model_name(voice)
    version = register(registry, name, tmp_path, 1, wer="0.12", speaker_similarity="0.81")
    status = voice_status(settings, registry, voice)
    assert status["state"] == "registered" and status["registry"]["aliases"] == {}
    (summary,) = status["registry"]["versions"]
    assert summary["metrics"] == {"wer": 0.12, "speaker_similarity": 0.81} and summary["lineage"]["lora_rank"] == "8"
    assert status["reports"]["qc"] == [f"{store.uri}/voices/{voice}/datasets/abcd/qc-1234/report/report.html"]

    registry.promote(name, version.version)
    assert voice_status(settings, registry, voice)["state"] == "serving"
    registry.archive(name, "deleted over HTTP")
    status = voice_status(settings, registry, voice)
    assert status["state"] == "archived" and status["registry"]["archived_reason"] == "deleted over HTTP"
