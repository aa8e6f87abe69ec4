"""A corpus of hostile and awkward uploads, each run the way a user's upload runs: ``onboarding.ingest``
then ``qc_shard`` for every shard then ``qc_report`` (what the voice_onboarding DAG and `voiceops qc` call).

Every case ends in one of these outcomes, chosen for what a user expects from a serious tool:

- ``refused``: ``IngestError`` before anything is stored (zip bombs, traversal names, symlinks in an
  archive, files over the size limit, names with control or invisible characters, a 0-byte "zip").
- ``set_rejected``: ``QCRejected`` naming the transcript file (and line) and the fix: a line naming a
  file that is not there (or a path outside the dataset), a line whose text is only control characters,
  a transcript that is not UTF-8, a recording saved under a ``.txt`` name.
- ``file_rejected``: the rest of the set passes and the report names the one file and the fix (0-byte
  or undecodable ``.wav``, text or random bytes named ``.wav``, a truncated WAV, NaN samples, a
  recording below the model's 16 kHz (8000, 4000 and 11025 Hz: upsampling cannot restore the missing
  high frequencies), symlinks in a folder (never followed), audio containers the decoder cannot read).
- ``converted``: legitimate but unusual audio is accepted and converted: 8-bit unsigned, 24-bit and
  32-bit float PCM (float over full scale is scaled, not clipped), stereo and 6-channel, 22.05, 44.1
  and 48 kHz, MP3 and Ogg bytes behind a ``.wav`` name. The stored clip is mono 16-bit PCM at the
  project's rate with no clipping introduced; CRLF line endings and whitespace controls in transcripts
  are plain whitespace.
- ``normalised``: control characters in transcripts are removed, never rejected and never passed on
  (see voice_lib/transcripts.py): NUL, DEL, C0/C1 controls, whole terminal escape sequences, bidi
  overrides and isolates, zero-width characters, stray BOMs, soft hyphens, in the text and in the
  file-name column. The clip is accepted with the cleaned text, and the report warns, naming the file
  and line, so the user can check what will be trained on.

For every case the artifact store is snapshotted (content hashes) before and after, next to a
pre-existing other voice (``alice-2``, a prefix-sharing name), an older dataset of the same voice and
objects outside ``voices/``: every new or changed key lies under this upload's
``dataset_prefix(VOICE, sha)`` (or the voice's own scratch folder), nothing is deleted, and a refused
upload writes nothing at all. A subset runs again against a real S3 server (moto), where the whole
bucket is compared, including keys beside the store prefix.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import soundfile as sf
from test_ingest import make_zip, with_limits

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store, s3_client
from voice_lib.data import corpus
from voice_lib.data.audio import PEAK_CEILING, loudness_lufs
from voice_lib.data.staging import IngestError
from voice_lib.data.uploads import record_owner
from voice_lib.pipelines.onboarding import (
    QCRejected,
    dataset_prefix,
    ingest,
    load_qc_report,
    qc_prefix,
    qc_report,
    qc_shard,
)

VOICE = "alice"
OTHER_VOICE = "alice-2"  # shares the prefix string "voices/alice": the trailing slash must matter
SR = 16000
TEXT = "The quick brown fox jumps."  # short clips keep the corpus fast (~2 s of speech each)
GOOD_TEXT = "Please call Stella soon."

Kind = Literal["refused", "set_rejected", "file_rejected", "converted", "normalised"]


# --- building uploads -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _speech(text: str, rate: int) -> np.ndarray:
    return corpus.synthesize(text, "flite-slt", rate)


def speech(rate: int = SR, text: str = TEXT) -> np.ndarray:
    return _speech(text, rate).copy()


def encode(audio: np.ndarray, rate: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def folder(root: Path, files: dict[str, bytes | str]) -> Path:
    out = root / "upload"
    for name, content in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))  # never a platform newline translation
        else:
            path.write_bytes(content)
    return out


def with_good(files: dict[str, bytes | str], *lines: str) -> dict[str, bytes | str]:
    """A good clip (and its metadata.csv line 1) beside the case's files: the rest of the set passes."""
    metadata = "".join(f"{line}\n" for line in (f"good.wav|{GOOD_TEXT}", *lines))
    return {"good.wav": encode(speech(text=GOOD_TEXT)), "metadata.csv": metadata, **files}


