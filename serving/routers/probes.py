"""Unauthenticated probes: ``/livez``, ``/readyz``, ``/version``, ``/metrics``.

Readiness: ``/readyz`` is 503 ``{"status": "degraded"}`` only while no voice is loaded. When voices are
loaded but the last reload failed (registry or artifact store down), it stays 200 with ``"degraded": true``
and the kind of error: the server keeps serving its last good set, and taking every replica out of the load
balancer because MLflow blinked would turn a registry outage into a full one. /readyz never names voices
or quotes the error; /v1/admin/status has the detail.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from serving.services import Services, services
from voice_lib import __version__

router = APIRouter()


@router.get("/livez", tags=["probes"])
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["probes"], responses={
    503: {"description": "No voice is loaded yet (same body as 200)", "content": {"application/json": {}}}})
async def readyz(svc: Services = Depends(services)) -> JSONResponse:
    pool = svc.pool
    body = {"status": "ready" if pool.ready else "degraded", "degraded": pool.degraded or not pool.ready,
            "voices": len(pool.snapshot.voices), "error": public_reload_error(pool.last_error),
            "last_reload_at": pool.last_success_at}
    if not pool.ready and body["error"] is None:
        body["error"] = "no voice with a loaded production version yet"
    return JSONResponse(body, status_code=200 if pool.ready else 503)


@router.get("/version", tags=["probes"])
async def version(svc: Services = Depends(services)) -> dict[str, Any]:
    import torch

    return {"name": "voiceops-server", "version": __version__, "torch": torch.__version__,
            "generation": svc.pool.snapshot.generation}


@router.get("/metrics", tags=["probes"], response_class=Response, responses={
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}})
async def metrics(svc: Services = Depends(services)) -> Response:
    from voice_lib.data.text import frontend_cache_info

    svc.metrics.frontend_cache_hit_ratio.set(frontend_cache_info()["hit_rate"])
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)


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
