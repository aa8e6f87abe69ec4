"""Release control: the canary analysis and the rollout state machine against a real MLflow registry
and a real audit table (rows written by the server's own AuditLog)."""

from __future__ import annotations

import time
import uuid

import pytest

from voice_lib.core.config import ReleaseSettings
from voice_lib.release.rollout import (
    ReleaseHistory,
    WindowStats,
    advance_rollout,
    analyze,
    check_limits,
    start_rollout,
    validate_steps,
)


def test_steps_rise_to_100_and_never_more_than_double():
    assert validate_steps([10, 20, 40, 60, 80, 100]) == [10, 20, 40, 60, 80, 100]
    for bad in ([10, 30, 60, 100], [10, 20], [60, 100], [10, 10, 20, 40, 80, 100], []):
        with pytest.raises(ValueError, match="steps"):
            validate_steps(bad)


def test_analysis_pass_fail_and_inconclusive():
    cfg = ReleaseSettings(min_requests=50)
    good = WindowStats(requests=200, errors=0, p95_latency_ms=300, rtf=0.031)
    prod = WindowStats(requests=800, errors=1, p95_latency_ms=290, rtf=0.030)
    assert all(c.status == "pass" for c in analyze(good, prod, cfg))
    slow = analyze(WindowStats(200, 0, 900, 0.031), prod, cfg)
    assert {c.name for c in slow if c.status == "fail"} == {"p95_latency_ms"}
    failing = analyze(WindowStats(200, 2, 300, 0.031), prod, cfg)  # 1% errors > 0.5%
    assert [c for c in failing if c.name == "error_rate"][0].status == "fail"
    few = analyze(WindowStats(10, 0, 100), prod, cfg)
    assert [c.status for c in few] == ["inconclusive"]


def test_analysis_compares_speed_per_second_of_audio_not_per_request():
    cfg = ReleaseSettings(min_requests=50)
    prod = WindowStats(requests=800, errors=0, p95_latency_ms=290, rtf=0.030)
    # A canary that speaks the same texts 1.7x longer takes 1.7x per request at the same speed: it passes.
    longer = {c.name: c for c in analyze(WindowStats(200, 0, 493, 0.030), prod, cfg)}
    assert all(c.status == "pass" for c in longer.values()) and longer["rtf_ratio"].value == pytest.approx(1.0)
    # A canary 1.5x slower per second of audio fails, even with a p95 well inside the absolute limit.
    slower = {c.name: c for c in analyze(WindowStats(200, 0, 300, 0.045), prod, cfg)}
    assert {n for n, c in slower.items() if c.status == "fail"} == {"rtf_ratio"}
    assert "x1.50 production's" in slower["rtf_ratio"].detail
    # Without enough production requests (the 100 % step) the ratio is not judged; the absolute limit still is.
    alone = {c.name: c for c in analyze(WindowStats(200, 0, 300, 0.6), WindowStats(3, 0, 20, 0.01), cfg)}
    assert alone["rtf_ratio"].status == "skipped" and "only 3 production requests" in alone["rtf_ratio"].detail
    assert alone["rtf"].status == "fail"


def test_the_p95_rule_judges_compute_time_and_never_wall_time(tmp_path):
    """Regression (issue 17): canary analysis judged the audit table's wall time, which includes the queue wait
    another tenant's flood causes; it judges the compute time the server records (as its breaker does), and
    where older servers recorded none it says so instead of judging the wall time."""
    import sqlalchemy as sa

    from serving.audit import AuditLog
    from voice_lib.release.rollout import AuditSource

    cfg = ReleaseSettings(min_requests=50, max_p95_ms=800)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    audit = AuditLog(url)
    now = time.time()
    for i in range(100):  # a healthy canary during a flood: 40-80 ms of synthesis after 2-4 s in the queue
        audit.record(request_id=f"c{i}", voice_id="alice", version="2", variant="canary", status=200,
                     latency_ms=2000.0 + 20 * i, compute_ms=40.0 + 0.4 * i, rtf=0.03)
    assert audit.close(timeout=30)
    stats = AuditSource(url).window("alice", "canary", now - 60, now + 60)
    check = {c.name: c for c in analyze(stats, WindowStats(0, 0, None), cfg)}["p95_latency_ms"]
    assert check.status == "pass" and check.value == pytest.approx(77.6) and "queue wait excluded" in check.detail
    with AuditSource(url).engine.begin() as conn:  # the same rows as a server older than compute_ms wrote them
        conn.execute(sa.text("UPDATE audit_log SET compute_ms = NULL"))
    old = {c.name: c for c in analyze(AuditSource(url).window("alice", "canary", now - 60, now + 60),
                                      WindowStats(0, 0, None), cfg)}["p95_latency_ms"]
    assert old.status == "skipped" and "no compute time" in old.detail
    # A canary that is itself slow still fails.
    slow = analyze(WindowStats(200, 0, 1200.0, 0.03), WindowStats(0, 0, None), cfg)
    assert {c.name: c.status for c in slow}["p95_latency_ms"] == "fail"


