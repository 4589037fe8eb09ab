"""cmpq: channel-wise mixed-precision post-training quantization of LLMs, at any bit-width.

`import cmpq` is light: submodules (and torch/transformers) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "cmpq.models.load",
    "quantize_model": "cmpq.pipeline",
    "get_quantizer": "cmpq.quantizers",
    "CalibConfig": "cmpq.config",
    "EvalConfig": "cmpq.config",
    "perplexity": "cmpq.eval.perplexity",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cmpq' has no attribute '{name}'")
