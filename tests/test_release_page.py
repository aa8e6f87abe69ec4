"""The release page plugin (plugins/voiceops_release): a real Airflow standalone serving it, a real MLflow
registry behind it, and Debian's Chromium driven by Playwright through Airflow's own login page."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port, skip_unless_required, wait_until

from voice_lib.core.config import ReleaseSettings, Settings
from voice_lib.release.rollout import check_limits

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REASON = "p95 doubled on the canary (release page test)"


def _state_module():
    if str(PLUGINS) not in sys.path:
        sys.path.insert(0, str(PLUGINS))
    from voiceops_release import state

    return state


# --- the page's view of the registry, without servers ---------------------------------------------

def test_analysis_from_decision_tags_uses_the_newest_and_configured_thresholds():
    state = _state_module()
    limits = check_limits(ReleaseSettings(max_p95_ms=700, min_requests=30))
    old = {"step": 0, "weight": 10, "outcome": "extended", "detail": "inconclusive", "checks": {"requests": ["inconclusive", 3]}, "ts": 1}
    new = {"step": 1, "weight": 20, "outcome": "advanced", "detail": "step passed", "ts": 2,
           "checks": {"p95_latency_ms": ["pass", 512.5], "requests": ["pass", 120], "error_rate": ["pass", 0.0]}}
    tags = {"release_decision_1000": json.dumps(old), "release_decision_2000": json.dumps(new),
            "release_decision_junk": "{", "reason": "x"}
    got = state.analysis_from_tags("2", tags, limits)
    assert got["outcome"] == "advanced" and got["version"] == "2" and got["source"] == "version_tags"
    checks = {c["name"]: c for c in got["checks"]}
    assert [c["name"] for c in got["checks"]] == ["requests", "error_rate", "p95_latency_ms"]  # the page's order
    assert checks["p95_latency_ms"]["value"] == 512.5 and checks["p95_latency_ms"]["threshold"] == 700
    assert checks["requests"]["threshold"] == 30 and checks["requests"]["op"] == ">="
    assert state.analysis_from_tags("2", {"reason": "x"}, limits) is None


def test_actions_offered_follow_the_release_state():
    state = _state_module()
    canary = {"aliases": {"production": "1", "canary": "2"}, "release_state": "canary"}
    assert state.available_actions(canary) == {"promote": True, "pause": True, "resume": False, "rollback": True}
    paused = {**canary, "release_state": "paused"}
    assert state.available_actions(paused) == {"promote": True, "pause": False, "resume": True, "rollback": True}
    idle = {"aliases": {"production": "1"}, "release_state": "idle"}
    assert not any(state.available_actions(idle).values())
    assert state.available_actions({"aliases": {"production": "2", "previous": "1"}, "release_state": "idle"})["rollback"]


def test_a_version_s_status_and_reasons_come_from_its_tags():
    state = _state_module()
    reasons = "adapted speaker_similarity 0.62 < 0.80 (X); adapted wer_gap_over_real 0.31 > 0.10 (Y)"
    assert state.version_status((), {"rejected": "true", "reason": reasons}) == ("rejected", [
        "adapted speaker_similarity 0.62 < 0.80 (X)", "adapted wer_gap_over_real 0.31 > 0.10 (Y)"])
    assert state.version_status((), {"rolled_back": "true", "reason": "p95 doubled"}) == ("rolled back", ["p95 doubled"])
    assert state.version_status(("canary", "candidate"), {}) == ("canary", [])  # the alias that matters most
    assert state.version_status(("production",), {"regression": "true", "regression_reason": "wer 0.3 vs 0.1"}) == (
        "production", ["wer 0.3 vs 0.1"])
    assert state.version_status((), {}) == ("registered", [])


def test_summary_never_calls_a_voice_with_only_rejected_versions_idle():
    from voice_lib.release.registry import ModelVersionInfo

    state = _state_module()
    v = lambda n, **tags: ModelVersionInfo("voice-x", n, "r", "s", tags)  # noqa: E731
    assert state.release_summary({}, [v("1", rejected="true")]) == "nothing to release: version 1 rejected by the gates"
    assert state.release_summary({}, [v("1", rejected="true"), v("2", rejected="true")]).startswith("nothing to release: versions 1, 2")
    assert state.release_summary({}, [v("1", rejected="true"), v("2")]) == "no version is production, canary or candidate"
    assert state.release_summary({"candidate": "2"}, [v("1", rejected="true"), v("2")]) == ""
    assert state.release_summary({}, []) == "no version registered yet"


def test_gate_metrics_are_judged_as_evaluation_judged_them():
    from voice_lib.core.config import EvalSettings

    state = _state_module()
    settings = Settings(eval=EvalSettings(max_wer_gap_over_real=0.1, min_speaker_similarity=0.8, max_rtf=0.5))
    tags = {"eval_adapted_wer": "0.2", "eval_real_wer": "0.05", "eval_adapted_speaker_similarity": "0.81",
            "eval_adapted_rtf": "0.7"}
    gates = {g["name"]: g for g in state.gate_metrics(settings, tags)}
    assert (gates["wer"]["threshold"], gates["wer"]["passed"]) == (pytest.approx(0.15), False)  # relative to real speech
    assert gates["speaker_similarity"]["passed"] is True and gates["rtf"]["passed"] is False
    assert gates["p808_mos"]["value"] is None and gates["p808_mos"]["passed"] is None  # not measured: not judged


def test_report_paths_stay_inside_the_report():
    if str(PLUGINS) not in sys.path:
        sys.path.insert(0, str(PLUGINS))
    from voiceops_release.reports import ReportNotFound, safe_path

    assert safe_path("listen/0.wav") == "listen/0.wav" and safe_path("report.html") == "report.html"
    for bad in ("../voice/voice.json", "listen/../../x", "/etc/passwd", "a//b", "", "listen\\0.wav"):
        with pytest.raises(ReportNotFound):
            safe_path(bad)


def test_every_route_of_the_plugin_checks_the_airflow_permissions():
    """Airflow does not authenticate plugin apps: each route must depend on reader (GET) or writer (POST)."""
    if str(PLUGINS) not in sys.path:
        sys.path.insert(0, str(PLUGINS))
    from fastapi.routing import APIRoute

    from voiceops_release import app as plugin

    def calls(dependant) -> set:
        return {dependant.call} | {c for d in dependant.dependencies for c in calls(d)}

    routes = [r for r in plugin.app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 8  # page, list, one voice, two report routes, four actions
    for route in routes:
        needed = plugin.writer if "POST" in route.methods else plugin.reader
        assert needed in calls(route.dependant), f"{route.path} does not check {needed.__name__}"


# --- the real thing ---------------------------------------------------------------------------------

@pytest.fixture
def browser():
    """Debian's Chromium under Playwright (never `playwright install`); skips, saying why, when unavailable."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_unless_required("playwright is not installed: pip install -e '.[dev]'")
    if not Path(CHROMIUM).exists():
        skip_unless_required(f"Debian chromium is not installed ({CHROMIUM} is missing): run scripts/install-system-deps.sh")
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except PlaywrightError as exc:
            skip_unless_required(f"{CHROMIUM} could not be launched by Playwright: {exc.message.splitlines()[0]}")
        try:
            yield browser
        finally:
            browser.close()


