"""Choosing how a two-stage voice is rendered, by measurement, when it is adapted.

``model.synthesis`` "auto" gives the adaptation two renderings of the same adapted converter (WORLD
resynthesis and the source filter, voice_lib/infer/source_filter.py). Neither wins everywhere (measured on
the held-out voices, docs/model.md: the source filter took flite-rms from WER 0.18 to 0.08 and P.808 2.98 to
3.21, while festival-slt-hts kept more similarity through WORLD), so each is rendered on a few of the voice's
own clips and scored with the release gates' instruments against those clips' real recordings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data.reference import TwoStageVoice

log = logging.getLogger(__name__)


def gate_margin(measured: dict, real_wer: float, real_p808: float, settings: Settings) -> float:
    """The worst of the three gate margins, each in units of its own tolerance (> 0: every gate passes)."""
    ev = settings.eval
    return min((real_wer + ev.max_wer_gap_over_real - measured["wer"]) / max(ev.max_wer_gap_over_real, 1e-6),
               (measured["similarity"] - ev.min_speaker_similarity) / 0.05,
               (measured["p808"] - (real_p808 - ev.max_p808_gap_below_real)) / max(ev.max_p808_gap_below_real, 1e-6))


def choose_synthesis(candidates: list[TwoStageVoice], base_dir: Path, adapter_dir: Path, speaker: np.ndarray,
                     clips: list[dict], settings: Settings, n_clips: int = 6) -> tuple[TwoStageVoice, dict]:
    """The candidate rendering with the largest worst gate margin on up to ``n_clips`` of ``clips`` (manifest
    entries: the caller passes validation clips first and never the held-out ones the gates use)."""
    from voice_lib.data.asr import transcribe_english, word_error_rate
    from voice_lib.data.audio import decode_audio
    from voice_lib.data.speech import cosine, naturalness_mos, speaker_embedding
    from voice_lib.infer.synthesizer import Synthesizer

    store = artifact_store(settings)
    chosen = clips[:n_clips]
    english = all(c.get("language", "en").startswith("en") for c in chosen)  # tiny.en cannot score Mandarin

    def measure(audio: np.ndarray, text: str) -> dict:
        wer = word_error_rate(text, transcribe_english(audio, 16000, settings)) if english else 0.0
        return {"wer": wer, "similarity": cosine(speaker_embedding(audio, 16000), speaker),
                "p808": naturalness_mos(audio, 16000).p808}

    def mean(rows: list[dict]) -> dict:
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    real = mean([measure(decode_audio(store.read_bytes(c["wav"]), 16000, c["wav"]).audio, c["text"]) for c in chosen])
    synth = Synthesizer.load(base_dir, speaker, adapter_dir, backend="two_stage")
    measured = {}
    for candidate in candidates:
        synth.frontend = candidate.to_dict()
        m = mean([measure(synth.synthesize(c["text"], c.get("language", "en")).audio, c["text"]) for c in chosen])
        m["margin"] = gate_margin(m, real["wer"], real["p808"], settings)
        measured[candidate.synthesis] = {k: round(v, 3) for k, v in m.items()}
    best = max(candidates, key=lambda c: measured[c.synthesis]["margin"])
    log.info("two-stage rendering: %s (on %d clips; real WER %.3f P.808 %.2f; %s)", best.synthesis, len(chosen),
             real["wer"], real["p808"], measured)
    return best, {"clips": len(chosen), "real": {k: round(real[k], 3) for k in ("wer", "p808")}, **measured}
