"""The two-stage backend, Coqui-style: pretrain a converter on a tiny real parallel corpus, resume it from
its checkpoint, LoRA-adapt it to an unseen voice, and synthesise from every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SOURCES = ("flite-awb", "flite-kal16")


@pytest.fixture(scope="module")
def parallel_corpus(tmp_path_factory):
    from voice_lib.core.config import Settings
    from voice_lib.data.corpus import generate_corpus

    root = tmp_path_factory.mktemp("parallel")
    manifest = generate_corpus(root / "corpus", [*SOURCES, "festival-kal"], 8, progress=False, parallel=True)
    return root, manifest, Settings(home=root / "home")


def test_parallel_corpus_reads_the_same_sentences(parallel_corpus):
    _, manifest, _ = parallel_corpus
    texts = {}
    for clip in manifest.clips:
        texts.setdefault(clip.file.rsplit("_", 1)[1], set()).add(clip.text)
    assert len(texts) == 8 and all(len(t) == 1 for t in texts.values())


def test_alignment_recovers_a_known_time_warp():
    from voice_lib.data.alignment import align_to_source

    rng = np.random.default_rng(0)
    source = rng.standard_normal((120, 63)).astype(np.float32)
    source[:, 1] = (np.arange(120) // 10) % 2  # voicing alternates every 10 frames
    stretched = np.repeat(source, 2, axis=0)  # the "target" says the same thing twice as slowly
    stretched[:, 2:62] += 0.5  # and has another average timbre: mean removal must ignore it
    aligned, weight = align_to_source(source, stretched)
    assert np.allclose(aligned[:, 2:62] - 0.5, source[:, 2:62], atol=1e-5)  # every frame found its twin
    assert (weight > 0).all()


def test_converter_row_is_the_same_alone_or_padded_in_a_batch():
    from voice_lib.model.converter import Converter, ConverterConfig

    torch.manual_seed(0)
    model = Converter(ConverterConfig(d_model=32, ffn_dim=64, n_layers=2)).eval()
    torch.nn.init.normal_(model.out.weight, std=0.1)  # not the zero init: the blocks must matter
    a, b = torch.randn(1, 50, 63), torch.randn(1, 80, 63)
    a[..., 1], b[..., 1] = (a[..., 1] > 0).float(), (b[..., 1] > 0).float()  # voicing is 0 or 1
    speakers = torch.randn(2, 256)
    alone = model(a, speakers[:1])
    batch = torch.zeros(2, 80, 63)
    batch[0, :50], batch[1] = a[0], b[0]
    together = model(batch, speakers, torch.tensor([50, 80]))
    assert torch.allclose(alone[0], together[0, :50], atol=1e-5)


def test_reference_voice_choice_excludes_the_target_itself_and_asks_whisper_only_when_there_is_a_choice():
    """choose_source: a candidate that sounds like the target is never its reference; of two usable voices Whisper
    reads both at the target's pitch; one usable voice is taken without Whisper; none is an error naming the fix."""
    from voice_lib.data.reference import analyze_frames, render_source
    from voice_lib.data.speech import speaker_embedding
    from voice_lib.train.finetune_two_stage import choose_source

    texts = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It is easy to tell the depth of a well."]
    recordings = [render_source(t, "flite-slt") for t in texts]  # the target speaker
    target = [analyze_frames(a) for a in recordings]
    speaker = speaker_embedding(np.concatenate(recordings), 16000)

    chosen, measured = choose_source(texts, target, speaker, ["flite-slt", "flite-awb", "flite-kal16"], 0.85)
    assert measured["flite-slt"]["excluded"] and chosen in ("flite-awb", "flite-kal16")
    assert "wer_at_target_pitch" not in measured["flite-slt"]  # excluded voices are not worth Whisper's time
    assert all(0.0 <= measured[v]["wer_at_target_pitch"] <= 1.0 for v in ("flite-awb", "flite-kal16"))

    chosen, measured = choose_source(texts, target, speaker, ["flite-slt", "flite-awb"], 0.85)
    assert chosen == "flite-awb" and "wer_at_target_pitch" not in measured["flite-awb"]

    with pytest.raises(ValueError, match="VOICEOPS_MODEL__SOURCE_VOICES"):
        choose_source(texts, target, speaker, ["flite-slt"], 0.85)


