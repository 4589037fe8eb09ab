"""SqueezeLLM (Kim et al. 2023): dense-and-sparse decomposition and sensitivity-weighted non-uniform codes.

For a layer W (out x in) with the empirical Fisher diagonal F (sum over calibration windows of the squared
gradient of the loss w.r.t. W, `stats["grad_sq_sum"]`):
1. Dense-and-sparse: the round(outliers * numel) weights of largest |W| (magnitude outliers), then the
   round(sensitive * numel) of largest F among the rest (sensitive values), are kept in FP16 (CSR) and left
   out of the fit: outliers would stretch a row's codebook, and the most sensitive weights are worth exact.
2. Every output channel (row) gets its own 2^bits-entry codebook minimising sum_j F_ij (W_ij - c(W_ij))^2
   over its remaining entries: F approximates how much each weight's error costs in loss (second-order
   Taylor expansion with the Fisher as the Hessian's diagonal), so the centroids go where the loss is
   sensitive rather than where weights are dense. 1-D weighted k-means (`cmpq.kmeans`, Lloyd from a quantile
   start), replaced by the row's min-max uniform grid where that has the lower weighted error.
3. Codebook entries are stored in FP16; every weight (outliers included: the dense codes cover every
   position) gets the code of its nearest stored entry, and dequantization overwrites the outlier positions
   with their FP16 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.errors import CmpqError
from cmpq.formats.base import FP16_BITS, BitBreakdown, QuantizedWeight
from cmpq.formats.bitpack import padded_rows
from cmpq.quantizers.base import Quantizer, register
from cmpq.quantizers.cmpq.kmeans import SortedRows, assign, fit
from cmpq.quantizers.outliers import SparseOutliers, top_k_mask


@dataclass(frozen=True)
class SqueezeLLMConfig:
    """bits: code width 1..8 (a 2^bits-entry FP16 codebook per output channel); outliers: fraction of the
    layer's weights kept in FP16 by magnitude; sensitive: further fraction kept in FP16 by Fisher information
    (paper: 0.45% + 0.05%); kmeans_iters: Lloyd iterations at most."""

    bits: int = 4
    outliers: float = 0.0045
    sensitive: float = 0.0005
    kmeans_iters: int = 100

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and not isinstance(self.bits, bool) and 1 <= self.bits <= 8,
              "squeezellm.bits", "must be an integer in 1..8", self.bits)
        for name in ("outliers", "sensitive"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 0.5,
                  f"squeezellm.{name}", "must be a fraction in [0, 0.5)", value)
        check(isinstance(self.kmeans_iters, int) and not isinstance(self.kmeans_iters, bool)
              and self.kmeans_iters >= 1, "squeezellm.kmeans_iters", "must be an integer >= 1", self.kmeans_iters)


@dataclass
class SqueezeLLMWeight(QuantizedWeight):
    """Dense codes with one FP16 lookup table per output channel, plus FP16 outliers in CSR."""

    codes: torch.Tensor       # (out, in) uint8
    codebooks: torch.Tensor   # (out, 2^bits) float32 holding FP16-representable values, sorted per row
    outliers: SparseOutliers
    bits: int

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.outliers.apply(self.codebooks.gather(1, self.codes.long()))

    def column_widths(self) -> torch.Tensor:
        return torch.full((self.codes.shape[1],), self.bits, dtype=torch.uint8)

    def outlier_count(self) -> int:
        return len(self.outliers)

    def storage(self) -> BitBreakdown:
        rows, columns = self.shape
        values, indices = self.outliers.bits(rows, columns)
        # codes are stored in whole 16-row groups (cmpq.formats.bitpack); one FP16 table of 2^bits per row
        return BitBreakdown(weights=rows * columns, codes=padded_rows(rows) * columns * self.bits,
                            params=rows * 2**self.bits * FP16_BITS, outliers=values, indices=indices)


def outlier_mask(weight: torch.Tensor, fisher: torch.Tensor, outliers: float, sensitive: float) -> torch.Tensor:
    """The dense-and-sparse split: round(outliers * n) largest |W|, then round(sensitive * n) largest Fisher
    among the rest (n = number of weights)."""
    numel = weight.numel()
    magnitude = top_k_mask(weight.abs(), round(outliers * numel))
    n_sensitive = min(round(sensitive * numel), numel - int(magnitude.sum()))
    return magnitude | top_k_mask(fisher.masked_fill(magnitude, float("-inf")), n_sensitive)


def squeezellm_quantize(weight: torch.Tensor, fisher: torch.Tensor,
                        config: SqueezeLLMConfig | None = None) -> SqueezeLLMWeight:
    """SqueezeLLM on one weight (out, in) with its Fisher diagonal (out, in), e.g. summed squared gradients."""
    config = SqueezeLLMConfig() if config is None else config
    w = weight.float()
    if fisher.shape != w.shape:
        raise ValueError(f"Fisher of shape {tuple(fisher.shape)} for a weight of shape {tuple(w.shape)}")
    f = fisher.float()
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise CmpqError("the Fisher diagonal (grad_sq_sum) has non-finite or negative entries: sums of squared "
                        "gradients cannot; if the calibration ran in bfloat16, try calib.dtype='float32'")
    mask = outlier_mask(w, f, config.outliers, config.sensitive)
    kept = ~mask
    # A row whose remaining entries carry no Fisher weight at all would leave every centroid where it starts:
    # fit it unweighted instead.
    dead = (f * kept).sum(dim=1) <= 0
    weights = torch.where(dead[:, None], torch.ones_like(f), f)
    rows = SortedRows(w, kept, weights)
    centroids = fit(rows, 2**config.bits, config.kmeans_iters, init="best")
    codebooks = centroids.half().float()  # as stored; rounding is monotone, so rows stay sorted
    codes = assign(w, codebooks)
    return SqueezeLLMWeight(codes=codes.to(torch.uint8), codebooks=codebooks,
                            outliers=SparseOutliers.from_mask(w, mask), bits=config.bits)


@register
class SqueezeLLM(Quantizer):
    name = "squeezellm"
    Config = SqueezeLLMConfig

    def needs(self) -> frozenset[str]:
        return frozenset({"grad_sq_sum"})

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> SqueezeLLMWeight:
        return squeezellm_quantize(weight, stats["grad_sq_sum"], self.config)


__all__ = ["SqueezeLLM", "SqueezeLLMConfig", "SqueezeLLMWeight", "outlier_mask", "squeezellm_quantize"]
