"""What the machine can do: bf16 support and the measured matrix-multiply peak."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import torch

from lm.errors import ConfigError


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX-512 BF16 or AMX), where bf16 matmuls beat fp32.

    LM_CPU_BF16=0 in the environment answers False on any CPU, so a bf16 machine can run what an fp32-only one
    runs (the recipes, the precision 'auto' picks, the test suite).
    """
    if os.environ.get("LM_CPU_BF16") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def bf16_supported(device_type: str) -> bool:
    """True where `device_type` ("cuda", "cpu", ...) runs bf16 natively, so bf16-mixed training pays."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_supports_bf16()
    return False


def resolve_precision(requested: str | None, device_type: str) -> tuple[str, str]:
    """The Lightning precision to use, and a line saying why.

    `None` or 'auto' picks bf16 mixed precision (weights, loss and optimizer state stay fp32) where the
    hardware has native bf16, else full fp32. An explicit value is used as given, except float16 mixed precision
    on a CPU: Lightning would quietly run bf16-mixed instead, emulated (far slower than fp32) on most CPUs.
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
    return "32-true", f"precision 32-true: no native bf16 on this {device_type}, so bf16 would be slow or unsupported"


def emulated_bf16_warning(precision: str, device_type: str) -> str | None:
    """A warning when bf16 is asked for on a CPU that only emulates it (bf16 matrix products run far slower than
    fp32 there), else None."""
    if "bf16" in str(precision) and device_type == "cpu" and not cpu_supports_bf16():
        return (
            f"precision {precision} on a CPU without native bf16 (no AVX-512 BF16 or AMX) is emulated and very slow "
            "(matrix products ~100x slower than fp32); trainer.precision=auto picks 32-true here."
        )
    return None


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
