"""Artifact and dataset storage behind URIs: ``file:///abs/path`` and ``s3://bucket/prefix``.

Writes are atomic per object (local: write to a temporary file then rename; S3: a single PUT),
so a crash never leaves a half-written object where a reader could find it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Protocol
from urllib.parse import urlparse

from voice_lib.core.config import Settings


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def _safe_key(key: str) -> str:
    """Normalise a relative key and refuse anything that escapes the store root."""
    parts = PurePosixPath(key.replace("\\", "/")).parts
    if key.startswith("/") or any(p in ("..", "") for p in parts):
        raise StorageError(f"storage key {key!r} is not a safe relative path (no leading '/', no '..').")
    return "/".join(parts)


class Store(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> str: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def sizes(self, prefix: str = "") -> dict[str, int]: ...
    def fingerprints(self, prefix: str = "") -> dict[str, str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def download_to(self, key: str, dest: Path) -> Path: ...
    def upload_file(self, src: Path, key: str) -> str: ...
    def child(self, prefix: str) -> "Store": ...


class FileTransfers:
    """Whole-file copies in and out of a store, on top of its ``read_bytes`` / ``write_bytes``."""

    def upload_file(self, src: Path, key: str) -> str:
        return self.write_bytes(key, Path(src).read_bytes())  # type: ignore[attr-defined]

    def download_to(self, key: str, dest: Path) -> Path:
        write_bytes_atomic(dest, self.read_bytes(key))  # type: ignore[attr-defined]
        return dest


@dataclass
class LocalStore(FileTransfers):
    root: Path

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key) if key else self.root

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{path} does not exist") from exc

    def write_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        write_bytes_atomic(path, data)
        return path.as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [_safe_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """key -> size in bytes (from the file system; nothing is read)."""
        return {key: self._path(key).stat().st_size for key in self.list(prefix)}

    def fingerprints(self, prefix: str = "") -> dict[str, str]:
        """key -> a digest of its content (sha256 of the bytes: a folder lists no hash), so two listings are
        equal exactly when the bytes are; the time a file was written does not matter."""
        import hashlib

        found = {}
        for key in self.list(prefix):
            with self._path(key).open("rb") as fh:
                found[key] = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
        return found

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._path(prefix))


@dataclass
class S3Store(FileTransfers):
    bucket: str
    prefix: str
    client: object

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = _safe_key(key) if key else ""
        return "/".join(p for p in (self.prefix, key) if p)

    def _call(self, what: str, key: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise StorageError(f"s3://{self.bucket}/{key} does not exist") from exc
            raise StorageError(f"S3 {what} of s3://{self.bucket}/{key} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {what} of s3://{self.bucket}/{key} failed: {exc}") from exc

    def read_bytes(self, key: str) -> bytes:
        full = self._key(key)
        resp = self._call("read", full, self.client.get_object, Bucket=self.bucket, Key=full)
        return resp["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> str:
        full = self._key(key)
        self._call("write", full, self.client.put_object, Bucket=self.bucket, Key=full, Body=data)
        return f"s3://{self.bucket}/{full}"

    def exists(self, key: str) -> bool:
        try:
            full = self._key(key)
            self._call("head", full, self.client.head_object, Bucket=self.bucket, Key=full)
            return True
        except StorageError as exc:
            if "does not exist" in str(exc) or "404" in str(exc) or "Not Found" in str(exc):
                return False
            raise

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        return (key for key, _, _ in self._iter_objects(prefix))

    def _iter_objects(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(full key, size, ETag) of every object under ``prefix``, as S3 lists them."""
        full = self._key(prefix) if prefix else self.prefix
        if full and not full.endswith("/") and prefix:
            # Treat the prefix as a folder unless it names an object exactly.
            if self.exists(prefix):
                head = self._call("head", prefix, self.client.head_object, Bucket=self.bucket, Key=full)
                yield full, int(head["ContentLength"]), head.get("ETag", "").strip('"')
                return
            full += "/"
        elif full and not full.endswith("/"):
            full += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"], int(obj.get("Size", 0)), obj.get("ETag", "").strip('"')
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 list of s3://{self.bucket}/{full} failed: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        strip = f"{self.prefix}/" if self.prefix else ""
        return sorted(k[len(strip):] for k in self._iter_keys(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """key -> size in bytes, from the listing alone (no object is read)."""
        strip = f"{self.prefix}/" if self.prefix else ""
        return {k[len(strip):]: size for k, size, _ in self._iter_objects(prefix)}

    def fingerprints(self, prefix: str = "") -> dict[str, str]:
        """key -> its ETag and size, from the listing alone (no object is read). The ETag is the MD5 of the bytes
        for a single PUT; a multipart upload's depends on its part size too, so the same bytes sent by another
        tool can list differently (a spurious difference, never a missed one)."""
        strip = f"{self.prefix}/" if self.prefix else ""
        return {k[len(strip):]: f"etag:{etag}:{size}" for k, size, etag in self._iter_objects(prefix)}

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self._iter_keys(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.bucket, self._key(prefix), self.client)


def s3_client(settings: Settings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None,
        # Adaptive retries ride out short S3 outages; the caller's task retry handles long ones.
        config=Config(retries={"max_attempts": 5, "mode": "adaptive"}, connect_timeout=5, read_timeout=30),
    )


def open_store(uri: str, settings: Settings) -> Store:
    """Open a store from a URI. Plain paths are treated as local folders."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri).expanduser().resolve()
        return LocalStore(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} has no bucket: use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), s3_client(settings))
    raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:///abs/path or s3://bucket/prefix")


def artifact_store(settings: Settings) -> Store:
    return open_store(settings.resolved_storage_uri, settings)


def upload_folder(store: Store, folder: Path, prefix: str, marker: str | None = None) -> list[str]:
    """Copy every file under ``folder`` to ``prefix/<relative path>``; ``marker`` (a relative path) goes last,
    so a reader that waits for it never sees a half-copied folder. Returns the keys written."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rels = [p.relative_to(folder).as_posix() for p in files]
    if marker is not None:
        if marker not in rels:
            raise StorageError(f"{folder}: the commit marker {marker} is missing; the folder is incomplete.")
        rels = [r for r in rels if r != marker] + [marker]
    return [store.upload_file(folder / rel, f"{prefix}/{rel}") for rel in rels]


def download_prefix(store: Store, prefix: str, dest: Path) -> Path:
    """A local copy of every object under ``prefix`` at ``dest/<relative key>``; files already there are kept
    (every write is atomic, so an existing file is complete). Returns ``dest``."""
    prefix = prefix.rstrip("/")
    for key in store.list(prefix):
        target = dest / key[len(prefix):].lstrip("/")
        if not target.exists():
            store.download_to(key, target)
    return dest


@contextmanager
def atomic_write(dest: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file that appears under ``dest`` whole or not at all, and survives a power cut once the block exits.

    Written to a temporary file in the same folder (so the rename cannot cross filesystems), flushed and fsynced,
    renamed over ``dest`` with ``os.replace``, then the folder is fsynced so the rename itself is durable. A kill,
    an exception or a full disk leaves the previous ``dest`` (or none) and no temporary file: callers skip files
    that exist, so a partial one would be reused as if it were complete. ``mode`` is the file's permission
    (0o600 for secrets); the default is what ``open`` gives under the usual umask.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(dest: Path, data: bytes, mode: int = 0o644) -> None:
    """``dest.write_bytes(data)`` through :func:`atomic_write`."""
    with atomic_write(dest, mode) as fh:
        fh.write(data)
