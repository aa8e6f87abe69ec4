"""Find newly complete datasets under the incoming prefix, for the voice_intake DAG.

Layout: ``<incoming>/<voice_id>/...`` with a ``_READY`` file (or a ``manifest.json``) written last by
the uploader. A dataset is handed to voice_onboarding once per content: the claim marker is keyed by
the voice and a hash of the listing, so re-uploading changed data starts a new onboarding.
"""

from __future__ import annotations

import json
import logging
import time

from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.storage import artifact_store, open_store
from voice_lib.data.uploads import LANGUAGES, claim_key, listing_sha256, read_manifest

log = logging.getLogger(__name__)
READY_MARKERS = ("_READY", "manifest.json")


def find_ready_datasets(settings: Settings) -> list[dict]:
    """Datasets that are complete and not yet claimed: [{voice_id, data_uri, listing_sha256[, language, owner]}]
    (the language and the owning tenant when the upload's manifest.json names them: uploads through POST
    /v1/voices do)."""
    incoming = open_store(settings.resolved_intake_uri, settings)
    claims = artifact_store(settings)
    by_voice: dict[str, list[str]] = {}
    for key in incoming.list(""):
        voice, _, rest = key.partition("/")
        if rest:
            by_voice.setdefault(voice, []).append(rest)
    found = []
    for voice, files in sorted(by_voice.items()):
        if not any(f in READY_MARKERS for f in files):
            continue  # still uploading
        try:
            validate_voice_id(voice)
        except ValueError as exc:
            log.warning("intake: skipping %s/: %s", voice, exc)
            continue
        listing = listing_sha256(files)
        if claims.exists(claim_key(voice, listing)):
            continue
        dataset = {"voice_id": voice, "data_uri": f"{incoming.uri}/{voice}", "listing_sha256": listing}
        manifest = read_manifest(settings, voice) if "manifest.json" in files else None
        if manifest and manifest.get("language") in LANGUAGES:  # an upload through POST /v1/voices says it
            dataset["language"] = manifest["language"]
        if manifest and isinstance(manifest.get("tenant"), str) and manifest["tenant"]:
            dataset["owner"] = manifest["tenant"]  # the tenant it is onboarded for (the same-owner rule)
        found.append(dataset)
    log.info("intake: %d new dataset(s) under %s", len(found), incoming.uri)
    return found


def claim(settings: Settings, dataset: dict, run_id: str) -> None:
    """Record that ``dataset`` was handed to onboarding (after the trigger succeeded)."""
    artifact_store(settings).write_bytes(
        claim_key(dataset["voice_id"], dataset["listing_sha256"]),
        json.dumps({**dataset, "onboarding_run_id": run_id, "claimed_at": time.time()}).encode(),
    )
