"""`--quantize-head BITS`: quantize the output projection (lm_head) too, reported apart from the blocks.

For a small model the head is a large share of decode time (smollm2: 49152 x 576, 28M of 135M weights, read
once per token). It is quantized with CMPQ's best setting at BITS (any width 1..8; with 49152-row columns a
256-entry codebook costs under 0.1 bpw, so 8 bits is nearly lossless). Its calibration statistic is the
input of the head over the same windows: the streaming engine (`pipeline.py`) runs the last quantized block
too and passes its outputs through the final norm (the logits themselves are never computed). A head tied to the input embeddings
is untied first: the embeddings stay as they were, only the head is stored quantized.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from cmpq.calibration.capture import StopBlock
from cmpq.calibration.precision import compute_context
from cmpq.calibration.stats import LayerStats, StatsRecorder
from cmpq.config import config_to_dict
from cmpq.errors import ConfigError, UnsupportedArchitectureError
from cmpq.formats.base import QuantizedWeight
from cmpq.quantizers.base import Quantizer, get_quantizer

HEAD_BIT_SET = (1, 2, 3, 4, 5, 6, 7, 8)


def head_quantizer(bits: float) -> Quantizer:
    """CMPQ (best preset, every width 1..8 allowed) at `bits` honest bits per weight for the head: a budget of
    its own (one layer, so the preset's model-wide budget does not apply)."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"--quantize-head must be between 1 and 8 bits per weight, got {bits}")
    value: float | int = int(bits) if float(bits).is_integer() else bits
    return get_quantizer("cmpq", preset="best", bits=value, bit_set=HEAD_BIT_SET, allocation_scope="layer",
                         scope_error="absolute")


def describe_head(name: str, qw: QuantizedWeight, quantizer: Quantizer) -> dict:
    """The quantized head's own accounting, for records and the saved `quantization_config` (PROTOCOL: reported
    apart from the blocks' bpw)."""
    storage = qw.storage()
    return {"name": name, "method": quantizer.name,
            "config": json.loads(json.dumps(config_to_dict(quantizer.config))),  # JSON types (tuples -> lists)
            "target_bits": quantizer.target_bits(), "bpw": storage.bpw, "bits": storage.as_dict(),
            "bytes": -(-storage.total // 8)}


def output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(module name, module) of the model's output projection."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedArchitectureError(f"the model's output head is {type(head).__name__}, not a linear layer; "
                                           f"--quantize-head cannot quantize it")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def untie(model: nn.Module, name: str, head: nn.Linear) -> None:
    """Give the head its own weight if it shares the input embeddings', and record that in the config so a
    saved model is loaded untied."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.data_ptr() == head.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers' {target: source} map, used by tie_weights()
    if isinstance(tied, dict):
        for target in [t for t in tied if t.startswith(f"{name}.")]:
            del tied[target]


def head_stats(final: list[nn.Module], name: str, head: nn.Linear, needs: frozenset[str], hidden: torch.Tensor,
               dtype: torch.dtype) -> LayerStats:
    """Statistics of the head's input over the calibration windows, from the last block's outputs `hidden`
    (nsamples, seqlen, hidden) through the `final` modules (norm); the head itself is never run."""
    recorder = StatsRecorder({name: head}, needs, stop_early=True)
    try:
        with torch.no_grad(), compute_context(dtype):
            for index in range(hidden.shape[0]):
                x = hidden[index:index + 1]
                for module in final:
                    x = module(x)
                try:
                    head(x)
                except StopBlock:
                    pass
                recorder.flush()
    finally:
        stats = recorder.close()
    return stats[name]


def quantize_head(model: nn.Module, final: list[nn.Module], quantizer: Quantizer, hidden: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[str, QuantizedWeight]:
    """Quantize the output head of `model` in place (weight replaced by its dequantized value), with statistics
    from `hidden`, the last block's outputs over the calibration windows; returns its name and quantized
    weight."""
    name, head = output_head(model)
    needs = quantizer.needs()
    if needs and hidden is None:
        raise ConfigError("quantizing the head needs calibration windows")
    untie(model, name, head)
    stats = head_stats(final, name, head, needs, hidden, dtype) if needs else LayerStats()
    qw = quantizer.quantize(head.weight.data.float(), stats, name)
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    return name, qw


def install_head(model: nn.Module, qw: QuantizedWeight) -> str:
    """Put a head quantized earlier (by `quantize_head` on this model, e.g. in a run being resumed) in place,
    untied as `quantize_head` leaves it; returns its name."""
    name, head = output_head(model)
    untie(model, name, head)
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    return name
