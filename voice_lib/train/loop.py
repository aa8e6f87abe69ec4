"""Training: base pretraining on a multi-speaker corpus and LoRA fine-tuning on one voice.

Every loop of both backends is the same small function (``fit_task``) over a ``TrainingTask`` that
draws a batch and computes its loss (``VoiceModelTask`` for the end-to-end model, the converter's task
in ``voice_lib.train.convert``): fixed seeds, AdamW, validation on held-out clips
with early stopping, and checkpoints written atomically every ``checkpoint_every`` steps so a
retried Airflow task resumes where the killed one stopped instead of starting over. Metrics go to a
callback (the pipeline sends them to MLflow); this module knows nothing about MLflow or Airflow.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from voice_lib.core.storage import atomic_write
from voice_lib.data.datasets import Example
from voice_lib.model.network import FEATURE_DIM, VoiceModel

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Batch:
    phonemes: torch.Tensor
    phone_lengths: torch.Tensor
    speaker: torch.Tensor
    features: torch.Tensor
    frame_lengths: torch.Tensor


def collate(examples: list[Example], model: VoiceModel) -> Batch:
    r = model.cfg.reduction
    n = max(len(e.phoneme_ids) for e in examples)
    t = max(len(e.features) // r * r for e in examples)
    phonemes = torch.zeros(len(examples), n, dtype=torch.long)
    features = torch.zeros(len(examples), t, FEATURE_DIM)
    for i, e in enumerate(examples):
        phonemes[i, : len(e.phoneme_ids)] = torch.from_numpy(e.phoneme_ids.astype(np.int64))
        frames = len(e.features) // r * r
        features[i, :frames] = model.normalize(torch.from_numpy(e.features[:frames]))
    return Batch(
        phonemes=phonemes,
        phone_lengths=torch.tensor([len(e.phoneme_ids) for e in examples]),
        speaker=torch.from_numpy(np.stack([e.speaker for e in examples])).float(),
        features=features,
        frame_lengths=torch.tensor([len(e.features) // r * r for e in examples]),
    )


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    eval_every: int = 100
    checkpoint_every: int = 100
    patience: int = 5  # evaluations without improvement before stopping early
    seed: int = 1234
    threads: int = 0  # 0: torch's default (all cores)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    step: int
    best_val_loss: float
    stopped_early: bool
    resumed_from: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path) as fh:  # a kill mid-save leaves the previous checkpoint intact
        torch.save(obj, fh)


def load_checkpoint(path: Path) -> dict:
    """A step checkpoint, loaded as tensors and plain containers only: a file that would unpickle anything
    else (code planted in the artifact store) is refused, never run (voice_lib/train/resume.py)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page long and suggests weights_only=False; keep the line that says what was found
        found = next((line.split("error:", 1)[-1].strip() for line in str(exc).splitlines()
                      if "Unsupported global" in line), "not plain weights")
        raise ValueError(f"checkpoint {path} holds more than weights and was not loaded ({found}); delete it to "
                         "train from step 0, and check who can write to the artifact store") from exc


def trainable_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if _is_trainable(model, k)}