def one_take(audio: bytes, name: str = "take.wav") -> Callable[[Path], Path]:
    return lambda root: folder(root, {name: audio, "metadata.csv": f"{name}|{TEXT}\n"})


def take_with(files: dict[str, bytes | str]) -> Callable[[Path], Path]:
    return lambda root: folder(root, {"take.wav": encode(speech()), **files})


def zip_bomb(root: Path) -> Path:
    path = root / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.csv", f"x.wav|{TEXT}\n")
        with zf.open("x.wav", "w") as out:
            for _ in range(8):
                out.write(bytes(1 << 20))  # 8 MB of zeros deflate to ~8 KB
    return path


def zip_with(entry: str) -> Callable[[Path], Path]:
    return lambda root: make_zip(root / "evil.zip", {"good.wav": encode(speech(text=GOOD_TEXT)), entry: b"RIFF"})


def zip_symlink(root: Path) -> Path:
    path = root / "links.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("good.wav", encode(speech(text=GOOD_TEXT)))
        link = zipfile.ZipInfo("voice.wav")
        link.create_system = 3  # unix
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return path


def folder_symlinks(root: Path) -> Path:
    out = folder(root, with_good({}))
    (out / "voice.wav").symlink_to("/etc/passwd")
    (out / "more").symlink_to("/etc", target_is_directory=True)
    return out


def sparse_huge(root: Path) -> Path:
    out = folder(root, with_good({}))
    with open(out / "huge.wav", "wb") as fh:
        fh.truncate(201 * 1024**2)  # over the default 200 MiB per file; sparse, so nothing is really written
    return out


