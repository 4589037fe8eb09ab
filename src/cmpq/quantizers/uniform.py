"""Asymmetric min-max uniform grids: the arithmetic that RTN (and later GPTQ-style methods) share.

Scales are stored in FP16 and zero-points as integers of the code width, so codes are computed against the
FP16-rounded scale: the dequantized weight is exactly what a reader of the stored values reconstructs.
"""

from __future__ import annotations

import torch


def fit_minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (FP16-representable, float32) and integer zero-point per row of `w` (rows, n).

    The range is widened to contain 0 (as GPTQ's quantizer does) so the zero-point fits in `bits` bits.
    """
    maxq = 2**bits - 1
    w = w.float()
    wmin = torch.clamp(w.min(dim=1).values, max=0.0)
    wmax = torch.clamp(w.max(dim=1).values, min=0.0)
    scale = ((wmax - wmin) / maxq).half().float()
    degenerate = scale == 0
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] of `w` (rows, n) on per-row grids, as uint8."""
    maxq = 2**bits - 1
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return torch.clamp(q, 0, maxq).to(torch.uint8)

