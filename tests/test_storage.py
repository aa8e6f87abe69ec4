"""Storage behaviour users rely on, run against a local folder and a real S3 server (moto, loopback)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import boto3
import pytest

from voice_lib.core.config import Settings
from voice_lib.core.storage import LocalStore, S3Store, StorageError, atomic_write, open_store

UNSAFE_KEYS = ["../x", "/abs", "a/../../b", "..\\x", "a/.."]


@dataclass
class StoreCase:
    store: LocalStore | S3Store
    location: Callable[[str], str]  # how an error message names a key of this store
    all_objects: Callable[[], list[str]]  # every object/file that exists *anywhere* near the store
    kind: str


def _s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture
def s3_only_settings(tmp_path, s3_endpoint) -> Settings:
    return Settings(home=tmp_path / "home", s3_endpoint_url=s3_endpoint,
                    s3_access_key_id="test", s3_secret_access_key="test")


@pytest.fixture(params=["local", "s3"])
def case(request, tmp_path) -> StoreCase:
    if request.param == "local":
        root = tmp_path / "store" / "root"
        store = open_store(str(root), Settings(home=tmp_path / "home"))
        assert isinstance(store, LocalStore)
        outside = tmp_path / "store"
        return StoreCase(
            store,
            lambda key: str(root / key),
            lambda: sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*") if p.is_file()),
            "local",
        )
    bucket = request.getfixturevalue("s3_bucket")
    s3_settings = request.getfixturevalue("s3_only_settings")
    store = open_store(f"s3://{bucket}/root", s3_settings)
    assert isinstance(store, S3Store) and store.prefix == "root"
    client = _s3_client(s3_settings.s3_endpoint_url)

    def all_objects() -> list[str]:
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    return StoreCase(store, lambda key: f"s3://{bucket}/root/{key}", all_objects, "s3")


def _populate(store) -> None:
    store.write_bytes("a/x", b"ax")
    store.write_bytes("a/y/z", b"ayz")
    store.write_bytes("ab/x", b"abx")
    store.write_bytes("b", b"b")


# --- both backends ------------------------------------------------------------------------------

def test_write_read_round_trip(case):
    store = case.store
    data = bytes(range(256)) * 17
    uri = store.write_bytes("voices/alice/raw/clip 1.wav", data)
    assert uri.endswith("voices/alice/raw/clip%201.wav" if case.kind == "local" else "voices/alice/raw/clip 1.wav")
    assert store.read_bytes("voices/alice/raw/clip 1.wav") == data
    store.write_bytes("voices/alice/raw/clip 1.wav", b"replaced")
    assert store.read_bytes("voices/alice/raw/clip 1.wav") == b"replaced"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""


def test_upload_and_download_files(case, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    case.store.upload_file(src, "dir/file.bin")
    dest = tmp_path / "out" / "nested" / "file.bin"
    assert case.store.download_to("dir/file.bin", dest) == dest
    assert dest.read_bytes() == src.read_bytes()


def test_exists(case):
    store = case.store
    assert not store.exists("a/x")
    _populate(store)
    assert store.exists("a/x")
    assert store.exists("b")
    assert not store.exists("a/missing")
    # A folder (common prefix) is not an object.
    assert not store.exists("a")
    assert not store.exists("a/y")


def test_list_uses_folder_semantics(case):
    store = case.store
    assert store.list("") == []
    _populate(store)
    assert store.list("") == ["a/x", "a/y/z", "ab/x", "b"]
    assert store.list() == ["a/x", "a/y/z", "ab/x", "b"]
    assert store.list("a") == ["a/x", "a/y/z"]  # never "ab/x"
    assert store.list("a/") == ["a/x", "a/y/z"]
    assert store.list("a/y") == ["a/y/z"]
    assert store.list("ab") == ["ab/x"]
    assert store.list("a/x") == ["a/x"]  # an exact object name lists itself
    assert store.list("nothing-here") == []
    assert store.list("a/x/deeper") == []


def test_child_store_is_scoped(case):
    store = case.store
    _populate(store)
    child = store.child("a")
    assert child.uri == f"{store.uri}/a"
    assert child.list("") == ["x", "y/z"]
    assert child.read_bytes("y/z") == b"ayz"
    child.write_bytes("new", b"n")
    assert store.read_bytes("a/new") == b"n"
    assert child.exists("x") and not child.exists("b")
    grandchild = child.child("y")
    assert grandchild.uri == f"{store.uri}/a/y"
    assert grandchild.list() == ["z"]
    with pytest.raises(StorageError):
        child.read_bytes("../b")  # a child cannot reach its parent


def test_delete_prefix_deletes_only_that_folder(case):
    store = case.store
    _populate(store)
    assert store.delete_prefix("a") == 2
    assert store.list("") == ["ab/x", "b"]
    assert not store.exists("a/x") and not store.exists("a/y/z")
    assert store.read_bytes("ab/x") == b"abx"
    assert store.delete_prefix("a") == 0
    assert store.delete_prefix("b") == 1  # an exact object name
    assert store.list("") == ["ab/x"]


def test_delete_prefix_of_a_child_store(case):
    store = case.store
    _populate(store)
    assert store.child("a").delete_prefix("y") == 1
    assert store.list("") == ["a/x", "ab/x", "b"]


def test_missing_key_raises_storage_error_naming_it(case, tmp_path):
    _populate(case.store)
    with pytest.raises(StorageError) as err:
        case.store.read_bytes("missing/key.bin")
    assert case.location("missing/key.bin") in str(err.value)
    assert "does not exist" in str(err.value)
    dest = tmp_path / "downloads" / "key.bin"
    with pytest.raises(StorageError, match="does not exist"):
        case.store.download_to("missing/key.bin", dest)
    assert not dest.exists()


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused_before_touching_anything(case, key, tmp_path):
    store = case.store
    _populate(store)
    before = case.all_objects()
    src = tmp_path / "src.bin"
    src.write_bytes(b"evil")
    attempts = [
        lambda: store.write_bytes(key, b"evil"),
        lambda: store.upload_file(src, key),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.list(key),
        lambda: store.delete_prefix(key),
        lambda: store.child(key),
        lambda: store.child("a").write_bytes(key, b"evil"),
    ]
    for attempt in attempts:
        with pytest.raises(StorageError, match="not a safe relative path"):
            attempt()
    assert case.all_objects() == before
    # Nothing was written outside the store root either.
    assert not (tmp_path / "store" / "x").exists()
    assert not (tmp_path / "store" / "b").exists()
    assert not (tmp_path / "x").exists()
    assert not Path("/abs").exists()


# --- local only ---------------------------------------------------------------------------------

def test_local_writes_leave_no_part_files(tmp_path):
    store = LocalStore(tmp_path / "root")
    for i in range(5):
        store.write_bytes("d/obj.bin", os.urandom(1000 + i))
    leftovers = [p.name for p in (tmp_path / "root").rglob("*") if p.is_file()]
    assert leftovers == ["obj.bin"]


def test_local_write_failure_keeps_old_content(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "root")
    store.write_bytes("d/obj.bin", b"old content")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("d/obj.bin", b"new content that never lands")
    monkeypatch.undo()
    assert store.read_bytes("d/obj.bin") == b"old content"
    assert [p.name for p in (tmp_path / "root" / "d").iterdir()] == ["obj.bin"]  # no .part left
    assert store.list("") == ["d/obj.bin"]


def test_local_write_failure_of_new_key_leaves_nothing(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "root")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        store.write_bytes("d/new.bin", b"x")
    monkeypatch.undo()
    assert not store.exists("d/new.bin")
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails_half_way(tmp_path):
    # The checkpoint saver, the corpus clip writer and the key file all stream into atomic_write.
    dest = tmp_path / "ckpt" / "last.pt"
    with atomic_write(dest) as fh:
        fh.write(b"complete checkpoint")
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(dest, mode=0o600) as fh:
            fh.write(b"half of a new")
            raise RuntimeError("killed mid-save")
    assert dest.read_bytes() == b"complete checkpoint"
    assert [p.name for p in dest.parent.iterdir()] == ["last.pt"]  # no temporary file left
    with atomic_write(dest, mode=0o600) as fh:
        fh.write(b"secret")
    assert dest.read_bytes() == b"secret" and dest.stat().st_mode & 0o777 == 0o600


def test_local_list_hides_in_flight_part_files(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.write_bytes("d/done.bin", b"1")
    (tmp_path / "root" / "d" / ".in-flight.bin.abc.part").write_bytes(b"half")
    assert store.list("") == ["d/done.bin"]


# --- S3 only ------------------------------------------------------------------------------------

def test_s3_store_at_bucket_root(s3_bucket, s3_only_settings):
    store = open_store(f"s3://{s3_bucket}", s3_only_settings)
    assert isinstance(store, S3Store) and store.prefix == "" and store.uri == f"s3://{s3_bucket}"
    _populate(store)
    assert store.list("") == ["a/x", "a/y/z", "ab/x", "b"]
    assert store.list("a") == ["a/x", "a/y/z"]
    assert store.child("a").list() == ["x", "y/z"]


def test_s3_missing_bucket_is_a_storage_error(s3_bucket, s3_only_settings):
    store = open_store(f"s3://{s3_bucket}-does-not-exist/p", s3_only_settings)
    with pytest.raises(StorageError, match=f"{s3_bucket}-does-not-exist"):
        store.write_bytes("k", b"v")
    with pytest.raises(StorageError, match=f"{s3_bucket}-does-not-exist"):
        store.list("")


# --- open_store -----------------------------------------------------------------------------------

def test_open_store_local_forms(tmp_path):
    cfg = Settings(home=tmp_path / "home")
    assert open_store(str(tmp_path / "a"), cfg) == LocalStore(tmp_path / "a")
    assert open_store((tmp_path / "a").as_uri(), cfg) == LocalStore(tmp_path / "a")


def test_open_store_s3_prefix_is_normalised(tmp_path):
    cfg = Settings(home=tmp_path / "home", s3_endpoint_url="http://127.0.0.1:9")
    store = open_store("s3://bucket/a/b/", cfg)
    assert (store.bucket, store.prefix, store.uri) == ("bucket", "a/b", "s3://bucket/a/b")


@pytest.mark.parametrize("uri", ["ftp://host/data", "gs://bucket/x", "http://example.com/x"])
def test_open_store_rejects_unknown_schemes(uri, tmp_path):
    with pytest.raises(StorageError) as err:
        open_store(uri, Settings(home=tmp_path / "home"))
    msg = str(err.value)
    assert uri in msg and "unsupported" in msg
    assert "s3://bucket/prefix" in msg and "file://" in msg  # says what is accepted


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix/only"])
def test_open_store_rejects_s3_without_bucket(uri, tmp_path):
    with pytest.raises(StorageError) as err:
        open_store(uri, Settings(home=tmp_path / "home"))
    assert "no bucket" in str(err.value) and "s3://bucket/prefix" in str(err.value)


def test_sizes_come_from_the_listing(case):
    store = case.store
    store.write_bytes("a/one.bin", b"x" * 10)
    store.write_bytes("a/deep/two.bin", b"y" * 2048)
    store.write_bytes("b.bin", b"")
    assert store.sizes("a") == {"a/one.bin": 10, "a/deep/two.bin": 2048}
    assert store.sizes("") == {"a/one.bin": 10, "a/deep/two.bin": 2048, "b.bin": 0}
    assert store.sizes("a/one.bin") == {"a/one.bin": 10}


def test_fingerprints_follow_the_bytes_not_the_write(case):
    store = case.store
    store.write_bytes("v/a.wav", b"take one")
    store.write_bytes("v/b.wav", b"take one")
    first = store.fingerprints("v")
    assert set(first) == {"v/a.wav", "v/b.wav"} and first["v/a.wav"] == first["v/b.wav"]  # same bytes, same print
    store.write_bytes("v/a.wav", b"take one")
    assert store.fingerprints("v") == first  # written again: unchanged
    store.write_bytes("v/a.wav", b"take two")
    assert store.fingerprints("v")["v/a.wav"] != first["v/a.wav"]
    assert store.fingerprints("v/b.wav") == {"v/b.wav": first["v/b.wav"]}


def test_an_s3_object_over_the_limit_is_refused_before_it_is_downloaded(s3_settings, tmp_path_factory, tmp_path):
    """Regression: _stage_s3 read every object whole and only then checked its size."""
    from voice_lib.data.staging import IngestError, stage_dataset

    client = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    bucket = s3_settings.storage_uri.split("/")[2]
    client.put_object(Bucket=bucket, Key="incoming/v/aaa-good.wav", Body=b"RIFF" + b"\0" * 2000)
    client.put_object(Bucket=bucket, Key="incoming/v/huge-take.wav", Body=b"\0" * 1_500_000)
    settings = s3_settings.model_copy(update={"limits": s3_settings.limits.model_copy(update={"max_file_bytes": 1_000_000})})
    with pytest.raises(IngestError, match="huge-take.wav.*per-file limit"):
        stage_dataset(f"s3://{bucket}/incoming/v", tmp_path / "staged", settings)
    moto_log = next(tmp_path_factory.getbasetemp().glob("moto*/moto.log")).read_text()
    assert f"/{bucket}/incoming/v/" in moto_log  # the listing (and so the log) is there
    for name in ("huge-take.wav", "aaa-good.wav"):  # nothing was read (the PUTs above are in the log)
        assert f"GET /{bucket}/incoming/v/{name}" not in moto_log, name
