"""Bit allocation: which width from the bit set each input channel (column) gets, within a bit budget.

- `allocate_ranked` (the paper's rule): the two adjacent widths of the bit set around the budget; the
  highest-ranked columns (largest activation norm s_j, or another ranking for ablations) get the higher one.
- `allocate_greedy` (error-driven): starting from the narrowest width, repeatedly give the next width to the
  column whose weighted error s_j^2 * SSE_j falls most per extra stored bit.
Both return per-column indices into the bit set, and raise `UnreachableTargetError` when the budget is
below the cheapest allocation or above the dearest.
"""

from __future__ import annotations

import torch

from cmpq.errors import CmpqError


class UnreachableTargetError(CmpqError):
    """The target cannot be met with this bit set, outlier ratios and layer shape."""


def _check_reachable(columns: int, cost: torch.Tensor, budget: float, tolerance: float) -> None:
    """cost: (n_widths,) per column, or (columns, n_widths) when columns differ (model-wide budgets)."""
    per_column = cost.expand(columns, cost.shape[-1])
    lowest, highest = per_column[:, 0].sum().item(), per_column[:, -1].sum().item()
    if lowest > budget:
        raise UnreachableTargetError(f"the budget is {budget:.0f} bits but even the narrowest width needs "
                                     f"{lowest:.0f}")
    if highest < budget - tolerance:
        raise UnreachableTargetError(f"the budget is {budget:.0f} bits but even the widest width uses only "
                                     f"{highest:.0f}; lower the target or widen the bit set")


def allocate_ranked(order: torch.Tensor, cost: torch.Tensor, budget: float, tolerance: float) -> torch.Tensor:
    """Per-column width index (into the bit set) under the paper's two-adjacent-widths rule.

    order: column indices, most important first (in,); cost: bits one column costs at each width (n_widths,),
    increasing; budget: bits available for all columns; tolerance: how far below the budget is acceptable
    when even the widest width cannot spend it.
    """
    columns = order.numel()
    _check_reachable(columns, cost, budget, tolerance)
    low = max(i for i in range(cost.numel()) if columns * cost[i].item() <= budget)
    index = torch.full((columns,), low, dtype=torch.long)
    if low + 1 < cost.numel():
        step = (cost[low + 1] - cost[low]).item()
        upgraded = min(columns, int((budget - columns * cost[low].item()) // step))
        index[order[:upgraded]] = low + 1
    return index


def allocate_greedy(weighted_error: torch.Tensor, cost: torch.Tensor, budget: float, tolerance: float) \
        -> torch.Tensor:
    """Per-column width index maximising the error reduction per stored bit.

    weighted_error: (in, n_widths) s_j^2 * SSE of column j at each width; cost: bits per column at each width,
    increasing, (n_widths,) or (in, n_widths) when columns come from layers of different heights.
    Each column's successive upgrades are ranked by gain per bit made non-increasing (a running minimum),
    so sorting all upgrades globally takes every column's upgrades in order.
    """
    columns, widths = weighted_error.shape
    _check_reachable(columns, cost, budget, tolerance)
    index = torch.zeros(columns, dtype=torch.long)
    if widths == 1:
        return index
    cost = cost.double().expand(columns, widths)
    step_cost = cost[:, 1:] - cost[:, :-1]                                          # (in, n_widths - 1)
    gain = (weighted_error[:, :-1] - weighted_error[:, 1:]).double() / step_cost
    gain = torch.cummin(gain, dim=1).values
    ranked = torch.sort(gain.flatten(), descending=True, stable=True).indices
    left = budget - cost[:, 0].sum().item()
    spent = torch.cumsum(step_cost.flatten()[ranked], dim=0)
    prefix = int((spent <= left).sum())
    index += torch.bincount(ranked[:prefix] // (widths - 1), minlength=columns)
    left -= spent[prefix - 1].item() if prefix else 0.0
    # Past the first upgrade that does not fit, cheaper later ones may still: take each that is its column's next.
    level, steps = index.tolist(), step_cost.flatten().tolist()
    for flat in ranked[prefix:].tolist():
        column, step = divmod(flat, widths - 1)
        if level[column] == step and steps[flat] <= left:
            level[column] += 1
            left -= steps[flat]
    return torch.tensor(level, dtype=torch.long)
