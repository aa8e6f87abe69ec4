"""The OpenAI-compatible surface: ``POST /v1/audio/speech``, ``GET /v1/models``, ``GET /v1/audio/voices``.

Made so OpenAI clients work unchanged (the official ``openai`` SDK, Open WebUI, SillyTavern, pipecat, LiveKit):

- audio at ``serving.openai_sample_rate`` (24 kHz by default, as OpenAI's ``pcm`` is), resampled with soxr;
- ``speed`` 0.25–4.0; ``input`` up to ``serving.openai_max_input_chars`` (4,096), split by sentence;
- every format (mp3, opus, aac, flac, wav, pcm) streams sentence by sentence (chunked), or as server-sent events
  with ``stream_format: "sse"``;
- ``voice`` may be a name of the tenant's alias map (``serving.voice_aliases``: alloy → a voice id);
- ``model`` is any name of GET /v1/models (all are the same engine) and ``instructions`` is accepted and
  ignored: a cloned voice speaks as it was recorded.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serving.routers.synthesis import SYNTHESIS_RESPONSES
from serving.schemas import SpeechRequest, error_responses
from serving.services import Services, services, tenant
from serving.speech import SpeechOptions, answer
from serving.tenants import Tenant

router = APIRouter()
# What GET /v1/models lists: OpenAI's speech model names (clients send one of them) and our own.
MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "voiceops")
_STARTED = int(time.time())


def resolve_voice(svc: Services, t: Tenant, voice: str | dict[str, str]) -> str:
    """A voice id from ``voice``: ``{"id": ...}``, the tenant's alias, the "*" alias, or the name itself."""
    name = voice.get("id", "") if isinstance(voice, dict) else voice
    aliases = svc.settings.serving.voice_aliases
    return aliases.get(t.tenant, {}).get(name) or aliases.get("*", {}).get(name) or name


def aliases_of(svc: Services, t: Tenant) -> dict[str, str]:
    """alias -> voice id as this tenant sees them (its own entries win over "*")."""
    aliases = svc.settings.serving.voice_aliases
    return {**aliases.get("*", {}), **aliases.get(t.tenant, {})}


@router.post("/v1/audio/speech", response_class=Response, responses=SYNTHESIS_RESPONSES, tags=["openai"])
async def openai_speech(body: SpeechRequest, request: Request, t: Tenant = Depends(tenant),
                        svc: Services = Depends(services)) -> Response:
    """OpenAI-compatible speech (module docstring); pcm is 16-bit mono little-endian at X-Sample-Rate."""
    s = svc.settings.serving
    voice_id = resolve_voice(svc, t, body.voice)
    mode = "sse" if body.stream_format == "sse" else "audio"
    return await answer(svc, request, t, SpeechOptions(
        text=body.input, voice_id=voice_id, user_id=body.user, fmt=body.response_format, speed=body.speed,
        mode=mode, language="auto", max_chars=s.openai_max_input_chars, sample_rate=s.openai_sample_rate,
        sentence_pause=body.sentence_pause, lexicon=svc.lexicons.for_voice(t.tenant, voice_id)))


@router.get("/v1/models", tags=["openai"], responses=error_responses(401, 429))
async def models(t: Tenant = Depends(tenant)) -> dict[str, Any]:
    """OpenAI's model list shape; every model is the same engine, so any of them may be sent."""
    return {"object": "list", "data": [{"id": m, "object": "model", "created": _STARTED, "owned_by": "voiceops"}
                                       for m in MODELS]}


@router.get("/v1/audio/voices", tags=["openai"], responses=error_responses(401, 429))
async def audio_voices(t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> dict[str, Any]:
    """The voices this key may use, and its aliases, as ``{"voices": [{"id", "name", ...}]}`` (the shape Open
    WebUI and other OpenAI-style clients read to fill their voice pickers)."""
    snap = svc.pool.snapshot
    served = {r.voice_id: r for r in snap.voices.values() if t.may_use(r.voice_id)}
    found = [{"id": v, "name": v, "voice_id": v, "version": r.production.version}
             for v, r in sorted(served.items())]
    found += [{"id": alias, "name": alias, "voice_id": target, "version": served[target].production.version}
              for alias, target in sorted(aliases_of(svc, t).items()) if target in served]
    return {"voices": found}
