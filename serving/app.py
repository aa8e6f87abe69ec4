"""The VoiceOps model server (FastAPI): endpoints, auth, errors, audit and metrics per request.

Endpoints and codes are fixed by shared/CONTRACTS.md. Choices made here:

- Errors are ``{"error": {"code", "message"}}`` (the OpenAI client reads the same shape). 404 for an
  unknown voice and for another tenant's voice have the same body, so a key cannot probe which voices
  exist. A valid key without admin rights gets 403 on admin endpoints; a timeout is 504.
- Readiness: ``/readyz`` is 503 ``{"status": "degraded"}`` only while no voice is loaded. When voices are
  loaded but the last reload failed (registry or artifact store down), it stays 200 with
  ``"degraded": true`` and the kind of error: the server keeps serving its last good set, and taking every
  replica out of the load balancer because MLflow blinked would turn a registry outage into a full one.
  /readyz is unauthenticated, so it never names voices or quotes the error; /v1/admin/status has the detail.
- Every ``/v1/*`` request is audited off the request path (serving/audit.py queues it), including
  401/404/422/429 answers; probes (/livez, /readyz, /metrics, /version) are not. A canary attempt that
  fell back to production has its own row with the same request id.
- /openapi.json describes what is really sent (tests/test_fuzz.py fuzzes the live server from it): the error
  body (ErrorResponse) for each error status, every audio media type, /metrics as text/plain, the webhook's
  signature headers. Validation errors name the field; a body that is not JSON (or not UTF-8) is a 422 too.
- Every response carries ``X-Voice-Version`` and ``X-Voice-Variant`` (``none`` when no voice was served)
  and ``X-Request-Id``.
- Streaming (``stream: true``, wav or pcm16): the text is split into sentences (text.split_sentences);
  the first is synthesised before the response starts (so its errors still get a status code), then
  chunks follow as they are produced. wav streams start with a header whose sizes are 0xFFFFFFFF
  (unknown length); pcm16 is raw 16-bit little-endian mono at ``X-Sample-Rate``.
- Shutdown: uvicorn stops accepting and waits for in-flight requests; the lifespan then stops the
  poller, drains the batcher, finishes the breaker's registry writes and flushes the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.audit import AuditLog
from serving.batcher import MicroBatcher
from serving.breaker import CanaryBreaker
from serving.metrics import ServerMetrics
from serving.pool import Snapshot, VoicePool
from serving.routing import choose, effective_weight, requested_override
from serving.synthesis import (  # isort: split
    FORMATS,
    STREAM_FORMATS,
    RequestContext,
    Served,
    ServingError,
    Synthesis,
)

from serving.synthesis import encode_audio, pcm16, phoneme_chunks, wav_stream_header
from serving.tenants import RateLimiter, Tenant, TenantDirectory
from voice_lib import __version__
from voice_lib.core.config import Settings, get_settings, redact_url
from voice_lib.release.registry import Registry

log = logging.getLogger(__name__)
SYNTHESIS_PATHS = ("/v1/tts", "/v1/audio/speech")
WEBHOOK_TOLERANCE_S = 300  # MLflow's documented replay window for X-MLflow-Timestamp
AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "Audio in the requested format (pcm/pcm16: 16-bit mono little-endian at X-Sample-Rate)",
    "content": {media_type.split(";")[0]: {} for *_, media_type in FORMATS.values()}}}
# The webhook reads its headers and raw body itself (the signature covers the exact bytes); documented here.
WEBHOOK_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
                   for name, text in (("X-MLflow-Signature", "v1,<base64 HMAC-SHA256 of delivery_id.timestamp.body>"),
                                      ("X-MLflow-Delivery-Id", "Unique per delivery; repeats are acknowledged once"),
                                      ("X-MLflow-Timestamp", "Unix seconds; at most 300 s from the server's clock"))],
    "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
}
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer vo_...`")


class TTSRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, description="Text to speak (at most serving.max_text_chars characters).")
    voice_id: str
    user_id: str | None = Field(None, max_length=256, description="Sticky canary routing key; default the API key.")
    format: Literal["wav", "pcm16", "mp3", "ogg", "flac"] = "wav"
    speed: float = Field(1.0, ge=0.5, le=2.0)
    stream: bool = Field(False, description="Stream sentence by sentence (wav with unknown length, or pcm16).")
    language: Literal["en", "zh", "auto"] = "auto"


class SpeechRequest(BaseModel):
    """OpenAI ``POST /v1/audio/speech``; ``voice`` is a voice id (or ``{"id": voice_id}``), ``model`` is ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str = Field(min_length=1)
    voice: str | dict[str, str]
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.5, le=2.0)
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] | None = None
    user: str | None = Field(None, max_length=256)


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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: all share ErrorResponse (replacing FastAPI's default 422)."""
    return {status: {"model": ErrorResponse, "description": _ERROR_STATUSES[status]} for status in statuses}


class Services:
    """Everything one app instance owns (several apps may share a process, e.g. in tests)."""

    def __init__(self, settings: Settings, pool: VoicePool | None) -> None:
        s = settings.serving
        self.settings = settings
        self.metrics = ServerMetrics()
        self.breaker = CanaryBreaker(s, Registry(settings), self.metrics)
        self.pool = pool or VoicePool(settings, breaker=self.breaker)
        if self.pool.breaker is None:
            self.pool.breaker = self.breaker
        self.pool.listeners.append(self._on_swap)
        self.batcher = MicroBatcher(self.pool.run_batch, s.batch_max_size, s.batch_max_wait_ms,
                                    on_batch=self.metrics.batch_size.observe)
        self.audit = AuditLog(settings.resolved_audit_url)
        self.metrics.attach_audit(self.audit)
        self.synthesis = Synthesis(self.batcher, self.breaker, self.audit, self.metrics, s.request_timeout_seconds)
        self.tenants = TenantDirectory(settings.resolved_tenants_file)
        self.limiter = RateLimiter()
        self.webhook_deliveries: dict[str, float] = {}
        self._voices_seen: set[str] = set()

    def _on_swap(self, snap: Snapshot) -> None:
        self.metrics.adapters_loaded.set(len(snap.versions))
        for route in snap.voices.values():
            open_ = route.canary is not None and self.breaker.is_open(route.voice_id, route.canary.version)
            self.metrics.set_release(route.voice_id, effective_weight(route, open_), open_)
        for gone in self._voices_seen - set(snap.voices):
            self.metrics.forget_voice(gone)
        self._voices_seen = set(snap.voices)
        self.breaker.forget_except({v.key for v in snap.versions})


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "type": code}}, status_code=status, headers=headers)


