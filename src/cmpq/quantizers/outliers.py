"""Dense-and-sparse storage shared by the methods that keep some weights in FP16 (CMPQ, SqueezeLLM, LLM-MQ).

The chosen weights are stored as FP16 values in CSR (row pointers + column indices, each with the narrowest
unsigned integer type that fits); the dense codes still cover every position, and dequantization overwrites
the outlier positions with their stored values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmpq.formats.base import BitBreakdown, QuantizedWeight, sparse_bits


def top_k_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` largest entries of `scores` (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, sorted=False).indices] = True
    return mask.view_as(scores)


@dataclass
class SparseOutliers:
    """FP16 values at (row, column) positions of an (out, in) weight, in row-major order as CSR stores them."""

    rows: torch.Tensor    # (nnz,) int64
    cols: torch.Tensor    # (nnz,) int64
    values: torch.Tensor  # (nnz,) float16

    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor) -> "SparseOutliers":
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows=rows, cols=cols, values=weight[rows, cols].half())

    @classmethod
    def empty(cls) -> "SparseOutliers":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.float16))

    def __len__(self) -> int:
        return int(self.values.numel())

    def apply(self, dense: torch.Tensor) -> torch.Tensor:
        """`dense` (float32, modified in place) with the outlier positions overwritten; returned for chaining."""
        dense[self.rows, self.cols] = self.values.float()
        return dense

    def bits(self, rows: int, columns: int) -> tuple[int, int]:
        """(value bits, index bits) as stored in CSR."""
        return sparse_bits(rows, columns, len(self))


@dataclass
class WithOutliers(QuantizedWeight):
    """A dense quantized weight plus FP16 outliers overwriting it at their positions (LLM-MQ's uniform layers)."""

    inner: QuantizedWeight
    outliers: SparseOutliers
    map_bits: int = 0  # per-layer metadata the method adds (LLM-MQ: the layer's width, one byte)

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return self.inner.shape

    def dequantize(self) -> torch.Tensor:
        return self.outliers.apply(self.inner.dequantize())

    def column_widths(self) -> torch.Tensor:
        return self.inner.column_widths()

    def outlier_count(self) -> int:
        return len(self.outliers)

    def storage(self) -> BitBreakdown:
        values, indices = self.outliers.bits(*self.shape)
        return self.inner.storage() + BitBreakdown(outliers=values, indices=indices, maps=self.map_bits)
