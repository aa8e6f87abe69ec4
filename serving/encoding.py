"""Audio out: the model's float audio resampled to the response rate and encoded, whole or as a stream.

One encoder per response (``AudioEncoder``): ``encode`` takes the next block of audio (a sentence, as the
synthesiser produces them) and returns the bytes that can be sent now; ``finish`` returns the rest. The same
path serves whole responses (``encode_audio``) and chunked streams, so a streamed mp3 is the same bitstream as
a whole one.

- wav: 16-bit PCM; a stream's header gives both sizes as 0xFFFFFFFF (unknown length, as ffmpeg writes when it
  cannot seek), a whole file's gives the real sizes. pcm / pcm16: raw 16-bit little-endian mono.
- mp3 (LAME), opus (Ogg Opus), aac (ADTS AAC-LC) and flac: FFmpeg's encoders through PyAV (the wheel bundles
  libmp3lame and libopus; already installed for faster-whisper). libsndfile, which wrote mp3/opus before, has
  no AAC encoder and buffers its own pages, so it could not stream. Ogg pages are flushed every 100 ms
  (``page_duration``) so opus arrives as it is made.
- ogg (Vorbis, /v1/tts only): libsndfile, whole responses only: FFmpeg's own Vorbis encoder is experimental.

Resampling from the model's rate to the response rate is soxr's (``ResampleStream`` across the blocks of one
response, so sentence boundaries get no edge effects).
"""
from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import numpy as np

# format -> media type. "pcm16"/"pcm" are raw 16-bit little-endian mono at X-Sample-Rate.
MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav", "pcm16": "audio/L16", "pcm": "audio/L16", "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac", "ogg": "audio/ogg",
}
STREAM_FORMATS = ("wav", "pcm16", "pcm", "mp3", "opus", "aac", "flac")
_FFMPEG = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"), "flac": ("flac", "flac")}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_BITRATES = {"mp3": 64_000, "opus": 32_000, "aac": 64_000}  # mono speech


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """A 16-bit mono WAV header; ``data_bytes=None`` writes the unknown-length sizes a stream needs."""
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    data = 0xFFFFFFFF if data_bytes is None else data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data))


def codec_sample_rate(fmt: str, sample_rate: int) -> int:
    """The rate the codec runs at: the response rate, except opus, which only takes its five rates."""
    if fmt == "opus" and sample_rate not in _OPUS_RATES:
        return 48000
    return sample_rate


class _Sink:
    """A write-only file the muxer writes to; drained after every block."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def drain(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class AudioEncoder:
    """Encodes consecutive blocks of float mono audio at ``input_rate`` into one ``fmt`` stream at
    ``output_rate`` (module docstring). ``whole=True`` writes a wav header with the real sizes (one block)."""

    def __init__(self, fmt: str, input_rate: int, output_rate: int | None = None, *, whole: bool = False) -> None:
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"unknown audio format {fmt!r}; expected one of {', '.join(MEDIA_TYPES)}")
        self.fmt, self.media_type, self.whole = fmt, MEDIA_TYPES[fmt], whole
        self.sample_rate = codec_sample_rate(fmt, output_rate or input_rate)
        self._resampler = None
        if self.sample_rate != input_rate:
            import soxr

            self._resampler = soxr.ResampleStream(input_rate, self.sample_rate, 1, dtype="float32", quality="HQ")
        self._started = False
        self._buffered: list[np.ndarray] = []  # whole-file formats (ogg, whole wav)
        self._av: tuple[Any, Any, _Sink] | None = None
        self._pts = 0

    def _resample(self, audio: np.ndarray, last: bool) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if self._resampler is None:
            return audio
        return self._resampler.resample_chunk(audio, last=last)

    def _open_ffmpeg(self) -> tuple[Any, Any, _Sink]:
        import av

        container_format, codec = _FFMPEG[self.fmt]
        sink = _Sink()
        options = {"page_duration": "100000"} if container_format == "ogg" else {}
        container = av.open(sink, mode="w", format=container_format, options=options)
        stream = container.add_stream(codec, rate=self.sample_rate, layout="mono")
        if self.fmt in _BITRATES:
            stream.bit_rate = _BITRATES[self.fmt]
        return container, stream, sink

    def _ffmpeg(self, audio: np.ndarray | None) -> bytes:
        import av

        if self._av is None:
            self._av = self._open_ffmpeg()
        container, stream, sink = self._av
        if audio is None:
            packets = stream.encode(None)
        else:
            frame = av.AudioFrame.from_ndarray(
                (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, self._pts
            self._pts += len(audio)
            packets = stream.encode(frame)
        for packet in packets:
            container.mux(packet)
        if audio is None:
            container.close()
        return sink.drain()

    def encode(self, audio: np.ndarray) -> bytes:
        """Bytes of the next block that can be sent now (the header comes with the first block)."""
        return self._encode(self._resample(audio, last=False))

    def _encode(self, audio: np.ndarray) -> bytes:
        if self.fmt == "ogg" or (self.fmt == "wav" and self.whole):
            self._buffered.append(audio)
            return b""
        if self.fmt in ("pcm", "pcm16", "wav"):
            head = b"" if self._started or self.fmt != "wav" else wav_header(self.sample_rate)
            self._started = True
            return head + pcm16(audio)
        return self._ffmpeg(audio) if len(audio) else b""

    def finish(self) -> bytes:
        """The rest of the stream: the resampler's and encoder's tails, and a buffered file whole."""
        tail = self._encode(self._resample(np.zeros(0, np.float32), last=True)) if self._resampler else b""
        if self.fmt == "ogg":
            import soundfile as sf

            buf = io.BytesIO()
            audio = np.concatenate(self._buffered) if self._buffered else np.zeros(0, np.float32)
            sf.write(buf, np.clip(audio, -1.0, 1.0), self.sample_rate, format="OGG", subtype="VORBIS")
            return buf.getvalue()
        if self.fmt == "wav" and self.whole:
            data = pcm16(np.concatenate(self._buffered) if self._buffered else np.zeros(0, np.float32))
            return wav_header(self.sample_rate, len(data)) + data
        if self.fmt in ("pcm", "pcm16", "wav"):
            return self._encode(np.zeros(0, np.float32)) + tail if self.fmt == "wav" and not self._started else tail
        return tail + self._ffmpeg(None)


def encode_audio(audio: np.ndarray, input_rate: int, fmt: str, output_rate: int | None = None) -> tuple[bytes, str]:
    """A whole response: (bytes, media type)."""
    encoder = AudioEncoder(fmt, input_rate, output_rate, whole=True)
    return encoder.encode(audio) + encoder.finish(), encoder.media_type


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI's speech stream sends them: a ``data:`` line of JSON and a blank line."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_audio_delta(chunk: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()})


def sse_audio_done(input_tokens: int, output_tokens: int) -> bytes:
    """The last event. Tokens: OpenAI bills them; here input is the text's characters, output the audio's
    20 ms frames (documented in docs/operations.md), so clients that read the usage get sensible numbers."""
    return sse_event({"type": "speech.audio.done", "usage": {
        "input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}})
