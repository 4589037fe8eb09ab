"""Capture what the first transformer block receives, so blocks can then be run one at a time.

GPTQ's `Catcher` trick, as a forward pre-hook: run the model on each calibration window, record the
hidden states and keyword arguments (attention mask, rotary embeddings, ...) that block 0 is called with,
and stop the forward there. Everything before block 0 runs once; nothing after it runs at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cmpq.calibration.precision import compute_context
from cmpq.errors import UnsupportedArchitectureError
from cmpq.progress import stage
from cmpq.threads import adapt


class StopBlock(Exception):
    """Raised by a hook to end a block's forward early, once everything needed from it has been seen."""


@dataclass
class BlockInputs:
    """Block-0 inputs: hidden states (nsamples, seqlen, hidden) and the call's other arguments (shared by
    all windows, which all have the same length); `dtype`: the precision blocks are run in."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dtype: torch.dtype = torch.float32


def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> BlockInputs:
    """Run `model` on each row of `windows` (nsamples, seqlen) up to `first_block`; return what it received.
    `dtype` is the precision of these and all later block forwards (`precision.compute_context`)."""
    hidden: torch.Tensor | None = None
    call: dict[str, Any] = {}
    index = 0

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal hidden
        states = args[0] if args else kwargs.pop("hidden_states")
        if hidden is None:
            hidden = torch.empty((windows.shape[0], *states.shape[1:]), dtype=states.dtype)
            call["args"], call["kwargs"] = tuple(args[1:]), dict(kwargs)
        hidden[index] = states[0]
        raise StopBlock

    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad(), compute_context(dtype), stage("calibration forwards"):
            for index in range(windows.shape[0]):
                adapt()
                try:
                    model(windows[index:index + 1], use_cache=False)
                except StopBlock:
                    pass
    finally:
        handle.remove()
    if hidden is None:
        raise UnsupportedArchitectureError("the first transformer block was never called; the architecture table "
                                           "does not match this model")
    return BlockInputs(hidden=hidden, args=call["args"], kwargs=call["kwargs"], dtype=dtype)


def run_block(block: nn.Module, inputs: BlockInputs, hidden: torch.Tensor, out: torch.Tensor | None,
              after_each: Any = None) -> None:
    """Run `block` on each window of `hidden` (nsamples, seqlen, hidden), writing results into `out` if given
    and calling `after_each()` after every window (statistics flush). Without `out`, a hook may end each
    window's forward early by raising `StopBlock`."""
    with torch.no_grad(), compute_context(inputs.dtype), stage("calibration forwards"):
        for i in range(hidden.shape[0]):
            adapt()
            try:
                result = block(hidden[i:i + 1], *inputs.args, **inputs.kwargs)
            except StopBlock:
                if out is not None:
                    raise RuntimeError("a hook stopped a block forward whose outputs are needed") from None
                result = None
            if isinstance(result, (tuple, list)):
                result = result[0]
            if out is not None:
                out[i] = result[0]
            if after_each is not None:
                after_each()
