"""Hand-written forward and backward passes for the CPU hot spots of the model in `lm.model`.

On a CPU, every pass over a large tensor costs about the same whatever the arithmetic, so these functions do in
a few passes what autograd would do in many: split the fused q/k/v projection into heads with RoPE applied
(`RotaryHeads`), causal attention that skips the masked-out blocks (`BlockCausalAttention`), and dropout masks
drawn a byte per element (`dropout_keep_mask`). Each is tested against the plain PyTorch expression it replaces.
"""

from __future__ import annotations

import math

import torch

from lm.fused import RMS_EPS, rms_norm_backward_into, rms_norm_into

ATTENTION_BLOCK = 64  # query rows per block of BlockCausalAttention


def dropout_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0/1 mask of `dtype` that keeps each element with probability 1 - round(256 p) / 256.

    On CPU, PyTorch draws one 32-bit random number per element for `F.dropout` (and for a uint8 `random_`); here
    every random 64-bit word gives 8 elements a byte each, eight times fewer random bits to draw. Comparing
    straight into `dtype` saves the cast a boolean mask would need when it multiplies (docs/speed.md).
    """
    n = math.prod(shape)
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    keep = torch.empty(shape, dtype=dtype, device=device)
    return torch.ge(words.view(torch.uint8)[:n].view(shape), round(p * 256), out=keep)


def dropout_scale(p: float) -> float:
    """1 / (1 - p) for p rounded as in `dropout_keep_mask`: inverted dropout keeps the expectation."""
    return 256 / (256 - round(p * 256))


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a `dropout_keep_mask` (p rounded to a multiple of 1/256)."""
    # the scale goes into the mask, so backward is one product too
    return x * dropout_keep_mask(x.shape, p, x.dtype, x.device).mul_(dropout_scale(p))


class RotaryHeads(torch.autograd.Function):
    """Fused projections (B, T, 3, H, D) -> q, k, v, each a contiguous (B * H, T, D), RoPE applied to q and k.

    The same as `rope(qkv[:, :, :2], seq_dim=1)`, unbind and reshape, but the rotation writes straight into the
    head-major layout the attention's matrix products want: two passes over q and k instead of about nine (rotate
    half's negation and concatenation, the products, the sum, the layout copy; the same again backward).
    cos, sin: (T, D) tables as `RotaryEmbedding` builds them (both halves equal), or (2, T, D) with the query's and
    the key's apart (xPos), or None for no rotation.
    q_weight, k_weight: with QK-norm, the gains of RMSNorm over each head's query and key, applied before the
    rotation (lm/fused.py's passes), else None.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, q_weight=None, k_weight=None):
        B, T, _, H, D = qkv.shape
        outputs = [torch.empty(B, H, T, D, dtype=qkv.dtype, device=qkv.device) for _ in range(3)]
        weights = (q_weight, k_weight)
        scales = []
        for i, out in enumerate(outputs):
            source, target = qkv[:, :, i], out.transpose(1, 2)  # both (B, T, H, D)
            if i < 2 and weights[i] is not None:  # QK-norm, written where the rotation reads it
                normalized = target if cos is None else torch.empty_like(source, memory_format=torch.contiguous_format)
                scales.append(rms_norm_into(source, weights[i], RMS_EPS, normalized))
                source = normalized
            if cos is None or i == 2:
                if source.data_ptr() != target.data_ptr():
                    target.copy_(source)
            else:  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with the halves' shared angles
                rotate(source, target, *for_query_or_key(cos, sin, i))
        ctx.normalized = q_weight is not None
        ctx.save_for_backward(cos, sin, *((qkv, q_weight, k_weight, *scales) if ctx.normalized else ()))
        ctx.shape = qkv.shape
        return tuple(out.view(B * H, T, D) for out in outputs)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin, *normalization = ctx.saved_tensors
        B, T, _, H, D = ctx.shape
        dqkv = torch.empty(ctx.shape, dtype=grads[0].dtype, device=grads[0].device)
        d_weights = [None, None]
        for i, grad in enumerate(grads):
            source, target = grad.view(B, H, T, D).transpose(1, 2), dqkv[:, :, i]
            normalized = i < 2 and ctx.normalized
            if normalized and cos is not None:  # un-rotate first, then back through the norm
                unrotated = torch.empty_like(source, memory_format=torch.contiguous_format)
                c, s = for_query_or_key(cos, sin, i)
                rotate(source, unrotated, c, -s)
                source = unrotated
            if normalized:
                qkv, q_weight, k_weight, q_scale, k_scale = normalization
                weight, scale = (q_weight, q_scale) if i == 0 else (k_weight, k_scale)
                d_weight = rms_norm_backward_into(qkv[:, :, i], scale, weight, source.to(qkv.dtype), target)
                d_weights[i] = d_weight.to(weight.dtype)
            elif cos is None or i == 2:
                target.copy_(source)
            else:  # the transpose of a rotation is the rotation by the opposite angle
                c, s = for_query_or_key(cos, sin, i)
                rotate(source, target, c, -s)
        return dqkv, None, None, *d_weights


def for_query_or_key(cos: torch.Tensor, sin: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, D) tables for the query (i = 0) or the key (1): shared, or xPos's (2, T, D) apart."""
    return (cos, sin) if cos.dim() == 2 else (cos[i], sin[i])


def rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out = RoPE(x) for x, out of shape (B, T, H, D) with any strides; cos, sin: (T, D)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU loops over strided bf16 half-rows are far slower than widening to fp32, rotating there and
        # rounding once, which is also more exact (docs/speed.md)
        wide = torch.empty_like(out, dtype=torch.float32)
        rotate(x.float(), wide, cos, sin)
        out.copy_(wide)
        return
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half].to(x.dtype), sin[:, None, :half].to(x.dtype)  # (T, 1, D/2), broadcast over heads
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)


class BlockCausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal mask), dropout, times v; forward and backward written out for the CPU.

    q, k, v: (N, T, D), N = batch x heads. `bias`: None (causal), or an additive mask (H, T, T) (or (1, T, T) for
    every head) with -inf on future keys, such as ALiBi's; a learned one (T5's, FIRE's) gets its gradient. Query rows
    go in blocks of `block`, and each block meets only the keys up to its last row, so the masked-out upper triangle
    is mostly never computed: (1 + block / T) / 2 of the T x T scores are (5/8 at T = 256). Everything runs in q's
    dtype, as fused kernels do: under autocast the softmax would otherwise run in fp32, casting the largest tensors
    of the model to fp32 and back. Backward uses the flash-attention identity rowsum(dP * P) = rowsum(dy * y), a sum
    over D instead of T. Saves the probabilities and the kept probabilities of each block (no dropout: the
    probabilities once).
    """

    @staticmethod
    def forward(ctx, q, k, v, dropout_p: float, block: int, bias: torch.Tensor | None = None):
        N, T, D = q.shape
        scale = dropout_scale(dropout_p) if dropout_p > 0 else 1.0  # inverted dropout's 1 / (1 - p)
        outputs, saved = [], []
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, T, block):
                end = min(start + block, T)
                if bias is None:
                    future = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(start + 1)
                    mask = torch.zeros(end - start, end, dtype=q.dtype, device=q.device).masked_fill_(future, -math.inf)
                else:  # per head, repeated over the batch: (N, rows, end)
                    H = bias.shape[0]
                    mask = bias[:, start:end, :end].to(q.dtype).expand(N // H, H, end - start, end).reshape(N, -1, end)
                probs = torch.baddbmm(mask, q[:, start:end], k[:, :end].transpose(1, 2), alpha=D**-0.5).softmax(-1)
                kept = probs
                if dropout_p > 0:
                    kept = probs * dropout_keep_mask(probs.shape, dropout_p, probs.dtype, probs.device)
                    saved.append(probs)
                saved.append(kept)
                outputs.append(torch.baddbmm(probs.new_empty(()), kept, v[:, :end], beta=0, alpha=scale))
            y = torch.cat(outputs, dim=1)
        ctx.dropout_scale, ctx.block, ctx.per_block = scale, block, 2 if dropout_p > 0 else 1
        ctx.bias = (bias.shape, bias.dtype) if bias is not None else None
        ctx.save_for_backward(q, k, v, y, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, *saved = ctx.saved_tensors
        T, D = q.shape[-2:]
        scale = ctx.dropout_scale
        with torch.autocast(q.device.type, enabled=False):
            dy = dy.to(q.dtype)
            # rowsum(dP * P) = rowsum(dy * y): with dP = scale * d_kept * mask, the scale is folded in below
            rowsum = torch.linalg.vecdot(dy, y).unsqueeze(-1) / scale
            dq, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
            d_bias = None
            if (
                ctx.bias is not None and ctx.needs_input_grad[5]
            ):  # a learned bias: the scores' gradient, summed over the batch
                d_bias = torch.zeros(ctx.bias[0], dtype=q.dtype, device=q.device)
            per_block = ctx.per_block
            for i, start in enumerate(range(0, T, ctx.block)):
                end = min(start + ctx.block, T)
                probs, kept = saved[per_block * i], saved[per_block * i + per_block - 1]
                dy_block = dy[:, start:end]
                dv[:, :end].baddbmm_(kept.transpose(1, 2), dy_block, alpha=scale)
                # d(scores) / scale = P * (dP - rowsum(dP * P)) / scale, with P * mask = kept
                d_scores = torch.bmm(dy_block, v[:, :end].transpose(1, 2)).mul_(kept)
                d_scores.addcmul_(probs, rowsum[:, start:end], value=-1)
                if d_bias is not None:
                    H = d_bias.shape[0]
                    d_bias[:, start:end, :end] += d_scores.view(-1, H, end - start, end).sum(0).mul_(scale)
                dq.append(torch.baddbmm(d_scores.new_empty(()), d_scores, k[:, :end], beta=0, alpha=scale * D**-0.5))
                dk[:, :end].baddbmm_(d_scores.transpose(1, 2), q[:, start:end], alpha=scale * D**-0.5)
            dq = torch.cat(dq, dim=1)
        return dq, dk, dv, None, None, d_bias.to(ctx.bias[1]) if d_bias is not None else None
