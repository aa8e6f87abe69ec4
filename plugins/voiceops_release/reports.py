"""The files behind the release page's players and links: a version's evaluation report and listening samples (its
MLflow run's ``eval_report/`` folder), its QC report (the artifact store) and the nightly re-evaluations.

No FastAPI or Airflow imports (app.py serves these with the page's permission rules). A run's artifacts never
change once logged, so each file is downloaded once into ``<home>/cache/release-page/``; a file a run does not
have is remembered as missing for a few minutes instead of being asked for on every page refresh.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from voice_lib.core.config import Settings

log = logging.getLogger(__name__)

EVAL_FOLDER = "eval_report"  # voice_lib.eval.report.log_eval_to_mlflow
LISTEN_INDEX = "listen/listen.json"  # voice_lib.eval.evaluation._listening_samples
MISSING_TTL_S = 300.0
TREND_NIGHTS = 30
TREND_METRICS = ("wer", "speaker_similarity", "p808_mos", "rtf")
# A report's own relative links only: letters, digits, ._- in path segments, never "..".
_SAFE_PATH = re.compile(r"^(?!.*\.\.)[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class ReportNotFound(LookupError):
    """The version has no such report file; the message says which and why."""


def safe_path(path: str) -> str:
    if not _SAFE_PATH.fullmatch(path or ""):
        raise ReportNotFound(f"{path!r} is not a report file name (letters, digits, ._- and /; no '..').")
    return path


class RunArtifacts:
    """Files of MLflow runs' ``eval_report/`` folders, cached on disk."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.cache_dir / "release-page" / "runs"
        self._missing: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def file(self, run_id: str, path: str) -> Path:
        """The local copy of ``eval_report/<path>`` of ``run_id``; ReportNotFound when the run has none."""
        from mlflow.exceptions import MlflowException

        from voice_lib.core.tracking import mlflow_client

        path = safe_path(path)
        if not re.fullmatch(r"[0-9a-f]{8,64}", run_id or ""):
            raise ReportNotFound(f"version has no MLflow run (run id {run_id!r})")
        dest = self.root / run_id / path
        if dest.is_file():
            return dest
        key = (run_id, path)
        with self._lock:
            if time.monotonic() - self._missing.get(key, -MISSING_TTL_S) < MISSING_TTL_S:
                raise ReportNotFound(f"run {run_id} has no {EVAL_FOLDER}/{path}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                got = Path(mlflow_client(self.settings).download_artifacts(run_id, f"{EVAL_FOLDER}/{path}", tmp))
            except (MlflowException, OSError) as exc:
                with self._lock:
                    self._missing[key] = time.monotonic()
                log.info("run %s: no %s/%s (%s)", run_id, EVAL_FOLDER, path, type(exc).__name__)
                raise ReportNotFound(f"run {run_id} has no {EVAL_FOLDER}/{path}") from None
            if not got.is_file():
                raise ReportNotFound(f"{EVAL_FOLDER}/{path} of run {run_id} is a folder, not a file")
            got.replace(dest)  # whole files only: a reader never sees half a download
        return dest

    def listening(self, run_id: str) -> dict[str, Any] | None:
        """``listen/listen.json`` of the run (the sentences and their files), or None when it has none."""
        try:
            return json.loads(self.file(run_id, LISTEN_INDEX).read_text())
        except (ReportNotFound, ValueError):
            return None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def qc_prefix_of(settings: Settings, voice_id: str, tags: dict[str, str]) -> str | None:
    """The store folder of the QC run a version was trained from: its ``qc_prefix`` tag, or (versions registered
    before the tag) the QC folder with a report under its dataset (``data_sha256``)."""
    if tags.get("qc_prefix"):
        return tags["qc_prefix"]
    sha = tags.get("data_sha256") or ""
    if not re.fullmatch(r"[0-9a-f]{16,64}", sha):
        return None
    from voice_lib.core.storage import artifact_store
    from voice_lib.pipelines.onboarding import dataset_prefix

    reports = sorted(k for k in artifact_store(settings).list(dataset_prefix(voice_id, sha)) if k.endswith("/report/report.html"))
    return reports[-1].removesuffix("/report/report.html") if reports else None


def qc_file(settings: Settings, voice_id: str, tags: dict[str, str], path: str) -> bytes:
    from voice_lib.core.storage import StorageError, artifact_store

    prefix = qc_prefix_of(settings, voice_id, tags)
    if prefix is None:
        raise ReportNotFound(f"no QC report is recorded for this version of voice {voice_id}")
    try:
        return artifact_store(settings).read_bytes(f"{prefix}/report/{safe_path(path)}")
    except (StorageError, FileNotFoundError, KeyError) as exc:
        raise ReportNotFound(f"the QC report of voice {voice_id} has no {path} ({type(exc).__name__})") from None


TREND_TTL_S = 600.0  # nights are written once a day (reevaluate is idempotent per day)
_trends: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}


def nightly_trend(settings: Settings, voice_id: str, version: str | None) -> dict[str, Any] | None:
    """The last nights' re-evaluated metrics of ``version`` (production): days and one series per metric."""
    from voice_lib.core.storage import artifact_store
    from voice_lib.pipelines.nightly import nightly_results

    if not version:
        return None
    cached = _trends.get((voice_id, version))
    if cached and time.monotonic() - cached[0] < TREND_TTL_S:
        return cached[1]
    nights = nightly_results(artifact_store(settings), voice_id, version, last=TREND_NIGHTS)
    trend = {"version": version, "days": [n["day"] for n in nights],
             "metrics": {m: [_finite(n.get("metrics", {}).get(m)) for n in nights] for m in TREND_METRICS},
             "regressions": [{"day": n["day"], "found": n["regressions"]} for n in nights if n.get("regressions")]}
    _trends[(voice_id, version)] = (time.monotonic(), trend)
    return trend


def _finite(value: Any) -> float | None:
    import math

    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
