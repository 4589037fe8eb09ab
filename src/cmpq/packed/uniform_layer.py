"""A uniform (RTN-style) layer as stored: codes as bit planes (as CMPQ's, every column at the same width), FP16
scales per (row, group) and zero-points at the code width as a bit stream. The code width and group size are
the method's options (config.json), so nothing else is stored per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpq.errors import FormatError
from cmpq.packed.cmpq_layer import PackedLinear
from cmpq.packed.codes import pack_codes, pack_stream, unpack_codes, unpack_stream
from cmpq.quantizers.rtn import UniformQuantizedWeight

TENSORS = ("codes", "scales", "zeros")


def pack_uniform(qw: UniformQuantizedWeight) -> dict[str, torch.Tensor]:
    columns = qw.codes.shape[1]
    return {"codes": pack_codes(qw.codes, torch.full((columns,), qw.bits)),
            "scales": qw.scale.half().contiguous(),
            "zeros": pack_stream(qw.zero.flatten(), qw.bits)}


def unpack_uniform(tensors: dict[str, torch.Tensor], out_features: int, in_features: int, bits: int,
                   group_size: int, where: str = "layer") -> UniformQuantizedWeight:
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise FormatError(f"{where}: missing tensors {missing}")
    groups = math.ceil(in_features / group_size)
    scales = tensors["scales"]
    if scales.dtype != torch.float16 or tuple(scales.shape) != (out_features, groups):
        raise FormatError(f"{where}: scales of shape {tuple(scales.shape)} ({scales.dtype}), expected "
                          f"{(out_features, groups)} float16")
    try:
        codes = unpack_codes(tensors["codes"], torch.full((in_features,), bits), out_features)
        zeros = unpack_stream(tensors["zeros"], bits, out_features * groups).view(out_features, groups)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None
    return UniformQuantizedWeight(codes=codes.to(torch.uint8), scale=scales, zero=zeros.to(torch.uint8), bits=bits,
                                  group_size=group_size)


class UniformLinear(PackedLinear):
    """nn.Linear's drop-in from packed uniform tensors; dequantizes and calls F.linear."""

    def __init__(self, in_features: int, out_features: int, tensors: dict[str, torch.Tensor], bits: int,
                 group_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, qw: UniformQuantizedWeight, bias: torch.Tensor | None = None) -> "UniformLinear":
        rows, columns = qw.shape
        return cls(columns, rows, pack_uniform(qw), qw.bits, qw.group_size, bias)

    def quantized_weight(self, where: str = "layer") -> UniformQuantizedWeight:
        return unpack_uniform(dict(self.named_buffers(recurse=False)), self.out_features, self.in_features,
                              self.bits, self.group_size, where)

    def dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"
