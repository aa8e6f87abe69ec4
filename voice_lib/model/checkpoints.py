"""Checkpoints of the network: a new base, save/load of the shipped safetensors layout, LoRA wrapping."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from voice_lib.data.datasets import Example, feature_stats
from voice_lib.model.network import ModelConfig, VoiceModel

SHIPPED_BASE = Path(__file__).parents[1] / "assets" / "base"


E2E_CARD = ("VoiceOps reference acoustic model (see voice_lib/model/network.py): phonemes + GE2E speaker embedding → "
            "WORLD features → waveform. CPU-trained; every number below was measured by the recipe.")


def write_model_card(out_dir: Path, name: str, facts: dict, description: str = E2E_CARD,
                     reproduce: list[str] | None = None) -> None:
    """A Piper-style model card beside the weights: what the model is, its facts, and how to rebuild it."""
    reproduce = reproduce or ["voiceops corpus .voiceops/pretrain-corpus --sentences 80 --pretrain",
                              f"voiceops pretrain .voiceops/pretrain-corpus --steps {facts.get('steps_trained', 1200)}"]
    lines = [f"# {name}", "", description, ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items() if not isinstance(v, dict)]
    lines += ["", "## Reproduce", "", "```bash", *reproduce, "```"]
    (out_dir / "model_card.md").write_text("\n".join(lines) + "\n")


LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def new_base_model(examples: list[Example], cfg: ModelConfig | None = None) -> VoiceModel:
    from voice_lib.data.text import SYMBOLS

    cfg = cfg or ModelConfig(n_symbols=len(SYMBOLS))
    model = VoiceModel(cfg)
    mean, std = feature_stats(examples)
    model.feature_mean.copy_(torch.from_numpy(mean))
    model.feature_std.copy_(torch.from_numpy(std))
    return model


def save_base(model: VoiceModel, out_dir: Path, extra: dict, half: bool = False) -> Path:
    """Self-describing base checkpoint: safetensors weights + config.json (model config, symbols, lineage).

    ``half`` stores float16 weights (half the size, for the copy shipped in the repo); loading casts back.
    """
    from safetensors.torch import save_file

    from voice_lib.data.text import SYMBOLS, SYMBOLS_VERSION

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = {"model": model.cfg.to_dict(), "symbols_version": SYMBOLS_VERSION, "n_symbols": len(SYMBOLS), **extra}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return out_dir / "model.safetensors"


def load_base(path: Path) -> VoiceModel:
    from safetensors.torch import load_file

    from voice_lib.data.text import SYMBOLS_VERSION

    config = json.loads((path / "config.json").read_text())
    if config.get("symbols_version") != SYMBOLS_VERSION:
        raise ValueError(
            f"{path}: base model was trained with phoneme symbols v{config.get('symbols_version')}, "
            f"this code has v{SYMBOLS_VERSION}; retrain the base (voiceops pretrain) or use a matching release."
        )
    model = VoiceModel(ModelConfig(**config["model"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    model.eval()
    return model


def lora_model(base: VoiceModel, rank: int = 8, alpha: int | None = None):
    """Wrap a frozen base with LoRA adapters on every attention and feed-forward linear."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none")
    return get_peft_model(base, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- the two-stage backend's converter ------------------------------------------------------------

CONVERTER_WEIGHTS, CONVERTER_CONFIG = "converter.safetensors", "config.json"
SHIPPED_CONVERTER = Path(__file__).parents[1] / "assets" / "converter"


def save_converter(model, out_dir: Path, extra: dict, half: bool = False) -> Path:
    """Self-describing converter checkpoint: safetensors weights + config.json (``backend``, model config,
    the reference voices and their pitch statistics, lineage). ``half`` stores float16 weights."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(out_dir / CONVERTER_WEIGHTS))
    config = {"backend": "two_stage", "converter": model.cfg.to_dict(), **extra}
    (out_dir / CONVERTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return out_dir / CONVERTER_WEIGHTS


def load_converter(path: Path):
    """The converter saved by ``save_converter`` (float32, eval mode) and its config."""
    from safetensors.torch import load_file

    from voice_lib.model.converter import Converter, ConverterConfig

    config = json.loads((path / CONVERTER_CONFIG).read_text())
    if config.get("backend") != "two_stage":
        raise ValueError(f"{path / CONVERTER_CONFIG}: not a two-stage converter (backend {config.get('backend')!r})")
    model = Converter(ConverterConfig(**config["converter"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / CONVERTER_WEIGHTS)).items()})
    return model.eval(), config
