"""The one interface every quantization method implements, and the registry that finds methods by name.

A method is a `Quantizer` subclass with a typed `Config` dataclass. Given one layer's weight and the
calibration statistics it asked for (`needs`), it returns a `QuantizedWeight` (`cmpq.formats`) that can be
dequantized for evaluation and reports every bit it would store (PROTOCOL's honest accounting). Quantizers
depend on the formats, never the reverse.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError
from cmpq.formats.base import QuantizedWeight

BUDGET_TOLERANCE_BPW = 0.02  # PROTOCOL: a bits target means honest bpw at most the target and within 0.02 of it


@dataclass(frozen=True)
class Preset:
    """A named setting of a method, defined once: its config options, and the epochs of end-to-end distillation
    (`cmpq.training.distill`) that a quantization job runs after it unless told otherwise. `get_quantizer(name,
    preset=...)`, `cmpq quantize --preset` and `cmpq compare` all read it from here."""

    options: Mapping[str, Any] = field(default_factory=dict)
    distill_epochs: int = 0


class Quantizer(ABC):
    """A quantization method: `Config` is its typed config, `quantize` handles one linear layer."""

    name: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, Preset]] = {}  # named settings, e.g. "paper"
    default_preset: ClassVar[str | None] = None  # what a quantization job applies when it names no preset

    def __init__(self, config: Any = None) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: expected a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.preset: str | None = None  # the preset `get_quantizer` built the config from (None: Config defaults)

    @classmethod
    def merge_options(cls, preset: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
        """A preset's options overridden by the caller's; a method whose options depend on each other (an
        override that makes a preset value meaningless) adjusts them here, for every caller alike."""
        return {**preset, **fields}

    def distill_epochs(self) -> int:
        """Epochs of end-to-end distillation that this method's preset asks for after quantizing (0: none)."""
        return self.presets[self.preset].distill_epochs if self.preset else 0

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

    def plan_state(self) -> dict[str, Any] | None:
        """What `plan` decided, as tensors and plain values, for a run to resume without measuring again
        (`cmpq.resume`); None if this method cannot give it (a resumed run then measures again)."""
        return None

    def restore_plan(self, state: dict[str, Any]) -> None:
        """Take a plan given by `plan_state` instead of measuring."""
        raise NotImplementedError(f"{self.name} cannot restore a plan")

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
        config_fields = cls.merge_options(cls.presets[preset].options, config_fields)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config_fields) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(known)}")
    quantizer = cls(cls.Config(**config_fields))
    quantizer.preset = preset
    return quantizer
