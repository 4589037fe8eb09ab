"""Block-wise fine-tuning of the stored values (codebook entries, outlier values), the codes kept fixed.

After a block's linears are quantized, its outputs on the calibration windows drift from the float block's.
A lookup-quantized weight is theta[index] with index fixed by the codes (`CMPQWeight.lookup_values`), so the
values theta can be trained by gradient descent on the block's output error, as AQLM fine-tunes its
codebooks, one block at a time here so memory stays a few activation buffers. The loss sees the whole block
(attention, SwiGLU, the residual), so errors of one linear can be absorbed by another's values; a per-layer
least-squares refit of the same values gave no perplexity gain. The file format, the bit accounting and the kernels are unchanged: only the values move.
The result is kept only if the block's error on the calibration windows falls after the values are rounded
as they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from cmpq.calibration.capture import BlockInputs
from cmpq.config import check
from cmpq.formats.base import QuantizedWeight

TARGETS = ("block", "model")


@dataclass(frozen=True)
class FinetuneConfig:
    """epochs: passes over the calibration windows per block (0 = off); lr: Adam's step size, in units of
    each layer's weight RMS (values of small and large layers move alike); windows_per_step: windows whose
    gradients are summed per optimizer step; target: what the block's outputs should match, "block" = the float
    block on the same (quantized-model) inputs, "model" = the float model's hidden states after this block, so
    that a block can also correct the drift of the blocks before it."""

    epochs: int = 0
    lr: float = 1e-3
    windows_per_step: int = 1
    target: str = "block"

    def __post_init__(self) -> None:
        check(isinstance(self.epochs, int) and self.epochs >= 0, "finetune.epochs", "must be an integer >= 0",
              self.epochs)
        check(isinstance(self.lr, (int, float)) and self.lr > 0, "finetune.lr", "must be a positive number",
              self.lr)
        check(self.target in TARGETS, "finetune.target", f"must be one of {TARGETS}", self.target)
        check(isinstance(self.windows_per_step, int) and self.windows_per_step >= 1, "finetune.windows_per_step",
              "must be an integer >= 1", self.windows_per_step)


def enabled(config: FinetuneConfig | None) -> bool:
    """Whether `config` asks for any fine-tuning."""
    return config is not None and config.epochs > 0


def tunable(layer: QuantizedWeight) -> bool:
    """Whether a quantized weight exposes its stored values (`stored_values` / `weight_from_values` /
    `with_values`)."""
    return all(hasattr(layer, name) for name in ("stored_values", "weight_from_values", "with_values"))


def rms(t: torch.Tensor) -> float:
    """Root mean square (at least 1e-8): the unit of the step sizes, so small and large tensors move alike."""
    return float(t.detach().float().square().mean().sqrt().clamp(min=1e-8))


class StoredValues:
    """The stored values of lookup-quantized layers as trainable tensors: each weight is theta[index] with the
    index fixed by the codes (`CMPQWeight.lookup_values`, computed by `weight_from_values`). Shared by block
    fine-tuning and `cmpq.training.distill`."""

    def __init__(self, layers: dict[str, QuantizedWeight]) -> None:
        self.layers = layers
        self.params = {name: nn.Parameter(qw.stored_values().clone()) for name, qw in layers.items()}

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: step size `lr` in units of each layer's weight RMS."""
        return [{"params": [self.params[n]], "lr": lr * rms(qw.dequantize())} for n, qw in self.layers.items()]

    def weights(self) -> dict[str, torch.Tensor]:
        """{name.weight: theta[index]} (float32, differentiable in theta)."""
        return {f"{n}.weight": self.layers[n].weight_from_values(p) for n, p in self.params.items()}

    def rounded(self) -> dict[str, QuantizedWeight]:
        """The layers holding the current values, rounded as they are stored."""
        return {name: qw.with_values(self.params[name].detach()) for name, qw in self.layers.items()}


def _output(block: nn.Module, weights: dict[str, torch.Tensor], inputs: BlockInputs,
            window: torch.Tensor) -> torch.Tensor:
    """The block's output for one window, `weights` (name.weight -> tensor) replacing its own, each cast to the
    dtype of the weight it replaces: the forwards run in the model's own precision."""
    weights = {name: value.to(block.get_parameter(name).dtype) for name, value in weights.items()}
    result = functional_call(block, weights, (window[None].to(_dtype(block)), *inputs.args), dict(inputs.kwargs),
                             strict=False)
    return (result[0] if isinstance(result, (tuple, list)) else result)[0].float()


def _dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def block_error(block: nn.Module, weights: dict[str, torch.Tensor], inputs: BlockInputs, hidden: torch.Tensor,
                target: torch.Tensor) -> float:
    """sum over windows of ||block(window) - target||^2 / ||target||^2, with `weights` replacing parameters."""
    with torch.no_grad():
        return sum(float((_output(block, weights, inputs, hidden[i]) - target[i]).square().sum()
                         / target[i].square().sum().clamp(min=1e-30)) for i in range(hidden.shape[0]))


def finetune_block(block: nn.Module, layers: dict[str, QuantizedWeight], inputs: BlockInputs,
                   hidden: torch.Tensor, target: torch.Tensor, config: FinetuneConfig,
                   seed: int = 0) -> tuple[dict[str, QuantizedWeight], float, float, bool]:
    """Train the stored values of `layers` (name inside `block` -> quantized weight) so that `block` maps the
    windows `hidden` (n, seqlen, d) to `target` (`FinetuneConfig.target`: the float block's outputs on these
    windows, or the float model's states after this block). Returns the layers to keep (fine-tuned and
    rounded, or the originals when that does not lower the error), the error before and with the fine-tuned
    values (`block_error`), and whether they were kept."""
    layers = {name: qw for name, qw in layers.items() if tunable(qw)}
    frozen = {f"{name}.weight": qw.dequantize() for name, qw in layers.items()}
    before = block_error(block, frozen, inputs, hidden, target)
    if config.epochs == 0 or not layers:
        return layers, before, before, False
    values = StoredValues(layers)
    trainable = [p for p in block.parameters() if p.requires_grad]
    for parameter in trainable:  # only the stored values train; the block's own weights stay as they are
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad():  # also when the caller quantizes under torch.no_grad()
            _train(block, values, inputs, hidden, target, config, seed)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    tuned = values.rounded()
    after = block_error(block, {f"{n}.weight": qw.dequantize() for n, qw in tuned.items()}, inputs, hidden, target)
    return (tuned, before, after, True) if after < before else (layers, before, after, False)


def _train(block: nn.Module, values: StoredValues, inputs: BlockInputs, hidden: torch.Tensor, target: torch.Tensor,
           config: FinetuneConfig, seed: int) -> None:
    """Adam on sum_i ||block(hidden_i) - target_i||^2 / ||target_i||^2 over the stored values."""
    optimizer = torch.optim.Adam(values.param_groups(config.lr))
    generator = torch.Generator().manual_seed(seed)
    norms = target.square().sum(dim=(1, 2)).clamp(min=1e-30)
    for _ in range(config.epochs):
        order = torch.randperm(hidden.shape[0], generator=generator).tolist()
        for start in range(0, len(order), config.windows_per_step):
            optimizer.zero_grad(set_to_none=True)
            for i in order[start:start + config.windows_per_step]:
                loss = (_output(block, values.weights(), inputs, hidden[i]) - target[i]).square().sum() / norms[i]
                loss.backward()
            optimizer.step()