def test_the_limits_the_release_page_shows_are_the_ones_analyze_applies():
    cfg = ReleaseSettings(min_requests=40, max_error_rate=0.02, max_p95_ms=650, max_rtf=0.4, max_rtf_ratio=1.3,
                          max_bad_audio_rate=0.05)
    limits = check_limits(cfg)
    checks = analyze(WindowStats(200, 1, 300, 0.03, bad_audio=1), WindowStats(800, 0, 290, 0.03), cfg)
    assert {c.name for c in checks} == {"requests", "error_rate", "p95_latency_ms", "rtf", "rtf_ratio", "bad_audio_rate"}
    for check in checks:
        assert check.threshold == limits[check.name]["threshold"], check


@pytest.fixture
def release_env(tmp_path, mlflow_server):
    """A voice with production v1 and candidate v2 in the real registry, and an audit DB."""
    from mlflow import MlflowClient

    from voice_lib.core.config import Settings
    from voice_lib.release.registry import Registry

    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server)
    settings = settings.model_copy(update={"release": settings.release.model_copy(update={
        "window_seconds": 1.0, "min_requests": 20, "max_extensions": 1})})
    voice = f"rel-{uuid.uuid4().hex[:8]}"
    registry, client = Registry(settings), MlflowClient(mlflow_server)
    exp = client.create_experiment(f"voice-{voice}")
    art = tmp_path / "voice"
    art.mkdir()
    (art / "voice.json").write_text("{}")
    versions = []
    for i in (1, 2):
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(art), "voice")
        tags = {"training_key": f"k{i}-{voice}", "base_model": "voice-base", "base_version": "1", "base_sha256": "x" * 64,
                "data_sha256": "y" * 64, "code_version": "0.1.0", "lora_rank": "8", "gates_passed": "true"}
        versions.append(registry.register(f"voice-{voice}", run.info.run_id, "voice", tags).version)
    registry.promote(f"voice-{voice}", versions[0])
    registry.mark_candidate(f"voice-{voice}", versions[1])
    return settings, voice, versions, registry


def test_synth_user_id_picks_the_variant_the_server_routes_that_user_to(release_env):
    from serving.tenants import stable_bucket
    from voiceops.cli import routed_alias

    settings, voice, versions, registry = release_env
    users = [f"user-{i}" for i in range(200)]
    assert {routed_alias(settings, voice, u) for u in users} == {"production"}  # no canary yet
    registry.set_canary(f"voice-{voice}", versions[1], 30)
    routed = {u: routed_alias(settings, voice, u) for u in users}
    assert all((routed[u] == "canary") == (stable_bucket(u) < 30) for u in users)
    assert 30 <= sum(v == "canary" for v in routed.values()) <= 90  # about 30 % of 200
    registry.rollback(f"voice-{voice}", reason="test")
    assert {routed_alias(settings, voice, u) for u in users} == {"production"}


