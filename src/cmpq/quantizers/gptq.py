"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): uniform min-max grids, with each column's rounding error
pushed onto the columns not yet quantized through the inverse Hessian (`error_feedback.py`).

Paper defaults: damping 1% of the mean Hessian diagonal, lazy blocks of 128 columns, columns in their stored
order; the common repository options are here too: `group_size` (a grid per group of input channels, fitted
when the group's first column is reached, on the weights as updated so far) and `act_order` (columns by
decreasing Hessian diagonal). With both, groups stay contiguous runs of stored columns whose grids are fitted
up front on the float weights (AutoGPTQ's `static_groups`), so the layer stores exactly RTN's layout (codes,
FP16 scale and integer zero per row and group) with no column permutation, and saves and loads as RTN does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.formats.uniform import UniformQuantizedWeight
from cmpq.quantizers.base import Quantizer, register
from cmpq.quantizers.error_feedback import quantize_with_feedback
from cmpq.quantizers.uniform import fit_minmax_grid


@dataclass(frozen=True)
class GPTQConfig:
    """bits: code width 1..8; group_size: input channels per grid (None = one grid per output channel);
    damp: Hessian damping as a fraction of its mean diagonal; act_order: quantize columns by decreasing
    Hessian diagonal; block_size: columns per lazy batch update."""

    bits: int = 4
    group_size: int | None = 128
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and 1 <= self.bits <= 8, "gptq.bits", "must be an integer in 1..8", self.bits)
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "gptq.group_size", "must be None (per output channel) or an integer >= 1", self.group_size)
        check(isinstance(self.damp, (int, float)) and 0 < self.damp < 1, "gptq.damp", "must be in (0, 1)", self.damp)
        check(isinstance(self.block_size, int) and self.block_size >= 1, "gptq.block_size", "must be an integer >= 1",
              self.block_size)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = 128,
                  damp: float = 0.01, act_order: bool = False, block_size: int = 128) -> UniformQuantizedWeight:
    """GPTQ on one weight (out, in) with the Hessian X^T X (in, in) of its calibration inputs."""
    out, columns = weight.shape
    group = columns if group_size is None else min(group_size, columns)
    n_groups = math.ceil(columns / group)
    maxq = 2**bits - 1
    scale, zero = torch.ones(out, n_groups), torch.zeros(out, n_groups)
    codes = torch.zeros(out, columns, dtype=torch.uint8)
    static = group_size is None or act_order  # grids fitted up front on the float weights
    if static:
        padded = F.pad(weight.float(), (0, n_groups * group - columns)).reshape(out * n_groups, group)
        fitted_scale, fitted_zero = fit_minmax_grid(padded, bits)
        scale, zero = fitted_scale.reshape(out, n_groups), fitted_zero.reshape(out, n_groups)

    def begin_group(cols: torch.Tensor, values: torch.Tensor) -> None:
        g = int(cols[0]) // group
        scale[:, g], zero[:, g] = fit_minmax_grid(values, bits)

    def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
        g = j // group
        s, z = scale[:, g], zero[:, g]
        q = torch.clamp(torch.round(column / s) + z, 0, maxq)
        codes[:, j] = q.to(torch.uint8)
        return s * (q - z)

    quantize_with_feedback(weight, hessian, quantize_column, damp=damp, block_size=block_size, act_order=act_order,
                           begin_group=None if static else begin_group, group_size=None if static else group)
    return UniformQuantizedWeight(codes=codes, scale=scale.half(), zero=zero.to(torch.uint8), bits=bits,
                                  group_size=group)


@register
class GPTQ(Quantizer):
    name = "gptq"
    Config = GPTQConfig

    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> UniformQuantizedWeight:
        c = self.config
        return gptq_quantize(weight, stats["hessian"], c.bits, c.group_size, c.damp, c.act_order, c.block_size)


__all__ = ["GPTQ", "GPTQConfig", "gptq_quantize"]