def test_pretrain_resume_adapt_and_synthesise(parallel_corpus, tmp_path):
    from peft import LoraConfig, get_peft_model

    from voice_lib.data.reference import (
        TwoStageVoice,
        analyze_frames,
        pitch_stats,
        render_source,
    )
    from voice_lib.infer.synthesizer import Synthesizer
    from voice_lib.model.checkpoints import LORA_TARGETS, load_converter
    from voice_lib.train.convert import ConverterTask, fit_converter, make_pair
    from voice_lib.train.loop import TrainConfig
    from voice_lib.train.pretrain import pretrain_converter

    root, _, settings = parallel_corpus
    first = pretrain_converter(root / "corpus", settings, tmp_path / "conv", steps=16, sources=SOURCES, refine_at=8,
                               log_to_mlflow=False)
    assert first["steps_trained"] == 16 and first["best_val_loss"] < 10
    again = pretrain_converter(root / "corpus", settings, tmp_path / "conv", steps=24, sources=SOURCES, refine_at=8,
                               log_to_mlflow=False)
    assert again["training_key"] == first["training_key"] and again["steps_trained"] == 24
    model, config = load_converter(tmp_path / "conv")
    assert set(config["source_pitch"]) == set(SOURCES)

    # An unseen voice: a few clips, paired with the source's renderings of their texts, adapted with LoRA.
    texts = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It is easy to tell the depth of a well.", "These days a chicken leg is a rare dish."]
    source_voice = SOURCES[0]
    target = [analyze_frames(render_source(t, "espeak-en-m3"), aperiodicity=True) for t in texts]
    source = [analyze_frames(render_source(t, source_voice)) for t in texts]
    speaker = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    pairs = [make_pair(s, t, speaker) for s, t in zip(source, target)]
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    result = fit_converter(lora, ConverterTask(pairs[:3], pairs[3:], batch_size=4, crop_frames=100),
                           TrainConfig(steps=10, eval_every=5, checkpoint_every=5, patience=10**6), tmp_path / "lora.pt")
    assert result.step == 10
    lora.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for k, v in lora.get_base_model().state_dict().items():  # only the adapter trained
        if "lora" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")] if k.replace(".base_layer", "") in before else v), k

    # Served through the shared inference core, as evaluation and the server do.
    TwoStageVoice(source_voice, pitch_stats(source), pitch_stats(target)).save(tmp_path / "adapter")
    adapted = Synthesizer.load(tmp_path / "conv", speaker, tmp_path / "adapter", backend="two_stage")
    base = Synthesizer.load(tmp_path / "conv", speaker, backend="two_stage", voice_dir=tmp_path / "adapter")
    out = adapted.synthesize("A large size in stockings is hard to sell.")
    assert out.sample_rate == 16000 and len(out.audio) > 16000 * 0.8 and np.isfinite(out.audio).all()
    plain = base.synthesize("A large size in stockings is hard to sell.")
    assert len(plain.audio) == len(out.audio) and not np.array_equal(plain.audio, out.audio)  # same timing, the LoRA acts
    fast = adapted.synthesize("A large size in stockings is hard to sell.", speed=2.0)
    assert abs(len(fast.audio) / len(out.audio) - 0.5) < 0.05
    # The source filter: the reference rendering itself, re-pitched and filtered (what "auto" may choose).
    from dataclasses import replace

    voice = TwoStageVoice.load(tmp_path / "adapter")
    filtered = Synthesizer(adapted.backend, adapted.bank, adapted.slot, speaker,
                           replace(voice, synthesis="source_filter").to_dict())
    heard = filtered.synthesize("A large size in stockings is hard to sell.")
    assert np.isfinite(heard.audio).all() and abs(len(heard.audio) - len(out.audio)) <= 160 * 2
    assert not np.allclose(heard.audio[: len(out.audio)], out.audio[: len(heard.audio)], atol=1e-3)
    fast_filtered = filtered.synthesize("A large size in stockings is hard to sell.", speed=2.0)
    assert abs(len(fast_filtered.audio) / len(heard.audio) - 0.5) < 0.05
    five_ms = target[0][np.repeat(np.arange(len(target[0])), 2)]  # the recording's features as evaluation has them
    recon = adapted.reconstruct(np.zeros(0), five_ms, text=texts[0])
    assert abs(len(recon.audio) - len(target[0]) * 160) <= 160 * 2  # the recording's timing is kept
    # The timed reconstruction (PESQ/STOI) is WORLD with the measured post-filter whatever the rendering.
    scaled = replace(voice, envelope_scale=(1.3,) * 60)
    timed = [Synthesizer(adapted.backend, adapted.bank, adapted.slot, speaker, v.to_dict()).reconstruct(
        np.zeros(0), five_ms, text=texts[0]).audio
        for v in (scaled, replace(scaled, synthesis="source_filter", envelope_scale_power=1.5))]
    assert np.array_equal(timed[0], timed[1]) and not np.array_equal(timed[0], recon.audio)


