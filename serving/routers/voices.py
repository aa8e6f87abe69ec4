"""Voices over HTTP: ``GET /v1/voices``, ``POST /v1/voices``, ``GET /v1/voices/{id}``, ``DELETE /v1/voices/{id}``.

- POST (multipart: ``files`` = a zip or audio files, optional ``transcript`` and ``lexicon`` files, ``voice_id``,
  ``language``, ``description``): validated as onboarding's ingest validates (voice_lib.data.uploads, the same
  limits and hostile-input rules), stored under the intake prefix with ``_READY``, so voice_intake starts
  voice_onboarding; answers 202 with the status URL. The key must be allowed the voice id (its ``voices`` list
  or ``*``), and a voice another tenant uploaded is a 404, as for synthesis.
- GET /v1/voices/{id}: voice_lib.release.voices.voice_status (the onboarding run's state; once registered, the
  versions, aliases, gate metrics and the QC/evaluation report links).
- DELETE (admin, or the tenant that uploaded it): archives the registry entry (every alias dropped, so servers
  stop routing it on their next poll; versions and audit rows stay) and clears a pending upload.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse

from serving.schemas import error_responses
from serving.services import Services, services, tenant
from serving.synthesis import ServingError
from serving.tenants import Tenant
from voice_lib.core.config import validate_voice_id
from voice_lib.core.storage import artifact_store, open_store
from voice_lib.data.staging import IngestError
from voice_lib.data.text import Lexicon, LexiconError, save_lexicon
from voice_lib.data.text.lexicon import lexicon_prefix
from voice_lib.data.uploads import accept_upload, read_manifest
from voice_lib.release.registry import RegistryError
from voice_lib.release.voices import voice_owner, voice_status

router = APIRouter()
_COPY_CHUNK = 1 << 20


def _valid(voice_id: str) -> bool:
    try:
        validate_voice_id(voice_id)
    except ValueError:
        return False
    return True


def _visible(svc: Services, t: Tenant, voice_id: str) -> bool:
    """A key sees a voice it may use that no other tenant uploaded (admins see every voice)."""
    if not _valid(voice_id):
        return False  # no such voice can exist; never a storage key
    owner = voice_owner(svc.settings, voice_id)
    return t.admin or (t.may_use(voice_id) and owner in (None, t.tenant))


def _not_found(voice_id: str) -> ServingError:
    return ServingError(404, "voice_not_found", f"voice {voice_id[:64]!r} not found")


@router.get("/v1/voices", tags=["voices"], responses=error_responses(401, 429))
async def list_voices(t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> dict[str, Any]:
    """The voices this key may use (and only those): language, description, the serving version."""
    snap = svc.pool.snapshot
    found = []
    for r in sorted(snap.voices.values(), key=lambda r: r.voice_id):
        if not t.may_use(r.voice_id):
            continue
        manifest = await asyncio.to_thread(_manifest, svc, r.voice_id)
        found.append({"voice_id": r.voice_id, "version": r.production.version,
                      "sample_rate": snap.bases[r.production.base_sha256].feature_config.sample_rate,
                      "language": manifest.get("language"), "description": manifest.get("description", "")})
    return {"voices": found}


def _manifest(svc: Services, voice_id: str) -> dict[str, Any]:
    return read_manifest(svc.settings, voice_id) or {}


def _save(upload: UploadFile, folder: Path, budget: list[int]) -> Path:
    """Copy one uploaded file to ``folder`` with a hard cap on the whole upload (the multipart sizes can lie)."""
    path = folder / f"part-{len(list(folder.iterdir()))}"
    with path.open("wb") as out:
        while chunk := upload.file.read(_COPY_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise IngestError("the upload exceeds the upload limit (VOICEOPS_LIMITS__MAX_UPLOAD_BYTES); "
                                  "compress the audio (FLAC) or upload fewer minutes.")
            out.write(chunk)
    return path


def _accept(svc: Services, t: Tenant, uploads: list[UploadFile], voice_id: str, language: str, description: str,
            lexicon: UploadFile | None) -> dict[str, Any]:
    settings = svc.settings
    with tempfile.TemporaryDirectory(prefix="voiceops-http-upload-") as scratch:
        folder = Path(scratch)
        budget = [settings.limits.max_upload_bytes]
        parts = [(u.filename or "upload", _save(u, folder, budget)) for u in uploads]
        parsed = Lexicon.from_json(lexicon.file.read(1_048_577)) if lexicon is not None else None
        receipt = accept_upload(parts, voice_id, language, settings, tenant=t.tenant, description=description)
    lexicon_version = None
    if parsed is not None and len(parsed):
        lexicon_version = save_lexicon(artifact_store(settings), lexicon_prefix(voice_id=voice_id), parsed)
    return {"voice_id": voice_id, "state": "queued", "status_url": f"/v1/voices/{voice_id}",
            "files": receipt.files, "skipped": receipt.skipped, "data_sha256": receipt.data_sha256,
            "lexicon_version": lexicon_version}


@router.post("/v1/voices", status_code=202, tags=["voices"],
             responses=error_responses(401, 404, 413, 422, 429))
async def create_voice(files: list[UploadFile] = File(..., description="A zip, or audio files (wav, flac, mp3, "
                                                                         "ogg) and a transcript (metadata.csv)"),
                       voice_id: str = Form(..., description="[a-z0-9][a-z0-9-]{1,62}"),
                       language: str = Form("en", description="en, zh or auto"),
                       description: str = Form("", max_length=500),
                       transcript: UploadFile | None = File(None, description="metadata.csv (file|text lines)"),
                       lexicon: UploadFile | None = File(None, description="pronunciation lexicon JSON "
                                                                            "(docs/text.md#pronunciation)"),
                       t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> JSONResponse:
    """Upload a voice's recordings; onboarding starts from the intake prefix (202 + status URL)."""
    if not _valid(voice_id):
        try:
            validate_voice_id(voice_id)
        except ValueError as exc:
            raise ServingError(422, "invalid_upload", f"voice_id: {exc}") from None
    if not t.may_use(voice_id) or voice_owner(svc.settings, voice_id) not in (None, t.tenant):
        raise _not_found(voice_id)  # the same answer as for another tenant's voice: keys cannot probe ids
    uploads = [*files, *([transcript] if transcript is not None else [])]
    try:
        body = await asyncio.to_thread(_accept, svc, t, uploads, voice_id, language, description, lexicon)
    except (IngestError, LexiconError) as exc:
        raise ServingError(422, "invalid_upload", str(exc)) from None
    return JSONResponse(body, status_code=202, headers={"Location": body["status_url"]})


