"""Synthesis routes: ``POST /v1/tts``, the OpenAI-compatible ``POST /v1/audio/speech`` and ``GET /v1/voices``.

Streaming (``stream: true``, wav or pcm16): the text is split into sentences (text.split_sentences); the
first is synthesised before the response starts (so its errors still get a status code), then chunks
follow as they are produced. wav streams start with a header whose sizes are 0xFFFFFFFF (unknown length);
pcm16 is raw 16-bit little-endian mono at ``X-Sample-Rate``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from serving.routing import choose, requested_override
from serving.schemas import AUDIO_RESPONSES, SpeechRequest, TTSRequest, error_responses
from serving.services import Services, services, tenant
from serving.synthesis import (
    STREAM_FORMATS,
    RequestContext,
    Served,
    ServingError,
    encode_audio,
    pcm16,
    phoneme_chunks,
    wav_stream_header,
)
from serving.tenants import Tenant

log = logging.getLogger(__name__)
router = APIRouter()
SYNTHESIS_RESPONSES = {**AUDIO_RESPONSES, **error_responses(401, 404, 413, 422, 429, 503, 504)}


async def serve(svc: Services, request: Request, t: Tenant, *, text: str, voice_id: str, user_id: str | None,
                fmt: str, speed: float, stream: bool, language: str) -> Response:
    """Route the request (canary or production), synthesise it, and answer audio or a stream."""
    st = request.state
    st.characters, st.voice_id = len(text), voice_id
    limit = svc.settings.serving.max_text_chars
    if len(text) > limit:
        raise ServingError(413, "text_too_long", f"text is {len(text)} characters; the limit is {limit}. "
                                                 "Split it, or stream it in several requests.")
    if stream and fmt not in STREAM_FORMATS:
        raise ServingError(422, "invalid_request", f"streaming supports {', '.join(STREAM_FORMATS)}, not {fmt}")
    snap = svc.pool.snapshot
    if not snap.voices:
        raise ServingError(503, "not_ready", "no voice is loaded yet; see /readyz", {"Retry-After": "5"})
    route = snap.voices.get(voice_id)
    if route is None or not t.may_use(voice_id):
        raise ServingError(404, "voice_not_found", f"voice {voice_id[:64]!r} not found")
    canary_open = route.canary is not None and svc.breaker.is_open(voice_id, route.canary.version)
    decision = choose(route, user_id or st.api_key, canary_open, requested_override(request.headers, request.cookies),
                      t.can_force_variant)
    st.version, st.variant = decision.version.version, decision.variant
    chunks = await asyncio.to_thread(phoneme_chunks, text, language)
    ctx = RequestContext(st.request_id, t.tenant, len(text))
    if stream:
        first, rest = await svc.synthesis.stream(snap, route, decision, chunks, speed, ctx)
        st.first_chunk = time.perf_counter() - ctx.started
        _note(svc, st, first)
        return StreamingResponse(_stream_body(st, first, rest, fmt), media_type=("audio/wav" if fmt == "wav" else "audio/L16"),
                                 headers=_voice_headers(first))
    served = await svc.synthesis.synthesize(snap, route, decision, chunks, speed, ctx)
    _note(svc, st, served)
    body, media_type = await asyncio.to_thread(encode_audio, served.audio, served.sample_rate, fmt)
    return Response(body, media_type=media_type, headers=_voice_headers(served))


def _note(svc: Services, st: Any, served: Served) -> None:
    v = served.decision.version
    st.version, st.variant = v.version, served.decision.variant
    st.rtf = served.rtf
    if served.fallback:
        st.error = served.fallback
    if served.bad:
        svc.metrics.observe_bad_audio(v.voice_id, v.version, served.decision.variant, served.bad)


async def _stream_body(st: Any, first: Served, rest: Any, fmt: str):
    yield (wav_stream_header(first.sample_rate) if fmt == "wav" else b"") + pcm16(first.audio)
    try:
        async for served in rest:
            yield pcm16(served.audio)
    except Exception as exc:  # noqa: BLE001 - the status is sent; end the stream and say why in the audit
        log.warning("stream %s ended early: %s", st.request_id, exc)
        st.error = f"stream ended early: {getattr(exc, 'message', exc)}"


def _voice_headers(served: Served) -> dict[str, str]:
    headers = {"X-Voice-Version": served.decision.version.version, "X-Voice-Variant": served.decision.variant,
               "X-Sample-Rate": str(served.sample_rate)}
    if served.fallback:
        headers["X-Voice-Fallback"] = served.fallback[:200]
    return headers


@router.post("/v1/tts", response_class=Response, responses=SYNTHESIS_RESPONSES, tags=["synthesis"])
async def tts(body: TTSRequest, request: Request, t: Tenant = Depends(tenant),
              svc: Services = Depends(services)) -> Response:
    """Synthesise ``text`` with ``voice_id``; canary routing per CONTRACTS (user_id or the API key)."""
    return await serve(svc, request, t, text=body.text, voice_id=body.voice_id, user_id=body.user_id, fmt=body.format,
                       speed=body.speed, stream=body.stream, language=body.language)


@router.post("/v1/audio/speech", response_class=Response, responses=SYNTHESIS_RESPONSES, tags=["synthesis"])
async def openai_speech(body: SpeechRequest, request: Request, t: Tenant = Depends(tenant),
                        svc: Services = Depends(services)) -> Response:
    """OpenAI-compatible speech endpoint (``voice`` = voice id; pcm is 16-bit mono at X-Sample-Rate)."""
    if body.response_format == "aac" or body.stream_format == "sse":
        what = "response_format aac" if body.response_format == "aac" else "stream_format sse"
        raise ServingError(422, "unsupported", f"{what} is not supported; use mp3, opus, flac, wav or pcm")
    voice = body.voice.get("id", "") if isinstance(body.voice, dict) else body.voice
    return await serve(svc, request, t, text=body.input, voice_id=voice, user_id=body.user, fmt=body.response_format,
                       speed=body.speed, stream=body.stream_format == "audio" and body.response_format in STREAM_FORMATS,
                       language="auto")


@router.get("/v1/voices", tags=["voices"], responses=error_responses(401, 429))
async def voices(t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> dict[str, Any]:
    """The voices this key may use (and only those)."""
    snap = svc.pool.snapshot
    found = [{"voice_id": r.voice_id, "version": r.production.version,
              "sample_rate": snap.bases[r.production.base_sha256].feature_config.sample_rate}
             for r in sorted(snap.voices.values(), key=lambda r: r.voice_id) if t.may_use(r.voice_id)]
    return {"voices": found}
