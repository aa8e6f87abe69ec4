"""The onboarding steps as plain functions: the Airflow DAG and the CLI both call these.

Every step reads its inputs from the artifact store and writes its outputs there, keyed by the
content hash of the data and the hash of the configuration that produced them. A step whose
outputs already exist returns at once, so retries and re-runs are cheap and never double-write.
Outputs are written first and a small JSON "commit marker" last, so a crash mid-step leaves
nothing that a later step would mistake for a finished result.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.storage import Store, artifact_store

log = logging.getLogger(__name__)
QC_VERSION = 4  # 4: long transcribed recordings aligned and sliced; ASR text, log-probability and review per clip


class QCRejected(RuntimeError):
    """The dataset failed QC; the message lists every reason. Retrying will not help."""

    def __init__(self, reasons: list[str], report_uri: str):
        self.reasons = reasons
        self.report_uri = report_uri
        super().__init__("dataset rejected by QC:\n- " + "\n- ".join(reasons) + f"\nReport: {report_uri}")


def dataset_prefix(voice_id: str, data_sha256: str) -> str:
    return f"voices/{validate_voice_id(voice_id)}/datasets/{data_sha256[:16]}"


def qc_prefix(voice_id: str, data_sha256: str, settings: Settings, language: str) -> str:
    config = json.dumps({"qc": settings.qc.model_dump(), "sr": settings.sample_rate, "lang": language, "v": QC_VERSION}, sort_keys=True)
    return f"{dataset_prefix(voice_id, data_sha256)}/qc-{hashlib.sha256(config.encode()).hexdigest()[:12]}"


def _work_dir(settings: Settings, *parts: str) -> Path:
    path = settings.cache_dir.joinpath("work", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_json(store: Store, key: str) -> dict | None:
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def _write_json(store: Store, key: str, data: dict) -> str:
    return store.write_bytes(key, json.dumps(data, indent=2, default=str).encode())


# --- ingest ---------------------------------------------------------------------------------------

def ingest(voice_id: str, data_uri: str, settings: Settings, shards: int = 2, *, owner: str | None = None,
           allow_other_owner: bool = False) -> dict:
    """Stage the upload, hash it, copy it into the voice's storage prefix. Returns the dataset handle.

    ``data_uri`` must lie under the ingest roots (``Settings.ingest_roots``: the intake prefix, the upload folder
    and ``ingest.allowed_roots``), checked after resolving symlinks and '..'. ``owner`` is the tenant the voice is
    onboarded for (None: the operators); a voice another owner onboarded first is refused unless
    ``allow_other_owner`` (voice_lib.data.uploads.check_owner). Both raise IngestError before anything is read.
    """
    from voice_lib.data.staging import allowed_source
    from voice_lib.data.uploads import check_owner, record_owner

    validate_voice_id(voice_id)
    source = allowed_source(data_uri, settings)
    first_owner = check_owner(settings, voice_id, owner or None, allow_other_owner)
    store = artifact_store(settings)
    # A private folder per run: two onboardings of one voice at once staged into (and replaced) the same one.
    # The finished copy then becomes ingest/staged (the last run's upload, for inspection), under a lock.
    work = _work_dir(settings, voice_id, "ingest")
    with tempfile.TemporaryDirectory(prefix="run-", dir=work) as scratch:
        result = _ingest_staged(voice_id, source, settings, store, Path(scratch) / "staged", shards)
        _publish_staged(Path(scratch) / "staged", work / "staged")
    if first_owner:  # after the data is stored: a refused upload claims no voice id
        record_owner(settings, voice_id, owner or None, data_uri)
    return result


def _publish_staged(private: Path, shared: Path) -> None:
    import fcntl

    with open(shared.with_name(".staged.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(shared, ignore_errors=True)
        private.rename(shared)


def _ingest_staged(voice_id: str, data_uri: str, settings: Settings, store: Store, local: Path, shards: int) -> dict:
    from voice_lib.data.audio import AUDIO_EXTENSIONS
    from voice_lib.data.staging import stage_dataset

    staged = stage_dataset(data_uri, local, settings)
    prefix = dataset_prefix(voice_id, staged.data_sha256)
    marker = f"{prefix}/staged.json"
    if not store.exists(marker):
        for i, rel in enumerate(staged.files, 1):
            store.upload_file(local / rel, f"{prefix}/raw/{rel}")
            if i % 25 == 0 or i == len(staged.files):
                log.info("ingest: uploaded %d/%d files", i, len(staged.files))
        _write_json(store, marker, {**staged.to_json(), "source": data_uri, "voice_id": voice_id})
    else:
        log.info("ingest: dataset %s already stored, nothing to upload", staged.data_sha256[:16])
    audio = [f for f in staged.files if f.lower().endswith(AUDIO_EXTENSIONS)]
    from voice_lib.data.qc import shard

    return {
        "voice_id": voice_id,
        "data_sha256": staged.data_sha256,
        "dataset_uri": f"{store.uri}/{prefix}",
        "files": staged.files,
        "skipped": staged.skipped,
        "shards": shard(audio, shards),
    }


def _transcript_files(files: list[str]) -> list[str]:
    """Every staged file that is not audio: the transcript layouts (voice_lib.data.transcripts) pick theirs."""
    from voice_lib.data.audio import AUDIO_EXTENSIONS

    return [f for f in files if not f.lower().endswith(AUDIO_EXTENSIONS)]


def load_qc_report(dataset: dict, settings: Settings, language: str = "en") -> dict:
    """The stored QC report (report.json) of a dataset handle returned by ``ingest``."""
    store = artifact_store(settings)
    key = f"{qc_prefix(dataset['voice_id'], dataset['data_sha256'], settings, language)}/report.json"
    return json.loads(store.read_bytes(key))


def _download_raw(store: Store, prefix: str, rels: list[str], dest: Path) -> None:
    for rel in rels:
        target = dest / rel
        if not target.exists():
            store.download_to(f"{prefix}/raw/{rel}", target)


# --- qc -------------------------------------------------------------------------------------------

def qc_shard(dataset: dict, shard_index: int, settings: Settings, language: str = "en") -> dict:
    """Analyse one shard of files: clips, measurements and embeddings to storage."""
    from voice_lib.data.qc import analyze_shard, save_shard_result
    from voice_lib.data.transcripts import read_transcripts

    store = artifact_store(settings)
    voice_id, sha = dataset["voice_id"], dataset["data_sha256"]
    qc_key = qc_prefix(voice_id, sha, settings, language)
    marker = f"{qc_key}/shards/{shard_index:03d}.json"
    if store.exists(marker):
        log.info("qc shard %d: already done", shard_index)
        return {"shard": shard_index, "marker": marker, "cached": True}
    rels = dataset["shards"][shard_index]
    work = _work_dir(settings, voice_id, sha[:16], f"qc-shard-{shard_index}")
    raw = work / "raw"
    _download_raw(store, dataset_prefix(voice_id, sha), rels + _transcript_files(dataset["files"]), raw)
    index = read_transcripts(raw, dataset["files"])
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    done = 0

    def progress(rel: str) -> None:
        nonlocal done
        done += 1
        log.info("qc shard %d: %d/%d files (%s)", shard_index, done, len(rels), rel)

    clips, failures = analyze_shard(raw, rels, index.by_audio, settings, language, out, on_file=progress)
    for c in clips:
        store.upload_file(out / "clips" / f"{c.clip_id}.wav", f"{qc_key}/clips/{c.clip_id}.wav")
        store.upload_file(out / "embeddings" / f"{c.clip_id}.npy", f"{qc_key}/embeddings/{c.clip_id}.npy")
    save_shard_result(out / "result.json", clips, failures)
    store.upload_file(out / "result.json", marker)
    return {"shard": shard_index, "marker": marker, "cached": False, "clips": len(clips), "failures": len(failures)}


def qc_report(dataset: dict, settings: Settings, language: str = "en", log_to_mlflow: bool = True) -> dict:
    """Whole-set QC decisions, the JSON/HTML report, and the MLflow run. Raises QCRejected on failure."""
    from voice_lib.data.qc import load_shard_result, summarize
    from voice_lib.data.qc_report import log_qc_report, render_qc_report
    from voice_lib.data.transcripts import read_transcripts

    store = artifact_store(settings)
    voice_id, sha = dataset["voice_id"], dataset["data_sha256"]
    qc_key = qc_prefix(voice_id, sha, settings, language)
    report_key = f"{qc_key}/report.json"
    existing = _read_json(store, report_key)
    if existing is None:
        clips, failures, embeddings = [], [], {}
        for i in range(len(dataset["shards"])):
            c, f = load_shard_result(json.loads(store.read_bytes(f"{qc_key}/shards/{i:03d}.json")))
            clips += c
            failures += f
        for c in clips:
            embeddings[c.clip_id] = np.load(io.BytesIO(store.read_bytes(f"{qc_key}/embeddings/{c.clip_id}.npy")))
        work = _work_dir(settings, voice_id, sha[:16], "qc-report")
        _download_raw(store, dataset_prefix(voice_id, sha), _transcript_files(dataset["files"]), work / "raw")
        transcripts = read_transcripts(work / "raw", dataset["files"])
        report = summarize(voice_id, clips, embeddings, failures, transcripts.problems, settings, language, sha,
                           dataset.get("skipped"), transcripts.warnings)
        report_dir = work / "report"
        shutil.rmtree(report_dir, ignore_errors=True)
        clip_dir = work / "clips"
        for c in report.clips:
            if not (clip_dir / f"{c.clip_id}.wav").exists():
                store.download_to(f"{qc_key}/clips/{c.clip_id}.wav", clip_dir / f"{c.clip_id}.wav")
        files = render_qc_report(report, clip_dir, report_dir)
        for path in files:
            store.upload_file(path, f"{qc_key}/report/{path.relative_to(report_dir).as_posix()}")
        run = log_qc_report(report, report_dir, settings) if log_to_mlflow else {}
        existing = {**report.to_json(), "report_html": f"{store.uri}/{qc_key}/report/report.html", **run}
        _write_json(store, report_key, existing)  # written last: the commit marker of this step
    summary = {k: existing.get(k) for k in ("passed", "speech_seconds", "reasons", "warnings", "report_html", "mlflow_run_id", "mlflow_run_url")}
    summary["qc_prefix"] = qc_key
    summary["accepted"] = [c["clip_id"] for c in existing["clips"] if c["status"] == "accepted"]
    summary["to_review"] = [c["clip_id"] for c in existing["clips"]
                            if c["status"] == "accepted" and c.get("review") and not c.get("reviewed")]
    if not existing["passed"]:
        raise QCRejected(existing["reasons"], existing["report_html"])
    return summary


# --- features -------------------------------------------------------------------------------------

def features_shard(dataset: dict, qc: dict, shard_index: int, shards: int, settings: Settings, language: str = "en") -> dict:
    from voice_lib.data.audio import decode_audio
    from voice_lib.data.features import (
        ClipFeatures,
        FeatureConfig,
        cache_key,
        extract_clip_features,
    )

    from voice_lib.pipelines.review import load_report

    store = artifact_store(settings)
    config = FeatureConfig(sample_rate=settings.sample_rate)
    report = load_report(qc, settings)  # the reviewed copy once the transcript review answered
    clips = report.trainable[shard_index::shards]
    feat_key = f"{qc['qc_prefix']}/features-{config.digest}"
    todo = []
    for clip in clips:
        key = cache_key(clip.pcm_sha256, clip.text or "", clip.language, config)
        target = _features_key(feat_key, clip, key)
        if not (store.exists(target) and ClipFeatures.from_npz_bytes(store.read_bytes(target)).cache_key == key):
            todo.append((clip, target))

    def extract(clip) -> bytes:
        decoded = decode_audio(store.read_bytes(f"{qc['qc_prefix']}/clips/{clip.clip_id}.wav"), settings.sample_rate, clip.clip_id)
        return extract_clip_features(decoded.audio, clip.text or "", clip.language, clip.pcm_sha256, config).to_npz_bytes()

    # WORLD analysis releases the GIL: the clips of a shard are analysed on every core (written here, in order).
    threads = min(len(todo), settings.train.feature_threads or len(os.sched_getaffinity(0))) or 1
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="features") as pool:
        for i, ((_, target), npz) in enumerate(zip(todo, pool.map(extract, [clip for clip, _ in todo])), 1):
            store.write_bytes(target, npz)
            if i % 10 == 0 or i == len(todo):
                log.info("features shard %d: %d/%d clips computed (%d cached)", shard_index, i, len(todo),
                         len(clips) - len(todo))
    return {"shard": shard_index, "clips": len(clips), "computed": len(todo), "cached": len(clips) - len(todo)}


def _features_key(feat_key: str, clip, cache_key: str) -> str:
    # A text edited in the review gets its own file: the manifest of the unreviewed text keeps pointing at its own.
    return f"{feat_key}/{clip.clip_id}{'-' + cache_key[:12] if clip.reviewed == 'edited' else ''}.npz"


def features_manifest(dataset: dict, qc: dict, settings: Settings) -> dict:
    """The dataset manifest: every clip with its text, phonemes and content hashes, plus the voice embedding."""
    from voice_lib.data.features import ClipFeatures, FeatureConfig, cache_key
    from voice_lib.data.speech import centroid
    from voice_lib.pipelines.review import load_report

    store = artifact_store(settings)
    config = FeatureConfig(sample_rate=settings.sample_rate)
    feat_key = f"{qc['qc_prefix']}/features-{config.digest}"
    report = load_report(qc, settings)
    entries, embeddings = [], []
    for clip in report.trainable:
        features = _features_key(feat_key, clip, cache_key(clip.pcm_sha256, clip.text or "", clip.language, config))
        npz = store.read_bytes(features)
        feats = ClipFeatures.from_npz_bytes(npz)
        wav = store.read_bytes(f"{qc['qc_prefix']}/clips/{clip.clip_id}.wav")
        embeddings.append(np.load(io.BytesIO(store.read_bytes(f"{qc['qc_prefix']}/embeddings/{clip.clip_id}.npy"))))
        entries.append({
            "clip_id": clip.clip_id, "source_file": clip.file, "text": clip.text, "text_source": clip.text_source,
            "language": clip.language, "phonemes": feats.phonemes, "frames": feats.frames, "duration": clip.duration,
            "wav": f"{qc['qc_prefix']}/clips/{clip.clip_id}.wav", "wav_sha256": hashlib.sha256(wav).hexdigest(),
            "features": features, "features_sha256": hashlib.sha256(npz).hexdigest(),
        })
    manifest_sha = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    # One manifest per review answer: the unreviewed one and each reviewed one are different datasets.
    manifest_key = f"{feat_key}/manifest{'-' + qc['review_digest'] if qc.get('review_digest') else ''}.json"
    previous = _read_json(store, manifest_key)
    if previous and previous.get("manifest_sha256") == manifest_sha:
        log.info("features: manifest unchanged (%d clips), nothing to write", len(entries))
        return {"manifest_uri": f"{store.uri}/{manifest_key}", "manifest_key": manifest_key, "manifest_sha256": manifest_sha, "clips": len(entries)}
    speaker = centroid(np.stack(embeddings))
    buf = io.BytesIO()
    np.save(buf, speaker)
    store.write_bytes(f"{feat_key}/speaker_embedding.npy", buf.getvalue())
    manifest = {
        "voice_id": dataset["voice_id"], "data_sha256": dataset["data_sha256"], "feature_config": asdict(config),
        "speaker_embedding": f"{feat_key}/speaker_embedding.npy", "speech_seconds": round(sum(c.speech_seconds for c in report.trainable), 2),
        "review": qc.get("review"),  # who reviewed the transcripts, what was edited and dropped
        "clips": entries,
    }
    manifest["manifest_sha256"] = manifest_sha
    uri = _write_json(store, manifest_key, manifest)  # written last: the commit marker of this step
    log.info("features: manifest of %d clips at %s", len(entries), uri)
    return {"manifest_uri": uri, "manifest_key": manifest_key, "manifest_sha256": manifest_sha, "clips": len(entries)}