def _register_two_versions(settings: Settings, tmp_path: Path, voice: str) -> str:
    """voice-<voice> with versions 1 (production) and 2 in the real registry, as tests/test_release.py does."""
    from mlflow import MlflowClient

    from voice_lib.release.registry import Registry

    name = f"voice-{voice}"
    registry, client = Registry(settings), MlflowClient(settings.mlflow_tracking_uri)
    exp = client.create_experiment(name)
    art = tmp_path / voice
    art.mkdir()
    (art / "voice.json").write_text("{}")
    for i in (1, 2):
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(art), "voice")
        tags = {"training_key": f"k{i}-{voice}", "base_model": "voice-base", "base_version": "1", "base_sha256": "x" * 64,
                "data_sha256": "y" * 64, "code_version": "0.1.0", "lora_rank": "8", "gates_passed": "true"}
        assert registry.register(name, run.info.run_id, "voice", tags).version == str(i)
    registry.promote(name, "1")
    return name


def _register_voice_in_canary(settings: Settings, tmp_path: Path) -> str:
    """Production v1 and v2 on the canary at 20% (step 2 of a staged rollout, one decision in the history)."""
    from voice_lib.release.registry import Registry
    from voice_lib.release.rollout import CheckResult, Decision, ReleaseHistory

    voice = f"page-{uuid.uuid4().hex[:8]}"
    name = _register_two_versions(settings, tmp_path, voice)
    registry = Registry(settings)
    registry.set_canary(name, "2", 20)
    # What canary_promotion leaves after its first step passed: progress on the model, a decision in the history.
    registry.set_release_progress(name, release_version="2", release_step=1, release_steps="10,20,40,80,100",
                                  release_step_started=f"{time.time():.0f}", release_extensions=0)
    cfg = settings.release
    ReleaseHistory(settings.resolved_audit_url).record(Decision(voice, "2", 0, 10, "advanced", [
        CheckResult("requests", "pass", 240, cfg.min_requests, "240 canary requests"),
        CheckResult("error_rate", "pass", 0.0, cfg.max_error_rate, "canary error rate 0.00% (limit 0.50%)"),
        CheckResult("p95_latency_ms", "pass", 412.0, 480.0, "canary p95 412 ms vs limit 480 ms"),
        CheckResult("rtf_ratio", "pass", 0.95, cfg.max_rtf_ratio, "canary RTF 0.029 is x0.95 production's 0.031 (limit x1.2)"),
    ], "step passed; canary now at 20%"))
    return voice


