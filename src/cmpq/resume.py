"""What a quantization run has finished, kept on disk so that a run killed at any point (SIGKILL included)
continues with `--resume` from its last finished block and writes byte-identical output.

A run's state lives in `$CMPQ_CACHE_DIR/resume/<fingerprint>/` (default `~/.cache/cmpq/resume`), the
fingerprint being a digest of everything that decides the output: the job's model, method, options,
calibration, head, fine-tuning and distillation settings, the thread setting, and the versions of cmpq and
torch. Each finished step (the distillation teacher, the model-wide width plan, every quantized block, the
head, the distilled values) is one file written atomically, so a kill leaves it complete or absent. What is not
stored is recomputed: the calibration inputs of the next block are rebuilt by running the stored blocks
again, which gives the same bits as the run that was stopped because every step is deterministic for a fixed
thread count. The state is removed once the run has saved its output.

Quantized weights are stored as their dataclass fields (tensors in safetensors, the rest as JSON), never as
pickles: a state directory can only ever hold tensors and plain values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from cmpq.atomic import atomic_write
from cmpq.errors import CmpqError
from cmpq.formats.base import QuantizedWeight

STATE_VERSION = 1
CACHE_DIR_ENV = "CMPQ_CACHE_DIR"
META = "__meta__"


def default_root() -> Path:
    """`$CMPQ_CACHE_DIR/resume`, else `~/.cache/cmpq/resume`."""
    root = os.environ.get(CACHE_DIR_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cmpq") / "resume"


def fingerprint(description: dict[str, Any]) -> str:
    """A short digest of a JSON-able description of everything that decides a run's output."""
    text = json.dumps({"state_version": STATE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- quantized weights as tensors + JSON ---------------------------------------------------------------------
def _encode(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON description of `value`, its tensors moved into `tensors` under names starting with `prefix`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().clone()
        return {"tensor": prefix}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), f"{prefix}.{f.name}", tensors)
                  for f in dataclasses.fields(value)}
        return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{prefix}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return {"list": [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise CmpqError(f"cannot store a {type(value).__name__} in a resume state")


def _decode(description: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in description:
        return tensors[description["tensor"]]
    if "class" in description:
        module, _, name = description["class"].partition(":")
        if not module.startswith("cmpq."):  # only this package's own dataclasses are ever rebuilt
            raise CmpqError(f"resume state names a foreign class {description['class']!r}")
        cls = getattr(importlib.import_module(module), name)
        if not dataclasses.is_dataclass(cls):
            raise CmpqError(f"resume state names {description['class']!r}, which is not a dataclass")
        return cls(**{k: _decode(v, tensors) for k, v in description["fields"].items()})
    if "dict" in description:
        return {k: _decode(v, tensors) for k, v in description["dict"].items()}
    if "tuple" in description:
        return tuple(_decode(v, tensors) for v in description["tuple"])
    if "list" in description:
        return [_decode(v, tensors) for v in description["list"]]
    return description["value"]


class RunState:
    """The finished steps of one run, by key, in `directory` (created on first save)."""

    def __init__(self, directory: Path, description: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.description = description

    @classmethod
    def for_run(cls, description: dict[str, Any], root: Path | None = None) -> "RunState":
        root = Path(root) if root is not None else default_root()
        return cls(root / fingerprint(description), description)

    def exists(self) -> bool:
        return (self.directory / "run.json").is_file()

    def finished(self) -> list[str]:
        """Keys of the steps on disk, in the order they were saved."""
        if not self.exists():
            return []
        return json.loads((self.directory / "run.json").read_text(encoding="utf-8")).get("steps", [])

    def start(self, resume: bool) -> None:
        """Begin the run: keep what a stopped run finished if `resume`, else start from nothing."""
        if not resume:
            self.clear()
        if not self.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_index([])

    def _write_index(self, steps: list[str]) -> None:
        text = json.dumps({"description": self.description, "steps": steps}, indent=1, default=str)
        atomic_write(self.directory / "run.json", lambda handle: handle.write(text.encode()))

    def has(self, key: str) -> bool:
        return key in self.finished()

    def save(self, key: str, value: Any) -> None:
        """Store `value` (tensors, quantized weights, dataclasses, dicts, lists and plain values) as step `key`."""
        tensors: dict[str, torch.Tensor] = {}
        description = _encode(value, "v", tensors)
        data = save(tensors, metadata={META: json.dumps(description)})
        atomic_write(self.directory / f"{key}.safetensors", lambda handle: handle.write(data))
        steps = [step for step in self.finished() if step != key]
        self._write_index([*steps, key])

    def load(self, key: str) -> Any:
        path = self.directory / f"{key}.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            description = json.loads(handle.metadata()[META])
        return _decode(description, load_file(str(path)))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def check_weights(layers: dict[str, Any]) -> dict[str, QuantizedWeight]:
    """`layers` as loaded, checked to be quantized weights (a state from another version is refused)."""
    for name, qw in layers.items():
        if not isinstance(qw, QuantizedWeight):
            raise CmpqError(f"resume state: {name} is not a quantized weight")
    return layers
