"""One synthesis request from text to an HTTP answer, for /v1/tts and the OpenAI endpoint alike.

``answer`` routes the request (canary or production, serving/routing.py), plans its sentences (SSML-lite,
lexicon, pauses: ``plan_chunks``), synthesises them through the batcher and answers in one of three modes:

- ``whole``: every sentence, then one encoded file (with the silences of breaks and ``sentence_pause``);
- ``audio``: a chunked stream; the first sentence is synthesised before the response starts (so its errors still
  get a status code), then each sentence is encoded and sent as it is made (serving/encoding.py: wav with an
  unknown-length header, raw pcm, or an mp3/opus/aac/flac bitstream);
- ``sse``: the same stream as server-sent events, as OpenAI's speech stream sends them: ``speech.audio.delta``
  events with base64 audio, then one ``speech.audio.done`` with the usage.

Audio leaves at ``sample_rate`` (resampled from the model's rate with soxr); ``X-Sample-Rate`` says which.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.admission import Ticket, estimated_audio_seconds
from serving.encoding import AudioEncoder, sse_audio_delta, sse_audio_done
from serving.routing import choose, requested_override
from serving.services import Services
from serving.synthesis import (
    PlannedChunk,
    RequestContext,
    Served,
    ServingError,
    plan_chunks,
)
from serving.tenants import Tenant
from voice_lib.data.text import Lexicon, word_timings

log = logging.getLogger(__name__)
Mode = Literal["whole", "audio", "sse"]
_FRAME_SECONDS = 0.02  # an "output token" of the SSE usage: 20 ms of audio


@dataclass(frozen=True)
class SpeechOptions:
    """What one request asks for, after its endpoint's own validation."""

    text: str
    voice_id: str
    user_id: str | None
    fmt: str
    speed: float
    mode: Mode
    language: str
    max_chars: int
    sample_rate: int | None = None  # None: the model's rate
    sentence_pause: float = 0.0
    lexicon: Lexicon | None = None
    timestamps: bool = False  # whole answers only: JSON with the audio and each word's times


def _silence(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * sample_rate)), np.float32)


def _with_pauses(served: Served, planned: Sequence[PlannedChunk]) -> list[np.ndarray]:
    """Each sentence's audio followed by the silence its plan asks for."""
    blocks = []
    for output, chunk in zip(served.outputs, planned):
        blocks.append(output.audio)
        if chunk.pause_after:
            blocks.append(_silence(chunk.pause_after, output.sample_rate))
    return blocks


async def answer(svc: Services, request: Request, t: Tenant, o: SpeechOptions) -> Response:
    """Route, synthesise and answer one request (module docstring)."""
    st = request.state
    st.characters, st.voice_id = len(o.text), o.voice_id
    if len(o.text) > o.max_chars:
        raise ServingError(413, "text_too_long", f"text is {len(o.text)} characters; the limit is {o.max_chars}. "
                                                 "Split it, or stream it in several requests.")
    snap = svc.pool.snapshot
    if not snap.voices:
        raise ServingError(503, "not_ready", "no voice is loaded yet; see /readyz", {"Retry-After": "5"})
    route = snap.voices.get(o.voice_id)
    if route is None or not t.may_use(o.voice_id):
        raise ServingError(404, "voice_not_found", f"voice {o.voice_id[:64]!r} not found")
    planned = await asyncio.to_thread(plan_chunks, o.text, o.language, o.lexicon, o.sentence_pause)
    chunks = [c.ids for c in planned]
    # Admission before routing: a request refused for load (429/503) is no variant's, so its audit row never
    # counts against a canary (5xx rows are errors to canary_promotion). Released when the answer is complete.
    ticket = svc.admission.admit(t.tenant, estimated_audio_seconds(chunks, o.speed))
    canary_open = route.canary is not None and svc.breaker.is_open(o.voice_id, route.canary.version)
    decision = choose(route, o.user_id or st.api_key, canary_open, requested_override(request.headers, request.cookies),
                      t.can_force_variant)
    st.version, st.variant = decision.version.version, decision.variant
    ctx = RequestContext(st.request_id, t.tenant, len(o.text))
    streaming = False
    try:
        response = await _synthesize_and_answer(svc, st, snap, route, decision, planned, o, ctx, ticket)
        streaming = isinstance(response, StreamingResponse)
        return response
    finally:
        if not streaming:
            ticket.release()