class RequestObserver:
    """Pure ASGI middleware: request id, body limit, default voice headers, audit row and request metrics."""

    def __init__(self, app: Any, services: Services) -> None:
        self.app, self.svc = app, services
        self.max_body = services.settings.serving.max_text_chars * 8 + 16_384  # UTF-8 text plus JSON fields

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if given.isascii() and 0 < len(given) <= 64 and given.replace("-", "").isalnum() else uuid.uuid4().hex
        state["request_id"], started, result = rid, time.perf_counter(), {"status": 500, "done": False}

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                result["status"], result["started"] = message["status"], True
                h = MutableHeaders(scope=message)
                for name, key in (("X-Voice-Version", "version"), ("X-Voice-Variant", "variant")):
                    if name not in h:
                        h[name] = str(state.get(key) or "none")
                h["X-Request-Id"] = rid
            elif message["type"] == "http.response.body" and not message.get("more_body") and not result["done"]:
                result["done"] = True
                await send(message)
                self._finish(scope["path"], state, result["status"], started)
                return
            await send(message)

        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            state["error"] = "request body too large"
            response = _error(413, "request_too_large", f"request body is {length} bytes; the limit is {self.max_body}")
            return await response(scope, receive, observed_send)
        try:
            await self.app(scope, receive, observed_send)
        except Exception as exc:
            log.exception("unhandled error on %s", scope["path"])
            state["error"] = f"{type(exc).__name__}: {exc}"
            if not result.get("started"):
                await _error(500, "internal_error", "internal server error; the request id is in X-Request-Id")(
                    scope, receive, observed_send)
        finally:
            if not result["done"]:
                result["done"] = True
                self._finish(scope["path"], state, result["status"], started)

    def _finish(self, path: str, state: dict, status: int, started: float) -> None:
        if not path.startswith("/v1/"):
            return
        latency = time.perf_counter() - started
        self.svc.audit.record(request_id=state["request_id"], tenant=state.get("tenant"),
                              voice_id=(state.get("voice_id") or None) and str(state["voice_id"])[:64],
                              version=state.get("version"), variant=state.get("variant"),
                              characters=state.get("characters"), latency_ms=round(latency * 1000, 2),
                              rtf=state.get("rtf"), status=status, error=state.get("error"))
        if path in SYNTHESIS_PATHS:
            served = bool(state.get("version"))
            self.svc.metrics.observe_request(state["voice_id"] if served else "-", state.get("version") or "-",
                                             state.get("variant") or "-", status, latency,
                                             rtf=state.get("rtf"), first_chunk_seconds=state.get("first_chunk"))


