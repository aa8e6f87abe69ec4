"""Rollback time: how long a failing canary keeps serving after the trigger, per mode, over repeated trials.

A private MLflow and two `voiceops serve` processes on loopback, identical except ``poll_seconds`` (10, the
default, and 1), each with the default breaker settings and a webhook secret. Each server gets traffic for its
own voice: production v1 plus a canary at weight 50. Traffic is steady (closed loop, a few clients, a distinct
user id per request) and every response's ``X-Voice-Variant`` / ``X-Voice-Fallback`` is recorded.

Modes (trials interleaved, so every mode sees the same background):

- ``rollback``: a manual rollback through voice_lib.release.registry.Registry.rollback; the server learns it from its
  registry poll. Trigger = the call to rollback(), after a random wait of uniform(0, poll_seconds) so it falls
  at a random point of the poll cycle; measured = end of the last response with ``X-Voice-Variant: canary``
  minus the trigger (0 if no canary response ended after it).
- ``rollback+webhook`` (poll 10 s server only): the same, with a real MLflow registry webhook (created with
  MlflowClient.create_webhook, signed with the server's secret, enabled only during these trials) telling
  the server to reload at once - the docs/operations.md setup.
- ``breaker``: a canary whose adapter produces NaN (as tests/test_serving.py registers it) is set at weight 50;
  every canary attempt fails and falls back to production (``X-Voice-Fallback``) until the breaker trips.
  Trigger = the start of the first canary attempt; measured = the end of the last canary attempt minus it.

Goal <= 10 s, limit 30 s (judged on the max). Writes benchmarks/results/rollback_time.json
(rollback_time.quick.json with --quick).

    .venv/bin/python benchmarks/rollback_time.py [--quick] [--trials N]
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LORA_B_SCALE,
    Bench,
    Result,
    Server,
    fmt,
    load_note,
    machine_facts,
    median,
    post_tts,
    table,
    verdict,
    wait_until,
    write_results,
)

SECRET = "rollback-benchmark-secret"
GOAL_S, LIMIT_S = 10.0, 30.0
WEBHOOK_EVENTS = ["model_version.created", "model_version_alias.created", "model_version_alias.deleted",
                  "model_version_tag.set"]
_PHRASES = ["Hello there, this is a quick test.", "Your table is ready now.", "Thanks for waiting, we are back.",
            "The next train leaves at nine.", "Please hold the line a moment."]


class Traffic:
    """Closed-loop clients sending short requests for one voice, a distinct user id each; bounded in time and count."""

    def __init__(self, server: Server, voice: str, tag: str, clients: int, max_seconds: float, max_requests: int) -> None:
        self.server, self.voice, self.tag = server, voice, tag
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = itertools.count()
        self._deadline = time.perf_counter() + max_seconds
        self._max = max_requests
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set() and time.perf_counter() < self._deadline:
                i = next(self._count)
                if i >= self._max:
                    return
                body = {"text": _PHRASES[i % len(_PHRASES)], "voice_id": self.voice, "user_id": f"{self.tag}-u{i}"}
                res = post_tts(client, self.server.url, self.server.auth, body, timeout=60)
                with self._lock:
                    self.results.append(res)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def stop(self) -> list[Result]:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        return sorted(self.snapshot(), key=lambda r: r.started)


def voice_state(server: Server, voice: str) -> dict[str, Any]:
    return server.status()["voices"][voice]


def run_trial(bench: Bench, server: Server, voice: str, mode: str, trial: int, canary_version: str,
              params: dict[str, Any]) -> dict[str, Any]:
    registry = bench.registry
    name = f"voice-{voice}"
    tag = f"{server.name}-{mode}-{trial}"
    if mode != "breaker":
        registry.set_canary(name, canary_version, 50)
        server.reload()  # setup only: make the healthy canary live now instead of at the next poll
        wait_until("canary at 50", lambda: (voice_state(server, voice)["canary"] or {}).get("version") == canary_version
                   and voice_state(server, voice)["effective_canary_weight"] == 50, 30, 0.2, server.proc)
    traffic = Traffic(server, voice, tag, params["clients"], params["max_trial_seconds"], params["max_trial_requests"])
    record: dict[str, Any] = {"server": server.name, "mode": mode, "trial": trial, "canary_version": canary_version}
    try:
        if mode != "breaker":
            # steady traffic with the canary serving before the trigger
            try:
                wait_until("canary responses", lambda: sum(r.variant == "canary" for r in traffic.snapshot()) >= 5
                           and len(traffic.snapshot()) >= 10, 30, 0.1, server.proc)
            except TimeoutError as exc:
                seen = Counter((r.status, r.variant, r.error and r.error[:80]) for r in traffic.snapshot())
                raise TimeoutError(f"{exc}\nresponses so far: {dict(seen)}\nvoice state: {voice_state(server, voice)}") from None
            # a random wait so the trigger falls at a uniformly random point of the server's poll cycle
            delay = params["rng"].uniform(0, server.config["poll_seconds"]) if mode == "rollback" else 0.0
            time.sleep(delay)
            record["random_delay_s"] = delay
            trigger = time.perf_counter()
            registry.rollback(name, f"benchmark trial {tag}")
            record["rollback_call_s"] = time.perf_counter() - trigger
            wait_until("rollback applied", lambda: voice_state(server, voice)["canary"] is None
                                 or voice_state(server, voice)["effective_canary_weight"] == 0,
                                 params["max_wait_seconds"], 0.1, server.proc)
            record["server_applied_s"] = time.perf_counter() - trigger
        else:
            wait_until("production traffic", lambda: len(traffic.snapshot()) >= 5, 30, 0.1, server.proc)
            set_at = time.perf_counter()
            registry.set_canary(name, canary_version, 50)  # a NaN adapter: every canary attempt fails
            server.reload()  # makes it live now (the setup, not the measured part)
            record["canary_live_after_set_s"] = time.perf_counter() - set_at
            wait_until("breaker open", lambda: voice_state(server, voice)["effective_canary_weight"] == 0
                       and ((voice_state(server, voice)["canary"] or {}).get("breaker") or {}).get("open"),
                       params["max_wait_seconds"], 0.1, server.proc)
            record["server_applied_after_set_s"] = time.perf_counter() - set_at
            record["breaker_reason"] = voice_state(server, voice)["canary"]["breaker"].get("reason")
        time.sleep(params["tail_seconds"])  # keep traffic going: any late canary response would show up
    finally:
        results = traffic.stop()
    window = (results[-1].ended - results[0].started) if results else 0.0
    record.update({"requests": len(results), "non_200": sum(r.status != 200 for r in results),
                   "requests_per_s": len(results) / window if window else None})
    if mode != "breaker":
        canary = [r for r in results if r.variant == "canary"]
        after = [r for r in canary if r.ended >= trigger]
        last = max((r.ended for r in canary), default=None)
        record.update({"canary_responses": len(canary), "canary_responses_after_trigger": len(after),
                       "canary_requests_started_after_trigger": sum(r.started >= trigger for r in canary),
                       "last_canary_minus_trigger_raw_s": None if last is None else last - trigger,
                       "seconds": max(0.0, last - trigger) if last is not None else 0.0,
                       "breaker_tripped_during_trial": bool(((voice_state(server, voice)["canary"] or {}).get("breaker") or {}).get("open"))})
    else:
        attempts = [r for r in results if r.fallback or r.variant == "canary"]
        if attempts:
            start = min(r.started for r in attempts)
            record.update({"canary_attempts": len(attempts), "seconds": max(r.ended for r in attempts) - start,
                           "first_attempt_after_set_s": start - set_at,
                           "last_attempt_after_set_s": max(r.ended for r in attempts) - set_at})
        else:
            record.update({"canary_attempts": 0, "seconds": 0.0})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min): 2 trials per mode")
    parser.add_argument("--trials", type=int, help="trials per mode and server (default 10, quick 2)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    facts = machine_facts()
    trials = args.trials or (2 if quick else 10)
    params: dict[str, Any] = {
        "quick": quick, "trials": trials, "clients": 3, "canary_weight": 50, "tail_seconds": 1.0,
        "max_wait_seconds": 45.0, "max_trial_seconds": 90.0, "max_trial_requests": 3000,
        "servers": {"poll10": {"poll_seconds": 10}, "poll1": {"poll_seconds": 1}},
        "plan": [["poll10", "rollback"], ["poll1", "rollback"], ["poll10", "rollback+webhook"],
                 ["poll10", "breaker"], ["poll1", "breaker"]],
        "serving_defaults": "breaker_min_requests 20, breaker_window_seconds 60, breaker_max_error_rate 0.05, "
                            "breaker_max_p95_ms 2000 (ServingSettings defaults)",
        "mlflow_env": {"MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                       "MLFLOW_WEBHOOK_CACHE_TTL": "1"},
        "text": "short phrases (3-7 words)", "goal_s": GOAL_S, "limit_s": LIMIT_S, "lora_b_scale": LORA_B_SCALE,
        "rollback_trigger_delay": "uniform(0, poll_seconds) after >= 5 canary responses (random poll phase)",
    }
    print(load_note(facts), flush=True)
    params["random_seed"] = 1234
    params["rng"] = random.Random(params["random_seed"])
    bench = Bench("rollback", keep=args.keep)
    out: dict[str, Any] = {"benchmark": "rollback_time", "machine": facts, "params": params, "trials": []}
    try:
        t0 = time.monotonic()
        # MLflow delivers webhooks to loopback only with these (local development settings, as docker-compose.yml sets).
        bench.start_mlflow(params["mlflow_env"])
        voices = {name: f"rb-{name}" for name in params["servers"]}
        n_nan = trials * sum(1 for _, m in params["plan"] if m == "breaker") // len(params["servers"])
        canary: dict[str, str] = {}
        nan_versions: dict[str, list[str]] = {}
        for k, (sname, voice) in enumerate(voices.items()):
            bench.make_and_register([(voice, 10 * k + 1, LORA_B_SCALE)])  # v1 -> production
            canary[voice] = bench.make_and_register([(voice, 10 * k + 2, LORA_B_SCALE)], promote=False)[0]
            nan_versions[voice] = bench.make_and_register([(voice, 1000 * (k + 1) + i, float("nan")) for i in range(n_nan)],
                                                          promote=False) if n_nan else []
        servers = {name: bench.start_server(name, {**cfg, "webhook_secret": SECRET}) for name, cfg in params["servers"].items()}
        for name, s in servers.items():
            s.wait_voices([voices[name]], 300)
        from voice_lib.core.tracking import mlflow_client

        client = mlflow_client(bench.settings)
        hook = client.create_webhook(name="bench-poll10", url=f"{servers['poll10'].url}/v1/webhooks/mlflow",
                                     events=WEBHOOK_EVENTS, secret=SECRET, status="DISABLED")
        print(f"setup {time.monotonic() - t0:.0f} s", flush=True)
        used_nan = {v: 0 for v in voices.values()}
        for trial in range(trials):
            for sname, mode in params["plan"]:
                server, voice = servers[sname], voices[sname]
                if mode == "breaker":
                    version = nan_versions[voice][used_nan[voice]]
                    used_nan[voice] += 1
                else:
                    version = canary[voice]
                if mode == "rollback+webhook":
                    client.update_webhook(hook.webhook_id, status="ACTIVE")
                    time.sleep(2.0)  # MLflow caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL (1 s)
                try:
                    rec = run_trial(bench, server, voice, mode, trial, version, params)
                finally:
                    if mode == "rollback+webhook":
                        client.update_webhook(hook.webhook_id, status="DISABLED")
                        time.sleep(2.0)
                out["trials"].append(rec)
                print(f"  trial {trial + 1}/{trials} {sname:6s} {mode:17s}: {rec['seconds']:6.2f} s "
                      f"({rec['requests']} requests, {rec['non_200']} non-200)", flush=True)
        summary: dict[str, Any] = {}
        for sname, mode in params["plan"]:
            values = [r["seconds"] for r in out["trials"] if r["server"] == sname and r["mode"] == mode]
            key = f"{sname}/{mode}"
            summary[key] = {"server": sname, "poll_seconds": params["servers"][sname]["poll_seconds"], "mode": mode,
                            "trials": len(values), "median_s": median(values), "max_s": max(values), "min_s": min(values),
                            "goal_pass": max(values) <= GOAL_S, "limit_pass": max(values) <= LIMIT_S,
                            "non_200": sum(r["non_200"] for r in out["trials"] if r["server"] == sname and r["mode"] == mode)}
            if mode == "breaker":
                attempts = [r["canary_attempts"] for r in out["trials"] if r["server"] == sname and r["mode"] == mode]
                summary[key]["median_canary_attempts"] = median(attempts)
        out["summary"] = summary
        params.pop("rng")
        path = write_results("rollback_time", out, quick, args.out)
    finally:
        bench.close()

    print()
    print(f"Rollback time ({'quick' if quick else 'full'} run, {trials} trials per row) - {load_note(facts)}")
    rows = [[v["poll_seconds"], v["mode"], v["trials"], fmt(v["median_s"], 2), fmt(v["max_s"], 2),
             verdict(v["goal_pass"]), verdict(v["limit_pass"]), v["non_200"], fmt(v.get("median_canary_attempts"))]
            for v in summary.values()]
    print(table(["poll s", "mode", "trials", "median s", "max s", "goal <=10 s", "limit <=30 s", "non-200",
                 "canary attempts (breaker)"], rows))
    print("rollback: trigger = Registry.rollback() call -> last response with X-Voice-Variant: canary; "
          "breaker: first -> last canary attempt (all fell back to production)")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
