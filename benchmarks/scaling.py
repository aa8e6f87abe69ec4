"""Scaling benchmark (issue "Proof"): memory and p95 latency with 1, 10 and 50 voices, VoiceOps vs baselines.

For each voice count N, three fresh server processes are started on loopback and measured side by side:

- ``voiceops``: `voiceops serve` (shared base + multi-LoRA batches, defaults: batch_max_size 8, max wait 10 ms)
  serving every voice registered in a private MLflow (N voices, each a rank-8 LoRA of the shipped base);
- ``copies``: benchmarks/baseline_server.py --mode copies - one merged full model per voice;
- ``swap``: benchmarks/baseline_server.py --mode swap - one global PeftModel, set_adapter per request under a
  lock (the GPT-SoVITS api.py pattern, adapters resident).

Baselines share the VoiceOps frontend, model code, vocoder and WAV encoding; they read the same adapter folders.
Each server is warmed over all its voices, then loaded in turns (never two at once; order rotates every round)
with distinct 20-word sentences spread round-robin over all N voices at concurrency 4. Resident memory is the
server pid's VmRSS after the load. Ratios are VoiceOps / baseline from the same run.

Writes benchmarks/results/scaling.json (scaling.quick.json with --quick).

    .venv/bin/python benchmarks/scaling.py [--quick] [--baselines copies,swap]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LORA_B_SCALE,
    LORA_RANK,
    Bench,
    Server,
    fmt,
    free_port,
    load_note,
    machine_facts,
    merge_summaries,
    peak_rss_bytes,
    ratio,
    run_load,
    sentence_20,
    table,
    wait_until,
    write_results,
)

MB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def start_baseline(bench: Bench, mode: str, voices_dir: Path, n: int) -> Server:
    port = free_port()
    proc = bench.start_process(f"{mode}-n{n}", [sys.executable, str(HERE / "baseline_server.py"), "--mode", mode,
                                                "--voices-dir", str(voices_dir), "--port", str(port)])
    return Server(mode, f"http://127.0.0.1:{port}", proc, "unused", {"mode": mode})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min): 1 and 10 voices, fewer requests")
    parser.add_argument("--voices", default=None, help="comma-separated voice counts (default 1,10,50; quick 1,10)")
    parser.add_argument("--baselines", default="copies,swap", help="baseline styles to run: copies, swap or both")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    facts = machine_facts()
    counts = [int(x) for x in (args.voices or ("1,10" if quick else "1,10,50")).split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    params: dict[str, Any] = {
        "quick": quick, "voice_counts": counts, "baselines": baselines, "concurrency": 4,
        "requests_per_round": 16 if quick else 40, "rounds": 1 if quick else 2, "max_seconds_per_load": 120,
        "warmup_requests": "max(12, N) at concurrency 4, one per voice at least",
        "voiceops_serving": {"batch_max_size": 8, "batch_max_wait_ms": 10, "poll_seconds": 10},
        "lora_rank": LORA_RANK, "lora_b_scale": LORA_B_SCALE, "text": "distinct 20-word sentences (common.sentence_20)",
        "torch_threads": "torch default in every server", "client": "closed loop, httpx threads, same machine",
    }
    print(load_note(facts), flush=True)
    bench = Bench("scaling", keep=args.keep)
    out: dict[str, Any] = {"benchmark": "scaling", "machine": facts, "params": params, "runs": {}}
    try:
        t0 = time.monotonic()
        bench.start_mlflow()
        out["base"] = {"path": str(bench.base.path), "sha256": bench.base.sha256}
        registered: list[str] = []
        offset = 0
        for n in counts:
            new = [f"scale-v{i:02d}" for i in range(len(registered), n)]
            if new:
                bench.make_and_register([(v, 100 + len(registered) + i, LORA_B_SCALE) for i, v in enumerate(new)])
                registered += new
            voices = registered[:n]
            vdir = bench.home / f"voices-n{n}"
            vdir.mkdir()
            for v, seed in zip(voices, range(100, 100 + n)):
                (vdir / v).symlink_to(bench.home / "adapters" / f"{v}-{seed}")
            print(f"N={n}: {len(registered)} voices registered ({time.monotonic() - t0:.0f} s); starting servers", flush=True)
            servers = [bench.start_server(f"voiceops-n{n}", params["voiceops_serving"])]
            servers[0].name = "voiceops"
            servers += [start_baseline(bench, mode, vdir, n) for mode in baselines]
            servers[0].wait_voices(voices, 300)
            for s in servers[1:]:
                wait_until(f"{s.name} with {n} voices", lambda s=s, n=n: len(s.status_plain()["voices"]) == n, 600, 0.5, s.proc)
            for s in servers:
                body = lambda i, n=n, vs=voices: {"text": sentence_20(90_000 + i), "voice_id": vs[i % n], "user_id": f"w{i}"}
                res = run_load(s.url, s.auth, body, 4, max(12, n), 300)
                if any(r.status != 200 for r in res):
                    bad = next(r for r in res if r.status != 200)
                    raise RuntimeError(f"{s.name} warm-up failed: {bad.status} {bad.error}")
            parts: dict[str, list] = {s.name: [] for s in servers}
            for rnd in range(params["rounds"]):
                order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
                for s in order:
                    body = lambda i, o=offset, n=n, vs=voices: {"text": sentence_20(o + i), "voice_id": vs[i % n],
                                                                 "user_id": f"u{o + i}"}
                    parts[s.name].append(run_load(s.url, s.auth, body, params["concurrency"], params["requests_per_round"],
                                                  params["max_seconds_per_load"]))
                offset += params["requests_per_round"]
            run: dict[str, Any] = {}
            for s in servers:
                summary = merge_summaries(parts[s.name])
                summary["rss_bytes"] = s.rss()
                summary["peak_rss_bytes"] = peak_rss_bytes(s.proc.pid)
                if s.name == "voiceops":
                    st = s.status()
                    summary["adapters_loaded"] = st["adapters_loaded"]
                    summary["mean_batch_size"] = st["batcher"]["items"] / max(1, st["batcher"]["batches"])
                else:
                    summary["load_seconds"] = s.status_plain()["load_seconds"]
                run[s.name] = summary
                print(f"  N={n} {s.name:8s}: RSS {summary['rss_bytes'] / MB:7.1f} MB, p95 {fmt(summary['p95_ms'])} ms, "
                      f"{summary['ok']}/{summary['requests']} ok", flush=True)
            for b in baselines:
                run[f"voiceops/{b}"] = {"rss": ratio(run["voiceops"]["rss_bytes"], run[b]["rss_bytes"]),
                                        "p95": ratio(run["voiceops"]["p95_ms"], run[b]["p95_ms"]),
                                        "p50": ratio(run["voiceops"]["p50_ms"], run[b]["p50_ms"]),
                                        "requests_per_s": ratio(run["voiceops"]["requests_per_s"], run[b]["requests_per_s"])}
            out["runs"][str(n)] = run
            for s in servers:
                bench.stop(s.proc)
        # memory slope per additional voice between the smallest and largest N
        lo, hi = str(min(counts)), str(max(counts))
        out["per_additional_voice_bytes"] = {
            name: (out["runs"][hi][name]["rss_bytes"] - out["runs"][lo][name]["rss_bytes"]) / (int(hi) - int(lo))
            for name in ["voiceops", *baselines]} if hi != lo else {}
        path = write_results("scaling", out, quick, args.out)
    finally:
        bench.close()

    print()
    print(f"Scaling benchmark ({'quick' if quick else 'full'} run) - {load_note(facts)}")
    print(f"concurrency {params['concurrency']}, {params['rounds']} x {params['requests_per_round']} requests per server "
          f"and voice count, 20-word sentences spread over all voices")
    rows = []
    for n in counts:
        run = out["runs"][str(n)]
        for name in ["voiceops", *baselines]:
            s = run[name]
            rows.append([n, name, f"{s['ok']}/{s['requests']}", fmt(s["rss_bytes"] / MB, 1), fmt(s["p50_ms"]),
                         fmt(s["p95_ms"]), fmt(s["requests_per_s"], 2)])
        for b in baselines:
            r = run[f"voiceops/{b}"]
            rows.append([n, f"voiceops/{b}", "", fmt(r["rss"], 2), fmt(r["p50"], 2), fmt(r["p95"], 2),
                         fmt(r["requests_per_s"], 2)])
    print(table(["voices", "server", "ok", "RSS MB", "p50 ms", "p95 ms", "req/s"], rows))
    if out["per_additional_voice_bytes"]:
        print(f"\nresident memory per additional voice ({lo} -> {hi} voices): " + ", ".join(
            f"{k} {v / MB:.2f} MB" for k, v in out["per_additional_voice_bytes"].items()))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
