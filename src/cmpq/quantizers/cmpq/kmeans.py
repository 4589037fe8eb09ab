"""1-D k-means (Lloyd) for many columns at once: every row of `values` gets its own sorted codebook.

In 1-D every cluster of a nearest-centroid assignment is a contiguous run of the sorted values, so after
sorting each row once (`SortedRows`, shared by every width tried on a layer), a Lloyd step, the cluster sums
and the squared error all come from k binary searches and prefix sums per row, never a pass over all
entries. The "best" start runs Lloyd from quantiles and keeps the uniform min-max grid on rows where that
is better, so the result is never worse than the min-max grid of the same width.

Entries may carry weights (SqueezeLLM's Fisher-weighted k-means): the prefix sums are then of w, w*x and
w*x^2, so each Lloyd step moves a centroid to its cluster's weighted mean and the squared error is weighted.
Without weights the original unweighted arithmetic runs unchanged (CMPQ's results are bit-identical).
"""

from __future__ import annotations

import torch


class SortedRows:
    """Each row's included entries sorted ascending (excluded ones pushed to the end as +inf), with prefix
    sums of values and squares (float64) and the count of included entries per row.

    With `weights` (same shape as `values`, non-negative), `prefix` and `prefix_sq` hold the prefix sums of
    w*x and w*x^2 and `prefix_w` those of w, all in sorted order; `cluster_sums`, `sse` and `lloyd` then use
    the weights. Without weights `prefix_w` is None and nothing else differs from the unweighted structure."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> None:
        values = values.float()
        if mask is not None:
            values = torch.where(mask, values, torch.full_like(values, float("inf")))
        self.prefix_w: torch.Tensor | None = None
        if weights is None:
            self.sorted = values.sort(dim=1).values.contiguous()
        else:
            if weights.shape != values.shape:
                raise ValueError(f"weights of shape {tuple(weights.shape)} for values of shape {tuple(values.shape)}")
            ordered = values.sort(dim=1, stable=True)
            self.sorted = ordered.values.contiguous()
            w = weights.double().gather(1, ordered.indices)
        finite = torch.isfinite(self.sorted)
        self.count = finite.sum(dim=1, keepdim=True)
        x = torch.where(finite, self.sorted, torch.zeros_like(self.sorted)).double()
        zero = torch.zeros(values.shape[0], 1, dtype=torch.float64)
        if weights is None:
            self.prefix = torch.cat([zero, x.cumsum(dim=1)], dim=1)
            self.prefix_sq = torch.cat([zero, (x * x).cumsum(dim=1)], dim=1)
        else:
            w = torch.where(finite, w, torch.zeros_like(w))  # excluded entries weigh nothing
            self.prefix_w = torch.cat([zero, w.cumsum(dim=1)], dim=1)
            self.prefix = torch.cat([zero, (w * x).cumsum(dim=1)], dim=1)
            self.prefix_sq = torch.cat([zero, (w * x * x).cumsum(dim=1)], dim=1)

    @property
    def weighted(self) -> bool:
        return self.prefix_w is not None

    def subset(self, rows: torch.Tensor) -> "SortedRows":
        """The same structure for a subset of rows (boolean mask or indices)."""
        out = SortedRows.__new__(SortedRows)
        out.sorted, out.count = self.sorted[rows], self.count[rows]
        out.prefix, out.prefix_sq = self.prefix[rows], self.prefix_sq[rows]
        out.prefix_w = None if self.prefix_w is None else self.prefix_w[rows]
        return out

    def bounds(self, centroids: torch.Tensor) -> torch.Tensor:
        """(n, k+1) offsets where each centroid's cluster starts in the sorted rows, ending at each count."""
        mids = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
        inner = torch.minimum(torch.searchsorted(self.sorted, mids.contiguous(), side="right"), self.count)
        zeros = torch.zeros_like(self.count)
        return torch.cat([zeros, inner, self.count], dim=1)

    def cluster_sums(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, sum, sum of squares) of every cluster, float64, (n, k) each; with weights (sum of w,
        sum of w*x, sum of w*x^2)."""
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        if self.prefix_w is None:
            mass = (hi - lo).double()
        else:
            mass = self.prefix_w.gather(1, hi) - self.prefix_w.gather(1, lo)
        return (mass, self.prefix.gather(1, hi) - self.prefix.gather(1, lo),
                self.prefix_sq.gather(1, hi) - self.prefix_sq.gather(1, lo))

    def sse(self, centroids: torch.Tensor) -> torch.Tensor:
        """Per-row squared error (weighted, with weights) of nearest-centroid quantization with sorted
        `centroids` (n, k), float64."""
        n, s1, s2 = self.cluster_sums(self.bounds(centroids))
        c = centroids.double()
        return (s2 - 2 * c * s1 + n * c * c).sum(dim=1).clamp(min=0)

    def quantiles(self, k: int) -> torch.Tensor:
        """Centroids at the (i + 0.5) / k quantiles of each row's included entries."""
        levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        index = torch.minimum((levels[None, :] * self.count).long(), (self.count - 1).clamp(min=0))
        init = self.sorted.gather(1, index)
        return torch.where(torch.isfinite(init), init, torch.zeros_like(init))

    def minmax_grid(self, k: int) -> torch.Tensor:
        """The uniform grid of k levels from each row's minimum to its maximum (included entries only)."""
        empty = self.count[:, 0] == 0
        lo = torch.where(empty, 0.0, self.sorted[:, 0])
        hi = torch.where(empty, 0.0, self.sorted.gather(1, (self.count - 1).clamp(min=0))[:, 0])
        steps = torch.arange(k, dtype=torch.float32) / max(k - 1, 1)
        return lo[:, None] + (hi - lo)[:, None] * steps[None, :]


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every entry: values (n, m), sorted centroids (n, k) -> (n, m) int64."""
    if centroids.shape[1] == 1:
        return torch.zeros(values.shape, dtype=torch.long)
    bounds = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(bounds.contiguous(), values.contiguous())


def sse(values: torch.Tensor, mask: torch.Tensor | None, centroids: torch.Tensor) -> torch.Tensor:
    """Per-row squared error of nearest-centroid quantization over the entries where `mask` is True."""
    return SortedRows(values, mask).sse(centroids)


def lloyd(rows: SortedRows, centroids: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd iterations until no cluster boundary moves (or `max_iter`); empty clusters keep their centroid.

    With weights a centroid moves to its cluster's weighted mean; clusters of zero total weight count as
    empty. The weighted mean is clamped to the cluster's value range: a cluster whose weight is tiny next to
    its row's total loses that many digits in the prefix-sum differences, and must not land outside it."""
    previous = None
    for _ in range(max_iter):
        bounds = rows.bounds(centroids)
        if previous is not None and torch.equal(bounds, previous):
            break
        previous = bounds
        counts, sums, _ = rows.cluster_sums(bounds)
        if not rows.weighted:
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
        else:
            lo, hi = bounds[:, :-1], bounds[:, 1:]
            first = rows.sorted.gather(1, lo.clamp(max=rows.sorted.shape[1] - 1)).double()
            last = rows.sorted.gather(1, (hi - 1).clamp(min=0)).double()
            mean = torch.minimum(torch.maximum(sums / torch.where(counts > 0, counts, 1.0), first), last)
            centroids = torch.where((counts > 0) & (hi > lo), mean, centroids.double()).float()
        centroids = centroids.sort(dim=1).values
    return centroids


