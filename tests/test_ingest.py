"""Hostile and accidental uploads: every bad input is refused with a message that names the file and
the fix, and nothing reaches the artifact store or the staging folder. Good uploads (folder, zip,
S3 prefix) are stored once, content-addressed, and re-ingesting them is a no-op."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import soundfile as sf

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data.staging import IngestError
from voice_lib.data.uploads import owner_key
from voice_lib.pipelines.onboarding import dataset_prefix, ingest

VOICE = "alice"


# --- helpers --------------------------------------------------------------------------------------

def tiny_wav(path: Path, seconds: float = 0.25, seed: int = 0) -> Path:
    """A few KB of 16 kHz PCM: enough for ingest, which never decodes audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), 16000, subtype="PCM_16")
    return path


def with_limits(settings: Settings, **limits) -> Settings:
    return settings.model_copy(update={"limits": settings.limits.model_copy(update=limits)})


def staged_dir(settings: Settings, voice_id: str = VOICE) -> Path:
    return settings.cache_dir / "work" / voice_id / "ingest" / "staged"


def assert_nothing_written(settings: Settings, voice_id: str = VOICE) -> None:
    assert artifact_store(settings).list("voices") == []
    dest = staged_dir(settings, voice_id)
    assert not dest.exists()
    assert not dest.with_name("staged.staging").exists()


def refused(settings: Settings, data: Path | str, voice_id: str = VOICE) -> str:
    """Ingest must fail with IngestError and leave no trace; returns the message."""
    with pytest.raises(IngestError) as err:
        ingest(voice_id, str(data), settings)
    assert_nothing_written(settings, voice_id)
    return str(err.value)


