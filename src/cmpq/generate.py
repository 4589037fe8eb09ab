"""A lean generation loop: one prefill, then one forward per token with a static KV cache.

The same loop serves float and quantized models, through the native engine or the PyTorch model, so their
tokens/s compare. No per-token Python work beyond the forward call, the argmax (or sample) and the stop
check; transformers' `generate` adds logits processors and stopping criteria we do not need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cmpq.errors import ConfigError
from cmpq.models.loaded import LoadedModel


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first (which the prefill produces) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds else 0.0


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as transformers applies it): the logits of tokens already in the prompt or the
    output are divided by `penalty` when positive and multiplied when negative, so greedy decoding of a weak model
    loops less."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(scores < 0, scores * penalty, scores / penalty))


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _torch_steps(model, total: int):
    """step(ids (1, t), position) -> logits (1, vocab) of the last token, through the PyTorch model with a static
    KV cache of `total` positions."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=total)

    def step(ids: torch.Tensor, position: int) -> torch.Tensor:
        # only the last position's logits are needed: the head runs on one token, not the whole prompt
        positions = torch.arange(position, position + ids.shape[1])
        return model(ids, cache=cache, use_cache=True, cache_position=positions, logits_to_keep=1).logits[:, -1]

    return step


def _engine_steps(engine):
    """The same steps through the native engine (`cmpq.engine`)."""
    return lambda ids, position: engine.forward(ids[0], position)[None]


def context_of(model, engine=None) -> int:
    """Most positions (prompt plus new tokens) a generation can use."""
    if engine is not None:
        return engine.context
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def generate_ids(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 eos_token_id: int | None = None, repetition_penalty: float = 1.0,
                 engine=None) -> tuple[torch.Tensor, float, float]:
    """(new token ids (n,), prefill seconds, decode seconds) for prompt `ids` (1, t), through `engine` (a
    `cmpq.engine` Engine) when given, else the PyTorch model."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not repetition_penalty > 0 or repetition_penalty != repetition_penalty or repetition_penalty == float("inf"):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    prompt = ids.shape[1]
    if prompt < 1:
        raise ConfigError("the prompt is empty: give at least one token of text")
    context = context_of(model, engine)
    if prompt + max_new_tokens > context:
        raise ConfigError(f"the prompt ({prompt} tokens) and {max_new_tokens} new tokens exceed the model's context "
                          f"of {context} positions: shorten the prompt or lower --max-new-tokens")
    step = _engine_steps(engine) if engine is not None else _torch_steps(model, prompt + max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        start = time.perf_counter()
        logits = step(ids, 0)
        seen = ids
        token = _pick(_penalize(logits, seen, repetition_penalty), temperature, generator)
        prefill = time.perf_counter() - start
        out.append(token)
        start = time.perf_counter()
        position = prompt
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and int(token) == eos_token_id:
                break
            logits = step(token[:, None], position)
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, token[:, None]], dim=1)
            token = _pick(_penalize(logits, seen, repetition_penalty), temperature, generator)
            out.append(token)
            position += 1
        decode = time.perf_counter() - start
    return torch.cat(out), prefill, decode


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """(1, t) token ids of `prompt`, as a user turn of the tokenizer's chat template with `chat`."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: this model's tokenizer has no chat template; drop --chat to continue plain text")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def generate(loaded: LoadedModel, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, chat: bool = False, repetition_penalty: float = 1.0) -> Generation:
    """Continue `prompt` (or answer it, with `chat`) by up to `max_new_tokens` tokens (stops at the
    end-of-sequence token), through `loaded.engine` where the loader attached one (`cmpq.engine.attach`)."""
    tokenizer = loaded.tokenizer
    ids = prompt_ids(tokenizer, prompt, chat)
    new, prefill, decode = generate_ids(loaded.model, ids, max_new_tokens, temperature, seed,
                                        getattr(tokenizer, "eos_token_id", None), repetition_penalty,
                                        getattr(loaded, "engine", None))
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                      new_tokens=new.numel(), prefill_seconds=prefill, decode_seconds=decode)
