"""RTN: round-to-nearest on an asymmetric min-max grid, per output channel or per group of input channels.

The baseline every method must beat; it needs no calibration data.
Storage per group: FP16 scale + zero-point at the code width (PROTOCOL: 4-bit g128 = 4 + 20/128 bpw).
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
from cmpq.quantizers.uniform import fit_minmax_grid, quantize_to_grid


@dataclass(frozen=True)
class RTNConfig:
    """bits: code width 1..8; group_size: input channels per scale (None = one scale per output channel)."""

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and 1 <= self.bits <= 8, "rtn.bits", "must be an integer in 1..8", self.bits)
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "rtn.group_size", "must be None (per output channel) or an integer >= 1", self.group_size)


def quantize_uniform(weight: torch.Tensor, bits: int, group_size: int | None) -> UniformQuantizedWeight:
    """Round `weight` (out, in) to nearest on per-(row, group) min-max grids."""
    out, cols = weight.shape
    group = cols if group_size is None else min(group_size, cols)
    n_groups = math.ceil(cols / group)
    # Pad with zeros to whole groups: every grid contains 0, so padding never changes a group's range.
    padded = F.pad(weight.float(), (0, n_groups * group - cols)).reshape(out * n_groups, group)
    scale, zero = fit_minmax_grid(padded, bits)
    codes = quantize_to_grid(padded, scale, zero, bits).reshape(out, n_groups * group)[:, :cols].contiguous()
    return UniformQuantizedWeight(codes=codes, scale=scale.half().reshape(out, n_groups),
                                  zero=zero.to(torch.uint8).reshape(out, n_groups), bits=bits, group_size=group)


@register
class RTN(Quantizer):
    name = "rtn"
    Config = RTNConfig

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> UniformQuantizedWeight:
        return quantize_uniform(weight, self.config.bits, self.config.group_size)


__all__ = ["RTN", "RTNConfig", "UniformQuantizedWeight", "quantize_uniform"]
