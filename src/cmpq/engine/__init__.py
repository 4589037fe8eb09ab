"""The native engine: a whole forward of a LLaMA-shaped model (LLaMA, Mistral, Qwen2) in one native call per
token, over the packed CMPQ layers and float layers of a loaded model in place (the C side: kernels/engine.c).

`unsupported(model)` says why the engine cannot run a model (None when it can); `engine_for` builds one;
`choose` applies a user's `--engine` choice: "native" runs the engine where it covers the model and falls back to
the PyTorch path with a one-line notice where it does not, "torch" always takes the PyTorch path.
"""

from __future__ import annotations

import sys

import torch.nn as nn

from cmpq.errors import ConfigError

ENGINES = ("native", "torch")
FAMILIES = ("llama", "mistral", "qwen2")
# rotary variants whose frequencies do not depend on the sequence length (the engine takes them as computed)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DEFAULT_CONTEXT = 8192


def unsupported(model: nn.Module) -> str | None:
    """Why the engine cannot run `model`, or None."""
    from cmpq.formats.cmpq import CMPQLinear
    from cmpq.kernels import native as kernels

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in FAMILIES:
        return f"the native engine runs {', '.join(FAMILIES)} models, not {model_type}"
    if kernels.library() is None:
        return "the native kernels are not built"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the native engine runs SiLU MLPs, not {config.hidden_act}"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is None or rope_type not in ROPE_TYPES:
        return f"the native engine does not run '{rope_type}' rotary embeddings"
    from cmpq.engine.native import BLOCK_LINEARS

    for i, layer in enumerate(model.model.layers):
        for name in BLOCK_LINEARS:
            module = layer.get_submodule(name)
            if not isinstance(module, (CMPQLinear, nn.Linear)):
                return f"the native engine runs CMPQ and float layers, not {type(module).__name__} (block {i} {name})"
    if not isinstance(model.lm_head, (CMPQLinear, nn.Linear)):
        return f"the native engine runs CMPQ and float heads, not {type(model.lm_head).__name__}"
    return None


def engine_for(model: nn.Module, context: int | None = None, threads: int | None = None, isa: str | None = None):
    """An `Engine` for `model` with a KV cache of `context` positions (default: the model's maximum, at most
    DEFAULT_CONTEXT); ConfigError where the engine does not cover the model."""
    from cmpq.engine.native import Engine
    from cmpq.kernels import native as kernels

    reason = unsupported(model)
    if reason:
        raise ConfigError(reason)
    limit = int(getattr(model.config, "max_position_embeddings", DEFAULT_CONTEXT) or DEFAULT_CONTEXT)
    context = min(limit, DEFAULT_CONTEXT) if context is None else int(context)
    if context < 1:
        raise ConfigError(f"the engine's context must be at least 1 token, got {context}")
    return Engine(model, context, kernels.isa_code(isa), threads)


def choose(model: nn.Module, engine: str = "native", context: int | None = None, threads: int | None = None,
           quiet: bool = False):
    """The `Engine` to run `model` with under a user's choice, or None for the PyTorch path (with "native" on a
    model the engine does not cover, a one-line notice on stderr says why)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
    if engine == "torch":
        return None
    reason = unsupported(model)
    if reason:
        if not quiet:
            print(f"note: {reason}; using the PyTorch path", file=sys.stderr)
        return None
    return engine_for(model, context, threads)


def attach(loaded, engine: str = "native", context: int | None = None, threads: int | None = None,
           quiet: bool = False):
    """`loaded` (a LoadedModel) with `loaded.engine` set by `choose`; returns it."""
    loaded.engine = choose(loaded.model, engine, context, threads, quiet)
    return loaded
