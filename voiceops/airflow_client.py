"""Run a DAG and follow it: in-process with `airflow dags test`, or on a running Airflow over its REST API."""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime, timezone

import httpx
from rich.console import Console

from voice_lib.core.config import Settings

# Lines of `airflow dags test` output worth showing a person: task transitions and our progress logs.
_INTERESTING = re.compile(r"(\[DAG TEST\] end task|\[voice_lib\.|Task failed|AirflowFailException|rejected by QC|^- |"
                          r"transcript review waiting)")


def dags_test(settings: Settings, dag_id: str, conf: dict, console: Console) -> str:
    """Run one DAG run in-process (no scheduler needed). Returns the final state."""
    from voiceops.stack import _executable, airflow_env

    env = airflow_env(settings)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / f"{dag_id}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.log"
    airflow = _executable("airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    console.print(f"running {dag_id} in-process; full log: {log_path}")
    state = "failed"
    with open(log_path, "w") as log, subprocess.Popen(
        [airflow, "dags", "test", dag_id, "-c", json.dumps(conf)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _INTERESTING.search(line):
                # Drop Airflow's timestamp/level prefix and source location; keep the message.
                message = re.sub(r"^\S+Z \[\w+\s*\] ", "", line.rstrip())
                console.print(re.sub(r"\s+loc=\S+$", "", message)[:600], markup=False, highlight=False)
                if "transcript review waiting" in line:  # in-process runs have no UI of their own
                    console.print("  (the answer goes through an Airflow API server on this home's database: start it "
                                  "with `voiceops up` if it is not running)")
            match = re.search(r"DagRun Finished: .*state=(\w+)", line) or re.search(r"dag_run_state=(\w+)", line)
            if match:
                state = match.group(1)
        proc.wait()
    if proc.returncode != 0:
        state = "failed"
    return state


def _token(settings: Settings) -> str:
    from voiceops.stack import airflow_api_token

    return airflow_api_token(settings)


def request_with_retries(client: httpx.Client, method: str, path: str, attempts: int = 4, **kwargs) -> httpx.Response:
    """One REST call, tried again on a transient failure: Airflow on SQLite (the embedded stack) answers 500
    "Database error" while another component holds the database lock, and a busy api-server may drop a request."""
    for attempt in range(1, attempts):
        try:
            resp = client.request(method, path, **kwargs)
            if resp.status_code < 500:
                return resp
        except httpx.TransportError:
            pass
        time.sleep(2.0 * attempt)
    return client.request(method, path, **kwargs)  # the last try: its answer, or its error, is the caller's


def trigger_and_follow(settings: Settings, dag_id: str, conf: dict, console: Console, timeout: float = 3 * 3600) -> str:
    """Trigger a run through /api/v2 and poll it, printing task state changes, until it ends."""
    base = settings.airflow_url.rstrip("/")
    headers = {"Authorization": f"Bearer {_token(settings)}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        # A 500 from a locked database rolled back: sending the trigger again does not make a second run.
        resp = request_with_retries(client, "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        if resp.status_code >= 400:
            raise RuntimeError(f"Airflow refused to trigger {dag_id} ({resp.status_code}): {resp.text[:500]}")
        run_id = resp.json()["dag_run_id"]
        console.print(f"triggered {dag_id} run {run_id}: {base}/dags/{dag_id}/runs/{run_id}")
        seen: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = request_with_retries(client, "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
            tis = request_with_retries(client, "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json().get("task_instances", [])
            for ti in tis:
                key = f"{ti['task_id']}[{ti.get('map_index', -1)}]" if ti.get("map_index", -1) >= 0 else ti["task_id"]
                if ti.get("state") and seen.get(key) != ti["state"]:
                    seen[key] = ti["state"]
                    console.print(f"  {key}: {ti['state']}")
                    if ti["state"] == "awaiting_input":
                        _print_where_to_answer(console, base, dag_id, run_id, ti["task_id"])
            if run["state"] in ("success", "failed"):
                return run["state"]
            time.sleep(3)
    return "timeout"


def _print_where_to_answer(console: Console, base: str, dag_id: str, run_id: str, task_id: str) -> None:
    """A Human-in-the-loop task (the transcript review) waits for a person: say where to answer it."""
    from voice_lib.core.airflow import hitl_endpoints

    where = hitl_endpoints(base, dag_id, run_id, task_id)
    console.print(f"  {task_id} waits for you: answer in the Airflow UI, Required Actions: {where['ui']}", highlight=False)
    console.print(f"  or through the REST API: PATCH {where['api']} with "
                  '{"chosen_options": ["OK"], "params_input": {"<clip id>": "<text>", "drop": ["<clip id>"]}}',
                  highlight=False, markup=False)
