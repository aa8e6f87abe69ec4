"""The evaluation gates reject a deliberately broken adapter, and registration records why."""

from __future__ import annotations

import pytest
import torch

from voice_lib.core.storage import artifact_store
from voice_lib.pipelines import onboarding


@pytest.mark.slow
def test_gates_reject_a_broken_adapter(settings, mlflow_server, clean_voice):
    from safetensors.torch import load, save

    from voice_lib.pipelines.evaluation import evaluate_voice
    from voice_lib.pipelines.training import finetune_voice
    from voice_lib.release.registration import GatesFailed, register_voice
    from voice_lib.release.registry import Registry

    settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    dataset = onboarding.ingest("gate-bad", str(clean_voice), settings, shards=1)
    onboarding.qc_shard(dataset, 0, settings)
    qc = onboarding.qc_report(dataset, settings, log_to_mlflow=False)
    onboarding.features_shard(dataset, qc, 0, 1, settings)
    manifest = onboarding.features_manifest(dataset, qc, settings)
    trained = finetune_voice("gate-bad", manifest["manifest_key"], settings, rank=4, steps=4)

    # Break the adapter: blow up every LoRA B matrix, as a diverged training run would.
    store = artifact_store(settings)
    key = f"{trained['model_prefix']}/adapter_model.safetensors"
    weights = load(store.read_bytes(key))
    torch.manual_seed(0)
    broken = {k: torch.randn_like(v) * 5.0 if "lora_B" in k else v for k, v in weights.items()}
    store.write_bytes(key, save(broken))

    evaluation = evaluate_voice(settings, trained)
    assert not evaluation["passed"]
    failures = evaluation["gate_failures"]
    assert failures and all("VOICEOPS_EVAL__" in f for f in failures)
    assert any("speaker_similarity" in f or "bad_output_rate" in f or "stoi" in f for f in failures)

    with pytest.raises(GatesFailed) as caught:
        register_voice(settings, trained, evaluation)
    assert "rejected by the evaluation gates" in str(caught.value)
    registry = Registry(settings)
    assert registry.version_by_alias("voice-gate-bad", "candidate") is None
    version = registry.version("voice-gate-bad", caught.value.version)
    assert version.tags.get("rejected") == "true"
    assert version.tags.get("reason")
