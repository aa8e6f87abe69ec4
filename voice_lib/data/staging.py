"""Bring a user's dataset (folder, zip, single file or S3 prefix) into a local staging folder, safely.

Hostile input is refused before anything is written: path traversal, absolute names, symlinks,
zip bombs, too many or too large files, names with control or invisible characters (terminal
escapes, bidi overrides that disguise an extension). The staged copy is content-hashed so every
later step can be cached and every registered model can name the exact data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import unicodedata
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from voice_lib.core.config import Settings
from voice_lib.core.storage import open_store
from voice_lib.data.audio import AUDIO_EXTENSIONS

TRANSCRIPT_NAMES = ("metadata.csv",)
TRANSCRIPT_EXTENSIONS = (".list", ".txt", ".lab", ".csv")
ACCEPTED_EXTENSIONS = AUDIO_EXTENSIONS + TRANSCRIPT_EXTENSIONS + (".json",)
# Names that upload tools add and that are never part of a dataset.
IGNORED_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db", "_READY")
# Audio containers users export that the decoder does not read: skipped with the fix, not a shrug.
UNSUPPORTED_AUDIO_EXTENSIONS = (".m4a", ".aac", ".wma", ".aif", ".aiff", ".amr", ".caf", ".mp4", ".webm", ".3gp")


class IngestError(ValueError):
    """The dataset cannot be accepted as uploaded; the message names the file and the fix."""


@dataclass
class StagedDataset:
    root: Path
    files: list[str]  # relative POSIX paths, sorted
    data_sha256: str
    total_bytes: int
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}

    def to_json(self) -> dict:
        return {**asdict(self), "root": str(self.root)}


def check_member_name(name: str, source: str) -> str | None:
    """Return a safe relative POSIX path, None for ignorable entries; raise on traversal."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise IngestError(
            f"{source}: entry {name!r} points outside the dataset folder (absolute path or '..'); "
            "re-create the archive with relative paths only."
        )
    if not parts or any(p in IGNORED_NAMES or p.startswith("._") for p in parts):
        return None
    # Escape sequences, NUL, newlines or bidi overrides in a name rewrite terminals and logs, or make
    # "take\u202ewav.exe" display as "takeexe.wav": such a name never becomes a storage key.
    if any(unicodedata.category(c).startswith("C") for c in clean):
        raise IngestError(
            f"{source}: the name {name!r} contains control or invisible characters; "
            "rename the file using letters, digits, spaces, dashes and dots only."
        )
    return "/".join(parts)


