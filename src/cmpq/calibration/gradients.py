"""Gradients of the calibration loss w.r.t. every quantized weight, for methods that weigh by them.

SqueezeLLM weights its k-means by the Fisher information diagonal (the sum over calibration sequences of the
squared gradient of the loss), LLM-MQ estimates a layer's loss increase from the gradient itself. Both need
a backward pass through the whole float model, which the block-by-block engine cannot give.

Memory stays bounded: one calibration window at a time (its activations are freed after its backward), only
the requested linears' weights require gradients (embeddings, norms and the head get none), and each
statistic is one float32 accumulator the size of those weights. For smollm2-135m: 425 MB per statistic on
top of the model, whatever the number of windows, plus the same again for the `.grad` tensors during each
backward pass (freed right after it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cmpq.calibration.precision import compute_context
from cmpq.calibration.stats import GRADIENT_STATISTICS
from cmpq.progress import bar, stage
from cmpq.threads import adapt


def gradient_statistics(model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor,
                        needs: frozenset[str], dtype: torch.dtype = torch.float32,
                        progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {statistic: (out, in) float32}} over the calibration windows (nsamples, seqlen):
    `grad_sum` = sum of the per-window gradients of the mean token loss, `grad_sq_sum` = sum of their
    squares (the empirical Fisher diagonal). The model's weights and requires_grad flags are left as found."""
    unknown = sorted(set(needs) - set(GRADIENT_STATISTICS))
    if unknown:
        raise ValueError(f"unknown gradient statistics {unknown}; known: {list(GRADIENT_STATISTICS)}")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    sums = {name: {stat: torch.zeros_like(linear.weight, dtype=torch.float32) for stat in needs}
            for name, linear in linears.items()}
    try:
        with stage("gradient pass"):
            _accumulate(model, linears, windows, needs, dtype, progress, sums)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
    return sums


def _accumulate(model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor, needs: frozenset[str],
                dtype: torch.dtype, progress: bool, sums: dict[str, dict[str, torch.Tensor]]) -> None:
    """One backward pass per window, the gradients of `linears` added into `sums`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    for index in bar(range(windows.shape[0]), desc="gradients", unit="window", disable=not progress):
        adapt()
        window = windows[index:index + 1]
        with torch.enable_grad():  # library callers often quantize under torch.no_grad()
            with compute_context(dtype):
                loss = model(window, labels=window, use_cache=False).loss
            loss.backward()
        for name, linear in linears.items():
            grad = linear.weight.grad.float()
            if "grad_sum" in needs:
                sums[name]["grad_sum"] += grad
            if "grad_sq_sum" in needs:
                sums[name]["grad_sq_sum"].addcmul_(grad, grad)
            linear.weight.grad = None
