"""The VoiceOps release page: a FastAPI app that Airflow's API server mounts at /voiceops.

Airflow does not authenticate plugin apps, so every route here does: the user comes from Airflow's own
``get_user`` (``Authorization: Bearer <jwt>`` or the ``_token`` cookie the UI login sets), reads need
the auth manager's GET on canary_promotion runs and the release actions its PUT (a ``user`` role or
above with the Simple auth manager). Unauthenticated: 401 JSON for the API, a redirect to Airflow's
login for the page.

This module is imported on the first request only (see __init__.py), inside the API server, so its
Airflow imports cost nothing in other components. Registry and database calls run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import (
    DagAccessEntity,
    DagDetails,
)
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from voice_lib.core.config import redact_url
from voice_lib.release.actions import perform
from voice_lib.release.rollout import check_limits
from voiceops_release import state as view

log = logging.getLogger("voiceops_release")

STATIC = Path(__file__).resolve().parent / "static"
RELEASE_DAG = "canary_promotion"  # release rights are rights on this dag's runs (shared/CONTRACTS.md)
PARALLEL_READS = 4  # voices read at once; each is a few MLflow calls

_HINTS = {
    "promote": "promote needs a canary or a candidate that was not rejected; pass {\"version\": \"N\"} to pick one.",
    "pause": "only a voice with a canary can be paused.",
    "resume": "only a paused canary can be resumed.",
    "rollback": "rollback needs a canary, or a previous production to go back to.",
}


class ApiError(Exception):
    """An error answered as JSON {"detail", "voice_id", "hint"} (or a short HTML page for the page route)."""

    def __init__(self, status: int, detail: str, voice_id: str | None = None, hint: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.voice_id, self.hint = status, detail, voice_id, hint


class PromoteBody(BaseModel):
    version: str | None = Field(default=None, description="Version to promote; default the canary, else the candidate.")
    force: bool = Field(default=False, description="Promote a version that is not a passed candidate (never passed "
                                                   "the gates, rolled back, tripped the breaker); needs a reason.")
    reason: str = Field(default="", description="Why; recorded on the version with your name.")


class RollbackBody(BaseModel):
    reason: str = Field(default="", description="Why; recorded on the rolled-back version (tag `reason`).")
    expected_canary: str | None = Field(default="seen now", description="The canary version you saw (null: none, "
                                        "so production is rolled back); nothing happens if it changed meanwhile.")


# --- backends (one per API-server process) ----------------------------------------------------

@lru_cache(maxsize=1)
def _settings():
    from voice_lib.core.config import get_settings

    return get_settings()


@lru_cache(maxsize=1)
def _registry():
    from voice_lib.release.registry import Registry

    return Registry(_settings())  # its MLflow client is made (and the server checked) on first use


@lru_cache(maxsize=1)
def _artifacts():
    from voiceops_release.reports import RunArtifacts

    return RunArtifacts(_settings())


def _view(voice_id: str) -> dict[str, Any]:
    return view.voice_view(_settings(), _registry(), _history(), voice_id, artifacts=_artifacts(), trend=_trend)


def _trend(settings, voice_id: str, version: str) -> dict[str, Any] | None:
    """The production version's nightly metrics; an unreadable store must not hide the rest of the voice."""
    from voice_lib.core.storage import StorageError
    from voiceops_release.reports import nightly_trend

    try:
        return nightly_trend(settings, voice_id, version)
    except (StorageError, OSError, ValueError) as exc:
        log.warning("voice-%s: nightly trend unavailable: %s", voice_id, exc)
        return {"version": version, "days": [], "metrics": {}, "regressions": [], "error": str(exc)}


@lru_cache(maxsize=1)
def _history_cached():
    from voice_lib.release.rollout import ReleaseHistory

    return ReleaseHistory(_settings().resolved_audit_url)


def _history():
    """The release history table, or None when the audit DB cannot be opened (the page still works)."""
    try:
        return _history_cached()
    except Exception as exc:
        log.warning("release history at %s unavailable: %s", redact_url(_settings().resolved_audit_url),
                    type(exc).__name__)
        return None


def _approvals(user: BaseUser):
    """canary_promotion's approvals over Airflow's REST API as this user (a one-minute token minted for them), so
    Airflow records who answered, and checks their right to, as for an answer in its own UI."""
    from voice_lib.release.approvals import AirflowApprovals

    token = get_auth_manager().generate_jwt(user, expiration_time_in_seconds=60)
    return AirflowApprovals(_settings().airflow_url, token)


