"""Voices uploaded over HTTP: validated as onboarding's ingest validates, then handed to voice_intake.

An upload is a zip, or audio files with an optional transcript file. It is staged with ``stage_dataset``, the
very function onboarding's ingest runs, so the limits (``VOICEOPS_LIMITS__*``) and the hostile-input rules
(traversal and absolute names, symlinks, zip bombs, encrypted archives, control or invisible characters in
names, too many or too large files) are the same, with the same messages. A refused upload writes nothing.

An accepted one is written under the intake prefix as ``<voice_id>/<files>``, then ``manifest.json`` (language,
tenant, description, content hash) and ``_READY`` last, which is what voice_intake waits for: it starts
voice_onboarding with the manifest's language. A new upload of the same voice replaces what was waiting there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.storage import artifact_store, open_store
from voice_lib.data.staging import IngestError, check_member_name, stage_dataset

log = logging.getLogger(__name__)
LANGUAGES = ("en", "zh", "auto")
MANIFEST = "manifest.json"
READY = "_READY"
MAX_DESCRIPTION_CHARS = 500


@dataclass
class UploadReceipt:
    """What was handed to voice_intake: enough to find the onboarding run it starts (``listing_sha256``)."""

    voice_id: str
    language: str
    tenant: str
    description: str
    data_sha256: str
    files: list[str]
    total_bytes: int
    listing_sha256: str
    data_uri: str
    skipped: list[dict] = field(default_factory=list)
    uploaded_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return asdict(self)


def listing_sha256(fingerprints: Mapping[str, str]) -> str:
    """The hash voice_intake keys its claim by: every file under ``<voice_id>/`` (relative name -> the store's
    content fingerprint, ``Store.fingerprints``), so new bytes under the same names are a new claim and the same
    bytes written again are not. The markers count by name only: the manifest holds this very hash."""
    lines = [f"{name}\0{'' if name in (MANIFEST, READY) else print_}" for name, print_ in sorted(fingerprints.items())]
    return hashlib.sha256("\n".join(["content-v2", *lines]).encode()).hexdigest()


def names_listing_sha256(files: Sequence[str]) -> str:
    """The claim hash before claims were keyed on content (names only): claims made then are still honoured
    once (voice_lib.pipelines.intake), so an upgrade does not re-onboard every folder already handed over."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def claim_key(voice_id: str, listing: str) -> str:
    """Where voice_intake records (in the artifact store) the onboarding run it started for a listing."""
    return f"intake/claimed/{voice_id}-{listing[:16]}.json"


def _check_fields(voice_id: str, language: str, description: str) -> None:
    try:
        validate_voice_id(voice_id)
    except ValueError as exc:
        raise IngestError(str(exc)) from None
    if language not in LANGUAGES:
        raise IngestError(f"language {language!r} is not supported; use one of {', '.join(LANGUAGES)}.")
    if len(description) > MAX_DESCRIPTION_CHARS or any(ord(c) < 32 and c not in "\t" for c in description):
        raise IngestError(f"description: at most {MAX_DESCRIPTION_CHARS} characters of plain text on one line.")


def _gather(files: Sequence[tuple[str, Path]], folder: Path) -> Path:
    """The upload as one source stage_dataset can read: a single zip as it is, files into ``folder``."""
    if not files:
        raise IngestError("the upload holds no files; send a zip, or audio files and a transcript (metadata.csv).")
    if len(files) == 1 and files[0][0].lower().endswith(".zip"):
        return files[0][1]
    seen: set[str] = set()
    for name, path in files:
        if name.lower().endswith(".zip"):
            raise IngestError(f"upload: {name!r} is a zip sent beside other files; send one zip alone, "
                              "or the audio files themselves.")
        rel = check_member_name(name, "upload")  # traversal and control characters refused, as in a zip
        if rel is None:
            continue
        if rel in seen:
            raise IngestError(f"upload: {rel!r} is sent twice; every file needs its own name.")
        seen.add(rel)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / rel)
    return folder


