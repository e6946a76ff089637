"""Positional encodings: how the model knows where each character sits.

Two kinds. Absolute encodings add a vector to each token embedding before the first layer: `learned` (one trained
vector per position, GPT-2) and `sinusoidal` (fixed sin/cos, Vaswani et al.). Relative ones act inside every
attention layer: `rope` rotates queries and keys (Su et al.), `alibi` adds a per-head linear penalty on distance to
the attention scores (Press et al.). `none` (NoPE, Kazemnejad et al.) has neither: the causal mask alone carries
order, since a query at position i attends over exactly i + 1 keys. Since then: `xpos` (RoPE with a decay, Sun et
al.), and the learned biases `t5` (bucketed distance, Raffel et al.) and `fire` (an MLP of normalised distance, Li
et al.). Every relative encoding is one of two things that training and decoding both ask: a rotation
(`RotaryEmbedding.qk_tables`) or a bias (`.bias(query_positions, key_positions, dtype)`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONAL_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none", "t5", "xpos", "fire")
ROTATIONS = ("rope", "xpos")  # rotate queries and keys: `RotaryEmbedding`
BIASES = ("alibi", "t5", "fire")  # add to the scores: a module with `bias(query_positions, key_positions, dtype)`


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


ROPE_SCALINGS = ("linear", "ntk", "dynamic", "yarn")  # or None: RoPE as trained


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023), applied to cos and sin."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_frequencies(
    rotary_dim: int,
    base: float,
    scaling: str | None = None,
    factor: float = 1.0,
    original_length: int = 256,
    context: int | None = None,
) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (rotary_dim / 2, float64) and the factor cos and sin are multiplied by, for a
    context extension `scaling`, following `transformers`' modeling_rope_utils.py:

    - linear (Position Interpolation, Chen et al. 2023): every frequency divided by `factor`.
    - ntk (NTK-aware, bloc97 2023): the base raised to base * factor^(d / (d - 2)); the fastest frequency stays.
    - dynamic (dynamic NTK): ntk with the factor a context of `context` positions needs, factor * context /
      original_length - (factor - 1), and none within `original_length`.
    - yarn (Peng et al. 2023): frequencies that turn fewer than 1 time over `original_length` interpolated, more
      than 32 times kept, a linear ramp between; and the attention factor 0.1 ln(factor) + 1.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    if factor == 1:  # every method off, dynamic too (whose formula would still scale by context / original_length)
        scaling = None
    if scaling == "ntk" or (scaling == "dynamic" and context is not None and context > original_length):
        if scaling == "dynamic":
            factor = factor * context / original_length - (factor - 1)
        base = base * factor ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / base**exponents
    if scaling == "linear":
        return inv_freq / factor, 1.0
    if scaling != "yarn":
        return inv_freq, 1.0

    def turns_dim(turns: float) -> float:  # the channel pair whose frequency turns `turns` times over original_length
        return rotary_dim * math.log(original_length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(turns_dim(32)), 0), min(math.ceil(turns_dim(1)), rotary_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency as trained (fast ones), 0: interpolated (slow ones)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, yarn_attention_factor(factor)


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(L, D, D) matrices R with x @ R[p] = x * cos[p] + rotate_half(x) * sin[p], for cos and sin of (L, D) (both
    halves equal): y_i = x_i cos - x_(i+d/2) sin, y_(i+d/2) = x_(i+d/2) cos + x_i sin."""
    length, d = cos.shape
    half = torch.arange(d // 2, device=cos.device)
    c, s = cos[:, : d // 2], sin[:, : d // 2]
    rotation = torch.zeros(length, d, d, dtype=cos.dtype, device=cos.device)
    rotation[:, half, half] = rotation[:, half + d // 2, half + d // 2] = c
    rotation[:, half + d // 2, half] = -s
    rotation[:, half, half + d // 2] = s
    return rotation


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., RoFormer) in the rotate-half layout.

    Channel pairs (i, i + d/2) of each query and key are rotated by the angle pos * theta_i, theta_i =
    base^(-2i/r), so the dot product of a rotated query and key depends only on their offset. With
    `rotary_fraction` < 1 only the first r/2 pairs rotate (r = fraction x d, GPT-NeoX's partial rotary) and the
    others pass unchanged (angle 0). `scaling` stretches the frequencies to read past `original_length`
    (`rope_frequencies`). cos/sin are cached and grow on demand; `tables` gives them, and both the training kernels
    and decoding ask it, so every path rotates alike.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        initial_length: int = 256,
        rotary_fraction: float = 1.0,
        scaling: str | None = None,
        scaling_factor: float = 1.0,
        original_length: int | None = None,
    ):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.rotary_dim = int(head_dim * rotary_fraction)
        self.scaling, self.scaling_factor = scaling, scaling_factor
        self.original_length = original_length or initial_length
        inv_freq, self.attention_factor = self.frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rotations: torch.Tensor | None = None  # decoding_rotations' table, (L, 3, D, D)
        self._rotations_context: int | None = None
        self._dynamic: tuple[int, torch.Tensor, torch.Tensor] | None = None  # dynamic NTK's tables for one context
        self._build(initial_length)

    def frequencies(self, context: int | None = None) -> tuple[torch.Tensor, float]:
        """(head_dim / 2,) angles per position, 0 for the channel pairs that do not rotate, and the cos/sin factor."""
        inv_freq, factor = rope_frequencies(
            self.rotary_dim, self.base, self.scaling, self.scaling_factor, self.original_length, context
        )
        return torch.cat([inv_freq, inv_freq.new_zeros(self.head_dim // 2 - len(inv_freq))]), factor

    def angle_tables(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (len(positions), head_dim) in float32, the rotating pairs' scaled by `factor` (YaRN)."""
        angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        rotating = torch.cat([inv_freq, inv_freq]).to(positions.device) != 0
        cos = torch.where(rotating, angles.cos() * factor, 1.0)
        return cos.float(), (angles.sin() * factor).float()

    @torch.inference_mode(False)  # a table grown while generating must stay usable for training
    def _build(self, length: int) -> None:
        positions = torch.arange(length, device=self.inv_freq.device)
        cos, sin = self.angle_tables(positions, self.inv_freq, self.attention_factor)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._rotations = None

    def tables(self, start: int, length: int, context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles for positions start .. start + length - 1, each (length, head_dim). `context`
        is how many positions the model reads at once (dynamic NTK scales by it; default start + length)."""
        context = context or start + length
        if self.scaling == "dynamic" and context > self.original_length:
            if self._dynamic is None or self._dynamic[0] != context or self._dynamic[1].shape[0] < start + length:
                inv_freq, factor = self.frequencies(context)
                positions = torch.arange(max(context, start + length), device=self.inv_freq.device)
                with torch.inference_mode(False):
                    self._dynamic = (context, *self.angle_tables(positions, inv_freq, factor))
            return self._dynamic[1][start : start + length], self._dynamic[2][start : start + length]
        if start + length > self.cos.shape[0]:
            self._build(2 * (start + length))
        return self.cos[start : start + length], self.sin[start : start + length]

    def qk_tables(self, start: int, length: int, context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for queries and keys: (length, D) each, shared by both (xPos gives (2, length, D))."""
        return self.tables(start, length, context)

    def decoding_rotations(self, length: int, dtype: torch.dtype, context: int | None = None) -> torch.Tensor:
        """(length, 3, D, D): for each position, matrices that rotate the query and key and keep the value, so that
        `qkv @ R[position]` (qkv: (B, 3, H, D)) is RoPE for one decoding step in one operation. Built on first use
        for a KV cache of `context` positions (dynamic NTK's scale)."""
        table = self._rotations
        stale = table is None or length > table.shape[0] or table.dtype != dtype or table.device != self.cos.device
        if stale or (self.scaling == "dynamic" and context != self._rotations_context):
            self._rotations_context = context
            cos, sin = self.qk_tables(0, length, context)
            if cos.dim() == 2:
                cos, sin = cos.expand(2, *cos.shape), sin.expand(2, *sin.shape)
            query, key = (rotation_matrices(c.to(dtype), s.to(dtype)) for c, s in zip(cos, sin, strict=True))
            identity = torch.eye(self.head_dim, dtype=dtype, device=self.cos.device).expand(length, -1, -1)
            table = self._rotations = torch.stack([query, key, identity], dim=1)
        return table

    def shift_back(self, positions: int, dtype: torch.dtype) -> torch.Tensor:
        """(D, D): `key @ shift_back(n)` moves a rotated key n positions back (a pure rotation, no YaRN factor)."""
        angles = torch.tensor([-positions], device=self.inv_freq.device)
        cos, sin = self.angle_tables(angles, self.inv_freq, 1.0)
        return rotation_matrices(cos.to(dtype), sin.to(dtype))[0]

    def forward(self, x: torch.Tensor, start: int = 0, seq_dim: int = -2, context: int | None = None) -> torch.Tensor:
        """Rotates `x` of shape (..., T, ..., D), positions along `seq_dim`, whose first position is `start`."""
        seq_dim = seq_dim % x.dim()
        length = x.shape[seq_dim]
        cos, sin = self.tables(start, length, context)
        return apply_rotation(x, cos, sin, seq_dim)

    def rotate_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int, context: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H, D) and k (B, T, H_kv, D) rotated for positions start .. start + T - 1."""
        cos, sin = self.qk_tables(start, q.shape[1], context)
        if cos.dim() == 2:
            cos, sin = cos.expand(2, *cos.shape), sin.expand(2, *sin.shape)
        return apply_rotation(q, cos[0], sin[0], 1), apply_rotation(k, cos[1], sin[1], 1)

    def extra_repr(self) -> str:
        scaled = f", scaling={self.scaling} x{self.scaling_factor} of {self.original_length}" if self.scaling else ""
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}{scaled}"


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, cos and sin (T, D) along `seq_dim` of x (..., T, ..., D)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    broadcast = (cos.shape[0],) + (1,) * (x.dim() - seq_dim - 2) + (x.shape[-1],)
    cos, sin = cos.view(broadcast), sin.view(broadcast)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class XPos(RotaryEmbedding):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE whose query at position n is also scaled
    by zeta_i^(n / gamma) and key at m by zeta_i^(-m / gamma), zeta_i = (2i / d + 0.4) / 1.4, gamma = 512, so the
    score of a pair decays as zeta^((n - m) / gamma) with distance, fastest on the fast-turning channels."""

    SCALE_BASE = 512.0

    def __init__(self, head_dim: int, base: float = 10000.0, initial_length: int = 256):
        self.zeta = (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)
        super().__init__(head_dim, base, initial_length)

    @torch.inference_mode(False)
    def _build(self, length: int) -> None:
        super()._build(length)  # and the query's and key's cos and sin with their scales, (2, length, D) each
        positions = torch.arange(length, dtype=torch.float64, device=self.inv_freq.device)
        scale = self.zeta.to(positions.device) ** (positions[:, None] / self.SCALE_BASE)
        scale = torch.cat([scale, scale], dim=-1)
        scales = torch.stack([scale, 1 / scale])  # queries grow, keys shrink with position
        self.register_buffer("scaled_cos", (self.cos.double() * scales).float(), persistent=False)
        self.register_buffer("scaled_sin", (self.sin.double() * scales).float(), persistent=False)

    def qk_tables(self, start: int, length: int, context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.tables(start, length, context)  # grows the tables when needed
        return self.scaled_cos[:, start : start + length], self.scaled_sin[:, start : start + length]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, scale_base={self.SCALE_BASE}"


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


def t5_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucket of each distance i - j >= 0 (Raffel et al. 2020): one bucket per distance below
    num_buckets / 2, then log-spaced buckets up to `max_distance`; farther distances share the last one."""
    exact = num_buckets // 2
    far = (
        exact
        + (
            torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return torch.where(distance < exact, distance, far.clamp(max=num_buckets - 1))


class T5RelativeBias(nn.Module):
    """T5's relative attention bias: a learned scalar per head for each bucket of the distance i - j (`t5_buckets`:
    32 buckets, exact below 16, log-spaced up to 128), added to the scores; shared by every layer, as in T5."""

    NUM_BUCKETS, MAX_DISTANCE = 32, 128

    def __init__(self, n_head: int):
        super().__init__()
        self.buckets = nn.Embedding(self.NUM_BUCKETS, n_head)

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(H, Tq, Tk): each head's bias for the distance's bucket, -inf on future keys."""
        distance = query_positions[:, None] - key_positions[None, :]
        bias = self.buckets(t5_buckets(distance.clamp(min=0), self.NUM_BUCKETS, self.MAX_DISTANCE)).permute(2, 0, 1)
        return bias.masked_fill(distance < 0, -math.inf).to(dtype)


class FIRE(nn.Module):
    """Functional Interpolation for Relative Positions (Li et al. 2023): each head's bias is a small MLP (1 -> 32 ->
    H) of psi(i - j) / psi(max(i, L)), psi(x) = log(c x + 1), with c and L learned; dividing by the query's own
    position keeps the input in [0, 1] at any length. Shared by every layer; L starts at the training length."""

    WIDTH = 32

    def __init__(self, n_head: int, initial_threshold: int):
        super().__init__()
        self.initial_threshold = float(initial_threshold)
        self.mlp = nn.Sequential(nn.Linear(1, self.WIDTH), nn.ReLU(), nn.Linear(self.WIDTH, n_head))
        self.c = nn.Parameter(torch.tensor(0.1))
        self.threshold_scale = nn.Parameter(torch.tensor(1.0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initial values: c = 0.1, L = the training length, the MLP as PyTorch initialises it."""
        for layer in (self.mlp[0], self.mlp[2]):
            layer.reset_parameters()
        nn.init.constant_(self.c, 0.1)
        nn.init.constant_(self.threshold_scale, 1.0)

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(H, Tq, Tk): the MLP of each visible pair's normalised distance, -inf on future keys."""
        distance = (query_positions[:, None] - key_positions[None, :]).to(self.c.dtype)
        c = self.c.abs()
        threshold = (self.threshold_scale * self.initial_threshold).abs()
        normaliser = torch.log(c * torch.maximum(query_positions.to(c.dtype), threshold) + 1) + 1e-6
        normalized = torch.log(c * distance.clamp(min=0) + 1) / normaliser[:, None]
        bias = self.mlp(normalized.unsqueeze(-1)).permute(2, 0, 1)
        return bias.masked_fill(distance < 0, -math.inf).to(dtype)


def window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None, sinks: int
) -> torch.Tensor:
    """(Tq, Tk) True where query i may see key j: j <= i, and with a `window` W, i - j < W or j < `sinks` (Mistral's
    sliding window; StreamingLLM's attention sinks)."""
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if window is not None:
        visible &= (distance < window) | (key_positions[None, :] < sinks)
    return visible