def _traffic(settings, voice: str, variant: str, n: int, compute_ms: float, status: int = 200, rtf: float = 0.03) -> None:
    """``n`` audit rows as the server writes them: ``compute_ms`` of synthesis, and 50 ms more of wall time."""
    from serving.audit import AuditLog

    audit = AuditLog(settings.resolved_audit_url)
    for i in range(n):
        timed = compute_ms + i % 7 if status < 500 else None
        audit.record(request_id=uuid.uuid4().hex, tenant="t", voice_id=voice, version="x", variant=variant,
                     characters=40, latency_ms=compute_ms + i % 7 + 50, compute_ms=timed,
                     rtf=rtf + (i % 5) / 1000, status=status)
    assert audit.close(timeout=10)


@pytest.mark.slow
def test_good_candidate_walks_every_step_to_production(release_env):
    settings, voice, (v1, v2), registry = release_env
    start = start_rollout(settings, voice, None, [50, 100])
    assert start.version == v2 and registry.release_state(f"voice-{voice}")["canary_weight"] == 50
    assert advance_rollout(settings, voice, v2).outcome == "waiting"  # the window has not elapsed
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 200)
    _traffic(settings, voice, "production", 40, 200)
    step = advance_rollout(settings, voice, v2)
    assert step.outcome == "advanced" and registry.release_state(f"voice-{voice}")["canary_weight"] == 100
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 210)
    done = advance_rollout(settings, voice, v2)
    assert done.outcome == "promoted"
    aliases = registry.aliases(f"voice-{voice}")
    assert aliases["production"] == v2 and aliases["previous"] == v1 and "canary" not in aliases
    history = ReleaseHistory(settings.resolved_audit_url).rows(voice)
    assert [r["outcome"] for r in reversed(history)] == ["advanced", "advanced", "promoted"]
    assert any(k.startswith("release_decision_") for k in registry.version(f"voice-{voice}", v2).tags)


@pytest.mark.slow
def test_slow_canary_is_rolled_back_at_the_first_step_with_the_reason(release_env, caplog):
    settings, voice, (v1, v2), registry = release_env
    start_rollout(settings, voice, None, [10, 20, 40, 60, 80, 100])
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 1500)  # 1.5 s p95: over 800 ms
    _traffic(settings, voice, "production", 40, 200)
    decision = advance_rollout(settings, voice, v2)
    assert decision.outcome == "rolled_back" and decision.step == 0
    state = registry.release_state(f"voice-{voice}")
    assert "canary" not in state["aliases"] and state["canary_weight"] == 0 and state["release_state"] == "rolled_back"
    tags = registry.version(f"voice-{voice}", v2).tags
    assert tags["rolled_back"] == "true" and "p95" in tags["reason"]
    assert ReleaseHistory(settings.resolved_audit_url).rows(voice)[0]["outcome"] == "rolled_back"
    assert "RELEASE ALERT" in caplog.text
    # It never receives traffic again: later pokes change nothing.
    assert advance_rollout(settings, voice, v2).outcome == "rolled_back"
    assert registry.aliases(f"voice-{voice}")["production"] == v1


@pytest.mark.slow
def test_inconclusive_step_is_extended_then_paused(release_env):
    settings, voice, (v1, v2), registry = release_env
    start_rollout(settings, voice, None, [10, 20, 40, 60, 80, 100])
    time.sleep(1.2)
    assert advance_rollout(settings, voice, v2).outcome == "extended"  # no canary requests at all
    time.sleep(1.2)
    assert advance_rollout(settings, voice, v2).outcome == "paused"
    state = registry.release_state(f"voice-{voice}")
    assert state["release_state"] == "paused" and state["aliases"]["canary"] == v2 and state["canary_weight"] == 10


@pytest.mark.slow
def test_breaker_trip_is_completed_as_a_formal_rollback(release_env):
    settings, voice, (v1, v2), registry = release_env
    start_rollout(settings, voice, None, [10, 20, 40, 60, 80, 100])
    registry.set_canary_weight(f"voice-{voice}", 0)  # what the server's breaker does
    registry.set_version_tags(f"voice-{voice}", v2, {"breaker_tripped": "true", "breaker_reason": "error rate 40% > 5%"})
    decision = advance_rollout(settings, voice, v2)
    assert decision.outcome == "rolled_back" and "breaker" in decision.detail
    assert registry.version(f"voice-{voice}", v2).tags["rolled_back"] == "true"


