"""voice_lib.release.registry against a real MLflow server (the session's `mlflow_server`), no mocks."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from voice_lib.core.config import Settings
from voice_lib.core.tracking import experiment_id, mlflow_client
from voice_lib.release.registry import (
    BASE_MODEL,
    ModelVersionInfo,
    Registry,
    RegistryError,
)

LINEAGE = {"base_model": "voice-base", "base_version": "1", "base_sha256": "b" * 64, "data_sha256": "d" * 64,
           "code_version": "0.1.0", "lora_rank": "8"}


@pytest.fixture
def registry(mlflow_server: str, tmp_path: Path) -> Registry:
    return Registry(Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server))


@pytest.fixture
def name() -> str:
    # The server is shared by the whole session: every test gets its own model.
    return f"voice-t-{uuid.uuid4().hex[:10]}"


def model_folder(root: Path, seed: int) -> Path:
    folder = root / f"model-{seed}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (folder / "adapter_config.json").write_text(f'{{"r": 8, "seed": {seed}}}')
    (folder / "speaker_embedding.npy").write_bytes(os.urandom(1024))
    (folder / "config.json").write_text("{}")
    (folder / "model_card.md").write_text(f"# model {seed}\n")
    return folder


def log_run(registry: Registry, name: str, folder: Path, artifact_path: str = "model") -> str:
    client = mlflow_client(registry.settings)
    run_id = client.create_run(experiment_id(client, name)).info.run_id
    client.log_artifacts(run_id, str(folder), artifact_path)
    client.set_terminated(run_id)
    return run_id


def register(registry: Registry, name: str, tmp_path: Path, seed: int, **extra: str) -> ModelVersionInfo:
    """A version that stands for one that passed its gates (``gates_passed``, as mark_candidate tags it)."""
    run_id = log_run(registry, name, model_folder(tmp_path, seed))
    return registry.register(name, run_id, "model",
                             {**LINEAGE, "gates_passed": "true", "training_key": f"key-{seed}", **extra})


def assert_no_stages(registry: Registry, name: str) -> None:
    for mv in registry.client.search_model_versions(f"name = '{name}'"):
        assert mv.current_stage == "None", f"version {mv.version} has deprecated stage {mv.current_stage}"


def test_register_is_idempotent_and_records_lineage(registry: Registry, name: str, tmp_path: Path) -> None:
    run_id = log_run(registry, name, model_folder(tmp_path, 1))
    tags = {**LINEAGE, "training_key": "abc123", "mel_distance": 0.42, "passed": True}
    first = registry.register(name, run_id, "model", tags, description="first try")
    again = registry.register(name, run_id, "model", tags)  # a retried Airflow task
    assert again.version == first.version == "1"
    assert len(registry.client.search_model_versions(f"name = '{name}'")) == 1
    assert {k: first.tags[k] for k in LINEAGE} == LINEAGE
    assert first.tags["mel_distance"] == "0.42" and first.tags["passed"] == "true"
    assert first.run_id == run_id and first.source.endswith(f"{run_id}/artifacts/model")
    assert registry.release_state(name) == {"name": name, "aliases": {}, "canary_weight": 0, "release_state": "idle",
                                            "progress": {}}
    assert registry.client.get_model_version(name, "1").status == "READY"
    assert name in registry.list_voice_models() and BASE_MODEL not in registry.list_voice_models()
    other = register(registry, name, tmp_path, 2)
    assert other.version == "2"
    assert_no_stages(registry, name)


def test_concurrent_retries_make_one_version(registry: Registry, name: str, tmp_path: Path) -> None:
    run_id = log_run(registry, name, model_folder(tmp_path, 1))

    def attempt(_: int) -> str:  # each worker has its own client, like separate Airflow task processes
        return Registry(registry.settings).register(name, run_id, "model", {**LINEAGE, "training_key": "same"}).version

    with ThreadPoolExecutor(4) as pool:
        versions = set(pool.map(attempt, range(4)))
    left = registry.client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and [mv.version for mv in left] == list(versions)
    assert hash(registry.version(name, left[0].version))  # usable as a dict key / in sets


def test_register_refuses_incomplete_input(registry: Registry, name: str, tmp_path: Path) -> None:
    run_id = log_run(registry, name, model_folder(tmp_path, 1))
    with pytest.raises(RegistryError, match="training_key"):
        registry.register(name, run_id, "model", dict(LINEAGE))
    with pytest.raises(RegistryError, match="lineage tags missing: lora_rank"):
        registry.register(name, run_id, "model", {**LINEAGE, "lora_rank": None, "training_key": "k"})
    with pytest.raises(RegistryError, match="no artifacts under 'adapter'"):
        registry.register(name, run_id, "adapter", {**LINEAGE, "training_key": "k"})
    with pytest.raises(RegistryError, match="run 'nope' not found"):
        registry.register(name, "nope", "model", {**LINEAGE, "training_key": "k"})
    with pytest.raises(RegistryError, match="invalid"):
        registry.register("alice", run_id, "model", {**LINEAGE, "training_key": "k"})
    assert not registry.exists(name)


def test_candidate_then_reject_leaves_no_alias(registry: Registry, name: str, tmp_path: Path) -> None:
    v1 = register(registry, name, tmp_path, 1)
    registry.mark_candidate(name, v1.version)
    assert registry.version_by_alias(name, "candidate").version == "1"
    assert registry.version(name, 1).aliases == ("candidate",)
    registry.reject(name, 1, ["speaker similarity 0.61 < 0.70", "mel distance too high"])
    v = registry.version(name, 1)
    assert v.aliases == () and registry.aliases(name) == {}
    assert v.tags["rejected"] == "true"
    assert v.tags["reason"] == "speaker similarity 0.61 < 0.70; mel distance too high"
    with pytest.raises(RegistryError, match="was rejected"):
        registry.promote(name, 1)
    with pytest.raises(RegistryError, match="was rejected"):
        registry.mark_candidate(name, 1)
    registry.reject(name, 1, ["x" * 200_000])  # longer than any tag value MLflow takes
    assert 0 < len(registry.version(name, 1).tags["reason"]) <= 100_000


def test_promote_twice_keeps_previous(registry: Registry, name: str, tmp_path: Path) -> None:
    v1, v2 = register(registry, name, tmp_path, 1), register(registry, name, tmp_path, 2)
    registry.promote(name, v1.version)
    assert registry.aliases(name) == {"production": "1"}
    registry.mark_candidate(name, v2.version)
    registry.set_canary(name, v2.version, 10)
    registry.promote(name, v2.version)
    registry.promote(name, v2.version)  # retried: must not make v2 its own previous
    assert registry.aliases(name) == {"production": "2", "previous": "1"}
    assert registry.release_state(name)["canary_weight"] == 0
    assert registry.release_state(name)["release_state"] == "idle"
    assert registry.version_by_alias(name, "production").aliases == ("production",)
    assert_no_stages(registry, name)


def test_rollback_of_canary(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 1)
    register(registry, name, tmp_path, 2)
    registry.promote(name, 1)
    registry.set_canary(name, 2, 25)
    assert registry.release_state(name) == {"name": name, "aliases": {"production": "1", "canary": "2"},
                                            "canary_weight": 25, "release_state": "canary", "progress": {}}
    registry.pause(name)
    assert registry.release_state(name)["release_state"] == "paused"
    assert registry.release_state(name)["canary_weight"] == 25  # pausing freezes the share, it does not drop it
    registry.resume(name)
    assert registry.release_state(name)["release_state"] == "canary"
    registry.rollback(name, "p95 latency doubled")
    state = registry.release_state(name)
    assert state == {"name": name, "aliases": {"production": "1"}, "canary_weight": 0, "release_state": "rolled_back",
                     "progress": {}}
    bad = registry.version(name, 2)
    assert bad.tags["rolled_back"] == "true" and bad.tags["reason"] == "p95 latency doubled"
    assert "rolled_back" not in registry.version(name, 1).tags
    assert_no_stages(registry, name)


def test_rollback_without_canary_restores_previous(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 1)
    register(registry, name, tmp_path, 2)
    with pytest.raises(RegistryError, match="no canary and no previous"):
        registry.rollback(name, "nothing to roll back")
    registry.promote(name, 1)
    registry.promote(name, 2)
    registry.rollback(name, "listeners report robotic audio")
    assert registry.aliases(name) == {"production": "1"}
    assert registry.version(name, 2).tags["rolled_back"] == "true"
    assert registry.release_state(name)["release_state"] == "rolled_back"
    with pytest.raises(RegistryError, match="no canary and no previous"):
        registry.rollback(name, "again")
    assert_no_stages(registry, name)


def test_canary_weight_validation(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 1)
    register(registry, name, tmp_path, 2)
    registry.promote(name, 1)
    with pytest.raises(RegistryError, match="no canary"):
        registry.set_canary_weight(name, 10)
    for bad in (-1, 101, 12.5, "50", True, None):
        with pytest.raises(RegistryError, match="0 to 100"):
            registry.set_canary(name, 2, bad)
    with pytest.raises(RegistryError, match="already production"):
        registry.set_canary(name, 1, 10)
    registry.set_canary(name, 2, 5)
    for weight in (0, 50, 100):
        registry.set_canary_weight(name, weight)
        assert registry.release_state(name)["canary_weight"] == weight
    with pytest.raises(RegistryError, match="0 to 100"):
        registry.set_canary_weight(name, 150)
    assert registry.release_state(name)["canary_weight"] == 100
    with pytest.raises(RegistryError, match="voice-base has no canary releases"):
        registry.set_canary_weight(BASE_MODEL, 10)


def test_download_by_alias_and_version(registry: Registry, name: str, tmp_path: Path) -> None:
    folders = {seed: model_folder(tmp_path / "src", seed) for seed in (1, 2)}
    for seed, folder in folders.items():
        registry.register(name, log_run(registry, name, folder), "model",
                          {**LINEAGE, "gates_passed": "true", "training_key": f"k{seed}"})
    registry.promote(name, 1)
    registry.mark_candidate(name, 2)
    dest = tmp_path / "cache" / name

    def same(got: Path, folder: Path) -> bool:
        return sorted(p.name for p in got.iterdir()) == sorted(p.name for p in folder.iterdir()) and all(
            (got / p.name).read_bytes() == p.read_bytes() for p in folder.iterdir())

    assert registry.download(name, "production", dest) == dest and same(dest, folders[1])
    assert registry.download(name, "candidate", dest) == dest and same(dest, folders[2])  # replaced, nothing stale
    assert same(registry.download(name, 1, tmp_path / "by-number"), folders[1])
    assert [p.name for p in dest.parent.iterdir()] == [name]  # no staging folders left behind
    with pytest.raises(RegistryError, match="has no alias 'canary'"):
        registry.download(name, "canary", dest)
    with pytest.raises(RegistryError, match="not a VoiceOps alias"):
        registry.download(name, "champion", dest)


def test_reads_and_errors_are_clear(registry: Registry, name: str, tmp_path: Path) -> None:
    assert registry.model_name("alice-en") == "voice-alice-en"
    assert registry.model_name(None) == registry.model_name("base") == BASE_MODEL
    with pytest.raises(ValueError, match="invalid"):
        registry.model_name("Alice!")
    assert registry.version_by_alias(name, "production") is None  # not registered yet
    assert not registry.exists(name)
    with pytest.raises(RegistryError, match=f"{name} is not registered"):
        registry.release_state(name)
    register(registry, name, tmp_path, 1)
    register(registry, name, tmp_path, 2)
    assert registry.version_by_alias(name, "production") is None
    with pytest.raises(RegistryError, match=f"{name} has no version 7; versions: 1, 2"):
        registry.promote(name, 7)
    with pytest.raises(RegistryError, match="model name 'voice-Bad' is invalid"):
        registry.aliases("voice-Bad")
    registry.set_version_tags(name, 2, {"speaker_similarity": 0.83})
    assert registry.version(name, 2).tags["speaker_similarity"] == "0.83"


def test_unreachable_server_fails_fast(settings: Settings) -> None:
    started = time.monotonic()
    with pytest.raises(RegistryError, match="not reachable.*voiceops up"):
        Registry(settings).version_by_alias(BASE_MODEL, "production")
    assert time.monotonic() - started < 10  # MlflowClient alone retries for about four minutes


def test_archive_takes_the_voice_out_of_serving_and_keeps_its_history(registry: Registry, name: str,
                                                                       tmp_path: Path) -> None:
    one, two = register(registry, name, tmp_path, 1), register(registry, name, tmp_path, 2)
    registry.promote(name, one.version)
    registry.set_canary(name, two.version, 30)
    assert [v.aliases for v in registry.versions(name)] == [("production",), ("canary",)]
    with pytest.raises(RegistryError, match="say why you archive it"):
        registry.archive(name, "  ")
    held = registry.archive(name, "deleted by tenant acme over DELETE /v1/voices")
    assert held == {"production": one.version, "canary": two.version}
    assert registry.aliases(name) == {}  # the server routes voices by their production alias: none left
    tags = registry.model_tags(name)
    assert tags["archived"] == "true" and tags["canary_weight"] == "0"
    assert tags["archived_reason"].startswith("deleted by tenant acme")
    assert tags["archived_aliases"] == f"canary={two.version},production={one.version}"
    assert [v.aliases for v in registry.versions(name)] == [(), ()]  # no alias left on any version
    versions = registry.versions(name)  # nothing deleted: versions, lineage and runs stay
    assert [v.version for v in versions] == [one.version, two.version]
    assert versions[0].tags["data_sha256"] == LINEAGE["data_sha256"] and versions[0].run_id == one.run_id
    with pytest.raises(RegistryError):
        registry.archive(BASE_MODEL, "no")


# --- release actions that cannot hit the wrong version ------------------------------------------------------

def test_rollback_names_the_canary_it_judged_and_does_nothing_when_it_changed(registry: Registry, name: str,
                                                                             tmp_path: Path) -> None:
    """Regression: a DAG rollback that raced a human's promote rolled production back (there was no canary)."""
    for seed in (1, 2, 3):
        register(registry, name, tmp_path, seed)
    registry.promote(name, 1)
    registry.set_canary(name, 2, 25)
    registry.promote(name, 2, actor="alice")  # the human wins the race: v2 is production, there is no canary
    assert registry.rollback(name, "canary analysis failed", expected_canary="2") is None
    assert registry.aliases(name) == {"production": "2", "previous": "1"}
    assert "rolled_back" not in registry.version(name, 2).tags
    registry.set_canary(name, 3, 10)  # a new rollout began: the judged canary (2) is not the one serving
    assert registry.rollback(name, "stale verdict", expected_canary="2") is None
    assert registry.aliases(name)["canary"] == "3" and registry.release_state(name)["canary_weight"] == 10
    assert registry.rollback(name, "canary analysis failed", expected_canary="3") == "3"
    assert registry.version(name, 3).tags["rolled_back"] == "true"
    assert registry.rollback(name, "a canary came meanwhile?", expected_canary="3") is None  # none now
    assert registry.rollback(name, "robotic audio", expected_canary=None, actor="bob") == "2"  # none seen: production
    assert registry.aliases(name) == {"production": "1"}


