"""Training checkpoints a worker can trust when it resumes: recorded in the MLflow run, verified before loading.

A retried train task may run on a fresh worker, which fetches the step checkpoint from the artifact store
(``voices/<id>/checkpoints/<key>.pt``). Anyone who can write to that bucket could plant a file there, so:

- ``fit`` loads checkpoints with ``torch.load(weights_only=True)``: tensors and plain containers only, never
  code (voice_lib/train/loop.py);
- every checkpoint written is hashed and its sha256 set on the training run as ``voiceops.checkpoint_sha256``
  (the run is reused by the retry: voice_lib.core.tracking.start_run), before it is copied to the store;
- ``restore_checkpoint`` resumes only from a file with that sha256: a local checkpoint that does not match
  (truncated by a full disk, or not this run's) is fetched again from the store, and a store copy that does
  not match is not loaded at all (training starts over, which costs time and nothing else). A run that has
  recorded no checkpoint trusts none.

Without an MLflow run (``log_to_mlflow=False``: tests, offline use) nothing is recorded and the files are
taken as they are; the weights-only load still holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from voice_lib.core.config import Settings
from voice_lib.core.hashing import sha256_file
from voice_lib.core.tracking import mlflow_client

log = logging.getLogger(__name__)

CHECKPOINT_SHA256_TAG = "voiceops.checkpoint_sha256"


class CheckpointLedger:
    """The sha256 of the newest checkpoint of one training run, kept in the run's tags."""

    def __init__(self, settings: Settings, run_id: str | None) -> None:
        self.run_id = run_id
        self._client = mlflow_client(settings) if run_id else None

    @property
    def tracked(self) -> bool:
        return self._client is not None

    def recorded(self) -> str | None:
        """The sha256 the run recorded last, or None if it recorded none (or there is no run)."""
        if self._client is None:
            return None
        return self._client.get_run(self.run_id).data.tags.get(CHECKPOINT_SHA256_TAG)

    def record(self, path: Path) -> str:
        """Hash ``path`` and set it on the run (MLflow errors propagate: the caller decides)."""
        digest = sha256_file(path)
        if self._client is not None:
            self._client.set_tag(self.run_id, CHECKPOINT_SHA256_TAG, digest)
        return digest


def restore_checkpoint(store, key: str, local: Path, ledger: CheckpointLedger) -> Path:
    """The local checkpoint path, holding a checkpoint this run recorded (or nothing: start at step 0).

    A retry of the train task may run on another worker than the one that died, and must resume all the same:
    the store's copy is fetched when the local one is missing or does not match the run's sha256."""
    if not ledger.tracked:
        if not local.exists() and store.exists(key):
            store.download_to(key, local)
            log.info("fetched checkpoint %s from the artifact store to resume on this worker", key)
        return local
    expected = ledger.recorded()
    if expected is None:
        if local.exists() or store.exists(key):
            log.warning("run %s recorded no checkpoint: the checkpoint at %s / %s is not trusted; training starts "
                        "at step 0", ledger.run_id, local, key)
        local.unlink(missing_ok=True)
        return local
    if local.exists() and sha256_file(local) != expected:
        log.warning("local checkpoint %s does not match the sha256 recorded in run %s (corrupt or stale); "
                    "fetching it again from the artifact store", local, ledger.run_id)
        local.unlink()
    if not local.exists() and store.exists(key):
        store.download_to(key, local)
        if sha256_file(local) != expected:
            log.error("checkpoint %s in the artifact store does not match the sha256 recorded in run %s: not "
                      "loading it (training starts at step 0); check who can write to the bucket", key, ledger.run_id)
            local.unlink()
        else:
            log.info("fetched checkpoint %s from the artifact store to resume on this worker (sha256 verified)", key)
    return local


def mirror_checkpoint(store, ledger: CheckpointLedger, path: Path, key: str, step: int) -> None:
    """Record a step checkpoint's sha256 in the run, then copy it to the artifact store. A failure of either
    does not stop training: the local checkpoint still serves a retry on this machine (when its sha256 made it
    into the run), and the next checkpoint tries again."""
    from voice_lib.core.storage import StorageError

    try:
        ledger.record(path)
    except Exception as exc:  # noqa: BLE001 - MLflow's client raises several types; training goes on
        log.warning("could not record the step-%d checkpoint's sha256 in run %s (%s); a retry will not trust "
                    "it", step, ledger.run_id, exc)
    try:
        store.upload_file(path, key)
        log.info("checkpoint at step %d copied to %s", step, key)
    except (StorageError, OSError) as exc:
        log.warning("could not copy the step-%d checkpoint to the artifact store (%s); training goes on", step, exc)
