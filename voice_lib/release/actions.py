"""A human's release actions (promote, pause, resume, rollback): one code path for the CLI and the release page.

Each action goes through voice_lib.release.registry (the only writer of the registry), which records the actor
and the reason on the version (``manual_action_<ms>`` / ``last_manual_action`` tags), and adds one row to the
release history (outcome ``manual``) that says who did what and why, next to canary_promotion's decisions.

A rollout held for manual approval (canary_promotion's ``approve`` task) is answered, not bypassed: with an
``approvals`` client (voice_lib/release/approvals.py) a promote of the held canary approves that task and a
rollback also rejects it, so the run goes on (or ends) by the same answer the Airflow UI would give.

Guards against hitting the wrong version:
- a rollback names the canary the human saw (or none): when it changed meanwhile (a DAG or another human
  acted), nothing is rolled back and the human is told to look again;
- a promotion of a version that is not a passed candidate (never passed the gates, rolled back, tripped the
  breaker, regressed) needs ``force`` and a reason (Registry.promote).
"""

from __future__ import annotations

import logging
from typing import Any

from voice_lib.release.registry import Registry, RegistryError
from voice_lib.release.rollout import Decision

log = logging.getLogger(__name__)

ACTIONS = ("promote", "pause", "resume", "rollback")


def _held_approval(approvals: Any, voice_id: str, version: str | None) -> Any:
    """The pending approval of ``version`` (the canary), or None; an unreachable Airflow is said and skipped."""
    from voice_lib.core.airflow import AirflowError

    if approvals is None or not version:
        return None
    try:
        return approvals.waiting_for(voice_id, version)
    except AirflowError as exc:
        log.warning("cannot look for a pending approval of voice-%s version %s (%s); acting on the registry only",
                    voice_id, version, exc)
        return None


def perform(registry: Registry, history: Any, voice_id: str, action: str, *, actor: str,
            reason: str | None = None, version: str | None = None, force: bool = False,
            expected_canary: Any = "seen now", approvals: Any = None) -> str:
    """Run one release action as ``actor``; returns what happened, in a sentence.

    ``history`` is a ReleaseHistory (or None when the audit DB is unavailable: the tags still record it).
    ``expected_canary`` for a rollback: the canary version the human judged (None: none, so production);
    by default the canary read here, which still closes the race with a DAG acting in between.
    ``approvals`` (an AirflowApprovals): promote answers a held rollout's approval instead of promoting at once.
    Raises RegistryError when the action does not fit the voice's state (AirflowError when Airflow refuses
    an answer)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    name = registry.model_name(voice_id)
    state = registry.release_state(name)
    aliases = state["aliases"]
    canary = aliases.get("canary")
    held = _held_approval(approvals, voice_id, canary) if action in ("promote", "rollback") else None
    if action == "promote" and held is not None and str(version or canary) == canary:
        from voice_lib.core.airflow import AirflowError

        try:  # the approve task records the Airflow user who answered; the reason says who asked for it here
            approvals.answer(held, True, f"{(reason or '').strip() or 'approved'} [{actor}]")
        except AirflowError as exc:
            raise RegistryError(f"{name} version {canary} waits for approval, but the answer failed: {exc}") from None
        return (f"{name} version {canary}: approved the held rollout (canary_promotion run {held.dag_run_id}); it "
                "goes to 100 % for one more window, then becomes production")
    if action == "promote":
        target = str(version or aliases.get("canary") or aliases.get("candidate") or "")
        if not target:
            raise RegistryError(f"{name} has no canary or candidate to promote; pass a version number.")
        forced = force and registry.promotion_problem(name, target) is not None
        registry.promote(name, target, force=force, reason=reason, actor=actor)
        old = aliases.get("production")
        message = f"{name} version {target} is production" + (
            f" (previous: version {old})" if old and old != target else "")
        subject = target
    elif action in ("pause", "resume"):
        getattr(registry, action)(name, actor=actor, reason=reason)
        message = (f"{name} canary paused at its current weight" if action == "pause" else
                   f"{name} canary resumed; trigger canary_promotion with voice_id={voice_id} if its run has "
                   "finished, so the steps go on")
        subject, forced = aliases.get("canary", ""), False
    else:
        expected = aliases.get("canary") if expected_canary == "seen now" else expected_canary
        bad = registry.rollback(name, reason or "", expected_canary=expected, actor=actor)
        if bad is None:
            now = registry.aliases(name)
            raise RegistryError(f"{name}: nothing rolled back: the canary is version {now.get('canary', 'none')} "
                                f"now, not {expected or 'none'} as you saw it (someone acted meanwhile); look again.")
        message = (f"{name} canary version {bad} rolled back; production stays version "
                   f"{aliases.get('production', 'none')}" if expected else
                   f"{name} production version {bad} rolled back to version {aliases.get('previous')}")
        subject, forced = bad, False
        if held is not None and held.version == bad:
            _reject_held(approvals, held, f"rolled back by {actor}: {reason}")
    record_action(history, voice_id, subject, state, action, actor, reason, forced, message)
    return message


def _reject_held(approvals: Any, held: Any, reason: str) -> None:
    """Answer the rolled-back canary's pending approval with Reject, so its run ends now instead of at the timeout."""
    from voice_lib.core.airflow import AirflowError

    try:
        approvals.answer(held, False, reason)
    except AirflowError as exc:  # the rollback is done; the run then ends at its timeout, finding no canary
        log.warning("rolled back, but the pending approval (run %s) could not be answered: %s", held.dag_run_id, exc)


def record_action(history: Any, voice_id: str, version: str, state: dict, action: str, actor: str,
                  reason: str | None, forced: bool, message: str) -> None:
    """One release-history row (outcome ``manual``) saying who did what and why."""
    detail = (f"{action} by {actor}{' (forced)' if forced else ''}: {(reason or '').strip() or 'no reason given'}"
              f" -> {message}")
    if history is None:
        log.warning("release history unavailable; %s (recorded on the version's tags)", detail)
        return
    step = int(state["progress"].get("release_step", 0) or 0)
    try:
        history.record(Decision(voice_id, version or "-", step, state["canary_weight"], "manual", [], detail))
    except Exception as exc:  # noqa: BLE001 - the action is done and on the version's tags; say so, go on
        log.error("could not add to the release history (%s): %s", exc, detail)
