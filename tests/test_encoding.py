"""serving.encoding against real decoders: ffprobe/ffmpeg read every format, whole and streamed."""
from __future__ import annotations

import base64
import io
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from serving.encoding import MEDIA_TYPES, STREAM_FORMATS, AudioEncoder, encode_audio, sse_audio_delta, sse_audio_done

MODEL_RATE, OUT_RATE = 16000, 24000


def tone(freq: float, seconds: float, rate: int = MODEL_RATE) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def ffprobe(data: bytes) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", "-"], input=data,
                         capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)["streams"][0]


def ffmpeg_decode(data: bytes, rate: int = OUT_RATE) -> np.ndarray:
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", "-", "-f", "f32le", "-ac", "1", "-ar", str(rate), "-"],
                         input=data, capture_output=True, check=True, timeout=60)
    return np.frombuffer(out.stdout, dtype="<f4")


def dominant_hz(audio: np.ndarray, rate: int = OUT_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "aac", "flac", "ogg"])
def test_whole_file_decodes_at_the_output_rate(fmt):
    data, media_type = encode_audio(tone(440, 1.0), MODEL_RATE, fmt, OUT_RATE)
    assert media_type == MEDIA_TYPES[fmt]
    stream = ffprobe(data)
    codec = {"wav": "pcm_s16le", "mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "ogg": "vorbis"}[fmt]
    assert stream["codec_name"] == codec and stream["channels"] == 1
    assert int(stream["sample_rate"]) == (48000 if fmt == "opus" else OUT_RATE)  # Ogg Opus always says 48 kHz
    decoded = ffmpeg_decode(data)
    assert abs(len(decoded) / OUT_RATE - 1.0) < 0.08, len(decoded)  # codec priming/padding only
    assert abs(dominant_hz(decoded) - 440) < 5


def test_whole_wav_has_real_sizes():
    data, _ = encode_audio(tone(440, 0.5), MODEL_RATE, "wav", OUT_RATE)
    audio, rate = sf.read(io.BytesIO(data))
    assert rate == OUT_RATE and abs(len(audio) - OUT_RATE // 2) <= 2
    assert int.from_bytes(data[40:44], "little") == len(data) - 44


@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_streamed_blocks_arrive_before_the_end_and_decode_as_one_stream(fmt):
    encoder = AudioEncoder(fmt, MODEL_RATE, OUT_RATE)
    blocks = [tone(300, 0.6), tone(300, 0.6), tone(300, 0.6)]
    parts = [encoder.encode(b) for b in blocks]
    parts.append(encoder.finish())
    assert parts[0] and parts[1], [len(p) for p in parts]  # audio leaves as it is made, not at the end
    data = b"".join(parts)
    if fmt in ("pcm", "pcm16"):
        decoded = np.frombuffer(data, "<i2").astype(np.float32) / 32767
        assert abs(len(decoded) - int(1.8 * OUT_RATE)) <= 2  # soxr's stream loses no samples
    else:
        decoded = ffmpeg_decode(data)
        assert abs(len(decoded) / OUT_RATE - 1.8) < 0.08
    assert abs(dominant_hz(decoded) - 300) < 5
    if fmt == "wav":
        assert data[4:8] == b"\xff\xff\xff\xff"  # unknown length: players read until the end


def test_same_rate_needs_no_resampling_and_opus_gets_a_rate_it_takes():
    assert AudioEncoder("pcm", 24000, 24000)._resampler is None
    assert AudioEncoder("opus", 16000, 22050).sample_rate == 48000
    with pytest.raises(ValueError, match="unknown audio format 'm4a'"):
        AudioEncoder("m4a", 16000)


def test_sse_events_are_openai_shaped():
    delta = sse_audio_delta(b"\x00\x01abc")
    assert delta.startswith(b"data: ") and delta.endswith(b"\n\n")
    event = json.loads(delta[6:])
    assert event == {"type": "speech.audio.delta", "audio": base64.b64encode(b"\x00\x01abc").decode()}
    done = json.loads(sse_audio_done(12, 50)[6:])
    assert done == {"type": "speech.audio.done", "usage": {"input_tokens": 12, "output_tokens": 50, "total_tokens": 62}}
