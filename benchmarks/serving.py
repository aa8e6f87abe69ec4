"""Serving benchmark (issue "Serving"): latency, throughput, streaming and memory per voice of the real server.

Starts a private MLflow and two `voiceops serve` processes on loopback that differ only in batching:
``batch8`` (batch_max_size 8, batch_max_wait_ms 10: the defaults) and ``batch1`` (batch_max_size 1). Voices
are rank-8 LoRA adapters registered in MLflow, of the default backend's shipped network: two-stage (the shipped
converter, each voice with a real two_stage.json; benchmarks/bench_voices.py) unless ``--backend end_to_end``
(the shipped end-to-end base, voice_lib/assets/base).

1. Memory per additional voice: 1 voice registered -> two warm-up passes at concurrency 16 -> resident memory
   rss1 (VmRSS of the server pid, and /metrics voiceops_resident_memory_bytes); 10 more voices registered ->
   admin reload (which warms each new voice with one synthesis) -> rss11; (rss11 - rss1) / 10. Then the same
   two warm-up passes over all 11 voices, reported too: the growth over a pass with no new voice is allocator
   drift, the noise of any RSS difference taken across traffic.
2. Latency and throughput at concurrency 1, 4 and 16 (closed loop), 20-word sentences (a distinct sentence per
   request, so the text frontend's cache does not hide phonemisation) spread over the 11 voices; the two
   servers take turns (same requests, alternating order, several rounds), never loaded at the same time.
3. Streaming: time to the first audio bytes with ``stream: true`` vs the full response for a 3-sentence text,
   at concurrency 1, alternating, on both servers.

Goals are printed as PASS/MISS, never asserted. Prints tables and writes benchmarks/results/serving.json
(serving.quick.json with --quick).

    .venv/bin/python benchmarks/serving.py [--quick]
"""

from __future__ import annotations

import argparse
import random
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
    load_note,
    machine_facts,
    median,
    merge_summaries,
    metric_value,
    peak_rss_bytes,
    percentile,
    ratio,
    run_load,
    sentence_20,
    table,
    verdict,
    write_results,
)

GOALS = {"p95_ms_at_c4": 800.0, "first_chunk_ms": 300.0, "batching_throughput_ratio": 2.0, "mb_per_voice": 10.0}
MB = 1024 * 1024
_FIRST = ["This is the first sentence of a short answer", "Here is the opening line of the reply",
          "Thank you for calling the service desk today", "Your order has been received and confirmed",
          "Good morning and welcome to the weekly update"]
_SECOND = ["Here comes a second one, a little longer than the first", "The team has looked at the problem in detail",
           "Our records show two open requests on your account", "Delivery is planned for the end of next week",
           "Most of the work was finished during the last few days"]
_THIRD = ["And a third sentence, to finish the reply", "Please call again if anything is unclear",
          "We will send a message when it changes", "Thank you for your patience and have a nice day",
          "That is all for now, goodbye"]


def stream_text(i: int) -> str:
    r = random.Random(10_000 + i)
    return f"{r.choice(_FIRST)} for {r.choice(['Alice', 'Bob', 'Carol', 'Dan', 'Eve', 'Frank'])}. {r.choice(_SECOND)}. {r.choice(_THIRD)}."


def batch_counters(server: Server) -> tuple[int, int]:
    b = server.status()["batcher"]
    return b["batches"], b["items"]


def memory(server: Server) -> dict[str, int | None]:
    return {"vmrss_bytes": server.rss(), "metric_resident_bytes": metric_value(server.metrics(), "voiceops_resident_memory_bytes")}


