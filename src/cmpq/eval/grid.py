"""Keys of measured configurations, so grids (`cmpq compare`, benchmark tables) skip cells already stored.

A cell is (model, method, its full config, calibration tokens, protocol); a stored record is matched to a cell
by rebuilding its config through the method's current Config, so records written before a field was added
still match cells that use that field's default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cmpq.calibration.precision import resolve_dtype
from cmpq.config import CalibConfig, config_to_dict
from cmpq.errors import CmpqError
from cmpq.quantizers import get_quantizer


def jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON types (tuples become lists), as records store it."""
    return json.loads(json.dumps(config_to_dict(config)))


def _canonical(value: Any) -> Any:
    """Integer-valued floats as ints, so `--bits 3` and `--bits 3.0` are the same cell."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _key(model: str, method: str, config: dict | None, calib: list | None, protocol: str | None,
         head: dict | None = None, distill: int = 0) -> str:
    """`head`: the quantized output head's config (`--quantize-head`), None when the head stays float;
    `distill`: epochs of end-to-end distillation (in the key only when there were some, so that records of
    runs without it keep their key)."""
    fields = {"model": model, "method": method, "config": config, "calib": calib, "protocol": protocol, "head": head}
    if distill:
        fields["distill"] = distill
    return json.dumps(_canonical(fields), sort_keys=True)


@dataclass(frozen=True)
class Cell:
    """One configuration to measure: `method` "float" or a registered quantizer with its options, and the
    epochs of end-to-end distillation after it (`--distill`)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    distill: int = 0

    def full_options(self) -> dict[str, Any] | None:
        """Every field of the method's config (JSON types), or None for the float model."""
        return None if self.method == "float" else jsonable(get_quantizer(self.method, **self.options).config)

    def key(self, model: str, calib: CalibConfig, protocol: str) -> str:
        if self.method == "float":
            return _key(model, "float", None, None, protocol)
        quantizer = get_quantizer(self.method, **self.options)
        used = [calib.source, calib.nsamples, calib.seqlen, calib.seed,
                str(resolve_dtype(calib.dtype)).removeprefix("torch.")] if quantizer.calibration_needs() else None
        return _key(model, self.method, jsonable(quantizer.config), used, protocol, distill=self.distill)


def record_key(record: dict[str, Any]) -> str:
    """The key of a stored record (see the module docstring)."""
    calib = record.get("calibration") or {}
    config = record.get("config")
    if config is not None:
        try:
            config = jsonable(get_quantizer(record["method"], **config).config)
        except CmpqError:
            pass  # a field that no longer exists: the record matches no current cell
    used = [calib["source"], calib["nsamples"], calib["seqlen"], calib["seed"],
            calib.get("resolved_dtype", "float32")] if calib.get("used") else None  # float32: before bf16 existed
    head = (record.get("head") or {}).get("config")
    distill = (calib.get("distill") or {}).get("epochs", 0)
    return _key(record["model"], record["method"], config, used, record["protocol"], head, distill)
