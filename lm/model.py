"""A decoder-only Transformer in plain torch.nn: the whole model in one file.

token embedding (+ absolute positions) -> n_layer x [x + attn(ln(x)); x + mlp(ln(x))] -> ln -> tied head

Positional encodings (lm/positional.py): `learned` and `sinusoidal` add a vector to each token embedding; `rope`
rotates the queries and keys inside every attention layer, `alibi` biases the attention scores by distance, and
`none` leaves order to the causal mask. Generation's one-position step and its KV cache are in lm/decoding.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import ConfigError, is_count
from lm.kernels import ATTENTION_BLOCK, BlockCausalAttention, RotaryHeads, byte_dropout
from lm.positional import (
    POSITIONAL_ENCODINGS,
    ALiBi,
    ContextTooLongError,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = ["POSITIONAL_ENCODINGS", "ContextTooLongError", "KVCache", "Transformer", "TransformerConfig"]

INITS = ("gpt2", "pytorch", "xavier")


@dataclass
class PositionalEncodingConfig:
    """Which positional encoding to use; `base` is RoPE's frequency base (ignored by the others)."""

    name: str = "rope"
    base: float = 10000.0


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

    def __post_init__(self):
        if isinstance(self.pos_encoding, dict):
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
        if self.pos_encoding.name not in POSITIONAL_ENCODINGS:
            raise ConfigError(
                f"pos_encoding={self.pos_encoding.name!r} is not one of {', '.join(POSITIONAL_ENCODINGS)}."
            )
        if self.pos_encoding.name == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"RoPE needs an even head size, but n_embd / n_head = {self.head_dim}; change model.n_embd or "
                "model.n_head."
            )
        if self.init not in INITS:
            raise ConfigError(f"model.init={self.init!r} is not one of {', '.join(INITS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, C) to (B, T, C), with RoPE, an ALiBi bias or neither, and a
    KV cache when given one."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = config.n_head, config.head_dim, layer
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding | None, bias: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """`bias`: ALiBi's additive mask (H, T, cache length + T) with -inf on future keys, or None (causal)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        dropout_p = self.dropout if self.training else 0.0
        on_cpu_kernels = T <= CPU_KERNELS_MAX_LENGTH or B * self.n_head * T * T <= CPU_KERNELS_MAX_SCORES
        if cache is None and x.device.type == "cpu" and on_cpu_kernels:
            # the same computation as below, in hand-written passes (lm/kernels.py) or, where it wins, the flash kernel
            cos, sin = rope.tables(0, T) if rope is not None else (None, None)
            if dropout_p == 0 and bias is None and qkv.dtype == torch.float32:
                # fp32 without dropout, PyTorch's flash kernel is faster; with dropout the block kernel is (above);
                # bf16 keeps the block kernel (docs/speed.md)
                if rope is None:  # the kernel takes strided views: a head-major copy would cost a pass over q, k, v
                    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
                else:
                    q, k, v = (t.view(B, self.n_head, T, self.head_dim) for t in RotaryHeads.apply(qkv, cos, sin))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                q, k, v = RotaryHeads.apply(qkv, cos, sin)
                y = BlockCausalAttention.apply(q, k, v, dropout_p, ATTENTION_BLOCK, bias)
                y = y.view(B, self.n_head, T, self.head_dim)
            return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        start = cache.length if cache is not None else 0
        qk, v = qkv.split([2, 1], dim=2)  # split, not indexing: its backward is one concatenation
        if rope is not None:
            qk = rope(qk, start, seq_dim=1)  # queries and keys rotated in one go
        q, k = qk.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)  # (B, H, T, D) views
        if cache is None and bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif cache is None:  # the bias carries the causal mask: attn_mask and is_causal do not go together
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
        else:
            keys, values = cache.kv[self.layer]
            keys[:, :, start : start + T] = k
            values[:, :, start : start + T] = v
            k, v = keys[:, :, : start + T], values[:, :, : start + T]
            # query i sits at absolute position start + i and may see keys 0 .. start + i (is_causal would align
            # the mask top-left, which is wrong once the cache holds earlier positions)
            if bias is not None:
                mask = bias.to(q.dtype)
            else:
                mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """The feed-forward part of a block: C to 4C, GELU, back to C (with dropout)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: attention, then MLP."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding | None, bias: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, bias, cache)
        return x + self.mlp(self.ln_2(x))


def decoding_positions(max_length: int) -> int:
    """How many positions decoding steps with a cache of `max_length` slots can be at: a sliding cache's positions
    are kept below twice its slots (`rewind_cache`), and RoPE's decoding table covers them."""
    return 2 * max_length


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated up to `max_length`.

    Layer i's keys are `kv[i][0]` and its values `kv[i][1]`, each (B, H, max_length, D): one tensor per layer, so a
    decoding step writes a position's key and value with one copy. `matrices`, when given, maps a model's
    `nn.Linear` modules to the matrices that one-position steps multiply with instead of their own weights (see
    `decoding_matrices`).

    Decoding steps may go past `max_length` where the model's scores depend only on distances
    (`sliding_cache`): position p then lives in slot p % max_length, overwriting the oldest, and
    `rewind_cache` keeps the positions below 2 x max_length.
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
        shape = (2, batch_size, config.n_head, max_length, config.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # 0-d position tensors for decoding steps (also the slot indices of their visibility mask)
        self.positions = torch.arange(decoding_positions(max_length), device=device)
        self.length = 0  # positions decoded so far (the next position)
        self.max_length = max_length
        self.matrices = matrices or {}
        if torch.device(device).type == "cuda":  # a compiled step mutates them in place inside a CUDA graph
            for tensor in (*self.kv, self.positions):
                torch._dynamo.mark_static_address(tensor)


class Transformer(nn.Module):
    """Character-level decoder-only Transformer with a pluggable positional encoding."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        pe = config.pos_encoding
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position = self.rope = self.alibi = None  # at most one of them; none of them for NoPE
        if pe.name == "learned":
            self.position = LearnedPositionalEmbedding(config.seq_length, config.n_embd)
        elif pe.name == "sinusoidal":
            self.position = SinusoidalPositionalEncoding(config.n_embd, config.seq_length)
        elif pe.name == "rope":
            self.rope = RotaryEmbedding(config.head_dim, pe.base, config.seq_length)
        elif pe.name == "alibi":
            self.alibi = ALiBi(config.n_head)
        self.embedding_scale = math.sqrt(config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied input and output embeddings
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises weights per `config.init`. Biases start at 0 and norm gains at 1 in all three.

        - gpt2: every weight matrix N(0, 0.02); the residual projections N(0, 0.02 / sqrt(2 n_layer)), so the
          residual stream's variance does not grow with depth (GPT-2, nanoGPT).
        - pytorch: each module's own default: linear layers U(+-1/sqrt(fan_in)), embeddings N(0, 1).
        - xavier: every weight matrix U(+-sqrt(6 / (fan_in + fan_out))) (Glorot and Bengio), depth-independent.
        """
        if self.config.init == "pytorch":
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if isinstance(self.position, LearnedPositionalEmbedding):
                nn.init.normal_(self.position.weight)
            return
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "ln" in name:
                nn.init.ones_(param)
            elif self.config.init == "xavier":
                nn.init.xavier_uniform_(param)
            elif name.endswith("proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(param, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of shape (B, T, vocab_size) for token ids `idx` of shape (B, T).

        With a `cache`, `idx` continues the sequence already in it and the cache advances by T positions.
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_length:
            raise ContextTooLongError(f"the KV cache holds {cache.max_length} positions; {start + T} were asked for")
        x = self.token_embedding(idx)
        if isinstance(self.position, SinusoidalPositionalEncoding):
            # as in "Attention Is All You Need": scale embeddings by sqrt(d) so the fixed, unit-amplitude encoding
            # does not drown them (with N(0, 0.02) embeddings it would be ~35x larger)
            x = x * self.embedding_scale + self.position(start, T)
        elif self.position is not None:
            x = x + self.position(start, T)
        x = self.dropout(x)
        bias = None
        if self.alibi is not None:  # built once, shared by every layer
            positions = torch.arange(start + T, device=idx.device)
            bias = self.alibi.bias(positions[start:], positions, torch.float32)
        for block in self.blocks:
            x = block(x, self.rope, bias, cache)
        if cache is not None:
            cache.length += T
        return self.head(self.ln_f(x))