def test_promote_needs_force_and_a_reason_for_a_version_that_is_not_a_passed_candidate(
        registry: Registry, name: str, tmp_path: Path) -> None:
    import json

    registry.register(name, log_run(registry, name, model_folder(tmp_path, 1)), "model", {**LINEAGE, "training_key": "k1"})
    register(registry, name, tmp_path, 2)
    register(registry, name, tmp_path, 3)
    registry.register(name, log_run(registry, name, model_folder(tmp_path, 4)), "model", {**LINEAGE, "training_key": "k4"})
    registry.mark_candidate(name, 4)  # what registration does when the gates pass
    assert registry.version(name, 4).tags["gates_passed"] == "true"
    with pytest.raises(RegistryError, match="version 1 is not a passed candidate: it never passed the evaluation "
                                            "gates.*--force --reason"):
        registry.promote(name, 1)
    with pytest.raises(RegistryError, match="not a passed candidate"):
        registry.promote(name, 1, force=True)  # force without a reason
    with pytest.raises(RegistryError, match="not a passed candidate"):
        registry.promote(name, 1, force=True, reason="  ")
    assert registry.aliases(name) == {"candidate": "4"}
    registry.promote(name, 2)
    registry.set_canary(name, 3, 10)
    registry.rollback(name, "p95 doubled")
    with pytest.raises(RegistryError, match=r"it was rolled back \(p95 doubled\)"):
        registry.promote(name, 3)
    registry.set_version_tags(name, 4, {"breaker_tripped": "true", "breaker_reason": "error rate 40%"})
    with pytest.raises(RegistryError, match="tripped the circuit breaker"):
        registry.promote(name, 4)
    registry.promote(name, 3, force=True, reason="the p95 was the load test, not the model", actor="alice")
    assert registry.aliases(name)["production"] == "3"
    note = json.loads(registry.version(name, 3).tags["last_manual_action"])
    assert note["action"] == "promote" and note["actor"] == "alice" and note["forced"] is True
    assert note["reason"] == "the p95 was the load test, not the model"
    registry.promote(name, 3)  # a retry of what is already production needs nothing