def _is_trainable(model: torch.nn.Module, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and params[key].requires_grad


class TrainingTask(Protocol):
    """What a training loop needs of a model's data: a random batch's losses, and a validation loss."""

    def batch_losses(self, model: torch.nn.Module, rng: random.Random) -> dict[str, torch.Tensor]:
        """Losses of one random training batch; the key ``loss`` is the one minimised."""
        ...

    def validation_loss(self, model: torch.nn.Module) -> float | None:
        """Mean loss on the validation set (``None`` without one: the last training loss is used)."""
        ...


@torch.no_grad()
def validation_loss(model: torch.nn.Module, examples: list[Example], base: VoiceModel, batch_size: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        b = collate(chunk, base)
        out = model(b.phonemes, b.phone_lengths, b.speaker, b.features, b.frame_lengths)
        total += float(out["loss"]) * len(chunk)
        count += len(chunk)
    model.train()
    return total / max(1, count)


@dataclass
class VoiceModelTask:
    """The end-to-end model's data: phonemes and WORLD features of clips (``base`` normalises them)."""

    base: VoiceModel
    train: list[Example]
    val: list[Example]
    batch_size: int

    def batch_losses(self, model: torch.nn.Module, rng: random.Random) -> dict[str, torch.Tensor]:
        batch = collate(rng.sample(self.train, min(self.batch_size, len(self.train))), self.base)
        out = model(batch.phonemes, batch.phone_lengths, batch.speaker, batch.features, batch.frame_lengths)
        return {k: v for k, v in out.items() if k != "durations"}

    def validation_loss(self, model: torch.nn.Module) -> float | None:
        return validation_loss(model, self.val, self.base) if self.val else None


def fit(
    model: torch.nn.Module,
    base: VoiceModel,
    train: list[Example],
    val: list[Example],
    cfg: TrainConfig,
    checkpoint: Path,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> FitResult:
    """Train the end-to-end model's parameters that require grad. ``base`` is the underlying VoiceModel
    (the same object for pretraining; the model under the LoRA wrapper for fine-tuning)."""
    return fit_task(model, VoiceModelTask(base, train, val, cfg.batch_size), cfg, checkpoint, on_metrics, on_checkpoint)


def fit_task(
    model: torch.nn.Module,
    task: TrainingTask,
    cfg: TrainConfig,
    checkpoint: Path,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> FitResult:
    """Train the parameters of ``model`` that require grad on ``task``, resuming from ``checkpoint``.
    ``on_checkpoint(path, step)`` runs after each checkpoint is written (e.g. to copy it off the machine)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    step, best, best_state, bad_evals, resumed_from, history = 0, float("inf"), None, 0, 0, []
    earlier_seconds = 0.0  # training time of the runs this one resumes, so reports show the total
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, best, bad_evals, history = state["step"], state["best_val_loss"], state["bad_evals"], state["history"]
        earlier_seconds = state.get("seconds", 0.0)
        best_state = state.get("best_state")
        random.setstate(state["py_random"])
        resumed_from = step
        log.info("resumed from %s at step %d (best validation loss %.4f)", checkpoint, step, best)
    rng = random.Random(cfg.seed + step)
    model.train()
    started = time.monotonic()
    stopped_early = False
    while step < cfg.steps:
        out = task.batch_losses(model, rng)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        metrics = {k: float(v.detach()) for k, v in out.items()}
        if on_metrics and (step % 10 == 0 or step == 1):
            on_metrics(step, {f"train_{k}": v for k, v in metrics.items()} | {"lr": schedule.get_last_lr()[0]})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = task.validation_loss(model)
            val_loss = metrics["loss"] if val_loss is None else val_loss
            history.append({"step": step, "val_loss": val_loss, "train_loss": metrics["loss"]})
            log.info("step %d/%d: train loss %.4f, validation loss %.4f (%.0f s)", step, cfg.steps, metrics["loss"], val_loss, time.monotonic() - started)
            if on_metrics:
                on_metrics(step, {"val_loss": val_loss})
            if val_loss < best - 1e-4:
                best, bad_evals, best_state = val_loss, 0, trainable_state(model)
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    stopped_early = True
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped_early:
            _save_atomic({
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "step": step, "best_val_loss": best, "bad_evals": bad_evals,
                "history": history, "best_state": best_state, "py_random": random.getstate(),
                "seconds": earlier_seconds + time.monotonic() - started,
            }, checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint, step)
        if stopped_early:
            log.info("early stop at step %d: no validation improvement in %d evaluations", step, cfg.patience)
            break
    if best_state is not None:  # keep the best weights, not the last
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return FitResult(step, best, stopped_early, resumed_from, earlier_seconds + time.monotonic() - started, history)


def pick_device() -> torch.device:
    """CUDA when present, else CPU (the default on this project's machines)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
