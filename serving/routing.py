"""Variant selection, exactly as shared/CONTRACTS.md states it.

A request goes to the canary when ``stable_bucket(user_id or api key) < effective canary weight``.
``stable_bucket`` is SHA-256 based (serving/tenants.py), so the answer is the same in every process and
replica, a user is sticky across requests, and raising the weight only ever moves users from production
to canary (the canary set at weight w is a subset of the set at any w' > w). The bucket is not salted
per voice: the contract fixes the formula, so a user is in the same cohort for every voice.

Effective weight: the registry's ``canary_weight``, except 0 when there is no loaded canary, when the
breaker is open, or when ``release_state`` is ``rolled_back``. ``paused`` freezes the rollout at its current
weight (Registry.pause), so a paused canary keeps serving the users it already has and gains none.

Tester override: ``X-Voice-Variant: canary|production`` (header) or the cookie ``voice_variant``, honoured
only for keys with ``can_force_variant``; other keys' overrides are ignored (not an error, so a client
that always sends the header works with any key). A forced canary is still refused when the breaker is
open or the canary was rolled back: those versions must not serve anyone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from serving.snapshot import LoadedVersion, VoiceRoute
from serving.tenants import stable_bucket

PRODUCTION, CANARY = "production", "canary"
VARIANTS = (PRODUCTION, CANARY)
OVERRIDE_HEADER = "X-Voice-Variant"
OVERRIDE_COOKIE = "voice_variant"


@dataclass(frozen=True)
class Decision:
    variant: str
    version: LoadedVersion
    effective_weight: int
    bucket: int
    forced: bool = False


def canary_share(canary_weight: int, release_state: str, has_canary: bool, breaker_open: bool = False) -> int:
    """The percent of routing buckets the canary gets, from the registry's state (see the module docstring)."""
    if not has_canary or breaker_open or release_state == "rolled_back":
        return 0
    return max(0, min(100, int(canary_weight)))


def effective_weight(route: VoiceRoute, breaker_open: bool) -> int:
    return canary_share(route.canary_weight, route.release_state, route.canary is not None, breaker_open)


def requested_override(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    """The tester's requested variant (header first, then cookie), or None if absent or not a variant."""
    value = (headers.get(OVERRIDE_HEADER) or cookies.get(OVERRIDE_COOKIE) or "").strip().lower()
    return value if value in VARIANTS else None


def choose(route: VoiceRoute, routing_key: str, breaker_open: bool, override: str | None = None,
           may_force: bool = False) -> Decision:
    """Pick the variant for one request; ``routing_key`` is the user id, or the API key when there is none."""
    weight = effective_weight(route, breaker_open)
    bucket = stable_bucket(routing_key)
    if may_force and override is not None:
        servable = route.canary is not None and not breaker_open and route.release_state != "rolled_back"
        if override == CANARY and servable:
            return Decision(CANARY, route.canary, weight, bucket, forced=True)  # type: ignore[arg-type]
        return Decision(PRODUCTION, route.production, weight, bucket, forced=override == PRODUCTION)
    if route.canary is not None and bucket < weight:
        return Decision(CANARY, route.canary, weight, bucket)
    return Decision(PRODUCTION, route.production, weight, bucket)