def test_manual_actions_record_actor_and_reason_in_tags_and_history(registry: Registry, name: str,
                                                                    tmp_path: Path) -> None:
    import json

    from voice_lib.release.actions import perform
    from voice_lib.release.rollout import ReleaseHistory

    history = ReleaseHistory(f"sqlite:///{tmp_path / 'audit.db'}")
    voice = name.removeprefix("voice-")
    for seed in (1, 2):
        register(registry, name, tmp_path, seed)
    registry.promote(name, 1)
    registry.set_canary(name, 2, 20)
    perform(registry, history, voice, "pause", actor="carol", reason="watching a customer complaint")
    perform(registry, history, voice, "resume", actor="carol")
    with pytest.raises(RegistryError, match="nothing rolled back: the canary is version 2 now, not 7"):
        perform(registry, history, voice, "rollback", actor="dave", reason="x", expected_canary="7")
    message = perform(registry, history, voice, "rollback", actor="dave", reason="clipping on long texts")
    assert message.startswith(f"{name} canary version 2 rolled back")
    notes = [json.loads(v) for k, v in registry.version(name, 2).tags.items() if k.startswith("manual_action_")]
    assert sorted((n["action"], n["actor"]) for n in notes) == [("pause", "carol"), ("resume", "carol"),
                                                                 ("rollback", "dave")]
    rows = history.rows(voice)
    assert [r["outcome"] for r in rows] == ["manual"] * 3
    assert rows[0]["detail"].startswith("rollback by dave: clipping on long texts -> ")
    assert rows[-1]["detail"].startswith("pause by carol: watching a customer complaint")
    assert rows[1]["detail"].startswith("resume by carol: no reason given")


