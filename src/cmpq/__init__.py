"""cmpq: channel-wise mixed-precision post-training quantization of LLMs, at any bit-width.

Importing cmpq registers `quant_method: "cmpq"` with transformers (so `AutoModelForCausalLM.from_pretrained`
loads saved cmpq models); everything else loads on first use.
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
    "load": "cmpq.packed.model_io",
    "save_quantized": "cmpq.packed.model_io",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cmpq' has no attribute '{name}'")


def _register_with_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # transformers is a dependency; tolerate its absence only for tooling imports
        return
    import_module("cmpq.packed.hf")


_register_with_transformers()