def zip_too_large(root: Path) -> Path:
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, 40 * SR).astype(np.float32)  # ~1.3 MB, incompressible
    return make_zip(root / "takes.zip", {"good.wav": encode(speech(text=GOOD_TEXT)), "long_take.wav": encode(noise)})


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated() -> bytes:
    data = encode(speech())
    return data[: len(data) // 2]


def nan_float() -> bytes:
    audio = speech()
    audio[1000:1010] = np.nan
    return encode(audio, subtype="FLOAT")


def wav_as(rate: int, subtype: str = "PCM_16", channels: int = 1, gain: float = 1.0, fmt: str = "WAV") -> bytes:
    audio = speech(rate) * gain
    if channels > 1:  # speech on the first channel, quieter copies on the others (a multi-mic rig)
        audio = np.stack([audio] + [audio * 0.3] * (channels - 1), axis=1)
    return encode(audio, rate, subtype, fmt)


# --- the corpus -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    kind: Kind
    names: tuple[str, ...]  # the offending file(s), or "file:line" of a transcript; each must be named
    fix: tuple[str, ...] = ()  # what the message must say (what is wrong, what to do)
    limits: dict = field(default_factory=dict)
    s3: bool = False  # also run against the S3 store


CASES = [
    # --- refused at ingest: nothing stored ---
    Case("zip-bomb", zip_bomb, "refused", ("bomb.zip",), ("zip bomb", "uncompressed or as FLAC"), s3=True),
    Case("traversal-dotdot", zip_with("../evil.wav"), "refused", ("evil.zip", "'../evil.wav'"),
         ("outside the dataset", "relative paths only"), s3=True),
    Case("traversal-nested", zip_with("ok/../../evil.wav"), "refused", ("evil.zip", "'ok/../../evil.wav'"),
         ("outside the dataset", "relative paths only")),
    Case("traversal-absolute", zip_with("/etc/cron.d/evil.wav"), "refused", ("evil.zip", "'/etc/cron.d/evil.wav'"),
         ("outside the dataset", "relative paths only")),
    Case("traversal-backslash", zip_with("..\\..\\evil.wav"), "refused", ("evil.zip", "'..\\\\..\\\\evil.wav'"),
         ("outside the dataset", "relative paths only")),
    Case("traversal-drive", zip_with("C:/Windows/evil.wav"), "refused", ("evil.zip", "'C:/Windows/evil.wav'"),
         ("outside the dataset", "relative paths only")),
    Case("zip-symlink", zip_symlink, "refused", ("links.zip", "'voice.wav'"), ("symbolic link", "plain files")),
    Case("huge-file-folder", sparse_huge, "refused", ("huge.wav",),
         ("per-file limit", "VOICEOPS_LIMITS__MAX_FILE_BYTES", "split or compress")),
    Case("huge-file-zip", zip_too_large, "refused", ("takes.zip", "long_take.wav"),
         ("per-file limit of 1 MB", "VOICEOPS_LIMITS__MAX_FILE_BYTES", "split or compress"),
         limits={"max_file_bytes": 1_000_000}),
    Case("name-escape-sequence", lambda root: make_zip(root / "names.zip", {"take\x1b[2J\x1b[H.wav": encode(speech())}),
         "refused", ("names.zip", "'take\\x1b[2J\\x1b[H.wav'"), ("control or invisible characters", "rename the file")),
    Case("name-bidi-override", lambda root: folder(root, with_good({"take\u202eexe.wav": b"MZ"})), "refused",
         ("'take\\u202eexe.wav'",), ("control or invisible characters", "rename the file")),
    Case("name-newline", lambda root: folder(root, with_good({"take\nrm -rf.wav": encode(speech())})), "refused",
         ("'take\\nrm -rf.wav'",), ("control or invisible characters", "rename the file")),
    Case("zero-byte-zip", lambda root: empty_file(root / "upload.zip"), "refused",
         ("upload.zip",), ("not a valid zip archive", "re-create it")),

    # --- the set is rejected: a transcript problem, named with its line ---
    Case("transcript-names-missing-file", lambda root: folder(root, with_good({}, f"missing.wav|{TEXT}")),
         "set_rejected", ("metadata.csv:2:", "'missing.wav'"), ("not in the dataset", "fix the path or remove the line")),
    Case("transcript-names-path-outside", lambda root: folder(root, with_good({}, "../../../etc/passwd|root")),
         "set_rejected", ("metadata.csv:2:", "'../../../etc/passwd'"),
         ("not in the dataset", "fix the path or remove the line")),
    Case("transcript-only-control-chars",
         lambda root: folder(root, with_good({"take.wav": encode(speech())}, "take.wav|\x1b[2J\x00\u200b\u202e")),
         "set_rejected", ("metadata.csv:2:", "take.wav"), ("is empty", "write the text or remove the line")),
    Case("transcript-utf16", take_with({"metadata.csv": f"take.wav|{TEXT}\n".encode("utf-16")}),
         "set_rejected", ("metadata.csv",), ("not UTF-8 text", "save it as UTF-8")),
    Case("wav-named-txt", lambda root: folder(root, with_good({"take2.txt": encode(speech())})), "set_rejected",
         ("take2.txt",), ("holds WAV audio", "rename it to take2.wav")),

    # --- one file rejected, the rest of the set passes ---
    Case("zero-length-wav", lambda root: folder(root, with_good({"empty.wav": b""}, f"empty.wav|{TEXT}")),
         "file_rejected", ("empty.wav",), ("empty (0 bytes)", "re-export or remove it"), s3=True),
    Case("text-named-wav", lambda root: folder(root, with_good({"notes.wav": "Retake line 12.\n" * 20})),
         "file_rejected", ("notes.wav",), ("not a readable audio file", "re-export it")),
    Case("random-bytes-named-wav",
         lambda root: folder(root, with_good({"take.wav": np.random.default_rng(1).bytes(4096)}, f"take.wav|{TEXT}")),
         "file_rejected", ("take.wav",), ("not a readable audio file", "re-export it")),
    Case("truncated-wav", lambda root: folder(root, with_good({"take.wav": truncated()}, f"take.wav|{TEXT}")),
         "file_rejected", ("take.wav",), ("truncated", "upload it again")),
    Case("nan-float-wav", lambda root: folder(root, with_good({"take.wav": nan_float()}, f"take.wav|{TEXT}")),
         "file_rejected", ("take.wav",), ("NaN or infinite", "re-export it as 16-bit PCM WAV")),
    *[
        Case(f"rate-{rate}", lambda root, rate=rate: folder(root, with_good({"take.wav": wav_as(rate)}, f"take.wav|{TEXT}")),
             "file_rejected", ("take.wav",), (f"recorded at {rate} Hz", "export the original recording at 16000 Hz or higher"))
        for rate in (4000, 8000, 11025)
    ],
    Case("symlinks-in-folder", folder_symlinks, "file_rejected", ("voice.wav", "more"),
         ("symbolic link not followed", "copy the real file in")),
    Case("unsupported-container", lambda root: folder(root, with_good({"take.m4a": b"\x00\x00\x00\x20ftypM4A "})),
         "file_rejected", ("take.m4a",), ("audio format not supported", "convert it to WAV or FLAC")),

    # --- legitimate but unusual audio: accepted and converted ---
    Case("pcm-u8", one_take(wav_as(SR, "PCM_U8")), "converted", ("take.wav",)),
    Case("pcm-24-48k", one_take(wav_as(48000, "PCM_24")), "converted", ("take.wav",)),
    Case("float32-over-full-scale", one_take(wav_as(44100, "FLOAT", gain=2.5)), "converted", ("take.wav",)),
    Case("stereo-44k", one_take(wav_as(44100, channels=2)), "converted", ("take.wav",), s3=True),
    Case("six-channel-48k", one_take(wav_as(48000, "PCM_24", channels=6)), "converted", ("take.wav",)),
    Case("rate-22050", one_take(wav_as(22050)), "converted", ("take.wav",)),
    Case("mp3-named-wav", one_take(wav_as(44100, "MPEG_LAYER_III", fmt="MP3")), "converted", ("take.wav",)),
    Case("ogg-named-wav", one_take(wav_as(48000, "VORBIS", fmt="OGG")), "converted", ("take.wav",)),
    Case("transcript-crlf-and-whitespace-controls",
         take_with({"metadata.csv": "\r\n".join(["", "take.wav|The\u2028quick\x0bbrown\x0cfox\x85jumps.\t", "", ""])}),
         "converted", ("take.wav",)),

    # --- control characters in transcripts: removed, the line named in a warning ---
    Case("transcript-nul", take_with({"metadata.csv": "take.wav|The quick\x00 brown fox\x00 jumps.\x00\n"}),
         "normalised", ("metadata.csv:1",), ("U+0000",)),
    Case("transcript-ansi-escapes",
         take_with({"metadata.csv": "take.wav|\x1b[1;31mThe quick brown fox\x1b[0m jumps.\x1b]0;owned\x07\x1b[2J\n"}),
         "normalised", ("metadata.csv:1",), ("U+001B",), s3=True),
    Case("transcript-bidi-override",
         take_with({"voice.list": "\u202etake.wav|alice|EN|\u2067The quick brown fox jumps.\u2069\u202c\n"}),
         "normalised", ("voice.list:1",), ("U+202E", "U+2067")),
    Case("transcript-zero-width",
         take_with({"take.txt": "The qu\u200bick bro\u200cwn fox ju\u200dmps\u00ad.\u2060\n"}),
         "normalised", ("take.txt",), ("U+200B", "U+00AD")),
    Case("transcript-stray-bom",
         take_with({"metadata.csv": "\ufeff\ufefftake.wav|The quick brown fox\ufeff jumps.\r\n"}),
         "normalised", ("metadata.csv:1",), ("U+FEFF",)),
    Case("transcript-c1-and-del",
         take_with({"metadata.csv": "take.wav|The quick brown fox\x7f jumps\x9b31m.\x07\n"}),
         "normalised", ("metadata.csv:1",), ("U+007F", "U+009B")),
]


# --- the store around the voice: snapshots and a pre-existing neighbour ---------------------------

def snapshot_tree(root: Path) -> dict[str, str]:
    """Every regular file under ``root``, symlinks never followed: its content hash (size and mtime if huge)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            st = path.stat()
            digest = f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > 8 << 20 else hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(root).as_posix()] = digest
    return out


def snapshot_bucket(client, bucket: str) -> dict[str, str]:
    """Every object in the bucket: its ETag (the MD5 of the body for a single PUT) and size."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = f"{obj['ETag']}:{obj['Size']}"
    return out


def case_settings(base: Settings, case: Case) -> Settings:
    cfg = base.model_copy(update={"qc": base.qc.model_copy(update={"min_speech_seconds": 1.0})})
    return with_limits(cfg, **case.limits) if case.limits else cfg


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory) -> Path:
    """A home where another voice went through ingest and QC, plus objects beside the voices."""
    root = tmp_path_factory.mktemp("seed")
    home = root / "home"
    cfg = Settings(home=home, mlflow_tracking_uri="http://127.0.0.1:9")
    cfg = cfg.model_copy(update={"qc": cfg.qc.model_copy(update={"min_speech_seconds": 1.0})})
    data = folder(root, {"take.wav": encode(speech(text=GOOD_TEXT)), "metadata.csv": f"take.wav|{GOOD_TEXT}\n"})
    dataset = ingest(OTHER_VOICE, str(data), cfg)
    qc_shard(dataset, 0, cfg)
    qc_report(dataset, cfg, log_to_mlflow=False)
    store = home / "store"
    (store / "models" / "base").mkdir(parents=True)
    (store / "models" / "base" / "weights.bin").write_bytes(b"base model weights")
    older = store / "voices" / VOICE / "datasets" / "0123456789abcdef"  # the voice's previous upload
    older.mkdir(parents=True)
    (older / "staged.json").write_text('{"files": ["old.wav"]}')
    record_owner(cfg, VOICE, None, str(data))  # the voice exists, the operators' (as every upload here is)
    return home