def _register_voice_with_tripped_breaker(settings: Settings, tmp_path: Path) -> str:
    """A canary the server's breaker took out of traffic; its last decision only in version tags (no history row)."""
    from voice_lib.release.registry import Registry

    voice = f"brk-{uuid.uuid4().hex[:8]}"
    name = _register_two_versions(settings, tmp_path, voice)
    registry = Registry(settings)
    registry.set_canary(name, "2", 10)
    decision = {"step": 0, "weight": 10, "outcome": "extended", "detail": "inconclusive, window extended (1/3)",
                "checks": {"requests": ["inconclusive", 7]}, "ts": int(time.time())}
    registry.set_version_tags(name, "2", {f"release_decision_{int(time.time() * 1000)}": json.dumps(decision),
                                          "breaker_tripped": "true", "breaker_reason": "error rate 40% > 5%"})
    registry.set_canary_weight(name, 0)  # what the breaker does
    return voice


def _viewer_token(admin_token: str, settings: Settings) -> str:
    """A JWT for a viewer-role user, signed like Airflow signs its own (the stack only defines admin)."""
    import jwt

    secret = (settings.home / "airflow" / "jwt-secret.txt").read_text().strip()
    header = jwt.get_unverified_header(admin_token)
    claims = jwt.decode(admin_token, options={"verify_signature": False})
    claims.update(sub="release-viewer", role="viewer", jti=uuid.uuid4().hex)
    return jwt.encode(claims, secret, algorithm=header["alg"], headers={"kid": header.get("kid")})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_release_page_in_airflow_rolls_back_a_canary(tmp_path, mlflow_server, browser):
    from voice_lib.release.registry import Registry
    from voiceops import stack

    # A password in the tracking URI (MLflow without auth ignores it) that no answer or log may show.
    password = f"pw-{uuid.uuid4().hex}"
    tracking = mlflow_server.replace("://", f"://voiceops:{password}@", 1)
    settings = Settings(home=tmp_path / "home", airflow_port=free_port(), mlflow_tracking_uri=tracking)
    assert stack.airflow_env(settings)["VOICEOPS_MLFLOW_TRACKING_URI"] == tracking  # what the plugin will read
    voice = _register_voice_in_canary(settings, tmp_path)
    tripped = _register_voice_with_tripped_breaker(settings, tmp_path)
    name = f"voice-{voice}"
    registry = Registry(settings)
    base = settings.airflow_url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        stack.up(settings, services=("airflow",), timeout=180)

        # --- the plugin is loaded, without import errors (Airflow imports every .py under plugins/) --------
        token = stack.airflow_api_token(settings)
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/api/v2/plugins/importErrors", headers=auth, timeout=60).json()["total_entries"] == 0
        plugins = {p["name"]: p for p in httpx.get(f"{base}/api/v2/plugins", headers=auth).json()["plugins"]}
        assert [v["name"] for v in plugins["voiceops_release"]["external_views"]] == ["Releases"]

        # --- authentication and authorization ------------------------------------------------------------
        anon = httpx.get(f"{base}/voiceops/api/voices", timeout=30)
        assert anon.status_code == 401 and "log in" in anon.json()["detail"]
        page_anon = httpx.get(f"{base}/voiceops/", timeout=30)  # the HTML page sends the browser to the login
        assert page_anon.status_code == 302 and page_anon.headers["location"].startswith("/auth/login?next=")
        listed = httpx.get(f"{base}/voiceops/api/voices", headers=auth, timeout=60)
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert body["user"] == "admin" and body["can_write"] is True
        mine = next(v for v in body["voices"] if v["voice_id"] == voice)
        assert (mine["production"], mine["canary"], mine["canary_weight"], mine["release_state"]) == ("1", "2", 20, "canary")
        assert mine["step"]["index"] == 2 and mine["step"]["of"] == 5
        assert {c["name"]: c["value"] for c in mine["analysis"]["checks"]}["p95_latency_ms"] == 412.0
        broken = next(v for v in body["voices"] if v["voice_id"] == tripped)
        assert broken["breaker"] == {"tripped": True, "version": "2", "reason": "error rate 40% > 5%"}
        assert broken["canary_weight"] == 0 and broken["analysis"]["source"] == "version_tags"
        assert broken["analysis"]["checks"][0] == {**broken["analysis"]["checks"][0], "name": "requests",
                                                   "status": "inconclusive", "value": 7, "threshold": 50}

        missing = httpx.post(f"{base}/voiceops/api/voices/nobody-here/pause", headers=auth, json={}, timeout=60)
        assert missing.status_code == 404 and "nobody-here" in missing.json()["detail"]
        # Regression: the page's list and its 404s showed the tracking URI with its password.
        assert password not in listed.text and password not in missing.text and "voiceops:***@" in listed.text
        conflict = httpx.post(f"{base}/voiceops/api/voices/{voice}/resume", headers=auth, json={}, timeout=60)
        assert conflict.status_code == 409 and "not a paused canary" in conflict.json()["detail"]
        no_json = httpx.post(f"{base}/voiceops/api/voices/{voice}/pause", headers=auth, timeout=60)
        assert no_json.status_code == 415
        no_reason = httpx.post(f"{base}/voiceops/api/voices/{voice}/rollback", headers=auth, json={"reason": " "}, timeout=60)
        assert no_reason.status_code == 422 and "reason" in no_reason.json()["detail"]

        viewer = {"Authorization": f"Bearer {_viewer_token(token, settings)}"}
        seen = httpx.get(f"{base}/voiceops/api/voices", headers=viewer, timeout=60)
        assert seen.status_code == 200 and seen.json()["can_write"] is False
        refused = httpx.post(f"{base}/voiceops/api/voices/{voice}/rollback", headers=viewer, json={"reason": "no"}, timeout=60)
        assert refused.status_code == 403 and "release-viewer" in refused.json()["detail"]
        assert registry.aliases(name).get("canary") == "2"  # nothing was changed by the refused calls

        # --- a person: Airflow's login page, the Releases nav entry, Rollback --------------------------------
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        dialogs: list[tuple[str, str]] = []

        def answer(dialog) -> None:
            dialogs.append((dialog.type, dialog.message))
            dialog.accept(REASON) if dialog.type == "prompt" else dialog.accept()

        page.goto(f"{base}/")
        page.wait_for_url("**/auth/login**")
        page.fill("input[name=username]", settings.airflow_username)
        page.fill("input[name=password]", stack.airflow_password(settings))
        page.click("button[type=submit]")
        page.get_by_role("button", name="Browse").click()
        with page.context.expect_page() as opened:  # the nav entry opens the page in a new tab
            page.get_by_role("menuitem", name="Releases").click()
        page = opened.value
        page.set_default_timeout(30_000)
        page.on("dialog", answer)
        page.wait_for_url(f"{base}/voiceops/")
        card = page.locator(f"[data-voice='{voice}']")
        card.wait_for()
        assert card.locator("[data-field=production] .value").inner_text() == "v1"
        assert card.locator("[data-field=canary] .value").inner_text() == "v2"
        assert "20%" in card.locator("[data-field=canary_weight]").inner_text()
        assert card.locator("[data-field=release_state]").inner_text() == "canary"
        assert "step 2 of 5 (20%)" in card.locator("[data-field=step]").inner_text()
        p95 = card.locator("[data-check=p95_latency_ms]").inner_text()
        assert "412 ms" in p95 and "≤ 480 ms" in p95 and "pass" in p95
        speed = card.locator("[data-check=rtf_ratio]").inner_text()  # canary speed relative to production's
        assert "×0.95" in speed and "≤ ×1.20" in speed and "pass" in speed
        assert "ok" in card.locator("[data-field=breaker]").inner_text()
        assert "tripped on v2" in page.locator(f"[data-voice='{tripped}'] [data-field=breaker]").inner_text()
        before = shots / "release-page.png"
        page.screenshot(path=str(before))

        card.locator("button[data-action=rollback]").click()
        page.locator(".banner.ok").wait_for()
        card.locator("[data-field=release_state]", has_text="rolled_back").wait_for()
        assert [t for t, _ in dialogs] == ["confirm", "prompt"]
        assert f"canary version 2 of {name}" in dialogs[0][1]
        assert card.locator("[data-field=canary] .value").inner_text() == "none"
        assert REASON in card.locator("[data-field=rolled_back]").inner_text()
        page.screenshot(path=str(shots / "release-page-rolled-back.png"))
        print(f"\nscreenshots: {before} and {shots / 'release-page-rolled-back.png'}")

        # --- and the registry really changed --------------------------------------------------------------
        state = registry.release_state(name)
        assert "canary" not in state["aliases"] and state["aliases"]["production"] == "1"
        assert state["canary_weight"] == 0 and state["release_state"] == "rolled_back"
        tags = registry.version(name, "2").tags
        assert tags["rolled_back"] == "true" and tags["reason"] == REASON
        note = json.loads(tags["last_manual_action"])  # who did it, from the Airflow login
        assert (note["action"], note["actor"], note["reason"]) == ("rollback", "admin", REASON)
    finally:
        stack.down(settings)
    for log_file in sorted(settings.log_dir.rglob("*")):  # the API server's and every task's log
        if log_file.is_file():
            assert password not in log_file.read_text(errors="replace"), f"the MLflow password is in {log_file}"


