"""The records one onboarding step hands the next: fine-tuning → evaluation → registration.

Airflow passes them between tasks as XCom, which takes strict JSON, and the store keeps them as commit markers
(``voices/<id>/models/<key>/voice.json`` and ``evaluation.json``, and the ``voice.json`` of every registered
version). So each is a dataclass with ``to_json()`` / ``from_json()``: library functions take and return the
dataclass, the DAG tasks pass the JSON form. The JSON keys are the ones the markers were always written with.

Keys a record does not name (the lineage that fine-tuning also writes at the top level of ``voice.json``, or
what a newer step adds) are kept in ``extra`` and written back by ``to_json()``, so a marker read and written
again loses nothing. A missing key that a record needs is a ValueError naming it.

They live in ``core`` because every layer reads them: training writes ``TrainedVoice``, evaluation and release
read it, and ``voice_lib.release.models`` reads the registered ``voice.json``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

R = TypeVar("R", bound="JsonRecord")


@dataclass
class JsonRecord:
    """A dataclass with a JSON form; subclasses only declare fields."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    @classmethod
    def _named(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any], source: str = "") -> R:
        """The record from its JSON object; ``source`` (a file or key) is named in errors."""
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}{where}: expected a JSON object, got {type(data).__name__}.")
        required = [f.name for f in fields(cls) if f.name != "extra" and f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{cls.__name__}{where} has no {', '.join(missing)} (keys: {', '.join(sorted(data)) or 'none'}); "
                             f"it was not written by this step, or by a VoiceOps too old to read: run the step again.")
        named = cls._named()
        return cls(**{k: copy.deepcopy(data[k]) for k in named if k in data},
                   extra={k: copy.deepcopy(v) for k, v in data.items() if k not in named})

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (a copy: changing it does not change the record)."""
        return copy.deepcopy({**self.extra, **{k: getattr(self, k) for k in self._named()}})


@dataclass
class TrainedVoice(JsonRecord):
    """A fine-tuned voice in the store, as ``finetune_voice`` hands it on (and the ``voice.json`` marker)."""

    voice_id: str
    training_key: str  # what the adapter was computed from (manifest, base, rank, recipe, code)
    model_prefix: str  # the store folder of the adapter, speaker embedding, model card and markers
    manifest_key: str
    base_dir: str  # the base it was tuned on, on the machine that trained it
    held_out: list[str]  # clip ids evaluation uses, never trained on
    lineage: dict[str, str]  # the registry tags: base model/version/sha256, data sha256, code version, rank, key
    run_id: str | None = None  # the MLflow training run; None without tracking
    steps_trained: int = 0
    best_val_loss: float | None = None
    stopped_early: bool = False
    resumed_from_step: int = 0
    train_seconds: float = 0.0
    adapter_parameters: int = 0

    @property
    def backend(self) -> str:
        """The acoustic backend, from the lineage (markers written before the two-stage backend: end_to_end)."""
        return str(self.lineage.get("backend") or self.extra.get("backend") or "end_to_end")


@dataclass
class EvaluationSummary(JsonRecord):
    """The held-out evaluation of a trained voice, with the gates as they were applied (``evaluation.json``)."""

    aggregates: dict[str, dict[str, float | None]]  # {system: {metric: value}}; NaN written as null
    gate_failures: list[str]  # one message per missed gate, naming the VOICEOPS_EVAL__ setting
    passed: bool
    report_dir: str  # the HTML report's folder on the machine that evaluated
    gates: list[dict[str, Any]] = field(default_factory=list)  # every gate as applied (voice_lib.eval.gates)
    production_version: str | None = None  # the production version the evaluation compared with, if any


@dataclass
class RegisteredVoice(JsonRecord):
    """The registry version ``register_voice`` made: ``voice-<id>`` version N under ``alias``."""

    name: str
    version: str
    alias: str