@dataclass
class Outcome:
    error: Exception | None
    dataset: dict | None
    report: dict | None


def run_upload(data: Path, settings: Settings) -> Outcome:
    """What the voice_onboarding DAG does (two QC shards), up to the QC verdict."""
    try:
        dataset = ingest(VOICE, str(data), settings, shards=2)
    except IngestError as exc:
        return Outcome(exc, None, None)
    for i in range(len(dataset["shards"])):
        qc_shard(dataset, i, settings)
    error: Exception | None = None
    try:
        qc_report(dataset, settings, log_to_mlflow=False)
    except QCRejected as exc:
        error = exc
    return Outcome(error, dataset, load_qc_report(dataset, settings))


def report_key(settings: Settings, dataset: dict) -> str:
    """report.json's key relative to the dataset prefix."""
    return qc_prefix(VOICE, dataset["data_sha256"], settings, "en").split("/")[-1] + "/report.json"


def assert_only_own_prefix_changed(before: dict[str, str], after: dict[str, str], allowed: tuple[str, ...]) -> list[str]:
    """Nothing deleted, nothing written outside ``allowed``; returns the keys written."""
    assert set(before) <= set(after), f"deleted: {sorted(set(before) - set(after))}"
    written = sorted(k for k in after if before.get(k) != after[k])
    outside = [k for k in written if not k.startswith(allowed)]
    assert outside == [], f"written outside {allowed}: {outside}"
    neighbours = {k: v for k, v in before.items() if not k.startswith(allowed)}
    assert {k: after[k] for k in neighbours} == neighbours  # byte-identical
    return written