def _approval_settings(settings):
    return settings.model_copy(update={"release": settings.release.model_copy(update={"manual_approval": True})})


@pytest.mark.slow
def test_manual_approval_holds_before_the_last_step_and_goes_on_only_when_approved(release_env):
    settings, voice, (v1, v2), registry = release_env
    settings, name = _approval_settings(settings), f"voice-{voice}"
    start_rollout(settings, voice, None, [25, 50, 100])
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 200)
    _traffic(settings, voice, "production", 40, 200)
    assert advance_rollout(settings, voice, v2).outcome == "advanced"  # 25 -> 50: no approval needed yet
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 200)
    _traffic(settings, voice, "production", 40, 200)
    held = advance_rollout(settings, voice, v2)
    assert held.outcome == "awaiting_approval" and held.held and not held.done
    assert registry.release_state(name)["canary_weight"] == 50  # held below 100 %
    assert advance_rollout(settings, voice, v2).outcome == "awaiting_approval"  # no tag or poke approves it
    outcomes = [r["outcome"] for r in ReleaseHistory(settings.resolved_audit_url).rows(voice)]
    assert outcomes.count("awaiting_approval") == 1  # recorded once, not on every poke
    # The approval's first call analyses the whole time spent at 50 %, then moves to 100 %.
    assert advance_rollout(settings, voice, v2, approved=True).outcome == "advanced"
    assert registry.release_state(name)["canary_weight"] == 100
    time.sleep(1.2)
    _traffic(settings, voice, "canary", 40, 200)
    assert advance_rollout(settings, voice, v2, approved=True).outcome == "promoted"
    assert registry.aliases(name)["production"] == v2


@pytest.mark.slow
def test_a_stale_answer_never_promotes_nor_rolls_back_another_canary(release_env):
    """The canary the approval asked about was rolled back and a newer version put on the canary meanwhile."""
    import json

    from voice_lib.release.approvals import APPROVE, REJECT, on_answer, on_timeout

    settings, voice, (v1, v2), registry = release_env
    name = f"voice-{voice}"
    start_rollout(settings, voice, v2, [50, 100])
    registry.rollback(name, "bad prosody", expected_canary=v2)
    assert "ignored" in on_answer(settings, voice, v2, APPROVE, "alice", "looks fine")
    assert "approve" not in registry.version(name, v2).tags.get("last_manual_action", "")
    v3 = _register_another(settings, voice, registry)
    registry.set_canary(name, v3, 50)
    assert "nothing rolled back" in on_answer(settings, voice, v2, REJECT, "bob", "no")
    assert registry.aliases(name)["canary"] == v3  # the newer canary kept its traffic
    assert "no longer the canary" in on_timeout(settings, {"voice_id": voice, "version": v2, "step": 0}, 1, "rollback")
    assert registry.aliases(name)["canary"] == v3
    # The answer about the current canary acts, and says who and why.
    assert "approved by carol" in on_answer(settings, voice, v3, APPROVE, "carol", "heard it")
    note = json.loads(registry.version(name, v3).tags["last_manual_action"])
    assert (note["action"], note["actor"], note["reason"]) == ("approve", "carol", "heard it")
    assert "rolled back" in on_answer(settings, voice, v3, REJECT, "dave", "robotic on long sentences")
    tags = registry.version(name, v3).tags
    assert "canary" not in registry.aliases(name) and tags["rolled_back"] == "true"
    assert tags["reason"] == "rejected at approval by dave: robotic on long sentences"
    rows = ReleaseHistory(settings.resolved_audit_url).rows(voice)
    assert [r["outcome"] for r in rows[:2]] == ["manual", "manual"] and "reject by dave" in rows[0]["detail"]


