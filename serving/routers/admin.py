"""Admin routes (admin API key): ``GET /v1/admin/status``, ``POST /v1/admin/reload``; and the MLflow registry
webhook ``POST /v1/webhooks/mlflow`` (MLflow's HMAC signature instead of a key), which schedules a reload."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request

from serving.routing import effective_weight
from serving.schemas import ErrorResponse, error_responses
from serving.services import Services, admin, services
from serving.synthesis import ServingError
from serving.tenants import Tenant

router = APIRouter()
WEBHOOK_TOLERANCE_S = 300  # MLflow's documented replay window for X-MLflow-Timestamp
# Unix seconds have 10 digits until the year 2286: a longer "timestamp" is not one (and int() raises past
# 4,300 digits, which was a 500).
MAX_TIMESTAMP_DIGITS = 12
# The webhook reads its headers and raw body itself (the signature covers the exact bytes); documented here.
WEBHOOK_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
                   for name, text in (("X-MLflow-Signature", "v1,<base64 HMAC-SHA256 of delivery_id.timestamp.body>"),
                                      ("X-MLflow-Delivery-Id", "Unique per delivery; repeats are acknowledged once"),
                                      ("X-MLflow-Timestamp", "Unix seconds; at most 300 s from the server's clock"))],
    "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
}
WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "X-MLflow-Timestamp is not Unix seconds (too many digits)"},
    401: {"model": ErrorResponse, "description": "Missing, stale or wrong X-MLflow-Signature"},
    404: {"model": ErrorResponse, "description": "Webhooks are disabled (no serving.webhook_secret)"},
    413: {"model": ErrorResponse, "description": "Request body too large"}}


@router.get("/v1/admin/status", tags=["admin"], responses=error_responses(401, 403, 429))
async def admin_status(_: Tenant = Depends(admin), svc: Services = Depends(services)) -> dict[str, Any]:
    """Loaded versions, weights, breaker state and reasons per voice."""
    return status_report(svc)


@router.post("/v1/admin/reload", tags=["admin"], responses=error_responses(401, 403, 429))
async def admin_reload(_: Tenant = Depends(admin), svc: Services = Depends(services)) -> dict[str, Any]:
    """Reload from the registry now and return what changed."""
    return await asyncio.to_thread(svc.pool.reload)


@router.post("/v1/webhooks/mlflow", status_code=202, tags=["admin"], responses=WEBHOOK_RESPONSES,
             openapi_extra=WEBHOOK_OPENAPI)
async def mlflow_webhook(request: Request, svc: Services = Depends(services)) -> dict[str, Any]:
    """MLflow registry webhook: verified with X-MLflow-Signature (v1 HMAC-SHA256), then an immediate reload."""
    secret = svc.settings.serving.webhook_secret
    if secret is None:
        raise ServingError(404, "webhooks_disabled", "webhooks are disabled: set VOICEOPS_SERVING__WEBHOOK_SECRET")
    timestamp = request.headers.get("x-mlflow-timestamp") or ""
    if len(timestamp) > MAX_TIMESTAMP_DIGITS:
        raise ServingError(400, "invalid_timestamp", f"X-MLflow-Timestamp has {len(timestamp)} characters; it must "
                                                     f"be Unix seconds (at most {MAX_TIMESTAMP_DIGITS} digits)")
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
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses (that was a 500, not a 401);
    # the length bound keeps int() from raising on thousands of digits (the route answers those 400 first).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= MAX_TIMESTAMP_DIGITS) or abs(time.time() - int(timestamp)) > WEBHOOK_TOLERANCE_S:
        return f"X-MLflow-Timestamp is missing or more than {WEBHOOK_TOLERANCE_S} s away from now (replay?)"
    digest = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    return None if hmac.compare_digest(expected.encode(), signature.encode()) else "signature does not match"


def status_report(svc: Services) -> dict[str, Any]:
    """/v1/admin/status: the snapshot, reload health, batcher and audit counters, and per voice its release."""
    pool, snap = svc.pool, svc.pool.snapshot
    voices: dict[str, Any] = {}
    for voice_id, r in sorted(snap.voices.items()):
        canary_open = r.canary is not None and svc.breaker.is_open(voice_id, r.canary.version)
        voices[voice_id] = {
            "production": {"version": r.production.version, "loaded_at": r.production.loaded_at,
                           "warmup": dict(r.production.warmup), "backend": r.production.backend},
            "canary": None if r.canary is None else {
                "version": r.canary.version, "loaded_at": r.canary.loaded_at, "warmup": dict(r.canary.warmup),
                "backend": r.canary.backend, "breaker": svc.breaker.state(voice_id, r.canary.version)},
            "canary_weight": r.canary_weight, "effective_canary_weight": effective_weight(r, canary_open),
            "release_state": r.release_state, "notes": list(r.notes)}
    return {"generation": snap.generation, "snapshot_at": snap.created_at, "ready": pool.ready,
            "degraded": pool.degraded, "last_error": pool.last_error, "last_attempt_at": pool.last_attempt_at,
            "last_success_at": pool.last_success_at, "adapters_loaded": len(snap.versions),
            "last_load_timings": dict(pool.last_load_timings),
            "bases": [{"sha256": b.sha256, "source": getattr(b, "source", ""), "backend": b.name}
                      for b in snap.bases.values()],
            "batcher": {"batches": svc.batcher.batches, "items": svc.batcher.items, "max_batch": svc.batcher.max_seen,
                        "pending": svc.batcher.pending, "in_flight_batches": svc.batcher.in_flight,
                        "rendering": svc.batcher.rendering, "torch_threads": torch.get_num_threads()},
            "audit": {"written": svc.audit.written, "dropped": svc.audit.dropped, "pending": svc.audit.pending},
            "voices": voices}
