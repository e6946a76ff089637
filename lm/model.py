"""A decoder-only Transformer in plain torch.nn: the whole model in one file.

token embedding (+ absolute positions) -> n_layer x [x + attn(ln(x)); x + mlp(ln(x))] -> ln -> tied head

Positional encodings (lm/positional.py): `learned` and `sinusoidal` add a vector to each token embedding; `rope`
rotates the queries and keys inside every attention layer, `alibi` biases the attention scores by distance, and
`none` leaves order to the causal mask. A `KVCache` makes generation incremental.
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


# On CPU, `lm.kernels` (RotaryHeads + BlockCausalAttention) beat PyTorch's fused attention kernel (one base layer at
# T = 256 with dropout, forward + backward: ~250 vs 614 ms), but keep T x T probabilities for backward; past this
# length the fused kernel, whose memory grows linearly with T, takes over. In fp32 without dropout, RotaryHeads
# feeds the fused kernel.
CPU_KERNELS_MAX_LENGTH = 256


class Dropout(nn.Module):
    """`nn.Dropout`, drawing its mask with `byte_dropout` on CPU, where `F.dropout` is slow (6 ms vs 51 ms for a
    64 x 256 x 384 activation); elsewhere the fused `F.dropout`."""

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


def decoding_positions(max_length: int) -> int:
    """How many positions decoding steps with a cache of `max_length` slots can be at: a sliding cache's positions
    are kept below twice its slots (`Transformer.rewind_cache`), and RoPE's decoding table covers them."""
    return 2 * max_length


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated up to `max_length`.

    Layer i's keys are `kv[i][0]` and its values `kv[i][1]`, each (B, H, max_length, D): one tensor per layer, so a
    decoding step writes a position's key and value with one copy. `matrices`, when given, maps a model's
    `nn.Linear` modules to the matrices that one-position steps multiply with instead of their own weights (see
    `decoding_matrices`).

    Decoding steps may go past `max_length` where the model's scores depend only on distances
    (`Transformer.sliding_cache`): position p then lives in slot p % max_length, overwriting the oldest, and
    `Transformer.rewind_cache` keeps the positions below 2 x max_length.
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


