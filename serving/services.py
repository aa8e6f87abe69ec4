"""What one server app owns (pool, batcher, breaker, audit, tenants, metrics, settings) and the request
dependencies over it: ``services`` itself, ``tenant`` (authentication and rate limit) and ``admin``.

Several apps may share a process (tests), so nothing here is global: the app holds its ``Services`` in
``app.state.services`` and every router reaches it through ``Depends(services)``.
"""

from __future__ import annotations

import math
import threading
import time

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.admission import Admission
from serving.audit import AuditLog
from serving.batcher import MicroBatcher
from serving.breaker import CanaryBreaker
from serving.metrics import ServerMetrics
from serving.pool import VoicePool
from serving.routing import effective_weight
from serving.snapshot import Snapshot
from serving.synthesis import ServingError, Synthesis
from serving.tenants import RateLimiter, Tenant, TenantDirectory
from voice_lib.core.config import Settings
from voice_lib.core.storage import StorageError, artifact_store
from voice_lib.data.text import Lexicon, LexiconError, load_lexicon
from voice_lib.data.text.lexicon import lexicon_prefix
from voice_lib.release.registry import Registry

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer vo_...`")


class LexiconCache:
    """The latest lexicon of each tenant and voice (artifact store, voice_lib.data.text.lexicon), re-read at most
    every ``ttl`` seconds, so a new lexicon version applies within a poll without a store read per request."""

    def __init__(self, settings: Settings, ttl: float) -> None:
        self.settings, self.ttl = settings, ttl
        self._cache: dict[str, tuple[float, Lexicon | None]] = {}
        self._lock = threading.Lock()

    def _latest(self, prefix: str) -> Lexicon | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(prefix)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            found = load_lexicon(artifact_store(self.settings), prefix)
        except (StorageError, LexiconError):
            found = None  # a store outage or a bad file must not fail synthesis: no lexicon until it is readable
        lexicon = found[1] if found else None
        with self._lock:
            self._cache[prefix] = (now, lexicon)
        return lexicon

    def for_voice(self, tenant: str, voice_id: str) -> Lexicon | None:
        """The tenant's lexicon with the voice's entries winning; None when neither has one."""
        try:
            tenant_lex = self._latest(lexicon_prefix(tenant=tenant.lower()))
        except LexiconError:
            tenant_lex = None  # a tenant name that is not a storage scope has no lexicon
        try:
            voice_lex = self._latest(lexicon_prefix(voice_id=voice_id))
        except LexiconError:
            return tenant_lex
        if tenant_lex is None:
            return voice_lex
        return tenant_lex.merged(voice_lex)


class Services:
    """Everything one app instance owns."""

    def __init__(self, settings: Settings, pool: VoicePool | None) -> None:
        s = settings.serving
        self.settings = settings
        self.metrics = ServerMetrics()
        self.breaker = CanaryBreaker(s, Registry(settings), self.metrics)
        self.pool = pool or VoicePool(settings, breaker=self.breaker)
        if self.pool.breaker is None:
            self.pool.breaker = self.breaker
        self.pool.listeners.append(self._on_swap)
        self.batcher = MicroBatcher(self.pool.predict_batch, self.pool.vocoder, s.batch_max_size, s.batch_max_wait_ms,
                                    on_batch=self.metrics.batch_size.observe)
        self.audit = AuditLog.from_settings(settings)  # with serving.audit_retention_days
        self.metrics.attach_audit(self.audit)
        self.synthesis = Synthesis(self.batcher, self.breaker, self.audit, self.metrics, s.request_timeout_seconds)
        self.tenants = TenantDirectory(settings.resolved_tenants_file)
        self.limiter = RateLimiter(burst_seconds=s.rate_limit_burst_seconds)
        self.admission = Admission(s.max_queued_audio_seconds, s.max_concurrent_per_tenant, s.max_tenant_queue_share)
        self.lexicons = LexiconCache(settings, ttl=s.poll_seconds)
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


def services(request: Request) -> Services:
    return request.app.state.services


def tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
           svc: Services = Depends(services)) -> Tenant:
    """The caller's tenant from its bearer key (401 without a valid one), within its rate limit (429)."""
    key = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
    found = svc.tenants.authenticate(key)
    if found is None:
        raise ServingError(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
    request.state.tenant, request.state.api_key = found.tenant, key
    rate = found.rate_per_minute or svc.settings.serving.rate_limit_per_minute
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
