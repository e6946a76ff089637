"""Hand-written forward and backward passes for RMSNorm, squared ReLU and SwiGLU.

On a CPU a pass over a large tensor costs about the same whatever its arithmetic, and PyTorch runs these three as
composites of several passes each way (its `F.rms_norm` is 2-5x slower there than its fused `F.layer_norm`). Each
function here does the same computation in the fewest passes we could write, and is tested against the plain
expression it replaces (`rms_norm_reference`, `relu2_reference`, `swiglu_reference`), which is also what runs on a
GPU, where torch.compile fuses it (docs/speed.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = RMS_EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang and Sennrich 2019), in x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), None if weight is None else weight.to(x.dtype), eps)


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0)^2 (So et al. 2021, "Primer")."""
    return F.relu(x).square()


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for x = [a, b] split in halves along the last dimension (Shazeer 2020)."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, kept as a trailing dimension of size 1 (one pass)."""
    wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None  # sums in fp32 at least
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=wide)  # PyTorch's one-pass reduction
    return norms.square_().div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)


def rms_norm_into(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor) -> torch.Tensor:
    """Writes RMSNorm(x) * weight into `out` (any strides, x's shape) in two passes; returns the scale."""
    rstd = rms_scale(x, eps)
    torch.mul(x, rstd.to(x.dtype), out=out)
    if weight is not None:
        out.mul_(weight.to(x.dtype))
    return rstd


def rms_norm_backward_into(
    x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor, out: torch.Tensor
) -> torch.Tensor | None:
    """Writes d(loss)/dx of RMSNorm into `out`, given d(loss)/d(output) `grad`; returns d(loss)/d(weight) (or None).

    With n = x * rstd (unit root mean square) and g = grad * weight: dx = rstd * (g - n * mean(g * n))."""
    normalized = x * rstd.to(x.dtype)
    d_weight = None
    if weight is not None:
        d_weight = torch.linalg.vecdot(grad.reshape(-1, x.shape[-1]), normalized.reshape(-1, x.shape[-1]), dim=0)
        grad = grad * weight.to(grad.dtype)
    mean = torch.linalg.vecdot(grad, normalized).unsqueeze(-1).div_(x.shape[-1])
    torch.addcmul(grad, normalized, mean, value=-1, out=out)
    out.mul_(rstd.to(out.dtype))
    return d_weight


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm_reference(x, weight)` in 3 passes forward and about 6 backward (PyTorch's composite: about 5 and 9)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = rms_norm_into(x, weight, eps, out)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        d_weight = rms_norm_backward_into(x, rstd, weight, grad.to(x.dtype), dx)
        return dx, None if d_weight is None else d_weight.to(weight.dtype), None


class ReLU2Function(torch.autograd.Function):
    """`relu2_reference(x)`: two passes forward (max(x, 0), its square) and one backward (2 max(x, 0) dy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        positive = F.relu(x)
        ctx.save_for_backward(positive)
        return torch.mul(positive, positive)

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        # addcmul into a 0-d zero: one pass for 2 * positive * grad
        return torch.addcmul(positive.new_zeros(()), positive, grad, value=2)


class SwiGLUFunction(torch.autograd.Function):
    """`swiglu_reference(x)` for x = [a, b]: the gradient is written into one (.., 2h) tensor, where autograd's would
    compute da and db apart and concatenate them (one pass more), besides its separate products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        a, b = x.chunk(2, dim=-1)
        gate = F.silu(a)
        ctx.save_for_backward(x, gate)
        return torch.mul(gate, b)

    @staticmethod
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        da, db = dx.chunk(2, dim=-1)
        torch.mul(gate, grad, out=db)
        torch.ops.aten.silu_backward.grad_input(torch.mul(b, grad), a, grad_input=da)
        return dx


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = RMS_EPS) -> torch.Tensor:
    """RMSNorm over the last dimension: the hand-written passes on a CPU, PyTorch's elsewhere."""
    if x.device.type == "cpu":
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU: the hand-written passes on a CPU, PyTorch's elsewhere."""
    if x.device.type == "cpu":
        return ReLU2Function.apply(x)
    return relu2_reference(x)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of x = [a, b]: the hand-written passes on a CPU, PyTorch's elsewhere."""
    if x.device.type == "cpu":
        return SwiGLUFunction.apply(x)
    return swiglu_reference(x)
