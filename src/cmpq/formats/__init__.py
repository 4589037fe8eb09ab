"""The stored formats of quantized layers, one module each (`cmpq.py`, `uniform.py`), and the registry that finds
a format by the layer type it stores, by the method that writes it, or by the module that runs it.

A format owns its weight type (what a quantizer returns, with its honest bit accounting), the packing of that
weight into named tensors, the checks and parsing of those tensors, and the `nn.Module` that computes from them.
Saving (`cmpq.packed.model_io`) and loading through transformers (`cmpq.packed.hf`) only go through this
registry, so adding a format means adding one module and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from cmpq.errors import FormatError
from cmpq.formats.base import PackedLinear, QuantizedWeight
from cmpq.formats.cmpq import LAYER_TENSORS as CMPQ_TENSORS
from cmpq.formats.cmpq import CMPQLinear, CMPQWeight, pack_cmpq
from cmpq.formats.uniform import TENSORS as UNIFORM_TENSORS
from cmpq.formats.uniform import UniformLinear, UniformQuantizedWeight, pack_uniform


@dataclass(frozen=True)
class Format:
    """One stored layer format: the weight type it stores, the methods that write it, its tensor names, how a
    weight is packed, and how an empty module (buffers shaped as in the file, filled by the loader) is built."""

    name: str
    weight_type: type[QuantizedWeight]
    module_type: type[PackedLinear]
    methods: tuple[str, ...]
    tensors: tuple[str, ...]
    pack: Callable[[QuantizedWeight], dict[str, torch.Tensor]]
    empty_module: Callable[[nn.Linear, dict[str, torch.Tensor], torch.Tensor | None, dict], PackedLinear]


def _empty_cmpq(linear: nn.Linear, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                options: dict) -> PackedLinear:
    return CMPQLinear(linear.in_features, linear.out_features, tensors, bias)


def _empty_uniform(linear: nn.Linear, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                   options: dict) -> PackedLinear:
    group = options.get("group_size") or linear.in_features  # GPTQ's grids are static or per stored group too
    return UniformLinear(linear.in_features, linear.out_features, tensors, int(options["bits"]),
                         min(int(group), linear.in_features), bias)


FORMATS: tuple[Format, ...] = (
    Format("cmpq", CMPQWeight, CMPQLinear, ("cmpq",), CMPQ_TENSORS, pack_cmpq, _empty_cmpq),
    Format("uniform", UniformQuantizedWeight, UniformLinear, ("rtn", "gptq"), UNIFORM_TENSORS, pack_uniform,
           _empty_uniform),
)
SAVEABLE_METHODS: tuple[str, ...] = tuple(m for f in FORMATS for m in f.methods)
LAYER_TENSORS: tuple[str, ...] = tuple(dict.fromkeys(t for f in FORMATS for t in f.tensors))
QUANTIZED_MODULES: tuple[type[PackedLinear], ...] = tuple(f.module_type for f in FORMATS)


def for_weight(weight: QuantizedWeight) -> Format:
    """The format that stores `weight`; FormatError for in-memory-only representations (AWQ's scaled grids...)."""
    for fmt in FORMATS:
        if type(weight) is fmt.weight_type:
            return fmt
    raise FormatError(f"layers of type {type(weight).__name__} have no stored format (saveable methods: "
                      f"{', '.join(SAVEABLE_METHODS)})")


def for_method(method: str, where: str = "checkpoint") -> Format:
    """The format a saved model's `method` wrote; FormatError naming `where` for any other."""
    for fmt in FORMATS:
        if method in fmt.methods:
            return fmt
    raise FormatError(f"{where}: layers of method '{method}' cannot be loaded by this cmpq")


__all__ = ["FORMATS", "Format", "LAYER_TENSORS", "QUANTIZED_MODULES", "SAVEABLE_METHODS", "for_method",
           "for_weight"]
