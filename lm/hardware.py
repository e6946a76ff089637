"""What the machine can do: bf16 support and the measured matrix-multiply peak."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from pathlib import Path

import torch

from lm.errors import ConfigError


def cpu_has_bf16_instructions() -> bool:
    """True when the CPU has native bf16 instructions (AVX-512 BF16 or AMX); without them PyTorch emulates bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


@functools.cache
def bf16_matmul_speedup(size: int = 512, reps: int = 4, rounds: int = 3) -> float:
    """How many times faster a bf16 matrix product of `size` runs than an fp32 one on this CPU (best of `rounds`
    alternating rounds of `reps` products each; measured once per process, in tens of milliseconds)."""
    generator = torch.Generator().manual_seed(0)  # not the global stream: a seeded run must draw the same weights
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(rounds):
        for dtype in best:
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # warm-up: the first product of a shape packs weights and picks a kernel
            start = time.perf_counter()
            for _ in range(reps):
                x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


BF16_MIN_SPEEDUP = 1.25  # a clear margin: bf16 autocast adds casts around every product


def cpu_supports_bf16() -> bool:
    """True when bf16 pays on this CPU: it has native bf16 instructions and its bf16 matrix products run clearly
    faster than fp32 (`bf16_matmul_speedup`). AMX runs them several times faster; AVX-512 BF16 alone need not (where a
    hypervisor hides AMX they can run slower than fp32: docs/speed.md).

    LM_CPU_BF16=0 in the environment answers False on any CPU, so a bf16 machine can run what an fp32-only one
    runs (the recipes, the precision 'auto' picks, the test suite); LM_CPU_BF16=1 answers True wherever the
    instructions exist, without measuring.
    """
    setting = os.environ.get("LM_CPU_BF16")
    if setting == "0" or not cpu_has_bf16_instructions():
        return False
    return setting == "1" or bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def bf16_supported(device_type: str) -> bool:
    """True where `device_type` ("cuda", "cpu", ...) runs bf16 natively, so bf16-mixed training pays."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_supports_bf16()
    return False


def resolve_precision(requested: str | None, device_type: str) -> tuple[str, str]:
    """The Lightning precision to use, and a line saying why.

    `None` or 'auto' picks bf16 mixed precision (weights, loss and optimizer state stay fp32) where bf16 pays
    on the hardware (`bf16_supported`), else full fp32. An explicit value is used as given, except float16 mixed
    precision on a CPU: Lightning would quietly run bf16-mixed instead, emulated (far slower than fp32) on most CPUs.
    """
    if str(requested) in ("16", "16-mixed") and device_type == "cpu":
        raise ConfigError(
            f"trainer.precision={requested} (float16 mixed precision) needs a GPU; on a CPU use auto, 32-true, or "
            "bf16-mixed where the CPU has native bf16 (AVX-512 BF16 or AMX)."
        )
    if requested not in (None, "auto"):
        return str(requested), f"precision {requested} (as requested)"
    if bf16_supported(device_type):
        return "bf16-mixed", f"precision bf16-mixed (native bf16 found on {device_type})"
    if device_type == "cpu" and cpu_has_bf16_instructions() and os.environ.get("LM_CPU_BF16") != "0":
        return "32-true", (
            f"precision 32-true: this CPU's bf16 matrix products measured {bf16_matmul_speedup():.2f}x fp32's speed, "
            "so fp32 trains faster here"
        )
    return "32-true", f"precision 32-true: no native bf16 on this {device_type}, so bf16 would be slow or unsupported"


def emulated_bf16_warning(precision: str, device_type: str) -> str | None:
    """A warning when bf16 is asked for on a CPU where it does not pay: one that only emulates it (bf16 matrix
    products run far slower than fp32 there), or one whose bf16 products measured slower than fp32; else None."""
    if "bf16" not in str(precision) or device_type != "cpu" or cpu_supports_bf16():
        return None
    if not cpu_has_bf16_instructions():
        return (
            f"precision {precision} on a CPU without native bf16 (no AVX-512 BF16 or AMX) is emulated and very slow "
            "(matrix products ~100x slower than fp32); trainer.precision=auto picks 32-true here."
        )
    return (
        f"precision {precision}: this CPU's bf16 matrix products run at {bf16_matmul_speedup():.2f}x fp32's speed "
        "(AVX-512 BF16 without AMX), so bf16 trains slower here; trainer.precision=auto picks 32-true."
    )


def training_device_type(accelerator: str) -> str:
    """The device type Lightning's 'auto' accelerator will pick."""
    if accelerator in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def measure_matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048, seconds: float = 0.5) -> float:
    """Measured FLOP/s of a square matrix product in `dtype`: the denominator for model FLOPs utilisation."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    a @ b  # warm-up
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        a @ b
        runs += 1
        sync()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel (Linux only).

    PyTorch's CPU allocator has no cache of its own: each large tensor is a fresh mmap whose pages the kernel
    zero-fills on first touch, and is unmapped again when freed. A training step allocates gigabytes of
    activations, so it spends much of its time in page faults. With mmap and trimming off, freed blocks are reused
    from the heap: faster steps at the same peak memory (docs/speed.md). Returns whether the setting took effect
    (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # another C library (musl), or none by that name
        return False


def resolve_device(name: str) -> str:
    """'auto' is CUDA when PyTorch sees a GPU, else the CPU; asking for a missing GPU is a clear error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for, but PyTorch sees no CUDA GPU; use device=cpu or device=auto.")
    return name