@pytest.mark.slow
def test_an_unanswered_approval_pauses_the_canary_at_its_weight(release_env):
    from voice_lib.release.approvals import on_timeout

    settings, voice, (v1, v2), registry = release_env
    start_rollout(settings, voice, v2, [50, 100])
    message = on_timeout(settings, {"voice_id": voice, "version": v2, "step": 0}, 72, "pause")
    state = registry.release_state(f"voice-{voice}")
    assert "no approval within 72 h" in message
    assert (state["release_state"], state["canary_weight"], state["aliases"]["canary"]) == ("paused", 50, v2)
    assert ReleaseHistory(settings.resolved_audit_url).rows(voice)[0]["outcome"] == "paused"


def _register_another(settings, voice: str, registry) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.create_run(client.get_experiment_by_name(f"voice-{voice}").experiment_id)
    client.log_text(run.info.run_id, "{}", "voice/voice.json")
    tags = {"training_key": f"k3-{voice}", "base_model": "voice-base", "base_version": "1", "base_sha256": "x" * 64,
            "data_sha256": "y" * 64, "code_version": "0.1.0", "lora_rank": "8", "gates_passed": "true"}
    return registry.register(f"voice-{voice}", run.info.run_id, "voice", tags).version


CANARY_DAG_PROBE = r"""
import copy, importlib.util, json, sys
from airflow.dag_processing.dagbag import DagBag
from voice_lib.release.rollout import start_rollout
folder, voice = sys.argv[1], sys.argv[2]
dag = DagBag(dag_folder=folder).dags["canary_promotion"]
params = copy.deepcopy(dag.params)
params.update({"voice_id": voice, "version": ""})  # what onboarding's trigger gives: no release knobs
resolved = params.validate()
spec = importlib.util.spec_from_file_location("canary_promotion_module", f"{folder}/canary_promotion.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
settings = module._settings(resolved)  # what every task of the run computes from its params
decision = start_rollout(settings, voice, None, settings.release.steps)
print(json.dumps({"release": settings.release.model_dump(mode="json", include={"steps", "window_seconds",
                  "blackout_hours", "manual_approval", "poke_seconds"}), "weight": decision.weight}))
"""


def test_canary_promotion_follows_the_release_settings_when_not_given_as_params(release_env):
    """Regression: the DAG's Param defaults (10..100 %, 7200 s, no blackout, no approval) overwrote
    VOICEOPS_RELEASE__*, so the rollout onboarding starts ignored them."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from voiceops.stack import airflow_env

    settings, voice, versions, registry = release_env
    settings.home.mkdir(parents=True, exist_ok=True)
    env = {**airflow_env(settings), "VOICEOPS_RELEASE__STEPS": "[25, 50, 100]",
           "VOICEOPS_RELEASE__WINDOW_SECONDS": "42", "VOICEOPS_RELEASE__BLACKOUT_HOURS": "[3, 4]",
           "VOICEOPS_RELEASE__MANUAL_APPROVAL": "true", "VOICEOPS_RELEASE__POKE_SECONDS": "7",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CANARY_DAG_PROBE, str(Path(__file__).resolve().parent.parent / "dags"),
                          voice], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["release"] == {"steps": [25, 50, 100], "window_seconds": 42.0, "blackout_hours": [3, 4],
                                "manual_approval": True, "poke_seconds": 7.0}
    assert probe["weight"] == 25  # the rollout started at the configured first step
    state = registry.release_state(f"voice-{voice}")
    assert state["canary_weight"] == 25 and state["progress"]["release_steps"] == "25,50,100"


def test_a_failed_alert_never_logs_the_webhook_url(tmp_path, caplog):
    """Regression: alert_webhook_url was a plain str, logged with its token when the POST failed (task logs)."""
    import logging

    from voice_lib.core.config import Settings
    from conftest import free_port
    from voice_lib.release.rollout import Decision, alert

    token = f"T0KEN{uuid.uuid4().hex}"
    url = f"http://127.0.0.1:{free_port()}/services/{token}"  # nothing listens: the POST fails
    settings = Settings(home=tmp_path, release={"alert_webhook_url": url})
    assert token not in repr(settings) and token not in settings.model_dump_json()
    with caplog.at_level(logging.WARNING):
        alert(settings, Decision("v", "2", 0, 10, "rolled_back", [], "error rate 40%"))
    assert "alert webhook at 127.0.0.1 failed" in caplog.text and token not in caplog.text
