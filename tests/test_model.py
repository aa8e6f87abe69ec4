"""Train on a tiny real fixture, synthesise from the result, resume from the checkpoint, LoRA-adapt
(Coqui-style: fast, real, end to end)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from voice_lib.data.text import SYMBOLS
from voice_lib.model.network import ModelConfig, monotonic_alignment

TINY = dict(d_model=64, n_heads=2, ffn_dim=128, encoder_layers=1, decoder_layers=1)


def test_monotonic_alignment_is_monotonic_and_complete():
    rng = np.random.default_rng(0)
    true = np.array([3, 1, 5, 2, 4])
    frames = np.repeat(np.arange(5), true)
    log_p = -((np.arange(5)[:, None] - frames[None, :]) ** 2).astype(float) + 0.01 * rng.standard_normal((5, true.sum()))
    durations = monotonic_alignment(log_p)
    assert durations.tolist() == true.tolist()
    assert monotonic_alignment(np.zeros((6, 3))).sum() == 3  # fewer frames than phones: spread, no crash


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory):
    from voice_lib.core.config import Settings
    from voice_lib.data.corpus import generate_corpus
    from voice_lib.data.datasets import featurize_corpus

    root = tmp_path_factory.mktemp("tiny")
    generate_corpus(root / "corpus", ["flite-awb", "flite-kal16"], 6, progress=False)
    settings = Settings(home=root / "home")
    return featurize_corpus(root / "corpus", settings), settings


def test_train_infer_resume_and_lora(tiny_examples, tmp_path):
    from voice_lib.infer.synthesizer import Synthesizer
    from voice_lib.model.checkpoints import (
        load_base,
        lora_model,
        new_base_model,
        save_base,
        trainable_parameters,
    )
    from voice_lib.train.loop import TrainConfig, fit, validation_loss

    examples, settings = tiny_examples
    assert len(examples) == 12 and all(e.features.shape[1] == 63 for e in examples)
    torch.manual_seed(0)  # the same initial weights every run, so the loss figures below are reproducible
    model = new_base_model(examples, ModelConfig(n_symbols=len(SYMBOLS), **TINY))
    untrained_val_loss = validation_loss(model, examples[10:], model)
    ckpt = tmp_path / "base.pt"
    first = fit(model, model, examples[:10], examples[10:], TrainConfig(steps=12, batch_size=4, eval_every=6, checkpoint_every=6), ckpt)
    assert first.step == 12 and ckpt.exists()
    assert first.history[-1]["train_loss"] < 10
    # Training learns: the held-out loss falls, from the untrained model's and between evaluations
    # (measured: 2.69 untrained, 2.63 at step 6, 2.60 at step 12).
    assert first.best_val_loss < untrained_val_loss - 0.05, (untrained_val_loss, first.history)
    assert first.history[-1]["val_loss"] < first.history[0]["val_loss"], first.history

    # Resume into a freshly built model (another process would have nothing in memory): reaching step 12 again
    # trains nothing and leaves exactly the checkpoint's weights; a longer run continues from step 12.
    shutil.copy(ckpt, tmp_path / "at-12.pt")
    torch.manual_seed(1234)  # different initial weights, so only the checkpoint can make them equal
    fresh = new_base_model(examples, ModelConfig(n_symbols=len(SYMBOLS), **TINY))
    assert not torch.equal(fresh.state_dict()["embed.weight"], model.state_dict()["embed.weight"])
    again = fit(fresh, fresh, examples[:10], examples[10:], TrainConfig(steps=12, batch_size=4, eval_every=6, checkpoint_every=6), ckpt)
    assert again.resumed_from == 12 and again.step == 12 and again.history == first.history
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    resumed = fit(fresh, fresh, examples[:10], examples[10:], TrainConfig(steps=18, batch_size=4, eval_every=6, checkpoint_every=6), ckpt)
    assert resumed.resumed_from == 12 and resumed.step == 18 and len(resumed.history) == 3
    # The in-memory model continued from the same checkpoint reaches the same weights: resume restores the
    # optimiser, schedule and sampling state too, not only the weights.
    fit(model, model, examples[:10], examples[10:], TrainConfig(steps=18, batch_size=4, eval_every=6, checkpoint_every=6), tmp_path / "at-12.pt")
    for key, value in model.state_dict().items():
        assert torch.allclose(fresh.state_dict()[key], value, atol=1e-6), key

    save_base(model, tmp_path / "base", {"feature_config": {"sample_rate": 16000}})
    synth = Synthesizer.load(tmp_path / "base", examples[0].speaker)
    out = synth.synthesize("The birch canoe slid on the smooth planks.")
    assert out.sample_rate == 16000 and len(out.audio) > 16000 * 0.5
    assert np.isfinite(out.audio).all()
    recon = synth.reconstruct(examples[0].phoneme_ids, examples[0].features)
    assert abs(len(recon.audio) - len(examples[0].features) * 80) <= 80 * 8  # reference timing kept

    # LoRA: base frozen, only adapters train, adapter small, saved/loaded with its config.
    base = load_base(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = lora_model(base, rank=4)
    assert 0 < trainable_parameters(lora) < 1_000_000
    fit(lora, base, examples[:6], examples[6:8], TrainConfig(steps=6, batch_size=3, eval_every=3, checkpoint_every=3), tmp_path / "lora.pt")
    lora.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    fresh = load_base(tmp_path / "base")
    for k, v in fresh.state_dict().items():  # the base weights on disk are untouched by fine-tuning
        assert torch.equal(v, before[k]), k
    adapted = Synthesizer.load(tmp_path / "base", examples[0].speaker, adapter_dir=tmp_path / "adapter")
    a = adapted.synthesize("The birch canoe slid on the smooth planks.").audio
    b = Synthesizer.load(tmp_path / "base", examples[0].speaker).synthesize("The birch canoe slid on the smooth planks.").audio
    assert len(a) > 0 and (len(a) != len(b) or not np.allclose(a, b))  # the adapter changes the output


# --- checkpoints a resuming worker can trust (voice_lib/train/resume.py) ------------------------------------

class _Planted:
    """What a writer to the artifact store could plant: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_fit(examples, checkpoint, steps, on_checkpoint=None):
    from voice_lib.model.checkpoints import new_base_model
    from voice_lib.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    model = new_base_model(examples, ModelConfig(n_symbols=len(SYMBOLS), **TINY))
    cfg = TrainConfig(steps=steps, batch_size=4, eval_every=3, checkpoint_every=3)
    return fit(model, model, examples[:10], examples[10:], cfg, checkpoint, on_checkpoint=on_checkpoint)


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tiny_examples, tmp_path):
    """Regression: fit loaded checkpoints with weights_only=False, so a planted pickle ran on the worker."""
    examples, _ = tiny_examples
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "planted.pt"
    torch.save({"trainable": {}, "step": 0, "payload": _Planted(str(marker))}, checkpoint)
    with pytest.raises(ValueError, match=r"planted\.pt holds more than weights.*delete it"):
        _tiny_fit(examples, checkpoint, 3)
    assert not marker.exists()


