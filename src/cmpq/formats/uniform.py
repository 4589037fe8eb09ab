"""The uniform format (RTN and GPTQ layers): the weight as quantized (`UniformQuantizedWeight`, with its honest
bit accounting) and as stored: codes row-packed in 16-row groups like CMPQ's (every column at the same width),
FP16 scales per (row, group) and zero-points at the code width as a bit stream. The code width and group size
are the method's options (config.json), so nothing else is stored per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpq.errors import FormatError
from cmpq.formats.base import FP16_BITS, BitBreakdown, PackedLinear, QuantizedWeight
from cmpq.formats.bitpack import pack_codes, pack_stream, padded_rows, unpack_codes, unpack_stream

TENSORS = ("codes", "scales", "zeros")


@dataclass
class UniformQuantizedWeight(QuantizedWeight):
    """Codes (out, in) uint8, with FP16 scale and integer zero per (row, group) of `group_size` columns."""

    codes: torch.Tensor
    scale: torch.Tensor   # (out, n_groups) float16
    zero: torch.Tensor    # (out, n_groups) uint8
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        out, cols = self.codes.shape
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)[:, :cols]
        zero = self.zero.float().repeat_interleave(self.group_size, dim=1)[:, :cols]
        return scale * (self.codes.float() - zero)

    def column_widths(self) -> torch.Tensor:
        return torch.full((self.codes.shape[1],), self.bits, dtype=torch.uint8)

    def storage(self) -> BitBreakdown:
        out, cols = self.codes.shape
        groups = self.scale.numel()
        # codes are stored in whole 16-row groups (bitpack.py)
        return BitBreakdown(weights=out * cols, codes=padded_rows(out) * cols * self.bits,
                            params=groups * (FP16_BITS + self.bits))


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