async def _synthesize_and_answer(svc: Services, st: Any, snap: Any, route: Any, decision: Any,
                                 planned: Sequence[PlannedChunk], o: SpeechOptions, ctx: RequestContext,
                                 ticket: Ticket) -> Response:
    """The synthesis and the answer of an admitted request; a stream releases ``ticket`` after its last chunk."""
    chunks = planned  # each version turns them into its own model inputs (serving.synthesis.version_inputs)
    if o.mode == "whole":
        served = await svc.synthesis.synthesize(snap, route, decision, chunks, o.speed, ctx)
        note(svc, st, served)
        encoder = AudioEncoder(o.fmt, served.sample_rate, o.sample_rate, whole=True)
        body = await asyncio.to_thread(_encode_all, encoder, _with_pauses(served, planned))
        headers = voice_headers(served, encoder.sample_rate)
        if o.timestamps:
            words = await asyncio.to_thread(_word_times, svc, snap, served, planned, o.speed)
            return JSONResponse({"audio": base64.b64encode(body).decode(), "media_type": encoder.media_type,
                                 "sample_rate": encoder.sample_rate, "words": words}, headers=headers)
        return Response(body, media_type=encoder.media_type, headers=headers)
    first, rest = await svc.synthesis.stream(snap, route, decision, chunks, o.speed, ctx)
    st.first_chunk = time.perf_counter() - ctx.started
    note(svc, st, first)
    encoder = AudioEncoder(o.fmt, first.sample_rate, o.sample_rate)
    body = _stream_body(st, encoder, first, rest, planned, o.mode, len(o.text), ticket.release)
    # A stream never iterated (the client left first) runs no finally: the ticket also goes with the generator.
    weakref.finalize(body, ticket.release)
    media_type = "text/event-stream" if o.mode == "sse" else encoder.media_type
    return StreamingResponse(body, media_type=media_type, headers=voice_headers(first, encoder.sample_rate))


def _word_times(svc: Services, snap: Any, served: Served, planned: Sequence[PlannedChunk], speed: float) -> list[dict]:
    """Each word's start and end in the answer: the model's durations of the version that spoke, per sentence,
    offset by the audio and silences before it (voice_lib.data.text.timing)."""
    found = svc.pool.durations(snap, served.decision.version, [c.ids for c in planned], speed)
    if found is None:
        raise ServingError(422, "invalid_request", "timestamps: this voice's acoustic backend predicts no "
                                                   "durations; send timestamps: false")
    durations, seconds_per_step = found
    words, offset = [], 0.0
    for output, chunk, steps in zip(served.outputs, planned, durations):
        words += word_timings(chunk.speech.words, steps.tolist(), seconds_per_step, offset)
        offset += len(output.audio) / output.sample_rate + chunk.pause_after
    return words


def _encode_all(encoder: AudioEncoder, blocks: Sequence[np.ndarray]) -> bytes:
    return b"".join(encoder.encode(b) for b in blocks) + encoder.finish()


async def _served_in_order(first: Served, rest: AsyncIterator[Served]) -> AsyncIterator[Served]:
    yield first
    async for served in rest:
        yield served


async def _stream_body(st: Any, encoder: AudioEncoder, first: Served, rest: AsyncIterator[Served],
                       planned: Sequence[PlannedChunk], mode: Mode, characters: int,
                       release: Any) -> AsyncIterator[bytes]:
    """Each sentence encoded as it arrives (with its silence), as raw bytes or SSE events (module docstring)."""
    sent_seconds = 0.0

    def frame(data: bytes) -> bytes:
        return sse_audio_delta(data) if mode == "sse" else data

    try:
        index = 0
        async for served in _served_in_order(first, rest):
            if index:
                st.compute_ms = (getattr(st, "compute_ms", None) or 0.0) + served.compute_seconds * 1000
            for block in _with_pauses(served, planned[index:index + 1]):
                sent_seconds += len(block) / served.sample_rate
                data = await asyncio.to_thread(encoder.encode, block)
                if data:
                    yield frame(data)
            index += 1
        tail = await asyncio.to_thread(encoder.finish)
        if tail:
            yield frame(tail)
        if mode == "sse":
            yield sse_audio_done(characters, int(sent_seconds / _FRAME_SECONDS))
    except Exception as exc:  # noqa: BLE001 - the status is sent; end the stream and say why in the audit
        log.warning("stream %s ended early: %s", st.request_id, exc)
        st.error = f"stream ended early: {getattr(exc, 'message', exc)}"
    finally:
        release()  # the admission ticket: held until the last chunk, or until the client left


def note(svc: Services, st: Any, served: Served) -> None:
    """What the audit row and metrics say about the answer (version, variant, RTF, fallback, bad audio)."""
    v = served.decision.version
    st.version, st.variant = v.version, served.decision.variant
    st.rtf = served.rtf
    st.compute_ms = served.compute_seconds * 1000  # a stream adds each later chunk's (_stream_body)
    if served.fallback:
        st.error = served.fallback
    if served.bad:
        svc.metrics.observe_bad_audio(v.voice_id, v.version, served.decision.variant, served.bad)


def voice_headers(served: Served, sample_rate: int) -> dict[str, str]:
    headers = {"X-Voice-Version": served.decision.version.version, "X-Voice-Variant": served.decision.variant,
               "X-Sample-Rate": str(sample_rate)}
    if served.fallback:
        headers["X-Voice-Fallback"] = served.fallback[:200]
    return headers
