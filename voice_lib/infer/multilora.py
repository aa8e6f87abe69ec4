"""Many LoRA adapters on one shared base model, chosen per batch row.

Every voice is the shared base plus a small LoRA adapter (voice_lib.model.checkpoints.lora_model). Serving N
voices with N peft models would copy the base N times; swapping adapter weights per request would serialise
all traffic. Instead each LoRA target Linear of the base (``qkv``, ``proj``, ``fc1``, ``fc2``) is wrapped
once in a ``MultiLoraLinear``, and a ``LoraBank`` holds the adapters of every loaded version stacked
into one tensor per layer. A batch says which adapter each row uses (``activate(bank, rows)``) and every
wrapped layer adds ``scale_i * B_i(A_i(x_i))`` to row i with two batched matmuls over gathered weights
(the S-LoRA/Punica "gather then bmm" scheme). Mixed-voice batches therefore cost about one base pass.
The single-utterance Synthesizer (evaluation, the CLI) uses the same layers with a one-adapter bank, so
its audio is the server's (voice_lib/infer/core.py).

A row's output is the same alone or in any batch: the model itself zeroes convolution inputs at
padded positions (voice_lib.model.network.Block, DurationPredictor).

Nothing here mutates the model while serving: a new adapter set is a new ``LoraBank`` object, and a
batch keeps the bank it started with, so reloads never race with inference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from voice_lib.model.checkpoints import LORA_TARGETS

# (bank, per-row slot indices) of the batch running in this thread; None outside a batch (plain base).
_ACTIVE: ContextVar[tuple[LoraBank, torch.Tensor] | None] = ContextVar("voiceops_active_lora", default=None)
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder cannot be served on this base; the message says which file or layer and why."""


@dataclass(frozen=True)
class AdapterWeights:
    """One version's LoRA factors: module path -> (A (r, in), B * scale (out, r)).

    The scale (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into B once at load time.
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.layers.values())

    @classmethod
    def load(cls, folder: Path) -> AdapterWeights:
        """Read a peft ``save_pretrained`` folder (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import load_file

        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.exists() or not weights_path.exists():
            raise AdapterError(f"{folder}: adapter_config.json and adapter_model.safetensors are both required.")
        config = json.loads(config_path.read_text())
        # Variants that change the maths (DoRA, per-layer ranks, extra trained modules) are refused rather
        # than silently served wrong; voice_lib.model.checkpoints.lora_model never produces them.
        for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out"):
            if config.get(key):
                raise AdapterError(f"{folder}: adapter_config.json sets {key}={config[key]!r}, which the server does not support.")
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors = load_file(str(weights_path))
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith(".lora_B.weight"):
                    raise AdapterError(f"{folder}: unexpected tensor {key!r} (only lora_A/lora_B weights are served).")
                continue
            path = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None or a.shape[0] != b.shape[1]:
                raise AdapterError(f"{folder}: layer {path} has no matching lora_B of rank {a.shape[0]}.")
            layers[path] = (a.float().contiguous(), (b.float() * scale).contiguous())
        if not layers:
            raise AdapterError(f"{folder}: adapter_model.safetensors holds no LoRA weights.")
        return cls(layers=layers, rank=max(a.shape[0] for a, _ in layers.values()))


class MultiLoraLinear(nn.Module):
    """A base Linear plus the active bank's LoRA delta for each batch row (none outside a batch)."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        active = _ACTIVE.get()
        if active is None:
            return y
        bank, rows = active
        stacked = bank.layers.get(self.name)
        if stacked is None:  # no loaded adapter touches this layer
            return y
        a, b = stacked[0][rows], stacked[1][rows]  # (batch, r, in), (batch, out, r): each row its own adapter
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.reshape(*x.shape[:-1], delta.shape[-1])


def install(model: nn.Module, targets: Sequence[str] = LORA_TARGETS) -> dict[str, tuple[int, int]]:
    """Wrap every target Linear of ``model`` in place; returns {module path: (in, out)} of the wrapped layers."""
    shapes: dict[str, tuple[int, int]] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, path.rsplit(".", 1)[-1], MultiLoraLinear(module, path))
            shapes[path] = (module.in_features, module.out_features)
    return shapes


class LoraBank:
    """An immutable set of adapters stacked per layer; slot 0 is "no adapter" (all zeros, the plain base).

    Ranks may differ between adapters: smaller ones are zero-padded to the largest, which adds exact zeros.
    """

    def __init__(self, adapters: Sequence[tuple[Hashable, AdapterWeights]], shapes: dict[str, tuple[int, int]]):
        self.slots: dict[Hashable, int] = {key: i + 1 for i, (key, _) in enumerate(adapters)}
        rank = max((w.rank for _, w in adapters), default=1)
        n = len(adapters) + 1
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path in sorted({p for _, w in adapters for p in w.layers}):
            if path not in shapes:
                raise AdapterError(f"adapter layer {path} is not a LoRA target of the base model.")
            d_in, d_out = shapes[path]
            a_stack, b_stack = torch.zeros(n, rank, d_in), torch.zeros(n, d_out, rank)
            for key, weights in adapters:
                if path in weights.layers:
                    a, b = weights.layers[path]
                    if a.shape[1] != d_in or b.shape[0] != d_out:
                        raise AdapterError(f"adapter {key}: layer {path} is {b.shape[0]}x{a.shape[1]}, "
                                           f"the base has {d_out}x{d_in}; it was trained on another base.")
                    a_stack[self.slots[key], : a.shape[0]] = a
                    b_stack[self.slots[key], :, : b.shape[1]] = b
            layers[path] = (a_stack, b_stack)
        self.layers = layers

    def __len__(self) -> int:
        return len(self.slots)

    def slot(self, key: Hashable) -> int:
        return self.slots[key]


@contextmanager
def activate(bank: LoraBank, rows: Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Within the block, row i of every forward pass in this thread uses adapter slot ``rows[i]``."""
    token = _ACTIVE.set((bank, torch.as_tensor(rows, dtype=torch.long)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
