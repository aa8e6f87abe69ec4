"""End-to-end checks of voiceops.stack: real MLflow / Airflow processes on free ports in a tmp home."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from voice_lib.core.config import Settings
from voiceops import stack


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """True once no process is left in the group (the leader is reaped by `down`/init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_mlflow_up_idempotent_down(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(home=tmp_path / "home", mlflow_port=port, mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    try:
        started = stack.up(settings, services=("mlflow",), timeout=90)
        first = started["mlflow"]
        assert first.healthy and first.running and first.pid

        by_name = {s.name: s for s in stack.status(settings)}
        assert by_name["mlflow"].healthy and by_name["mlflow"].pid == first.pid
        assert not by_name["airflow"].running

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        experiment_id = client.create_experiment("stack-test")
        assert client.get_experiment(experiment_id).name == "stack-test"
        # Artifacts go over HTTP to the server, which stores them under <home>/mlartifacts.
        run = client.create_run(experiment_id)
        client.log_text(run.info.run_id, "hello", "note.txt")
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert list((settings.home / "mlartifacts").rglob("note.txt"))

        again = stack.up(settings, services=("mlflow",), timeout=90)
        assert again["mlflow"].pid == first.pid
    finally:
        stopped = stack.down(settings)
    assert stopped == ["mlflow"]
    assert _group_gone(first.pid)
    after = {s.name: s for s in stack.status(settings)}["mlflow"]
    assert not after.running and not after.healthy and after.pid is None
    assert not (settings.home / "run" / "mlflow.pid").exists()
    assert (settings.home / "logs" / "mlflow.log").stat().st_size > 0


@pytest.mark.slow
def test_airflow_up_token_api_down(tmp_path: Path) -> None:
    port = free_port()
    dags = tmp_path / "dags"
    dags.mkdir()
    settings = Settings(
        home=tmp_path / "home",
        airflow_port=port,
        airflow_url=f"http://127.0.0.1:{port}",
        dags_folder=dags,
        plugins_folder=tmp_path / "plugins",
    )
    try:
        first = stack.up(settings, services=("airflow",), timeout=240)["airflow"]
        assert first.healthy and first.pid

        health = httpx.get(f"{settings.airflow_url}/api/v2/monitor/health", timeout=10).json()
        assert health["metadatabase"]["status"] == "healthy"
        assert health["scheduler"]["status"] == "healthy"

        password_file = settings.home / "airflow" / "admin-password.txt"
        assert password_file.stat().st_mode & 0o777 == 0o600

        token = stack.airflow_api_token(settings)
        resp = httpx.get(
            f"{settings.airflow_url}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["total_entries"] == 0
        unauthenticated = httpx.get(f"{settings.airflow_url}/api/v2/dags", timeout=10)
        assert unauthenticated.status_code == 401

        assert stack.up(settings, services=("airflow",))["airflow"].pid == first.pid
        env = stack.airflow_env(settings)
        assert env["PATH"].split(os.pathsep)[0] == str(stack._venv_bin())
        assert env["VOICEOPS_HOME"] == str(settings.home)
    finally:
        stopped = stack.down(settings)
    assert stopped == ["airflow"]
    assert _group_gone(first.pid), "airflow processes survived `down`"
    after = {s.name: s for s in stack.status(settings)}["airflow"]
    assert not after.running and not after.healthy


def test_stale_pid_file_is_reported_and_cleaned(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", mlflow_port=free_port())
    pid_file = settings.home / "run" / "mlflow.pid"
    pid_file.parent.mkdir(parents=True)
    # A live pid that is not an mlflow process (a recycled pid) must neither count nor be killed.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(f"{bystander.pid}\n")
        mlflow_status = {s.name: s for s in stack.status(settings)}["mlflow"]
        assert not mlflow_status.running and "stale" in mlflow_status.detail
        assert stack.down(settings) == []
        assert not pid_file.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_settings_env_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path, airflow_password="s3cret", qc={"min_snr_db": 22.0})
    env = stack.settings_env(settings)
    assert env["VOICEOPS_AIRFLOW_PASSWORD"] == "s3cret"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings
