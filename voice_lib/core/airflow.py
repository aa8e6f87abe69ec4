"""Airflow's REST API, read-only, for code below the composition root (the model server's voice status).

The credentials are the stack's: ``settings.airflow_password``, else the password ``voiceops up`` generated in
``<home>/airflow/admin-password.txt``. voiceops.stack writes that file and builds on these functions.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from voice_lib.core.config import Settings

TIMEOUT_SECONDS = 10.0


class AirflowError(RuntimeError):
    """Airflow cannot be reached or refuses us; the message says which and what to set."""


def password_file(settings: Settings) -> Path:
    return settings.home / "airflow" / "admin-password.txt"


def airflow_password(settings: Settings) -> str:
    """settings.airflow_password, else the generated one kept beside Airflow's home."""
    if settings.airflow_password is not None:
        return settings.airflow_password.get_secret_value()
    path = password_file(settings)
    if path.exists():
        return path.read_text().strip()
    raise AirflowError(f"No Airflow password: set VOICEOPS_AIRFLOW_PASSWORD or run `up` to generate {path}.")


def api_token(settings: Settings, url: str | None = None) -> str:
    """A JWT for the Airflow REST API (send as `Authorization: Bearer <token>`)."""
    base = (url or settings.airflow_url).rstrip("/")
    creds = {"username": settings.airflow_username, "password": airflow_password(settings)}
    try:
        resp = httpx.post(f"{base}/auth/token", json=creds, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        raise AirflowError(f"Cannot reach Airflow at {base}: {exc}") from exc
    if resp.status_code not in (200, 201):
        raise AirflowError(f"Airflow refused a token for {settings.airflow_username!r}: "
                           f"HTTP {resp.status_code} {resp.text[:200]}")
    return resp.json()["access_token"]


def _get_json(settings: Settings, url: str, what: str) -> dict[str, Any] | None:
    """GET ``url`` as the stack's user: its JSON, None on 404; AirflowError (naming ``what``) otherwise."""
    try:
        resp = httpx.get(url, headers={"Authorization": f"Bearer {api_token(settings)}"}, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        raise AirflowError(f"Cannot reach Airflow at {settings.airflow_url.rstrip('/')}: {exc}") from exc
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise AirflowError(f"Airflow answered HTTP {resp.status_code} for {what}: {resp.text[:200]}")
    return resp.json()


def dag_run(settings: Settings, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """One DAG run's state, start, end and URL; None when Airflow does not know the run."""
    base = settings.airflow_url.rstrip("/")
    run = _get_json(settings, f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}", f"{dag_id} run {run_id}")
    if run is None:
        return None
    return {"dag_id": dag_id, "run_id": run_id, "state": run.get("state"), "start_date": run.get("start_date"),
            "end_date": run.get("end_date"), "url": f"{base}/dags/{dag_id}/runs/{run_id}"}


def hitl_endpoints(airflow_url: str, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, str]:
    """Where a Human-in-the-loop task is answered: the UI's Required Actions of the task, the UI's list of every
    waiting one, and the REST endpoint (GET the form, PATCH ``{"chosen_options": [...], "params_input": {...}}``)."""
    base, run = airflow_url.rstrip("/"), quote(run_id, safe="")
    return {"ui": f"{base}/dags/{dag_id}/runs/{run}/tasks/{task_id}/required_actions?map_index={map_index}",
            "ui_all": f"{base}/required_actions",
            "api": f"{base}/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/{map_index}/hitlDetails"}


def hitl_answer(settings: Settings, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any] | None:
    """The answer recorded for a Human-in-the-loop task instance (chosen_options, params_input, responded_at,
    responded_by_user), or None while it has no form or no answer yet."""
    where = hitl_endpoints(settings.airflow_url, dag_id, run_id, task_id, map_index)["api"]
    detail = _get_json(settings, where, where)
    if detail is None or not (detail.get("response_received") and detail.get("chosen_options")):
        return None
    return {key: detail.get(key) for key in ("chosen_options", "params_input", "responded_at", "responded_by_user")}


def unused_hitl_answer(settings: Settings, ti: Any, form: Iterable[str], log: logging.Logger) -> dict[str, Any] | None:
    """For a retry of a Human-in-the-loop task (``ti``: the Task SDK's task instance): the answer an earlier try
    received but did not use, as the resume event ``execute_complete`` takes; None means ask again.

    A retry keeps the task instance, and with it the form and its answer until this try asks again, so an answer is
    never lost to a failed try. Airflow 3.3 fails a try whose answer arrives within about a second of the task
    parking (the worker's exit is then read as the task killed externally). A cleared task is a new task instance
    with no answer: clearing stays the way to be asked again. Also None when the answer names fields this try's
    ``form`` lacks, or Airflow cannot say (logged)."""
    if ti.try_number <= 1:
        return None
    try:
        answer = hitl_answer(settings, ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    except AirflowError as exc:
        log.warning("could not look for an earlier try's answer, asking again: %s", exc)
        return None
    if answer is None:
        return None
    answer["params_input"] = answer["params_input"] or {}
    if not set(answer["params_input"]) <= set(form):
        log.warning("the earlier answer was for other fields (%s), asking again", sorted(answer["params_input"]))
        return None
    log.info("an earlier try was answered by %s at %s and did not use it: resuming with that answer",
             (answer["responded_by_user"] or {}).get("name", "the timeout default"), answer["responded_at"])
    return {**answer, "responded_at": datetime.fromisoformat(answer["responded_at"])}