def make_zip(path: Path, entries: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries.items():
            zf.writestr(name, content.read_bytes() if isinstance(content, Path) else content)
    return path


@pytest.fixture
def wav(tmp_path) -> Path:
    return tiny_wav(tmp_path / "src" / "a.wav")


# --- zip attacks ----------------------------------------------------------------------------------

@pytest.fixture
def zip_bomb(tmp_path) -> Path:
    """50 MB of zeros named like audio: deflates to ~50 KB."""
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.wav", "w") as out:
            chunk = bytes(1 << 20)
            for _ in range(50):
                out.write(chunk)
    assert path.stat().st_size < 1_000_000
    return path


def test_zip_bomb_is_refused(settings, zip_bomb):
    msg = refused(settings, zip_bomb)
    assert "bomb.zip" in msg and "zip bomb" in msg
    assert "uncompressed or as FLAC" in msg  # what to do instead


def test_zip_bomb_over_the_upload_limit_is_refused_before_extraction(settings, zip_bomb):
    cfg = with_limits(settings, max_upload_bytes=10 * 1024**2, max_zip_ratio=10_000)
    msg = refused(cfg, zip_bomb)
    assert "bomb.zip" in msg and "VOICEOPS_LIMITS__MAX_UPLOAD_BYTES" in msg


def test_zip_bomb_with_lower_ratio_limit(settings, tmp_path, wav):
    # ~20x compressible: fine by default, a bomb once the operator tightens the ratio to 5x.
    archive = make_zip(tmp_path / "data.zip", {"a.wav": wav, "pad.wav": bytes(200_000)})
    assert ingest(VOICE, str(archive), settings)["files"] == ["a.wav", "pad.wav"]
    strict = with_limits(settings.model_copy(update={"home": settings.home.parent / "home2"}), max_zip_ratio=5)
    msg = refused(strict, archive)
    assert "data.zip" in msg and "zip bomb" in msg and "limit 5x" in msg


@pytest.mark.parametrize("entry", ["../evil.wav", "/etc/evil.wav", "ok/../../evil.wav", "C:/evil.wav", "..\\evil.wav"])
def test_zip_path_traversal_is_refused(settings, tmp_path, wav, entry):
    archive = make_zip(tmp_path / "evil.zip", {"a.wav": wav, entry: wav})
    msg = refused(settings, archive)
    assert "evil.zip" in msg and repr(entry) in msg
    assert "outside the dataset" in msg and "relative paths" in msg
    assert not (tmp_path / "evil.wav").exists()
    assert not (settings.cache_dir / "work" / VOICE / "ingest" / "evil.wav").exists()


def test_zip_symlink_entry_is_refused(settings, tmp_path, wav):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.wav", wav.read_bytes())
        link = zipfile.ZipInfo("voice.wav")
        link.create_system = 3  # unix
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    msg = refused(settings, archive)
    assert "links.zip" in msg and "'voice.wav'" in msg and "symbolic link" in msg


def test_zip_junk_from_upload_tools_is_ignored(settings, tmp_path, wav):
    archive = make_zip(tmp_path / "mac.zip", {
        "voice/a.wav": wav,
        "__MACOSX/voice/._a.wav": b"\x00\x05\x16\x07resource fork",
        "voice/._b.wav": b"\x00\x05\x16\x07resource fork",
        "voice/.DS_Store": b"junk",
        "Thumbs.db": b"junk",
    })
    result = ingest(VOICE, str(archive), settings)
    assert result["files"] == ["voice/a.wav"]
    assert result["skipped"] == []  # junk is not even worth a warning
    raw = artifact_store(settings).list(dataset_prefix(VOICE, result["data_sha256"]) + "/raw")
    assert [k.rsplit("/raw/", 1)[1] for k in raw] == ["voice/a.wav"]
    assert sorted(p.relative_to(staged_dir(settings)).as_posix()
                  for p in staged_dir(settings).rglob("*") if p.is_file()) == [".staged.json", "voice/a.wav"]


def test_corrupt_zip_member_is_refused_with_a_clear_message(settings, tmp_path, wav):
    archive = make_zip(tmp_path / "broken.zip", {"a.wav": wav, "b.wav": tiny_wav(tmp_path / "b.wav", seed=1)})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("b.wav")
    # Flip bytes inside b.wav's compressed data (after its 30-byte local header + name): a truncated or
    # damaged download. The zip directory stays readable, so only extraction can notice.
    start = info.header_offset + 30 + len(info.filename) + 100
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    msg = refused(settings, archive)
    assert "broken.zip" in msg and "b.wav" in msg and "re-create" in msg


def test_encrypted_zip_is_refused_with_a_clear_message(settings, tmp_path, wav):
    archive = make_zip(tmp_path / "secret.zip", {"a.wav": wav})
    # Set the "encrypted" flag (what `zip -e` writes) in the local header and the central directory.
    data = bytearray(archive.read_bytes())
    data[6] |= 0x1
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1
    archive.write_bytes(bytes(data))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("a.wav").flag_bits & 0x1
    msg = refused(settings, archive)
    assert "secret.zip" in msg and "a.wav" in msg and "password" in msg


def test_file_named_zip_that_is_not_a_zip(settings, tmp_path):
    fake = tmp_path / "data.zip"
    fake.write_bytes(b"this is a text file that someone renamed\n" * 10)
    msg = refused(settings, fake)
    assert "data.zip" in msg and "not a valid zip archive" in msg and "re-create" in msg


# --- size and count limits (folder, zip and single-file uploads) ----------------------------------

def _package(kind: str, folder: Path, tmp_path: Path) -> Path:
    if kind == "folder":
        return folder
    return make_zip(tmp_path / "upload.zip", {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()})


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_oversized_file_is_refused(settings, tmp_path, kind):
    folder = tmp_path / "upload"
    tiny_wav(folder / "a.wav", seconds=0.1)
    tiny_wav(folder / "long_take.wav", seconds=2.0)  # ~64 KB
    cfg = with_limits(settings, max_file_bytes=20_000)
    msg = refused(cfg, _package(kind, folder, tmp_path))
    assert "long_take.wav" in msg and "VOICEOPS_LIMITS__MAX_FILE_BYTES" in msg
    assert "split or compress" in msg


def test_oversized_single_audio_file_is_refused(settings, tmp_path):
    big = tiny_wav(tmp_path / "long_take.wav", seconds=2.0)
    msg = refused(with_limits(settings, max_file_bytes=20_000), big)
    assert "long_take.wav" in msg and "VOICEOPS_LIMITS__MAX_FILE_BYTES" in msg


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_too_many_files_is_refused(settings, tmp_path, kind):
    folder = tmp_path / "upload"
    for i in range(4):
        tiny_wav(folder / f"clip{i}.wav", seconds=0.05, seed=i)
    cfg = with_limits(settings, max_files=3)
    msg = refused(cfg, _package(kind, folder, tmp_path))
    assert "4 files" in msg and "limit of 3" in msg and "VOICEOPS_LIMITS__MAX_FILES" in msg


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_upload_over_total_size_is_refused(settings, tmp_path, kind):
    folder = tmp_path / "upload"
    for i in range(3):
        tiny_wav(folder / f"clip{i}.wav", seconds=0.5, seed=i)  # ~16 KB each
    msg = refused(with_limits(settings, max_upload_bytes=30_000), _package(kind, folder, tmp_path))
    assert "VOICEOPS_LIMITS__MAX_UPLOAD_BYTES" in msg


# --- what is not a dataset ------------------------------------------------------------------------

def test_folder_without_audio(settings, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "metadata.csv").write_text("a.wav|hello\n")
    (folder / "readme.pdf").write_bytes(b"%PDF-1.4")
    msg = refused(settings, folder)
    assert str(folder) in msg and "no audio files found" in msg and ".wav" in msg


def test_empty_zip(settings, tmp_path):
    archive = make_zip(tmp_path / "empty.zip", {"readme.txt": b"nothing here"})
    assert "no audio files found" in refused(settings, archive)


def test_nonexistent_path(settings, tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    msg = refused(settings, missing)
    assert str(missing) in msg and "no such file or folder" in msg


def test_unsupported_single_file(settings, tmp_path):
    pdf = tmp_path / "voice.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    msg = refused(settings, pdf)
    assert "voice.pdf" in msg and "expected a folder, a .zip, an audio file or an s3:// prefix" in msg


# --- folders: symlinks and stray files ------------------------------------------------------------

def test_folder_symlink_to_system_file_is_skipped_never_copied(settings, tmp_path, wav):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "a.wav").write_bytes(wav.read_bytes())
    (folder / "voice.wav").symlink_to("/etc/passwd")
    (folder / "more").symlink_to("/etc", target_is_directory=True)
    result = ingest(VOICE, str(folder), settings)
    assert result["files"] == ["a.wav"]
    skipped = {s["file"]: s["reason"] for s in result["skipped"]}
    assert "symbolic link" in skipped["voice.wav"] and "symbolic link" in skipped["more"]
    staged = staged_dir(settings)
    assert not (staged / "voice.wav").exists() and not (staged / "more").exists()
    store = artifact_store(settings)
    keys = store.list("voices")
    assert not any(k.endswith("voice.wav") or "/more/" in k for k in keys)
    passwd = Path("/etc/passwd").read_bytes()
    assert all(store.read_bytes(k) != passwd for k in keys)


def test_non_audio_files_are_skipped_with_a_reason(settings, tmp_path, wav):
    folder = tmp_path / "upload"
    tiny_wav(folder / "a.wav")
    (folder / "a.txt").write_text("hello there\n")
    (folder / "metadata.csv").write_text("a.wav|hello there\n")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "sub").mkdir()
    (folder / "sub" / "setup.exe").write_bytes(b"MZ")
    result = ingest(VOICE, str(folder), settings)
    assert result["files"] == ["a.txt", "a.wav", "metadata.csv"]
    assert result["skipped"] == [
        {"file": "notes.pdf", "reason": "not an audio or transcript file"},
        {"file": "sub/setup.exe", "reason": "not an audio or transcript file"},
    ]
    stored = artifact_store(settings).list(dataset_prefix(VOICE, result["data_sha256"]))
    assert not any(k.endswith((".pdf", ".exe")) for k in stored)
    marker = json.loads(artifact_store(settings).read_bytes(dataset_prefix(VOICE, result["data_sha256"]) + "/staged.json"))
    assert marker["skipped"] == result["skipped"]  # the QC report can show what was left out


