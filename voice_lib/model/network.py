"""The VoiceOps reference acoustic model, readable top to bottom.

A compact two-stage model in the GPT-SoVITS spirit, sized for 2 CPU cores:

1. text → content with durations: a transformer encoder over phonemes, conditioned on the speaker's
   GE2E embedding. Training finds each phoneme's duration by monotonic alignment search (MAS, as in
   Glow-TTS/Grad-TTS): the encoder predicts a per-phoneme mean of the acoustic frames, and MAS picks
   the most likely monotonic path. A small duration predictor learns those durations for inference.
2. content + speaker → acoustic features → waveform: a transformer decoder over the duration-expanded
   content predicts WORLD features (log F0, voicing, coded envelope, band aperiodicity), ``reduction``
   5 ms frames per step; the WORLD vocoder (voice_lib.data.features.world_synthesis) makes the waveform.

All linear layers inside attention and feed-forward blocks are named ``qkv``, ``proj``, ``fc1`` and
``fc2``: these are the LoRA targets for few-shot fine-tuning (voice_lib.train.loop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 63  # lf0 + vuv + 60 envelope + 1 band aperiodicity (16 kHz WORLD)
LF0, VUV = 0, 1


@dataclass
class ModelConfig:
    n_symbols: int = 275
    d_model: int = 192
    n_heads: int = 2
    ffn_dim: int = 768
    encoder_layers: int = 3
    decoder_layers: int = 3
    speaker_dim: int = 256  # GE2E
    feature_dim: int = FEATURE_DIM
    reduction: int = 4  # 5 ms frames predicted per decoder step (4 → 20 ms steps)
    dropout: float = 0.1
    max_positions: int = 4096

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoids(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        keep = ~pad_mask[:, None, None, :]  # (b, 1, 1, t): attend only to real positions
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block with a depthwise convolution for local context (as in FastSpeech 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=5, padding=2, groups=cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), pad_mask))
        # Zero the padding before the convolution: otherwise a row's edges depend on its batch neighbours.
        x = x + self.conv(self.norm2(x).masked_fill(pad_mask[..., None], 0.0).transpose(1, 2)).transpose(1, 2)
        x = x + self.dropout(self.ffn(self.norm3(x)))
        return x.masked_fill(pad_mask[..., None], 0.0)


class DurationPredictor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.d_model, cfg.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, 3, padding=1)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, 1)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Returns log(1 + duration in decoder steps) per phoneme."""
        keep = (~pad_mask)[..., None].float()
        h = self.dropout(self.norm1(F.relu(self.conv1((x * keep).transpose(1, 2)).transpose(1, 2))))
        h = self.dropout(self.norm2(F.relu(self.conv2((h * keep).transpose(1, 2)).transpose(1, 2))))
        return self.out(h).squeeze(-1).masked_fill(pad_mask, 0.0)


def monotonic_alignment(log_p: np.ndarray) -> np.ndarray:
    """Most likely monotonic path through log_p (phones x frames); returns frames per phone.

    Every phone gets at least one frame, frames advance one at a time, phones never go back (Glow-TTS).
    """
    n, t = log_p.shape
    if t < n:  # fewer frames than phones (a bad transcript): no monotonic path; spread evenly
        return _even(n, t)
    return _mas(np.ascontiguousarray(log_p, dtype=np.float64))


def _even(n: int, t: int) -> np.ndarray:
    bounds = np.linspace(0, t, n + 1).round().astype(np.int64)
    return np.diff(bounds)


try:  # numba makes MAS ~100x faster; it ships with librosa. Pure numpy/python is the fallback.
    from numba import njit
except ImportError:  # pragma: no cover
    def njit(*args, **kwargs):
        return (lambda f: f) if not args or not callable(args[0]) else args[0]


@njit(cache=True)
def _mas(log_p):
    n, t = log_p.shape
    neg = -1e9
    value = np.full((n, t), neg)
    value[0, 0] = log_p[0, 0]
    for j in range(1, t):
        for i in range(0, min(n, j + 1)):
            stay = value[i, j - 1]
            move = value[i - 1, j - 1] if i > 0 else neg
            value[i, j] = max(stay, move) + log_p[i, j]
    durations = np.zeros(n, dtype=np.int64)
    i = n - 1
    for j in range(t - 1, -1, -1):
        durations[i] += 1
        if i > 0 and (i == j or value[i - 1, j - 1] > value[i, j - 1]):
            i -= 1
    return durations


