"""What the release page shows for a voice, built from the registry and the release history.

No FastAPI or Airflow imports here: app.py serves it, and tests can call it against a real registry.
Everything is read through ``voice_lib.release.registry.Registry`` and ``voice_lib.release.rollout.ReleaseHistory``;
the only writes are the four release actions, which call the registry's own methods.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from voice_lib.core.config import Settings
# The actions themselves (their guards and records) are voice_lib.release.actions, shared with the CLI.
from voice_lib.release.actions import ACTIONS  # noqa: F401 - app.py lists them from here
from voice_lib.release.rollout import CHECK_ORDER, check_limits

log = logging.getLogger(__name__)

ALIAS_ORDER = ("production", "canary", "candidate", "previous")
HISTORY_LIMIT = 20


def _num(value: Any) -> float | int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check(name: str, status: str, value: Any, threshold: Any, detail: str, limits: dict) -> dict[str, Any]:
    conf = limits.get(name, {})
    if threshold is None:
        threshold = conf.get("threshold")
    return {"name": name, "status": status, "value": _num(value), "threshold": _num(threshold),
            "op": conf.get("op"), "unit": conf.get("unit"), "note": conf.get("note"), "detail": detail or ""}


def _sorted_checks(checks: list[dict]) -> list[dict]:
    rank = {n: i for i, n in enumerate(CHECK_ORDER)}
    return sorted(checks, key=lambda c: rank.get(c["name"], len(rank)))


def _iso(ts: Any) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes, which release_history wrote in UTC."""
    if isinstance(ts, datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).isoformat()
    number = _num(ts)
    if number is None:
        return None
    return datetime.fromtimestamp(float(number), timezone.utc).isoformat()


def analysis_from_row(row: dict, limits: dict) -> dict[str, Any]:
    """A release_history row (ReleaseHistory.rows) as the page's analysis block."""
    checks = [_check(c.get("name", "?"), c.get("status", "?"), c.get("value"), c.get("threshold"), c.get("detail", ""), limits)
              for c in row.get("checks") or [] if isinstance(c, dict)]
    return {"source": "release_history", "version": str(row.get("version", "")), "step": row.get("step"),
            "weight": row.get("weight"), "outcome": row.get("outcome"), "detail": row.get("detail") or "",
            "ts": _iso(row.get("ts")), "checks": _sorted_checks(checks)}


def analysis_from_tags(version: str, tags: dict[str, str], limits: dict) -> dict[str, Any] | None:
    """The newest ``release_decision_<ms>`` version tag (written by voice_lib.release.rollout) as an analysis block."""
    keys = [k for k in tags if k.startswith("release_decision_") and k.removeprefix("release_decision_").isdigit()]
    for key in sorted(keys, key=lambda k: int(k.removeprefix("release_decision_")), reverse=True):
        try:
            tag = json.loads(tags[key])
        except (TypeError, ValueError):
            log.warning("version %s: tag %s is not JSON; skipped", version, key)
            continue
        checks = []
        for name, pair in (tag.get("checks") or {}).items():
            status, value = (list(pair) + [None, None])[:2] if isinstance(pair, (list, tuple)) else (str(pair), None)
            checks.append(_check(name, status, value, None, "", limits))
        return {"source": "version_tags", "version": version, "step": tag.get("step"), "weight": tag.get("weight"),
                "outcome": tag.get("outcome"), "detail": tag.get("detail") or "", "ts": _iso(tag.get("ts")),
                "checks": _sorted_checks(checks)}
    return None


def _step(aliases: dict[str, str], progress: dict[str, str], weight: int) -> dict[str, Any] | None:
    """Where a staged rollout (canary_promotion) of the current canary stands; None without a canary."""
    canary = aliases.get("canary")
    if not canary:
        return None
    if progress.get("release_version") != canary:
        # Put on the canary by hand (registry/CLI), not by canary_promotion: no steps to show.
        return {"index": None, "of": None, "weight": weight, "steps": [], "started": None, "extensions": 0,
                "managed": False}
    try:
        steps = [int(s) for s in progress.get("release_steps", "").split(",") if s.strip()]
        index = int(progress.get("release_step", "0"))
    except ValueError:
        steps, index = [], 0
    return {"index": index + 1, "of": len(steps) or None, "weight": steps[index] if index < len(steps) else weight,
            "steps": steps, "started": _iso(progress.get("release_step_started")),
            "extensions": int(_num(progress.get("release_extensions")) or 0), "managed": True}


def _version_flags(tags: dict[str, str]) -> dict[str, Any]:
    return {
        "rolled_back": tags.get("rolled_back") == "true",
        "rejected": tags.get("rejected") == "true",
        "reason": tags.get("reason"),
        "breaker_tripped": tags.get("breaker_tripped") == "true",
        "breaker_reason": tags.get("breaker_reason"),
        "last_outcome": tags.get("release_last_outcome"),
        "eval": {k.removeprefix("eval_"): _num(v) for k, v in sorted(tags.items()) if k.startswith("eval_") and _num(v) is not None},
    }


