"""Per-layer activation statistics gathered by forward hooks, only those the quantizer asks for.

Statistics are sums over calibration tokens, accumulated in float64 (each window's contribution is computed
in float32, as GPTQ does);
methods normalise them as their paper does. Several linears that read the same input tensor (q/k/v,
gate/up) share one computation per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

# name -> function of the (tokens, in_features) float32 input, returning the per-forward contribution
STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "col_sq_sum": lambda x: (x.double() ** 2).sum(dim=0),       # sum_t x_tj^2, per input channel j
    "col_abs_sum": lambda x: x.double().abs().sum(dim=0),       # sum_t |x_tj|, per input channel j
    "hessian": lambda x: (x.T @ x).double(),                    # X^T X, (in, in)
}


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
    """Forward hooks on a set of linears that accumulate the requested statistics of their inputs.

    Hooks only keep a reference to each input; `flush()` (called after every block forward) computes each
    statistic once per distinct input tensor and adds it to every linear that read that tensor.
    """

    def __init__(self, linears: dict[str, nn.Linear], needs: frozenset[str]) -> None:
        unknown = sorted(set(needs) - set(STATISTICS))
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; known: {sorted(STATISTICS)}")
        self.needs = needs
        self.stats = {name: LayerStats() for name in linears}
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()
            self._pending[name] = (x, x._version)
        return hook

    def flush(self) -> None:
        groups: dict[tuple, list[str]] = {}
        for name, (x, version) in self._pending.items():
            if x._version != version:
                raise RuntimeError(f"the input of '{name}' was modified in place after the layer read it")
            groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(name)
        for names in groups.values():
            x = self._pending[names[0]][0]
            x2d = x.reshape(-1, x.shape[-1]).float()
            for stat in self.needs:
                contribution = STATISTICS[stat](x2d)
                for name in names:
                    values = self.stats[name].values
                    values[stat] = values[stat] + contribution if stat in values else contribution.clone()
            for name in names:
                self.stats[name].tokens += x2d.shape[0]
        self._pending.clear()

    def close(self) -> dict[str, LayerStats]:
        """Remove the hooks and return the statistics per linear name."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.stats
