"""The precision of the calibration forward passes (the activations statistics are gathered from).

Weights are always quantized from their float32 values; only the calibration forwards and the Hessian
products may run in bfloat16. On a CPU with native bfloat16 dot products (AVX512-BF16 or AMX) those
matmuls are about 4x faster than float32 (measured on this machine: 2048 x 1536 Hessian 45 ms -> 11 ms), which
is what keeps a calibration of 128 x 2048 tokens within minutes; elsewhere bfloat16 is emulated and
slower than float32, so "auto" picks float32 there. The record names the precision used.
"""

from __future__ import annotations

import contextlib

import torch

CALIB_DTYPES = ("auto", "float32", "bfloat16")


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                   "_is_amx_tile_supported"))


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype for a `CalibConfig.dtype` name; "auto" is bfloat16 where the CPU runs it natively."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    if name not in CALIB_DTYPES:
        raise ValueError(f"unknown calibration dtype '{name}'; choose from {CALIB_DTYPES}")
    return getattr(torch, name)


def compute_context(dtype: torch.dtype):
    """Autocast for forwards in `dtype` (no-op for float32); block inputs and outputs stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)
