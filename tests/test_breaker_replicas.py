"""A tripped canary breaker holds on every replica, through the registry, forced-variant requests included.

Two VoicePools over one real MLflow registry stand for two server replicas (each with its own breaker, as in
two processes). Replica A's breaker trips the canary and writes ``breaker_tripped`` (and weight 0) to the
registry; replica B already had the version loaded. Before the fix B read the tag only when it loaded a
version, so its weight-0 routing stopped ordinary traffic but a tester's ``X-Voice-Variant: canary`` still
reached the tripped version there.
"""

from __future__ import annotations

import uuid

import pytest
from serving_stack import ServerStack

from serving.breaker import CanaryBreaker
from serving.pool import VoicePool
from serving.routing import CANARY, PRODUCTION, choose

pytestmark = pytest.mark.timeout(600)


def test_a_trip_on_one_replica_holds_on_every_replica_for_forced_requests(mlflow_server, tmp_path):
    stack = ServerStack(mlflow_server, tmp_path / "home")
    stack.publish_default_voices(canary_weight=30)
    settings = stack.settings.model_copy(update={"serving": stack.settings.serving.model_copy(update={
        "base_dir": stack.base_dir, "breaker_min_requests": 3, "poll_seconds": 3600})})
    replicas = []
    for name in ("a", "b"):
        breaker = CanaryBreaker(settings.serving, stack.registry)
        pool = VoicePool(settings.model_copy(update={"home": tmp_path / f"replica-{name}"}), stack.registry, breaker)
        pool.reload()
        replicas.append((pool, breaker))
    (pool_a, breaker_a), (pool_b, breaker_b) = replicas
    voice, canary = stack.a, "2"
    try:
        route_b = pool_b.snapshot.voices[voice]
        forced = choose(route_b, f"tester-{uuid.uuid4().hex}", breaker_b.is_open(voice, canary), CANARY, True)
        assert forced.variant == CANARY  # healthy: a tester may force the canary
        for _ in range(3):  # replica A sees the canary fail
            breaker_a.record(voice, canary, 50.0, error=True)
        assert breaker_a.is_open(voice, canary)
        breaker_a.close()  # its registry write (tags, weight 0) is done
        assert stack.registry.version(f"voice-{voice}", canary).tags["breaker_tripped"] == "true"
        pool_b.reload()  # replica B's next poll
        assert breaker_b.is_open(voice, canary), "replica B still serves the canary its peer tripped"
        route_b = pool_b.snapshot.voices[voice]
        forced = choose(route_b, f"tester-{uuid.uuid4().hex}", breaker_b.is_open(voice, canary), CANARY, True)
        assert forced.variant == PRODUCTION and forced.version.version == "1"
        assert breaker_b.state(voice, canary)["reason"].startswith("error rate")
    finally:
        for pool, breaker in replicas:
            pool.stop()
            pool.close()