# --- the test -------------------------------------------------------------------------------------

PARAMS = [pytest.param(c, "local", id=c.name) for c in CASES] + [
    pytest.param(c, "s3", id=f"s3-{c.name}") for c in CASES if c.s3
]


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_hostile_upload(case: Case, backend: str, seeded_home: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    shutil.copytree(seeded_home, home, symlinks=True)
    if backend == "s3":
        base: Settings = request.getfixturevalue("s3_settings").model_copy(update={"home": home})
        bucket = request.getfixturevalue("s3_bucket")
        client = s3_client(base)
        for key in snapshot_tree(home / "store"):
            client.put_object(Bucket=bucket, Key=f"store/{key}", Body=(home / "store" / key).read_bytes())
        client.put_object(Bucket=bucket, Key=f"incoming/{VOICE}/take.wav", Body=b"the user's own upload area")
        client.put_object(Bucket=bucket, Key=f"store-old/voices/{VOICE}/x", Body=b"beside the store prefix")
    else:
        base = Settings(home=home, mlflow_tracking_uri="http://127.0.0.1:9")
    settings = case_settings(base, case)
    (tmp_path / "data").mkdir()
    data = case.build(tmp_path / "data")
    bucket_before = snapshot_bucket(client, bucket) if backend == "s3" else {}
    before = snapshot_tree(tmp_path)  # the upload itself, and the whole home with its store
    assert any(k.startswith(f"home/store/voices/{OTHER_VOICE}/") for k in before)  # the neighbour is there

    out = run_upload(data, settings)

    # Where anything may be written: this upload's dataset prefix, and the voice's own scratch folder.
    own = dataset_prefix(VOICE, out.dataset["data_sha256"]) + "/" if out.dataset else None
    allowed = (f"home/cache/work/{VOICE}/",) + ((f"home/store/{own}",) if own and backend == "local" else ())
    written = assert_only_own_prefix_changed(before, snapshot_tree(tmp_path), allowed)
    if backend == "s3":
        written += assert_only_own_prefix_changed(bucket_before, snapshot_bucket(client, bucket), (f"store/{own}",) if own else ())

    if case.kind == "refused":
        assert isinstance(out.error, IngestError), out
        message = str(out.error)
        for needle in case.names + case.fix:
            assert needle in message, (needle, message)
        assert written == []  # not a stored object, not a staged copy
        assert not Path("/etc/cron.d/evil.wav").exists()
        return

    report = out.report
    assert report is not None
    stored = f"home/store/{own}" if backend == "local" else f"store/{own}"
    assert f"{stored}staged.json" in written and f"{stored}{report_key(settings, out.dataset)}" in written
    if case.kind == "set_rejected":
        assert isinstance(out.error, QCRejected), report
        message = str(out.error)
        [reason] = [r for r in report["reasons"] if r.startswith(case.names[0])]
        for needle in case.names + case.fix:
            assert needle in message and needle in reason, (needle, message)
        assert report["passed"] is False
        return

    assert out.error is None, out.error
    assert report["passed"] is True and report["reasons"] == []

    if case.kind == "file_rejected":
        assert len(report["warnings"]) == len(case.names), report["warnings"]
        for name in case.names:
            [warning] = [w for w in report["warnings"] if w.startswith(f"{name}:")]
            for needle in case.fix:
                assert needle in warning, (needle, warning)
            assert not [c for c in report["clips"] if c["file"] == name and c["status"] == "accepted"]
        assert [c["file"] for c in report["clips"] if c["status"] == "accepted"] == ["good.wav"]
        passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
        assert passwd not in snapshot_tree(home).values()  # a symlink's target is never copied
        return

    # converted or normalised: the take is accepted with exactly the spoken text
    [clip] = [c for c in report["clips"] if c["file"] == "take.wav"]
    assert clip["status"] == "accepted" and clip["reasons"] == [], clip
    assert clip["text"] == TEXT and clip["text_source"] == "provided"
    assert out.dataset["skipped"] == []
    if case.kind == "normalised":
        [warning] = report["warnings"]
        assert warning.startswith(f"{case.names[0]}: removed "), warning
        assert repr(TEXT) in warning and "fix the line" in warning
        for needle in case.fix:
            assert needle in warning, (needle, warning)
        return
    assert report["warnings"] == []
    # The stored clip (what features and training read) is mono 16-bit PCM at the project rate, unclipped.
    key = f"{qc_prefix(VOICE, out.dataset['data_sha256'], settings, 'en')}/clips/{clip['clip_id']}.wav"
    wav = artifact_store(settings).read_bytes(key)
    info = sf.info(io.BytesIO(wav))
    assert (info.channels, info.samplerate, info.subtype) == (1, settings.sample_rate, "PCM_16")
    audio, _ = sf.read(io.BytesIO(wav), dtype="float32")
    assert clip["clipped"] is False and clip["clipped_fraction"] == 0.0
    assert float(np.max(np.abs(audio))) <= PEAK_CEILING + 2 / 32768  # headroom kept, nothing at full scale
    assert loudness_lufs(audio, SR) == pytest.approx(settings.qc.target_lufs, abs=1.0)  # speech, not silence
    assert clip["duration"] == pytest.approx(len(speech()) / SR, abs=0.35)