# --- voice ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("voice_id", ["../etc", "Bad_ID", "a", "-alice", "alice/bob", "alice bob", ""])
def test_bad_voice_id_is_refused_before_anything_is_written(settings, wav, voice_id):
    with pytest.raises(ValueError, match="lowercase letters, digits and dashes"):
        ingest(voice_id, str(wav.parent), settings)
    assert artifact_store(settings).list("") == []
    assert not (settings.cache_dir / "work").exists()
    assert not settings.cache_dir.joinpath("etc").exists()


# --- good uploads: content addressing, idempotence, S3 --------------------------------------------

def _store_snapshot(settings: Settings) -> dict[str, int]:
    root = settings.home / "store"
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ingest_is_idempotent(settings, short_voice):
    first = ingest(VOICE, str(short_voice), settings)
    prefix = dataset_prefix(VOICE, first["data_sha256"])
    store = artifact_store(settings)
    keys = store.list("voices")
    expected = sorted(p.name for p in short_voice.iterdir())
    assert keys == sorted([f"{prefix}/raw/{f}" for f in expected] + [f"{prefix}/staged.json"])
    assert store.read_bytes(f"{prefix}/raw/{expected[0]}") == (short_voice / expected[0]).read_bytes()
    before = _store_snapshot(settings)

    second = ingest(VOICE, str(short_voice), settings)
    assert second["data_sha256"] == first["data_sha256"]
    assert second["dataset_uri"] == first["dataset_uri"] == f"{store.uri}/{prefix}"
    assert second["files"] == first["files"] == expected
    assert _store_snapshot(settings) == before  # nothing rewritten