def expand(h: torch.Tensor, durations: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Repeat each phone's vector by its duration: (b, n, d), (b, n) → (b, T, d), zero padded."""
    out = [torch.repeat_interleave(h[i], durations[i].clamp(min=0), dim=0) for i in range(h.shape[0])]
    length = max_len or max(1, max(len(o) for o in out))
    return torch.stack([F.pad(o[:length], (0, 0, 0, length - min(len(o), length))) for o in out])


class VoiceModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.n_symbols, d, padding_idx=0)
        self.speaker = nn.Linear(cfg.speaker_dim, d)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.to_mean = nn.Linear(d, cfg.feature_dim)  # per-phone mean of the frames, for MAS
        self.durations = DurationPredictor(cfg)
        self.decoder_in = nn.Linear(d + cfg.feature_dim, d)
        self.decoder = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.to_frames = nn.Linear(d, cfg.reduction * cfg.feature_dim)
        self.register_buffer("positions", sinusoids(cfg.max_positions, d), persistent=False)
        # Normalisation statistics of the features, set from the pretraining data and saved with it.
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, phonemes: torch.Tensor, phone_mask: torch.Tensor, speaker: torch.Tensor):
        """phonemes (b, n) int, phone_mask (b, n) True at padding, speaker (b, 256) → (h, mean, log_dur)."""
        h = self.embed(phonemes) + self.positions[: phonemes.shape[1]] + self.speaker(speaker)[:, None]
        for block in self.encoder:
            h = block(h, phone_mask)
        h = self.encoder_norm(h).masked_fill(phone_mask[..., None], 0.0)
        return h, self.to_mean(h), self.durations(h.detach(), phone_mask)

    def decode(self, h: torch.Tensor, mean: torch.Tensor, durations: torch.Tensor, speaker: torch.Tensor, steps: int | None = None):
        """Expanded content → normalised features (b, steps * reduction, feature_dim)."""
        x = torch.cat([expand(h, durations, steps), expand(mean, durations, steps)], dim=-1)
        step_mask = torch.arange(x.shape[1])[None] >= durations.sum(1, keepdim=True)
        x = self.decoder_in(x) + self.positions[: x.shape[1]] + self.speaker(speaker)[:, None]
        for block in self.decoder:
            x = block(x, step_mask)
        frames = self.to_frames(self.decoder_norm(x))
        b, s, _ = frames.shape
        return frames.view(b, s * self.cfg.reduction, self.cfg.feature_dim), step_mask

    def reduce(self, features: torch.Tensor) -> torch.Tensor:
        """5 ms frames (b, T, f) → decoder steps (b, T // reduction, f) by averaging."""
        b, t, f = features.shape
        r = self.cfg.reduction
        return features[:, : t // r * r].reshape(b, t // r, r, f).mean(2)

    def align(self, mean: torch.Tensor, steps_target: torch.Tensor, phone_lengths, step_lengths) -> torch.Tensor:
        """MAS durations (b, n) in decoder steps, maximising the Gaussian likelihood of the targets."""
        with torch.no_grad():
            # log N(x | mean, I) up to a constant: -0.5 * ||x - mean||^2, for every (phone, step) pair
            dist = torch.cdist(mean, steps_target) ** 2
            log_p = (-0.5 * dist).cpu().numpy()
        out = torch.zeros(mean.shape[:2], dtype=torch.long)
        for i, (n, t) in enumerate(zip(phone_lengths.tolist(), step_lengths.tolist())):
            out[i, :n] = torch.from_numpy(monotonic_alignment(log_p[i, :n, :t]))
        return out

    def forward(self, phonemes, phone_lengths, speaker, features, frame_lengths, durations=None) -> dict:
        """Training pass. ``features`` are normalised 5 ms frames (b, T, feature_dim). Returns losses."""
        phone_mask = torch.arange(phonemes.shape[1])[None] >= phone_lengths[:, None]
        h, mean, log_dur = self.encode(phonemes, phone_mask, speaker)
        target_steps = self.reduce(features)
        step_lengths = frame_lengths // self.cfg.reduction
        if durations is None:
            durations = self.align(mean, target_steps, phone_lengths, step_lengths)
        step_mask = torch.arange(target_steps.shape[1])[None] >= step_lengths[:, None]
        valid = (~step_mask)[..., None].float()
        prior = (((expand(mean, durations, target_steps.shape[1]) - target_steps) ** 2) * valid).sum() / (valid.sum() * mean.shape[-1])
        pred, _ = self.decode(h, mean, durations, speaker, target_steps.shape[1])
        frame_valid = valid.repeat_interleave(self.cfg.reduction, dim=1)
        target = features[:, : pred.shape[1]]
        l1 = ((pred - target).abs() * frame_valid)
        denom = frame_valid.sum()
        feature_loss = l1[..., 2:].sum() / (denom * (self.cfg.feature_dim - 2))
        lf0_loss = l1[..., LF0:LF0 + 1].sum() / denom  # log F0 is interpolated through unvoiced frames
        vuv_loss = (l1[..., VUV:VUV + 1]).sum() / denom
        dur_target = torch.log1p(durations.float())
        dur_loss = (((log_dur - dur_target) ** 2) * (~phone_mask)).sum() / (~phone_mask).sum()
        loss = feature_loss + lf0_loss + 0.5 * vuv_loss + 0.1 * prior + 0.1 * dur_loss
        return {"loss": loss, "features": feature_loss, "lf0": lf0_loss, "vuv": vuv_loss, "prior": prior,
                "duration": dur_loss, "durations": durations}

    @torch.no_grad()
    def infer(self, phonemes: torch.Tensor, speaker: torch.Tensor, durations: torch.Tensor | None = None,
              speed: float = 1.0, phone_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features (b, T, feature_dim). With ``durations`` (reference timing) no prediction."""
        if phone_lengths is None:
            phone_lengths = torch.full((phonemes.shape[0],), phonemes.shape[1])
        phone_mask = torch.arange(phonemes.shape[1])[None] >= phone_lengths[:, None]
        h, mean, log_dur = self.encode(phonemes, phone_mask, speaker)
        if durations is None:
            durations = torch.clamp(torch.round(torch.expm1(log_dur) / speed), min=1).long().masked_fill(phone_mask, 0)
        pred, _ = self.decode(h, mean, durations, speaker)
        return pred

    def denormalize(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.feature_std + self.feature_mean

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std
