"""Staged canary promotion: analysis of canary vs production, and the rollout state machine.

``advance_rollout`` is called again and again (by the canary_promotion DAG's rescheduling sensor, so
no worker is held while a step's window runs). Each call reads the rollout's state from the registry,
does at most one thing (wait, extend, advance, pause, promote or roll back) and records every
decision in the release history table and as MLflow tags. Because all state lives in the registry,
a call can be repeated or a new DAG run can take over at any time. With manual approval the rollout
stops before its last (100 %) step with ``awaiting_approval``: the DAG then asks a human in an Airflow
Human-in-the-loop task (voice_lib/release/approvals.py) and calls on with ``approved=True``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import httpx
import sqlalchemy as sa

from voice_lib.core.config import ReleaseSettings, Settings, validate_voice_id
from voice_lib.core.db import make_engine

log = logging.getLogger(__name__)
CheckStatus = Literal["pass", "fail", "inconclusive", "skipped"]
# "manual": a human's action (voice_lib/release/actions.py), recorded beside the rollout's decisions.
Outcome = Literal["waiting", "extended", "advanced", "paused", "awaiting_approval", "promoted", "rolled_back", "blackout",
                  "manual"]
DONE = ("promoted", "rolled_back", "paused")

metadata = sa.MetaData()
release_history = sa.Table(
    "release_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("voice_id", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("weight", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("checks", sa.Text, nullable=False),  # JSON list of CheckResult
    sa.Column("detail", sa.Text, nullable=False),
)


@dataclass
class CheckResult:
    name: str
    status: CheckStatus
    value: float | None
    threshold: float | None
    detail: str


@dataclass
class WindowStats:
    requests: int
    errors: int
    # p95 synthesis compute time of the successful requests, queue wait excluded (the audit table's compute_ms,
    # Prometheus' voiceops_synthesis_seconds): the server's breaker judges the same. Never wall time: a flood by
    # another tenant makes every variant wait, and that is no property of the canary.
    p95_latency_ms: float | None
    rtf: float | None = None
    bad_audio: int | None = None
    p95_missing: str | None = None  # why p95_latency_ms is None although requests were timed (older servers)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class MetricsSource(Protocol):
    def window(self, voice_id: str, variant: str, since: float, until: float) -> WindowStats: ...


@dataclass
class Decision:
    voice_id: str
    version: str
    step: int
    weight: int
    outcome: Outcome
    checks: list[CheckResult] = field(default_factory=list)
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.outcome in DONE

    @property
    def held(self) -> bool:
        """Done for now: the rollout waits for a human's approval before its last step."""
        return self.done or self.outcome == "awaiting_approval"


def validate_steps(steps: list[int]) -> list[int]:
    """Percent steps must rise to 100 and never more than double (the first step at most 50)."""
    if not steps or steps[-1] != 100:
        raise ValueError(f"steps {steps}: must end at 100.")
    prev = None
    for s in steps:
        if not 0 < s <= 100 or (prev is not None and (s <= prev or s > 2 * prev)) or (prev is None and s > 50):
            raise ValueError(f"steps {steps}: each step must be 1-100, rise, and at most double the previous "
                             "(first step at most 50).")
        prev = s
    return steps


# --- metrics sources ------------------------------------------------------------------------------

class AuditSource:
    """Requests, errors, p95 compute time and median real-time factor from the server's audit table.

    Computed in the database (counts, then one ordered row per percentile), so a two-hour window of a busy
    voice is not pulled into memory. Client errors (401/404/422/429) count as requests but are neither
    errors of the version nor timings of a synthesis; percentiles are nearest-rank over status < 400."""

    def __init__(self, url: str):
        self.engine = make_engine(url)

    def window(self, voice_id: str, variant: str, since: float, until: float) -> WindowStats:
        try:
            table = sa.Table("audit_log", sa.MetaData(), autoload_with=self.engine)
        except sa.exc.NoSuchTableError:  # the server has not served a single request yet
            return WindowStats(0, 0, None)
        c = table.c
        window = [c.voice_id == voice_id, c.variant == variant,
                  c.ts >= datetime.fromtimestamp(since, timezone.utc), c.ts <= datetime.fromtimestamp(until, timezone.utc)]
        with self.engine.connect() as conn:
            requests = conn.execute(sa.select(sa.func.count()).where(*window)).scalar_one()
            errors = conn.execute(sa.select(sa.func.count()).where(*window, c.status >= 500)).scalar_one()
            ok = [*window, c.status < 400]
            p95, missing = _compute_p95(conn, c, ok)
            # A table written by a server older than the rtf column has none: no RTF check until it upgrades.
            rtf = _percentile(conn, c.rtf, ok, 0.5) if "rtf" in c else None
        return WindowStats(int(requests), int(errors), p95, rtf, p95_missing=missing)


