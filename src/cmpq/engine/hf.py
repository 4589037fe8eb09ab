"""transformers' `generate` through the native engine: a packed model loaded with `from_pretrained` (after
`import cmpq`) gets a `forward` that sends generation steps to the engine and everything else to the model's own
forward.

A call goes to the engine when it is one sequence of token ids without gradients, embeddings, labels, padding or
requests for attentions or hidden states, and the engine covers the model. The engine keeps its own KV cache: a
cache object transformers passes stays empty and only marks which sequence the engine holds (a sequence that
started on the PyTorch path stays there); without one (use_cache off), a call that extends the last sequence runs
only its new tokens. `CMPQ_ENGINE=torch`
(or `cmpq.load(..., engine="torch")`) turns the route off.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import torch.nn as nn


class EngineRoute:
    """The state behind one model's routed forward: the engine (made on first use), which cache object's sequence
    it holds and how many positions of it are filled."""

    def __init__(self, model: nn.Module, original) -> None:
        self.model = model
        self.original = original
        self.enabled = True
        self.engine = None
        self.owner: int | None = None   # id() of the cache object of the sequence in the engine (None: no cache)
        self.filled = 0
        self.tokens = torch.zeros(0, dtype=torch.int64)  # without a cache object: the ids in the engine
        from cmpq.formats.cmpq import CMPQLinear

        self.packed = [m for m in model.modules() if isinstance(m, CMPQLinear)]

    def wants(self, input_ids, cache, kwargs: dict) -> bool:
        from cmpq.kernels import native

        if not self.enabled or os.environ.get("CMPQ_ENGINE", "native") == "torch":
            return False
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            return False
        if torch.is_grad_enabled() or self.model.training or kwargs.get("inputs_embeds") is not None:
            return False
        if kwargs.get("labels") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
            return False
        if native.kernel_mode() == "reference":
            return False
        if any(m.kernel or m.isa or m.tables not in (None, "auto", "float") for m in self.packed):
            return False  # a layer forced onto a particular kernel path: the PyTorch modules honour it
        return True

    def start(self, input_ids, cache, position_ids, keep: int) -> int | None:
        """The position of input_ids[0, 0] in the engine's sequence, or None if the engine does not hold it. Without
        a cache object (use_cache off), a call that repeats the engine's sequence and adds tokens starts after it
        when only the last logits are wanted (transformers' generate without a cache)."""
        n = input_ids.shape[1]
        if cache is None:
            self._ensure_engine()
            if self.engine is None:
                return None
            held = self.tokens.numel()
            if keep == 1 and self.owner is None and 0 < held < n and torch.equal(input_ids[0, :held].cpu(), self.tokens):
                return held
            self.owner = None
            return 0
        if position_ids is not None:
            first = int(position_ids.reshape(-1)[0])
            if not torch.equal(position_ids.reshape(-1)[-n:].cpu(), torch.arange(first, first + n)):
                return None
        elif id(cache) == self.owner:
            first = self.filled
        else:
            first = 0
        if first == 0:
            self._ensure_engine()
            if self.engine is None:
                return None
            self.owner = id(cache)
            return 0
        return first if id(cache) == self.owner and first <= self.filled else None

    def _ensure_engine(self) -> None:
        if self.engine is None and self.enabled:
            from cmpq.engine import engine_for, unsupported

            if unsupported(self.model):
                self.enabled = False
                return
            self.engine = engine_for(self.model)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        extra = dict(kwargs, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        first = self.start(input_ids, cache, position_ids, keep) if self.wants(input_ids, cache, extra) else None
        n = 0 if input_ids is None else input_ids.shape[1]
        if first is None or n + (first if cache is not None else 0) > self.engine.context:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                 logits_to_keep=logits_to_keep, **kwargs)
        ids = input_ids[0] if cache is not None else input_ids[0, first:]
        if keep == 1:
            logits = self.engine.forward(ids, first)[None, None]
        else:
            logits = self.engine.forward(ids, first, all_logits=True)[None]
            if keep > 1:
                logits = logits[:, -keep:]
        if cache is None:
            self.tokens = input_ids[0].detach().cpu().clone()
        else:
            self.filled = first + n
            self.tokens = torch.zeros(0, dtype=torch.int64)
        return CausalLMOutputWithPast(logits=logits, cache=cache)


def route(model: nn.Module) -> nn.Module:
    """Give `model` the routed forward (once); returns it."""
    if isinstance(getattr(model, "_cmpq_route", None), EngineRoute):
        return model
    original = model.forward
    state = EngineRoute(model, original)

    @functools.wraps(original)  # the same signature: generate checks it for `logits_to_keep`
    def forward(self, *args, **kwargs):
        return state(*args, **kwargs)

    model._cmpq_route = state
    model.forward = types.MethodType(forward, model)
    return model
