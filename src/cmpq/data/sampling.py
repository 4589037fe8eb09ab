"""Token windows: random calibration windows (GPTQ's sampler) and the evaluation token stream."""

from __future__ import annotations

import random

import torch

from cmpq.config import CalibConfig
from cmpq.data.chat import C4_CHAT, render_conversations
from cmpq.data.sources import c4_calibration_docs, load_calibration_text, load_eval_text
from cmpq.errors import DataNotFoundError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize `text` once with the tokenizer's defaults, as GPTQ does; returns int64 ids of shape (1, n)."""
    return tokenizer(text, return_tensors="pt").input_ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets, exactly GPTQ's `random.seed(seed); randint`."""
    total = ids.shape[1]
    if total <= seqlen:  # randint(0, total - seqlen - 1) needs at least seqlen + 1 tokens
        raise DataNotFoundError(f"calibration text has {total} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[0, s:s + seqlen] for s in starts])


def calibration_windows(tokenizer, config: CalibConfig) -> tuple[torch.Tensor, str]:
    """(windows of shape (nsamples, seqlen), source description) per PROTOCOL's calibration rule; `c4-chat`
    renders PROTOCOL's C4 documents in the model's chat template before the same tokenizing and sampling."""
    if config.source == C4_CHAT:
        docs, where = c4_calibration_docs()
        text, source = render_conversations(tokenizer, docs, C4_CHAT), f"{where} as chat conversations"
    else:
        text, source = load_calibration_text(config.source)
    return sample_windows(tokenize(tokenizer, text), config.nsamples, config.seqlen, config.seed), source


def eval_token_ids(tokenizer, name: str) -> tuple[torch.Tensor, str]:
    """(token ids of shape (1, n), source description) of an evaluation dataset."""
    text, source = load_eval_text(name)
    return tokenize(tokenizer, text), source