def test_resume_trusts_only_the_checkpoint_whose_sha256_the_run_recorded(tiny_examples, tmp_path, mlflow_server):
    from voice_lib.core.config import Settings
    from voice_lib.core.hashing import sha256_file
    from voice_lib.core.storage import artifact_store
    from voice_lib.core.tracking import experiment_id, mlflow_client
    from voice_lib.train.resume import CHECKPOINT_SHA256_TAG, CheckpointLedger, mirror_checkpoint, restore_checkpoint

    examples, _ = tiny_examples
    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server)
    store, key = artifact_store(settings), "voices/v/checkpoints/k.pt"
    client = mlflow_client(settings)
    run_id = client.create_run(experiment_id(client, "checkpoint-trust")).info.run_id
    ledger = CheckpointLedger(settings, run_id)
    worker_a = tmp_path / "worker-a" / "k.pt"
    first = _tiny_fit(examples, restore_checkpoint(store, key, worker_a, ledger), 6,
                      on_checkpoint=lambda path, step: mirror_checkpoint(store, ledger, path, key, step))
    assert first.step == 6
    recorded = client.get_run(run_id).data.tags[CHECKPOINT_SHA256_TAG]
    assert recorded == sha256_file(worker_a) == sha256_file(store.download_to(key, tmp_path / "copy.pt"))

    # A corrupt local checkpoint (a full disk truncated it) is fetched again from the store, and training resumes.
    worker_a.write_bytes(worker_a.read_bytes()[:1000])
    resumed = _tiny_fit(examples, restore_checkpoint(store, key, worker_a, ledger), 9)
    assert resumed.resumed_from == 6 and sha256_file(tmp_path / "copy.pt") == recorded

    # A checkpoint planted in the store (another run's valid weights) is not loaded on a fresh worker.
    other = tmp_path / "other.pt"
    _tiny_fit(examples, other, 3)
    store.upload_file(other, key)
    worker_b = tmp_path / "worker-b" / "k.pt"
    assert not restore_checkpoint(store, key, worker_b, ledger).exists()
    assert _tiny_fit(examples, worker_b, 3).resumed_from == 0

    # A run that recorded no checkpoint trusts none, local or stored.
    fresh_run = CheckpointLedger(settings, client.create_run(experiment_id(client, "checkpoint-trust")).info.run_id)
    worker_b.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "other.pt").replace(worker_b)
    assert not restore_checkpoint(store, key, worker_b, fresh_run).exists()


@pytest.mark.slow
def test_pretraining_corpus_and_checkpoints_live_in_the_store_not_on_a_worker(tmp_path):
    """base_model_pretrain's tasks may run on different workers: each finds what the last one made in the store."""
    from voice_lib.core.config import Settings
    from voice_lib.core.storage import artifact_store
    from voice_lib.pipelines.training import build_pretrain_corpus, pretrain_from_store

    store_uri = (tmp_path / "store").as_uri()

    def worker(n: int) -> Settings:  # a machine of its own: its own home and cache, the shared store
        return Settings(home=tmp_path / f"worker-{n}", storage_uri=store_uri)

    corpus = build_pretrain_corpus(worker(1), sentences_per_voice=2)
    store = artifact_store(worker(1))
    assert store.exists(f"{corpus['corpus_prefix']}/corpus.list") and len(store.list(corpus["corpus_prefix"])) >= 20
    assert build_pretrain_corpus(worker(4), sentences_per_voice=2) == corpus  # committed: found, not rendered again
    assert not (worker(4).cache_dir / "corpora").exists()

    first = pretrain_from_store(corpus["corpus_prefix"], worker(2), tmp_path / "base-2", steps=2, batch_size=4, log_to_mlflow=False)
    assert first["steps_trained"] == 2 and first["resumed_from_step"] == 0
    assert len(store.list("pretrain/checkpoints")) == 1
    # A retry with a bigger budget on a third worker resumes from the store's checkpoint, not from step 0.
    again = pretrain_from_store(corpus["corpus_prefix"], worker(3), tmp_path / "base-3", steps=3, batch_size=4, log_to_mlflow=False)
    assert again["resumed_from_step"] == 2 and again["steps_trained"] == 3
    assert (tmp_path / "base-3" / "model.safetensors").exists()
