"""Decoding: generation's one-position step with a KV cache, apart from the model that training sees.

A `KVCache` (lm/model.py) holds every layer's keys and values. `decode_step(model, ids, position, cache)` gives
the logits of one new position per row in a third of the operations of `Transformer.forward`;
`decoding_matrices` makes the float16 weights that a step reads on a CPU; `sliding_cache` and `rewind_cache` let
the cache slide past the context. `Transformer.forward(idx, cache)` fills a cache from a prompt
(docs/generation.md, docs/speed.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.model import UNFILLED, Block, CausalSelfAttention, KVCache, Transformer, ValueMix, decoding_positions
from lm.positional import SinusoidalPositionalEncoding


def attention_step(
    attn: CausalSelfAttention,
    h: torch.Tensor,
    residual: torch.Tensor,
    slot: torch.Tensor,
    visible: torch.Tensor,
    rotation: torch.Tensor | None,
    cache: KVCache,
    values: ValueMix | None = None,
) -> torch.Tensor:
    """`residual + attn(h)` for one new position per row (h, residual: (B, C)) whose key and value go to the
    cache's `slot` (a 0-d tensor), attending to the cache's first L slots with the additive mask `visible`,
    (1, 1, L) or per head (B * H_kv, group, L) with a relative bias: 0 (or the bias) or -inf; `rotation` is the
    rotation's (3, D, D) for this position (RoPE, xPos); `values`: what the values mix in (`Transformer.value_mix`).
    With grouped-query attention, each key/value head's group of queries meets its keys in one product."""
    B, C = h.shape
    H, H_kv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = attn.mix_values(decode_linear(h, attn.qkv, cache.matrices.get(attn.qkv)), values)
    if H_kv == H:
        qkv = qkv.view(B, 3, H, D)
        if attn.q_norm is not None:  # QK-norm, before the rotation
            q, k, v = qkv.unbind(1)
            qkv = torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=1)
        if rotation is not None:  # q and k rotated, v as it was: one product (rows of all samples, not a broadcast
            # of `rotation` over the batch, which would copy it B times)
            rows = qkv.transpose(0, 1).reshape(3, B * H, D)
            qkv = torch.bmm(rows, rotation).view(3, B, H, D).transpose(0, 1)
        q, kv_new = qkv[:, 0], qkv[:, 1:]
    else:
        heads = qkv.view(B, H + 2 * H_kv, D)
        q, k, v = heads.split([H, H_kv, H_kv], dim=1)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rotation is not None and rotation.dim() == 2:  # one rotation for queries and keys: one product over
            # all heads, the values' rows included (cheaper than copying the others out first), values kept as were
            rotated = (torch.cat([q, k], dim=1) if attn.q_norm is not None else heads) @ rotation
            q, k = rotated[:, :H], rotated[:, H : H + H_kv]
        elif rotation is not None:  # xPos: the query's and the key's apart
            q, k = q @ rotation[0], k @ rotation[1]
        kv_new = torch.stack([k, v], dim=1)
    kv = cache.kv[attn.layer]
    kv.index_copy_(3, slot.view(1), kv_new.transpose(0, 1).unsqueeze(3))  # this key and value
    # one query per head: three small products beat the fused kernel's fixed cost here (~30 vs ~100 us)
    span = visible.shape[-1]  # the slots attended to: the filled ones, or the whole cache when compiled
    keys, values = (t.view(B * H_kv, -1, D)[:, :span] for t in kv)
    q = q.reshape(B * H_kv, H // H_kv, D)
    scores = torch.baddbmm(visible, q, keys.transpose(1, 2), alpha=D**-0.5)
    y = torch.bmm(scores.softmax(dim=-1), values)
    return decode_linear(y.view(B, C), attn.proj, cache.matrices.get(attn.proj), residual)


def block_step(block: Block, x: torch.Tensor, slot, visible, rotation, cache: KVCache, values=None) -> torch.Tensor:
    """`block(x)` with a cache for one new position per row, `x` of shape (B, C), in inference (no dropout)."""
    if block.post_norm:  # ln(x + f(x)): the norms after the residual additions
        x = block.ln_1(attention_step(block.attn, x, x, slot, visible, rotation, cache, values))
        return block.ln_2(mlp_step(block, x, x, cache))
    x = attention_step(block.attn, block.ln_1(x), x, slot, visible, rotation, cache, values)
    return mlp_step(block, block.ln_2(x), x, cache)


def mlp_step(block: Block, h: torch.Tensor, residual: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """`residual + block.mlp(h)` for one position per row."""
    fc, proj, mlp = block.mlp.fc, block.mlp.proj, block.mlp
    # with float16 copies, GELU in float16: the next product rounds its input to float16 anyway, and PyTorch's
    # float16 GELU on a CPU is faster than its float32 one for one row; the squares and products of relu2 and
    # swiglu in float32, where float16's range cannot overflow
    h = decode_linear(h, fc, cache.matrices.get(fc), keep_copy_dtype=True)
    if mlp.kind in ("relu2", "swiglu") and h.dtype == torch.float16:
        h = mlp.activation(h.float()).to(torch.float16)
    else:
        h = mlp.activation(h)
    return decode_linear(h, proj, cache.matrices.get(proj), residual)


# A decoding step's products have one row per sample. On a CPU, MKL runs such a product on one core; split into
# row blocks of the weight as a batched product, it spreads over all of them (docs/speed.md, "Generation").
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

    - one row: float16 copies, for PyTorch's float16 one-row kernel;
    - 2 to DECODE_MAX_ROWS rows, not compiled: the same float16 weights packed for FBGEMM's float16-weight,
      float32-activation product, which widens them in registers (PyTorch's own float16 kernel is slower than the
      float32 row-block products there). torch.compile does not trace packed weights, so a compiled step with
      several rows keeps the float32 ones. docs/speed.md has the figures.

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


def sliding_cache(model: Transformer) -> bool:
    """Whether decoding can go on past the context in the same KV cache, a ring buffer of the most recent
    positions (after the attention sinks). With RoPE (at a static scale), ALiBi or T5's bias a score depends only
    on the distance between query and key, so a key keeps its meaning when older ones are dropped; absolute
    positions stop at `seq_length`, xPos's scales and FIRE's normaliser grow with the absolute position, and
    without any encoding the model may count from the start of its context, so those rebuild the cache instead."""
    name = model.config.pos_encoding.name
    return name in ("rope", "alibi", "t5")


def cache_length(model: Transformer) -> int:
    """The slots generation's KV cache needs: the context, or with a sliding window (and a cache that slides) only
    the sinks and the window, however long the text."""
    config = model.config
    if config.windowed and sliding_cache(model):
        return min(config.seq_length, config.attention_sinks + config.attention_window)
    return config.seq_length


def rewind_cache(model: Transformer, cache: KVCache) -> None:
    """Moves every position in a full sliding cache back by the ring's length (RoPE's keys rotated back by that many
    positions; a bias follows distances and needs nothing), so positions stay below 2 x max_length however long
    the text, and each position keeps its slot."""
    ring = cache.max_length - cache.sinks
    if model.rope is not None:
        back = model.rope.shift_back(ring, cache.kv[0].dtype)
        for kv in cache.kv:
            kv[0].copy_(kv[0] @ back)
    cache.slot_positions.sub_(ring)
    cache.length -= ring


def decode_step(model: Transformer, ids: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, vocab_size) for one new id per row, `ids` of shape (B,), at `position` (a 0-d long tensor, the
    cache's length): `model(ids[:, None], cache)[:, -1]` in a third of the operations. The caller advances
    `cache.length`. Inference only. Past `cache.max_length` (with a `sliding_cache` only), the key and value
    overwrite the oldest position's slot.

    Eager, attention reads only the filled part of the cache; compiled (`torch.compile`), the whole cache under a
    mask, so that no shape depends on the position and the step compiles once (`generate(compile=True)`)."""
    x = model.token_embedding(ids)
    at = position.view(1)  # rows are looked up with index_select: indexing by a tensor is data-dependent to compile
    if isinstance(model.position, SinusoidalPositionalEncoding):
        x = x * model.embedding_scale + model.position.table.index_select(0, at)
    elif model.position is not None:
        x = x + model.position.weight.index_select(0, at)
    rotation = None
    if model.rope is not None:
        table = model.rope.decoding_rotations(decoding_positions(cache.max_length), x.dtype, cache.max_length)
        rotation = table.index_select(0, at).squeeze(0)
        if model.config.kv_heads != model.config.n_head and model.config.pos_encoding.name == "rope":
            rotation = rotation[1]  # queries and keys turn alike: grouped-query attention rotates them together
    slot = cache.slot(position)  # past max_length, a sliding cache's oldest slot after the sinks
    cache.slot_positions.index_copy_(0, slot.view(1), at)
    # the slots attended to; eager, the filled ones (the position's, and those before it or, once the cache has
    # slid, all): at batch 8, a quarter of a step's time goes to reading keys and values
    compiling = torch.compiler.is_compiling()
    span = cache.max_length if compiling else min(cache.length + 1, cache.max_length)
    keys_at = cache.slot_positions[:span]  # each slot's position
    config = model.config
    # eager, every slot in the span is filled (at or before this position); compiled, the span is the whole cache
    seen = keys_at > UNFILLED if compiling else None
    # a window's own cache (sinks + W slots) holds only what the window sees; a longer one needs the mask
    if config.windowed and (compiling or cache.max_length - cache.sinks > config.attention_window):
        in_window = (position - keys_at < config.attention_window) | (keys_at < cache.sinks)
        seen = in_window if seen is None else seen & in_window
    # 0 where a key is visible, -inf elsewhere (or the bias): built once per step, added to every layer's scores
    if model.relative_bias is not None:  # per head, in the attention products' layout: (B * H_kv, group, span)
        bias = model.relative_bias.bias(at, keys_at.clamp(min=UNFILLED // 2), x.dtype)  # (H, 1, span)
        if seen is not None:
            bias = bias.masked_fill(~seen, -math.inf)
        H_kv = config.kv_heads
        visible = bias.view(H_kv, -1, span).expand(x.shape[0], H_kv, -1, span).reshape(-1, config.n_head // H_kv, span)
    else:
        visible = torch.zeros(1, 1, span, dtype=x.dtype, device=x.device)
        if seen is not None:
            visible.masked_fill_(~seen, -math.inf)
    values = model.value_mix(ids)
    x = model.through_blocks(x, lambda block, h: block_step(block, h, slot, visible, rotation, cache, values))
    return model.cap_logits(decode_linear(model.ln_f(x), model.head, cache.matrices.get(model.head)))
