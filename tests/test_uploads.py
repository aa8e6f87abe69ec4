"""voice_lib.data.uploads: an HTTP upload is validated by onboarding's own staging and handed to voice_intake.

Real files, a real LocalStore intake folder and a real S3 server (moto) for the S3 intake prefix; the intake
scan is voice_lib.pipelines.intake, what the voice_intake DAG runs.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_ingest import make_zip, with_limits

from voice_lib.core.storage import artifact_store, open_store
from voice_lib.data.staging import IngestError
from voice_lib.data.uploads import accept_upload, claim_key, names_listing_sha256, read_manifest
from voice_lib.pipelines.intake import claim, find_ready_datasets


def wav_bytes(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.linspace(0, 400 * seconds, int(16000 * seconds))), 16000, format="WAV")
    return buf.getvalue()


def files(tmp_path: Path, entries: dict[str, bytes]) -> list[tuple[str, Path]]:
    out = []
    for i, (name, content) in enumerate(entries.items()):
        path = tmp_path / "parts" / f"part{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        out.append((name, path))
    return out


@pytest.fixture
def intake_settings(settings, tmp_path):
    return settings.model_copy(update={"intake_uri": (tmp_path / "incoming").as_uri()})


def test_upload_lands_under_the_intake_prefix_with_ready_last(intake_settings, tmp_path):
    upload = files(tmp_path, {"a.wav": wav_bytes(), "b.wav": wav_bytes(), "metadata.csv": b"a.wav|Hello.\nb.wav|Bye.\n"})
    receipt = accept_upload(upload, "carol-01", "zh", intake_settings, tenant="acme", description="Carol, calm")
    incoming = tmp_path / "incoming" / "carol-01"
    assert sorted(p.name for p in incoming.iterdir()) == ["_READY", "a.wav", "b.wav", "manifest.json", "metadata.csv"]
    assert (incoming / "a.wav").read_bytes() == upload[0][1].read_bytes()
    manifest = json.loads((incoming / "manifest.json").read_text())
    assert manifest["language"] == "zh" and manifest["tenant"] == "acme" and manifest["description"] == "Carol, calm"
    assert read_manifest(intake_settings, "carol-01") == receipt.to_json()
    # voice_intake finds it, with the upload's language and tenant (the voice's owner), under the listing hash
    # the receipt names.
    (found,) = find_ready_datasets(intake_settings)
    assert found == {"voice_id": "carol-01", "data_uri": receipt.data_uri, "listing_sha256": receipt.listing_sha256,
                     "language": "zh", "owner": "acme"}
    claim(intake_settings, found, "run-7")
    assert find_ready_datasets(intake_settings) == []


def test_zip_upload_and_a_new_upload_replaces_the_waiting_one(intake_settings, tmp_path):
    archive = make_zip(tmp_path / "voice.zip", {"clips/a.wav": wav_bytes(), "metadata.csv": b"clips/a.wav|Hi.\n"})
    first = accept_upload([("voice.zip", archive)], "dave", "en", intake_settings, tenant="acme")
    assert first.files == ["clips/a.wav", "metadata.csv"]
    second = accept_upload(files(tmp_path, {"z.wav": wav_bytes()}), "dave", "en", intake_settings, tenant="acme")
    listed = sorted(open_store(intake_settings.resolved_intake_uri, intake_settings).list("dave/"))
    assert listed == ["dave/_READY", "dave/manifest.json", "dave/z.wav"]  # nothing of the first upload left
    assert second.listing_sha256 != first.listing_sha256
    assert [d["listing_sha256"] for d in find_ready_datasets(intake_settings)] == [second.listing_sha256]


def zip_with(path: Path, name: str, content: bytes = b"x") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, content)
    return path


@pytest.mark.parametrize("build, message", [
    (lambda t: [("v.zip", zip_with(t / "v.zip", "../../etc/evil.wav", wav_bytes()))], "points outside the dataset"),
    (lambda t: [("v.zip", zip_with(t / "v.zip", "a.wav", b"\0" * 5_000_000))], "looks like a zip bomb"),
    (lambda t: files(t, {"take\u202ewav.exe": wav_bytes()}), "control or invisible characters"),
    (lambda t: files(t, {"../up.wav": wav_bytes()}), "points outside the dataset"),
    (lambda t: files(t, {"notes.txt": b"hello"}), "no audio files found"),
    (lambda t: files(t, {"a.wav": wav_bytes(), "b.zip": b"PK"}), "is a zip sent beside other files"),
    (lambda t: [("v.zip", t / "empty.zip")] if (t / "empty.zip").write_bytes(b"") is not None else [],
     "not a valid zip archive"),
    (lambda t: [], "the upload holds no files"),
])
def test_hostile_or_empty_upload_is_refused_and_writes_nothing(intake_settings, tmp_path, build, message):
    with pytest.raises(IngestError, match=message):
        accept_upload(build(tmp_path), "erin", "en", intake_settings, tenant="acme")
    assert not (tmp_path / "incoming").exists() or not any((tmp_path / "incoming").rglob("*"))


def test_limits_are_the_ingest_limits(intake_settings, tmp_path):
    small = with_limits(intake_settings, max_files=2)
    with pytest.raises(IngestError, match="3 files exceed the limit of 2 .VOICEOPS_LIMITS__MAX_FILES"):
        accept_upload(files(tmp_path, {f"{i}.wav": wav_bytes() for i in range(3)}), "erin", "en", small, tenant="t")
    tiny = with_limits(intake_settings, max_file_bytes=1000)
    with pytest.raises(IngestError, match="over the per-file limit"):
        accept_upload(files(tmp_path, {"a.wav": wav_bytes()}), "erin", "en", tiny, tenant="t")


@pytest.mark.parametrize("voice_id, language, description, message", [
    ("Bad_Name", "en", "", "voice_id 'Bad_Name' is invalid"),
    ("base", "en", "", "reserved for the shared base model"),
    ("erin", "fr", "", "language 'fr' is not supported"),
    ("erin", "en", "line\nbreak", "description: at most 500 characters of plain text"),
])
def test_bad_fields_are_refused(intake_settings, tmp_path, voice_id, language, description, message):
    with pytest.raises(IngestError, match=message):
        accept_upload(files(tmp_path, {"a.wav": wav_bytes()}), voice_id, language, intake_settings,
                      tenant="t", description=description)


def test_upload_to_an_s3_intake_prefix(s3_settings, s3_bucket, tmp_path):
    settings = s3_settings.model_copy(update={"intake_uri": f"s3://{s3_bucket}/incoming"})
    receipt = accept_upload(files(tmp_path, {"a.wav": wav_bytes()}), "frank", "en", settings, tenant="acme")
    (found,) = find_ready_datasets(settings)
    assert found["data_uri"] == receipt.data_uri == f"s3://{s3_bucket}/incoming/frank"
    assert found["listing_sha256"] == receipt.listing_sha256 and found["language"] == "en"


@pytest.fixture(params=["local", "s3"])
def any_intake(request, settings, tmp_path):
    """Settings with a local or an S3 intake prefix (moto's ETags), and that prefix as a store."""
    if request.param == "s3":
        cfg = request.getfixturevalue("s3_settings")
    else:
        cfg = settings.model_copy(update={"intake_uri": (tmp_path / "incoming").as_uri()})
    return cfg, open_store(cfg.resolved_intake_uri, cfg)


def test_claims_are_keyed_on_content_not_names(any_intake, tmp_path):
    """Regression (issue 17, item 9): claims were keyed on the file names, so new recordings uploaded under the
    old names were never onboarded."""
    settings, intake = any_intake
    intake.write_bytes("alice/a.wav", wav_bytes(0.5))
    intake.write_bytes("alice/_READY", b"")
    (found,) = find_ready_datasets(settings)
    claim(settings, found, "run-1")
    intake.write_bytes("alice/a.wav", wav_bytes(0.5))  # the same bytes written again: not new
    assert find_ready_datasets(settings) == []
    intake.write_bytes("alice/a.wav", wav_bytes(0.7))  # new bytes under the same name: new
    (changed,) = find_ready_datasets(settings)
    assert changed["listing_sha256"] != found["listing_sha256"]
    claim(settings, changed, "run-2")

    # Over HTTP: the receipt names the content key voice_intake claims; the same recordings again are no new
    # claim, other recordings under the same names are.
    upload = {"take.wav": wav_bytes(0.5), "metadata.csv": b"take.wav|Hello.\n"}
    receipt = accept_upload(files(tmp_path / "1", upload), "bob", "en", settings, tenant="acme")
    (first,) = find_ready_datasets(settings)
    assert first["listing_sha256"] == receipt.listing_sha256
    claim(settings, first, "run-3")
    again = accept_upload(files(tmp_path / "2", upload), "bob", "en", settings, tenant="acme")
    assert again.listing_sha256 == receipt.listing_sha256 and find_ready_datasets(settings) == []
    other = accept_upload(files(tmp_path / "3", {**upload, "take.wav": wav_bytes(0.9)}), "bob", "en", settings,
                          tenant="acme")
    assert other.listing_sha256 != receipt.listing_sha256 and other.files == receipt.files
    assert [d["listing_sha256"] for d in find_ready_datasets(settings)] == [other.listing_sha256]


def test_a_folder_claimed_by_its_names_before_the_upgrade_is_not_onboarded_again(intake_settings, tmp_path):
    incoming = tmp_path / "incoming" / "carol"
    incoming.mkdir(parents=True)
    (incoming / "a.wav").write_bytes(wav_bytes())
    (incoming / "_READY").write_bytes(b"")
    legacy = claim_key("carol", names_listing_sha256(["_READY", "a.wav"]))
    artifact_store(intake_settings).write_bytes(legacy, json.dumps({"onboarding_run_id": "old-run"}).encode())
    assert find_ready_datasets(intake_settings) == []  # claimed before: adopted under its content key
    assert find_ready_datasets(intake_settings) == []
    (incoming / "a.wav").write_bytes(wav_bytes(0.8))  # and new bytes after that are new
    assert [d["voice_id"] for d in find_ready_datasets(intake_settings)] == ["carol"]