def test_same_data_as_zip_or_folder_has_the_same_hash(settings, short_voice, tmp_path):
    from_folder = ingest(VOICE, str(short_voice), settings)
    archive = make_zip(tmp_path / "short.zip", {p.name: p for p in sorted(short_voice.iterdir())})
    from_zip = ingest(VOICE, str(archive), settings)
    assert from_zip["data_sha256"] == from_folder["data_sha256"]
    # One changed byte is a different dataset.
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in short_voice.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    txt = sorted(changed.glob("*.txt"))[0]
    txt.write_text(txt.read_text() + ".")
    assert ingest(VOICE, str(changed), settings)["data_sha256"] != from_folder["data_sha256"]


@pytest.fixture
def s3(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def _versions(s3, bucket: str, prefix: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


def test_ingest_from_s3_prefix_into_s3_store(s3_settings, settings, s3, s3_bucket, clean_voice):
    # Versioning makes every PUT visible: a re-run that uploads nothing adds no versions.
    s3.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    files = sorted(p.name for p in clean_voice.iterdir())
    for name in files:
        s3.put_object(Bucket=s3_bucket, Key=f"incoming/alice/{name}", Body=(clean_voice / name).read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="incoming/alice/_READY", Body=b"")  # upload-complete marker
    s3.put_object(Bucket=s3_bucket, Key="incoming/alice2/other.wav", Body=b"not alice's")  # sibling prefix

    result = ingest("alice", f"s3://{s3_bucket}/incoming/alice", s3_settings)
    prefix = dataset_prefix("alice", result["data_sha256"])
    assert result["dataset_uri"] == f"s3://{s3_bucket}/store/{prefix}"
    assert result["files"] == files

    store = artifact_store(s3_settings)
    assert store.list("voices") == sorted([f"{prefix}/raw/{f}" for f in files] + [f"{prefix}/staged.json"])
    wav = next(f for f in files if f.endswith(".wav"))
    assert store.read_bytes(f"{prefix}/raw/{wav}") == (clean_voice / wav).read_bytes()
    marker = json.loads(store.read_bytes(f"{prefix}/staged.json"))
    assert marker["data_sha256"] == result["data_sha256"] and marker["voice_id"] == "alice"
    assert marker["source"] == f"s3://{s3_bucket}/incoming/alice"

    # The same bytes from a local folder hash the same: the hash is of the content, not the source.
    local = ingest("alice", str(clean_voice), settings.model_copy(update={"home": settings.home.parent / "home-local"}))
    assert local["data_sha256"] == result["data_sha256"]

    versions = _versions(s3, s3_bucket, "store/")
    assert set(versions) == {f"store/{k}" for k in store.list("voices")} | {f"store/{owner_key('alice')}"}
    assert set(versions.values()) == {1}
    again = ingest("alice", f"s3://{s3_bucket}/incoming/alice", s3_settings)
    assert again["data_sha256"] == result["data_sha256"] and again["dataset_uri"] == result["dataset_uri"]
    assert _versions(s3, s3_bucket, "store/") == versions  # the re-run uploaded nothing


def test_s3_source_with_traversal_key_is_refused(s3_settings, s3, s3_bucket, wav):
    s3.put_object(Bucket=s3_bucket, Key="incoming/bob/a.wav", Body=wav.read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="incoming/bob/../evil.wav", Body=wav.read_bytes())
    if "incoming/bob/../evil.wav" not in [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]:
        pytest.skip("this S3 server normalises keys")
    msg = refused(s3_settings, f"s3://{s3_bucket}/incoming/bob")
    assert "'../evil.wav'" in msg and "outside the dataset" in msg


def test_s3_source_limits_apply(s3_settings, s3, s3_bucket, wav, tmp_path):
    s3.put_object(Bucket=s3_bucket, Key="incoming/bob/a.wav", Body=wav.read_bytes())
    big = tiny_wav(tmp_path / "big.wav", seconds=2.0)
    s3.put_object(Bucket=s3_bucket, Key="incoming/bob/long_take.wav", Body=big.read_bytes())
    msg = refused(with_limits(s3_settings, max_file_bytes=20_000), f"s3://{s3_bucket}/incoming/bob")
    assert "long_take.wav" in msg and "VOICEOPS_LIMITS__MAX_FILE_BYTES" in msg
    msg = refused(with_limits(s3_settings, max_files=1), f"s3://{s3_bucket}/incoming/bob")
    assert "VOICEOPS_LIMITS__MAX_FILES" in msg


def test_empty_s3_prefix(s3_settings, s3_bucket):
    msg = refused(s3_settings, f"s3://{s3_bucket}/incoming/nobody")
    assert f"s3://{s3_bucket}/incoming/nobody" in msg and "no audio files found" in msg


def test_concurrent_onboardings_of_one_voice_stage_in_separate_folders(tmp_path):
    """Regression: every ingest of a voice staged into <cache>/work/<voice>/ingest/staged, so two at once
    replaced each other's files (and one could upload the other's dataset)."""
    import threading

    from voice_lib.core.config import Settings
    from voice_lib.data.staging import stage_dataset
    from voice_lib.pipelines.onboarding import ingest

    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri="http://127.0.0.1:9")
    uploads = {}
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(40):
            (folder / f"{name}-{i:02d}.wav").write_bytes(b"RIFF" + name.encode() * 20_000 + bytes([i]))
        uploads[name] = (folder, stage_dataset(str(folder), tmp_path / f"expected-{name}", settings).data_sha256)
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            results[name] = ingest("same-voice", str(uploads[name][0]), settings)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=run, args=(name,)) for name in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for name, (_, expected) in uploads.items():
        assert results[name]["data_sha256"] == expected
        assert all(f.startswith(name) for f in results[name]["files"]), results[name]["files"][:3]
    assert not list((settings.cache_dir / "work" / "same-voice" / "ingest").glob("run-*"))  # cleaned up


