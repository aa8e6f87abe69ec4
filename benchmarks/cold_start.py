"""Cold start (issue "Serving at the machine's limit"): process start to /readyz = ready, with 1, 10 and 50 voices.

Voices are production two-stage voices, as onboarding makes them: a rank-8 LoRA of the shipped converter
(peft, the training targets), its two_stage.json written the way voice_lib/train/finetune_two_stage.py writes
it (reference voice and pitch statistics, the variance post-filter, the rendering chosen by
``synthesis_candidates``), a GE2E-sized speaker embedding and voice.json, registered in a private MLflow with
the two-stage lineage tags and aliased ``production``. Each measurement starts a fresh `voiceops serve` with an
empty cache, so a start includes every download, the base load, every adapter load and the warm-up synthesis.

Measured per start: seconds from Popen to /livez (interpreter, imports, app), to /readyz = ready serving all N
voices, where the first reload spent its time (/v1/admin/status ``last_load_timings``: registry read, fetch,
base, adapters, warm-up), the first request's latency after ready (a 20-word sentence, one voice) and the
second's, and the resident memory. With ``--variants`` several server settings are measured in the same run,
side by side, interleaved per voice count.

    .venv/bin/python benchmarks/cold_start.py [--voices 1,10,50] [--repeats 1] [--variants default]
Prints a table and writes benchmarks/results/cold_start.json.

The voice maker here is local to this script for now (another branch adds a two-stage maker to common.py;
the two are to be merged into one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LORA_B_SCALE,
    LORA_RANK,
    ROOT,
    BaseInfo,
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


def two_stage_base() -> BaseInfo:
    """The shipped converter with the lineage tags two-stage training registers (backend two_stage)."""
    from voice_lib.core.hashing import sha256_file
    from voice_lib.model.checkpoints import CONVERTER_WEIGHTS, SHIPPED_CONVERTER

    sha = sha256_file(SHIPPED_CONVERTER / CONVERTER_WEIGHTS)
    lineage = {"base_model": "voice-base", "base_version": "shipped", "base_sha256": sha, "data_sha256": "b" * 64,
               "code_version": "benchmark", "lora_rank": str(LORA_RANK), "backend": "two_stage"}
    return BaseInfo(SHIPPED_CONVERTER, sha, lineage)


def make_two_stage_voice(base: BaseInfo, out: Path, seed: int, synthesis: str = "source_filter") -> Path:
    """A production-shaped two-stage voice folder: a random rank-8 LoRA of the converter (lora_B ~ N(0, 0.02)) and
    the files adaptation writes beside it. Deterministic in ``seed``; alternates the converter's two sources."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from voice_lib.data.reference import PitchStats, TwoStageVoice
    from voice_lib.model.checkpoints import load_converter
    from voice_lib.model.converter import CONVERTER_LORA_TARGETS, N_ENVELOPE
    from voice_lib.train.finetune_two_stage import synthesis_candidates

    model, config = load_converter(base.path)
    torch.manual_seed(seed)  # peft initialises lora_A from the global generator
    lora = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=CONVERTER_LORA_TARGETS,
                                            lora_dropout=0.0, bias="none"))
    g = torch.Generator().manual_seed(seed)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * LORA_B_SCALE
    lora.save_pretrained(str(out))
    rng = np.random.default_rng(seed)
    source_voice = config["sources"][seed % len(config["sources"])]
    source = PitchStats(**config["source_pitch"][source_voice])
    target = PitchStats(round(float(source.mean + rng.uniform(-0.2, 0.5)), 4), round(float(source.std * rng.uniform(0.8, 1.3)), 4))
    scale = tuple(round(float(v), 4) for v in np.clip(rng.normal(1.2, 0.1, N_ENVELOPE), 1.0, 2.0))
    voice = synthesis_candidates(TwoStageVoice(source_voice, source, target, (1.0, *scale[1:])), synthesis)[-1]
    voice.save(out)
    np.save(out / "speaker_embedding.npy", rng.standard_normal(256).astype(np.float32))
    (out / "voice.json").write_text(json.dumps({"seed": seed, "backend": "two_stage", "base_sha256": base.sha256,
                                                "base_version": "shipped", "source_voice": source_voice,
                                                "synthesis": voice.synthesis}))
    return out


def register_voices(bench: Bench, voice_ids: list[str], workers: int = 4) -> None:
    """Make, register and promote two-stage voices (registrations in parallel, one registry client per thread)."""
    folders = [make_two_stage_voice(bench.base, bench.home / "voices" / v, seed) for seed, v in
               ((int(v.rsplit("-", 1)[1]), v) for v in voice_ids)]
    local = threading.local()

    def one(item: tuple[str, Path]) -> None:
        if not hasattr(local, "registry"):
            local.registry = bench.registry
        version = bench.register(item[0], item[1], local.registry)
        local.registry.promote(f"voice-{item[0]}", version)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, zip(voice_ids, folders)))


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
    bench = Bench("cold-start")
    bench.base = two_stage_base()
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
            register_voices(bench, new)
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