def fit(rows: SortedRows, k: int, max_iter: int = 100, init: str | torch.Tensor = "best") -> torch.Tensor:
    """Sorted float32 codebooks (n, k) minimising each row's squared error.

    init: "best" (Lloyd from quantiles, replaced by the min-max grid on rows where the grid is better),
    "quantile", "minmax" (the min-max grid itself, no iterations: the uniform-grid ablation), or a (n, k)
    tensor of starting centroids (warm start, e.g. a refit after removing outliers).
    """
    if isinstance(init, torch.Tensor):
        return lloyd(rows, init.float(), max_iter)
    if init == "minmax":
        return rows.minmax_grid(k)
    if init not in ("best", "quantile"):
        raise ValueError(f"unknown k-means init '{init}'")
    fitted = lloyd(rows, rows.quantiles(k), max_iter)
    if init == "quantile":
        return fitted
    grid = rows.minmax_grid(k)
    return torch.where((rows.sse(fitted) <= rows.sse(grid))[:, None], fitted, grid)


def kmeans_1d(values: torch.Tensor, mask: torch.Tensor | None, k: int, max_iter: int = 100,
              init: str | torch.Tensor = "best") -> torch.Tensor:
    """`fit` on the rows of `values` (n, m), excluding entries where `mask` (n, m) is False."""
    return fit(SortedRows(values, mask), k, max_iter, init)


def minmax_init(values: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """The min-max grid of each row (for comparisons in tests and ablations)."""
    return SortedRows(values, mask).minmax_grid(k)
