"""Training examples from the two places they come from: a synthetic corpus folder (base pretraining)
and an onboarded voice's feature manifest in the artifact store (LoRA fine-tuning)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.data.features import (
    ClipFeatures,
    FeatureConfig,
    cache_key,
    extract_clip_features,
)

log = logging.getLogger(__name__)


def _prepare_corpus_clip(args: tuple) -> tuple[str, str, bytes, bytes]:
    """Worker: trim, normalise and featurize one corpus clip. Returns (speaker, clip_id, npz, embedding)."""
    wav_path, speaker, text, language, config, cache_dir = args
    from voice_lib.data.audio import decode_audio, normalize_loudness, pcm_sha256
    from voice_lib.data.speech import detect_speech, speaker_embedding

    sr = config.sample_rate
    audio = decode_audio(Path(wav_path), sr).audio
    segments = detect_speech(audio, sr)
    if segments:  # same trimming as QC: speech plus 150 ms either side
        pad = int(0.15 * sr)
        audio = audio[max(0, segments[0].start - pad): segments[-1].end + pad]
    audio, _ = normalize_loudness(audio, sr, -23.0)
    key = cache_key(pcm_sha256(audio), text, language, config)
    cached = Path(cache_dir) / f"{key}.npz"
    if cached.exists():
        npz = cached.read_bytes()
    else:
        npz = extract_clip_features(audio, text, language, pcm_sha256(audio), config).to_npz_bytes()
        cached.write_bytes(npz)
    buf = io.BytesIO()
    np.save(buf, speaker_embedding(audio, sr))
    return speaker, Path(wav_path).stem, npz, buf.getvalue()


def featurize_corpus(corpus_dir: Path, settings: Settings, workers: int = 2, config: FeatureConfig | None = None
                     ) -> list[Example]:
    """Every clip of a corpus (``corpus.list``) as a training example; features cached by content.
    ``config`` defaults to the end-to-end model's features at the settings' sample rate."""
    from voice_lib.data.speech import centroid

    config = config or FeatureConfig(sample_rate=settings.sample_rate)
    cache_dir = settings.cache_dir / "features"
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for line in (corpus_dir / "corpus.list").read_text().splitlines():
        rel, speaker, language, text = line.split("|", 3)
        jobs.append((str(corpus_dir / rel), speaker, text, language.lower(), config, str(cache_dir)))
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, result in enumerate(pool.map(_prepare_corpus_clip, jobs, chunksize=4), 1):
            results.append(result)
            if i % 50 == 0 or i == len(jobs):
                log.info("featurize corpus: %d/%d clips", i, len(jobs))
    by_speaker: dict[str, list[np.ndarray]] = {}
    for speaker, _, _, emb in results:
        by_speaker.setdefault(speaker, []).append(np.load(io.BytesIO(emb)))
    speaker_vectors = {s: centroid(np.stack(v)) for s, v in by_speaker.items()}
    examples = []
    for speaker, clip_id, npz, _ in results:
        feats = ClipFeatures.from_npz_bytes(npz)
        examples.append(Example(f"{speaker}/{clip_id}", feats.phoneme_ids, feature_matrix(feats), speaker_vectors[speaker]))
    return examples


def voice_examples(manifest: dict, settings: Settings) -> list[Example]:
    """Examples of one onboarded voice from its feature manifest (voice_lib.pipelines.onboarding.features_manifest)."""
    from voice_lib.core.storage import artifact_store

    store = artifact_store(settings)
    speaker = np.load(io.BytesIO(store.read_bytes(manifest["speaker_embedding"]))).astype(np.float32)
    examples = []
    for clip in manifest["clips"]:
        data = store.read_bytes(clip["features"])
        if hashlib.sha256(data).hexdigest() != clip["features_sha256"]:
            raise ValueError(f"{clip['features']}: content hash does not match the manifest; re-run the features step.")
        feats = ClipFeatures.from_npz_bytes(data)
        examples.append(Example(clip["clip_id"], feats.phoneme_ids, feature_matrix(feats), speaker))
    return examples


def split_holdout(examples: list[Example], fraction: float = 0.1, minimum: int = 3, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``fraction`` of the clips, at least ``minimum``, chosen by a fixed seed."""
    order = sorted(examples, key=lambda e: e.clip_id)
    random.Random(seed).shuffle(order)
    n = min(len(order) - 1, max(minimum, round(len(order) * fraction)))
    return order[n:], order[:n]


def load_manifest(settings: Settings, manifest_key: str) -> dict:
    from voice_lib.core.storage import artifact_store

    return json.loads(artifact_store(settings).read_bytes(manifest_key))


@dataclass
class Example:
    clip_id: str
    phoneme_ids: np.ndarray  # (n,) int
    features: np.ndarray  # (T, FEATURE_DIM) raw (unnormalised) WORLD features
    speaker: np.ndarray  # (256,) GE2E embedding of the voice


def continuous_lf0(lf0: np.ndarray, vuv: np.ndarray) -> np.ndarray:
    """Interpolate log F0 through unvoiced frames: a smooth target the decoder can regress."""
    voiced = np.flatnonzero(vuv > 0.5)
    if len(voiced) == 0:
        return np.full_like(lf0, math.log(150.0))
    return np.interp(np.arange(len(lf0)), voiced, lf0[voiced]).astype(np.float32)


def feature_matrix(feats: ClipFeatures) -> np.ndarray:
    """ClipFeatures → (T, 63): [continuous lf0, vuv, envelope(60), aperiodicity(1)]."""
    return np.concatenate(
        [continuous_lf0(feats.lf0, feats.vuv)[:, None], feats.vuv[:, None], feats.envelope, feats.aperiodicity[:, :1]],
        axis=1,
    ).astype(np.float32)


def split_features(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``feature_matrix`` for the vocoder: (lf0, vuv, envelope, aperiodicity)."""
    vuv = (matrix[:, 1] > 0.5).astype(np.float32)
    return matrix[:, 0], vuv, matrix[:, 2:62], matrix[:, 62:63]


def feature_stats(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.concatenate([e.features for e in examples])
    return stacked.mean(0), np.maximum(stacked.std(0), 1e-3)
