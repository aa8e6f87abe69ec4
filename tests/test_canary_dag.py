"""canary_promotion end to end: real Airflow (`airflow dags test`), real MLflow, the real model server
with live traffic. A good candidate walks every step to production; a failing one is rolled back at the
first step and never receives traffic again; a manual rollback takes traffic off the canary in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from serving_stack import (  # the same tiny base and adapter registration as the server tests
    REPO,
    ServerStack,
)

from voice_lib.core.config import Settings
from voice_lib.release.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Traffic:
    """Distinct users hitting /v1/tts until stopped; remembers (time, version, variant, status)."""

    def __init__(self, url: str, key: str, voice_id: str):
        self.url, self.key, self.voice_id = url, key, voice_id
        self.log: list[tuple[float, str, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as client:
            while not self.stop.is_set():
                r = client.post("/v1/tts", json={"text": "Hello there.", "voice_id": self.voice_id,
                                                 "user_id": uuid.uuid4().hex})
                self.log.append((time.time(), r.headers.get("X-Voice-Version", ""), r.headers.get("X-Voice-Variant", ""), r.status_code))

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture(scope="module")
def env(mlflow_server: str, tmp_path_factory):
    """One voice with production v1 on a `voiceops serve` polling every second, release settings for short steps."""
    from voiceops.stack import settings_env

    stack = ServerStack(mlflow_server, tmp_path_factory.mktemp("canary-home"))
    settings = stack.settings.model_copy(update={
        "serving": stack.settings.serving.model_copy(update={"poll_seconds": 1.0, "breaker_min_requests": 8,
                                                             "breaker_max_p95_ms": 60000.0, "base_dir": stack.base_dir,
                                                             "port": stack.port}),
        "release": stack.settings.release.model_copy(update={"min_requests": 5, "poke_seconds": 2.0, "server_url": stack.url})})
    stack.settings, stack.registry = settings, Registry(settings)
    stack.env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    voice = f"cdag-{uuid.uuid4().hex[:8]}"
    stack.a = stack.b = voice
    stack.keys["t"] = stack.keys["ops"]
    try:
        stack.register(voice, 1)
        stack.registry.promote(f"voice-{voice}", 1)
        stack.start(need_canary=False)
        yield stack
    finally:
        stack.stop()


def _canary_promotion(settings: Settings, voice: str, version: str) -> subprocess.CompletedProcess:
    from voiceops.stack import _executable, airflow_env

    e = airflow_env(settings)
    subprocess.run([_executable("airflow"), "db", "migrate"], env=e, check=True, capture_output=True, timeout=300)
    conf = {"voice_id": voice, "version": version, "steps": [50, 100], "window_seconds": 4, "quality_probe": False}
    return subprocess.run([_executable("airflow"), "dags", "test", "canary_promotion", "-c", json.dumps(conf)],
                          env=e, capture_output=True, text=True, timeout=400)


def _decisions(run: subprocess.CompletedProcess) -> str:
    """The rollout's own log lines, for a readable failure message."""
    lines = (run.stdout + run.stderr).splitlines()
    return "\n".join(l[:300] for l in lines if "release voice-" in l or "RELEASE ALERT" in l or "Error" in l)[-6000:]


def test_good_candidate_walks_all_steps_to_production(env: ServerStack):
    voice, name = env.a, f"voice-{env.a}"
    v2 = env.register(voice, 2)
    env.registry.mark_candidate(name, v2)
    with Traffic(env.url, env.keys["t"], voice) as traffic:
        run = _canary_promotion(env.settings, voice, v2)
    assert run.returncode == 0, _decisions(run)
    aliases = env.registry.aliases(name)
    assert aliases["production"] == v2 and aliases["previous"] == "1" and "canary" not in aliases
    served = {(v, var) for _, v, var, status in traffic.log if status == 200}
    assert (v2, "canary") in served and ("1", "production") in served  # the canary really took traffic
    from voice_lib.release.rollout import ReleaseHistory

    rows = list(reversed(ReleaseHistory(env.settings.resolved_audit_url).rows(voice)))
    assert rows[0]["outcome"] == "advanced" and rows[-1]["outcome"] == "promoted"
    # At 50 % the canary's speed was judged against production's per second of audio, from the audit table.
    analysed = next(r for r in rows if r["checks"])  # rows[0] is the start: canary set, nothing to judge yet
    ratio = {c["name"]: c for c in analysed["checks"]}["rtf_ratio"]
    print(f"step 0: {ratio['detail']}")
    assert ratio["status"] == "pass" and 0 < ratio["value"] <= env.settings.release.max_rtf_ratio


def test_failing_candidate_is_rolled_back_at_the_first_step(env: ServerStack):
    voice, name = env.a, f"voice-{env.a}"
    production = env.registry.aliases(name)["production"]
    bad = env.register(voice, 3, scale=float("nan"))  # its outputs are NaN: every canary request fails
    env.registry.mark_candidate(name, bad)
    with Traffic(env.url, env.keys["t"], voice) as traffic:
        run = _canary_promotion(env.settings, voice, bad)
        rolled_back_at = time.time()
        time.sleep(3 * env.settings.serving.poll_seconds)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "rolled_back" in output
    state = env.registry.release_state(name)
    assert "canary" not in state["aliases"] and state["canary_weight"] == 0 and state["aliases"]["production"] == production
    tags = env.registry.version(name, bad).tags
    assert tags["rolled_back"] == "true" and tags["reason"]
    assert all(status == 200 for _, _, _, status in traffic.log)  # production users never saw an error
    late = [entry for entry in traffic.log if entry[0] > rolled_back_at + 2 * env.settings.serving.poll_seconds]
    assert late and all(v != bad for _, v, _, _ in late)  # never again receives traffic


def test_manual_rollback_takes_traffic_off_the_canary_within_the_limit(env: ServerStack):
    voice, name = env.a, f"voice-{env.a}"
    v4 = env.register(voice, 4)
    env.registry.set_canary(name, v4, 50)
    env.wait("canary loaded", lambda: env.status()["voices"][voice]["canary"])
    with Traffic(env.url, env.keys["t"], voice) as traffic:
        env.wait("canary traffic", lambda: any(v == v4 for _, v, _, _ in traffic.log), timeout=30)
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "voiceops.cli", "rollback", voice, "--reason", "test"],
                                env={**os.environ, **__import__("voiceops.stack", fromlist=["x"]).settings_env(env.settings)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        env.wait("canary gone", lambda: any(t > started and v != v4 for t, v, _, _ in traffic.log) and
                 not [e for e in traffic.log[-5:] if e[1] == v4], timeout=30)
        time.sleep(2)
    last_canary = max(t for t, v, _, _ in traffic.log if v == v4)
    seconds = last_canary - started
    print(f"manual rollback: last canary response {seconds:.2f} s after `voiceops rollback` (limit 30 s, goal 10 s)")
    assert seconds <= 30