def _pending_approvals(user: BaseUser) -> tuple[dict[str, Any], str | None]:
    """voice_id -> its held rollout's pending approval (as JSON), and an error when Airflow could not be asked."""
    from dataclasses import asdict

    from voice_lib.core.airflow import AirflowError

    try:
        return {p.voice_id: asdict(p) for p in reversed(_approvals(user).pending())}, None
    except AirflowError as exc:
        log.warning("pending approvals unavailable: %s", exc)
        return {}, f"pending approvals unavailable: {exc}"


def _registry_error(exc: Exception, voice_id: str | None, action: str | None) -> ApiError:
    text = str(exc)
    what = f"cannot {action} voice {voice_id}" if action else (f"cannot read voice {voice_id}" if voice_id else "cannot read the registry")
    if "is not reachable" in text:
        return ApiError(503, f"{what}: {text}", voice_id,
                        "start MLflow (`voiceops up`) or point VOICEOPS_MLFLOW_TRACKING_URI of the Airflow stack at it.")
    if "failed on MLflow at" in text:
        return ApiError(502, f"{what}: {text}", voice_id, "MLflow answered with an error; check its log and retry.")
    return ApiError(409, f"{what}: {text}", voice_id, _HINTS.get(action or ""))


def _valid_voice(voice_id: str) -> str:
    from voice_lib.core.config import validate_voice_id

    try:
        return validate_voice_id(voice_id)
    except ValueError as exc:
        raise ApiError(422, str(exc), voice_id, "voices are listed by GET api/voices.") from None


# --- authentication and authorization ---------------------------------------------------------

UserDep = Annotated[BaseUser, Depends(get_user)]


def _allowed(user: BaseUser, method: str) -> bool:
    return get_auth_manager().is_authorized_dag(
        method=method, access_entity=DagAccessEntity.RUN, details=DagDetails(id=RELEASE_DAG), user=user)


def reader(user: UserDep) -> BaseUser:
    if not _allowed(user, "GET"):
        raise ApiError(403, f"user {user.get_name()!r} may not see releases: that needs read access to "
                            f"{RELEASE_DAG} runs.", hint="ask an Airflow admin for the viewer role or above.")
    return user


def writer(request: Request, user: UserDep) -> BaseUser:
    if not _allowed(user, "PUT"):
        raise ApiError(403, f"user {user.get_name()!r} may not change releases: that needs edit access to "
                            f"{RELEASE_DAG} runs.", hint="ask an Airflow admin for the user role or above.")
    # A cross-site HTML form cannot send JSON without a CORS preflight, so this also guards the cookie login.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        voice_id = request.path_params.get("voice_id")
        raise ApiError(415, f"release actions on voice {voice_id} take a JSON body: send Content-Type: "
                            "application/json (and {} when there is nothing to say).", voice_id)
    return user


Reader = Annotated[BaseUser, Depends(reader)]
Writer = Annotated[BaseUser, Depends(writer)]


def _route_path(request: Request) -> str:
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _page_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/"


def _login_url(request: Request) -> str:
    try:
        return get_auth_manager().get_url_login(next_url=_page_url(request))
    except Exception:  # an auth manager without login page support
        return "/"


def _wants_html(request: Request) -> bool:
    return not _route_path(request).startswith("/api/")


# --- the app ------------------------------------------------------------------------------------