def warm(server: Server, voices: list[str], n: int, offset: int) -> None:
    body = lambda i: {"text": sentence_20(offset + i), "voice_id": voices[i % len(voices)], "user_id": f"warm-{i}"}
    res = run_load(server.url, server.auth, body, 16, n, 180)
    bad = [r for r in res if r.status != 200]
    if bad:
        raise RuntimeError(f"{server.name}: warm-up failed: {bad[0].status} {bad[0].error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min): fewer requests, one round")
    parser.add_argument("--rounds", type=int, help="load rounds per concurrency (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads of the servers (default: torch's own)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/serving[.quick].json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs) for inspection")
    parser.add_argument("--backend", choices=("two_stage", "end_to_end"), default="two_stage",
                        help="the voices' backend (default two_stage, the platform's default)")
    args = parser.parse_args()
    facts = machine_facts()
    quick = args.quick
    params: dict[str, Any] = {
        "quick": quick, "backend": args.backend, "concurrency": [1, 4, 16],
        "requests_per_round": {1: 8, 4: 16, 16: 32} if quick else {1: 30, 4: 60, 16: 128},
        "rounds": args.rounds or (1 if quick else 2), "stream_pairs": 4 if quick else 15,
        "max_seconds_per_load": 120, "extra_voices": 10, "warmup_requests": 24 if quick else 48, "warmup_passes": 2,
        "servers": {"batch8": {"batch_max_size": 8, "batch_max_wait_ms": 10},
                    "batch1": {"batch_max_size": 1, "batch_max_wait_ms": 10}},
        "common_serving": {"poll_seconds": 10, "max_text_chars": 1000},
        "server_torch_threads": args.threads or "torch default (= nproc)",
        "lora_rank": LORA_RANK, "lora_b_scale": LORA_B_SCALE, "text": "distinct 20-word sentences (common.sentence_20)",
        "stream_text": "distinct 3-sentence texts, format wav", "client": "closed loop, httpx, one thread per concurrent client, same machine",
    }
    print(load_note(facts), flush=True)
    bench = Bench("serving", keep=args.keep, backend=args.backend)
    out: dict[str, Any] = {"benchmark": "serving", "machine": facts, "params": params, "goals": GOALS}
    try:
        t0 = time.monotonic()
        bench.start_mlflow()
        base_info = bench.base
        out["base"] = {"path": str(base_info.path), "sha256": base_info.sha256}
        voices = [f"bench-v{i:02d}" for i in range(1 + params["extra_voices"])]
        bench.make_and_register([(voices[0], 0, LORA_B_SCALE)])
        servers = {name: bench.start_server(name, {**params["common_serving"], **cfg}, args.threads)
                   for name, cfg in params["servers"].items()}
        for s in servers.values():
            s.wait_voices(voices[:1], 300)
        print(f"setup {time.monotonic() - t0:.0f} s: MLflow, 1 voice, 2 servers ready", flush=True)

        # 1. memory per additional voice -------------------------------------------------------------
        # Resident memory after warm-up passes (concurrency 16, so every batch size and worker thread has been
        # used); the change over the last pass is the allocator's own drift, the noise of the per-voice number.
        def warmed_memory(s: Server, vs: list[str], offset: int) -> dict[str, Any]:
            passes = []
            for k in range(params["warmup_passes"]):
                warm(s, vs, params["warmup_requests"], offset + 100 * k)
                time.sleep(1.0)
                passes.append(memory(s))
            return {**passes[-1], "vmrss_per_pass": [p["vmrss_bytes"] for p in passes],
                    "drift_last_pass_bytes": passes[-1]["vmrss_bytes"] - passes[-2]["vmrss_bytes"] if len(passes) > 1 else None}

        mem: dict[str, Any] = {}
        for s in servers.values():
            mem[s.name] = {"one_voice": warmed_memory(s, voices[:1], 0)}
        bench.make_and_register([(v, i + 1, LORA_B_SCALE) for i, v in enumerate(voices[1:])])
        for s in servers.values():
            s.reload()
            s.wait_voices(voices, 120)
            time.sleep(1.0)
            m = mem[s.name]
            m["eleven_voices"] = memory(s)  # right after the reload (it warms each new voice once), no traffic between
            m["adapters_loaded"] = s.status()["adapters_loaded"]
            m["eleven_voices_after_traffic"] = warmed_memory(s, voices, 500)
            for k in ("vmrss_bytes", "metric_resident_bytes"):
                a, b = m["one_voice"][k], m["eleven_voices"][k]
                m[f"per_voice_{k}"] = (b - a) / params["extra_voices"] if a is not None and b is not None else None
            b = m["eleven_voices_after_traffic"]["vmrss_bytes"]
            m["per_voice_after_traffic_vmrss_bytes"] = (b - m["one_voice"]["vmrss_bytes"]) / params["extra_voices"]
        from voice_lib.infer.multilora import AdapterWeights

        adapter_dir = bench.home / "adapters" / f"{voices[0]}-0"
        n_params = AdapterWeights.load(adapter_dir).n_params
        out["adapter"] = {"params": n_params, "float32_bytes": n_params * 4,
                          "safetensors_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size}
        out["memory"] = mem
        print(f"memory measured ({time.monotonic() - t0:.0f} s)", flush=True)

        # 2. latency / throughput ------------------------------------------------------------------------
        rounds: dict[str, dict[int, list]] = {name: {c: [] for c in params["concurrency"]} for name in servers}
        batches: dict[str, dict[int, list[int]]] = {name: {c: [0, 0] for c in params["concurrency"]} for name in servers}
        offset = 1000
        for rnd in range(params["rounds"]):
            for ci, c in enumerate(params["concurrency"]):
                n = params["requests_per_round"][c]
                order = list(servers.values())
                if (rnd + ci) % 2:
                    order.reverse()
                for s in order:
                    body = lambda i, o=offset: {"text": sentence_20(o + i), "voice_id": voices[i % len(voices)],
                                                "user_id": f"user-{o + i}"}
                    b0 = batch_counters(s)
                    res = run_load(s.url, s.auth, body, c, n, params["max_seconds_per_load"])
                    b1 = batch_counters(s)
                    rounds[s.name][c].append(res)
                    batches[s.name][c][0] += b1[0] - b0[0]
                    batches[s.name][c][1] += b1[1] - b0[1]
                    ok = [r for r in res if r.status == 200]
                    print(f"  round {rnd + 1} c={c:<2} {s.name}: {len(ok)}/{len(res)} ok, "
                          f"p50 {fmt(percentile([r.latency * 1000 for r in ok], 50))} ms", flush=True)
                offset += n
        load: dict[str, Any] = {}
        for name in servers:
            load[name] = {}
            for c in params["concurrency"]:
                summary = merge_summaries(rounds[name][c])
                nb, ni = batches[name][c]
                summary["mean_batch_size"] = ni / nb if nb else None
                load[name][str(c)] = summary
        out["load"] = load

        # 3. streaming first chunk vs full response -----------------------------------------------------
        stream: dict[str, Any] = {}
        samples = {name: ([], [], []) for name in servers}  # first chunk, stream total, full response (ms)
        for i in range(params["stream_pairs"]):  # servers and request kinds alternate: same background for all
            order = list(servers.values()) if i % 2 == 0 else list(servers.values())[::-1]
            for s in order:
                firsts, stream_totals, fulls = samples[s.name]
                pair = [("stream", True, 2 * i), ("full", False, 2 * i + 1)]
                if i % 2:
                    pair.reverse()
                for kind, is_stream, k in pair:
                    body = {"text": stream_text(k), "voice_id": voices[k % len(voices)], "user_id": f"s-{k}",
                            "stream": is_stream}
                    res = run_load(s.url, s.auth, lambda _i, b=body: b, 1, 1, 60)[0]
                    if res.status != 200:
                        raise RuntimeError(f"{s.name} {kind}: {res.status} {res.error}")
                    if is_stream:
                        firsts.append(res.first_byte * 1000)
                        stream_totals.append(res.latency * 1000)
                    else:
                        fulls.append(res.latency * 1000)
        for s in servers.values():
            firsts, stream_totals, fulls = samples[s.name]
            stream[s.name] = {"first_chunk_ms": {"p50": median(firsts), "p95": percentile(firsts, 95), "max": max(firsts)},
                              "stream_total_ms": {"p50": median(stream_totals), "p95": percentile(stream_totals, 95)},
                              "full_response_ms": {"p50": median(fulls), "p95": percentile(fulls, 95)},
                              "first_chunk_over_full_p50": ratio(median(firsts), median(fulls)),
                              "samples": {"first_chunk_ms": firsts, "full_response_ms": fulls}}
        out["streaming"] = stream
        for s in servers.values():
            mem[s.name]["after_load"] = memory(s)
            mem[s.name]["peak_vmhwm_bytes"] = peak_rss_bytes(s.proc.pid)
            mem[s.name]["frontend_cache_hit_ratio"] = metric_value(s.metrics(), "voiceops_frontend_cache_hit_ratio")

        # goals ---------------------------------------------------------------------------------------------
        a, b = load["batch8"], load["batch1"]
        sat = str(max(params["concurrency"]))
        thr_ratio = ratio(a[sat]["requests_per_s"], b[sat]["requests_per_s"])
        per_voice_mb = (mem["batch8"]["per_voice_vmrss_bytes"] or 0) / MB
        first_p50 = stream["batch8"]["first_chunk_ms"]["p50"]
        first_p95 = stream["batch8"]["first_chunk_ms"]["p95"]
        goals = {
            "p95_at_c4_le_800ms": {"value_ms": a["4"]["p95_ms"], "pass": a["4"]["p95_ms"] is not None and a["4"]["p95_ms"] <= 800},
            "first_chunk_le_300ms": {"p50_ms": first_p50, "p95_ms": first_p95, "pass_p50": first_p50 <= 300,
                                     "pass_p95": first_p95 <= 300},
            "batching_throughput_ge_2x_at_saturation": {"concurrency": int(sat), "ratio_requests": thr_ratio,
                                                        "ratio_audio_seconds": ratio(a[sat]["audio_seconds_per_s"],
                                                                                     b[sat]["audio_seconds_per_s"]),
                                                        "pass": thr_ratio is not None and thr_ratio >= 2.0},
            "le_10mb_per_additional_voice": {"value_mb": per_voice_mb, "pass": per_voice_mb <= 10},
        }
        out["goal_results"] = goals
        path = write_results("serving", out, quick, args.out)
    finally:
        bench.close()

    # tables ------------------------------------------------------------------------------------------------
    print()
    print(f"Serving benchmark ({'quick' if quick else 'full'} run) - {load_note(facts)}")
    print(f"shipped base {out['base']['sha256'][:12]}…, LoRA rank {LORA_RANK}, {len(voices)} voices, "
          f"{params['rounds']} round(s), server torch threads: {params['server_torch_threads']}")
    rows = []
    for c in params["concurrency"]:
        for name in servers:
            s = load[name][str(c)]
            rows.append([f"c={c}", name, f"{s['ok']}/{s['requests']}", fmt(s["p50_ms"]), fmt(s["p95_ms"]),
                         fmt(s["requests_per_s"], 2), fmt(s["audio_seconds_per_s"], 2), fmt(s["mean_batch_size"], 2)])
        rows.append([f"c={c}", "batch8/batch1", "", fmt(ratio(a[str(c)]["p50_ms"], b[str(c)]["p50_ms"]), 2),
                     fmt(ratio(a[str(c)]["p95_ms"], b[str(c)]["p95_ms"]), 2),
                     fmt(ratio(a[str(c)]["requests_per_s"], b[str(c)]["requests_per_s"]), 2),
                     fmt(ratio(a[str(c)]["audio_seconds_per_s"], b[str(c)]["audio_seconds_per_s"]), 2), ""])
    print(table(["load", "server", "ok", "p50 ms", "p95 ms", "req/s", "audio s/s", "batch"], rows))
    print()
    print(table(["server", "first chunk p50", "p95", "full response p50", "p95", "first/full"],
                [[n, fmt(v["first_chunk_ms"]["p50"]), fmt(v["first_chunk_ms"]["p95"]), fmt(v["full_response_ms"]["p50"]),
                  fmt(v["full_response_ms"]["p95"]), fmt(v["first_chunk_over_full_p50"], 2)] for n, v in stream.items()]))
    print()
    print(table(["server", "RSS 1 voice MB", "RSS 11 voices MB", "MB/extra voice", "(/metrics)",
                 "11 voices after traffic MB", "MB/extra voice after traffic", "drift of last warm pass MB (1 / 11)",
                 "after all load MB"],
                [[n, fmt(m["one_voice"]["vmrss_bytes"] / MB, 1), fmt(m["eleven_voices"]["vmrss_bytes"] / MB, 1),
                  fmt(m["per_voice_vmrss_bytes"] / MB, 2), fmt((m["per_voice_metric_resident_bytes"] or 0) / MB, 2),
                  fmt(m["eleven_voices_after_traffic"]["vmrss_bytes"] / MB, 1),
                  fmt(m["per_voice_after_traffic_vmrss_bytes"] / MB, 2),
                  (f"{fmt((m['one_voice']['drift_last_pass_bytes'] or 0) / MB, 1)} / "
                   f"{fmt((m['eleven_voices_after_traffic']['drift_last_pass_bytes'] or 0) / MB, 1)}"),
                  fmt(m["after_load"]["vmrss_bytes"] / MB, 1)]
                 for n, m in mem.items()]))
    print("MB/extra voice = (RSS right after reloading with 11 voices - RSS with 1 voice after warm-up) / 10; "
          "'after traffic' adds two more warm-up passes, i.e. allocator drift (see the drift column)")
    print(f"adapter: {out['adapter']['params']} LoRA parameters = {out['adapter']['float32_bytes'] / MB:.2f} MB float32")
    print()
    g = goals
    print("Goals (batch8 = the default config):")
    print(f"  p95 at concurrency 4 <= 800 ms:        {fmt(g['p95_at_c4_le_800ms']['value_ms'])} ms  "
          f"{verdict(g['p95_at_c4_le_800ms']['pass'])}")
    print(f"  first chunk <= 300 ms:                 p50 {fmt(first_p50)} ms {verdict(first_p50 <= 300)}, "
          f"p95 {fmt(first_p95)} ms {verdict(first_p95 <= 300)}")
    print(f"  batching throughput >= 2x at c={sat}:   {fmt(thr_ratio, 2)}x  {verdict(g['batching_throughput_ge_2x_at_saturation']['pass'])}")
    print(f"  <= 10 MB per additional voice:         {per_voice_mb:.2f} MB  {verdict(per_voice_mb <= 10)}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
