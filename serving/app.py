"""The VoiceOps model server (FastAPI): the app, its middleware and error handlers, over three routers.

Endpoints and codes are fixed by shared/CONTRACTS.md; the routes are in serving/routers/ (synthesis,
admin, probes), all over one ``Services`` object (serving/services.py). Choices made here:

- Errors are ``{"error": {"code", "message"}}`` (serving/schemas.py). 404 for an unknown voice and for
  another tenant's voice have the same body, so a key cannot probe which voices exist. A valid key without
  admin rights gets 403 on admin endpoints; a timeout is 504. Validation errors name the field; a body that
  is not JSON (or not UTF-8) is a 422 too.
- Every ``/v1/*`` request is audited off the request path (serving/audit.py queues it), including
  401/404/422/429 answers; probes (/livez, /readyz, /metrics, /version) are not. A canary attempt that
  fell back to production has its own row with the same request id.
- Every response carries ``X-Voice-Version`` and ``X-Voice-Variant`` (``none`` when no voice was served)
  and ``X-Request-Id``.
- Shutdown: uvicorn stops accepting and waits for in-flight requests; the lifespan then stops the
  poller, drains the batcher, finishes the breaker's registry writes and flushes the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.pool import VoicePool
from serving.routers import admin, openai, probes, synthesis, voices
from serving.schemas import error_json, validation_problem
from serving.services import Services
from serving.synthesis import ServingError
from voice_lib import __version__
from voice_lib.core.config import Settings, get_settings, redact_url

log = logging.getLogger(__name__)
SYNTHESIS_PATHS = ("/v1/tts", "/v1/audio/speech")
# What a stop waits for at most, step by step (the lifespan below and `voiceops serve`): deploy/k8s and
# docker-compose.yml size their grace periods from shutdown_budget_seconds (tests/test_deploy.py checks).
GRACEFUL_EXTRA_SECONDS = 5  # uvicorn: in-flight requests get their timeout and this much more
BREAKER_FLUSH_SECONDS = 10.0
AUDIT_FLUSH_SECONDS = 10.0


def graceful_shutdown_seconds(settings: Settings) -> int:
    """How long uvicorn lets in-flight requests finish after SIGTERM."""
    return int(settings.serving.request_timeout_seconds) + GRACEFUL_EXTRA_SECONDS


def shutdown_budget_seconds(settings: Settings) -> float:
    """The longest a clean stop takes after SIGTERM: in-flight requests, then the batcher's drain, the
    breaker's registry writes and the audit flush, each bounded by its own timeout."""
    return (graceful_shutdown_seconds(settings) + settings.serving.request_timeout_seconds
            + BREAKER_FLUSH_SECONDS + AUDIT_FLUSH_SECONDS)
UPLOAD_PATH = "/v1/voices"


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being received (FastAPI re-raises HTTPExceptions)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes; send less (text at most "
                              "serving.max_text_chars characters)")


