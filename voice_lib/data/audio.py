"""Audio decoding, resampling and the signal measurements QC relies on.

Everything works on float32 mono arrays in [-1, 1] at the model rate (``Settings.sample_rate``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")
# Peak level at or above which a sample counts as clipped (int16 full scale is 32767/32768).
CLIP_LEVEL = 0.999
PEAK_CEILING = 10 ** (-1.0 / 20)  # -1 dBFS: leaves headroom for resampling overshoot.


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class DecodedAudio:
    audio: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_subtype: str
    clipped_fraction: float  # measured before any gain change

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def decode_audio(data: bytes | Path, target_sr: int, name: str | None = None) -> DecodedAudio:
    """Decode any supported format, downmix to mono and resample to ``target_sr``.

    Raises AudioError for non-audio, corrupt, truncated or empty input, naming ``name``.
    """
    label = name or (str(data) if isinstance(data, Path) else "<bytes>")
    raw = data.read_bytes() if isinstance(data, Path) else data
    if not raw:
        raise AudioError(f"{label}: the file is empty (0 bytes); re-export or remove it.")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as fh:
            declared_frames = fh.frames
            source_sr, channels, subtype = fh.samplerate, fh.channels, fh.subtype or ""
            frames = fh.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc).split(": ")[-1]
        raise AudioError(
            f"{label}: not a readable audio file ({reason}). Supported: WAV, FLAC, MP3, OGG; "
            "re-export it in one of these formats or remove it."
        ) from exc
    declared_frames = max(declared_frames, _riff_declared_frames(raw, channels, subtype))
    # libsndfile reads what is there from a file whose header promises more: that is a truncated upload.
    if declared_frames > 0 and len(frames) < declared_frames * 0.98 and declared_frames - len(frames) > source_sr * 0.05:
        raise AudioError(
            f"{label}: the file is truncated ({len(frames)} of {declared_frames} frames present); upload it again."
        )
    if len(frames) == 0:
        raise AudioError(f"{label}: contains no audio samples; re-export or remove it.")
    if not np.all(np.isfinite(frames)):
        raise AudioError(f"{label}: contains NaN or infinite samples; re-export it as 16-bit PCM WAV.")
    peak = float(np.max(np.abs(frames)))
    if subtype in ("FLOAT", "DOUBLE") and peak > 1.0:
        # Floating-point audio may go over full scale without losing anything: scale it down instead of
        # cutting the peaks off (which would be clipping this step introduced, not the recording's).
        frames *= PEAK_CEILING / peak
    clipped = float(np.mean(np.abs(frames) >= CLIP_LEVEL))
    mono = frames.mean(axis=1) if channels > 1 else frames[:, 0]
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
    return DecodedAudio(
        audio=resample(mono, source_sr, target_sr),
        sample_rate=target_sr,
        source_sample_rate=source_sr,
        source_channels=channels,
        source_subtype=subtype,
        clipped_fraction=clipped,
    )


def _riff_declared_frames(raw: bytes, channels: int, subtype: str) -> int:
    """Frames the WAV 'data' chunk header promises (libsndfile silently shortens a truncated WAV)."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return 0
    width = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}.get(subtype)
    pos = 12
    while width and pos + 8 <= len(raw):
        chunk, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            # 0 and 0xFFFFFFFF mean "unknown length" (streamed WAVs): nothing to compare against.
            return 0 if size in (0, 0xFFFFFFFF) else size // (width * max(1, channels))
        pos += 8 + size + (size & 1)
    return 0


def resample(audio: np.ndarray, source_sr: int, target_sr: int) -> np.ndarray:
    if source_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, source_sr, target_sr, quality="HQ").astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path




def pcm_sha256(audio: np.ndarray) -> str:
    """Hash of the 16-bit PCM content, independent of container and metadata."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    return hashlib.sha256(pcm.tobytes()).hexdigest()


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4). Clips shorter than one 400 ms block fall back to RMS."""
    import pyloudnorm

    if len(audio) < int(0.4 * sample_rate) + 1:
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) + 1e-12)
        return 20 * np.log10(rms) - 0.691
    value = pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64))
    return float(value) if np.isfinite(value) else -120.0


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float) -> tuple[np.ndarray, float]:
    """Gain to ``target_lufs``, limited so the peak stays under -1 dBFS. Returns (audio, measured LUFS)."""
    measured = loudness_lufs(audio, sample_rate)
    if measured <= -70.0:  # silence: nothing to normalise
        return audio, measured
    gain = 10 ** ((target_lufs - measured) / 20)
    peak = float(np.max(np.abs(audio))) * gain
    if peak > PEAK_CEILING:
        gain *= PEAK_CEILING / peak
    return (audio * gain).astype(np.float32), measured