def _accept(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.lower().endswith(ACCEPTED_EXTENSIONS) or name in TRANSCRIPT_NAMES


def _skip_reason(rel: str) -> str:
    if rel.lower().endswith(UNSUPPORTED_AUDIO_EXTENSIONS):
        return "audio format not supported; convert it to WAV or FLAC and upload it again"
    return "not an audio or transcript file"


def _check_totals(count: int, total: int, settings: Settings, source: str) -> None:
    lim = settings.limits
    if count > lim.max_files:
        raise IngestError(
            f"{source}: {count} files exceed the limit of {lim.max_files} (VOICEOPS_LIMITS__MAX_FILES); "
            "one voice needs a few hundred clips at most."
        )
    if total > lim.max_upload_bytes:
        raise IngestError(
            f"{source}: {total / 1e6:.1f} MB exceeds the upload limit of {lim.max_upload_bytes / 1e6:.0f} MB "
            "(VOICEOPS_LIMITS__MAX_UPLOAD_BYTES); compress the audio (FLAC) or upload fewer minutes."
        )


def _check_file_size(rel: str, size: int, settings: Settings, source: str) -> None:
    if size > settings.limits.max_file_bytes:
        raise IngestError(
            f"{source}: {rel} is {size / 1e6:.1f} MB, over the per-file limit of "
            f"{settings.limits.max_file_bytes / 1e6:.0f} MB (VOICEOPS_LIMITS__MAX_FILE_BYTES); split or compress it."
        )


def _stage_zip(archive: Path, dest: Path, settings: Settings, skipped: list[dict]) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise IngestError(f"{archive.name}: not a valid zip archive ({exc}); re-create it.") from exc
    with zf:
        members = []
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = check_member_name(info.filename, archive.name)
            if rel is None:
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise IngestError(
                    f"{archive.name}: entry {info.filename!r} is a symbolic link; archives must hold plain files."
                )
            if not _accept(rel):
                skipped.append({"file": rel, "reason": _skip_reason(rel)})
                continue
            if info.flag_bits & 0x1:
                raise IngestError(
                    f"{archive.name}: entry {info.filename!r} is encrypted (password-protected); "
                    "upload a zip made without a password."
                )
            members.append((info, rel))
        total = sum(i.file_size for i, _ in members)
        packed = sum(max(1, i.compress_size) for i, _ in members)
        _check_totals(len(members), total, settings, archive.name)
        if total / packed > settings.limits.max_zip_ratio:
            raise IngestError(
                f"{archive.name}: expands {total / packed:.0f}x (limit {settings.limits.max_zip_ratio:.0f}x), "
                "which looks like a zip bomb; upload the audio files uncompressed or as FLAC."
            )
        for info, rel in members:
            _check_file_size(rel, info.file_size, settings, archive.name)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # Stream with a hard cap: the sizes in the zip directory can lie.
            written = 0
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > settings.limits.max_file_bytes:
                            raise IngestError(
                                f"{archive.name}: {rel} expands beyond its declared size; the archive is corrupt or hostile."
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise IngestError(
                    f"{archive.name}: entry {info.filename!r} cannot be extracted ({exc}); "
                    "the archive is damaged or uses an unsupported format: re-create it with a standard zip tool."
                ) from exc


def _stage_folder(folder: Path, dest: Path, settings: Settings, skipped: list[dict]) -> None:
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if check_member_name(rel, folder.name) is None:
            continue
        if path.is_symlink():
            # A symlink can expose files outside the dataset (e.g. /etc/passwd): never follow it.
            skipped.append({"file": rel, "reason": "symbolic link not followed; copy the real file in"})
            continue
        if path.is_dir():
            continue
        if not _accept(rel):
            skipped.append({"file": rel, "reason": _skip_reason(rel)})
            continue
        entries.append((path, rel, path.stat().st_size))
    _check_totals(len(entries), sum(e[2] for e in entries), settings, str(folder))
    for path, rel, size in entries:
        _check_file_size(rel, size, settings, str(folder))
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)


def _stage_s3(uri: str, dest: Path, settings: Settings, skipped: list[dict]) -> None:
    store = open_store(uri, settings)
    keys = []
    sizes = store.sizes("")
    for key in sorted(sizes):
        rel = check_member_name(key, uri)
        if rel is None or rel.endswith("_READY"):
            continue
        if not _accept(rel):
            skipped.append({"file": rel, "reason": _skip_reason(rel)})
            continue
        keys.append(rel)
    # Sizes from the listing, before anything is downloaded: an object over the limit was read whole first.
    for rel in keys:
        _check_file_size(rel, sizes[rel], settings, uri)
    _check_totals(len(keys), sum(sizes[rel] for rel in keys), settings, uri)
    total = 0
    for rel in keys:
        data = store.read_bytes(rel)
        _check_file_size(rel, len(data), settings, uri)
        total += len(data)
        _check_totals(len(keys), total, settings, uri)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)


def _local_path(uri: str) -> Path | None:
    """The local path a file:// URI or a plain path names, resolved (symlinks followed, '..' removed); None for
    any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()


def _s3_parts(uri: str) -> tuple[str, ...] | None:
    """(bucket, *key segments) of an s3:// URI, None for another scheme. S3 keys are literal, so a '.' or '..'
    segment is not a parent: refused rather than guessed at."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return None
    segments = tuple(s for s in parsed.path.split("/") if s)
    if not parsed.netloc or any(s in (".", "..") for s in segments):
        raise IngestError(f"{uri}: an s3:// data_uri needs a bucket and no '.' or '..' segments.")
    return (parsed.netloc, *segments)


