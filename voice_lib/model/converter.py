"""The timbre stage of the two-stage backend, readable top to bottom.

Source WORLD frames (the reference synthesizer's rendering, ``voice_lib.data.reference``) + the target's
GE2E embedding → the target speaker's frames on the source's timeline.

Input per 10 ms frame: the coded spectral envelope (60), voicing, and a per-utterance z-scored log F0
(the prosody's shape, not its level). Output: the target's coded envelope (60) and band aperiodicity (1).
Timing and voicing stay the source's; F0 is mapped to the target's statistics outside the network
(``reference.map_f0``). The envelope is predicted as a residual over the source envelope (both
normalised with the same statistics), so an uncertain model falls back towards the intelligible source
instead of a blur.

Blocks: pre-norm self-attention within a local window, a depthwise convolution (phones span 5–15
frames) and a feed-forward layer. Their Linear layers are named ``qkv``, ``proj``, ``fc1``, ``fc2`` as in
``voice_lib.model.network``, so LoRA fine-tuning and the server's multi-LoRA batching treat both models
alike. Padded frames are zeroed before every convolution and masked out of attention, so a row's
output is the same alone or in a batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voice_lib.model.network import (
    FeedForward,  # the same feed-forward layer (fc1/fc2) as the end-to-end model
)

LF0, VUV, ENVELOPE, APERIODICITY = 0, 1, slice(2, 62), slice(62, 63)  # feature-matrix columns
N_ENVELOPE = 60
FRAME_DIM = 63
# LoRA targets of a voice's adapter: every block's Linear layers (named as in voice_lib.model.network) and the
# speaker and output projections, where most of a voice's timbre lives (measured: training those two heads
# with the blocks' LoRA gave the best similarity; as LoRA they batch in the server like the rest).
CONVERTER_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2", "speaker", "out"]
IN_DIM = N_ENVELOPE + 2  # envelope, voicing, z-scored log F0
OUT_DIM = N_ENVELOPE + 1  # envelope, band aperiodicity


@dataclass
class ConverterConfig:
    d_model: int = 96
    n_heads: int = 2
    ffn_dim: int = 384
    n_layers: int = 3
    kernel_size: int = 5
    speaker_dim: int = 256  # GE2E
    dropout: float = 0.1
    max_window: int = 64  # attention sees at most this many frames either side (0: unlimited)

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ConverterConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: ConverterConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, cfg.kernel_size, padding=cfg.kernel_size // 2, groups=cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), keep))
        h = self.norm2(x) * valid  # padded frames must not leak into real ones through the convolution
        x = x + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(self.ffn(self.norm3(x)))


def attention_mask(lengths: torch.Tensor, t: int, radius: int) -> torch.Tensor:
    """(b, 1, t, t) boolean: True where a query frame may attend to a key frame (a real frame within
    ``radius``; 0 means unlimited)."""
    idx = torch.arange(t)
    keys = (idx[None, :] < lengths[:, None])[:, None, None, :]
    if radius <= 0:
        return keys
    return keys & ((idx[None] - idx[:, None]).abs() <= radius)[None, None]


class Converter(nn.Module):
    def __init__(self, cfg: ConverterConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(IN_DIM, cfg.d_model)
        self.speaker = nn.Linear(cfg.speaker_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, OUT_DIM)
        nn.init.zeros_(self.out.weight)  # starts as the identity on the envelope
        nn.init.zeros_(self.out.bias)
        # Normalisation of the envelope (shared by input and output) and aperiodicity, from pretraining data.
        self.register_buffer("env_mean", torch.zeros(N_ENVELOPE))
        self.register_buffer("env_std", torch.ones(N_ENVELOPE))
        self.register_buffer("bap_mean", torch.zeros(1))
        self.register_buffer("bap_std", torch.ones(1))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_statistics(self, frames: np.ndarray) -> None:
        """Normalisation statistics from stacked (N, 63) pretraining frames."""
        self.env_mean.copy_(torch.from_numpy(frames[:, ENVELOPE].mean(0)))
        self.env_std.copy_(torch.from_numpy(frames[:, ENVELOPE].std(0) + 1e-3))
        self.bap_mean.copy_(torch.from_numpy(frames[:, APERIODICITY].mean(0)))
        self.bap_std.copy_(torch.from_numpy(frames[:, APERIODICITY].std(0) + 1e-3))

    def inputs(self, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Raw source frames (b, t, 63) → normalised network input (b, t, IN_DIM), zero where padded."""
        env = (src[..., ENVELOPE] - self.env_mean) / self.env_std
        vuv = src[..., VUV:VUV + 1] * valid
        lf0 = src[..., LF0:LF0 + 1]
        n = vuv.sum(1, keepdim=True).clamp(min=1)
        mean = (lf0 * vuv).sum(1, keepdim=True) / n
        std = (((lf0 - mean) ** 2 * vuv).sum(1, keepdim=True) / n).sqrt().clamp(min=1e-3)
        return torch.cat([env, vuv, (lf0 - mean) / std * vuv], dim=-1) * valid

    def forward(self, src: torch.Tensor, speaker: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """src (b, t, 63) raw frames, speaker (b, 256), lengths (b,) → normalised prediction (b, t, OUT_DIM)."""
        b, t, _ = src.shape
        lengths = torch.full((b,), t) if lengths is None else lengths
        valid = (torch.arange(t)[None, :] < lengths[:, None]).unsqueeze(-1).to(src.dtype)
        x_in = self.inputs(src, valid)
        x = (self.inp(x_in) + self.speaker(speaker)[:, None]) * valid
        keep = attention_mask(lengths, t, self.cfg.max_window)
        for block in self.blocks:
            x = block(x, keep, valid)
        y = self.out(self.norm(x))
        return torch.cat([y[..., :N_ENVELOPE] + x_in[..., :N_ENVELOPE], y[..., N_ENVELOPE:]], dim=-1)

    def targets(self, tgt: torch.Tensor) -> torch.Tensor:
        """Raw target frames (b, t, 63) → normalised (b, t, OUT_DIM): the training target."""
        env = (tgt[..., ENVELOPE] - self.env_mean) / self.env_std
        bap = (tgt[..., APERIODICITY] - self.bap_mean) / self.bap_std
        return torch.cat([env, bap], dim=-1)

    def denormalize(self, src: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Source frames with the prediction's envelope and aperiodicity put in, in raw units."""
        out = src.clone()
        out[..., ENVELOPE] = pred[..., :N_ENVELOPE] * self.env_std + self.env_mean
        out[..., APERIODICITY] = pred[..., N_ENVELOPE:] * self.bap_std + self.bap_mean
        return out


def conversion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 on frames and on their frame-to-frame differences (which keeps phone transitions sharp)."""
    w = weight[..., None]
    frame = ((pred - target).abs() * w).sum() / (w.sum() * pred.shape[-1]).clamp(min=1)
    d_pred, d_target = pred[:, 1:] - pred[:, :-1], target[:, 1:] - target[:, :-1]
    wd = w[:, 1:] * w[:, :-1]
    delta = ((d_pred - d_target).abs() * wd).sum() / (wd.sum() * pred.shape[-1]).clamp(min=1)
    return frame + 0.5 * delta


@torch.no_grad()
def convert_frames(model: torch.nn.Module, source: np.ndarray, speaker: np.ndarray) -> np.ndarray:
    """One utterance's source frames → raw frames with the converted envelope and aperiodicity."""
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    src = torch.from_numpy(np.ascontiguousarray(source, np.float32))[None]
    pred = model(src, torch.from_numpy(np.asarray(speaker, np.float32))[None])
    return net.denormalize(src, pred)[0].numpy()