def _compute_p95(conn: sa.Connection, c: Any, ok: list) -> tuple[float | None, str | None]:
    """p95 of compute_ms over the successful rows, and why there is none although some succeeded: a table, or
    rows, written by a server older than the column (latency_ms, wall time with the queue in it, is no stand-in)."""
    if "compute_ms" not in c:
        return None, "the audit table has no compute_ms column yet (servers older than it write it)"
    p95 = _percentile(conn, c.compute_ms, ok, 0.95)
    if p95 is None and conn.execute(sa.select(sa.func.count()).where(*ok)).scalar_one():
        return None, "the successful requests in the window have no compute time (written by an older server)"
    return p95, None


def _percentile(conn: sa.Connection, column: sa.Column, where: list, fraction: float) -> float | None:
    """Nearest-rank percentile of the non-null values of ``column`` in the rows matching ``where``."""
    where = [*where, column.is_not(None)]
    n = conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one()
    if not n:
        return None
    rank = math.ceil(fraction * n) - 1
    return float(conn.execute(sa.select(column).where(*where).order_by(column).offset(rank).limit(1)).scalar_one())


class PrometheusSource:
    """The same numbers from Prometheus' HTTP API (the production shape: several replicas)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _scalar(self, query: str, at: float) -> float | None:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": query, "time": at}, timeout=10)
        resp.raise_for_status()
        result = resp.json()["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value  # NaN: no samples in the window

    def window(self, voice_id: str, variant: str, since: float, until: float) -> WindowStats:
        rng = f"{max(1, int(until - since))}s"
        sel = f'voice="{voice_id}",variant="{variant}"'
        requests = self._scalar(f"sum(increase(voiceops_requests_total{{{sel}}}[{rng}]))", until) or 0.0
        errors = self._scalar(f'sum(increase(voiceops_requests_total{{{sel},status=~"5.."}}[{rng}]))', until) or 0.0
        p95 = self._scalar(f"histogram_quantile(0.95, sum by (le) (rate(voiceops_synthesis_seconds_bucket{{{sel}}}[{rng}])))", until)
        rtf = self._scalar(f"sum(rate(voiceops_rtf_sum{{{sel}}}[{rng}])) / sum(rate(voiceops_rtf_count{{{sel}}}[{rng}]))", until)
        bad = self._scalar(f"sum(increase(voiceops_bad_audio_total{{{sel}}}[{rng}]))", until)
        missing = "no voiceops_synthesis_seconds samples in the window (servers older than it)" if p95 is None else None
        return WindowStats(round(requests), round(errors), None if p95 is None else p95 * 1000, rtf,
                           None if bad is None else round(bad), p95_missing=missing)


def metrics_source(settings: Settings) -> MetricsSource:
    if settings.release.prometheus_url:
        return PrometheusSource(settings.release.prometheus_url)
    return AuditSource(settings.resolved_audit_url)


# --- analysis -------------------------------------------------------------------------------------

# The order the checks are shown in (the release page, reports): the analyze() checks, then the probe's.
CHECK_ORDER = ("requests", "error_rate", "p95_latency_ms", "rtf", "rtf_ratio", "bad_audio_rate", "probe_wer",
               "probe_similarity", "probe_p808", "quality_probe")


def check_limits(cfg: ReleaseSettings) -> dict[str, dict[str, Any]]:
    """The limit each check of :func:`analyze` and :func:`quality_probe` applies, by check name: the threshold
    from ``cfg`` (None where it depends on the version's registered evaluation), the comparison and the unit.

    The release page shows this table; tests/test_release.py checks that analyze() applies these thresholds.
    """
    return {
        "requests": {"threshold": cfg.min_requests, "op": ">=", "unit": "requests",
                     "note": "fewer is inconclusive: the window is extended"},
        "error_rate": {"threshold": cfg.max_error_rate, "op": "<=", "unit": "ratio"},
        "p95_latency_ms": {"threshold": cfg.max_p95_ms, "op": "<=", "unit": "ms",
                           "note": "synthesis compute time, queue wait excluded"},
        "rtf": {"threshold": cfg.max_rtf, "op": "<=", "unit": "ratio"},
        "rtf_ratio": {"threshold": cfg.max_rtf_ratio, "op": "<=", "unit": "x production",
                      "note": "canary real-time factor over production's in the same window"},
        "bad_audio_rate": {"threshold": cfg.max_bad_audio_rate, "op": "<=", "unit": "ratio"},
        "probe_wer": {"threshold": None, "op": "<=", "unit": "ratio",
                      "note": f"registered WER + {cfg.probe_wer_margin:g}"},
        "probe_similarity": {"threshold": None, "op": ">=", "unit": "ratio",
                             "note": f"registered similarity - {cfg.probe_similarity_margin:g}"},
        "probe_p808": {"threshold": None, "op": ">=", "unit": "MOS",
                       "note": f"DNSMOS P.808 of production on the same texts - {cfg.probe_p808_margin:g}"},
    }


def analyze(canary: WindowStats, production: WindowStats, cfg: ReleaseSettings, probe: list[CheckResult] | None = None) -> list[CheckResult]:
    """Canary vs thresholds and vs production over the same window (Argo-style pass/fail/inconclusive)."""
    if canary.requests < cfg.min_requests:
        return [CheckResult("requests", "inconclusive", canary.requests, cfg.min_requests,
                            f"only {canary.requests} canary requests in the window (need {cfg.min_requests})")]
    checks = [CheckResult("requests", "pass", canary.requests, cfg.min_requests, f"{canary.requests} canary requests")]
    rate = canary.error_rate
    checks.append(CheckResult("error_rate", "pass" if rate <= cfg.max_error_rate else "fail", rate, cfg.max_error_rate,
                              f"canary error rate {rate:.2%} (limit {cfg.max_error_rate:.2%})"))
    if canary.p95_latency_ms is None and canary.p95_missing:  # older servers: judged once they record it
        checks.append(CheckResult("p95_latency_ms", "skipped", None, cfg.max_p95_ms,
                                  f"no compute time to judge: {canary.p95_missing}"))
    elif canary.p95_latency_ms is None:
        checks.append(CheckResult("p95_latency_ms", "fail", None, cfg.max_p95_ms, "no successful canary request to time"))
    else:
        ok = canary.p95_latency_ms <= cfg.max_p95_ms
        checks.append(CheckResult("p95_latency_ms", "pass" if ok else "fail", canary.p95_latency_ms, cfg.max_p95_ms,
                                  f"canary p95 compute time {canary.p95_latency_ms:.0f} ms, queue wait excluded "
                                  f"(limit {cfg.max_p95_ms:.0f} ms)"))
    if canary.rtf is not None:
        checks.append(CheckResult("rtf", "pass" if canary.rtf <= cfg.max_rtf else "fail", canary.rtf, cfg.max_rtf,
                                  f"canary RTF {canary.rtf:.3f} (limit {cfg.max_rtf:g})"))
        # Speed relative to production per second of audio, not per request: a canary that speaks the
        # same texts longer takes longer per request without being slower (and at the tens of ms a
        # short text takes, a p95 ratio between two variants is mostly scheduling noise).
        if production.rtf and production.requests >= cfg.min_requests:
            limit = cfg.max_rtf_ratio * production.rtf
            checks.append(CheckResult("rtf_ratio", "pass" if canary.rtf <= limit else "fail", canary.rtf / production.rtf,
                                      cfg.max_rtf_ratio, f"canary RTF {canary.rtf:.3f} is x{canary.rtf / production.rtf:.2f} "
                                      f"production's {production.rtf:.3f} (limit x{cfg.max_rtf_ratio:g})"))
        else:  # at 100 % production serves (almost) nobody: nothing to compare with, the absolute limit holds
            why = (f"only {production.requests} production requests in the window to compare with (need {cfg.min_requests})"
                   if production.requests < cfg.min_requests else "no production real-time factor in the window")
            checks.append(CheckResult("rtf_ratio", "skipped", None, cfg.max_rtf_ratio, why))
    if canary.bad_audio is not None:
        bad_rate = canary.bad_audio / canary.requests
        checks.append(CheckResult("bad_audio_rate", "pass" if bad_rate <= cfg.max_bad_audio_rate else "fail", bad_rate,
                                  cfg.max_bad_audio_rate, f"silent or clipped outputs {bad_rate:.2%}"))
    return checks + list(probe or [])


@dataclass
class ProbeAudio:
    """What one variant said for the probe texts (16 kHz), or why it could not be heard."""

    variant: str
    clips: list = field(default_factory=list)  # np.ndarray per text
    version: str | None = None
    error: str | None = None


def _probe_variant(settings: Settings, voice_id: str, texts: list[str], variant: str) -> ProbeAudio:
    """Synthesise ``texts`` through the server with the variant forced (a probe key may force it)."""
    from voice_lib.data.audio import decode_audio

    cfg = settings.release
    headers = {"Authorization": f"Bearer {cfg.probe_api_key.get_secret_value()}", "X-Voice-Variant": variant}
    heard = ProbeAudio(variant)
    with httpx.Client(base_url=cfg.server_url, headers=headers, timeout=60) as client:
        for text in texts:
            resp = client.post("/v1/tts", json={"text": text, "voice_id": voice_id, "format": "wav"})
            if resp.status_code != 200:
                heard.error = f"{variant} probe request failed: {resp.status_code} {resp.text[:200]}"
                return heard
            if resp.headers.get("X-Voice-Variant", variant) != variant:  # a forced canary the server refuses serves production
                heard.error = f"the server answered the {variant} probe with {resp.headers.get('X-Voice-Variant')}"
                return heard
            heard.version = resp.headers.get("X-Voice-Version", heard.version)
            heard.clips.append(decode_audio(resp.content, settings.sample_rate, f"{variant} probe").audio)
    return heard


def probe_checks(settings: Settings, texts: list[str], canary: ProbeAudio, production: ProbeAudio,
                 version_tags: dict[str, str]) -> list[CheckResult]:
    """The probe's verdicts on audio already synthesised: the canary's Whisper WER and voice consistency against
    its registered evaluation, and its DNSMOS P.808 against production's on the same texts."""
    import numpy as np

    from voice_lib.data.asr import transcribe, word_error_rate
    from voice_lib.data.speech import cosine, naturalness_mos, speaker_embedding

    cfg, sr = settings.release, settings.sample_rate
    wers = [word_error_rate(text, transcribe(audio, sr, settings).text) for text, audio in zip(texts, canary.clips)]
    embeddings = [speaker_embedding(audio, sr) for audio in canary.clips]
    checks = []
    registered_wer = version_tags.get("eval_adapted_wer")
    if registered_wer is not None:
        wer, limit = float(np.mean(wers)), float(registered_wer) + cfg.probe_wer_margin
        checks.append(CheckResult("probe_wer", "pass" if wer <= limit else "fail", wer, limit, f"probe WER {wer:.2f} vs registered {float(registered_wer):.2f}"))
    registered_sim = version_tags.get("eval_adapted_speaker_similarity")
    if registered_sim is not None and len(embeddings) > 1:
        ref = np.mean(embeddings, axis=0)
        sim = float(np.mean([cosine(e, ref) for e in embeddings]))  # consistency of the served voice
        limit = float(registered_sim) - cfg.probe_similarity_margin
        checks.append(CheckResult("probe_similarity", "pass" if sim >= limit else "fail", sim, limit, f"probe similarity {sim:.2f}"))
    canary_p808 = float(np.mean([naturalness_mos(audio, sr).p808 for audio in canary.clips]))
    if production.error or not production.clips:
        checks.append(CheckResult("probe_p808", "skipped", canary_p808, None,
                                  f"canary P.808 {canary_p808:.2f}; no production audio to compare with "
                                  f"({production.error or 'no probe texts'})"))
        return checks
    production_p808 = float(np.mean([naturalness_mos(audio, sr).p808 for audio in production.clips]))
    limit = production_p808 - cfg.probe_p808_margin
    checks.append(CheckResult("probe_p808", "pass" if canary_p808 >= limit else "fail", canary_p808, limit,
                              f"canary P.808 {canary_p808:.2f} vs production v{production.version or '?'} "
                              f"{production_p808:.2f} on the same {len(texts)} texts (at most "
                              f"{cfg.probe_p808_margin:g} below, VOICEOPS_RELEASE__PROBE_P808_MARGIN)"))
    return checks


def quality_probe(settings: Settings, voice_id: str, version_tags: dict[str, str], texts: list[str]) -> list[CheckResult]:
    """Synthesise a few probe texts through the canary and production (forced variants, off the request path: the
    canary_promotion sensor calls this once per analysis) and judge them with ``probe_checks``."""
    cfg = settings.release
    if not (cfg.server_url and cfg.probe_api_key):
        return [CheckResult("quality_probe", "skipped", None, None, "no VOICEOPS_RELEASE__SERVER_URL/PROBE_API_KEY set")]
    canary = _probe_variant(settings, voice_id, texts, "canary")
    if canary.error:
        return [CheckResult("quality_probe", "fail", None, None, canary.error)]
    production = _probe_variant(settings, voice_id, texts, "production")
    return probe_checks(settings, texts, canary, production, version_tags)


# --- recording ------------------------------------------------------------------------------------

class ReleaseHistory:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        metadata.create_all(self.engine)

    def record(self, decision: Decision) -> None:
        with self.engine.begin() as conn:
            conn.execute(release_history.insert().values(
                ts=datetime.now(timezone.utc), voice_id=decision.voice_id, version=decision.version, step=decision.step,
                weight=decision.weight, outcome=decision.outcome, detail=decision.detail,
                checks=json.dumps([asdict(c) for c in decision.checks])))

    def rows(self, voice_id: str, limit: int = 200) -> list[dict]:
        query = sa.select(release_history).where(release_history.c.voice_id == voice_id).order_by(release_history.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) | {"checks": json.loads(r.checks)} for r in conn.execute(query)]


