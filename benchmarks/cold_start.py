"""Cold start (issue "Serving at the machine's limit"): process start to /readyz = ready, with 1, 10 and 50 voices.

Voices are production two-stage voices, as onboarding makes them: a rank-8 LoRA of the shipped converter
(peft, the training targets), its folder written by voice_lib/train/finetune_two_stage.write_version_folder
(reference voice and pitch statistics, the variance post-filter, the rendering chosen by ``synthesis_candidates``), a GE2E-sized speaker embedding and voice.json, registered in a private MLflow with
the two-stage lineage tags and aliased ``production``. Each measurement starts a fresh `voiceops serve` with an
empty cache, so a start includes every download, the base load, every adapter load and the warm-up synthesis.

Measured per start: seconds from Popen to /livez (interpreter, imports, app), to /readyz = ready serving all N
voices, where the first reload spent its time (/v1/admin/status ``last_load_timings``: registry read, fetch,
base, adapters, warm-up), the first request's latency after ready (a 20-word sentence, one voice) and the
second's, and the resident memory. With ``--variants`` several server settings are measured in the same run,
side by side, interleaved per voice count.

    .venv/bin/python benchmarks/cold_start.py [--voices 1,10,50] [--repeats 1] [--variants default]
Prints a table and writes benchmarks/results/cold_start.json.

The voices are benchmarks/bench_voices.make_two_stage_adapter's (``Bench(backend="two_stage").make_and_register``),
the same the scaling benchmark serves.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LORA_B_SCALE,
    ROOT,
    Bench,
    Server,
    fmt,
    load_note,
    machine_facts,
    post_tts,
    sentence_20,
    table,
    wait_until,
    write_results,
)

MB = 1024 * 1024
TARGET_READY_SECONDS = 30.0  # with 50 voices
# Server settings measured side by side (--variants): name -> VOICEOPS_SERVING__* overrides.
VARIANTS: dict[str, dict[str, Any]] = {"default": {}}


def ready_with(server: Server, n: int) -> bool:
    r = httpx.get(f"{server.url}/readyz", timeout=5)
    return r.status_code == 200 and r.json().get("voices") == n


def export_checkout(ref: str, dest: Path) -> Path:
    """The tree of git ``ref`` (e.g. main), exported to ``dest`` (git archive: the repository is not touched)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure_start(bench: Bench, variant: str, serving: dict[str, Any], voice_ids: list[str], tag: str,
                  code: Path | None = None) -> dict[str, Any]:
    """One fresh server (empty cache): seconds to live and to ready with every voice, the reload's phases, the
    first requests. ``code``: run the server from that checkout instead of this one."""
    n = len(voice_ids)
    name = f"{variant}-n{n}-{tag}"
    started = time.monotonic()
    server = bench.start_server(name, {"poll_seconds": 600, **serving},
                                extra_env={"PYTHONPATH": str(code)} if code else None)
    try:
        wait_until(f"{name} live", lambda: httpx.get(f"{server.url}/livez", timeout=2).status_code == 200,
                   120, 0.05, server.proc)
        live = time.monotonic() - started
        wait_until(f"{name} ready with {n} voices", lambda: ready_with(server, n), 600, 0.05, server.proc)
        ready = time.monotonic() - started
        status = server.status()
        firsts = []
        with httpx.Client() as client:
            for i in range(2):
                body = {"text": sentence_20(70_000 + i), "voice_id": voice_ids[i % n]}
                res = post_tts(client, server.url, server.auth, body)
                if res.status != 200:
                    raise RuntimeError(f"{name}: request {i} answered {res.status}: {res.error}")
                firsts.append(res.latency * 1000)
        return {"variant": variant, "voices": n, "serving": serving, "live_s": round(live, 3), "ready_s": round(ready, 3),
                "reload_s": round(ready - live, 3), "load_timings": status.get("last_load_timings", {}),
                "first_request_ms": round(firsts[0], 1), "second_request_ms": round(firsts[1], 1),
                "rss_mb": round(server.rss() / MB, 1), "errors": status.get("last_error")}
    finally:
        bench.stop(server.proc)


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = ["variant", "voices", "live s", "ready s", "registry s", "fetch s", "base s", "adapters s", "warm-up s",
               "1st req ms", "2nd req ms", "RSS MB"]
    body = []
    for r in rows:
        t = r["load_timings"]
        body.append([r["variant"], r["voices"], fmt(r["live_s"], 2), fmt(r["ready_s"], 2), fmt(t.get("registry_read_s"), 2),
                     fmt(t.get("fetch_s"), 2), fmt(t.get("base_s"), 2), fmt(t.get("adapter_s"), 2), fmt(t.get("warm_up_s"), 2),
                     fmt(r["first_request_ms"]), fmt(r["second_request_ms"]), fmt(r["rss_mb"])])
    print(table(headers, body))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--voices", default="1,10,50")
    parser.add_argument("--repeats", type=int, default=1, help="starts per voice count and variant")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--before", default="", help="also measure the server of this git ref (e.g. main), "
                                                     "as variant 'before', side by side (who goes first alternates)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.voices.split(","))
    variants = args.variants.split(",")
    facts = machine_facts()
    print(load_note(facts))
    bench = Bench("cold-start", backend="two_stage")  # voices: bench_voices.make_two_stage_adapter
    rows: list[dict[str, Any]] = []
    code: dict[str, Path | None] = {v: None for v in variants}
    serving = {v: VARIANTS[v] for v in variants}
    if args.before:
        code = {"before": export_checkout(args.before, bench.home / "before-code"), **code}
        serving = {"before": {}, **serving}
    try:
        bench.start_mlflow()
        registered: list[str] = []
        for n in counts:
            new = [f"cold-{i:03d}" for i in range(len(registered), n)]
            made = time.perf_counter()
            bench.make_and_register([(v, i, LORA_B_SCALE) for i, v in enumerate(new, len(registered))])
            print(f"registered {len(new)} two-stage voices in {time.perf_counter() - made:.1f} s ({n} in all)")
            registered += new
            for repeat in range(args.repeats):
                order = list(code) if repeat % 2 == 0 else list(code)[::-1]  # alternate who goes first
                for variant in order:
                    row = measure_start(bench, variant, serving[variant], registered, f"r{repeat}", code[variant])
                    rows.append({**row, "repeat": repeat})
                    print_table([rows[-1]])
    finally:
        bench.close()
    print()
    print_table(rows)
    at_50 = [r["ready_s"] for r in rows if r["voices"] == 50 and r["variant"] == variants[-1]]
    verdict = None if not at_50 else max(at_50) <= TARGET_READY_SECONDS
    print(f"target: ready in <= {TARGET_READY_SECONDS:.0f} s with 50 voices ({variants[-1]}): "
          f"{'n/a' if verdict is None else ('PASS' if verdict else 'MISS')}")
    path = write_results("cold_start", {"machine": facts, "load_note": load_note(facts), "voice_counts": counts,
                                        "variants": serving, "before_ref": args.before or None,
                                        "repeats": args.repeats,
                                        "target_ready_seconds_at_50": TARGET_READY_SECONDS, "target_met": verdict,
                                        "starts": rows}, False, args.out)
    print(f"written {path}")


if __name__ == "__main__":
    main()
