"""The two-stage backend's source-filter rendering: TD-PSOLA moves pitch and timing and nothing else, the
envelope filter changes the spectrum by what the converter changed and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

TEXT = "The birch canoe slid on the smooth planks."


@pytest.fixture(scope="module")
def rendering():
    from voice_lib.data.reference import analyze_frames, render_source

    audio = render_source(TEXT, "flite-awb")
    return audio, analyze_frames(audio)


def _median_f0(audio: np.ndarray) -> float:
    from voice_lib.data.reference import analyze_frames

    frames = analyze_frames(audio)
    return float(np.exp(np.median(frames[frames[:, 1] > 0.5, 0])))


@pytest.mark.parametrize("ratio", [0.8, 1.7])
def test_psola_moves_the_pitch_and_keeps_the_length(rendering, ratio):
    from voice_lib.data.psola import psola

    audio, frames = rendering
    f0 = np.where(frames[:, 1] > 0.5, np.exp(frames[:, 0]), 0.0)
    shifted = psola(audio, 16000, f0, f0 * ratio, 10.0)
    assert len(shifted) == len(audio) and np.isfinite(shifted).all()
    assert abs(_median_f0(shifted) / _median_f0(audio) - ratio) < 0.05 * ratio
    # loudness stays in range (the envelope filter then sets the converted level exactly)
    assert 0.5 < np.sqrt(np.mean(shifted ** 2)) / np.sqrt(np.mean(audio ** 2)) < 2.0


def test_psola_speed_changes_the_timing_not_the_pitch(rendering):
    from voice_lib.data.psola import psola

    audio, frames = rendering
    f0 = np.where(frames[:, 1] > 0.5, np.exp(frames[:, 0]), 0.0)
    fast = psola(audio, 16000, f0, f0, 10.0, speed=1.5)
    assert abs(len(fast) / len(audio) - 1 / 1.5) < 0.01
    assert abs(_median_f0(fast) / _median_f0(audio) - 1.0) < 0.05


def test_envelope_filter_applies_the_change_and_only_the_change(rendering):
    from voice_lib.infer.source_filter import envelope_change, envelope_filter

    audio, frames = rendering
    env = frames[:, 2:62]
    same = envelope_filter(audio, 16000, env - env, 10.0)
    assert np.allclose(same, audio, atol=2e-3)  # no change: the waveform back (zero phase, STFT round trip)
    louder = env.copy()
    louder[:, 0] += np.log(2.0) * 2  # dimension 0 is the level: a power ratio of 4 is an amplitude of 2
    gain = np.sqrt(np.mean(envelope_filter(audio, 16000, louder - env, 10.0) ** 2) / np.mean(audio ** 2))
    assert 1.6 < gain < 2.4, gain
    change = envelope_change(env, louder + 1.0, order=30, smoothing=5)
    assert change.shape == env.shape and np.all(change[:, 30:] == 0.0) and np.allclose(change[:, 1:30], 1.0)


def test_a_change_past_full_scale_is_scaled_down_not_clipped(rendering):
    from voice_lib.infer.source_filter import PEAK, envelope_filter

    audio, frames = rendering
    env = frames[:, 2:62]
    much_louder = env.copy()
    much_louder[:, 0] += np.log(10.0 / np.max(np.abs(audio))) * 2  # an amplitude that would peak at 10x full scale
    out = envelope_filter(audio, 16000, much_louder - env, 10.0)
    assert np.max(np.abs(out)) <= PEAK + 1e-6
    assert np.mean(np.abs(out) > 0.99) == 0.0  # nothing pinned at full scale
    assert np.corrcoef(out, audio)[0, 1] > 0.99  # the same waveform, quieter: a gain, not a distortion


def test_voice_files_say_how_they_are_rendered(tmp_path):
    from voice_lib.data.reference import PitchStats, TwoStageVoice

    old = {"source_voice": "flite-awb", "source_pitch": {"mean": 4.8, "std": 0.1},
           "target_pitch": {"mean": 5.2, "std": 0.1}, "envelope_scale": None}
    assert TwoStageVoice.from_dict(old).synthesis == "world"  # adapted before the choice existed
    voice = TwoStageVoice("flite-awb", PitchStats(4.8, 0.1), PitchStats(5.2, 0.1), None, "source_filter", 24, 3)
    voice.save(tmp_path)
    assert TwoStageVoice.load(tmp_path) == voice
    with pytest.raises(ValueError, match="synthesis 'neural' is not one of"):
        TwoStageVoice.from_dict({**old, "synthesis": "neural"})


def test_the_rendering_chosen_is_the_one_with_the_larger_worst_gate_margin():
    from voice_lib.core.config import Settings
    from voice_lib.eval.rendering import gate_margin

    settings = Settings()  # default gates: WER <= real + 0.10, similarity >= 0.80, P.808 >= real - 0.3
    passes = {"wer": 0.10, "similarity": 0.83, "p808": 3.2}
    sharper_but_unnatural = {"wer": 0.08, "similarity": 0.86, "p808": 3.0}
    assert gate_margin(passes, 0.05, 3.4, settings) == pytest.approx(min(0.5, 0.6, 1 / 3))
    assert gate_margin(sharper_but_unnatural, 0.05, 3.4, settings) < 0 < gate_margin(passes, 0.05, 3.4, settings)
