"""What every quantized weight is and how its bits are counted: the interface the quantizers produce and the
stored formats implement.

`QuantizedWeight` is a quantized (out, in) matrix that can be dequantized and that reports every bit it stores
(PROTOCOL's honest accounting) as a `BitBreakdown`; `PackedLinear` is the base of the modules that compute
from a stored format's tensors. FP16 outliers in CSR are accounted here too (`sparse_bits`), since several
formats and in-memory methods keep them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

FP16_BITS = 16


@dataclass(frozen=True)
class BitBreakdown:
    """Bits stored for quantized weights, by kind; `bpw` is PROTOCOL's honest bits per weight."""

    weights: int = 0   # number of weights these bits represent
    codes: int = 0     # quantization codes
    params: int = 0    # codebooks, scales, zero-points
    outliers: int = 0  # outlier values kept in high precision
    indices: int = 0   # outlier column indices and row pointers
    maps: int = 0      # permutations, bit-width maps and other per-layer metadata

    @property
    def total(self) -> int:
        return self.codes + self.params + self.outliers + self.indices + self.maps

    @property
    def bpw(self) -> float:
        return self.total / self.weights if self.weights else 0.0

    @property
    def code_bpw(self) -> float:
        """Code bits per weight only: the convention of most papers, reported beside the honest number."""
        return self.codes / self.weights if self.weights else 0.0

    def __add__(self, other: "BitBreakdown") -> "BitBreakdown":
        return BitBreakdown(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "bpw": self.bpw, "code_bpw": self.code_bpw}


class QuantizedWeight(ABC):
    """A quantized (out_features, in_features) weight matrix."""

    shape: tuple[int, int]

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 weight the stored representation decodes to, shape (out_features, in_features)."""

    @abstractmethod
    def storage(self) -> BitBreakdown:
        """Every bit this representation stores, at the width it is stored with."""

    @abstractmethod
    def column_widths(self) -> torch.Tensor:
        """Code width of every input channel (in_features,), for inspection."""

    def outlier_count(self) -> int:
        """Weights kept outside the codes (in high precision)."""
        return 0

    def activation_hook(self):
        """A forward pre-hook quantizing the layer's input at inference (weight+activation methods such as
        SmoothQuant), or None for weight-only methods."""
        return None

    def summary(self) -> dict[str, Any]:
        """Per-layer facts for records and `cmpq inspect`: shape, width histogram, outliers, bit breakdown."""
        widths, counts = torch.unique(self.column_widths(), return_counts=True)
        return {"shape": list(self.shape), "widths": {str(int(w)): int(c) for w, c in zip(widths, counts)},
                "outliers": self.outlier_count(), "bits": self.storage().as_dict()}


def index_bits(max_value: int) -> int:
    """Width of the narrowest unsigned integer type (8, 16, 32 or 64 bits) that holds `max_value`."""
    for bits in (8, 16, 32, 64):
        if max_value < 2**bits:
            return bits
    raise ValueError(f"{max_value} does not fit in 64 bits")


def sparse_bits(rows: int, columns: int, nnz: int) -> tuple[int, int]:
    """(value bits, index bits) of FP16 outliers in CSR with the narrowest index types."""
    if nnz == 0:
        return 0, 0
    return nnz * FP16_BITS, nnz * index_bits(columns - 1) + (rows + 1) * index_bits(nnz)


class PackedLinear(nn.Module):
    """Base of the quantized linear modules: their buffers are the packed tensors, stored as they are."""

    _native = None

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` must not cast the packed tensors (FP16 codebooks stay FP16): they follow
        device moves only. The kernels' view is rebuilt on next use."""
        packed = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, buffer in packed.items():
            moved = self._buffers[name]
            if moved.dtype != buffer.dtype:
                self._buffers[name] = buffer.to(moved.device)
        self._native = None
        return self

    def validate(self, where: str = "layer") -> None:
        """Raise FormatError on any inconsistency of the stored tensors."""
        self.quantized_weight(where)

    def quantized_weight(self, where: str = "layer") -> QuantizedWeight:
        raise NotImplementedError

    def __getstate__(self):
        """Copies and pickles leave out the kernels' view: it holds raw pointers into this module's tensors."""
        return {**super().__getstate__(), "_native": None}

    def _load_from_state_dict(self, *args, **kwargs):
        self._native = None
        return super()._load_from_state_dict(*args, **kwargs)
