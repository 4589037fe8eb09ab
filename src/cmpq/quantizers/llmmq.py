"""LLM-MQ (Li et al. 2023): mixed precision between layers rather than within them.

Every layer gets one width from the bit set; the widths are chosen so that the model meets the average
honest-bpw target while the estimated loss increase is smallest:
1. Sensitivity of layer l at width b, from the gradient of the calibration loss (one backward pass per window
   over the float model, `calibration/gradients.py`): first order |sum g * (Q_b(W) - W)| (the paper), or the
   Fisher (second-order) estimate 0.5 * sum F * (Q_b(W) - W)^2.
2. Allocation: a knapsack over layers (minimise the summed sensitivity, total stored bits within the budget),
   solved greedily by sensitivity decrease per extra bit (`allocate_greedy`, shared with CMPQ).
3. Each layer: uniform asymmetric group quantization (RTN's grid) with the largest-magnitude weights kept in
   FP16 outside the grid (outlier protection).
A target below the all-narrowest or above the all-widest allocation runs at that extreme (a warning; the
record's `budget_met` says so): the method's nearest setting, never an interpolation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.errors import CmpqError
from cmpq.quantizers.base import BUDGET_TOLERANCE_BPW, Quantizer, register
from cmpq.quantizers.cmpq.allocate import UnreachableTargetError, allocate_greedy
from cmpq.quantizers.outliers import SparseOutliers, WithOutliers, top_k_mask
from cmpq.quantizers.rtn import quantize_uniform

SENSITIVITIES = ("first_order", "fisher")


@dataclass(frozen=True)
class LLMMQConfig:
    """bits: average honest bits per weight over the model; bit_set: widths a layer may get; group_size: input
    channels per uniform grid (None = per output channel); outliers: fraction of each layer's weights kept
    in FP16 by magnitude; sensitivity: first_order (the paper) or fisher."""

    bits: float = 3.0
    bit_set: tuple[int, ...] = (2, 3, 4)
    group_size: int | None = 128
    outliers: float = 0.005
    sensitivity: str = "first_order"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_set", tuple(sorted(set(self.bit_set))))
        check(isinstance(self.bits, (int, float)) and 0 < self.bits <= 16, "llmmq.bits", "must be a number in (0, 16]",
              self.bits)
        check(len(self.bit_set) > 0 and all(isinstance(b, int) and 1 <= b <= 8 for b in self.bit_set),
              "llmmq.bit_set", "must be a non-empty set of integers in 1..8", self.bit_set)
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "llmmq.group_size", "must be None (per output channel) or an integer >= 1", self.group_size)
        check(isinstance(self.outliers, (int, float)) and 0 <= self.outliers < 0.5, "llmmq.outliers",
              "must be a fraction in [0, 0.5)", self.outliers)
        check(self.sensitivity in SENSITIVITIES, "llmmq.sensitivity", f"must be one of {SENSITIVITIES}",
              self.sensitivity)


def quantize_with_outliers(weight: torch.Tensor, bits: int, group_size: int | None, fraction: float) -> WithOutliers:
    """Uniform group quantization with the round(fraction * numel) largest |W| kept in FP16. The outliers are
    zeroed before the grids are fitted (every grid contains 0, so they no longer stretch it). The layer's
    chosen width is stored as one byte (a per-layer bit-width map, PROTOCOL)."""
    w = weight.float()
    mask = top_k_mask(w.abs(), round(fraction * w.numel()))
    inner = quantize_uniform(w.masked_fill(mask, 0.0), bits, group_size)
    return WithOutliers(inner=inner, outliers=SparseOutliers.from_mask(w, mask), map_bits=8)  # the layer's width


@register
class LLMMQ(Quantizer):
    name = "llmmq"
    Config = LLMMQConfig

    def __init__(self, config: LLMMQConfig | None = None) -> None:
        super().__init__(config)
        self._measured: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._plan: dict[str, int] = {}

    def target_bits(self) -> float | None:
        return float(self.config.bits)

    def measures_model(self) -> bool:
        return True

    def measure_needs(self) -> frozenset[str]:
        return frozenset({"grad_sum" if self.config.sensitivity == "first_order" else "grad_sq_sum"})

    def _layer(self, weight: torch.Tensor, bits: int) -> WithOutliers:
        return quantize_with_outliers(weight, bits, self.config.group_size, self.config.outliers)

    def measure(self, name: str, weight: torch.Tensor, stats: LayerStats) -> None:
        sensitivity, cost = [], []
        for bits in self.config.bit_set:
            qw = self._layer(weight, bits)
            delta = (qw.dequantize() - weight.float()).double()
            if self.config.sensitivity == "first_order":
                sensitivity.append((stats["grad_sum"].double() * delta).sum().abs())
            else:
                sensitivity.append(0.5 * (stats["grad_sq_sum"].double() * delta.square()).sum())
            cost.append(float(qw.storage().total))
        # A wider grid can score a larger first-order term by chance: sensitivity never rises with width.
        ordered = torch.cummin(torch.stack(sensitivity), dim=0).values
        self._measured[name] = (ordered, torch.tensor(cost, dtype=torch.float64), weight.numel())

    def plan(self) -> None:
        names = list(self._measured)
        errors = torch.stack([self._measured[n][0] for n in names])
        costs = torch.stack([self._measured[n][1] for n in names])
        budget = self.config.bits * sum(self._measured[n][2] for n in names)
        tolerance = BUDGET_TOLERANCE_BPW * sum(self._measured[n][2] for n in names)
        try:
            index = allocate_greedy(errors, costs, budget, tolerance)
        except UnreachableTargetError as exc:
            extreme = 0 if costs[:, 0].sum() > budget else len(self.config.bit_set) - 1
            warnings.warn(f"llmmq: target {self.config.bits} bpw is unreachable ({exc}); every layer gets "
                          f"{self.config.bit_set[extreme]} bits", stacklevel=2)
            index = torch.full((len(names),), extreme, dtype=torch.long)
        self._plan = {n: self.config.bit_set[int(i)] for n, i in zip(names, index)}
        self._measured.clear()

    def planned_bits(self) -> dict[str, int]:
        """Width chosen per layer (after `plan`)."""
        return dict(self._plan)

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> WithOutliers:
        if name not in self._plan:
            raise CmpqError(f"llmmq: layer '{name}' was not planned (the engine measures every layer first)")
        return self._layer(weight, self._plan[name])


__all__ = ["LLMMQ", "LLMMQConfig", "quantize_with_outliers"]
