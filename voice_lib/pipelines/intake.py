"""Find newly complete datasets under the incoming prefix, for the voice_intake DAG.

Layout: ``<incoming>/<voice_id>/...`` with a ``_READY`` file (or a ``manifest.json``) written last by
the uploader. A dataset is handed to voice_onboarding once per content: the claim marker is keyed by
the voice and a hash of the listing with each file's content fingerprint (``Store.fingerprints``: the ETag on
S3, the sha256 of a local file), so re-uploading changed bytes, even under the same names, starts a new
onboarding, and writing the same bytes again does not.
"""

from __future__ import annotations

import json
import logging
import time

from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.storage import Store, artifact_store, open_store
from voice_lib.data.uploads import LANGUAGES, claim_key, listing_sha256, names_listing_sha256, read_manifest

log = logging.getLogger(__name__)
READY_MARKERS = ("_READY", "manifest.json")


def find_ready_datasets(settings: Settings) -> list[dict]:
    """Datasets that are complete and not yet claimed: [{voice_id, data_uri, listing_sha256[, language, owner]}]
    (the language and the owning tenant when the upload's manifest.json names them: uploads through POST
    /v1/voices do)."""
    incoming = open_store(settings.resolved_intake_uri, settings)
    claims = artifact_store(settings)
    by_voice: dict[str, dict[str, str]] = {}
    for key, fingerprint in incoming.fingerprints("").items():
        voice, _, rest = key.partition("/")
        if rest:
            by_voice.setdefault(voice, {})[rest] = fingerprint
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
        manifest = read_manifest(settings, voice) if "manifest.json" in files else None
        # An upload whose manifest names this content key was made since claims are keyed on content: new.
        if (manifest or {}).get("listing_sha256") != listing and _adopt_names_claim(claims, voice, files, listing):
            continue
        dataset = {"voice_id": voice, "data_uri": f"{incoming.uri}/{voice}", "listing_sha256": listing}
        if manifest and manifest.get("language") in LANGUAGES:  # an upload through POST /v1/voices says it
            dataset["language"] = manifest["language"]
        if manifest and isinstance(manifest.get("tenant"), str) and manifest["tenant"]:
            dataset["owner"] = manifest["tenant"]  # the tenant it is onboarded for (the same-owner rule)
        found.append(dataset)
    log.info("intake: %d new dataset(s) under %s", len(found), incoming.uri)
    return found


def _adopt_names_claim(claims: Store, voice: str, files: dict[str, str], listing: str) -> bool:
    """A folder claimed before claims were keyed on content (its names' hash): taken as claimed once, under
    its content key from now on, so an upgrade re-onboards nothing. New bytes after that are a new claim; new
    bytes under the same names put there before the first scan since the upgrade are missed once, as they were
    before (an HTTP upload is not: its manifest names its content key)."""
    legacy = claim_key(voice, names_listing_sha256(list(files)))
    if not claims.exists(legacy):
        return False
    record = json.loads(claims.read_bytes(legacy))
    if record.get("adopted_as"):
        return False  # adopted once already: what is there now is another content
    claims.write_bytes(claim_key(voice, listing), json.dumps({**record, "listing_sha256": listing,
                                                               "adopted_from": legacy}).encode())
    claims.write_bytes(legacy, json.dumps({**record, "adopted_as": claim_key(voice, listing)}).encode())
    log.info("intake: %s/ was claimed by names before content keys; now claimed by its content", voice)
    return True


def claim(settings: Settings, dataset: dict, run_id: str) -> None:
    """Record that ``dataset`` was handed to onboarding (after the trigger succeeded)."""
    artifact_store(settings).write_bytes(
        claim_key(dataset["voice_id"], dataset["listing_sha256"]),
        json.dumps({**dataset, "onboarding_run_id": run_id, "claimed_at": time.time()}).encode(),
    )
