"""Per-layer activation statistics gathered by forward hooks, only those the quantizer asks for.

Statistics are sums over calibration tokens, accumulated in float64, each window's contribution computed in
float32 as GPTQ does (also when the forwards run in bfloat16: a Hessian summed from bfloat16-rounded
products is not positive definite, measured on smollm2's o_proj: smallest eigenvalue -0.69 where float32
gives +0.001, more than the 1% damping covers);
methods normalise them as their paper does. Several linears that read the same input tensor (q/k/v,
gate/up) share one computation per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from cmpq.calibration.capture import StopBlock
from cmpq.progress import stage


def gram(x: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """X^T X (float64) of a (tokens, n) float32 matrix from the blocks on and above the diagonal only: with
    3 x 3 blocks, 6 of 9 products (measured: 2048 x 1536 in 34 ms instead of 45)."""
    n = x.shape[1]
    edges = [n * i // parts for i in range(parts + 1)]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(parts):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, parts):
            cols = slice(edges[j], edges[j + 1])
            block = (x[:, rows].T @ x[:, cols]).double()
            out[rows, cols] = block
            if j > i:
                out[cols, rows] = block.T
    return out


# name -> function of the (tokens, in_features) float32 input, returning the per-forward contribution (float64)
STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "col_sq_sum": lambda x: x.square().sum(dim=0).double(),     # sum_t x_tj^2, per input channel j
    "col_abs_sum": lambda x: x.abs().sum(dim=0).double(),       # sum_t |x_tj|, per input channel j
    "hessian": gram,                                            # X^T X, (in, in)
    "col_abs_max": lambda x: x.abs().amax(dim=0).double(),      # max_t |x_tj| (SmoothQuant's activation range)
}
# How contributions of successive forwards combine (default: summed).
REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"col_abs_max": torch.maximum}
# Statistics of the loss gradient w.r.t. each weight, (out, in): one backward pass per calibration window over
# the whole float model (`calibration/gradients.py`), not forward hooks.
GRADIENT_STATISTICS = ("grad_sum", "grad_sq_sum")


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs over `tokens` calibration tokens."""

    tokens: int = 0
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.values:
            raise KeyError(f"statistic '{name}' was not collected (collected: {sorted(self.values)}); "
                           f"list it in the quantizer's needs()")
        return self.values[name]

    def col_norm(self) -> torch.Tensor:
        """s_j = ||X_j||_2 over all calibration tokens, per input channel (CMPQ's channel statistic)."""
        return self["col_sq_sum"].sqrt().float()


class StatsRecorder:
    """Forward pre-hooks on a set of linears that accumulate the requested statistics of their inputs.

    Hooks only keep a reference to each input; `flush()` (called after every block forward) computes each
    statistic once per distinct input tensor and adds it to every linear that read that tensor. With `stop_early`, the forward is ended (`StopBlock`) as soon as every
    linear has received its input, before the last one computes: the rest of the block is not needed.
    """

    def __init__(self, linears: dict[str, nn.Linear], needs: frozenset[str], stop_early: bool = False) -> None:
        needs = frozenset(needs) - set(GRADIENT_STATISTICS)  # gathered by a backward pass, not by hooks
        unknown = sorted(set(needs) - set(STATISTICS))
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; known: {sorted(STATISTICS)}")
        self.needs, self.stop_early = needs, stop_early
        self.stats = {name: LayerStats() for name in linears}
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            self._pending[name] = (x, x._version)
            if self.stop_early and len(self._pending) == len(self.stats):
                raise StopBlock
        return hook

    def flush(self) -> None:
        with torch.autocast("cpu", enabled=False), stage("statistics"):  # float32 even in a bfloat16 forward
            self._flush()

    def _flush(self) -> None:
        groups: dict[tuple, list[str]] = {}
        for name, (x, version) in self._pending.items():
            if x._version != version:
                raise RuntimeError(f"the input of '{name}' was modified in place after the layer read it")
            groups.setdefault((x.data_ptr(), x.dtype, tuple(x.shape), x.stride()), []).append(name)
        for names in groups.values():
            x = self._pending[names[0]][0]
            x2d = x.reshape(-1, x.shape[-1]).float()
            computed: dict[str, torch.Tensor] = {}
            for stat in sorted(self.needs, key=lambda name: name != "hessian"):  # the Hessian first:
                if stat == "col_sq_sum" and "hessian" in computed:                 # its diagonal is col_sq_sum
                    contribution = computed["hessian"].diagonal().clone()
                else:
                    contribution = STATISTICS[stat](x2d)
                computed[stat] = contribution
                for name in names:
                    values = self.stats[name].values
                    values[stat] = (REDUCTIONS.get(stat, torch.add)(values[stat], contribution) if stat in values
                                    else contribution.clone())
            for name in names:
                self.stats[name].tokens += x2d.shape[0]
        self._pending.clear()

    def close(self) -> dict[str, LayerStats]:
        """Remove the hooks and return the statistics per linear name."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.stats