class CausalSelfAttention(nn.Module):
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
        if cache is None and x.device.type == "cpu" and T <= CPU_KERNELS_MAX_LENGTH:
            # the same computation as below, in hand-written passes (lm/kernels.py) or, where it wins, the flash kernel
            cos, sin = rope.tables(0, T) if rope is not None else (None, None)
            if dropout_p == 0 and bias is None and qkv.dtype == torch.float32:
                # fp32 without dropout, PyTorch's flash kernel is faster (mini at batch 8, 2-core EPYC: 74 vs 80 ms a
                # training step); with dropout the block kernel is (above); bf16 was not compared and keeps it
                if rope is None:  # the kernel takes strided views: a head-major copy would cost ~1 ms a mini layer
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

    def decode_step(
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        slot: torch.Tensor,
        visible: torch.Tensor,
        rotation: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """`residual + self(h)` for one new position per row (h, residual: (B, C)) whose key and value go to the
        cache's `slot` (a 0-d tensor), attending to the cache's first L slots with the additive mask `visible`,
        (1, 1, L) or per head (B * H, 1, L) with ALiBi's bias: 0 (or the bias) or -inf; `rotation` is RoPE's
        (3, D, D) for this position."""
        B, C = h.shape
        qkv = decode_linear(h, self.qkv, cache.matrices.get(self.qkv)).view(B, 3, self.n_head, self.head_dim)
        if rotation is not None:  # q and k rotated, v as it was: one product (rows of all samples, not a broadcast
            # of `rotation` over the batch, which would copy it B times)
            rows = qkv.transpose(0, 1).reshape(3, B * self.n_head, self.head_dim)
            qkv = torch.bmm(rows, rotation).view(3, B, self.n_head, self.head_dim).transpose(0, 1)
        kv = cache.kv[self.layer]
        kv.index_copy_(3, slot.view(1), qkv[:, 1:].transpose(0, 1).unsqueeze(3))  # this key and value
        # one query per head: three small products beat the fused kernel's fixed cost here (~30 vs ~100 us)
        span = visible.shape[-1]  # the slots attended to: the filled ones, or the whole cache when compiled
        keys, values = (t.view(B * self.n_head, -1, self.head_dim)[:, :span] for t in kv)
        q = qkv[:, 0].reshape(B * self.n_head, 1, self.head_dim)
        scores = torch.baddbmm(visible, q, keys.transpose(1, 2), alpha=self.head_dim**-0.5)
        y = torch.bmm(scores.softmax(dim=-1), values)
        return decode_linear(y.view(B, C), self.proj, cache.matrices.get(self.proj), residual)


# A decoding step's products have one row per sample. On a CPU, MKL runs such a product on one core; split into
# row blocks of the weight as a batched product, it spreads over all of them (base, 2 cores: 4.5 vs 6.5 ms for the
# weights of a whole step with one row, 6.7 vs 11 ms with eight).
DECODE_ROW_BLOCKS = 8
DECODE_MAX_ROWS = 16  # beyond this, a plain product is efficient


def decode_linear(
    x: torch.Tensor,
    linear: nn.Linear,
    matrix: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    keep_copy_dtype: bool = False,
) -> torch.Tensor:
    """`residual + linear(x)` (or `linear(x)`) for x of shape (B, in), as fast as a decoding step allows;
    `matrix` replaces `linear.weight` when given (a float16 copy, or float16 weights packed for FBGEMM: see
    `decoding_matrices`). The result is in the weight's dtype, or with `keep_copy_dtype` (and no residual) in the
    copy's, for a next product with a copy."""
    if isinstance(matrix, torch.ScriptObject):  # packed float16 weights: FBGEMM's kernel, fp32 in and out
        out = torch.ops.quantized.linear_dynamic_fp16(x, matrix)
        if residual is not None:
            out += residual
        return out if linear.bias is None else out + linear.bias
    weight = linear.weight if matrix is None else matrix
    B = x.shape[0]
    out_features, in_features = weight.shape
    if weight.dtype != linear.weight.dtype:  # a reduced-precision copy: PyTorch's one-row kernel, fp32 accumulation
        out = F.linear(x.to(weight.dtype), weight)
        if residual is not None:
            out = torch.add(residual, out)
        elif not keep_copy_dtype:
            out = out.to(linear.weight.dtype)
    elif B <= DECODE_MAX_ROWS and x.device.type == "cpu" and out_features % DECODE_ROW_BLOCKS == 0:
        k, block = DECODE_ROW_BLOCKS, out_features // DECODE_ROW_BLOCKS
        blocks = weight.view(k, block, in_features).transpose(1, 2)  # (k, in, out / k), a view
        rows = x.view(1, B, in_features).expand(k, B, in_features)
        if residual is None:
            out = torch.bmm(rows, blocks)
        else:
            out = torch.baddbmm(residual.view(B, k, block).transpose(0, 1), rows, blocks)
        out = out.view(1, out_features) if B == 1 else out.transpose(0, 1).reshape(B, out_features)
    elif residual is None:
        out = F.linear(x, weight)
    else:
        out = torch.addmm(residual, x, weight.t())
    return out if linear.bias is None else out + linear.bias


def decoding_matrices(
    model: nn.Module, batch_size: int, compile: bool = False
) -> dict[nn.Module, torch.Tensor | torch.ScriptObject]:
    """float16 versions of the model's `nn.Linear` weights, for `KVCache(matrices=...)`, where they make
    one-position steps faster: on a CPU, for a float32 model. A step there is bound by reading the weights, and
    float16 halves the bytes read:

    - one row: float16 copies, for PyTorch's float16 one-row kernel (base: 2.2 vs 4.5 ms for a whole step's
      weights on a 2-core EPYC);
    - 2 to DECODE_MAX_ROWS rows, not compiled: the same float16 weights packed for FBGEMM's float16-weight,
      float32-activation product, which widens them in registers (base, eight rows: 2.7 vs 6.1 ms for the float32
      row-block products, where PyTorch's own float16 kernel takes ~10 ms). torch.compile does not trace packed
      weights, so a compiled step with several rows keeps the float32 ones.

    Elsewhere (or with weights beyond float16's range, or no FBGEMM) it returns {} and steps use the weights as they
    are. Either way each weight is rounded to 11 significant bits and the products accumulate in float32: logits
    move by about 1e-3 of their size."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or any(m.weight.device.type != "cpu" for m in linears):
        return {}
    packed = batch_size > 1
    if packed and (
        batch_size > DECODE_MAX_ROWS or compile or "fbgemm" not in torch.backends.quantized.supported_engines
    ):
        return {}
    weights = [m.weight.detach() for m in linears]
    if any(w.dtype != torch.float32 or w.abs().max() >= torch.finfo(torch.float16).max for w in weights):
        return {}
    if not packed:
        return {m: w.to(torch.float16) for m, w in zip(linears, weights, strict=True)}
    try:
        return {m: torch.ops.quantized.linear_prepack_fp16(w, None) for m, w in zip(linears, weights, strict=True)}
    except RuntimeError:  # FBGEMM refuses a CPU without AVX2
        return {}


class MLP(nn.Module):
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

    def decode_step(self, x: torch.Tensor, slot, visible, rotation, cache: KVCache) -> torch.Tensor:
        """`forward` with a cache for one new position per row, `x` of shape (B, C), in inference (no dropout)."""
        x = self.attn.decode_step(self.ln_1(x), x, slot, visible, rotation, cache)
        fc, proj = self.mlp.fc, self.mlp.proj
        # with float16 copies, GELU in float16: the next product rounds its input to float16 anyway, and PyTorch's
        # float16 GELU on a CPU is ~3x faster than its float32 one for one row (4 vs 15 us at 1,536 values)
        h = F.gelu(decode_linear(self.ln_2(x), fc, cache.matrices.get(fc), keep_copy_dtype=True))
        return decode_linear(h, proj, cache.matrices.get(proj), x)


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

    @property
    def sliding_cache(self) -> bool:
        """Whether decoding can go on past the context in the same KV cache, a ring buffer of the most recent
        `seq_length` positions. With RoPE or ALiBi a score depends only on the distance between query and key, so
        a key keeps its meaning when older ones are dropped; absolute positions stop at `seq_length`, and without
        any encoding the model may count from the start of its context, so those rebuild the cache instead."""
        return self.rope is not None or self.alibi is not None

    def rewind_cache(self, cache: KVCache) -> None:
        """Moves every position in a full sliding cache back by `cache.max_length` (RoPE's keys rotated back by that
        many positions; ALiBi's bias follows distances and needs nothing), so positions stay below 2 x max_length
        however long the text. Called when `cache.length` reaches 2 x max_length: by then every key was written
        since the last call, so none is rotated twice."""
        if self.rope is not None:
            rotations = self.rope.decoding_rotations(decoding_positions(cache.max_length), cache.kv[0].dtype)
            back = rotations[cache.max_length, 1].T  # a rotation's inverse is its transpose
            for kv in cache.kv:
                kv[0].copy_(kv[0] @ back)
        cache.length -= cache.max_length

    def decode_step(self, ids: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab_size) for one new id per row, `ids` of shape (B,), at `position` (a 0-d long tensor, the
        cache's length): `forward(ids[:, None], cache)[:, -1]` in a third of the operations. The caller advances
        `cache.length`. Inference only. Past `cache.max_length` (with a `sliding_cache` only), the key and value
        overwrite the oldest position's slot.

        Eager, attention reads only the filled part of the cache; compiled (`torch.compile`), the whole cache under a
        mask, so that no shape depends on the position and the step compiles once (`generate(compile=True)`)."""
        x = self.token_embedding(ids)
        at = position.view(1)  # rows are looked up with index_select: indexing by a tensor is data-dependent to compile
        if isinstance(self.position, SinusoidalPositionalEncoding):
            x = x * self.embedding_scale + self.position.table.index_select(0, at)
        elif self.position is not None:
            x = x + self.position.weight.index_select(0, at)
        rotation = None
        if self.rope is not None:
            table = self.rope.decoding_rotations(decoding_positions(cache.max_length), x.dtype)
            rotation = table.index_select(0, at).squeeze(0)
        slot = position % cache.max_length  # past max_length, a sliding cache's oldest slot
        # the slots attended to; eager, the filled ones (the position's, and those before it or, once the cache has
        # slid, all): at batch 8, a quarter of a step's time goes to reading keys and values
        span = cache.max_length if torch.compiler.is_compiling() else min(cache.length + 1, cache.max_length)
        slots = cache.positions[:span]
        # 0 where a key is visible, -inf on a slot not yet filled: built once per step, added to every layer's scores
        if self.alibi is not None:  # with ALiBi's bias, per head: (B * H, 1, span), the attention products' layout
            # each filled slot's position: the most recent one at or before `position` that maps to it
            keys_at = torch.where(slots > position, slots, position - (position - slots) % cache.max_length)
            bias = self.alibi.bias(position.view(1), keys_at, x.dtype)  # (H, 1, span), -inf on the unfilled slots
            visible = bias.expand(x.shape[0], *bias.shape).reshape(-1, 1, bias.shape[-1])
        else:
            visible = torch.zeros_like(slots, dtype=x.dtype).masked_fill_(slots > position, -math.inf)
            visible = visible.view(1, 1, -1)
        for block in self.blocks:
            x = block.decode_step(x, slot, visible, rotation, cache)
        return decode_linear(self.ln_f(x), self.head, cache.matrices.get(self.head))
