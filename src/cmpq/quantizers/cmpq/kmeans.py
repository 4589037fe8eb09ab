"""1-D k-means (Lloyd) for many columns at once: every row of `values` gets its own sorted codebook.

All rows of one call share k; rows are independent. Two deterministic starts (quantiles, and the uniform
min-max grid) are run and the better kept per row, so the result is never worse than the min-max grid of
the same width. Assignment uses the midpoints between sorted centroids (searchsorted), which is exact
nearest-centroid assignment in 1-D.
"""

from __future__ import annotations

import torch


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every entry: values (n, m), sorted centroids (n, k) -> (n, m) int64."""
    if centroids.shape[1] == 1:
        return torch.zeros(values.shape, dtype=torch.long)
    bounds = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(bounds.contiguous(), values.contiguous())


def sse(values: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squared errors of nearest-centroid quantization over the entries where `mask` is True."""
    err = values - centroids.gather(1, assign(values, centroids))
    return (err.square() * mask).sum(dim=1)


def quantile_init(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids at the (i + 0.5) / k quantiles of each row's included entries."""
    sorted_vals = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=1).values
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)
    levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    index = (levels[None, :] * count).long().clamp(max=values.shape[1] - 1)
    index = torch.minimum(index, count - 1)
    init = sorted_vals.gather(1, index)
    return torch.where(torch.isinf(init), torch.zeros_like(init), init)


def minmax_init(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The uniform grid of k levels from each row's minimum to its maximum (included entries only)."""
    big = torch.finfo(values.dtype).max
    lo = torch.where(mask, values, torch.full_like(values, big)).min(dim=1).values
    hi = torch.where(mask, values, torch.full_like(values, -big)).max(dim=1).values
    empty = ~mask.any(dim=1)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    steps = torch.arange(k, dtype=torch.float32) / max(k - 1, 1)
    return lo[:, None] + (hi - lo)[:, None] * steps[None, :]


class SortedRows:
    """Each row's included entries sorted ascending (excluded ones pushed to the end as +inf), with prefix
    sums: in 1-D every cluster is a contiguous run of the sorted values, so a Lloyd step needs only k-1
    binary searches per row instead of a pass over all entries."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.sorted = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=1).values.contiguous()
        self.count = mask.sum(dim=1, keepdim=True)
        finite = torch.where(torch.isinf(self.sorted), torch.zeros_like(self.sorted), self.sorted).double()
        self.prefix = torch.cat([torch.zeros(values.shape[0], 1, dtype=torch.float64), finite.cumsum(dim=1)], dim=1)

    def bounds(self, centroids: torch.Tensor) -> torch.Tensor:
        """(n, k+1) start offsets of each cluster in the sorted rows, ending at each row's count."""
        mids = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
        inner = torch.searchsorted(self.sorted, mids.contiguous(), side="right")
        inner = torch.minimum(inner, self.count)
        zeros = torch.zeros_like(self.count)
        return torch.cat([zeros, inner, self.count], dim=1)


def lloyd(rows: SortedRows, centroids: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd iterations until no cluster boundary moves (or `max_iter`); empty clusters keep their centroid."""
    previous = None
    for _ in range(max_iter):
        bounds = rows.bounds(centroids)
        if previous is not None and torch.equal(bounds, previous):
            break
        previous = bounds
        sums = rows.prefix.gather(1, bounds[:, 1:]) - rows.prefix.gather(1, bounds[:, :-1])
        counts = (bounds[:, 1:] - bounds[:, :-1]).double()
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
        centroids = centroids.sort(dim=1).values
    return centroids


def kmeans_1d(values: torch.Tensor, mask: torch.Tensor | None, k: int, max_iter: int = 100,
              init: str = "best") -> torch.Tensor:
    """Sorted float32 codebooks (n, k) minimising each row's squared error over its included entries.

    values: (n, m) float32, one row per column of the weight; mask: (n, m) bool, False for entries excluded
    from the fit (outliers); init: "best" (both starts, keep the better), "quantile", or "minmax" (the
    min-max grid itself, no iterations: the uniform-grid ablation).
    """
    values = values.float()
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    if init == "minmax":
        return minmax_init(values, mask, k)
    rows = SortedRows(values, mask)
    from_grid = lloyd(rows, minmax_init(values, mask, k), max_iter)
    if init == "quantile" or init == "best":
        from_quantiles = lloyd(rows, quantile_init(values, mask, k), max_iter)
        if init == "quantile":
            return from_quantiles
        better = sse(values, mask, from_quantiles) <= sse(values, mask, from_grid)
        return torch.where(better[:, None], from_quantiles, from_grid)
    if init == "grid":
        return from_grid
    raise ValueError(f"unknown k-means init '{init}'")
