"""``POST /v1/tts``: VoiceOps' own synthesis endpoint (the OpenAI-compatible one is routers/openai.py).

``stream: true`` (wav or pcm16) sends sentence by sentence (serving/speech.py); otherwise one file, or with
``timestamps: true`` a JSON answer with the audio and word timestamps. Audio is at the model's rate
(``X-Sample-Rate``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serving.schemas import AUDIO_RESPONSES, TTSRequest, error_responses
from serving.services import Services, services, tenant
from serving.speech import SpeechOptions, answer
from serving.synthesis import STREAM_FORMATS, ServingError
from serving.tenants import Tenant

router = APIRouter()
SYNTHESIS_RESPONSES = {**AUDIO_RESPONSES, **error_responses(401, 404, 413, 422, 429, 503, 504)}


@router.post("/v1/tts", response_class=Response, responses=SYNTHESIS_RESPONSES, tags=["synthesis"])
async def tts(body: TTSRequest, request: Request, t: Tenant = Depends(tenant),
              svc: Services = Depends(services)) -> Response:
    """Synthesise ``text`` with ``voice_id``; canary routing per CONTRACTS (user_id or the API key)."""
    if body.stream and body.timestamps:
        raise ServingError(422, "invalid_request", "timestamps: word timestamps come with a whole answer; "
                                                   "send stream: false")
    if body.stream and body.format not in STREAM_FORMATS:
        raise ServingError(422, "invalid_request", f"streaming supports {', '.join(STREAM_FORMATS)}, not {body.format}")
    return await answer(svc, request, t, SpeechOptions(
        text=body.text, voice_id=body.voice_id, user_id=body.user_id, fmt=body.format, speed=body.speed,
        mode="audio" if body.stream else "whole", language=body.language,
        max_chars=svc.settings.serving.max_text_chars, sentence_pause=body.sentence_pause, timestamps=body.timestamps,
        lexicon=svc.lexicons.for_voice(t.tenant, body.voice_id)))
