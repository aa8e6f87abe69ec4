"""The canary's manual approval: one Airflow Human-in-the-loop task, answered wherever the human is.

With ``manual_approval`` canary_promotion holds a rollout whose steps below 100 % all passed in its ``approve``
task (an ApprovalOperator; on Airflow 3.3 the task waits in ``awaiting_input``, holding no worker slot). A human
answers that task in the Airflow UI (*Required Actions*), on the release page, or with ``voiceops promote`` /
``voiceops rollback``; the last two find it and answer it through Airflow's REST API (the HITL details endpoints
under /api/v2), so there is one approval, wherever it is given. This module holds:

- the request's subject (``approval_subject``), which names the voice and version the REST side reads back;
- what the task does with an answer (``on_answer``, ``on_timeout``), always against the canary it asked about:
  a canary rolled back or superseded meanwhile is neither promoted nor rolled back by a stale answer;
- ``AirflowApprovals``: the REST client of the CLI and the release page.

Every answer is recorded like any manual action: actor and reason on the version's tags and a release-history
row (voice_lib.release.actions).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from voice_lib.core.airflow import TIMEOUT_SECONDS, AirflowError, api_token
from voice_lib.core.config import Settings

log = logging.getLogger(__name__)

APPROVAL_DAG = "canary_promotion"
APPROVAL_TASK = "approve"
APPROVE, REJECT = "Approve", "Reject"  # ApprovalOperator's two options
TIMEOUT_ACTIONS = ("pause", "rollback")
WAITING_STATES = ("awaiting_input", "deferred")  # parked for an answer (3.3+; deferred before 3.3)
_SUBJECT = re.compile(r"^Release voice-(?P<voice_id>[a-z0-9][a-z0-9-]{1,62}) version (?P<version>\d+) to 100 %")


def approval_subject(voice_id: str, version: str) -> str:
    return f"Release voice-{voice_id} version {version} to 100 % of users, then production?"


def approval_body(decision: dict[str, Any], timeout_hours: float, timeout_action: str) -> str:
    """Markdown for the Required Actions form: where the rollout stands, the last analysis, what each answer does."""
    rows = "\n".join(f"| {c['name']} | {c['status']} | {c.get('detail', '')} |" for c in decision.get("checks") or [])
    checks = f"| check | status | detail |\n|---|---|---|\n{rows}\n\n" if rows else ""
    return (f"voice-{decision['voice_id']} version {decision['version']} is the canary at **{decision['weight']} %** "
            f"of users and passed every step so far. The last analysis:\n\n{checks}"
            f"**Approve**: the canary goes to 100 % for one more observation window, then becomes production "
            f"(blackout hours still hold). **Reject**: the canary is rolled back now. Write why in *reason*; it is "
            f"recorded on the version with your name.\n\nWithout an answer within {timeout_hours:g} h the rollout is "
            f"{'paused at its weight' if timeout_action == 'pause' else 'rolled back'}.")


def _record(settings: Settings, registry: Any, voice_id: str, version: str, action: str, actor: str, reason: str,
            message: str) -> None:
    from voice_lib.release.actions import record_action
    from voice_lib.release.rollout import ReleaseHistory

    state = registry.release_state(registry.model_name(voice_id))
    record_action(ReleaseHistory(settings.resolved_audit_url), voice_id, version, state, action, actor, reason, False,
                  message)


def on_answer(settings: Settings, voice_id: str, version: str, chosen: str, actor: str | None, reason: str) -> str:
    """The approve task's handling of a human's answer about ``version``; returns what happened, in a sentence."""
    from voice_lib.release.registry import Registry
    from voice_lib.release.rollout import Decision, alert

    registry = Registry(settings)
    name, actor, reason = registry.model_name(voice_id), actor or "unknown", (reason or "").strip()
    canary = registry.aliases(name).get("canary")
    if chosen == APPROVE:
        if canary != str(version):  # rolled back or superseded while the question waited
            message = (f"approval by {actor} of {name} version {version} ignored: the canary is "
                       f"{'version ' + canary if canary else 'gone'} now")
            log.warning(message)
            return message
        registry.note_action(name, version, "approve", actor, reason)
        message = f"{name} version {version} approved by {actor} for 100 %"
        _record(settings, registry, voice_id, version, "approve", actor, reason, message)
        return message
    why = f"rejected at approval by {actor}: {reason or 'no reason given'}"
    bad = registry.rollback(name, why, expected_canary=version, actor=actor)
    if bad is None:
        return f"rejection by {actor} of {name} version {version}: nothing rolled back, the canary is {canary or 'gone'} now"
    message = f"{name} canary version {bad} rolled back"
    _record(settings, registry, voice_id, version, "reject", actor, reason, message)
    alert(settings, Decision(voice_id, str(version), 0, 0, "rolled_back", [], why))
    return message


def on_timeout(settings: Settings, decision: dict[str, Any], hours: float, action: str) -> str:
    """Nobody answered within ``hours``: pause the canary at its weight, or roll it back (the ``action``)."""
    from voice_lib.release.registry import Registry
    from voice_lib.release.rollout import Decision, alert, record_decision

    if action not in TIMEOUT_ACTIONS:
        raise ValueError(f"approval timeout action {action!r}: use one of {', '.join(TIMEOUT_ACTIONS)}")
    registry = Registry(settings)
    voice_id, version = decision["voice_id"], str(decision["version"])
    name = registry.model_name(voice_id)
    state = registry.release_state(name)
    if state["aliases"].get("canary") != version:
        return f"approval of {name} version {version} timed out; it is no longer the canary, nothing to do"
    why = f"no approval within {hours:g} h"
    if action == "pause":
        if state["release_state"] != "paused":
            registry.pause(name)
        detail = f"{why}: paused at {state['canary_weight']} %; `voiceops promote` or `voiceops rollback` it"
        outcome = "paused"
    else:
        if registry.rollback(name, why, expected_canary=version) is None:
            return f"approval of {name} version {version} timed out; the canary changed meanwhile, nothing rolled back"
        detail, outcome = f"{why}: rolled back", "rolled_back"
    result = Decision(voice_id, version, int(decision.get("step", 0)), state["canary_weight"], outcome, [], detail)
    record_decision(settings, registry, result)
    alert(settings, result)
    return f"{name} version {version}: {detail}"


# --- the REST side: the CLI and the release page answer the same task -------------------------------

@dataclass(frozen=True)
class PendingApproval:
    voice_id: str
    version: str
    dag_run_id: str
    map_index: int
    subject: str
    created_at: str | None
    url: str  # the task's Required Actions page in the Airflow UI


class AirflowApprovals:
    """canary_promotion's pending approvals over Airflow's REST API, as the holder of ``token``."""

    def __init__(self, base_url: str, token: str, timeout: float = TIMEOUT_SECONDS):
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    @classmethod
    def for_stack(cls, settings: Settings) -> "AirflowApprovals":
        """As the stack's Airflow user (the CLI)."""
        return cls(settings.airflow_url, api_token(settings))

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return httpx.request(method, f"{self.base}/api/v2{path}", headers=self.headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise AirflowError(f"Cannot reach Airflow at {self.base}: {exc}") from exc

    def pending(self, voice_id: str | None = None) -> list[PendingApproval]:
        """Unanswered approvals (of one voice), newest first."""
        query = {"task_id": APPROVAL_TASK, "response_received": "false", "order_by": "-created_at", "limit": 100}
        if voice_id:
            query["subject_search"] = f"voice-{voice_id} version"
        resp = self._call("GET", f"/dags/{APPROVAL_DAG}/dagRuns/~/hitlDetails", params=query)
        if resp.status_code != 200:
            raise AirflowError(f"Airflow answered HTTP {resp.status_code} listing {APPROVAL_DAG} approvals: {resp.text[:300]}")
        found = []
        for detail in resp.json().get("hitl_details", []):
            ti, match = detail.get("task_instance") or {}, _SUBJECT.match(detail.get("subject") or "")
            if not match or ti.get("state") not in WAITING_STATES or (voice_id and match["voice_id"] != voice_id):
                continue
            run_id, map_index = ti["dag_run_id"], int(ti.get("map_index", -1))
            found.append(PendingApproval(match["voice_id"], match["version"], run_id, map_index, detail["subject"],
                                         detail.get("created_at"), f"{self.base}/dags/{APPROVAL_DAG}/runs/{run_id}/"
                                         f"tasks/{APPROVAL_TASK}/required_actions?map_index={map_index}"))
        return found

    def waiting_for(self, voice_id: str, version: str | None) -> PendingApproval | None:
        """The unanswered approval of ``version`` of the voice (None: no run waits for one)."""
        return next((p for p in self.pending(voice_id) if version is None or p.version == str(version)), None)

    def answer(self, pending: PendingApproval, approve: bool, reason: str) -> dict[str, Any]:
        """Answer as this token's user (Airflow records who); the approve task does the rest."""
        path = f"/dags/{APPROVAL_DAG}/dagRuns/{pending.dag_run_id}/taskInstances/{APPROVAL_TASK}/{pending.map_index}/hitlDetails"
        resp = self._call("PATCH", path, json={"chosen_options": [APPROVE if approve else REJECT],
                                                "params_input": {"reason": (reason or "").strip()}})
        if resp.status_code == 409:
            raise AirflowError(f"the approval of voice-{pending.voice_id} version {pending.version} "
                               f"(run {pending.dag_run_id}) was answered already; look at {pending.url}")
        if resp.status_code in (401, 403):
            raise AirflowError(f"Airflow refused the answer (HTTP {resp.status_code}): approving needs edit access "
                               f"to {APPROVAL_DAG} runs. {resp.text[:200]}")
        if resp.status_code != 200:
            raise AirflowError(f"Airflow answered HTTP {resp.status_code} to the approval of voice-{pending.voice_id} "
                               f"version {pending.version}: {resp.text[:300]}")
        return resp.json()
