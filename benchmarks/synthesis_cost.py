"""CPU cost of one two-stage synthesis, stage by stage, for each rendering (WORLD and the source filter).

Wall-time RTF on a shared 2-core machine says more about the neighbours than about the code, so this measures
CPU seconds (the process's own plus its children's: the reference synthesizer runs as a subprocess) per second
of audio, in one thread, one sentence at a time: the cost a request puts on the machine, and the bound on
throughput (cores / cost). Stages: the reference synthesizer (render), WORLD analysis of its rendering, the
converter pass, and the rendering (WORLD resynthesis, or TD-PSOLA + envelope filter). The converter is the
shipped one with no adapter (a LoRA adds a few small matrix products); the voice is flite-awb mapped to
flite-slt's pitch (female, the far pitch shift), the costliest case for PSOLA.

    .venv/bin/python benchmarks/synthesis_cost.py [--sentences 10]
Prints a table and writes benchmarks/results/synthesis_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds


def measure(sentences: list[str], synthesis: str) -> dict:
    from voice_lib.data.reference import PitchStats, TwoStageVoice, render_source
    from voice_lib.infer.core import AcousticRow
    from voice_lib.infer.multilora import LoraBank
    from voice_lib.infer.two_stage import load_two_stage
    from voice_lib.release.models import SHIPPED_CONVERTER

    backend = load_two_stage(SHIPPED_CONVERTER)
    bank = LoraBank([], backend.shapes)
    source = PitchStats(4.849, 0.113)  # flite-awb, as the shipped converter's card records
    voice = replace(TwoStageVoice("flite-awb", source, PitchStats(5.25, 0.12), (1.2,) * 60), synthesis=synthesis,
                    envelope_scale_power=1.5 if synthesis == "source_filter" else 1.0)
    speaker = torch.zeros(256)
    stages: dict[str, list[float]] = {"render": [], "analysis": [], "converter": [], "rendering": [], "total": []}
    for text in sentences:
        t0 = cpu_seconds()
        render_source(text, voice.source_voice)
        t1 = cpu_seconds()
        row = AcousticRow(backend.model_inputs(text, "en", voice.to_dict()), speaker, 0)  # renders again, then analyses
        t2 = cpu_seconds()
        (features,) = backend.predict([row], bank)
        t3 = cpu_seconds()
        out = backend.render(row, features)
        t4 = cpu_seconds()
        seconds = len(out) / backend.feature_config.sample_rate
        costs = {"render": t1 - t0, "analysis": (t2 - t1) - (t1 - t0), "converter": t3 - t2, "rendering": t4 - t3}
        for name, cost in costs.items():
            stages[name].append(cost / seconds)
        stages["total"].append((t1 - t0 + t4 - t2 + (t2 - t1) - (t1 - t0)) / seconds)
    return {k: statistics.median(v) for k, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthesis_cost.json")
    args = parser.parse_args()
    from voice_lib.data.corpus import load_sentences

    torch.set_num_threads(1)
    sentences = list(load_sentences("en")[: args.sentences])
    started = time.time()
    results = {mode: measure(sentences, mode) for mode in ("world", "source_filter")}
    print("\n| rendering | render | analysis | converter | rendering | total CPU s per audio s | bound (2 cores) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['render']:.4f} | {r['analysis']:.4f} | {r['converter']:.4f} | {r['rendering']:.4f} | "
              f"{r['total']:.4f} | {2 / r['total']:.0f}× real time |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sentences": len(sentences), "medians_cpu_seconds_per_audio_second": results,
                                    "threads": 1, "wall_seconds": round(time.time() - started, 1),
                                    "cores": 2, "note": "CPU time of the process and its children (flite)"}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