def tiny_converter(out: Path) -> Path:
    """A random converter with the statistics of real reference frames, saved as pretraining saves one."""
    from dataclasses import asdict

    from voice_lib.data.reference import (
        TWO_STAGE_FEATURES,
        analyze_frames,
        pitch_stats,
        render_source,
    )
    from voice_lib.model.checkpoints import save_converter
    from voice_lib.model.converter import Converter, ConverterConfig

    frames = analyze_frames(render_source("The birch canoe slid on the smooth planks.", SOURCES[0]), aperiodicity=True)
    torch.manual_seed(0)
    model = Converter(ConverterConfig(d_model=32, ffn_dim=64, n_layers=1))
    model.set_statistics(frames)
    save_converter(model, out, {"feature_config": asdict(TWO_STAGE_FEATURES), "sources": [SOURCES[0]],
                                "source_pitch": {SOURCES[0]: pitch_stats([frames]).to_dict()}})
    return out


def register_two_stage(stack, converter_dir: Path, voice_id: str, seed: int, synthesis: str = "world") -> str:
    """A random LoRA of the tiny converter with its two_stage.json, registered as two-stage training registers."""
    from peft import LoraConfig, get_peft_model

    from voice_lib.core.hashing import sha256_file
    from voice_lib.core.tracking import experiment_id, mlflow_client
    from voice_lib.data.reference import PitchStats, TwoStageVoice
    from voice_lib.model.checkpoints import (
        CONVERTER_WEIGHTS,
        LORA_TARGETS,
        load_converter,
    )

    model, config = load_converter(converter_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    folder = stack.work / f"{voice_id}-{seed}"
    lora.save_pretrained(str(folder))
    source = PitchStats(**config["source_pitch"][SOURCES[0]])
    TwoStageVoice(SOURCES[0], source, PitchStats(source.mean + 0.3, source.std), synthesis=synthesis).save(folder)
    np.save(folder / "speaker_embedding.npy", np.random.default_rng(seed).standard_normal(256).astype(np.float32))
    sha = sha256_file(converter_dir / CONVERTER_WEIGHTS)
    (folder / "voice.json").write_text(json.dumps({"backend": "two_stage", "base_sha256": sha, "base_version": "shipped"}))
    client = mlflow_client(stack.settings)
    run_id = client.create_run(experiment_id(client, f"voice-{voice_id}")).info.run_id
    client.log_artifacts(run_id, str(folder), "voice")
    tags = {**stack.lineage, "base_sha256": sha, "backend": "two_stage", "gates_passed": "true", "training_key": f"{voice_id}-{seed}"}
    return stack.registry.register(f"voice-{voice_id}", run_id, "voice", tags).version


def test_server_serves_a_two_stage_voice_as_evaluation_hears_it(mlflow_server, tmp_path):
    """A two-stage version beside end-to-end ones on one server: its audio through the HTTP API is, sample for
    sample, what evaluation's Synthesizer makes of the same text (one inference core, two backends)."""
    import httpx
    from serving_stack import ServerStack

    from serving.synthesis import pcm16
    from voice_lib.release.models import load_registered_voice

    converter = tiny_converter(tmp_path / "converter")
    stack = ServerStack(mlflow_server, tmp_path / "home", {"VOICEOPS_MODEL__CONVERTER_DIR": str(converter)})
    voice = "two-stage-" + stack.a.rsplit("-", 1)[1]
    filtered = "filtered-" + stack.a.rsplit("-", 1)[1]
    try:
        stack.publish_default_voices()
        register_two_stage(stack, converter, voice, seed=5)
        register_two_stage(stack, converter, filtered, seed=6, synthesis="source_filter")
        stack.registry.promote(f"voice-{voice}", 1)
        stack.registry.promote(f"voice-{filtered}", 1)
        stack.start()
        stack.wait("the two-stage voices", lambda: {voice, filtered} <= set(stack.status().get("voices", {})), timeout=120)
        settings = stack.settings.model_copy(update={"model": stack.settings.model.model_copy(update={"converter_dir": converter})})
        text = "The birch canoe slid on the smooth planks."
        for name in (voice, filtered):  # both renderings: WORLD and the source filter
            synth, meta = load_registered_voice(settings, name, "production")
            assert meta["backend"] == "two_stage" and meta["resolved_base_dir"] == str(converter)
            evaluated = synth.synthesize(text, "en")
            r = httpx.post(f"{stack.url}/v1/tts", json={"text": text, "voice_id": name, "format": "pcm16", "language": "en"},
                           headers=stack.auth("ops"), timeout=60)
            assert r.status_code == 200, r.text
            served, expected = np.frombuffer(r.content, "<i2"), np.frombuffer(pcm16(evaluated.audio), "<i2")
            assert len(expected) > evaluated.sample_rate and np.abs(expected).max() > 100
            assert len(served) == len(expected) and np.array_equal(served, expected), (name, np.abs(served - expected.astype(int)).max())
        e2e = stack.tts("ops", voice_id=stack.b)  # the end-to-end voices still speak beside it
        assert e2e.status_code == 200 and len(e2e.content) > 1000
    finally:
        stack.stop()