@router.get("/v1/voices/{voice_id}", tags=["voices"], responses=error_responses(401, 404, 429, 503))
async def get_voice(voice_id: str, t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> dict[str, Any]:
    """Onboarding state, versions, aliases, gate metrics and report links of one voice."""
    if not _visible(svc, t, voice_id):
        raise _not_found(voice_id)
    try:
        status = await asyncio.to_thread(voice_status, svc.settings, svc.breaker.registry, voice_id)
    except RegistryError as exc:
        raise ServingError(503, "registry_unavailable", f"the registry cannot be read now: {exc}",
                           {"Retry-After": "10"}) from None
    if status is None:
        raise _not_found(voice_id)
    return status


@router.delete("/v1/voices/{voice_id}", tags=["voices"], responses=error_responses(401, 404, 429, 503))
async def delete_voice(voice_id: str, t: Tenant = Depends(tenant), svc: Services = Depends(services)) -> dict[str, Any]:
    """Take the voice out of serving and archive its registry entry (admin, or the tenant that uploaded it)."""
    if not _valid(voice_id):
        raise _not_found(voice_id)
    owner = voice_owner(svc.settings, voice_id)
    if not (t.admin or (owner == t.tenant and t.may_use(voice_id))):
        raise _not_found(voice_id)
    return await asyncio.to_thread(_archive, svc, t, voice_id)


def _archive(svc: Services, t: Tenant, voice_id: str) -> dict[str, Any]:
    registry = svc.breaker.registry
    name = registry.model_name(voice_id)
    try:
        exists = registry.exists(name)
        held = registry.archive(name, f"deleted over DELETE /v1/voices by tenant {t.tenant}") if exists else {}
    except RegistryError as exc:
        raise ServingError(503, "registry_unavailable", f"the registry cannot be written now: {exc}",
                           {"Retry-After": "10"}) from None
    intake = open_store(svc.settings.resolved_intake_uri, svc.settings)
    pending = intake.delete_prefix(f"{voice_id}/")  # an upload still waiting for voice_intake goes too
    if not exists and not pending:
        raise _not_found(voice_id)
    svc.pool.request_reload()  # stop routing it now, not at the next poll
    return {"voice_id": voice_id, "archived": exists, "aliases_removed": held, "pending_upload_removed": bool(pending)}

