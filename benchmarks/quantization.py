"""Model optimisation trial (issue "Serving at the machine's limit"): the converter in float32, with dynamic INT8
linear layers (torch), and under ONNX Runtime, side by side on speed and quality.

The network is the two-stage backend's converter (the default backend's only neural network). Each variant renders
the same ``--sentences`` everyday sentences as flite-rms from flite-awb (the shipped converter conditioned on
flite-rms's GE2E embedding and pitch, no adapter: the evaluation's "base" system, so no onboarding is needed; the
source filter renders, as for every default voice) and is scored with the instruments evaluation uses: Whisper
tiny.en WER, GE2E similarity to flite-rms's embedding, DNSMOS P.808. Speed is CPU seconds of the converter pass per
second of audio in one thread (median over the sentences, batch 1 and a padded batch of 8), and the whole request's
CPU cost (reference synthesizer + analysis + converter + rendering) for the float model, so the share the network
has in a request is plain. The largest output difference to float32 is reported too.

- ``int8``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (weights INT8, activations
  quantised per batch); the multi-LoRA wrappers keep their float deltas around the quantised base layers.
- ``onnx``: the converter exported with ``torch.onnx.export`` (TorchScript exporter, dynamic batch and time axes)
  and run by onnxruntime (already a dependency through DNSMOS) with one intra-op thread. An ONNX graph has no
  per-row adapters, so a server would need one merged graph per voice: the trial measures the base network only.

    .venv/bin/python benchmarks/quantization.py [--sentences 10]
Prints a table and writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds

TARGET = "flite-rms"
SOURCE = "flite-awb"


def onnx_runner(model: torch.nn.Module, example: tuple[torch.Tensor, ...], folder: Path) -> Callable:
    """The converter exported to ONNX and wrapped to take and give torch tensors like the module."""
    import onnxruntime as ort

    path = folder / "converter.onnx"
    torch.onnx.export(model, example, str(path), dynamo=False, input_names=["src", "speaker", "lengths"],
                      output_names=["out"], dynamic_axes={"src": {0: "b", 1: "t"}, "speaker": {0: "b"},
                                                          "lengths": {0: "b"}, "out": {0: "b", 1: "t"}},
                      opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(src: torch.Tensor, speaker: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {"src": src.numpy(), "speaker": speaker.numpy(), "lengths": lengths.numpy()})
        return torch.from_numpy(out)

    return run


def target_voice(sentences: list[str]):
    """flite-rms's embedding (mean over renderings of held-aside sentences) and a two_stage.json mapping
    flite-awb to its pitch, rendered by the source filter."""
    from voice_lib.data.corpus import synthesize
    from voice_lib.data.reference import TwoStageVoice, analyze_frames, pitch_stats, render_source
    from voice_lib.data.speech import speaker_embedding

    real = [synthesize(text, TARGET, 16000) for text in sentences]
    embedding = np.mean([speaker_embedding(a, 16000) for a in real], axis=0)
    embedding /= np.linalg.norm(embedding)
    target = pitch_stats([analyze_frames(render_source(t, TARGET)) for t in sentences])
    source = pitch_stats([analyze_frames(render_source(t, SOURCE)) for t in sentences])
    voice = TwoStageVoice(SOURCE, source, target, synthesis="source_filter", envelope_scale_power=1.5)
    return embedding.astype(np.float32), voice


def measure_variant(name: str, forward: Callable, backend: Any, voice: Any, speaker: torch.Tensor, texts: list[str],
                    settings: Any, float_outputs: dict[str, np.ndarray]) -> dict:
    from voice_lib.data.asr import transcribe_english, word_error_rate
    from voice_lib.data.reference import apply_envelope_scale
    from voice_lib.data.speech import cosine, naturalness_mos, speaker_embedding
    from voice_lib.infer.core import AcousticRow

    rows: dict[str, list[float]] = {"cpu_b1": [], "cpu_b8": [], "wer": [], "sim": [], "p808": [], "max_abs_diff": []}
    for text in texts:
        inputs = backend.model_inputs(text, "en", voice.to_dict())
        src = torch.from_numpy(np.ascontiguousarray(inputs.frames, dtype=np.float32))[None]
        lengths = torch.tensor([src.shape[1]])
        seconds = src.shape[1] * backend.feature_config.frame_period_ms / 1000.0
        with torch.inference_mode():
            t0 = cpu_seconds()
            out = backend.model.denormalize(src, forward(src, speaker[None], lengths))
            t1 = cpu_seconds()
            batch = src.repeat(8, 1, 1)  # a server batch of 8 rows of this length
            forward(batch, speaker[None].repeat(8, 1), lengths.repeat(8))
            t2 = cpu_seconds()
        rows["cpu_b1"].append((t1 - t0) / seconds)
        rows["cpu_b8"].append((t2 - t1) / (8 * seconds))
        frames = out[0].numpy()
        if name == "float32":
            float_outputs[text] = frames
        rows["max_abs_diff"].append(float(np.abs(frames - float_outputs[text]).max()))
        audio = backend.render(AcousticRow(inputs, speaker, 0), apply_envelope_scale(frames, inputs.envelope_scale))
        rows["wer"].append(word_error_rate(text, transcribe_english(audio, 16000, settings)))
        rows["sim"].append(cosine(speaker_embedding(audio, 16000), speaker.numpy()))
        rows["p808"].append(naturalness_mos(audio, 16000).p808)
    agg = {k: statistics.median(v) if k.startswith("cpu") else float(np.mean(v)) for k, v in rows.items()}
    agg["max_abs_diff"] = max(rows["max_abs_diff"])
    return agg


def request_cost(backend: Any, voice: Any, speaker: torch.Tensor, texts: list[str]) -> float:
    """Median CPU seconds per audio second of a whole float request (render, analysis, converter, rendering)."""
    from voice_lib.infer.core import AcousticRow
    from voice_lib.infer.multilora import LoraBank

    bank, costs = LoraBank([], backend.shapes), []
    for text in texts:
        t0 = cpu_seconds()
        row = AcousticRow(backend.model_inputs(text, "en", voice.to_dict()), speaker, 0)
        (features,) = backend.predict([row], bank)
        audio = backend.render(row, features)
        costs.append((cpu_seconds() - t0) / (len(audio) / backend.feature_config.sample_rate))
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantization.json")
    args = parser.parse_args()
    from voice_lib.core.config import Settings
    from voice_lib.data.corpus import load_sentences
    from voice_lib.infer.two_stage import load_two_stage
    from voice_lib.release.models import SHIPPED_CONVERTER

    torch.set_num_threads(1)
    started = time.time()
    settings = Settings()
    everyday = list(load_sentences("en"))
    texts, aside = everyday[: args.sentences], everyday[-8:]
    print(f"target {TARGET} from {SOURCE}: embedding and pitch from {len(aside)} sentences", flush=True)
    embedding, voice = target_voice(aside)
    speaker = torch.from_numpy(embedding)
    backend = load_two_stage(SHIPPED_CONVERTER)
    model = backend.model
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        width = backend.model_inputs(texts[0], "en", voice.to_dict()).frames.shape[1]  # raw frames, as the server feeds
        example = (torch.zeros(1, 50, width), speaker[None], torch.tensor([50]))
        variants = {"float32": model, "int8": int8}
        try:
            variants["onnx"] = onnx_runner(model, example, Path(tmp))
        except (ImportError, torch.onnx.OnnxExporterError) as exc:  # the exporter needs the `onnx` package
            print(f"ONNX path skipped: {exc}", flush=True)
        float_outputs: dict[str, np.ndarray] = {}
        results = {}
        for name, forward in variants.items():
            print(f"measuring {name} on {len(texts)} sentences ...", flush=True)
            results[name] = measure_variant(name, forward, backend, voice, speaker, texts, settings, float_outputs)
    whole = request_cost(backend, voice, speaker, texts)
    base = results["float32"]
    print(f"\nConverter variants, {TARGET} from {SOURCE} (base converter + the target's embedding, source filter), "
          f"{len(texts)} sentences, one thread; a whole float request costs {whole:.4f} CPU s per audio s\n")
    print("| variant | converter CPU s / audio s, batch 1 | batch 8 (per row) | speed-up b1 / b8 | share of a request | "
          "WER | sim | P.808 | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["speedup_b1"], r["speedup_b8"] = base["cpu_b1"] / r["cpu_b1"], base["cpu_b8"] / r["cpu_b8"]
        r["share_of_request"] = r["cpu_b1"] / whole
        print(f"| {name} | {r['cpu_b1']:.5f} | {r['cpu_b8']:.5f} | {r['speedup_b1']:.2f}× / {r['speedup_b8']:.2f}× | "
              f"{r['share_of_request']:.1%} | {r['wer']:.3f} | {r['sim']:.3f} | {r['p808']:.3f} | {r['max_abs_diff']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": TARGET, "source": SOURCE, "sentences": len(texts), "threads": 1,
                                    "request_cpu_s_per_audio_s": whole, "variants": results,
                                    "wall_seconds": round(time.time() - started, 1),
                                    "torch": torch.__version__}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