def accept_upload(files: Sequence[tuple[str, Path]], voice_id: str, language: str, settings: Settings, *,
                  tenant: str, description: str = "") -> UploadReceipt:
    """Validate ``files`` ((name, local path) pairs) and hand them to voice_intake (module docstring).

    Raises IngestError, naming the file and the fix, before anything is written.
    """
    _check_fields(voice_id, language, description)
    with tempfile.TemporaryDirectory(prefix="voiceops-upload-") as scratch:
        source = _gather(files, Path(scratch) / "files")
        staged = stage_dataset(str(source), Path(scratch) / "staged", settings)
        intake = open_store(settings.resolved_intake_uri, settings)
        intake.delete_prefix(f"{voice_id}/")  # a new upload replaces what was still waiting
        for rel in staged.files:
            if rel in (MANIFEST, READY):
                continue  # the markers are ours to write, last
            intake.upload_file(staged.root / rel, f"{voice_id}/{rel}")
        # The claim key from the intake store's own listing, exactly as voice_intake will compute it.
        stored = {k.removeprefix(f"{voice_id}/"): v for k, v in intake.fingerprints(f"{voice_id}/").items()}
        receipt = UploadReceipt(
            voice_id=voice_id, language=language, tenant=tenant, description=description,
            data_sha256=staged.data_sha256, files=sorted(stored), total_bytes=staged.total_bytes,
            listing_sha256=listing_sha256({**stored, MANIFEST: "", READY: ""}), data_uri=f"{intake.uri}/{voice_id}",
            skipped=staged.skipped)
        intake.write_bytes(f"{voice_id}/{MANIFEST}", json.dumps(receipt.to_json(), indent=1).encode())
        intake.write_bytes(f"{voice_id}/{READY}", b"")
    return receipt


# --- who a voice belongs to ------------------------------------------------------------------------
# Recorded in the artifact store by the voice's first onboarding (voice_lib.pipelines.onboarding.ingest), so it
# outlives the intake folder (cleared by DELETE /v1/voices, replaced by every upload). None: the operators (an
# onboarding started by the CLI or an Airflow user without a tenant).

def owner_key(voice_id: str) -> str:
    return f"owners/{validate_voice_id(voice_id)}.json"


def recorded_owner(settings: Settings, voice_id: str) -> tuple[bool, str | None]:
    """(whether the voice has an owner record, its owner: a tenant, or None for the operators)."""
    store = artifact_store(settings)
    if not store.exists(owner_key(voice_id)):
        return False, None
    return True, json.loads(store.read_bytes(owner_key(voice_id))).get("owner")


def record_owner(settings: Settings, voice_id: str, owner: str | None, source: str) -> None:
    record = {"voice_id": voice_id, "owner": owner, "source": source, "recorded_at": time.time()}
    artifact_store(settings).write_bytes(owner_key(voice_id), json.dumps(record, indent=1).encode())


def owner_name(owner: str | None) -> str:
    return f"tenant {owner!r}" if owner else "the operators (no tenant: the CLI or an Airflow user)"


class VoiceOwnedElsewhere(IngestError):
    """An onboarding into a voice id another owner holds, without ``allow_other_owner``."""


def check_owner(settings: Settings, voice_id: str, owner: str | None, allow_other_owner: bool) -> bool:
    """Whether an onboarding for ``owner`` may write voice ``voice_id``; True when the voice has no owner record
    yet (the caller records it once the data is stored). Raises VoiceOwnedElsewhere for another owner's voice,
    unless ``allow_other_owner`` (the voice keeps its owner: an operator acting for it)."""
    found, current = recorded_owner(settings, voice_id)
    if not found or current == owner:
        return not found
    if not allow_other_owner:
        raise VoiceOwnedElsewhere(
            f"voice {voice_id!r} belongs to {owner_name(current)}, and this onboarding is for {owner_name(owner)}: "
            "it would replace that voice's candidate. Choose another voice_id, or, on purpose, run voice_onboarding "
            "with the Param allow_other_owner=true (CLI: voiceops onboard --allow-other-owner).")
    log.warning("onboarding %s (owned by %s) for %s: allowed by allow_other_owner", voice_id, owner_name(current),
                owner_name(owner))
    return False


def read_manifest(settings: Settings, voice_id: str) -> dict | None:
    """The manifest of the upload waiting (or claimed) under ``<voice_id>/``, or None."""
    intake = open_store(settings.resolved_intake_uri, settings)
    key = f"{voice_id}/{MANIFEST}"
    if not intake.exists(key):
        return None
    try:
        manifest = json.loads(intake.read_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a manifest.json a user put there by hand: not one of ours
    return manifest if isinstance(manifest, dict) else None