# --- where onboarding may read, and whose voice it may write (issue 17, item 5) -------------------

def confined(settings: Settings, *roots: str) -> Settings:
    """``settings`` with exactly these extra ingest roots (the suite's conftest allows pytest's temp folders)."""
    return settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"allowed_roots": list(roots)})})


def refused_into(settings: Settings, data: Path | str, voice_id: str) -> str:
    """Ingest into ``voice_id`` fails with IngestError and writes nothing of that voice; returns the message."""
    with pytest.raises(IngestError) as err:
        ingest(voice_id, str(data), settings)
    assert artifact_store(settings).list(f"voices/{voice_id}/") == []
    assert not artifact_store(settings).exists(owner_key(voice_id)) and not staged_dir(settings, voice_id).exists()
    return str(err.value)


def test_a_data_uri_outside_the_ingest_roots_is_refused_naming_the_uri_roots_and_setting(settings, tmp_path, wav):
    settings = confined(settings)
    outside = wav.parent
    msg = refused(settings, outside)
    assert str(outside) in msg and settings.resolved_intake_uri in msg and settings.resolved_upload_dir.as_uri() in msg
    assert "ingest.allowed_roots" in msg and "VOICEOPS_INGEST__ALLOWED_ROOTS" in msg

    uploads = settings.resolved_upload_dir
    (uploads / "alice").mkdir(parents=True)
    tiny_wav(uploads / "alice" / "a.wav")
    assert ingest(VOICE, str(uploads / "alice"), settings)["files"] == ["a.wav"]  # the upload folder is a root
    assert ingest(VOICE, (uploads / "alice").as_uri(), settings)["files"] == ["a.wav"]

    # Resolved before the check: '..' and a symlink inside a root that leads outside are refused.
    dotdot = f"{uploads}/../../{outside.relative_to(tmp_path)}"
    msg = refused_into(settings, dotdot, "bob")
    assert f"{outside} (resolved from {dotdot})" in msg
    (uploads / "link").symlink_to(outside, target_is_directory=True)
    assert str(outside) in refused_into(settings, uploads / "link", "bob")
    # A root given by the setting is honoured.
    assert ingest("bob", str(outside), confined(settings, str(tmp_path / "src")))["files"] == ["a.wav"]