def create_app(settings: Settings | None = None, pool: VoicePool | None = None) -> FastAPI:
    """The server app. ``pool`` lets tests inject a prepared VoicePool; the lifespan starts and stops it."""
    settings = settings or get_settings()
    from serving.memory import limit_arenas
    from serving.pool import bound_registry_requests
    from voice_lib.data.text import configure_frontend_cache

    limit_arenas(settings.serving.malloc_arena_max)  # before the batcher, poller and audit threads exist
    bound_registry_requests(settings.serving.registry_request_retries, settings.serving.registry_request_timeout_seconds)

    configure_frontend_cache(settings.serving.frontend_cache_size)
    svc = Services(settings, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        svc.pool.start()
        log.info("VoiceOps server %s starting; polling %s every %g s", __version__,
                 redact_url(settings.mlflow_tracking_uri), settings.serving.poll_seconds)
        yield
        svc.pool.stop()
        drained = await asyncio.to_thread(svc.batcher.stop, settings.serving.request_timeout_seconds)
        svc.pool.close()
        await asyncio.to_thread(svc.breaker.close)
        flushed = await asyncio.to_thread(svc.audit.close, 10.0)
        log.info("VoiceOps server stopped (batcher drained: %s, audit flushed: %s)", drained, flushed)

    app = FastAPI(title="VoiceOps TTS server", version=__version__, lifespan=lifespan,
                  description="Few-shot cloned voices with canary releases. See shared/CONTRACTS.md.")
    app.state.services = svc
    app.add_middleware(RequestObserver, services=svc)

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        request.state.error = exc.message
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [_validation_problem(e) for e in exc.errors()[:5]]
        request.state.error = "invalid request"
        return _error(422, "invalid_request", "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body json.loads cannot even decode (not UTF-8): the same 422 as bad JSON.
            request.state.error = "invalid request"
            return _error(422, "invalid_request", "invalid request: body: not valid JSON (not UTF-8 text); "
                                                  "send a JSON object with Content-Type: application/json")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        message = str(exc.detail)
        # Starlette's own "Not Found" / "Method Not Allowed" do not say what to do instead.
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint at {request.url.path[:100]!r}; the API is described at /docs and /openapi.json"
        elif exc.status_code == 405 and headers and "Allow" in headers:
            message = f"{request.method} is not allowed on {request.url.path[:100]!r}; use {headers['Allow']}"
        return _error(exc.status_code, code, message, headers)

    # --- auth ----------------------------------------------------------------------------------

    def tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Tenant:
        key = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
        found = svc.tenants.authenticate(key)
        if found is None:
            raise ServingError(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})
        request.state.tenant, request.state.api_key = found.tenant, key
        rate = found.rate_per_minute or settings.serving.rate_limit_per_minute
        allowed, retry_after = svc.limiter.allow(found.key_id, rate)
        if not allowed:
            seconds = max(1, math.ceil(retry_after))
            raise ServingError(429, "rate_limited", f"rate limit of {rate} requests per minute exceeded; retry in {seconds} s",
                               {"Retry-After": str(seconds)})
        return found

    def admin(t: Tenant = Depends(tenant)) -> Tenant:
        if not t.admin:
            raise ServingError(403, "forbidden", "this endpoint needs an admin API key")
        return t

    # --- synthesis -----------------------------------------------------------------------------

    async def serve(request: Request, t: Tenant, *, text: str, voice_id: str, user_id: str | None, fmt: str,
                    speed: float, stream: bool, language: str) -> Response:
        st = request.state
        st.characters, st.voice_id = len(text), voice_id
        limit = settings.serving.max_text_chars
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
            _note(st, first)
            return StreamingResponse(_stream_body(st, first, rest, fmt), media_type=("audio/wav" if fmt == "wav" else "audio/L16"),
                                     headers=_voice_headers(first))
        served = await svc.synthesis.synthesize(snap, route, decision, chunks, speed, ctx)
        _note(st, served)
        body, media_type = await asyncio.to_thread(encode_audio, served.audio, served.sample_rate, fmt)
        return Response(body, media_type=media_type, headers=_voice_headers(served))

    def _note(st: Any, served: Served) -> None:
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

    synthesis_responses = {**AUDIO_RESPONSES, **error_responses(401, 404, 413, 422, 429, 503, 504)}

    @app.post("/v1/tts", response_class=Response, responses=synthesis_responses, tags=["synthesis"])
    async def tts(body: TTSRequest, request: Request, t: Tenant = Depends(tenant)) -> Response:
        """Synthesise ``text`` with ``voice_id``; canary routing per CONTRACTS (user_id or the API key)."""
        return await serve(request, t, text=body.text, voice_id=body.voice_id, user_id=body.user_id, fmt=body.format,
                           speed=body.speed, stream=body.stream, language=body.language)

    @app.post("/v1/audio/speech", response_class=Response, responses=synthesis_responses, tags=["synthesis"])
    async def openai_speech(body: SpeechRequest, request: Request, t: Tenant = Depends(tenant)) -> Response:
        """OpenAI-compatible speech endpoint (``voice`` = voice id; pcm is 16-bit mono at X-Sample-Rate)."""
        if body.response_format == "aac" or body.stream_format == "sse":
            what = "response_format aac" if body.response_format == "aac" else "stream_format sse"
            raise ServingError(422, "unsupported", f"{what} is not supported; use mp3, opus, flac, wav or pcm")
        voice = body.voice.get("id", "") if isinstance(body.voice, dict) else body.voice
        return await serve(request, t, text=body.input, voice_id=voice, user_id=body.user, fmt=body.response_format,
                           speed=body.speed, stream=body.stream_format == "audio" and body.response_format in STREAM_FORMATS,
                           language="auto")

    @app.get("/v1/voices", tags=["voices"], responses=error_responses(401, 429))
    async def voices(t: Tenant = Depends(tenant)) -> dict[str, Any]:
        """The voices this key may use (and only those)."""
        snap = svc.pool.snapshot
        found = [{"voice_id": r.voice_id, "version": r.production.version,
                  "sample_rate": snap.bases[r.production.base_sha256].feature_config.sample_rate}
                 for r in sorted(snap.voices.values(), key=lambda r: r.voice_id) if t.may_use(r.voice_id)]
        return {"voices": found}

    # --- admin and webhooks --------------------------------------------------------------------

    @app.get("/v1/admin/status", tags=["admin"], responses=error_responses(401, 403, 429))
    async def admin_status(_: Tenant = Depends(admin)) -> dict[str, Any]:
        """Loaded versions, weights, breaker state and reasons per voice."""
        return _status(svc)

    @app.post("/v1/admin/reload", tags=["admin"], responses=error_responses(401, 403, 429))
    async def admin_reload(_: Tenant = Depends(admin)) -> dict[str, Any]:
        """Reload from the registry now and return what changed."""
        return await asyncio.to_thread(svc.pool.reload)

    @app.post("/v1/webhooks/mlflow", status_code=202, tags=["admin"], responses={
        401: {"model": ErrorResponse, "description": "Missing, stale or wrong X-MLflow-Signature"},
        404: {"model": ErrorResponse, "description": "Webhooks are disabled (no serving.webhook_secret)"},
        413: {"model": ErrorResponse, "description": "Request body too large"}}, openapi_extra=WEBHOOK_OPENAPI)
    async def mlflow_webhook(request: Request) -> dict[str, Any]:
        """MLflow registry webhook: verified with X-MLflow-Signature (v1 HMAC-SHA256), then an immediate reload."""
        secret = settings.serving.webhook_secret
        if secret is None:
            raise ServingError(404, "webhooks_disabled", "webhooks are disabled: set VOICEOPS_SERVING__WEBHOOK_SECRET")
        raw = await request.body()
        problem = verify_mlflow_signature(secret.get_secret_value(), raw, request.headers)
        if problem:
            # A 401 must say how to authenticate (RFC 9110 11.6.1): here, with MLflow's signature headers.
            raise ServingError(401, "bad_signature", problem,
                               {"WWW-Authenticate": 'X-MLflow-Signature realm="mlflow-webhooks"'})
        delivery = request.headers["x-mlflow-delivery-id"]
        now = time.time()
        for old in [d for d, at in svc.webhook_deliveries.items() if now - at > 2 * WEBHOOK_TOLERANCE_S]:
            del svc.webhook_deliveries[old]
        if delivery in svc.webhook_deliveries:
            return {"status": "duplicate", "delivery_id": delivery}
        svc.webhook_deliveries[delivery] = now
        svc.pool.request_reload()
        return {"status": "reload scheduled", "delivery_id": delivery}

    # --- probes --------------------------------------------------------------------------------

    @app.get("/livez", tags=["probes"])
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={
        503: {"description": "No voice is loaded yet (same body as 200)", "content": {"application/json": {}}}})
    async def readyz() -> JSONResponse:
        pool = svc.pool
        body = {"status": "ready" if pool.ready else "degraded", "degraded": pool.degraded or not pool.ready,
                "voices": len(pool.snapshot.voices), "error": public_reload_error(pool.last_error),
                "last_reload_at": pool.last_success_at}
        if not pool.ready and body["error"] is None:
            body["error"] = "no voice with a loaded production version yet"
        return JSONResponse(body, status_code=200 if pool.ready else 503)

    @app.get("/version", tags=["probes"])
    async def version() -> dict[str, Any]:
        import torch

        return {"name": "voiceops-server", "version": __version__, "torch": torch.__version__,
                "generation": svc.pool.snapshot.generation}

    @app.get("/metrics", tags=["probes"], response_class=Response, responses={
        200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}})
    async def metrics() -> Response:
        from voice_lib.data.text import frontend_cache_info

        svc.metrics.frontend_cache_hit_ratio.set(frontend_cache_info()["hit_rate"])
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _validation_problem(error: dict[str, Any]) -> str:
    """One pydantic/FastAPI validation error as ``field: problem``, in words an API user can act on."""
    loc = tuple(error.get("loc") or ())
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (error.get("ctx") or {}).get("error", "not JSON")
        return f"body: not valid JSON ({reason}{where}); send a JSON object with Content-Type: application/json"
    if loc == ("body",) and error.get("type") == "missing":
        return "body: missing; send a JSON object with Content-Type: application/json"
    return f"{'.'.join(str(p) for p in loc if p != 'body') or 'body'}: {error.get('msg', 'invalid')}"


