"""What the registry says the server should hold: every ``voice-*`` model's aliases and release tags.

The reader fails fast when MLflow is down (a 5 s health probe before any registry call), and a voice whose
entry cannot be read keeps what it served; bound_registry_requests bounds the MLflow client's own retries
for a server that dies in the middle of a read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from serving.snapshot import VoiceRoute, WantedVoice
from voice_lib.core.config import redact_url
from voice_lib.core.tracking import mlflow_is_healthy
from voice_lib.release.registry import Registry, RegistryError

log = logging.getLogger(__name__)


class RegistryReader:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def read(self, serving: Mapping[str, VoiceRoute]) -> dict[str, WantedVoice]:
        """voice_id -> what it should serve; raises RegistryError when the registry cannot be reached.

        ``serving`` (the current routes) stands in for a voice whose own entry fails to read.
        """
        uri = self.registry.uri
        if not mlflow_is_healthy(uri):  # a local store (file:, sqlite:) counts as healthy
            raise RegistryError(f"MLflow at {redact_url(uri)} is not reachable (GET /health failed)")
        wanted: dict[str, WantedVoice] = {}
        for name in self.registry.list_voice_models():
            voice_id = name.removeprefix("voice-")
            try:
                state = self.registry.release_state(name)
            except RegistryError as exc:
                if voice_id in serving:  # keep what this voice served; the next poll retries
                    wanted[voice_id] = serving[voice_id].wanted()
                log.warning("reading %s failed: %s", name, exc)
                continue
            aliases = state["aliases"]
            production, canary = aliases.get("production"), aliases.get("canary")
            canary = None if canary == production else canary
            wanted[voice_id] = WantedVoice(voice_id, production, canary, int(state["canary_weight"]),
                                           state["release_state"], self._tripped(name, canary))
        return wanted

    def _tripped(self, name: str, canary: str | None) -> str | None:
        """The canary's ``breaker_reason`` if a replica's breaker tripped it (version tag ``breaker_tripped``).

        Read on every poll, not only when the version loads: the tripping replica sets the weight to 0, which
        stops routed traffic everywhere, but forced-variant requests ignore the weight, so every replica must
        hold the breaker open itself."""
        if canary is None:
            return None
        try:
            tags = self.registry.version(name, canary).tags or {}
        except RegistryError as exc:
            log.warning("reading %s version %s failed: %s", name, canary, exc)
            return None
        return (tags.get("breaker_reason") or "tripped on another replica") if tags.get("breaker_tripped") == "true" else None


def bound_registry_requests(retries: int, timeout_seconds: int) -> None:
    """Bound every MLflow client request of this process: MLflow's own retries (7, exponential backoff) hold a
    request to a server that died after the health probe for over two minutes, and with it the reload, so
    readiness said nothing about the outage. MLflow's client is configured only through its environment, so
    the server writes these two variables once, at start-up, from its settings."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_seconds)