# Gate metrics the page shows per version: tag suffix, label, which way passes (voice_lib.eval.gates).
GATE_METRICS = (("wer", "Whisper WER", "<="), ("speaker_similarity", "similarity", ">="),
                ("p808_mos", "DNSMOS P.808", ">="), ("rtf", "RTF", "<="))
LISTEN_ALIASES = ("production", "canary", "candidate")  # side by side on the same sentences


def gate_metrics(settings: Settings, tags: dict[str, str]) -> list[dict[str, Any]]:
    """The gated system's registered metrics with the gate each was held to (WER and P.808 relative to the voice's
    real recordings, as evaluation judged them)."""
    from voice_lib.eval.gates import display_thresholds

    system = settings.eval.gated_system
    limits = display_thresholds(settings.eval, {m: _num(tags.get(f"eval_real_{m}")) for m in ("wer", "p808_mos")})
    out = []
    for metric, label, op in GATE_METRICS:
        value, limit = _num(tags.get(f"eval_{system}_{metric}")), limits.get(metric)
        passed = None if value is None or limit is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"name": metric, "label": label, "value": value, "threshold": limit, "op": op, "passed": passed})
    return out


def version_status(aliases: tuple[str, ...], tags: dict[str, str]) -> tuple[str, list[str]]:
    """What a version is now, and the reasons recorded against it (a rejection's one per failed gate)."""
    def reasons(*keys: str) -> list[str]:
        return [r.strip() for k in keys for r in (tags.get(k) or "").split("; ") if r.strip()]

    if tags.get("rejected") == "true":
        return "rejected", reasons("reason") or ["rejected without a recorded reason"]
    held = [a for a in ALIAS_ORDER if a in aliases]
    if tags.get("rolled_back") == "true" and not held:
        return "rolled back", reasons("reason", "breaker_reason")
    if tags.get("regression") == "true":
        return (held[0] if held else "regressed"), reasons("regression_reason")
    if tags.get("breaker_tripped") == "true":
        return (held[0] if held else "rolled back"), reasons("breaker_reason")
    return (held[0] if held else "registered"), []


def _mlflow_run_url(settings: Settings, run_id: str) -> str | None:
    from voice_lib.core.config import public_url

    experiment = _experiment_of(settings.mlflow_tracking_uri, run_id)
    if not experiment:
        return None
    return f"{public_url(settings.mlflow_tracking_uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


