"""The evaluation gates: each default threshold fails and passes on the right side (issue 13's Done-when), the
production-relative DNSMOS rule reads the production version from the registry, and a deliberately broken adapter
is rejected with registration recording why."""

from __future__ import annotations

import pytest
import torch
from conftest import PINNED_MODEL

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.core.storage import artifact_store
from voice_lib.eval.gates import ProductionReference, check_gates, gate_checks
from voice_lib.pipelines import onboarding

EPS = 0.01


def aggregates(**adapted) -> dict:
    """Aggregates of a clone that passes every default gate, with ``adapted`` overriding its metrics."""
    real = {"wer": 0.05, "p808_mos": 3.5, "speaker_similarity": 0.95}
    base = {"speaker_similarity": 0.60, "p808_mos": 3.0}
    good = {"speaker_similarity": 0.85, "pesq": 2.0, "stoi": 0.8, "p808_mos": 3.4, "bad_output_rate": 0.0, "rtf": 0.05,
            "wer": 0.10, "wer_gap_over_real": 0.05, "p808_gap_below_real": 0.1} | adapted
    return {"real": real, "vocoder": {}, "base": base, "adapted": good}


def failed(agg: dict, production: ProductionReference | None = None, ev: EvalSettings | None = None) -> set[str]:
    return {g.gate for g in check_gates(agg, ev or EvalSettings(), production=production)}


def test_default_gates_are_the_done_when():
    ev = Settings().eval
    assert (ev.max_wer_gap_over_real, ev.min_speaker_similarity, ev.min_similarity_gain_over_base,
            ev.max_p808_gap_below_real, ev.max_p808_drop_below_production) == (0.10, 0.80, 0.15, 0.3, 0.2)
    assert failed(aggregates()) == set()


@pytest.mark.parametrize("gate, metric, threshold, minimum", [
    ("max_wer_gap_over_real", "wer_gap_over_real", 0.10, False),
    ("min_speaker_similarity", "speaker_similarity", 0.80, True),
    ("min_p808_mos", "p808_mos", 2.8, True),
    ("max_p808_gap_below_real", "p808_gap_below_real", 0.3, False),
])
def test_each_gate_fails_and_passes_on_the_right_side(gate, metric, threshold, minimum):
    inside, outside = (threshold + EPS, threshold - EPS) if minimum else (threshold - EPS, threshold + EPS)
    extra = {"p808_gap_below_real": 0.0} if metric == "p808_mos" else {}  # isolate the floor from the relative rule
    assert gate not in failed(aggregates(**{metric: inside}, **extra))
    failures = {g.gate: g.message for g in check_gates(aggregates(**{metric: outside}, **extra), EvalSettings())}
    assert set(failures) == {gate}, failures
    assert f"VOICEOPS_EVAL__{gate.upper()}" in failures[gate] and f"{threshold:g}" in failures[gate]


def test_similarity_must_gain_over_the_base():
    assert "min_similarity_gain_over_base" not in failed(aggregates(speaker_similarity=0.60 + 0.15 + EPS))
    agg = aggregates(speaker_similarity=0.85)
    agg["base"]["speaker_similarity"] = 0.85 - 0.15 + EPS
    message = {g.gate: g.message for g in check_gates(agg, EvalSettings())}["min_similarity_gain_over_base"]
    assert "vs base 0.71" in message and "< 0.15" in message


def test_p808_of_a_new_version_is_judged_against_production():
    prod = ProductionReference("7", p808_mos=3.5)
    assert "max_p808_drop_below_production" not in failed(aggregates(p808_mos=3.5 - 0.2 + EPS), prod)
    checks = {g.gate: g for g in gate_checks(aggregates(p808_mos=3.5 - 0.2 - EPS), EvalSettings(), production=prod)}
    drop = checks["max_p808_drop_below_production"]
    assert drop.passed is False and drop.value == pytest.approx(0.2 + EPS)
    assert "vs production v7 3.50" in drop.message and "VOICEOPS_EVAL__MAX_P808_DROP_BELOW_PRODUCTION" in drop.message
    # a first version, or a production version registered before DNSMOS: skipped and saying why, never passed
    for production, why in ((None, "no production version"), (ProductionReference("2", None), "no registered P.808")):
        check = next(g for g in gate_checks(aggregates(p808_mos=2.9), EvalSettings(), production=production)
                     if g.gate == "max_p808_drop_below_production")
        assert check.passed is None and why in check.message
    looser = EvalSettings(max_p808_drop_below_production=0.5)
    assert "max_p808_drop_below_production" not in failed(aggregates(p808_mos=3.1), prod, looser)


def test_production_reference_reads_the_production_versions_gate_tags(settings, mlflow_server):
    from mlflow import MlflowClient

    from voice_lib.pipelines.evaluation import production_reference
    from voice_lib.release.registry import Registry

    settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    registry, client = Registry(settings), MlflowClient(tracking_uri=mlflow_server)
    voice = f"prodref-{abs(hash(mlflow_server)) % 10_000}"
    assert production_reference(settings, voice) is None  # a new voice: nothing to compare with
    run = client.create_run(client.create_experiment(f"prodref-{voice}")).info.run_id
    client.log_text(run, "{}", "voice/voice.json")
    version = registry.register(f"voice-{voice}", run, "voice", {
        "training_key": f"tk-{voice}", "base_model": "voice-base", "base_version": "shipped", "base_sha256": "b" * 64,
        "data_sha256": "d" * 64, "code_version": "test", "lora_rank": "4", "eval_adapted_p808_mos": "3.4100",
        "gates_passed": "true"}).version  # it stands for a version that passed its gates (promote wants that)
    registry.promote(f"voice-{voice}", version)
    assert production_reference(settings, voice) == ProductionReference(version, 3.41)
    assert production_reference(settings, voice, evaluated="production") is None  # production is not judged by itself
    assert production_reference(settings, voice, evaluated=version) is None


@pytest.mark.slow
def test_gates_reject_a_broken_adapter(settings, mlflow_server, clean_voice):
    from safetensors.torch import load, save

    from voice_lib.pipelines.evaluation import evaluate_voice
    from voice_lib.pipelines.training import finetune_voice
    from voice_lib.release.registration import GatesFailed, register_voice
    from voice_lib.release.registry import Registry

    # The default gates; the reference voice and rendering pinned (conftest.PINNED_MODEL): they are not what is tested.
    settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server,
                                           "model": settings.model.model_copy(update=PINNED_MODEL)})
    dataset = onboarding.ingest("gate-bad", str(clean_voice), settings, shards=1)
    onboarding.qc_shard(dataset, 0, settings)
    qc = onboarding.qc_report(dataset, settings, log_to_mlflow=False)
    onboarding.features_shard(dataset, qc, 0, 1, settings)
    manifest = onboarding.features_manifest(dataset, qc, settings)
    trained = finetune_voice("gate-bad", manifest["manifest_key"], settings, rank=4, steps=4)

    # Break the adapter: blow up every LoRA B matrix, as a diverged training run would.
    store = artifact_store(settings)
    key = f"{trained.model_prefix}/adapter_model.safetensors"
    weights = load(store.read_bytes(key))
    torch.manual_seed(0)
    broken = {k: torch.randn_like(v) * 5.0 if "lora_B" in k else v for k, v in weights.items()}
    store.write_bytes(key, save(broken))

    evaluation = evaluate_voice(settings, trained)
    assert not evaluation.passed
    failures = evaluation.gate_failures
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