def frame_power_db(audio: np.ndarray, sample_rate: int, frame_ms: float = 20.0) -> np.ndarray:
    hop = max(1, int(sample_rate * frame_ms / 1000))
    n = len(audio) // hop
    if n == 0:
        return np.array([10 * np.log10(np.mean(audio.astype(np.float64) ** 2) + 1e-12)])
    frames = audio[: n * hop].astype(np.float64).reshape(n, hop)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def estimate_snr_db(audio: np.ndarray, sample_rate: int, speech_mask: np.ndarray | None = None) -> float:
    """SNR from speech vs non-speech frame power.

    ``speech_mask`` is a per-sample boolean from VAD. VAD edges are loose by a few hundred ms, so the
    noise floor is a low percentile (20th) of the non-speech frames, not their mean; with fewer than
    10 non-speech frames the quietest 10% of all frames stand in. Capped at 60 dB (digital silence).
    """
    hop = int(sample_rate * 0.02)
    power = 10 ** (frame_power_db(audio, sample_rate) / 10)
    if speech_mask is not None and len(power) > 1:
        frame_speech = speech_mask[: len(power) * hop].reshape(len(power), hop).mean(axis=1) > 0.5
        speech, noise = power[frame_speech], power[~frame_speech]
    else:
        speech, noise = power, np.array([])
    if len(speech) == 0:
        return 0.0
    noise_power = float(np.percentile(noise, 20) if len(noise) >= 10 else np.percentile(power, 10))
    signal_power = max(float(np.mean(speech)) - noise_power, 1e-12)
    if noise_power < 1e-10:
        return 60.0
    return float(np.clip(10 * np.log10(signal_power / noise_power), -20.0, 60.0))


def audio_defects(audio: np.ndarray, silence_dbfs: float, clipping_fraction: float, *, sample_rate: int | None = None,
                  reference_seconds: float | None = None, duration_range: tuple[float, float] = (0.0, float("inf")),
                  what: str = "output") -> dict[str, str]:
    """The one bad-audio check: {"silent"|"clipped"|"truncated": reason}, empty for usable audio.

    Always: RMS below ``silence_dbfs`` is silent; more than ``clipping_fraction`` of the samples at
    ``CLIP_LEVEL`` is clipped. With ``sample_rate`` also a VAD (no speech found is silent), and with
    ``reference_seconds`` a duration ratio outside ``duration_range`` is truncated (or runaway). The server
    runs the cheap part on every response; evaluation runs all of it (voice_lib/eval/metrics.py).
    """
    found: dict[str, str] = {}
    rms_db = 20 * np.log10(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) + 1e-12) if len(audio) else -240.0
    if rms_db < silence_dbfs:
        found["silent"] = f"{what} silent: RMS {rms_db:.1f} dBFS < {silence_dbfs:g}"
    elif sample_rate is not None:
        from voice_lib.data.speech import detect_speech

        if not detect_speech(audio, sample_rate):
            found["silent"] = f"{what} silent: VAD found no speech"
    clipped = float(np.mean(np.abs(audio) >= CLIP_LEVEL)) if len(audio) else 0.0
    if clipped > clipping_fraction:
        found["clipped"] = f"{what} clipped: {clipped:.2%} of samples at full scale (> {clipping_fraction:.1%})"
    if reference_seconds is not None and sample_rate is not None:
        low, high = duration_range
        ratio = len(audio) / sample_rate / max(reference_seconds, 1e-6)
        if ratio < low or ratio > high:
            kind = "truncated" if ratio < low else "runaway"
            found["truncated"] = f"{what} {kind}: {ratio:.0%} of the real clip's duration (allowed {low:.0%}-{high:.0%})"
    return found
