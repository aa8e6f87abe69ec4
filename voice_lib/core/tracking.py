"""MLflow tracking: the one client constructor, experiments, runs reused across retries, batched metrics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings


def mlflow_is_healthy(tracking_uri: str, timeout: float = 5.0) -> bool:
    """True when the MLflow server at ``tracking_uri`` answers ``GET /health`` with 200 within ``timeout`` seconds.

    Callers probe first because MlflowClient retries a refused connection for about four minutes. A non-HTTP URI
    (a local ``file:`` or ``sqlite:`` store) has no server to probe and counts as healthy.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import httpx

    try:
        return httpx.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def mlflow_client(settings: Settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another task
        return client.get_experiment_by_name(name).experiment_id


class MlflowMetrics:
    """Buffers per-step metrics and sends them to an MLflow run in batches (one HTTP call per flush)."""

    def __init__(self, settings: Settings, run_id: str | None):
        self.run_id = run_id
        self.client = None
        if run_id:
            self.client = mlflow_client(settings)
        self.buffer: list = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if len(self.buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.client and self.buffer:
            for start in range(0, len(self.buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self.buffer[start:start + 1000])
            self.buffer = []


def start_run(settings: Settings, experiment: str, run_name: str, tags: dict[str, str], params: dict) -> str:
    """An MLflow run for this step, reused when a run with the same ``voiceops.key`` tag exists (retries)."""
    from mlflow.entities import Param

    client = mlflow_client(settings)
    exp = experiment_id(client, experiment)
    found = client.search_runs([exp], filter_string=f"tags.`voiceops.key` = '{tags['voiceops.key']}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def verify_logged_folder(client, run_id: str, artifact_path: str, folder: Path) -> None:
    """Refuse to register from an incomplete upload: every local file must be in the run with its exact size.

    An artifact store that failed half-way (S3 down) must never leave a registered version that cannot load.
    """
    logged = {a.path.rsplit("/", 1)[-1]: a.file_size for a in client.list_artifacts(run_id, artifact_path) if not a.is_dir}
    wrong = [f"{p.name} ({'missing' if p.name not in logged else f'{logged[p.name]} of {p.stat().st_size} bytes'})"
             for p in sorted(folder.iterdir()) if p.is_file() and logged.get(p.name) != p.stat().st_size]
    if wrong:
        raise RuntimeError(f"run {run_id} artifacts under {artifact_path!r} are incomplete: {', '.join(wrong)}; "
                           "nothing was registered. Retry the task once the artifact store is reachable.")
