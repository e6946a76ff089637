"""Positional encodings: how the model knows where each character sits.

Two kinds. Absolute encodings add a vector to each token embedding before the first layer: `learned` (one trained
vector per position, GPT-2) and `sinusoidal` (fixed sin/cos, Vaswani et al.). Relative ones act inside every
attention layer: `rope` rotates queries and keys (Su et al.), `alibi` adds a per-head linear penalty on distance to
the attention scores (Press et al.). `none` (NoPE, Kazemnejad et al.) has neither: the causal mask alone carries
order, since a query at position i attends over exactly i + 1 keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONAL_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")


class ContextTooLongError(ValueError):
    """A sequence is longer than the positional encoding can index (learned absolute positions)."""


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)) (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table.float()


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per absolute position; cannot go past `max_length`."""

    def __init__(self, max_length: int, dim: int):
        super().__init__()
        self.max_length = max_length
        self.weight = nn.Parameter(torch.zeros(max_length, dim))

    def forward(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.max_length:
            raise ContextTooLongError(
                f"learned positions only go up to {self.max_length}; position {start + length - 1} was asked for"
            )
        return self.weight[start : start + length]


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed sin/cos encoding; the table grows on demand, so any length works."""

    def __init__(self, dim: int, initial_length: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoidal_table(initial_length, dim), persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.table.shape[0]:
            with torch.inference_mode(False):  # a table grown while generating must stay usable for training
                self.table = sinusoidal_table(2 * (start + length), self.dim).to(self.table.device)
        return self.table[start : start + length]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., RoFormer) in the rotate-half layout.

    Channel pairs (i, i + d/2) of each query and key are rotated by the angle pos * base^(-2i/d), so the dot
    product of a rotated query and key depends only on their offset. cos/sin are cached and grow on demand.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, initial_length: int = 256):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rotations: torch.Tensor | None = None  # decoding_rotations' table, (L, 3, D, D)
        self._build(initial_length)

    @torch.inference_mode(False)  # a table grown while generating must stay usable for training
    def _build(self, length: int) -> None:
        angles = torch.arange(length, dtype=torch.float64, device=self.inv_freq.device)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self._rotations = None

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles for positions start .. start + length - 1, each (length, head_dim)."""
        if start + length > self.cos.shape[0]:
            self._build(2 * (start + length))
        return self.cos[start : start + length], self.sin[start : start + length]

    def decoding_rotations(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """(length, 3, D, D): for each position, matrices that rotate the query and key and keep the value, so that
        `qkv @ R[position]` (qkv: (B, 3, H, D)) is RoPE for one decoding step in one operation. Built on first use."""
        table = self._rotations
        if table is None or length > table.shape[0] or table.dtype != dtype or table.device != self.cos.device:
            cos, sin = (t[:, : t.shape[1] // 2].to(dtype) for t in self.tables(0, length))
            d, half = 2 * cos.shape[1], torch.arange(cos.shape[1], device=cos.device)
            rotation = torch.zeros(length, d, d, dtype=dtype, device=cos.device)
            # y = x @ R: y_i = x_i cos - x_(i+d/2) sin, y_(i+d/2) = x_(i+d/2) cos + x_i sin (the rotate-half layout)
            rotation[:, half, half] = rotation[:, half + d // 2, half + d // 2] = cos
            rotation[:, half + d // 2, half] = -sin
            rotation[:, half, half + d // 2] = sin
            identity = torch.eye(d, dtype=dtype, device=cos.device).expand(length, d, d)
            table = self._rotations = torch.stack([rotation, rotation, identity], dim=1)
        return table

    def forward(self, x: torch.Tensor, start: int = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotates `x` of shape (..., T, ..., D), positions along `seq_dim`, whose first position is `start`."""
        seq_dim = seq_dim % x.dim()
        length = x.shape[seq_dim]
        cos, sin = self.tables(start, length)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        broadcast = (length,) + (1,) * (x.dim() - seq_dim - 2) + (x.shape[-1],)
        cos, sin = cos.view(broadcast), sin.view(broadcast)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi's head-specific slopes (Press et al., 2022): for n a power of two, the geometric sequence that starts
    at and has ratio 2^(-8/n) (1/2, 1/4, ..., 1/256 for 8 heads). Otherwise, the slopes of the power of two just
    below n, then every other slope of twice that power for the remaining heads (the paper's own code)."""
    if n_head & (n_head - 1) == 0:
        first = 2 ** (-8 / n_head)
        return [first ** (i + 1) for i in range(n_head)]
    below = 2 ** math.floor(math.log2(n_head))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: n_head - below]


class ALiBi(nn.Module):
    """Attention with Linear Biases: head h adds -slope_h * (i - j) to the score of query position i for key
    position j <= i, so attention fades with distance at a rate that differs per head; no position is ever
    embedded, which lets a model read contexts longer than it was trained on."""

    def __init__(self, n_head: int):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_head)), persistent=False)

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask (H, Tq, Tk) for absolute positions: the linear bias where a key is visible,
        -inf where it lies in the query's future. Built from absolute positions, so it is right with a KV cache."""
        distance = (key_positions[None, :] - query_positions[:, None]).to(self.slopes.dtype)  # j - i, <= 0 if seen
        bias = self.slopes[:, None, None] * distance
        return bias.masked_fill_(distance > 0, -math.inf).to(dtype)