def _voice_headers(served: Served) -> dict[str, str]:
    headers = {"X-Voice-Version": served.decision.version.version, "X-Voice-Variant": served.decision.variant,
               "X-Sample-Rate": str(served.sample_rate)}
    if served.fallback:
        headers["X-Voice-Fallback"] = served.fallback[:200]
    return headers


def verify_mlflow_signature(secret: str, body: bytes, headers: Any) -> str | None:
    """None if the MLflow webhook signature is valid, else why not.

    MLflow 3 (mlflow/webhooks/delivery.py) signs ``f"{delivery_id}.{timestamp}.{payload}"`` with HMAC-SHA256
    and sends ``X-MLflow-Signature: v1,<base64>``, ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp``.
    """
    signature = headers.get("x-mlflow-signature") or ""
    delivery, timestamp = headers.get("x-mlflow-delivery-id") or "", headers.get("x-mlflow-timestamp") or ""
    if not signature or not delivery or not timestamp:
        return "missing X-MLflow-Signature, X-MLflow-Delivery-Id or X-MLflow-Timestamp header"
    if not signature.startswith("v1,"):
        return "unsupported signature version (expected v1,<base64>)"
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses (that was a 500, not a 401).
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(time.time() - int(timestamp)) > WEBHOOK_TOLERANCE_S:
        return f"X-MLflow-Timestamp is missing or more than {WEBHOOK_TOLERANCE_S} s away from now (replay?)"
    digest = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    return None if hmac.compare_digest(expected.encode(), signature.encode()) else "signature does not match"