def alert(settings: Settings, decision: Decision) -> None:
    """Log, and POST to the alert webhook when one is configured (a failed POST is logged, never raised)."""
    log.error("RELEASE ALERT voice-%s v%s: %s", decision.voice_id, decision.version, decision.detail)
    if settings.release.alert_webhook_url:
        url = settings.release.alert_webhook_url.get_secret_value()
        try:
            httpx.post(url, json={"event": decision.outcome, **asdict(decision)}, timeout=10)
        except httpx.HTTPError as exc:  # the URL is a secret (its path is the token): name only its host
            log.warning("alert webhook at %s failed: %s", httpx.URL(url).host or "?", type(exc).__name__)


# --- the state machine ----------------------------------------------------------------------------

def _canary_changed(registry, name: str, version: str, decide) -> Decision:  # noqa: ANN001
    """The rollback found another canary than the one judged (a human acted during the analysis): touch nothing."""
    now = registry.aliases(name)
    if now.get("production") == version:
        return decide("promoted", "promoted by a human during the analysis; nothing rolled back")
    return decide("rolled_back", f"no longer the canary (now {now.get('canary', 'none')}): changed during the "
                                 "analysis; nothing rolled back", record=False)


def start_rollout(settings: Settings, voice_id: str, version: str | None, steps: list[int]) -> Decision:
    """Put ``version`` (default: the candidate) on the canary at the first step."""
    from voice_lib.release.registry import Registry, RegistryError

    validate_voice_id(voice_id)
    steps = validate_steps(steps)
    registry, name = Registry(settings), f"voice-{voice_id}"
    state = registry.release_state(name)
    if not version:
        version = state["aliases"].get("candidate") or state["aliases"].get("canary")
        if not version:
            raise RegistryError(f"{name} has no candidate to release; onboard a voice or pass a version.")
    progress = state["progress"]
    if state["aliases"].get("canary") == str(version) and progress.get("release_version") == str(version):
        step = int(progress.get("release_step", 0))  # a re-triggered run resumes the rollout where it was
        decision = Decision(voice_id, str(version), step, steps[step], "waiting", detail=f"resuming at step {step + 1}/{len(steps)}")
    else:
        registry.set_canary(name, version, steps[0])
        registry.set_release_progress(name, release_version=str(version), release_step=0,
                                      release_step_started=f"{time.time():.3f}", release_extensions=0,
                                      release_steps=",".join(map(str, steps)))
        decision = Decision(voice_id, str(version), 0, steps[0], "advanced", detail=f"canary at {steps[0]}%")
    record_decision(settings, registry, decision)
    return decision


