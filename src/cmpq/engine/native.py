"""The native engine's ctypes side: the structs of engine.h filled from a loaded transformers model, and `Engine`,
one model's KV cache and forward calls.

The structs point at the model's own tensors (packed layers through their `PreparedLayer`, float layers through
their float32 weights), so an `Engine` holds the model alive and copies nothing it can read in place; float
layers stored in another dtype are converted once to float32.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from cmpq.errors import ConfigError
from cmpq.kernels import native as kernels

LINEAR_ABSENT, LINEAR_FLOAT, LINEAR_CMPQ = 0, 1, 2
_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
STATUS = {-1: "the engine was given an inconsistent model or arguments", -2: "out of memory",
          -3: "a token id outside the vocabulary", -4: "past the engine's context"}


class Linear(ctypes.Structure):
    """`cmpq_linear_t` of engine.h."""

    _fields_ = [("kind", _i64), ("rows", _i64), ("cols", _i64), ("weight", _ptr),
                ("packed", ctypes.POINTER(kernels.CMPQLayer)), ("bias", _ptr)]


class Block(ctypes.Structure):
    """`cmpq_block_t` of engine.h."""

    _fields_ = [("q", Linear), ("k", Linear), ("v", Linear), ("o", Linear), ("gate", Linear), ("up", Linear),
                ("down", Linear), ("attn_norm", _ptr), ("mlp_norm", _ptr), ("sliding_window", _i64)]


class Model(ctypes.Structure):
    """`cmpq_model_t` of engine.h."""

    _fields_ = [("n_blocks", _i64), ("hidden", _i64), ("intermediate", _i64), ("n_heads", _i64),
                ("n_kv_heads", _i64), ("head_dim", _i64), ("vocab", _i64), ("context", _i64), ("norm_eps", _f64),
                ("rope_scaling", _f64), ("attn_scale", _f64), ("inv_freq", _ptr), ("embed", _ptr),
                ("final_norm", _ptr), ("head", Linear), ("blocks", ctypes.POINTER(Block))]


def library() -> ctypes.CDLL:
    """The kernels' library with the engine's functions declared and its structs checked against these."""
    lib = kernels.library()
    if lib is None:
        raise ConfigError("the native engine needs the compiled kernels (reinstall with a C compiler and OpenMP)")
    if not getattr(lib, "_engine_declared", False):
        lib.cmpq_engine_struct_size.argtypes = [ctypes.c_int]
        lib.cmpq_engine_struct_size.restype = _i64
        c_layout = [int(lib.cmpq_engine_struct_size(i)) for i in range(5)]
        py_layout = [ctypes.sizeof(Linear), ctypes.sizeof(Block), ctypes.sizeof(Model), Block.sliding_window.offset,
                     Model.blocks.offset]
        if c_layout != py_layout:
            raise RuntimeError(f"the native engine's structs ({c_layout}) disagree with cmpq.engine.native "
                               f"({py_layout}): rebuild the kernels (pip install -e .)")
        lib.cmpq_engine_create.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cmpq_engine_create.restype = _ptr
        lib.cmpq_engine_free.argtypes = [_ptr]
        lib.cmpq_engine_free.restype = None
        lib.cmpq_engine_forward.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, ctypes.c_int, ctypes.c_int]
        lib.cmpq_engine_forward.restype = ctypes.c_int
        lib._engine_declared = True
    return lib


class _Holder:
    """Tensors and prepared layers the structs point into, kept alive with the engine."""

    def __init__(self) -> None:
        self.items: list = []

    def float32(self, tensor: torch.Tensor | None) -> int | None:
        if tensor is None:
            return None
        t = tensor.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.to(torch.float32).contiguous()
        self.items.append(t)
        return t.data_ptr()


def _linear(module: nn.Module, holder: _Holder) -> Linear:
    from cmpq.formats.cmpq import CMPQLinear

    if isinstance(module, CMPQLinear):
        prepared = module._native or module.prepare_native()
        module._native = prepared
        holder.items.append(prepared)
        return Linear(kind=LINEAR_CMPQ, rows=module.out_features, cols=module.in_features,
                      packed=ctypes.pointer(prepared._layer), bias=holder.float32(module.bias))
    return Linear(kind=LINEAR_FLOAT, rows=module.out_features, cols=module.in_features,
                  weight=holder.float32(module.weight), bias=holder.float32(module.bias))


def sliding_windows(config) -> list[int]:
    """Per block, the attention window (0: full causal): Qwen2-style `layer_types`, else Mistral's model-wide
    `sliding_window`."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else 0 for kind in types[:n]]
    return [window if config.model_type == "mistral" else 0] * n


class Engine:
    """One model in the native engine with its KV cache of `context` positions: `forward(ids, pos)` runs tokens
    at positions pos.. and returns the last token's logits (or every token's, `all_logits`). Build it with
    `cmpq.engine.engine_for`, which checks that the engine covers the model."""

    def __init__(self, model: nn.Module, context: int, isa: int = -1, threads: int | None = None) -> None:
        self.lib = library()
        config = model.config
        holder = _Holder()
        layers = model.model.layers
        first = layers[0].self_attn
        windows = sliding_windows(config)
        blocks = (Block * len(layers))()
        for i, layer in enumerate(layers):
            parts = [_linear(layer.get_submodule(name), holder) for name in BLOCK_LINEARS]
            blocks[i] = Block(*parts, attn_norm=holder.float32(layer.input_layernorm.weight),
                              mlp_norm=holder.float32(layer.post_attention_layernorm.weight),
                              sliding_window=windows[i])
        rotary = model.model.rotary_emb
        head_dim = first.head_dim
        self.vocab = int(config.vocab_size)
        self.context = int(context)
        self.threads = threads
        embed = model.model.embed_tokens.weight
        self._model_struct = Model(
            n_blocks=len(layers), hidden=config.hidden_size, intermediate=config.intermediate_size,
            n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, head_dim=head_dim,
            vocab=self.vocab, context=self.context, norm_eps=float(layers[0].input_layernorm.variance_epsilon),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)), attn_scale=float(first.scaling),
            inv_freq=holder.float32(rotary.inv_freq), embed=holder.float32(embed),
            final_norm=holder.float32(model.model.norm.weight), head=_linear(model.lm_head, holder),
            blocks=blocks)
        self._blocks = blocks
        self._holder = holder
        status = ctypes.c_int(0)
        handle = self.lib.cmpq_engine_create(ctypes.byref(self._model_struct), isa, ctypes.byref(status))
        if not handle:
            raise ConfigError(f"the native engine cannot run this model: {STATUS.get(status.value, status.value)}")
        self._handle = handle
        self._logits = torch.empty(self.vocab, dtype=torch.float32)

    def forward(self, ids: torch.Tensor | list[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (vocab,) of the last of `ids` (or (n, vocab) with `all_logits`), the tokens at positions
        pos .. pos + n - 1; positions from pos on are overwritten in the cache."""
        tokens = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous()
        n = tokens.numel()
        if n == 0:
            raise ValueError("the engine needs at least one token")
        if pos + n > self.context:
            raise ConfigError(f"{pos + n} positions do not fit the engine's context of {self.context} tokens")
        out = torch.empty(n, self.vocab) if all_logits else self._logits
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        status = self.lib.cmpq_engine_forward(self._handle, tokens.data_ptr(), n, pos, out.data_ptr(),
                                              int(all_logits), threads)
        if status != 0:
            raise ConfigError(f"the native engine failed: {STATUS.get(status, status)}")
        return out if all_logits else out.clone()

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self.lib.cmpq_engine_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()
