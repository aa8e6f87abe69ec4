"""The records onboarding's steps hand each other (voice_lib/core/handoffs.py): what the stored markers hold
loads, and goes back to JSON with the same keys and values."""

from __future__ import annotations

import json

import pytest

from voice_lib.core.handoffs import EvaluationSummary, RegisteredVoice, TrainedVoice

LINEAGE = {"base_model": "voice-base", "base_version": "shipped", "base_sha256": "a" * 64, "data_sha256": "b" * 64,
           "manifest_sha256": "c" * 64, "code_version": "0.1.0", "lora_rank": "8", "training_key": "0123456789abcdef"}
# A voices/<id>/models/<key>/voice.json as fine-tuning writes it (lineage also at the top level).
STORED_VOICE_JSON = {"voice_id": "alice", "training_key": "0123456789abcdef", "model_prefix": "voices/alice/models/0123456789abcdef",
                     "run_id": "r1", "lineage": LINEAGE, "held_out": ["a.wav", "b.wav", "c.wav"],
                     "manifest_key": "voices/alice/features/m/manifest.json", "base_dir": "/models/base", **LINEAGE,
                     "steps_trained": 600, "best_val_loss": 1.2345, "stopped_early": False, "resumed_from_step": 0,
                     "train_seconds": 312.5, "adapter_parameters": 98304}


def test_a_stored_voice_json_loads_typed_and_writes_back_the_same_keys():
    trained = TrainedVoice.from_json(json.loads(json.dumps(STORED_VOICE_JSON)))
    assert trained.voice_id == "alice" and trained.held_out == ["a.wav", "b.wav", "c.wav"] and trained.run_id == "r1"
    assert trained.lineage["lora_rank"] == "8" and trained.steps_trained == 600 and trained.best_val_loss == 1.2345
    assert trained.to_json() == STORED_VOICE_JSON  # the lineage copied at the top level is kept
    assert json.loads(json.dumps(trained.to_json(), allow_nan=False)) == STORED_VOICE_JSON  # strict JSON for XCom
    copy = trained.to_json()
    copy["lineage"]["lora_rank"] = "64"
    assert trained.lineage["lora_rank"] == "8"  # the JSON form is a copy


def test_a_record_missing_a_key_names_it_and_where_it_came_from():
    incomplete = {k: v for k, v in STORED_VOICE_JSON.items() if k not in ("held_out", "manifest_key")}
    with pytest.raises(ValueError, match=r"TrainedVoice in voices/alice/voice.json has no manifest_key, held_out"):
        TrainedVoice.from_json(incomplete, "voices/alice/voice.json")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        EvaluationSummary.from_json([], "evaluation.json")


def test_evaluation_and_registration_round_trip_with_what_newer_steps_add():
    stored = {"aggregates": {"adapted": {"wer": 0.2, "pesq": None}}, "gate_failures": [], "passed": True,
              "report_dir": "/tmp/eval", "production_version": "3", "judge": "dnsmos-v2"}  # judge: a key no field names
    summary = EvaluationSummary.from_json(stored)
    assert summary.passed and summary.aggregates["adapted"]["pesq"] is None and summary.production_version == "3"
    assert summary.gates == [] and summary.extra == {"judge": "dnsmos-v2"}
    assert summary.to_json() == {**stored, "gates": []}  # an older marker without gates loads, and gains the default
    registered = RegisteredVoice(name="voice-alice", version="4", alias="candidate")
    assert RegisteredVoice.from_json(registered.to_json()) == registered
    assert registered.to_json() == {"name": "voice-alice", "version": "4", "alias": "candidate"}  # the DAG reads ['version']