def _under(uri: str, root: str) -> bool:
    local, base = _local_path(uri), _local_path(root)
    if local is not None and base is not None:
        return local.is_relative_to(base)
    s3, s3_base = _s3_parts(uri), _s3_parts(root)
    return s3 is not None and s3_base is not None and s3[:len(s3_base)] == s3_base


def allowed_source(data_uri: str, settings: Settings) -> str:
    """``data_uri`` with a local path resolved (symlinks and '..' followed, so the check is on the real place),
    if it lies under one of ``settings.ingest_roots`` and outside the artifact store and the work cache (other
    voices' raw data and staging folders); else an IngestError naming the URI, the roots and the setting.
    Onboarding stages from what this returns, not from the name it was given."""
    if _local_path(data_uri) is None and _s3_parts(data_uri) is None:
        raise IngestError(f"{data_uri}: expected a local folder or file, a file:// URI or an s3:// prefix.")
    source = str(_local_path(data_uri) or data_uri)
    for private in (settings.resolved_storage_uri, settings.cache_dir.as_uri()):
        if _under(source, private):
            raise IngestError(f"{data_uri}: lies inside {private} (the artifact store, VOICEOPS_STORAGE_URI, or its "
                              "work cache), which holds every voice's data; onboard from the intake prefix or the "
                              "upload folder instead.")
    roots = settings.ingest_roots
    if not any(_under(source, root) for root in roots):
        shown = f"{source} (resolved from {data_uri})" if source != data_uri else data_uri
        raise IngestError(
            f"{shown} is outside the folders onboarding may read: {', '.join(roots)}. Put the recordings in the "
            f"upload folder ({settings.resolved_upload_dir}, VOICEOPS_INGEST__UPLOAD_DIR) or under the intake prefix "
            "(VOICEOPS_INTAKE_URI), or add a root to the setting ingest.allowed_roots "
            "(VOICEOPS_INGEST__ALLOWED_ROOTS='[\"/path\"]').")
    return source


def stage_dataset(data_uri: str, dest: Path, settings: Settings) -> StagedDataset:
    """Copy the dataset at ``data_uri`` into ``dest`` (replaced atomically) and hash its content."""
    parsed = urlparse(data_uri)
    tmp = dest.with_name(dest.name + ".staging")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skipped: list[dict] = []
    try:
        if parsed.scheme == "s3":
            _stage_s3(data_uri, tmp, settings, skipped)
        else:
            source = Path(parsed.path if parsed.scheme == "file" else data_uri).expanduser()
            if not source.exists():
                raise IngestError(f"{data_uri}: no such file or folder; check the path.")
            if source.is_dir():
                _stage_folder(source, tmp, settings, skipped)
            elif zipfile.is_zipfile(source):
                _stage_zip(source, tmp, settings, skipped)
            elif source.suffix.lower() in AUDIO_EXTENSIONS:
                check_member_name(source.name, data_uri)
                _check_file_size(source.name, source.stat().st_size, settings, data_uri)
                shutil.copyfile(source, tmp / source.name)
            elif source.suffix.lower() == ".zip":
                raise IngestError(f"{source.name}: not a valid zip archive; re-create it.")
            else:
                raise IngestError(
                    f"{data_uri}: expected a folder, a .zip, an audio file or an s3:// prefix."
                )
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        if not any(f.lower().endswith(AUDIO_EXTENSIONS) for f in files):
            raise IngestError(
                f"{data_uri}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)}); "
                "point DATA at the folder that holds the recordings."
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = hashlib.sha256()
    total = 0
    for rel in files:
        content = (tmp / rel).read_bytes()
        total += len(content)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(content).digest())
    staged = StagedDataset(dest, files, digest.hexdigest(), total, skipped)
    (tmp / ".staged.json").write_text(json.dumps({**staged.to_json(), "source": data_uri}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return staged
