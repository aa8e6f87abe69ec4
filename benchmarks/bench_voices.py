"""Benchmark voices: LoRA adapters of the shipped base (end-to-end) or of the shipped converter (two-stage, the
default backend), saved the way onboarding saves a version, deterministic in their seed.

Imported through benchmarks/common.py (``Bench.make_and_register`` makes them).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LORA_RANK = 8
LORA_B_SCALE = 0.02  # std of the random lora_B entries: a modest perturbation, like a trained adapter


@dataclass
class BaseInfo:
    path: Path
    sha256: str
    lineage: dict[str, str]


def shipped_base() -> BaseInfo:
    from voice_lib.core.hashing import sha256_file
    from voice_lib.model.checkpoints import SHIPPED_BASE

    sha = sha256_file(SHIPPED_BASE / "model.safetensors")
    lineage = {"base_model": "voice-base", "base_version": "shipped", "base_sha256": sha, "data_sha256": "b" * 64,
               "code_version": "benchmark", "lora_rank": str(LORA_RANK)}
    return BaseInfo(SHIPPED_BASE, sha, lineage)


def shipped_converter() -> BaseInfo:
    """The two-stage backend's shipped converter (the default backend's base) and the lineage its voices carry."""
    from voice_lib.core.hashing import sha256_file
    from voice_lib.model.checkpoints import CONVERTER_WEIGHTS, SHIPPED_CONVERTER

    sha = sha256_file(SHIPPED_CONVERTER / CONVERTER_WEIGHTS)
    lineage = {"base_model": "voice-base", "base_version": "shipped", "base_sha256": sha, "data_sha256": "b" * 64,
               "code_version": "benchmark", "lora_rank": str(LORA_RANK), "backend": "two_stage"}
    return BaseInfo(SHIPPED_CONVERTER, sha, lineage)


_BASE_MODEL_CACHE: dict[str, Any] = {}
_CONVERTER_CACHE: dict[str, Any] = {}
WARMUP_TEXT = "Hello, this is a short warm up sentence."


def two_stage_voice(seed: int, source_pitch: dict[str, dict[str, float]]):
    """A plausible two_stage.json for a benchmark voice: a pretraining source as reference voice, a target pitch
    near it, a post-filter of 1.0-1.5 per envelope dimension, rendered by the source filter (the default)."""
    import numpy as np

    from voice_lib.data.reference import PitchStats, TwoStageVoice
    from voice_lib.train.finetune_two_stage import synthesis_candidates
    from voice_lib.train.pretrain import CONVERTER_SOURCES

    rng = np.random.default_rng(seed)
    source_voice = CONVERTER_SOURCES[seed % len(CONVERTER_SOURCES)]  # the shipped converter's sources, in turn
    source = PitchStats(**source_pitch[source_voice])
    target = PitchStats(source.mean + float(rng.uniform(-0.2, 0.4)), source.std * float(rng.uniform(0.8, 1.2)))
    scale = tuple(round(float(v), 4) for v in rng.uniform(1.0, 1.5, 60))
    return synthesis_candidates(TwoStageVoice(source_voice, source, target, scale), "source_filter")[0]


def make_two_stage_adapter(base_info: BaseInfo, out: Path, seed: int, scale: float = LORA_B_SCALE) -> Path:
    """A two-stage version's folder as onboarding writes it (voice_lib.train.finetune_two_stage.write_version_folder):
    a rank-8 LoRA of the shipped converter on CONVERTER_LORA_TARGETS with random lora_B (std ``scale``), a unit-norm
    random speaker embedding and a real two_stage.json (``two_stage_voice``). Deterministic in ``seed``; a draw whose
    warm-up sentence comes out bad (silent or clipped) is replaced by the next, as ``make_adapter`` does."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from serving.engine import SynthesisJob, run_batch
    from voice_lib.infer.multilora import AdapterWeights, LoraBank
    from voice_lib.infer.two_stage import load_two_stage
    from voice_lib.model.checkpoints import load_converter
    from voice_lib.model.converter import CONVERTER_LORA_TARGETS
    from voice_lib.train.finetune_two_stage import write_version_folder

    if "backend" not in _CONVERTER_CACHE:
        _CONVERTER_CACHE["backend"] = load_two_stage(base_info.path, base_info.sha256)
    backend = _CONVERTER_CACHE["backend"]
    for attempt in range(10):
        draw = seed + 1_000_003 * attempt
        model, config = load_converter(base_info.path)
        torch.manual_seed(draw)  # peft initialises lora_A from the global generator
        lora = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=CONVERTER_LORA_TARGETS,
                                                lora_dropout=0.0, bias="none"))
        g = torch.Generator().manual_seed(draw)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * scale
        speaker = np.random.default_rng(draw).standard_normal(256).astype(np.float32)
        speaker /= np.linalg.norm(speaker)  # GE2E embeddings are unit vectors
        voice = two_stage_voice(draw, config["source_pitch"])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        lora.save_pretrained(str(out))
        bank = LoraBank([("check", AdapterWeights.load(out))], backend.shapes)
        job = SynthesisJob(backend.model_inputs(WARMUP_TEXT, "en", voice.to_dict()), 1.0, backend, bank, 1,
                           torch.from_numpy(speaker))
        result = dict(run_batch([job]))[0]
        if not isinstance(result, Exception) and result.bad is None:
            break
    else:
        raise RuntimeError(f"no usable two-stage adapter drawn for seed {seed}")
    facts = {**base_info.lineage, "seed": seed, "draw": draw, "lora_b_scale": scale, "source_voice": voice.source_voice,
             "synthesis": voice.synthesis}
    write_version_folder(out, out.name, voice, speaker, facts, [])
    return out