def record_decision(settings: Settings, registry, decision: Decision) -> None:
    """One decision into the release history and onto the version's tags (``release_decision_<ms>``)."""
    ReleaseHistory(settings.resolved_audit_url).record(decision)
    tag = {"step": decision.step, "weight": decision.weight, "outcome": decision.outcome, "detail": decision.detail[:500],
           "checks": {c.name: [c.status, c.value] for c in decision.checks}, "ts": int(time.time())}
    registry.set_version_tags(f"voice-{decision.voice_id}", decision.version,
                              {f"release_decision_{int(time.time() * 1000)}": json.dumps(tag), "release_last_outcome": decision.outcome})
    log.info("release voice-%s v%s step %d (%d%%): %s %s", decision.voice_id, decision.version, decision.step,
             decision.weight, decision.outcome, decision.detail)


def advance_rollout(settings: Settings, voice_id: str, version: str, source: MetricsSource | None = None,
                    now: float | None = None, probe_texts: list[str] | None = None, approved: bool = False) -> Decision:
    """One poke of the rollout: wait, extend, advance, pause, promote or roll back. Idempotent.

    With ``manual_approval`` a passed step whose next step is the last one answers ``awaiting_approval``
    instead of advancing, until called with ``approved`` (a human approved it in canary_promotion's approval
    task). The first call after the approval analyses the whole time spent at the held weight."""
    from voice_lib.release.registry import Registry

    cfg = settings.release
    now = now or time.time()
    registry, name = Registry(settings), f"voice-{voice_id}"
    state = registry.release_state(name)
    progress = state["progress"]
    steps = [int(s) for s in progress.get("release_steps", ",".join(map(str, cfg.steps))).split(",")]
    step = int(progress.get("release_step", 0))
    weight = steps[min(step, len(steps) - 1)]
    tags = registry.version(name, version).tags

    def decide(outcome: Outcome, detail: str, checks: list[CheckResult] | None = None, record: bool = True) -> Decision:
        decision = Decision(voice_id, version, step, weight, outcome, checks or [], detail)
        if record:
            record_decision(settings, registry, decision)
        return decision

    if state["aliases"].get("production") == version:
        return decide("promoted", "already production", record=False)
    if state["aliases"].get("canary") != version:
        why = tags.get("reason", "the canary alias was removed")
        return decide("rolled_back", f"no longer the canary: {why}", record=tags.get("rolled_back") != "true")
    if tags.get("breaker_tripped") == "true":
        # The server already took the canary out of traffic; complete the rollback formally.
        reason = f"circuit breaker tripped on the server: {tags.get('breaker_reason', 'no reason given')}"
        if registry.rollback(name, reason, expected_canary=version) is None:
            return _canary_changed(registry, name, version, decide)
        decision = decide("rolled_back", reason)
        alert(settings, decision)
        return decision
    if state["release_state"] == "paused":
        return decide("paused", "paused by a human or an inconclusive analysis; `voiceops resume` to continue", record=False)
    started = float(progress.get("release_step_started", now))
    if now - started < cfg.window_seconds:
        return decide("waiting", f"{now - started:.0f}/{cfg.window_seconds:.0f} s of step {step + 1}", record=False)
    if datetime.fromtimestamp(now, timezone.utc).hour in cfg.blackout_hours:
        return decide("blackout", "peak-hour blackout: holding the current weight", record=False)

    source = source or metrics_source(settings)
    canary = source.window(voice_id, "canary", started, now)
    production = source.window(voice_id, "production", started, now)
    probe = quality_probe(settings, voice_id, tags, probe_texts) if probe_texts else []
    checks = analyze(canary, production, cfg, probe)
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        reason = "; ".join(c.detail for c in failed)
        if registry.rollback(name, f"canary analysis failed at {weight}%: {reason}", expected_canary=version) is None:
            return _canary_changed(registry, name, version, decide)
        decision = decide("rolled_back", reason, checks)
        alert(settings, decision)
        return decision
    if any(c.status == "inconclusive" for c in checks):
        extensions = int(progress.get("release_extensions", 0))
        if extensions < cfg.max_extensions:
            registry.set_release_progress(name, release_step_started=f"{now:.3f}", release_extensions=extensions + 1)
            return decide("extended", f"inconclusive, window extended ({extensions + 1}/{cfg.max_extensions})", checks)
        registry.pause(name)
        decision = decide("paused", f"still inconclusive after {extensions} extensions: paused for a human", checks)
        alert(settings, decision)
        return decision
    if step + 1 >= len(steps):
        registry.promote(name, version)
        registry.set_release_progress(name, release_step=0, release_extensions=0)
        return decide("promoted", f"all {len(steps)} steps passed", checks)
    if cfg.manual_approval and step + 2 == len(steps) and not approved:
        return decide("awaiting_approval", f"every step up to {weight}% passed; the last step (100%) waits for a "
                      "human's approval (Airflow Required Actions, the release page or `voiceops promote`)", checks,
                      record=tags.get("release_last_outcome") != "awaiting_approval")
    step += 1
    weight = steps[step]
    registry.set_canary_weight(name, weight)
    registry.set_release_progress(name, release_step=step, release_step_started=f"{now:.3f}", release_extensions=0)
    return decide("advanced", f"step passed; canary now at {weight}%", checks)
