"""The one interface every quantization method implements, and the registry that finds methods by name.

A method is a `Quantizer` subclass with a typed `Config` dataclass. Given one layer's weight and the
calibration statistics it asked for (`needs`), it returns a `QuantizedWeight` that can be dequantized for
evaluation and reports every bit it would store (PROTOCOL's honest accounting) as a `BitBreakdown`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError

FP16_BITS = 16
BUDGET_TOLERANCE_BPW = 0.02  # PROTOCOL: a bits target means honest bpw at most the target and within 0.02 of it


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


class Quantizer(ABC):
    """A quantization method: `Config` is its typed config, `quantize` handles one linear layer."""

    name: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named option sets, e.g. "paper"
    default_preset: ClassVar[str | None] = None          # what the CLI applies when no --preset is given

    def __init__(self, config: Any = None) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: expected a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def needs(self) -> frozenset[str]:
        """Names of the calibration statistics (see `cmpq.calibration.stats.STATISTICS`) this method reads.

        The engine gathers only these; a method that needs none is quantized without calibration passes.
        """
        return frozenset()

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> QuantizedWeight:
        """Quantize one float weight (out_features, in_features) given its layer's statistics; `name` is the
        layer's full module name (used by methods that planned per layer in `plan`)."""

    def measures_model(self) -> bool:
        """Whether the engine must first show this method every layer (`measure`) and call `plan` before
        quantizing, e.g. to share one bit budget across the whole model."""
        return False

    def measure_needs(self) -> frozenset[str]:
        """Statistics the measuring pass must gather (by default the same as `needs`)."""
        return self.needs()

    def gradient_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The calibration windows the backward pass for gradient statistics runs on (by default all of them;
        a method that needs only coarse gradient information may take fewer, since the pass is costly)."""
        return windows

    def calibration_needs(self) -> frozenset[str]:
        """Every statistic this configuration reads, in either pass: calibration data is needed iff non-empty."""
        return self.needs() | (self.measure_needs() if self.measures_model() else frozenset())

    def measure(self, name: str, weight: torch.Tensor, stats: LayerStats) -> None:
        """Record what `plan` needs about one layer (float weights, statistics of the float model)."""

    def plan(self) -> None:
        """Decide model-wide choices from everything `measure` recorded."""

    def target_bits(self) -> float | None:
        """The honest bits-per-weight target this configuration promises to meet (PROTOCOL: at most the target
        and within 0.02), or None for fixed formats such as RTN whose `bits` is a code width."""
        return None


QUANTIZERS: dict[str, type[Quantizer]] = {}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator adding a quantizer to the registry under `cls.name`."""
    if cls.name in QUANTIZERS:
        raise ValueError(f"quantizer '{cls.name}' is registered twice")
    QUANTIZERS[cls.name] = cls
    return cls


def get_quantizer(name: str, preset: str | None = None, **config_fields: Any) -> Quantizer:
    """Build the registered quantizer `name` from an optional preset overridden by `config_fields`."""
    if name not in QUANTIZERS:
        raise ConfigError(f"method: unknown quantization method '{name}'; available: {', '.join(sorted(QUANTIZERS))}")
    cls = QUANTIZERS[name]
    if preset is not None:
        if preset not in cls.presets:
            raise ConfigError(f"{name}: no preset '{preset}' (presets: {', '.join(cls.presets) or 'none'})")
        config_fields = {**cls.presets[preset], **config_fields}
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config_fields) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(known)}")
    return cls(cls.Config(**config_fields))