# --- manual approval: Airflow's Human-in-the-loop task, answered in its UI and by `voiceops promote` ------

class AuditTraffic:
    """Canary and production requests of some voices, written to the audit table as the server writes them, so the
    rollout's analysis has numbers to judge (the model server itself is not under test here)."""

    def __init__(self, settings: Settings, voices: list[str]):
        import threading

        from serving.audit import AuditLog

        self.audit, self.voices, self.stop = AuditLog(settings.resolved_audit_url), voices, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for voice in self.voices:
                for variant in ("canary", "production"):
                    self.audit.record(request_id=uuid.uuid4().hex, tenant="t", voice_id=voice, version="x",
                                      variant=variant, characters=40, latency_ms=120, compute_ms=100,
                                      rtf=0.03, status=200)

    def __enter__(self) -> "AuditTraffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.audit.close(timeout=10)


_wait = wait_until


def _login(browser, base: str, settings, height: int):
    """A browser page logged in to Airflow as the admin user, on the Dags view."""
    from voiceops import stack

    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.set_default_timeout(30_000)
    page.goto(f"{base}/")
    page.wait_for_url("**/auth/login**")
    page.fill("input[name=username]", settings.airflow_username)
    page.fill("input[name=password]", stack.airflow_password(settings))
    page.click("button[type=submit]")
    page.get_by_role("link", name="Dags").first.wait_for()
    return page