def make_adapter(base_info: BaseInfo, out: Path, seed: int, scale: float = LORA_B_SCALE) -> Path:
    """A peft LoRA (rank 8) of the shipped base with random lora_B (scale NaN: a broken adapter), saved the way
    training saves it (save_pretrained + speaker_embedding.npy + voice.json), as tests/test_serving.py does.

    Deterministic in ``seed``. A healthy adapter (finite scale) is checked with one synthesis through the
    serving engine: if its audio would be flagged bad (silent or clipped, as a random adapter occasionally is),
    the next draw is taken, so a "healthy" voice never trips a canary breaker on bad audio."""
    import numpy as np
    import torch

    from serving.engine import SynthesisJob, run_batch
    from voice_lib.infer.end_to_end import EndToEndBackend
    from voice_lib.infer.multilora import LoraBank
    from voice_lib.data.features import FeatureConfig
    from voice_lib.model.checkpoints import load_base, lora_model

    if "base" not in _BASE_MODEL_CACHE:
        from voice_lib.data.text import phonemes_to_ids, phonemize

        _BASE_MODEL_CACHE["base"] = load_base(base_info.path)
        cfg = json.loads((base_info.path / "config.json").read_text())["feature_config"]
        _BASE_MODEL_CACHE["fc"] = FeatureConfig(**cfg)
        _BASE_MODEL_CACHE["ids"] = phonemes_to_ids(phonemize(WARMUP_TEXT, "en"))
    for attempt in range(10):
        draw = seed + 1_000_003 * attempt
        torch.manual_seed(draw)  # peft initialises lora_A from the global generator
        peft_model = lora_model(copy.deepcopy(_BASE_MODEL_CACHE["base"]), rank=LORA_RANK)
        g = torch.Generator().manual_seed(draw)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data = torch.full(p.shape, float("nan")) if math.isnan(scale) else torch.randn(p.shape, generator=g) * scale
        speaker = np.random.default_rng(draw).standard_normal(256).astype(np.float32)
        if math.isnan(scale):
            break
        bundle = EndToEndBackend("check", peft_model.get_base_model().eval(), {}, _BASE_MODEL_CACHE["fc"], "check")
        job = SynthesisJob(_BASE_MODEL_CACHE["ids"], 1.0, bundle, LoraBank([], {}), 0, torch.from_numpy(speaker))
        result = dict(run_batch([job]))[0]
        if not isinstance(result, Exception) and result.bad is None:
            break
    else:
        raise RuntimeError(f"no usable adapter drawn for seed {seed}")
    peft_model.save_pretrained(str(out))
    np.save(out / "speaker_embedding.npy", speaker)
    (out / "voice.json").write_text(json.dumps({"seed": seed, "draw": draw, "lora_b_scale": scale,
                                                "base_sha256": base_info.sha256,
                                                "base_version": base_info.lineage["base_version"]}))
    return out