@lru_cache(maxsize=4096)  # a run never changes experiment
def _experiment_of(tracking_uri: str, run_id: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except MlflowException:
        return None


def version_rows(settings: Settings, voice_id: str, versions: list) -> list[dict[str, Any]]:
    """Every version, newest first, with its aliases, status and reasons, gate metrics and links."""
    rows = []
    for v in sorted(versions, key=lambda x: int(x.version), reverse=True):
        status, reasons = version_status(v.aliases, v.tags)
        base = f"api/voices/{voice_id}/versions/{v.version}"
        note = v.tags.get("last_manual_action")
        rows.append({
            "version": v.version, "aliases": [a for a in ALIAS_ORDER if a in v.aliases], "status": status,
            "reasons": reasons, "gates": gate_metrics(settings, v.tags), "run_id": v.run_id or None,
            "backend": v.tags.get("backend") or "end_to_end",
            "last_manual_action": _json_or_none(note),
            "links": {"eval_report": f"{base}/report/report.html" if v.run_id else None,
                      "qc_report": f"{base}/qc/report.html" if v.tags.get("qc_prefix") or v.tags.get("data_sha256") else None,
                      "mlflow_run": _mlflow_run_url(settings, v.run_id) if v.run_id else None},
        })
    return rows


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def listening_view(voice_id: str, aliases: dict[str, str], versions: list, artifacts: Any) -> dict[str, Any]:
    """The listening sentences and, per alias, each version's recording of them (None: that version has none)."""
    run_of = {v.version: v.run_id for v in versions}
    texts: list[str] = []
    columns = []
    for alias in LISTEN_ALIASES:
        version = aliases.get(alias)
        if not version:
            continue
        index = artifacts.listening(run_of.get(version) or "") if artifacts is not None else None
        samples = (index or {}).get("samples") or []
        texts = texts or [s["text"] for s in samples]
        columns.append({"alias": alias, "version": version, "samples": [
            {"text": s["text"], "seconds": s.get("seconds"),
             "url": f"api/voices/{voice_id}/versions/{version}/report/listen/{s['file']}"} for s in samples]})
    return {"texts": texts, "columns": columns}


def history_rows(rows: list[dict]) -> list[dict[str, Any]]:
    return [{"ts": _iso(r.get("ts")), "version": str(r.get("version", "")), "step": r.get("step"),
             "weight": r.get("weight"), "outcome": r.get("outcome"), "detail": r.get("detail") or ""} for r in rows]


def voice_view(settings: Settings, registry: Any, history: Any, voice_id: str, artifacts: Any = None,
               trend: Any = None) -> dict[str, Any]:
    """Everything the page shows for one voice (raises RegistryError when the voice cannot be read).

    ``artifacts`` (reports.RunArtifacts) reads the versions' listening samples; ``trend(settings, voice_id,
    version)`` the production version's nightly metrics. Without them those parts are empty."""
    name = registry.model_name(voice_id)
    state = registry.release_state(name)
    aliases: dict[str, str] = state["aliases"]
    progress: dict[str, str] = state["progress"]
    limits = check_limits(settings.release)

    rows: list[dict] = []
    history_error = None
    try:
        rows = history.rows(voice_id, limit=HISTORY_LIMIT) if history is not None else []
    except Exception as exc:  # the audit DB is optional for this page; the registry is the source of truth
        history_error = f"release history unavailable ({type(exc).__name__}: {exc})"
        log.warning("voice-%s: %s", voice_id, history_error)

    canary = aliases.get("canary")
    focus = canary or aliases.get("candidate") or progress.get("release_version") or aliases.get("production")
    # Versions worth describing: the aliased ones, the one a rollout was driving, the last decided one.
    every = registry.versions(name)  # one search: every version with its tags and aliases
    tags_by_version: dict[str, dict[str, str]] = {v.version: dict(v.tags) for v in every}
    versions = {v: _version_flags(tags) for v, tags in tags_by_version.items()}

    analysis = None
    preferred = [r for r in rows if str(r["version"]) == focus] if focus else []
    for candidates in (preferred, rows):
        with_checks = [r for r in candidates if r.get("checks")]
        if with_checks or candidates:
            analysis = analysis_from_row((with_checks or candidates)[0], limits)
            break
    if analysis is None:
        for v in dict.fromkeys(x for x in (focus, *tags_by_version) if x):
            analysis = analysis_from_tags(v, tags_by_version.get(v, {}), limits)
            if analysis:
                break

    # The server's breaker writes breaker_tripped on the canary version (and sets the weight to 0).
    breaker_version = next((v for v in (canary, analysis and analysis["version"], progress.get("release_version"))
                            if v and versions.get(v, {}).get("breaker_tripped")), None)
    breaker = {"tripped": bool(breaker_version), "version": breaker_version,
               "reason": versions[breaker_version]["breaker_reason"] if breaker_version else None}

    last_rolled_back = next((v for v in (progress.get("release_version"), analysis and analysis["version"],
                                         *sorted(versions, key=int, reverse=True))
                             if v and versions.get(v, {}).get("rolled_back")), None)

    return {
        "voice_id": voice_id,
        "model": name,
        "aliases": {a: aliases[a] for a in ALIAS_ORDER if a in aliases},
        "production": aliases.get("production"),
        "canary": canary,
        "candidate": aliases.get("candidate"),
        "previous": aliases.get("previous"),
        "canary_weight": state["canary_weight"],
        "release_state": state["release_state"],
        "step": _step(aliases, progress, state["canary_weight"]),
        "analysis": analysis,
        "breaker": breaker,
        "rolled_back": ({"version": last_rolled_back, "reason": versions[last_rolled_back]["reason"]}
                        if last_rolled_back else None),
        "versions": versions,
        "version_rows": version_rows(settings, voice_id, every),
        "summary": release_summary(aliases, every),
        "listening": listening_view(voice_id, aliases, every, artifacts),
        "trend": trend(settings, voice_id, aliases.get("production")) if trend and aliases.get("production") else None,
        "history": history_rows(rows),
        "actions": available_actions(state),
        "history_error": history_error,
        "error": None,
    }


def release_summary(aliases: dict[str, str], versions: list) -> str:
    """One line on what the voice can serve: never "idle, none" for a voice whose only version was rejected."""
    if aliases.get("production") or aliases.get("canary") or aliases.get("candidate"):
        return ""
    if not versions:
        return "no version registered yet"
    rejected = [v.version for v in versions if v.tags.get("rejected") == "true"]
    if len(rejected) == len(versions):
        return f"nothing to release: {'version ' if len(rejected) == 1 else 'versions '}{', '.join(rejected)} rejected by the gates"
    return "no version is production, canary or candidate"


def available_actions(state: dict[str, Any]) -> dict[str, bool]:
    """Which buttons make sense in this state (the registry re-checks every action anyway)."""
    aliases, release_state = state["aliases"], state["release_state"]
    has_canary = "canary" in aliases
    return {
        "promote": bool(has_canary or "candidate" in aliases),
        "pause": has_canary and release_state != "paused",
        "resume": has_canary and release_state == "paused",
        "rollback": bool(has_canary or "previous" in aliases),
    }


def voice_id_of(model_name: str) -> str:
    """``voice-<id>`` -> ``<id>``."""
    return model_name.removeprefix("voice-")


