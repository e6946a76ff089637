"""A decoder-only Transformer in plain torch.nn: the whole model in one file.

token embedding (+ absolute positions) -> n_layer x [x + attn(ln(x)); x + mlp(ln(x))] -> ln -> tied head

That is the default, GPT-2's block. The later techniques are options of `TransformerConfig` (docs/configuration.md):
RMSNorm for LayerNorm, post-LN (x = ln(x + f(x)), the 2017 Transformer's), a ReLU, squared-ReLU or SwiGLU MLP,
QK-norm, an untied output head, and soft-capped logits.

Positional encodings (lm/positional.py): `learned` and `sinusoidal` add a vector to each token embedding; `rope`
rotates the queries and keys inside every attention layer, `alibi` biases the attention scores by distance, and
`none` leaves order to the causal mask. Generation's one-position step and its KV cache are in lm/decoding.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import ConfigError, is_count, is_number
from lm.fused import RMS_EPS, relu2, rms_norm, swiglu
from lm.kernels import ATTENTION_BLOCK, BlockCausalAttention, RotaryHeads, byte_dropout
from lm.positional import (
    FIRE,
    POSITIONAL_ENCODINGS,
    ROPE_SCALINGS,
    ROTATIONS,
    ALiBi,
    ContextTooLongError,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    XPos,
    window_mask,
)

__all__ = ["POSITIONAL_ENCODINGS", "ContextTooLongError", "KVCache", "Transformer", "TransformerConfig"]

INITS = ("gpt2", "pytorch", "xavier", "zero_proj")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "relu", "relu2", "swiglu")


@dataclass
class PositionalEncodingConfig:
    """Which positional encoding to use, and RoPE's settings (the others ignore them; xPos takes `base`): its
    frequency base, the share of each head's channels that rotate, and a context extension (`scaling` by
    `scaling_factor` past `original_length`, the training length when null: lm.positional.rope_frequencies)."""

    name: str = "rope"
    base: float = 10000.0
    rotary_fraction: float = 1.0
    scaling: str | None = None  # null | linear | ntk | dynamic | yarn
    scaling_factor: float = 1.0
    original_length: int | None = None

    def check(self, head_dim: int) -> None:
        """Raises a ConfigError naming the setting that makes no sense."""
        if self.name not in POSITIONAL_ENCODINGS:
            raise ConfigError(f"pos_encoding={self.name!r} is not one of {', '.join(POSITIONAL_ENCODINGS)}.")
        if not is_positive_number(self.base) or self.base <= 1:
            raise ConfigError(f"model.pos_encoding.base={self.base} must be a number above 1.")
        fraction = self.rotary_fraction
        if not is_positive_number(fraction) or fraction > 1:
            raise ConfigError(f"model.pos_encoding.rotary_fraction={fraction} must be in (0, 1].")
        if self.name in ROTATIONS and (int(head_dim * fraction) % 2 or int(head_dim * fraction) < 2):
            raise ConfigError(
                f"RoPE rotates channel pairs, but rotary_fraction={fraction} of the head size {head_dim} is "
                f"{head_dim * fraction:g} channels; pick sizes that make it an even number, at least 2."
            )
        if self.scaling not in (None, *ROPE_SCALINGS):
            raise ConfigError(
                f"model.pos_encoding.scaling={self.scaling} is not one of null, {', '.join(ROPE_SCALINGS)}."
            )
        if self.scaling is not None and self.name != "rope":
            raise ConfigError(
                f"model.pos_encoding.scaling={self.scaling} extends RoPE's context, but pos_encoding={self.name}; "
                "use pos_encoding=rope, or leave scaling null."
            )
        if not is_positive_number(self.scaling_factor) or self.scaling_factor < 1:
            raise ConfigError(f"model.pos_encoding.scaling_factor={self.scaling_factor} must be a number >= 1.")
        if self.original_length is not None and not is_count(self.original_length):
            raise ConfigError(
                f"model.pos_encoding.original_length={self.original_length} must be a positive integer, or null "
                "for the training length."
            )


def is_positive_number(value) -> bool:
    return is_number(value) and value > 0


@dataclass
class TransformerConfig:
    """Everything that fixes the model's shape; saved in every checkpoint."""

    vocab_size: int
    seq_length: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    init: str = "gpt2"
    pos_encoding: PositionalEncodingConfig = field(default_factory=PositionalEncodingConfig)
    # attention's cost: grouped-query attention, and a sliding window with attention sinks (docs/configuration.md)
    n_kv_head: int | None = None  # key/value heads, dividing n_head (1: multi-query); null: n_head
    attention_window: int | None = None  # W: each query sees the last W positions (itself included); null: all
    attention_sinks: int = 0  # with a window, the first S positions stay visible to every query (StreamingLLM)
    # the techniques since GPT-2's block; these defaults are GPT-2's, and a checkpoint without them reads them so
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre (GPT-2) | post (the 2017 Transformer: the norm after each residual addition)
    mlp: str = "gelu"  # gelu | relu | relu2 (squared ReLU) | swiglu (hidden 8/3 x n_embd: the 4x MLP's parameters)
    qk_norm: bool = False  # RMSNorm of queries and keys per head, before RoPE and the scores
    tie_embeddings: bool = True  # the output head shares the token embedding's matrix
    logit_softcap: float | None = None  # c: logits become c * tanh(logits / c)
    unet_skips: bool = False  # the first half's block outputs feed the second half's inputs, mirrored (modded-nanogpt)
    value_embeddings: int = 0  # K tables of per-token values, mixed into the first K and the last K layers' values
    value_residual: bool = False  # every later layer's values mixed with the first layer's (ResFormer)

    def __post_init__(self):
        if not isinstance(self.pos_encoding, PositionalEncodingConfig):  # a dict, or a DictConfig
            self.pos_encoding = PositionalEncodingConfig(**self.pos_encoding)
        for name in ("vocab_size", "seq_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_count(value):
                raise ConfigError(f"model.{name}={value} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "pick sizes so that each head gets n_embd / n_head channels."
            )
        if self.pos_encoding.name in ROTATIONS and self.head_dim % 2:
            raise ConfigError(
                f"RoPE needs an even head size, but n_embd / n_head = {self.head_dim}; change model.n_embd or "
                "model.n_head."
            )
        self.pos_encoding.check(self.head_dim)
        if self.n_kv_head is not None and (not is_count(self.n_kv_head) or self.n_head % self.n_kv_head):
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (1 is multi-query "
                "attention), or be null for one key/value head per query head."
            )
        if self.attention_window is not None and not is_count(self.attention_window):
            raise ConfigError(
                f"model.attention_window={self.attention_window} must be a positive integer, or null for full "
                "attention."
            )
        if not is_count(self.attention_sinks, minimum=0):
            raise ConfigError(f"model.attention_sinks={self.attention_sinks} must be a non-negative integer.")
        if self.attention_sinks and self.attention_window is None:
            raise ConfigError(
                f"model.attention_sinks={self.attention_sinks} keeps the first positions visible past a sliding "
                "window, but model.attention_window is null; set a window, or attention_sinks=0."
            )
        if self.init not in INITS:
            raise ConfigError(f"model.init={self.init!r} is not one of {', '.join(INITS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")
        for name, choices in (("norm", NORMS), ("norm_position", NORM_POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}.")
        for name in ("qk_norm", "tie_embeddings", "unet_skips", "value_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}={getattr(self, name)!r} must be true or false.")
        if not is_count(self.value_embeddings, minimum=0) or self.value_embeddings > self.n_layer // 2:
            raise ConfigError(
                f"model.value_embeddings={self.value_embeddings!r} must be a whole number from 0 to n_layer // 2 = "
                f"{self.n_layer // 2} (each table serves one of the first and one of the last layers)."
            )
        cap = self.logit_softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int | float) or not cap > 0):
            raise ConfigError(f"model.logit_softcap={cap!r} must be a positive number, or null for no cap.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `n_kv_head`, or one per query head."""
        return self.n_kv_head or self.n_head

    @property
    def windowed(self) -> bool:
        """Whether attention is restricted beyond causality (a sliding window, with or without sinks)."""
        return self.attention_window is not None

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 x n_embd, or for SwiGLU's two input matrices 8/3 x n_embd rounded to a multiple
        of 8, which keeps the parameters and FLOPs of the 4x MLP."""
        if self.mlp == "swiglu":
            return 8 * max(1, round(self.n_embd * 8 / 3 / 8))
        return 4 * self.n_embd

    def value_table(self, layer: int) -> int | None:
        """The value embedding table that `layer` mixes in: table i for layer i and for layer n_layer - K + i (as
        modded-nanogpt shares its tables between the first and the last layers), else None."""
        K = self.value_embeddings
        if layer < K:
            return layer
        if layer >= self.n_layer - K:
            return layer - (self.n_layer - K)
        return None

    def value_sources(self, layer: int) -> int:
        """How many tensors `layer` mixes into its values: a value embedding, the first layer's values, both or none."""
        return int(self.value_table(layer) is not None) + int(self.value_residual and layer > 0)

    def to_dict(self) -> dict:
        return asdict(self)


class ValueMix:
    """What one forward pass's attention layers mix into their values: the value embeddings of its tokens (one per
    table, (B, T, H_kv x D) each) and, with a value residual, the first layer's values, which that layer puts here."""

    def __init__(self, embeddings: list[torch.Tensor]):
        self.embeddings = embeddings
        self.first: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Transformer


# On CPU, `lm.kernels` (RotaryHeads + BlockCausalAttention) beat PyTorch's fused attention kernel (docs/speed.md),
# but keep B x heads x T x T probabilities for backward. They take contexts up to 256, and longer ones while
# the scores stay within base's at 256 (64 x 6 x 256 x 256); past that the fused kernel, whose memory grows linearly
# with T, takes over. In fp32 without dropout, RotaryHeads feeds the fused kernel.
CPU_KERNELS_MAX_LENGTH = 256
CPU_KERNELS_MAX_SCORES = 64 * 6 * 256 * 256


class Dropout(nn.Module):
    """`nn.Dropout`, drawing its mask with `byte_dropout` on CPU, where `F.dropout` draws a 32-bit random number per
    element and is several times slower; elsewhere the fused `F.dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type == "cpu":
            return byte_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain (Zhang and Sennrich 2019): LayerNorm without the mean's
    subtraction or a bias. On a CPU in hand-written passes (lm/fused.py)."""

    def __init__(self, size: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(config: TransformerConfig, size: int) -> nn.Module:
    """The config's normalisation layer over `size` channels."""
    if config.norm == "rmsnorm":
        return RMSNorm(size)
    return nn.LayerNorm(size, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, C) to (B, T, C), with a rotation (RoPE, xPos), an additive bias
    (ALiBi, T5, FIRE, a window) or neither, grouped-query attention when `n_kv_head` < `n_head`, and a KV cache
    when given one."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = config.n_head, config.head_dim, layer
        self.n_kv_head = config.kv_heads
        # queries, then keys, then values: n_head + 2 n_kv_head heads of head_dim (3 x n_embd without GQA)
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)
        # QK-norm: RMSNorm of each head's query and key, with gains of their own (as OLMo 2 and Qwen 3 do)
        self.q_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        # value embeddings and the value residual: v = l0 v + l1 e + l2 v_first, with learned l (reset_parameters)
        self.value_table = config.value_table(layer)
        self.value_residual = config.value_residual
        sources = config.value_sources(layer)
        self.value_lambdas = nn.Parameter(torch.empty(1 + sources)) if sources else None

    def norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The query and key norms' gains, or (None, None) without QK-norm."""
        if self.q_norm is None:
            return None, None
        return self.q_norm.weight, self.k_norm.weight

    def mix_values(self, qkv: torch.Tensor, values: ValueMix | None) -> torch.Tensor:
        """The projection's output (..., (H + 2 H_kv) D) with its values mixed with the value embedding and the
        first layer's values where this layer takes them; the first layer of a value residual keeps its values in
        `values` for the others. Decoding's step calls this too."""
        if self.value_lambdas is None and not (self.value_residual and self.layer == 0):
            return qkv
        qk, v = qkv.split([(self.n_head + self.n_kv_head) * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        if self.value_lambdas is not None:
            sources = [values.embeddings[self.value_table]] if self.value_table is not None else []
            sources += [values.first] if self.value_residual and self.layer > 0 else []
            mixed = self.value_lambdas[0] * v
            for weight, source in zip(self.value_lambdas[1:], sources, strict=True):
                mixed = mixed + weight * source.to(v.dtype)
            v = mixed
            qkv = torch.cat([qk, v], dim=-1)
        if self.value_residual and self.layer == 0:
            values.first = v
        return qkv

    def heads(self, x: torch.Tensor, values: ValueMix | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, D), k and v (B, T, H_kv, D): views of one projection."""
        B, T, _ = x.shape
        qkv = self.mix_values(self.qkv(x), values)
        q, k, v = qkv.split([self.n_head * self.head_dim, *2 * [self.n_kv_head * self.head_dim]], dim=-1)
        return q.view(B, T, self.n_head, self.head_dim), *(t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))

    def fused_heads(self, x: torch.Tensor, values: ValueMix | None = None) -> torch.Tensor:
        """(B, T, 3, H, D): queries, keys and values with every query head's own key and value, as the CPU kernels
        take them; with grouped-query attention each key/value head is repeated for its group (one copy)."""
        B, T, _ = x.shape
        if self.n_kv_head == self.n_head:
            return self.mix_values(self.qkv(x), values).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = self.heads(x, values)
        group = self.n_head // self.n_kv_head
        kv = torch.stack([k, v], dim=2).unsqueeze(4).expand(B, T, 2, self.n_kv_head, group, self.head_dim)
        return torch.cat([q.unsqueeze(2), kv.reshape(B, T, 2, self.n_head, self.head_dim)], dim=2)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        bias: torch.Tensor | None,
        cache: KVCache | None,
        context: int | None = None,
        values: ValueMix | None = None,
    ) -> torch.Tensor:
        """`bias`: the additive mask (H or 1, T, cache length + T) with -inf on keys a query may not see (the future,
        or outside a window), or None (causal). `context`: the positions the model reads at once (dynamic NTK).
        `values`: what the values mix in (value embeddings, the value residual), or None."""
        B, T, C = x.shape
        dropout_p = self.dropout if self.training else 0.0
        on_cpu_kernels = T <= CPU_KERNELS_MAX_LENGTH or B * self.n_head * T * T <= CPU_KERNELS_MAX_SCORES
        if cache is None and x.device.type == "cpu" and on_cpu_kernels:
            # the same computation as below, in hand-written passes (lm/kernels.py) or, where it wins, the flash kernel
            qkv = self.fused_heads(x, values)
            cos, sin = rope.qk_tables(0, T, context) if rope is not None else (None, None)
            q_weight, k_weight = self.norm_weights()  # RotaryHeads normalises q and k first, with QK-norm
            if dropout_p == 0 and bias is None and qkv.dtype == torch.float32:
                # fp32 without dropout, PyTorch's flash kernel is faster; with dropout the block kernel is (above);
                # bf16 keeps the block kernel (docs/speed.md)
                if rope is None and q_weight is None:  # the kernel takes strided views: a head-major copy would
                    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # cost a pass over q, k, v
                else:
                    heads = RotaryHeads.apply(qkv, cos, sin, q_weight, k_weight)
                    q, k, v = (t.view(B, self.n_head, T, self.head_dim) for t in heads)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                q, k, v = RotaryHeads.apply(qkv, cos, sin, q_weight, k_weight)
                y = BlockCausalAttention.apply(q, k, v, dropout_p, ATTENTION_BLOCK, bias)
                y = y.view(B, self.n_head, T, self.head_dim)
            return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        start = cache.length if cache is not None else 0
        q, k, v = self.heads(x, values)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.rotate_qk(q, k, start, context)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        gqa = self.n_kv_head != self.n_head
        if cache is None and bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
        elif cache is None:  # the bias carries the causal mask: attn_mask and is_causal do not go together
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, enable_gqa=gqa)
        else:
            if start:  # continuing a cache's text: attend to its positions too (they lie in slots 0 .. start - 1)
                keys, values = cache.kv[self.layer]
                k, v = torch.cat([keys[:, :, :start], k], dim=2), torch.cat([values[:, :, :start], v], dim=2)
            cache.store(self.layer, k[:, :, start:], v[:, :, start:], start)
            # query i sits at absolute position start + i and may see keys 0 .. start + i (is_causal would align
            # the mask top-left, which is wrong once the cache holds earlier positions)
            if bias is not None:
                mask = bias.to(q.dtype)
            else:
                mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """The feed-forward part of a block: C to the hidden width, the activation, back to C (with dropout).

    `gelu` (GPT-2), `relu` (2017) and `relu2` (max(x, 0)^2, Primer) widen to 4C; `swiglu` (silu(a) * b, Shazeer
    2020) computes a and b with one matrix of 2 x 8/3 C rows, so that its three matrices hold the 4x MLP's
    parameters."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.mlp_hidden
        self.kind = config.mlp
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """The nonlinearity between fc and proj (SwiGLU halves the width)."""
        if self.kind == "gelu":
            return F.gelu(h)
        if self.kind == "relu":
            return F.relu(h)
        if self.kind == "relu2":
            return relu2(h)
        return swiglu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class Block(nn.Module):
    """Residual block, attention then MLP: pre-norm x + f(ln(x)) (GPT-2, the default) or post-norm ln(x + f(x))
    (the 2017 Transformer)."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        bias: torch.Tensor | None,
        cache: KVCache | None,
        context: int | None = None,
        values: ValueMix | None = None,
    ) -> torch.Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, bias, cache, context, values))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, bias, cache, context, values)
        return x + self.mlp(self.ln_2(x))


def decoding_positions(max_length: int) -> int:
    """How many positions decoding steps with a cache of `max_length` slots can be at: a sliding cache's positions
    are kept below twice its slots (`rewind_cache`), and RoPE's decoding table covers them."""
    return 2 * max_length


# a slot's position before anything is written there: below any position a rewound sliding cache can reach
UNFILLED = -(2**62)


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated up to `max_length` slots.

    Layer i's keys are `kv[i][0]` and its values `kv[i][1]`, each (B, H_kv, max_length, D) (only the key/value
    heads: grouped-query attention's cache is n_head / n_kv_head times smaller): one tensor per layer, so a decoding
    step writes a position's key and value with one copy. `matrices`, when given, maps a model's `nn.Linear` modules
    to the matrices that one-position steps multiply with instead of their own weights (see `decoding_matrices`).

    Position p lives in slot p while p < max_length. Decoding may go past that where the model's scores depend only
    on distances (`sliding_cache`): the first `attention_sinks` slots keep their positions, and the others form a
    ring over the newest, p in slot S + (p - S) % (max_length - S), overwriting the oldest; `rewind_cache` keeps
    positions below 2 x max_length. `slot_positions` says which position each slot holds (UNFILLED: none yet).
    """

    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        max_length: int,
        device,
        dtype,
        matrices: dict[nn.Module, torch.Tensor | torch.ScriptObject] | None = None,
    ):
        shape = (2, batch_size, config.kv_heads, max_length, config.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # 0-d position tensors for decoding steps
        self.positions = torch.arange(decoding_positions(max_length), device=device)
        self.slot_positions = torch.full((max_length,), UNFILLED, device=device)
        self.length = 0  # positions decoded so far (the next position)
        self.max_length = max_length
        self.sinks = min(config.attention_sinks, max_length - 1) if config.windowed else 0
        # a windowed model's cache may be shorter than a prompt: it keeps the sinks and the last W positions
        self.keeps_what_is_visible = config.windowed and max_length >= self.sinks + config.attention_window
        self.matrices = matrices or {}
        if torch.device(device).type == "cuda":  # a compiled step mutates them in place inside a CUDA graph
            for tensor in (*self.kv, self.positions, self.slot_positions):
                torch._dynamo.mark_static_address(tensor)

    def slot(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each position: itself among the sinks, else its place in the ring of the other slots."""
        ring = self.max_length - self.sinks
        return torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % ring)

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Writes keys and values (B, H_kv, T, D) of positions start .. start + T - 1 into their slots; past the
        cache's length, only those that stay (the sinks and the newest)."""
        positions = torch.arange(start, start + keys.shape[2], device=keys.device)
        if start + keys.shape[2] > self.max_length:
            newest = start + keys.shape[2] - (self.max_length - self.sinks)
            keep = (positions < self.sinks) | (positions >= newest)
            positions, keys, values = positions[keep], keys[:, :, keep], values[:, :, keep]
        slots = self.slot(positions)
        self.kv[layer][0].index_copy_(2, slots, keys.to(self.kv[layer].dtype))
        self.kv[layer][1].index_copy_(2, slots, values.to(self.kv[layer].dtype))
        if layer == 0:
            self.slot_positions.index_copy_(0, slots, positions)

    def memory_bytes(self) -> int:
        """Bytes the keys and values take."""
        return sum(t.numel() * t.element_size() for t in self.kv)


class Transformer(nn.Module):
    """Character-level decoder-only Transformer with a pluggable positional encoding."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        pe = config.pos_encoding
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        # at most one of them; none of them for NoPE: an absolute position added to the embeddings, a rotation of
        # queries and keys, or a bias on the scores
        self.position = self.rope = self.relative_bias = None
        if pe.name == "learned":
            self.position = LearnedPositionalEmbedding(config.seq_length, config.n_embd)
        elif pe.name == "sinusoidal":
            self.position = SinusoidalPositionalEncoding(config.n_embd, config.seq_length)
        elif pe.name == "rope":
            self.extend_context(pe.scaling, pe.scaling_factor, pe.original_length)
        elif pe.name == "xpos":
            self.rope = XPos(config.head_dim, pe.base, config.seq_length)
        elif pe.name == "alibi":
            self.relative_bias = ALiBi(config.n_head)
        elif pe.name == "t5":
            self.relative_bias = T5RelativeBias(config.n_head)
        elif pe.name == "fire":
            self.relative_bias = FIRE(config.n_head, config.seq_length)
        self.embedding_scale = math.sqrt(config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # U-Net skips: one learned weight per pair (block i's output, block n_layer - 1 - i's input), starting at 1
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2)) if config.unet_skips else None
        # value embeddings: per-token values, one table per pair of layers that mixes them in (config.value_table)
        kv_width = config.kv_heads * config.head_dim
        self.value_embeddings = nn.ModuleList(
            nn.Embedding(config.vocab_size, kv_width) for _ in range(config.value_embeddings)
        )
        # post-norm blocks end normalised already: no final norm, as in the 2017 Transformer
        self.ln_f = nn.Identity() if config.norm_position == "post" else make_norm(config, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.token_embedding.weight  # tied input and output embeddings
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises weights per `config.init`. Biases start at 0 and norm gains at 1 in all three.

        - gpt2: every weight matrix N(0, 0.02); the residual projections N(0, 0.02 / sqrt(2 n_layer)), so the
          residual stream's variance does not grow with depth (GPT-2, nanoGPT).
        - pytorch: each module's own default: linear layers U(+-1/sqrt(fan_in)), embeddings N(0, 1).
        - xavier: every weight matrix U(+-sqrt(6 / (fan_in + fan_out))) (Glorot and Bengio), depth-independent.
        - zero_proj: gpt2's, but the residual projections (attention's and the MLP's output) start at zero, so every
          block starts as the identity (modded-nanogpt); their inputs are not zero, so they learn from the first step.

        An untied head is a weight matrix like the others.
        """
        if self.skip_weights is not None:  # each U-Net skip starts as a plain addition, under every init
            nn.init.ones_(self.skip_weights)
        mixing = [b.attn.value_lambdas for b in self.blocks if b.attn.value_lambdas is not None]
        for lambdas in mixing:  # a layer's values start as the even mean of what it mixes, as modded-nanogpt's
            nn.init.constant_(lambdas, 1.0 / len(lambdas))
        if self.config.init == "pytorch":
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if isinstance(self.position, LearnedPositionalEmbedding):
                nn.init.normal_(self.position.weight)
            return
        gains = {id(m.weight) for m in self.modules() if isinstance(m, nn.LayerNorm | RMSNorm)}
        for name, param in self.named_parameters():
            if param is self.skip_weights or name.endswith("value_lambdas"):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif id(param) in gains:
                nn.init.ones_(param)
            elif self.config.init == "xavier":
                nn.init.xavier_uniform_(param)
            elif name.endswith("proj.weight") and self.config.init == "zero_proj":
                nn.init.zeros_(param)
            elif name.endswith("proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(param, std=0.02)
        if isinstance(self.relative_bias, FIRE):  # its scalars and tiny MLP start as the paper's
            self.relative_bias.reset_parameters()

    def extend_context(self, scaling: str | None, factor: float = 1.0, original_length: int | None = None) -> None:
        """Applies RoPE's context extension `scaling` by `factor` past `original_length` (default the training
        length) to this model as it is, without retraining: its rotation is rebuilt, the weights stay. Raises a
        ConfigError for a model without RoPE."""
        pe = self.config.pos_encoding
        if pe.name != "rope":
            raise ConfigError(
                f"model.pos_encoding.scaling={scaling} extends RoPE's context, but this model uses {pe.name} "
                "positions; leave the scaling settings out for it."
            )
        settings = PositionalEncodingConfig(
            pe.name, pe.base, pe.rotary_fraction, scaling, factor, original_length or pe.original_length
        )
        settings.check(self.config.head_dim)
        self.config.pos_encoding = settings
        device = self.token_embedding.weight.device
        self.rope = RotaryEmbedding(
            self.config.head_dim,
            pe.base,
            self.config.seq_length,
            pe.rotary_fraction,
            scaling,
            factor,
            settings.original_length or self.config.seq_length,
        ).to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of shape (B, T, vocab_size) for token ids `idx` of shape (B, T).

        With a `cache`, `idx` continues the sequence already in it and the cache advances by T positions.
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_length and (start or not cache.keeps_what_is_visible):
            raise ContextTooLongError(f"the KV cache holds {cache.max_length} positions; {start + T} were asked for")
        x = self.token_embedding(idx)
        if isinstance(self.position, SinusoidalPositionalEncoding):
            # as in "Attention Is All You Need": scale embeddings by sqrt(d) so the fixed, unit-amplitude encoding
            # does not drown them (with N(0, 0.02) embeddings it would be ~35x larger)
            x = x * self.embedding_scale + self.position(start, T)
        elif self.position is not None:
            x = x + self.position(start, T)
        x = self.dropout(x)
        bias = self.attention_bias(start, T, idx.device)
        context = cache.max_length if cache is not None else T  # what dynamic NTK scales for
        values = self.value_mix(idx)
        x = self.through_blocks(x, lambda block, h: block(h, self.rope, bias, cache, context, values))
        if cache is not None:
            cache.length += T
        return self.cap_logits(self.head(self.ln_f(x)))

    def through_blocks(self, x: torch.Tensor, run_block: Callable[[Block, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x through every block, `run_block(block, x)` each (the forward pass's, or decoding's step), with the U-Net
        skips when the model has them: block i's output is kept for the first n_layer // 2 blocks, and added, times
        its learned weight, to the input of block n_layer - 1 - i (a middle block of an odd depth has no pair)."""
        if self.skip_weights is None:
            for block in self.blocks:
                x = run_block(block, x)
            return x
        pairs, kept = len(self.skip_weights), []
        for i, block in enumerate(self.blocks):
            if i >= len(self.blocks) - pairs:
                x = x + self.skip_weights[len(self.blocks) - 1 - i] * kept.pop()
            x = run_block(block, x)
            if i < pairs:
                kept.append(x)
        return x

    def value_mix(self, idx: torch.Tensor) -> ValueMix | None:
        """What the attention layers mix into their values for tokens `idx`: their value embeddings (and room for
        the first layer's values); None for a model without value embeddings or a value residual."""
        if not self.config.value_embeddings and not self.config.value_residual:
            return None
        return ValueMix([table(idx) for table in self.value_embeddings])

    def attention_bias(self, start: int, length: int, device) -> torch.Tensor | None:
        """The additive mask (H or 1, length, start + length) for positions start .. start + length - 1 over keys 0 ..
        start + length - 1: the encoding's bias, -inf where a key is in the future or outside the window; None for
        plain causal attention. Built once per forward, shared by every layer."""
        if self.relative_bias is None and not self.config.windowed:
            return None
        positions = torch.arange(start + length, device=device)
        queries = positions[start:]
        dtype = torch.promote_types(self.token_embedding.weight.dtype, torch.float32)  # fp32 under bf16 autocast
        if self.relative_bias is not None:
            bias = self.relative_bias.bias(queries, positions, dtype)
        else:
            bias = torch.zeros(1, length, start + length, device=device, dtype=dtype)
        if self.config.windowed:
            hidden = ~window_mask(queries, positions, self.config.attention_window, self.config.attention_sinks)
            bias = bias.masked_fill(hidden, -math.inf)
        return bias

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """With `logit_softcap` c, c * tanh(logits / c) in float32 (Gemma 2): no logit grows past c; else logits."""
        cap = self.config.logit_softcap
        if cap is None:
            return logits
        wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # bf16 under autocast
        return torch.tanh(wide / cap) * cap
