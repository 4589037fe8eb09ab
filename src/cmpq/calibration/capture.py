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

from cmpq.errors import UnsupportedArchitectureError


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Block-0 inputs: hidden states (nsamples, seqlen, hidden) and the call's other arguments (shared by
    all windows, which all have the same length)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor) -> BlockInputs:
    """Run `model` on each row of `windows` (nsamples, seqlen) up to `first_block`; return what it received."""
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
        raise _Stop

    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for index in range(windows.shape[0]):
                try:
                    model(windows[index:index + 1], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if hidden is None:
        raise UnsupportedArchitectureError("the first transformer block was never called; the architecture table "
                                           "does not match this model")
    return BlockInputs(hidden=hidden, args=call["args"], kwargs=call["kwargs"])


def run_block(block: nn.Module, inputs: BlockInputs, hidden: torch.Tensor, out: torch.Tensor | None,
              after_each: Any = None) -> None:
    """Run `block` on each window of `hidden` (nsamples, seqlen, hidden), writing results into `out` if given
    and calling `after_each()` after every window (statistics flush)."""
    with torch.no_grad():
        for i in range(hidden.shape[0]):
            result = block(hidden[i:i + 1], *inputs.args, **inputs.kwargs)
            if isinstance(result, (tuple, list)):
                result = result[0]
            if out is not None:
                out[i] = result[0]
            if after_each is not None:
                after_each()
