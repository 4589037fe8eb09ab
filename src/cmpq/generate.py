"""A lean generation loop: one prefill, then one forward per token with a static KV cache.

The same loop serves float and quantized models, so their tokens/s compare (issue: "decode at the same
generation loop"). No per-token Python work beyond the forward call, the argmax (or sample) and the stop
check; transformers' `generate` adds logits processors and stopping criteria we do not need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cmpq.errors import ConfigError
from cmpq.models.load import LoadedModel


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


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate_ids(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 eos_token_id: int | None = None) -> tuple[torch.Tensor, float, float]:
    """(new token ids (n,), prefill seconds, decode seconds) for prompt `ids` (1, t)."""
    from transformers import StaticCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        start = time.perf_counter()
        # only the last position's logits are needed: the head runs on one token, not the whole prompt
        logits = model(ids, cache=cache, use_cache=True, cache_position=torch.arange(prompt), logits_to_keep=1).logits
        token = _pick(logits[:, -1], temperature, generator)
        prefill = time.perf_counter() - start
        out.append(token)
        start = time.perf_counter()
        position = torch.tensor([prompt])
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and int(token) == eos_token_id:
                break
            logits = model(token[:, None], cache=cache, use_cache=True, cache_position=position).logits
            token = _pick(logits[:, -1], temperature, generator)
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
             seed: int = 0, chat: bool = False) -> Generation:
    """Continue `prompt` (or answer it, with `chat`) by up to `max_new_tokens` tokens (stops at the
    end-of-sequence token)."""
    tokenizer = loaded.tokenizer
    ids = prompt_ids(tokenizer, prompt, chat)
    new, prefill, decode = generate_ids(loaded.model, ids, max_new_tokens, temperature, seed,
                                        getattr(tokenizer, "eos_token_id", None))
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                      new_tokens=new.numel(), prefill_seconds=prefill, decode_seconds=decode)