class RequestObserver:
    """Pure ASGI middleware: request id, body limit, default voice headers, audit row and request metrics.

    The body limit is enforced twice: a declared Content-Length over it is answered 413 before anything is
    read, and the bytes actually received are counted, so a chunked body (no Content-Length) or one longer
    than declared is cut off at the limit with a 413 instead of streaming into memory (the webhook reads its
    whole body before it can check the signature)."""

    def __init__(self, app: Any, services: Services) -> None:
        self.app, self.svc = app, services
        s = services.settings.serving
        # UTF-8 text plus JSON fields; an upload to POST /v1/voices may be as large as onboarding accepts.
        self.max_body = max(s.max_text_chars, s.openai_max_input_chars) * 8 + 16_384
        self.max_upload = services.settings.limits.max_upload_bytes + 1_048_576  # multipart framing and fields

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
        limit = self.max_upload if scope["path"] == UPLOAD_PATH and scope.get("method") == "POST" else self.max_body
        if length.isdigit() and int(length) > limit:
            state["error"] = "request body too large"
            response = error_json(413, "request_too_large", f"request body is {length} bytes; the limit is {limit}")
            return await response(scope, receive, observed_send)
        try:
            await self.app(scope, self._bounded(receive, state, limit), observed_send)
        except BodyTooLarge as exc:  # raised outside FastAPI's handlers (e.g. read by a middleware below)
            if not result.get("started"):
                await error_json(413, "request_too_large", exc.detail)(scope, receive, observed_send)
        except Exception as exc:
            log.exception("unhandled error on %s", scope["path"])
            state["error"] = f"{type(exc).__name__}: {exc}"
            if not result.get("started"):
                await error_json(500, "internal_error", "internal server error; the request id is in X-Request-Id")(
                    scope, receive, observed_send)
        finally:
            if not result["done"]:
                result["done"] = True
                self._finish(scope["path"], state, result["status"], started)

    def _bounded(self, receive: Any, state: dict, limit: int) -> Any:
        """``receive`` that counts body bytes and raises BodyTooLarge once they pass ``limit`` (the route's: an
        upload's is ``max_upload``, every other body's ``max_body``)."""
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["error"] = "request body too large"
                    raise BodyTooLarge(limit)
            return message

        return bounded_receive

    def _finish(self, path: str, state: dict, status: int, started: float) -> None:
        if not path.startswith("/v1/"):
            return
        latency = time.perf_counter() - started
        self.svc.audit.record(request_id=state["request_id"], tenant=state.get("tenant"),
                              voice_id=(state.get("voice_id") or None) and str(state["voice_id"])[:64],
                              version=state.get("version"), variant=state.get("variant"),
                              characters=state.get("characters"), latency_ms=round(latency * 1000, 2),
                              rtf=state.get("rtf"), compute_ms=state.get("compute_ms"), status=status,
                              error=state.get("error"))
        if path in SYNTHESIS_PATHS:
            served = bool(state.get("version"))
            self.svc.metrics.observe_request(state["voice_id"] if served else "-", state.get("version") or "-",
                                             state.get("variant") or "-", status, latency,
                                             rtf=state.get("rtf"), first_chunk_seconds=state.get("first_chunk"),
                                             compute_ms=state.get("compute_ms"))


def install_error_handlers(app: FastAPI) -> None:
    """Every error answer in the one ErrorResponse shape, with a message that says what to do."""

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        request.state.error = exc.message
        return error_json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [validation_problem(e) for e in exc.errors()[:5]]
        request.state.error = "invalid request"
        return error_json(422, "invalid_request", "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body json.loads cannot even decode (not UTF-8): the same 422 as bad JSON.
            request.state.error = "invalid request"
            return error_json(422, "invalid_request", "invalid request: body: not valid JSON (not UTF-8 text); "
                                                      "send a JSON object with Content-Type: application/json")
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        message = str(exc.detail)
        # Starlette's own "Not Found" / "Method Not Allowed" do not say what to do instead.
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint at {request.url.path[:100]!r}; the API is described at /docs and /openapi.json"
        elif exc.status_code == 405 and headers and "Allow" in headers:
            message = f"{request.method} is not allowed on {request.url.path[:100]!r}; use {headers['Allow']}"
        return error_json(exc.status_code, code, message, headers)


def create_app(settings: Settings | None = None, pool: VoicePool | None = None) -> FastAPI:
    """The server app. ``pool`` lets tests inject a prepared VoicePool; the lifespan starts and stops it."""
    settings = settings or get_settings()
    from serving.memory import limit_arenas
    from serving.registry_reader import bound_registry_requests
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
        await asyncio.to_thread(svc.breaker.close, BREAKER_FLUSH_SECONDS)
        flushed = await asyncio.to_thread(svc.audit.close, AUDIT_FLUSH_SECONDS)
        log.info("VoiceOps server stopped (batcher drained: %s, audit flushed: %s)", drained, flushed)

    app = FastAPI(title="VoiceOps TTS server", version=__version__, lifespan=lifespan,
                  description="Few-shot cloned voices with canary releases. See shared/CONTRACTS.md.")
    app.state.services = svc
    app.add_middleware(RequestObserver, services=svc)
    install_error_handlers(app)
    for router in (synthesis.router, openai.router, voices.router, admin.router, probes.router):
        app.include_router(router)
    return app
