"""voice_lib.data.audio: decoding what users upload, and the measurements QC decides with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from voice_lib.data import corpus
from voice_lib.data.audio import (
    PEAK_CEILING,
    AudioError,
    decode_audio,
    estimate_snr_db,
    normalize_loudness,
)

SR = 16000
SECONDS = 2.0


def tone(freq: float, amp: float, sr: int, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def tone_amplitude(audio: np.ndarray, freq: float, sr: int) -> float:
    """Amplitude of one sinusoid in ``audio`` (an integer number of cycles fits the 2 s signals)."""
    t = np.arange(len(audio)) / sr
    return float(2 * np.abs(np.sum(audio * np.exp(-2j * np.pi * freq * t))) / len(audio))


# --- decoding -------------------------------------------------------------------------------------

FORMATS = [
    # file name, container, subtype, sample rate, channels
    ("take_u8.wav", "WAV", "PCM_U8", 16000, 1),
    ("take_24bit.wav", "WAV", "PCM_24", 48000, 1),
    ("take_float.wav", "WAV", "FLOAT", 16000, 1),
    ("take_stereo.wav", "WAV", "PCM_16", 16000, 2),
    ("take_44k.wav", "WAV", "PCM_16", 44100, 1),
    ("take_22k.wav", "WAV", "PCM_16", 22050, 1),
    ("take.flac", "FLAC", "PCM_16", 44100, 1),
    ("take.ogg", "OGG", "VORBIS", 44100, 1),
    ("take.mp3", "MP3", "MPEG_LAYER_III", 44100, 1),
]


@pytest.mark.parametrize(("name", "container", "subtype", "rate", "channels"), FORMATS, ids=[f[0] for f in FORMATS])
def test_decode_resamples_to_16k_mono(tmp_path: Path, name: str, container: str, subtype: str, rate: int, channels: int) -> None:
    if container not in sf.available_formats() or subtype not in sf.available_subtypes(container):
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} cannot write {container}/{subtype}")
    left = tone(440, 0.5, rate)
    data = np.stack([left, tone(1000, 0.3, rate)], axis=1) if channels == 2 else left
    path = tmp_path / name
    sf.write(path, data, rate, format=container, subtype=subtype)

    decoded = decode_audio(path, SR)
    audio = decoded.audio
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert decoded.sample_rate == SR
    assert decoded.source_sample_rate == rate and decoded.source_channels == channels
    assert decoded.duration == pytest.approx(SECONDS, rel=0.01)
    assert np.all(np.abs(audio) <= 1.0)
    assert abs(float(audio.mean())) < 0.01  # no DC offset (8-bit WAV is unsigned)
    assert decoded.clipped_fraction == 0.0
    if channels == 2:  # downmix is the average of the channels
        assert tone_amplitude(audio, 440, SR) == pytest.approx(0.25, abs=0.01)
        assert tone_amplitude(audio, 1000, SR) == pytest.approx(0.15, abs=0.01)
    else:
        assert tone_amplitude(audio, 440, SR) == pytest.approx(0.5, abs=0.02)
        spectrum = np.abs(np.fft.rfft(audio))
        assert np.fft.rfftfreq(len(audio), 1 / SR)[np.argmax(spectrum)] == pytest.approx(440, abs=2)


def _wav_bytes(audio: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, subtype=subtype, format="WAV")
    return buf.getvalue()


def test_empty_file_is_an_error_naming_it() -> None:
    with pytest.raises(AudioError, match=r"^take_07\.wav: the file is empty"):
        decode_audio(b"", SR, name="take_07.wav")


def test_truncated_wav_is_an_error_naming_it(tmp_path: Path) -> None:
    raw = _wav_bytes(tone(440, 0.5, SR))
    path = tmp_path / "upload_cut.wav"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AudioError, match="truncated") as err:
        decode_audio(path, SR)
    assert "upload_cut.wav" in str(err.value) and "upload it again" in str(err.value)
    # the same bytes under the name a caller passes
    with pytest.raises(AudioError, match=r"^speaker/a_01\.wav: the file is truncated"):
        decode_audio(raw[: len(raw) // 2], SR, name="speaker/a_01.wav")


def test_float_wav_with_nan_is_an_error_naming_it() -> None:
    audio = tone(440, 0.5, SR)
    audio[1000:1010] = np.nan
    with pytest.raises(AudioError, match=r"^nan_take\.wav: contains NaN") as err:
        decode_audio(_wav_bytes(audio, "FLOAT"), SR, name="nan_take.wav")
    assert "16-bit PCM WAV" in str(err.value)


def test_non_audio_bytes_are_an_error_naming_the_file() -> None:
    with pytest.raises(AudioError, match=r"^notes\.wav: not a readable audio file"):
        decode_audio(b"just some text, renamed to .wav\n" * 20, SR, name="notes.wav")


# --- measurements ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentence() -> np.ndarray:
    """A real spoken sentence with 0.5 s of digital silence before and after."""
    speech = corpus.synthesize("The birch canoe slid on the smooth planks.", "flite-slt", SR)
    pad = np.zeros(SR // 2, np.float32)
    return np.concatenate([pad, speech, pad])


def _speech_mask(audio: np.ndarray) -> np.ndarray:
    """Per-sample mask of the 20 ms frames within 35 dB of the loudest one (VAD stand-in)."""
    hop = SR // 50
    frames = audio[: len(audio) // hop * hop].astype(np.float64).reshape(-1, hop)
    power = (frames**2).mean(axis=1)
    mask = np.repeat(power > power.max() * 10**-3.5, hop)
    return np.pad(mask, (0, len(audio) - len(mask)))


def test_estimate_snr_falls_as_noise_rises(sentence: np.ndarray) -> None:
    mask = _speech_mask(sentence)
    speech_power = float(np.mean(sentence[mask].astype(np.float64) ** 2))
    noise = np.random.default_rng(0).standard_normal(len(sentence))
    assert estimate_snr_db(sentence, SR, mask) >= 40  # digital silence in the pauses
    true_snrs = [30, 20, 10, 5, 0, -5]
    estimates = []
    for snr in true_snrs:
        noisy = (sentence + noise * np.sqrt(speech_power / 10 ** (snr / 10))).astype(np.float32)
        estimates.append(estimate_snr_db(noisy, SR, mask))
    assert all(a > b for a, b in zip(estimates, estimates[1:])), estimates
    # measured within 0.7 dB of the truth for 0-30 dB; the 3 dB tolerance is for other sentences/noise
    for snr, est in zip(true_snrs[:-1], estimates):
        assert est == pytest.approx(snr, abs=3.0), (snr, est)


@pytest.mark.parametrize("input_gain_db", [-40.0, -20.0, 0.0])
@pytest.mark.parametrize("target", [-30.0, -23.0, -16.0, -8.0])
def test_normalize_loudness_hits_target_under_the_peak_ceiling(sentence: np.ndarray, input_gain_db: float, target: float) -> None:
    meter = pyloudnorm.Meter(SR)
    audio = (sentence * 10 ** (input_gain_db / 20)).astype(np.float32)
    before = meter.integrated_loudness(audio.astype(np.float64))

    out, measured = normalize_loudness(audio, SR, target)
    assert measured == pytest.approx(before, abs=0.1)
    peak = float(np.max(np.abs(out)))
    assert peak <= PEAK_CEILING * (1 + 1e-6)  # never above -1 dBFS
    after = meter.integrated_loudness(out.astype(np.float64))
    if peak < PEAK_CEILING * 0.999:  # the limiter did not act: loudness is on target
        assert after == pytest.approx(target, abs=0.5)
    else:  # limited: as loud as the ceiling allows, which is below the target
        assert after < target
        assert 20 * np.log10(peak) == pytest.approx(-1.0, abs=0.01)
    assert out.dtype == np.float32 and len(out) == len(audio)


def test_normalize_loudness_leaves_silence_alone() -> None:
    silence = np.zeros(SR, np.float32)
    out, measured = normalize_loudness(silence, SR, -23.0)
    assert measured <= -70 and np.array_equal(out, silence)
