"""Vocoder ceilings: analysis → resynthesis quality and speed of each candidate, no model involved.

A model's reconstruction can only approach its vocoder's ceiling, so this decides the vocoder.
Prints a table and writes benchmarks/results/vocoder_ceiling.json.

    .venv/bin/python benchmarks/vocoder_ceiling.py [--clips 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SR = 16000
VOICES = ["flite-slt", "festival-ked", "flite-awb"]


def griffin_lim(audio: np.ndarray, iterations: int) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(y=audio, sr=SR, n_fft=1024, hop_length=256, n_mels=80, power=1.0)
    return librosa.feature.inverse.mel_to_audio(mel, sr=SR, n_fft=1024, hop_length=256, power=1.0, n_iter=iterations)


def world(audio: np.ndarray, coded: bool) -> np.ndarray:
    import pyworld

    from voice_lib.data.features import FeatureConfig, world_analysis, world_synthesis

    cfg = FeatureConfig(sample_rate=SR)
    if coded:  # the representation the model predicts: 60-dim coded envelope + coded aperiodicity
        lf0, vuv, env, bap = world_analysis(audio, cfg)
        return world_synthesis(lf0, vuv, env, bap, cfg)
    x = audio.astype(np.float64)
    f0, t = pyworld.harvest(x, SR, frame_period=5.0)
    return pyworld.synthesize(f0, pyworld.cheaptrick(x, f0, t, SR), pyworld.d4c(x, f0, t, SR), SR, 5.0).astype(np.float32)


def score(ref: np.ndarray, deg: np.ndarray) -> tuple[float, float]:
    from pesq import pesq
    from pystoi import stoi

    n = min(len(ref), len(deg))
    return float(pesq(SR, ref[:n], deg[:n], "wb")), float(stoi(ref[:n], deg[:n], SR, extended=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vocoder_ceiling.json")
    args = parser.parse_args()
    from voice_lib.data.corpus import load_sentences, synthesize

    sentences = load_sentences("en")[: args.clips]
    candidates = {
        "griffin-lim-32": lambda a: griffin_lim(a, 32),
        "griffin-lim-100": lambda a: griffin_lim(a, 100),
        "world": lambda a: world(a, coded=False),
        "world-coded-60 (used)": lambda a: world(a, coded=True),
    }
    rows = {name: {"pesq": [], "stoi": [], "rtf": []} for name in candidates}
    for voice in VOICES:
        for text in sentences:
            ref = synthesize(text, voice, SR)
            for name, fn in candidates.items():
                started = time.perf_counter()
                out = fn(ref)
                rows[name]["rtf"].append((time.perf_counter() - started) / (len(ref) / SR))
                p, s = score(ref, out)
                rows[name]["pesq"].append(p)
                rows[name]["stoi"].append(s)
    table = {name: {k: round(statistics.median(v), 3) for k, v in m.items()} for name, m in rows.items()}
    print(f"{'vocoder':24} {'PESQ-wb':>8} {'STOI':>6} {'RTF':>7}   (medians over {len(VOICES)} voices x {len(sentences)} clips; RTF = analysis + resynthesis)")
    for name, m in table.items():
        print(f"{name:24} {m['pesq']:8.2f} {m['stoi']:6.3f} {m['rtf']:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"voices": VOICES, "clips_per_voice": len(sentences), "median": table}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
