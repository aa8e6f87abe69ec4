"""A voice as the HTTP API shows it: its upload, its onboarding run, its registered versions, its reports.

``voice_status`` answers GET /v1/voices/{id} from what each step leaves behind, without any state of its own:

- the upload's ``manifest.json`` under the intake prefix (voice_lib.data.uploads): who uploaded, language;
- voice_intake's claim marker for that upload, naming the voice_onboarding run it started, and that run's
  state from Airflow's REST API (when Airflow cannot be asked, the state says why instead);
- the registry: versions with their gate metrics and verdicts, aliases, release state, archived or not;
- the artifact store: the QC reports and evaluation reports onboarding wrote (their URIs).

``state`` is one of ``queued`` (uploaded, not yet picked up), ``onboarding`` (its run is queued or running),
``failed`` (its run failed, or every version was rejected), ``registered`` (a version passed, none serves yet),
``serving`` (a production version), ``archived``.
"""
from __future__ import annotations

import json
from typing import Any

from voice_lib.core.airflow import AirflowError, dag_run
from voice_lib.core.config import Settings
from voice_lib.core.storage import StorageError, artifact_store
from voice_lib.data.uploads import claim_key, read_manifest, recorded_owner
from voice_lib.release.registry import Registry, RegistryError

ONBOARDING_DAG = "voice_onboarding"
_LINEAGE = ("base_model", "base_version", "base_sha256", "data_sha256", "code_version", "lora_rank", "training_key")
_VERDICTS = ("rejected", "rolled_back", "reason", "passed")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def version_summary(version: Any) -> dict[str, Any]:
    tags = dict(version.tags)
    metrics = {k: n for k, v in tags.items() if k not in _LINEAGE and (n := _number(v)) is not None}
    return {"version": version.version, "aliases": list(version.aliases), "run_id": version.run_id,
            "metrics": metrics, "lineage": {k: tags[k] for k in _LINEAGE if k in tags},
            "rejected": tags.get("rejected") == "true", "rolled_back": tags.get("rolled_back") == "true",
            "reason": tags.get("reason")}


def _reports(settings: Settings, voice_id: str) -> dict[str, list[str]]:
    store = artifact_store(settings)
    try:
        keys = store.list(f"voices/{voice_id}/")
    except StorageError:
        return {"qc": [], "evaluation": []}
    html = [k for k in keys if k.endswith(".html")]
    return {"qc": [f"{store.uri}/{k}" for k in html if "/qc-" in k and "/report/" in k],
            "evaluation": [f"{store.uri}/{k}" for k in html if "/eval_report/" in k]}


def _onboarding(settings: Settings, voice_id: str, manifest: dict | None) -> dict[str, Any] | None:
    if manifest is None or "listing_sha256" not in manifest:
        return None
    store = artifact_store(settings)
    key = claim_key(voice_id, manifest["listing_sha256"])
    if not store.exists(key):
        return {"state": "waiting for voice_intake", "run_id": None}
    run_id = json.loads(store.read_bytes(key)).get("onboarding_run_id")
    run: dict[str, Any] = {"state": "triggered", "run_id": run_id}
    if run_id:
        try:
            found = dag_run(settings, ONBOARDING_DAG, run_id)
            run = found if found is not None else {**run, "state": "unknown", "note": "Airflow does not know the run"}
        except AirflowError as exc:
            run = {**run, "state": "unknown", "note": str(exc)}
    return run


def _state(run: dict | None, registered: dict | None) -> str:
    if registered is not None:
        if registered["archived"]:
            return "archived"
        if "production" in registered["aliases"]:
            return "serving"
        if any(not v["rejected"] for v in registered["versions"]):
            return "registered"
    if run is None or run["state"] in ("failed", "success"):
        return "failed"  # the run ended (or left no trace) and nothing it registered passed
    return "queued" if run["run_id"] is None else "onboarding"


def voice_status(settings: Settings, registry: Registry, voice_id: str) -> dict[str, Any] | None:
    """What GET /v1/voices/{id} shows (module docstring); None when nothing of the voice exists anywhere."""
    manifest = read_manifest(settings, voice_id)
    name = registry.model_name(voice_id)
    registered = None
    if registry.exists(name):
        tags = registry.model_tags(name)
        registered = {"model": name, "aliases": registry.aliases(name),
                      "release_state": tags.get("release_state", "idle"),
                      "canary_weight": int(_number(tags.get("canary_weight", "0")) or 0),
                      "archived": tags.get("archived") == "true", "archived_reason": tags.get("archived_reason"),
                      "versions": [version_summary(v) for v in registry.versions(name)]}
    if manifest is None and registered is None:
        return None
    run = _onboarding(settings, voice_id, manifest)
    upload = None if manifest is None else {k: manifest.get(k) for k in (
        "tenant", "language", "description", "data_sha256", "files", "total_bytes", "uploaded_at")}
    return {"voice_id": voice_id, "state": _state(run, registered), "upload": upload, "onboarding": run,
            "registry": registered, "reports": _reports(settings, voice_id)}


def voice_owner(settings: Settings, voice_id: str) -> str | None:
    """The tenant the voice belongs to, or None (a voice onboarded by the CLI or Airflow): its owner record
    (written by its first onboarding, kept when the intake folder is cleared), else the waiting upload's tenant."""
    found, owner = recorded_owner(settings, voice_id)
    if found:
        return owner
    manifest = read_manifest(settings, voice_id)
    return manifest.get("tenant") if manifest else None


__all__ = ["voice_status", "voice_owner", "version_summary", "ONBOARDING_DAG", "RegistryError"]
