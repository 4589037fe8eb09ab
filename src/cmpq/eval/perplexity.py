"""Perplexity per PROTOCOL: non-overlapping windows (2048 tokens), remainder dropped,
ppl = exp(mean NLL over every predicted token). `quick` = the first 16 windows, `full` = all of them."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpq.config import EvalConfig
from cmpq.data.sampling import eval_token_ids
from cmpq.errors import CmpqError
from cmpq.progress import bar
from cmpq.threads import adapt


@dataclass(frozen=True)
class PerplexityResult:
    dataset: str
    protocol: str
    ppl: float
    windows: int
    tokens: int     # predicted tokens: windows x (seqlen - 1), the NLL denominator
    seqlen: int
    source: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def window_nll(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               desc: str = "ppl", progress: bool = True) -> tuple[float, int, int]:
    """(summed NLL, windows, predicted tokens) over non-overlapping windows of `ids` (1, n)."""
    windows = ids.shape[1] // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise CmpqError(f"text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    total = 0.0
    with torch.no_grad():
        for w in bar(range(windows), desc=desc, unit="window", disable=not progress):
            adapt()
            x = ids[:, w * seqlen:(w + 1) * seqlen]
            logits = model(x, use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    return total, windows, windows * (seqlen - 1)


def perplexity(model: nn.Module, tokenizer, dataset: str, config: EvalConfig, progress: bool = True) \
        -> PerplexityResult:
    """Perplexity of `model` on `dataset` (wikitext2 | c4) under the config's protocol."""
    ids, source = eval_token_ids(tokenizer, dataset)
    start = time.perf_counter()
    nll, windows, tokens = window_nll(model, ids, config.seqlen, config.max_windows,
                                      desc=f"ppl {dataset} ({config.protocol})", progress=progress)
    return PerplexityResult(dataset=dataset, protocol=config.protocol, ppl=math.exp(nll / tokens), windows=windows,
                            tokens=tokens, seqlen=config.seqlen, source=source,
                            seconds=time.perf_counter() - start)