def _task_states(base: str, auth: dict, run_id: str) -> dict[str, str | None]:
    tis = httpx.get(f"{base}/api/v2/dags/canary_promotion/dagRuns/{run_id}/taskInstances", headers=auth, timeout=30)
    return {t["task_id"]: t["state"] for t in tis.json()["task_instances"]}


def _run_state(base: str, auth: dict, run_id: str) -> str | None:
    state = httpx.get(f"{base}/api/v2/dags/canary_promotion/dagRuns/{run_id}", headers=auth, timeout=30).json()["state"]
    return state if state in ("success", "failed") else None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_canary_approval_in_required_actions_and_by_voiceops_promote(tmp_path, mlflow_server, browser):
    import os
    import subprocess

    from voice_lib.release.registry import Registry
    from voice_lib.release.rollout import ReleaseHistory
    from voiceops import stack

    release = ReleaseSettings(min_requests=5, poke_seconds=2.0)
    settings = Settings(home=tmp_path / "home", airflow_port=free_port(), mlflow_tracking_uri=mlflow_server, release=release)
    registry, base = Registry(settings), settings.airflow_url
    in_ui, by_cli = f"hitl-{uuid.uuid4().hex[:8]}", f"cli-{uuid.uuid4().hex[:8]}"
    for voice in (in_ui, by_cli):
        registry.mark_candidate(_register_two_versions(settings, tmp_path, voice), "2")
    try:
        stack.up(settings, services=("airflow",), timeout=180)
        auth = {"Authorization": f"Bearer {stack.airflow_api_token(settings)}"}
        with AuditTraffic(settings, [in_ui, by_cli]):
            runs = {}
            for voice in (in_ui, by_cli):
                conf = {"voice_id": voice, "version": "", "steps": [50, 100], "window_seconds": 3,
                        "manual_approval": True, "quality_probe": False}
                made = httpx.post(f"{base}/api/v2/dags/canary_promotion/dagRuns", headers=auth, timeout=30,
                                  json={"logical_date": None, "conf": conf})
                assert made.status_code == 200, made.text
                runs[voice] = made.json()["dag_run_id"]
            for voice, run_id in runs.items():  # held before 100 %, in a state that holds no worker slot
                _wait(f"{voice}'s approval", lambda: _task_states(base, auth, run_id).get("approve") == "awaiting_input")
                state = registry.release_state(f"voice-{voice}")
                assert (state["aliases"]["canary"], state["canary_weight"]) == ("2", 50)
                assert _task_states(base, auth, run_id)["finish"] is None

            # --- a person answers in Airflow's Required Actions ---------------------------------------------
            page = _login(browser, base, settings, 900)
            page.goto(f"{base}/required_actions")
            page.get_by_role("link", name=f"Release voice-{in_ui} version 2").click()
            page.get_by_text("is the canary at 50 %").wait_for()  # the request says where the rollout stands
            approve = page.get_by_test_id("hitl-option-Approve")
            assert approve.is_disabled()  # a reason is required
            page.fill("input[name=element_reason]", "listened to the samples, ship it")
            approve.click()
            page.screenshot(path=str(tmp_path / "required-action-answered.png"))

            # --- another through the CLI, which answers the same task over the REST API ------------------------
            env = {**os.environ, **stack.settings_env(settings)}
            status = subprocess.run([sys.executable, "-m", "voiceops.cli", "status", by_cli], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert "version 2 waits before 100 %" in status.stdout, status.stdout + status.stderr
            promoted = subprocess.run([sys.executable, "-m", "voiceops.cli", "promote", by_cli, "--reason", "on call ok",
                                       "--actor", "oncall"], env=env, capture_output=True, text=True, timeout=120)
            assert promoted.returncode == 0, promoted.stderr
            assert "approved the held rollout" in promoted.stderr
            for voice, run_id in runs.items():
                assert _wait(f"{voice}'s run to end", lambda: _run_state(base, auth, run_id), timeout=240) == "success"
    finally:
        stack.down(settings)

    for voice, reason in ((in_ui, "listened to the samples, ship it"), (by_cli, "on call ok [oncall]")):
        aliases = registry.aliases(f"voice-{voice}")
        assert (aliases["production"], aliases["previous"]) == ("2", "1") and "canary" not in aliases
        note = json.loads(registry.version(f"voice-{voice}", "2").tags["last_manual_action"])
        assert (note["action"], note["actor"], note["reason"]) == ("approve", "admin", reason)  # who answered in Airflow
        # A check before a step's window has enough traffic records "waiting"; how many depends on the machine's load.
        outcomes = [r["outcome"] for r in reversed(ReleaseHistory(settings.resolved_audit_url).rows(voice))
                    if r["outcome"] != "waiting"]
        assert outcomes == ["advanced", "awaiting_approval", "manual", "advanced", "promoted"], outcomes


# --- "should I promote this?": versions, gate metrics, reasons, listening, reports, trend ------------------

REJECTION = ["adapted speaker_similarity 0.62 < 0.80 (VOICEOPS_EVAL__MIN_SPEAKER_SIMILARITY)",
             "adapted wer_gap_over_real 0.31 > 0.10 (VOICEOPS_EVAL__MAX_WER_GAP_OVER_REAL)"]
SPEAKERS = {"1": "flite-slt", "2": "flite-awb", "3": "flite-rms"}  # each version sounds different


def _evaluated_version(settings: Settings, client, exp: str, folder: Path, voice: str, version: str, **metrics) -> str:
    """A run as onboarding leaves it: the model folder, and eval_report/ with report.html and the listening samples
    (the gated system speaking listening_texts, written by real offline TTS)."""
    from voice_lib.data import corpus
    from voice_lib.data.audio import write_wav

    model, report = folder / f"model-{version}", folder / f"eval-{version}"
    model.mkdir(parents=True)
    (model / "voice.json").write_text("{}")
    samples = []
    for i, text in enumerate(corpus.listening_texts("en")):
        audio = corpus.synthesize(text, SPEAKERS[version])
        write_wav(report / "listen" / f"{i}.wav", audio, 16000)
        samples.append({"file": f"{i}.wav", "text": text, "seconds": round(len(audio) / 16000, 2)})
    (report / "listen" / "listen.json").write_text(json.dumps({"language": "en", "samples": samples}))
    (report / "report.html").write_text(f"<!doctype html><h1>Held-out evaluation of v{version}</h1>")
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(model), "voice")
    client.log_artifacts(run.info.run_id, str(report), "eval_report")
    defaults = {"wer": 0.08, "speaker_similarity": 0.86, "p808_mos": 3.4, "rtf": 0.05}
    tags = {"training_key": f"k{version}-{voice}", "base_model": "voice-base", "base_version": "1",
            "base_sha256": "x" * 64, "data_sha256": "a" * 64, "code_version": "0.1.0", "lora_rank": "8",
            "eval_real_wer": "0.05", "eval_real_p808_mos": "3.6", "qc_prefix": f"voices/{voice}/datasets/{'a' * 16}/qc-test",
            **{f"eval_adapted_{k}": str(v) for k, v in {**defaults, **metrics}.items()}}
    from voice_lib.release.registry import Registry

    return Registry(settings).register(f"voice-{voice}", run.info.run_id, "voice", tags).version