app = FastAPI(
    title="VoiceOps releases",
    description="Canary releases of VoiceOps voices: state, analysis and promote/pause/resume/rollback.",
    docs_url=None, redoc_url=None,  # behind Airflow's auth like everything else here; see /openapi.json
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    if _wants_html(request):
        body = f"<!doctype html><title>VoiceOps releases</title><h1>{exc.status}</h1><p>{_escape(exc.detail)}</p>"
        if exc.hint:
            body += f"<p>{_escape(exc.hint)}</p>"
        return HTMLResponse(body, status_code=exc.status)
    return JSONResponse({"detail": exc.detail, "voice_id": exc.voice_id, "hint": exc.hint}, status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # 401/403 raised here come from Airflow's get_user: no token, an expired one, or one that does not verify.
    if exc.status_code in (401, 403):
        if _wants_html(request) and request.method == "GET":
            return RedirectResponse(_login_url(request), status_code=302)
        return JSONResponse({"detail": f"{exc.detail}: log in to Airflow, or send Authorization: Bearer <token> "
                                       "(POST /auth/token).", "login_url": _login_url(request)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return JSONResponse({"detail": f"invalid request: {problems}", "voice_id": request.path_params.get("voice_id"),
                         "hint": "see openapi.json for the request bodies."}, status_code=422)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


@app.get("/", include_in_schema=False)
def page(user: Reader) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def _voice_or_error(voice_id: str) -> dict[str, Any]:
    """voice_view, or the voice with an error message (one unreadable voice must not hide the others)."""
    from voice_lib.release.registry import RegistryError

    try:
        return _view(voice_id)
    except (RegistryError, ValueError) as exc:
        log.warning("voice-%s: %s", voice_id, exc)
        return {"voice_id": voice_id, "model": f"voice-{voice_id}", "error": str(exc), "aliases": {},
                "actions": {a: False for a in view.ACTIONS}}


@app.get("/api/voices")
async def list_voices(user: Reader) -> dict[str, Any]:
    """Every voice model with its aliases, canary weight, step, latest analysis, breaker and release_state."""
    from voice_lib.release.registry import RegistryError

    settings = _settings()
    try:
        names = await asyncio.to_thread(lambda: _registry().list_voice_models())
    except RegistryError as exc:
        raise _registry_error(exc, None, None) from None
    gate = asyncio.Semaphore(PARALLEL_READS)

    async def one(name: str) -> dict[str, Any]:
        async with gate:
            return await asyncio.to_thread(_voice_or_error, view.voice_id_of(name))

    voices, (approvals, approvals_error) = await asyncio.gather(asyncio.gather(*(one(n) for n in names)),
                                                                asyncio.to_thread(_pending_approvals, user))
    for voice in voices:
        voice["approval"] = approvals.get(voice["voice_id"])
    can_write = await asyncio.to_thread(_allowed, user, "PUT")
    return {"voices": voices, "approvals_error": approvals_error, "thresholds": check_limits(settings.release), "user": user.get_name(),
            "can_write": can_write, "registry": redact_url(settings.mlflow_tracking_uri), "generated_at": time.time()}


async def _one_voice(voice_id: str, user: BaseUser) -> dict[str, Any]:
    from voice_lib.release.registry import RegistryError

    voice_id = _valid_voice(voice_id)

    def read() -> dict[str, Any]:
        registry = _registry()
        if not registry.exists(registry.model_name(voice_id)):
            raise ApiError(404, f"voice {voice_id} (model voice-{voice_id}) is not registered in MLflow at "
                                f"{registry.display_uri}.", voice_id, "onboard it first (voice_onboarding), or check the id.")
        return _view(voice_id)

    try:
        voice = await asyncio.to_thread(read)
    except RegistryError as exc:
        raise _registry_error(exc, voice_id, None) from None
    approvals, voice["approvals_error"] = await asyncio.to_thread(_pending_approvals, user)
    voice["approval"] = approvals.get(voice_id)
    return voice


@app.get("/api/voices/{voice_id}")
async def get_voice(voice_id: str, user: Reader) -> dict[str, Any]:
    return await _one_voice(voice_id, user)


# Reports are files this app writes (evaluation) or renders from uploads (QC): never let them run script here.
REPORT_CSP = ("default-src 'self'; script-src 'none'; object-src 'none'; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data:; media-src 'self'; frame-ancestors 'self'")


def _version_tags(voice_id: str, version: str) -> Any:
    from voice_lib.release.registry import RegistryError

    voice_id = _valid_voice(voice_id)
    if not version.isdigit():
        raise ApiError(422, f"voice {voice_id}: version {version!r} is not a version number.", voice_id)
    try:
        return _registry().version(f"voice-{voice_id}", version)
    except RegistryError as exc:
        if "has no version" in str(exc) or "is not registered" in str(exc):
            raise ApiError(404, str(exc), voice_id) from None
        raise _registry_error(exc, voice_id, None) from None


def _file_response(data: bytes | Path, name: str) -> Response:
    import mimetypes

    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if media == "text/html":
        headers["Content-Security-Policy"] = REPORT_CSP
    if isinstance(data, Path):
        return FileResponse(data, media_type=media, headers=headers)
    return Response(data, media_type=media, headers=headers)


@app.get("/api/voices/{voice_id}/versions/{version}/report/{path:path}")
async def eval_report_file(voice_id: str, version: str, path: str, user: Reader) -> Response:
    """A file of the version's evaluation report (its MLflow run's eval_report/), e.g. report.html or the listening
    samples listen/0.wav."""
    from voiceops_release.reports import ReportNotFound

    def read() -> Path:
        mv = _version_tags(voice_id, version)
        try:
            return _artifacts().file(mv.run_id, path)
        except ReportNotFound as exc:
            raise ApiError(404, f"voice {voice_id} version {version}: {exc}", voice_id,
                           "versions evaluated before the listening samples existed have none.") from None

    return _file_response(await asyncio.to_thread(read), path)


@app.get("/api/voices/{voice_id}/versions/{version}/qc/{path:path}")
async def qc_report_file(voice_id: str, version: str, path: str, user: Reader) -> Response:
    """A file of the QC report of the data the version was trained on (the artifact store)."""
    from voiceops_release.reports import ReportNotFound, qc_file

    def read() -> bytes:
        mv = _version_tags(voice_id, version)
        try:
            return qc_file(_settings(), voice_id, dict(mv.tags), path)
        except ReportNotFound as exc:
            raise ApiError(404, f"voice {voice_id} version {version}: {exc}", voice_id) from None

    return _file_response(await asyncio.to_thread(read), path)


async def _act(voice_id: str, action: str, user: BaseUser, **kwargs: Any) -> dict[str, Any]:
    from voice_lib.release.registry import RegistryError

    voice_id = _valid_voice(voice_id)
    who = user.get_name()

    def run() -> str:
        registry = _registry()
        if not registry.exists(registry.model_name(voice_id)):
            raise ApiError(404, f"cannot {action} voice {voice_id}: model voice-{voice_id} is not registered in MLflow "
                                f"at {registry.display_uri}.", voice_id, "onboard it first (voice_onboarding), or check the id.")
        approvals = _approvals(user) if action in ("promote", "rollback") else None
        message = perform(registry, _history(), voice_id, action, actor=who, approvals=approvals, **kwargs)
        log.warning("release page: %s by %s: %s%s", action, who, message,
                    f" (reason: {kwargs['reason']})" if kwargs.get("reason") else "")
        return message

    try:
        message = await asyncio.to_thread(run)
    except RegistryError as exc:
        log.warning("release page: %s of voice-%s by %s refused: %s", action, voice_id, who, exc)
        raise _registry_error(exc, voice_id, action) from None
    return {"ok": True, "action": action, "voice_id": voice_id, "by": who, "message": message,
            "voice": await _one_voice(voice_id, user)}


@app.post("/api/voices/{voice_id}/promote")
async def promote(voice_id: str, user: Writer, body: PromoteBody | None = None) -> dict[str, Any]:
    """Make the canary (else the candidate, or body.version) production; the old production becomes previous.
    A rollout held for approval is approved instead (canary_promotion's `approve` task): it goes on to 100 %."""
    version = (body.version or "").strip() if body else ""
    if version and not version.isdigit():
        raise ApiError(422, f"cannot promote voice {voice_id}: version {version!r} is not a version number.", voice_id)
    force, reason = (body.force, body.reason.strip()) if body else (False, "")
    return await _act(voice_id, "promote", user, version=version or None, force=force, reason=reason or None)


@app.post("/api/voices/{voice_id}/pause")
async def pause(voice_id: str, user: Writer) -> dict[str, Any]:
    """Freeze the canary at its current weight (canary_promotion stops advancing it)."""
    return await _act(voice_id, "pause", user)


@app.post("/api/voices/{voice_id}/resume")
async def resume(voice_id: str, user: Writer) -> dict[str, Any]:
    """Continue a paused canary."""
    return await _act(voice_id, "resume", user)


@app.post("/api/voices/{voice_id}/rollback")
async def rollback(voice_id: str, body: RollbackBody, user: Writer) -> dict[str, Any]:
    """Take the canary out of traffic (or move production back to previous); the reason is recorded."""
    reason = body.reason.strip()
    if not reason:
        raise ApiError(422, f"cannot roll back voice {voice_id} without a reason: send {{\"reason\": \"...\"}}; "
                            "it is recorded on the rolled-back version.", voice_id)
    return await _act(voice_id, "rollback", user, reason=reason, expected_canary=body.expected_canary)
