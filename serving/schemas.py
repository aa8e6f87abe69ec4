"""The server's request and error bodies, and the OpenAPI descriptions of what each endpoint answers.

Errors are ``{"error": {"code", "message", "type"}}`` (the OpenAI client reads the same shape). /openapi.json
describes what is really sent (tests/test_fuzz.py fuzzes the live server from it): the error body for each
error status, every audio media type, /metrics as text/plain.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.synthesis import FORMATS


SENTENCE_PAUSE = "Seconds of silence after every sentence but the last (SSML <break> tags set their own)."


class TTSRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, description="Text to speak (at most serving.max_text_chars characters).")
    voice_id: str
    user_id: str | None = Field(None, max_length=256, description="Sticky canary routing key; default the API key.")
    format: Literal["wav", "pcm16", "mp3", "ogg", "flac"] = "wav"
    speed: float = Field(1.0, ge=0.5, le=2.0)
    stream: bool = Field(False, description="Stream sentence by sentence (wav with unknown length, or pcm16).")
    language: Literal["en", "zh", "auto"] = "auto"
    sentence_pause: float = Field(0.0, ge=0.0, le=5.0, description=SENTENCE_PAUSE)
    timestamps: bool = Field(False, description="Answer JSON: the audio (base64) and each word's start and end "
                                                "seconds from the model's durations. Not with stream.")


class SpeechRequest(BaseModel):
    """OpenAI ``POST /v1/audio/speech``. ``voice`` is a voice id, ``{"id": voice_id}`` or a name of the tenant's
    alias map (serving.voice_aliases, e.g. alloy); ``model`` is any of GET /v1/models and changes nothing."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str = Field(min_length=1, description="At most serving.openai_max_input_chars (4,096) characters; "
                                                 "SSML-lite tags allowed (docs/text.md).")
    voice: str | dict[str, str]
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = Field(None, description="Accepted for compatibility and ignored: VoiceOps voices "
                                                       "speak as they were recorded.")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="audio (the default): a chunked stream of the format, sentence by sentence; sse: "
                          "server-sent speech.audio.delta events, then speech.audio.done.")
    user: str | None = Field(None, max_length=256)
    sentence_pause: float = Field(0.0, ge=0.0, le=5.0, description=SENTENCE_PAUSE)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. voice_not_found.")
    message: str = Field(description="What was wrong with the request and how to fix it.")
    type: str = Field(description="The code again (OpenAI clients read `type`).")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_ERROR_STATUSES = {
    401: "Missing or invalid API key (see WWW-Authenticate)",
    403: "The API key is not an admin key",
    404: "Unknown voice, or a voice of another tenant (the same answer, so keys cannot probe voices)",
    413: "Text longer than serving.max_text_chars, or a request body too large",
    422: "Invalid request (the message names the field), or text with nothing to say",
    429: "Rate limit of the API key exceeded (see Retry-After)",
    503: "No voice is loaded yet, or the server is shutting down (see Retry-After)",
    504: "Synthesis did not finish within serving.request_timeout_seconds",
}
AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "Audio in the requested format (pcm/pcm16: 16-bit mono little-endian at X-Sample-Rate)",
    "content": {**{media_type.split(";")[0]: {} for *_, media_type in FORMATS.values()},
                "text/event-stream": {},  # the OpenAI endpoint's stream_format: "sse"
                "application/json": {}}}}  # /v1/tts with timestamps: true


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: all share ErrorResponse (replacing FastAPI's default 422)."""
    return {status: {"model": ErrorResponse, "description": _ERROR_STATUSES[status]} for status in statuses}


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "type": code}}, status_code=status, headers=headers)


def validation_problem(error: dict[str, Any]) -> str:
    """One pydantic/FastAPI validation error as ``field: problem``, in words an API user can act on."""
    loc = tuple(error.get("loc") or ())
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (error.get("ctx") or {}).get("error", "not JSON")
        return f"body: not valid JSON ({reason}{where}); send a JSON object with Content-Type: application/json"
    if loc == ("body",) and error.get("type") == "missing":
        return "body: missing; send a JSON object with Content-Type: application/json"
    return f"{'.'.join(str(p) for p in loc if p != 'body') or 'body'}: {error.get('msg', 'invalid')}"