def test_the_artifact_store_and_work_cache_are_refused_even_under_a_root(settings, wav):
    settings = confined(settings, "/")  # an operator allowed the whole disk
    stored = ingest(VOICE, str(wav.parent), settings)
    raw = Path(stored["dataset_uri"].removeprefix("file://")) / "raw"
    staged = settings.cache_dir / "work" / VOICE / "ingest" / "staged"
    for other_voices_data in (raw, staged):
        with pytest.raises(IngestError, match="the artifact store, VOICEOPS_STORAGE_URI, or its work cache"):
            ingest("mallory", str(other_voices_data), settings)
    assert not artifact_store(settings).list("voices/mallory")


def test_s3_data_uris_must_lie_under_an_s3_root(s3_settings, s3, s3_bucket, wav):
    for key in ("incoming/bob/a.wav", "incoming-old/bob/a.wav", "elsewhere/bob/a.wav"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=wav.read_bytes())
    settings = confined(s3_settings)
    assert ingest("bob", f"s3://{s3_bucket}/incoming/bob", settings)["files"] == ["a.wav"]  # the intake prefix
    assert "outside the folders onboarding may read" in refused_into(settings, f"s3://{s3_bucket}/incoming-old/bob", "carol")
    assert "outside the folders onboarding may read" in refused_into(settings, f"s3://{s3_bucket}/elsewhere/bob", "carol")
    assert "'.' or '..' segments" in refused_into(settings, f"s3://{s3_bucket}/incoming/../elsewhere/bob", "carol")
    with pytest.raises(IngestError, match="the artifact store"):
        ingest("carol", f"s3://{s3_bucket}/store/voices/bob", confined(s3_settings, f"s3://{s3_bucket}"))
    assert ingest("carol", f"s3://{s3_bucket}/elsewhere/bob", confined(s3_settings, f"s3://{s3_bucket}/elsewhere"))


def test_onboarding_into_another_owners_voice_needs_allow_other_owner(settings, tmp_path):
    from voice_lib.data.uploads import VoiceOwnedElsewhere, recorded_owner
    from voice_lib.release.voices import voice_owner

    first, second = (tiny_wav(tmp_path / name / "a.wav", seed=i).parent for i, name in enumerate(("one", "two")))
    assert recorded_owner(settings, VOICE) == (False, None)
    ingest(VOICE, str(first), settings, owner="acme")  # the first onboarding of the id records its owner
    assert recorded_owner(settings, VOICE) == (True, "acme") and voice_owner(settings, VOICE) == "acme"
    before = artifact_store(settings).list("voices")
    for intruder in ("globex", None):  # another tenant, or an operator without a tenant
        with pytest.raises(VoiceOwnedElsewhere) as err:
            ingest(VOICE, str(second), settings, owner=intruder)
        assert "belongs to tenant 'acme'" in str(err.value) and "allow_other_owner=true" in str(err.value)
        assert artifact_store(settings).list("voices") == before  # nothing staged or stored
    assert ingest(VOICE, str(first), settings, owner="acme")["files"] == ["a.wav"]  # the owner itself: fine
    replaced = ingest(VOICE, str(second), settings, owner=None, allow_other_owner=True)  # on purpose
    assert replaced["data_sha256"] != ingest(VOICE, str(first), settings, owner="acme")["data_sha256"]
    assert recorded_owner(settings, VOICE) == (True, "acme")  # the voice stays acme's
    # A voice the operators onboarded is not a tenant's to take over either.
    ingest("ops-voice", str(first), settings)
    with pytest.raises(VoiceOwnedElsewhere, match="belongs to the operators"):
        ingest("ops-voice", str(second), settings, owner="acme")