def _register_reviewable_voices(settings: Settings, tmp_path: Path) -> tuple[str, str]:
    """A voice whose only version was rejected, and one with production v1, canary v2 and candidate v3, a QC
    report in the store and three nights of production re-evaluation."""
    from mlflow import MlflowClient

    from voice_lib.core.storage import artifact_store
    from voice_lib.release.registry import Registry

    client, registry, store = MlflowClient(settings.mlflow_tracking_uri), Registry(settings), artifact_store(settings)
    rejected, review = f"rej-{uuid.uuid4().hex[:8]}", f"rev-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(f"voice-{rejected}")
    _evaluated_version(settings, client, exp, tmp_path / rejected, rejected, "1", speaker_similarity=0.62, wer=0.36)
    registry.reject(f"voice-{rejected}", "1", REJECTION)

    exp, name = client.create_experiment(f"voice-{review}"), f"voice-{review}"
    for version in ("1", "2", "3"):
        _evaluated_version(settings, client, exp, tmp_path / review, review, version, wer=0.1 - int(version) / 100)
    registry.set_version_tags(name, "1", {"gates_passed": "true"})
    registry.promote(name, "1")
    registry.set_version_tags(name, "2", {"gates_passed": "true"})
    registry.set_canary(name, "2", 10)
    registry.mark_candidate(name, "3")
    store.write_bytes(f"voices/{review}/datasets/{'a' * 16}/qc-test/report/report.html",
                      b"<!doctype html><h1>QC report</h1><script>alert(1)</script>")
    for day, wer in (("2026-11-28", 0.07), ("2026-11-29", 0.08), ("2026-11-30", 0.11)):
        store.write_bytes(f"voices/{review}/nightly/v1/{day}.json", json.dumps({
            "day": day, "voice_id": review, "alias": "production", "version": "1", "regressions": [],
            "metrics": {"wer": wer, "speaker_similarity": 0.86, "p808_mos": 3.4, "rtf": 0.05}}).encode())
    return rejected, review


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_release_page_answers_should_i_promote_this(tmp_path, mlflow_server, browser):
    from voice_lib.data import corpus
    from voiceops import stack

    settings = Settings(home=tmp_path / "home", airflow_port=free_port(), mlflow_tracking_uri=mlflow_server)
    rejected, review = _register_reviewable_voices(settings, tmp_path)
    base = settings.airflow_url
    try:
        stack.up(settings, services=("airflow",), timeout=180)
        token = stack.airflow_api_token(settings)
        viewer = {"Authorization": f"Bearer {_viewer_token(token, settings)}"}  # reading needs no more than viewer
        body = httpx.get(f"{base}/voiceops/api/voices", headers=viewer, timeout=120).json()
        voices = {v["voice_id"]: v for v in body["voices"]}

        # --- the rejected version 1, with its reasons, not "idle, none" ----------------------------------------
        rej = voices[rejected]
        assert rej["summary"] == "nothing to release: version 1 rejected by the gates"
        (row,) = rej["version_rows"]
        assert (row["version"], row["status"], row["reasons"], row["aliases"]) == ("1", "rejected", REJECTION, [])
        gates = {g["name"]: g for g in row["gates"]}
        assert gates["speaker_similarity"] == {**gates["speaker_similarity"], "value": 0.62, "threshold": 0.8, "passed": False}
        assert gates["wer"]["threshold"] == pytest.approx(0.15) and gates["wer"]["passed"] is False  # real 0.05 + 0.10
        assert gates["p808_mos"]["passed"] is True and gates["rtf"]["passed"] is True

        # --- every version, side-by-side samples, reports, trend ------------------------------------------------
        rev = voices[review]
        assert [(r["version"], r["status"]) for r in rev["version_rows"]] == [("3", "candidate"), ("2", "canary"),
                                                                             ("1", "production")]
        listen = rev["listening"]
        assert listen["texts"] == corpus.listening_texts("en")  # the same three sentences in every column
        assert [(c["alias"], c["version"], len(c["samples"])) for c in listen["columns"]] == [
            ("production", "1", 3), ("canary", "2", 3), ("candidate", "3", 3)]
        assert rev["trend"]["days"] == ["2026-11-28", "2026-11-29", "2026-11-30"]
        assert rev["trend"]["metrics"]["wer"] == [0.07, 0.08, 0.11]
        links = rev["version_rows"][0]["links"]
        assert links["mlflow_run"].startswith(f"{mlflow_server}/#/experiments/")

        sample = listen["columns"][2]["samples"][0]["url"]
        wav = httpx.get(f"{base}/voiceops/{sample}", headers=viewer, timeout=60)
        assert wav.status_code == 200 and wav.headers["content-type"] == "audio/x-wav" and wav.content[:4] == b"RIFF"
        assert httpx.get(f"{base}/voiceops/{sample}", timeout=30).status_code == 401  # same rules as the page
        qc = httpx.get(f"{base}/voiceops/{links['qc_report']}", headers=viewer, timeout=60)
        assert qc.status_code == 200 and "QC report" in qc.text and "script-src 'none'" in qc.headers["content-security-policy"]
        report = httpx.get(f"{base}/voiceops/{links['eval_report']}", headers=viewer, timeout=60)
        assert report.status_code == 200 and "Held-out evaluation of v3" in report.text
        for bad in (f"api/voices/{review}/versions/3/report/..%2F..%2Fvoice%2Fvoice.json",
                    f"api/voices/{review}/versions/9/report/listen/0.wav",
                    f"api/voices/{rejected}/versions/1/report/listen/7.wav"):
            assert httpx.get(f"{base}/voiceops/{bad}", headers=viewer, timeout=60).status_code in (404, 422), bad

        # --- a person: the page shows the rejection and plays the candidate ---------------------------------------
        page = _login(browser, base, settings, 1000)
        page.goto(f"{base}/voiceops/")
        card = page.locator(f"[data-voice='{rejected}']")
        card.wait_for()
        assert "nothing to release: version 1 rejected" in card.locator("[data-field=summary]").inner_text()
        assert card.locator("[data-field=release_state]").inner_text() == "nothing to release"  # not "idle"
        v1 = card.locator("[data-version='1']")
        assert v1.locator("[data-field=status]").inner_text() == "rejected"
        reasons = v1.locator("[data-field=reasons] li").all_inner_texts()
        assert reasons == REJECTION
        assert "fail" in v1.locator("[data-gate=speaker_similarity]").get_attribute("class")

        review_card = page.locator(f"[data-voice='{review}']")
        assert review_card.locator("[data-field=listening] th").all_inner_texts() == [
            "Sentence", "production v1", "canary v2", "candidate v3"]
        assert review_card.locator("[data-field=trend] [data-metric=wer] figcaption").inner_text() == "Whisper WER 0.11"
        played = review_card.locator("audio[data-sample='candidate-0']").evaluate(
            "a => a.play().then(() => ({readyState: a.readyState, duration: a.duration, paused: a.paused}))")
        seconds = listen["columns"][2]["samples"][0]["seconds"]
        assert played["readyState"] >= 2 and not played["paused"] and played["duration"] == pytest.approx(seconds, abs=0.05)
        from playwright.sync_api import Error as PlaywrightError

        try:  # a picture for people reading the run; Chromium can refuse one on a saturated machine
            page.screenshot(path=str(tmp_path / "release-page-review.png"))
            print(f"\nscreenshot: {tmp_path / 'release-page-review.png'}")
        except PlaywrightError as exc:
            print(f"\nno screenshot: {exc}")
    finally:
        stack.down(settings)