def public_reload_error(error: str | None) -> str | None:
    """What the unauthenticated /readyz may say about the last reload: its kind, never its detail.

    The detail names voices of every tenant (and may quote registry URLs); it is in /v1/admin/status
    (admin key) and the server log.
    """
    if error is None:
        return None
    for kind in ("registry unreachable", "reload failed"):
        if error.startswith(kind):
            return f"{kind}; details in /v1/admin/status (admin key) and the server log"
    return "some voice versions could not be loaded; details in /v1/admin/status (admin key) and the server log"


def _status(svc: Services) -> dict[str, Any]:
    pool, snap = svc.pool, svc.pool.snapshot
    voices: dict[str, Any] = {}
    for voice_id, r in sorted(snap.voices.items()):
        canary_open = r.canary is not None and svc.breaker.is_open(voice_id, r.canary.version)
        voices[voice_id] = {
            "production": {"version": r.production.version, "loaded_at": r.production.loaded_at,
                           "warmup": dict(r.production.warmup)},
            "canary": None if r.canary is None else {
                "version": r.canary.version, "loaded_at": r.canary.loaded_at, "warmup": dict(r.canary.warmup),
                "breaker": svc.breaker.state(voice_id, r.canary.version)},
            "canary_weight": r.canary_weight, "effective_canary_weight": effective_weight(r, canary_open),
            "release_state": r.release_state, "notes": list(r.notes)}
    return {"generation": snap.generation, "snapshot_at": snap.created_at, "ready": pool.ready,
            "degraded": pool.degraded, "last_error": pool.last_error, "last_attempt_at": pool.last_attempt_at,
            "last_success_at": pool.last_success_at, "adapters_loaded": len(snap.versions),
            "bases": [{"sha256": b.sha256, "source": b.source} for b in snap.bases.values()],
            "batcher": {"batches": svc.batcher.batches, "items": svc.batcher.items, "max_batch": svc.batcher.max_seen,
                        "pending": svc.batcher.pending},
            "audit": {"written": svc.audit.written, "dropped": svc.audit.dropped, "pending": svc.audit.pending},
            "voices": voices}
