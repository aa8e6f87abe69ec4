"""Scaling benchmark (issue "Serving at the machine's limit"): throughput, p95 and memory with 1, 10 and 50 voices,
VoiceOps vs baselines, and the machine's bound.

Voices are of the default backend, two-stage (``--backend end_to_end`` for the other): each a rank-8 LoRA of the
shipped converter with a real two_stage.json (common.make_two_stage_adapter: flite-awb or flite-kal16 as reference
voice, rendered by the source filter). For each voice count N, three fresh server processes are started on loopback
and measured side by side:

- ``voiceops``: `voiceops serve` (shared base + multi-LoRA batches, defaults: batch_max_size 8, max wait 10 ms)
  serving every voice registered in a private MLflow;
- ``copies``: benchmarks/baseline_server.py --mode copies - one merged full model per voice;
- ``swap``: benchmarks/baseline_server.py --mode swap - one global PeftModel, set_adapter per request under a
  lock (the GPT-SoVITS api.py pattern, adapters resident);
- ``copies-1t``: ``copies`` with torch's intra-op threads at 1 (OMP_NUM_THREADS=1), as VoiceOps runs its model
  passes by default (serving.torch_threads): the naive design given the same tuning, reported beside it.

Baselines share the VoiceOps frontend (text, reference synthesizer, analysis), model code, rendering and WAV
encoding; they read the same version folders. Each server is warmed over all its voices, then loaded in turns
(never two at once; order rotates every round) with distinct 20-word sentences spread round-robin over all N voices
at concurrency 4. Resident memory is the server pid's VmRSS after the load; the CPU a server used is its own plus
its children's (the reference synthesizer) over the load. Ratios are VoiceOps / baseline from the same run.

The bound: for each voice count, before its servers start, the CPU seconds one request costs at batch 1 in one
thread (this process and its children; the server's frontend, one model pass, rendering, WAV encoding; median of 10
sentences spread over the same voices the load uses: voices differ in reference voice and pitch shift, so in cost);
bound = cores / cost requests per second, and every server's throughput is reported as a fraction of it.

Writes benchmarks/results/scaling.json (scaling.quick.json with --quick).

    .venv/bin/python benchmarks/scaling.py [--quick] [--baselines copies,copies-1t,swap] [--backend two_stage|end_to_end]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import (
    LORA_B_SCALE,
    LORA_RANK,
    Bench,
    Server,
    cpu_seconds,
    fmt,
    free_port,
    load_note,
    machine_facts,
    merge_summaries,
    peak_rss_bytes,
    process_cpu_seconds,
    ratio,
    run_load,
    sentence_20,
    table,
    wait_until,
    write_results,
)

MB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def start_baseline(bench: Bench, name: str, voices_dir: Path, n: int) -> Server:
    """Baseline ``name``: a --mode of baseline_server.py, ``-1t`` appended for one torch thread."""
    port = free_port()
    mode, one_thread = name.removesuffix("-1t"), name.endswith("-1t")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if one_thread else {}
    proc = bench.start_process(f"{name}-n{n}", [sys.executable, str(HERE / "baseline_server.py"), "--mode", mode,
                                                "--backend", bench.backend, "--voices-dir", str(voices_dir),
                                                "--port", str(port)], env)
    return Server(name, f"http://127.0.0.1:{port}", proc, "unused", {"mode": mode, "one_torch_thread": one_thread})


def request_cpu_cost(bench: Bench, folders: list[Path], texts: list[str]) -> dict[str, Any]:
    """CPU seconds (this process + its children: the reference synthesizer) one request costs at batch 1 in one
    thread: the server's frontend (plan_chunks, then the backend's model inputs), one model pass, the rendering
    and WAV encoding, per text, the i-th text in the voice ``folders[i % len(folders)]`` (the servers' voice mix:
    voices differ in reference voice and pitch shift, hence in cost); medians. ``cores / cost`` is the machine's
    bound on requests per second."""
    import torch

    from serving.engine import SynthesisJob, run_batch
    from serving.synthesis import encode_audio, plan_chunks
    from voice_lib.infer.backends import load_backend
    from voice_lib.infer.core import END_TO_END, read_frontend
    from voice_lib.infer.multilora import AdapterWeights, LoraBank

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = load_backend(bench.backend, bench.base.path, bench.base.sha256)
        voices = [(LoraBank([("v", AdapterWeights.load(f))], backend.shapes), read_frontend(f),
                   torch.from_numpy(np.load(f / "speaker_embedding.npy").astype(np.float32)).reshape(-1)) for f in folders]
        costs, walls, audio = [], [], []
        for i, text in enumerate([texts[0], *texts]):  # the first one again, unmeasured: lazy imports and caches
            bank, frontend, speaker = voices[max(0, i - 1) % len(voices)]
            c0, w0 = cpu_seconds(), time.perf_counter()
            planned = plan_chunks(text, "auto")
            inputs = [c.ids if backend.name == END_TO_END else backend.model_inputs(c.spoken_text, "en", frontend)
                      for c in planned]
            outs = [dict(run_batch([SynthesisJob(x, 1.0, backend, bank, 1, speaker)]))[0] for x in inputs]
            samples = np.concatenate([o.audio for o in outs])
            encode_audio(samples, outs[0].sample_rate, "wav")
            costs.append(cpu_seconds() - c0)
            walls.append(time.perf_counter() - w0)
            audio.append(len(samples) / outs[0].sample_rate)
    finally:
        torch.set_num_threads(threads)
    cores = len(os.sched_getaffinity(0))
    cost = statistics.median(costs[1:])
    return {"cpu_seconds_per_request": cost, "wall_seconds_per_request": statistics.median(walls[1:]),
            "audio_seconds_per_request": statistics.median(audio[1:]), "cpu_seconds_per_audio_second":
            cost / statistics.median(audio[1:]), "requests": len(texts), "cores": cores,
            "bound_requests_per_s": cores / cost, "samples_cpu_seconds": [round(c, 4) for c in costs[1:]]}


def measure_servers(servers: list[Server], voices: list[str], params: dict[str, Any], offset: int) -> dict[str, Any]:
    """Warm every server over all voices, then load them in turns (order rotating each round); per-server summary
    with resident memory and the CPU the server process (and its reference-synthesizer children) used."""
    n = len(voices)
    for s in servers:
        body = lambda i, n=n, vs=voices: {"text": sentence_20(90_000 + i), "voice_id": vs[i % n], "user_id": f"w{i}"}
        res = run_load(s.url, s.auth, body, 4, max(12, n), 300)
        if any(r.status != 200 for r in res):
            bad = next(r for r in res if r.status != 200)
            raise RuntimeError(f"{s.name} warm-up failed: {bad.status} {bad.error}")
    parts: dict[str, list] = {s.name: [] for s in servers}
    cpu = {s.name: 0.0 for s in servers}
    for rnd in range(params["rounds"]):
        order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
        for s in order:
            body = lambda i, o=offset, n=n, vs=voices: {"text": sentence_20(o + i), "voice_id": vs[i % n],
                                                         "user_id": f"u{o + i}"}
            before = process_cpu_seconds(s.proc.pid)
            parts[s.name].append(run_load(s.url, s.auth, body, params["concurrency"], params["requests_per_round"],
                                          params["max_seconds_per_load"]))
            cpu[s.name] += process_cpu_seconds(s.proc.pid) - before
        offset += params["requests_per_round"]
    run: dict[str, Any] = {}
    for s in servers:
        summary = merge_summaries(parts[s.name])
        summary["rss_bytes"] = s.rss()
        summary["peak_rss_bytes"] = peak_rss_bytes(s.proc.pid)
        summary["server_cpu_seconds"] = cpu[s.name]
        summary["cpu_seconds_per_request"] = cpu[s.name] / max(1, summary["ok"])
        summary["cores_busy"] = cpu[s.name] / summary["window_s"] if summary["window_s"] else None
        if s.name == "voiceops":
            st = s.status()
            summary["adapters_loaded"] = st["adapters_loaded"]
            summary["mean_batch_size"] = st["batcher"]["items"] / max(1, st["batcher"]["batches"])
        else:
            summary["load_seconds"] = s.status_plain()["load_seconds"]
        run[s.name] = summary
        print(f"  N={n} {s.name:8s}: RSS {summary['rss_bytes'] / MB:7.1f} MB, p95 {fmt(summary['p95_ms'])} ms, "
              f"{fmt(summary['requests_per_s'], 2)} req/s, {fmt(summary['cores_busy'], 2)} cores busy, "
              f"{summary['ok']}/{summary['requests']} ok", flush=True)
    return run


def ratios(run: dict[str, Any], baselines: list[str], bound: float) -> None:
    for name in run:
        run[name]["fraction_of_bound"] = ratio(run[name]["requests_per_s"], bound)
    for b in baselines:
        run[f"voiceops/{b}"] = {"rss": ratio(run["voiceops"]["rss_bytes"], run[b]["rss_bytes"]),
                                "p95": ratio(run["voiceops"]["p95_ms"], run[b]["p95_ms"]),
                                "p50": ratio(run["voiceops"]["p50_ms"], run[b]["p50_ms"]),
                                "requests_per_s": ratio(run["voiceops"]["requests_per_s"], run[b]["requests_per_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min): 1 and 10 voices, fewer requests")
    parser.add_argument("--voices", default=None, help="comma-separated voice counts (default 1,10,50; quick 1,10)")
    parser.add_argument("--baselines", default="copies,copies-1t,swap",
                        help="baselines to run, comma-separated: copies, copies-1t, swap")
    parser.add_argument("--backend", choices=("two_stage", "end_to_end"), default="two_stage",
                        help="the voices' backend (default two_stage, the platform's default)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    facts = machine_facts()
    counts = [int(x) for x in (args.voices or ("1,10" if quick else "1,10,50")).split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    params: dict[str, Any] = {
        "quick": quick, "backend": args.backend, "voice_counts": counts, "baselines": baselines, "concurrency": 4,
        "requests_per_round": 16 if quick else 40, "rounds": 1 if quick else 2, "max_seconds_per_load": 120,
        "warmup_requests": "max(12, N) at concurrency 4, one per voice at least",
        "voiceops_serving": {"batch_max_size": 8, "batch_max_wait_ms": 10, "poll_seconds": 10},
        "lora_rank": LORA_RANK, "lora_b_scale": LORA_B_SCALE, "text": "distinct 20-word sentences (common.sentence_20)",
        "bound_requests": 10,
        "torch_threads": "voiceops: serving.torch_threads (default 1); copies, swap: torch default; copies-1t: 1",
        "client": "closed loop, httpx threads, same machine",
    }
    print(load_note(facts), flush=True)
    bench = Bench("scaling", keep=args.keep, backend=args.backend)
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
            # The bound for this voice mix, while no server runs (the machine is as quiet as it will be).
            step = max(1, n // params["bound_requests"])
            bound = request_cpu_cost(bench, [vdir / v for v in voices][::step],
                                     [sentence_20(80_000 + i) for i in range(params["bound_requests"])])
            print(f"N={n}: one request at batch 1, one thread: {bound['cpu_seconds_per_request']:.3f} CPU s "
                  f"({bound['audio_seconds_per_request']:.1f} s of audio) -> bound {bound['bound_requests_per_s']:.2f} "
                  f"req/s on {bound['cores']} cores", flush=True)
            print(f"N={n}: {len(registered)} voices registered ({time.monotonic() - t0:.0f} s); starting servers", flush=True)
            servers = [bench.start_server(f"voiceops-n{n}", params["voiceops_serving"])]
            servers[0].name = "voiceops"
            servers += [start_baseline(bench, mode, vdir, n) for mode in baselines]
            servers[0].wait_voices(voices, 300)
            for s in servers[1:]:
                wait_until(f"{s.name} with {n} voices", lambda s=s, n=n: len(s.status_plain()["voices"]) == n, 600, 0.5, s.proc)
            run = measure_servers(servers, voices, params, offset)
            offset += params["rounds"] * params["requests_per_round"]
            ratios(run, baselines, bound["bound_requests_per_s"])
            out["runs"][str(n)] = {**run, "bound": bound}
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
    report(out, facts, params, counts, baselines, path)


def report(out: dict[str, Any], facts: dict[str, Any], params: dict[str, Any], counts: list[int], baselines: list[str],
           path: Path) -> None:
    print()
    print(f"Scaling benchmark, {params['backend']} voices ({'quick' if params['quick'] else 'full'} run) - {load_note(facts)}")
    print(f"concurrency {params['concurrency']}, {params['rounds']} x {params['requests_per_round']} requests per server "
          f"and voice count, 20-word sentences spread over all voices; bound = cores / CPU s of one request at batch 1 "
          "in one thread, over the same voices: " + ", ".join(
              f"N={n} {out['runs'][str(n)]['bound']['bound_requests_per_s']:.2f} req/s" for n in counts))
    rows = []
    for n in counts:
        run = out["runs"][str(n)]
        for name in ["voiceops", *baselines]:
            s = run[name]
            rows.append([n, name, f"{s['ok']}/{s['requests']}", fmt(s["rss_bytes"] / MB, 1), fmt(s["p50_ms"]),
                         fmt(s["p95_ms"]), fmt(s["requests_per_s"], 2), fmt(s["fraction_of_bound"], 2),
                         fmt(s["cpu_seconds_per_request"], 3), fmt(s["cores_busy"], 2)])
        for bl in baselines:
            r = run[f"voiceops/{bl}"]
            rows.append([n, f"voiceops/{bl}", "", fmt(r["rss"], 2), fmt(r["p50"], 2), fmt(r["p95"], 2),
                         fmt(r["requests_per_s"], 2), "", "", ""])
    print(table(["voices", "server", "ok", "RSS MB", "p50 ms", "p95 ms", "req/s", "of bound", "CPU s/req", "cores busy"],
                rows))
    if out["per_additional_voice_bytes"]:
        lo, hi = min(counts), max(counts)
        print(f"\nresident memory per additional voice ({lo} -> {hi} voices): " + ", ".join(
            f"{k} {v / MB:.2f} MB" for k, v in out["per_additional_voice_bytes"].items()))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
