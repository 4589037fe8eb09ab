"""Typed, self-validating configuration dataclasses shared by the library and the CLI.

Every config validates itself on construction and names the offending field, so a bad value fails before
any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpq.calibration.precision import CALIB_DTYPES
from cmpq.errors import ConfigError

PROTOCOLS = ("quick", "full")
EVAL_DATASETS = ("wikitext2", "c4")


def check(condition: bool, field: str, message: str, value: Any) -> None:
    """Raise ConfigError naming `field` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message} (got {value!r})")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass, for JSON records."""
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration tokens to use. `source` is c4 | c4-chat | wikitext2 | a path to a UTF-8 text file."""

    source: str = "c4"
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    dtype: str = "auto"  # precision of the calibration forwards: auto | float32 | bfloat16 (calibration/precision.py)

    def __post_init__(self) -> None:
        check(isinstance(self.nsamples, int) and self.nsamples >= 1, "calib.nsamples", "must be an integer >= 1",
              self.nsamples)
        check(isinstance(self.seqlen, int) and self.seqlen >= 2, "calib.seqlen", "must be an integer >= 2",
              self.seqlen)
        check(isinstance(self.source, str) and self.source != "", "calib.source", "must be a non-empty string",
              self.source)
        check(self.dtype in CALIB_DTYPES, "calib.dtype", f"must be one of {CALIB_DTYPES}", self.dtype)

    @classmethod
    def quick(cls, source: str = "c4") -> "CalibConfig":
        """PROTOCOL's quick calibration: 32 windows of 512 tokens."""
        return cls(source=source, nsamples=32, seqlen=512)


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity evaluation: datasets, protocol (quick = first 16 windows) and window length."""

    datasets: tuple[str, ...] = EVAL_DATASETS
    protocol: str = "quick"
    seqlen: int = 2048
    quick_windows: int = 16

    def __post_init__(self) -> None:
        check(self.protocol in PROTOCOLS, "eval.protocol", f"must be one of {PROTOCOLS}", self.protocol)
        check(isinstance(self.seqlen, int) and self.seqlen >= 2, "eval.seqlen", "must be an integer >= 2", self.seqlen)
        check(isinstance(self.quick_windows, int) and self.quick_windows >= 1, "eval.quick_windows",
              "must be an integer >= 1", self.quick_windows)
        check(isinstance(self.datasets, (tuple, list)), "eval.datasets", "must be a tuple of dataset names",
              self.datasets)
        for name in self.datasets:
            check(name in EVAL_DATASETS or Path(name).expanduser().is_file(), "eval.datasets",
                  f"each must be one of {EVAL_DATASETS} or an existing text file", name)

    @property
    def max_windows(self) -> int | None:
        return self.quick_windows if self.protocol == "quick" else None
