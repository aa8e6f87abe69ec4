"""What the quality instruments read on real recordings and on their WORLD vocoder resynthesis.

For each voice held out of pretraining (flite-slt, festival-slt-hts, flite-rms) and ten everyday sentences:
the recording as the engine renders it ("real") and its WORLD analysis → resynthesis ("vocoder", the ceiling
every VoiceOps model ends with), scored by the evaluation's instruments: Whisper (VOICEOPS_ASR__*, default
the bundled tiny.en, beam 5, one thread) WER and confidence, and DNSMOS P.808 / OVRL. Seconds per clip are
wall time of each instrument on this machine (2 CPU cores shared with other jobs).

    python benchmarks/instruments.py [--voices flite-slt,...] [--out benchmarks/results/instruments.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.data import corpus
from voice_lib.data.asr import load_recognizer, model_path, transcribe, word_error_rate
from voice_lib.data.features import FeatureConfig, world_analysis, world_synthesis
from voice_lib.data.speech import naturalness_mos

SENTENCES = [
    "Please call me when you get home tonight.",
    "We need more time to finish the project.",
    "The train to the city leaves at half past nine.",
    "Could you pass me the salt and pepper?",
    "I left my keys on the kitchen table.",
    "The weather should be sunny for the rest of the week.",
    "She bought fresh bread and milk at the corner shop.",
    "Turn left at the next traffic light.",
    "My brother works at the hospital downtown.",
    "Let's meet for coffee tomorrow morning.",
]
VOICES = ["flite-slt", "festival-slt-hts", "flite-rms"]
# The texts the corpus and the held-out clips are drawn from (the last ten lines of voice_lib/data/sentences_en.txt).
SETS = {"everyday": SENTENCES, "corpus": corpus.load_sentences("en")[-10:]}


def score(audio: np.ndarray, text: str, settings: Settings) -> dict:
    t0 = time.perf_counter()
    heard = transcribe(audio, 16000, settings)
    t1 = time.perf_counter()
    mos = naturalness_mos(audio, 16000)
    t2 = time.perf_counter()
    return {"wer": word_error_rate(text, heard.text), "confidence": heard.confidence, "transcript": heard.text,
            "p808": mos.p808, "ovrl": mos.ovrl, "asr_s": t1 - t0, "dnsmos_s": t2 - t1, "seconds": len(audio) / 16000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", default=",".join(VOICES))
    parser.add_argument("--sets", default="everyday,corpus", help=f"sentence sets: {', '.join(SETS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "instruments.json")
    args = parser.parse_args()
    settings, cfg = Settings(), FeatureConfig()
    t0 = time.perf_counter()
    load_recognizer(model_path(settings.asr), settings.asr.threads)
    load_s = time.perf_counter() - t0
    naturalness_mos(corpus.synthesize(SENTENCES[0], VOICES[0]), 16000)  # DNSMOS' first call builds its sessions
    rows = []
    sets, voices = args.sets.split(","), args.voices.split(",")
    for name, voice in ((n, v) for n in sets for v in voices):
        for text in SETS[name]:
            real = corpus.synthesize(text, voice)
            vocoded = world_synthesis(*world_analysis(real, cfg), cfg)
            for system, audio in (("real", real), ("vocoder", vocoded)):
                rows.append({"set": name, "voice": voice, "system": system, "text": text, **score(audio, text, settings)})
                print(f"{name:8} {voice:17} {system:8} WER {rows[-1]['wer']:.2f} P.808 {rows[-1]['p808']:.2f} "
                      f"OVRL {rows[-1]['ovrl']:.2f}  {rows[-1]['transcript']}", flush=True)
    summary = []
    for name, voice, system in ((n, v, s) for n in sets for v in voices for s in ("real", "vocoder")):
        rs = [r for r in rows if r["set"] == name and r["voice"] == voice and r["system"] == system]
        summary.append({"set": name, "voice": voice, "system": system, "clips": len(rs),
                        **{k: float(np.mean([r[k] for r in rs])) for k in
                           ("wer", "confidence", "p808", "ovrl", "asr_s", "dnsmos_s", "seconds")}})
    print(f"\nWhisper model {model_path(settings.asr)} (beam {settings.asr.beam_size}, {settings.asr.threads} thread), "
          f"loaded in {load_s:.2f} s")
    print(f"{'set':8} {'voice':17} {'system':8} {'WER':>5} {'conf':>5} {'P.808':>6} {'OVRL':>5} {'ASR s':>6} {'MOS s':>6} {'clip s':>6}")
    for s in summary:
        print(f"{s['set']:8} {s['voice']:17} {s['system']:8} {s['wer']:5.3f} {s['confidence']:5.2f} {s['p808']:6.2f} {s['ovrl']:5.2f} "
              f"{s['asr_s']:6.2f} {s['dnsmos_s']:6.2f} {s['seconds']:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"asr": settings.asr.model_dump(), "asr_load_seconds": load_s,
                                    "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