def test_cli_promote_of_a_non_candidate_needs_force_and_reason_and_records_the_actor(
        registry: Registry, name: str, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from voice_lib.release.rollout import ReleaseHistory

    registry.register(name, log_run(registry, name, model_folder(tmp_path, 1)), "model", {**LINEAGE, "training_key": "k1"})
    voice = name.removeprefix("voice-")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VOICEOPS_")},
           "VOICEOPS_HOME": str(registry.settings.home), "VOICEOPS_MLFLOW_TRACKING_URI": registry.settings.mlflow_tracking_uri}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "voiceops.cli", *args], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent, timeout=120)

    refused = cli("promote", voice, "--version", "1")
    assert refused.returncode != 0 and "not a passed candidate" in refused.stdout + refused.stderr
    no_reason = cli("promote", voice, "--version", "1", "--force")
    assert no_reason.returncode != 0 and "--force needs --reason" in no_reason.stdout + no_reason.stderr
    assert "production" not in registry.aliases(name)
    done = cli("promote", voice, "--version", "1", "--force", "--reason", "first voice, gates rerun later",
               "--actor", "erin")
    assert done.returncode == 0, done.stdout + done.stderr
    assert registry.aliases(name) == {"production": "1"}
    note = json.loads(registry.version(name, 1).tags["last_manual_action"])
    assert (note["actor"], note["forced"], note["reason"]) == ("erin", True, "first voice, gates rerun later")
    row = ReleaseHistory(registry.settings.resolved_audit_url).rows(voice)[0]
    assert row["outcome"] == "manual" and row["detail"].startswith("promote by erin (forced): first voice")
