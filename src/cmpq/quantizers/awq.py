"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023): activation-aware weight quantization, with the original
repository's (llm-awq) defaults.

Weights that multiply large activations matter most, so before rounding each input channel j of W is scaled
up by s_j = mean_t |x_tj| ** ratio (normalised so max(s) * min(s) = 1), which gives those channels a finer
effective grid, and scaled back down after: W ~ Q(W diag(s)) diag(s)^-1. The ratio is searched on a grid of
`n_grid` values in [0, 1) for the lowest layer output error over the calibration tokens; ratio 0 is s = 1,
i.e. plain RTN, so the search is never worse than RTN on that error. Then llm-awq's `auto_clip` shrinks each
(row, group) range of the scaled weight by up to `max_shrink` when that lowers the group's output error
(skipped for query/key projections, as llm-awq does: their errors are amplified by the softmax and the
layer output error does not see that).

Differences from llm-awq, all deliberate:
- The scale is searched per linear layer on that layer's own output error, computed exactly from the Hessian
  X^T X as trace(dW H dW^T), instead of per group of linears sharing an input (q/k/v, gate/up) on the output
  of the enclosing module with a forward pass per candidate. Same objective family, no extra forward passes.
- Real AWQ folds diag(s)^-1 into the preceding RMSNorm/LayerNorm or linear where the architecture allows, so
  the scale costs nothing at inference. The engine here quantizes one linear at a time and does not rewrite
  the model around it, so the scale is stored with the layer: 16 bits per input channel, counted under
  `params` (PROTOCOL's honest accounting), e.g. +0.25 bpw on a layer of 64 rows, +0.004 on 4096 rows.
- Like every method here (GPTQ's sequential scheme, `pipeline.py`), a layer's statistics come from the
  outputs of the blocks already quantized, where llm-awq searches every block on the float model's activations.
- Grids are the project's asymmetric min-max grids (`quantize_uniform`: FP16 scale and integer zero, range
  widened to contain 0), the same as RTN and GPTQ, so the comparison isolates what AWQ adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.formats.base import FP16_BITS, BitBreakdown, QuantizedWeight
from cmpq.formats.uniform import UniformQuantizedWeight
from cmpq.quantizers.base import Quantizer, register
from cmpq.quantizers.rtn import quantize_uniform

_SCALE_FLOOR = 1e-4       # llm-awq clamps s = x_mean ** ratio to at least this before normalising
_CLIP_CHUNK = 1 << 22     # (rows x padded columns) per chunk of the clip search: bounds its float64 temporaries


@dataclass(frozen=True)
class AWQConfig:
    """bits: code width 1..8; group_size: input channels per grid (None = one grid per output channel);
    n_grid: candidate scale exponents i / n_grid, i = 0..n_grid-1 (also the clip search's step 1 / n_grid);
    clip: run the weight clipping search; max_shrink: largest fraction of a group's range clipping may remove;
    clip_skip: layers whose name contains any of these substrings are not clipped (llm-awq skips q/k)."""

    bits: int = 4
    group_size: int | None = 128
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and 1 <= self.bits <= 8, "awq.bits", "must be an integer in 1..8", self.bits)
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "awq.group_size", "must be None (per output channel) or an integer >= 1", self.group_size)
        check(isinstance(self.n_grid, int) and not isinstance(self.n_grid, bool) and self.n_grid >= 1,
              "awq.n_grid", "must be an integer >= 1", self.n_grid)
        check(isinstance(self.clip, bool), "awq.clip", "must be true or false", self.clip)
        check(isinstance(self.max_shrink, (int, float)) and not isinstance(self.max_shrink, bool)
              and 0 <= self.max_shrink <= 1, "awq.max_shrink", "must be in [0, 1]", self.max_shrink)
        check(isinstance(self.clip_skip, (tuple, list)) and all(isinstance(k, str) and k for k in self.clip_skip),
              "awq.clip_skip", "must be a tuple of non-empty layer-name substrings", self.clip_skip)
        object.__setattr__(self, "clip_skip", tuple(self.clip_skip))  # a list from a config file -> tuple


@dataclass
class AWQWeight(QuantizedWeight):
    """A uniform quantization of W diag(s), with the per-input-channel scale s stored in FP16.

    Decodes to inner.dequantize() diag(s)^-1. Real AWQ folds s into the previous operation; here it is stored
    and counted (16 bits per input channel, under `params`). `ratio` is the chosen exponent, kept for
    inspection only (decoding does not need it, so it is not counted).
    """

    inner: UniformQuantizedWeight
    input_scale: torch.Tensor  # (in,) float16
    ratio: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return self.inner.shape

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize() / self.input_scale.float()[None, :]

    def storage(self) -> BitBreakdown:
        return self.inner.storage() + BitBreakdown(params=FP16_BITS * self.input_scale.numel())

    def column_widths(self) -> torch.Tensor:
        return self.inner.column_widths()

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "awq_ratio": self.ratio}


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Squared error of the layer output over the calibration tokens, sum_t ||dW x_t||^2 = trace(dW H dW^T),
    in float64 (measured no slower than float32 on this CPU at 576 x 1536, and candidates can be close)."""
    d = delta.double()
    return float(((d @ hessian.double()) * d).sum())


def awq_scale(x_abs_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """llm-awq's candidate scale for one exponent: x_mean ** ratio, floored at 1e-4, divided by
    sqrt(max * min), rounded to FP16 (how it is stored). Returned as float16, shape (in,)."""
    s = x_abs_mean.double().pow(ratio).clamp(min=_SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return s.half()


def search_scale(weight: torch.Tensor, hessian: torch.Tensor, x_abs_mean: torch.Tensor, bits: int,
                 group_size: int | None, n_grid: int) -> tuple[torch.Tensor, float]:
    """The FP16 scale (in,) and exponent minimising the output error of Q(W diag(s)) diag(s)^-1."""
    w = weight.float()
    best_scale, best_ratio, best_loss = torch.ones(w.shape[1], dtype=torch.float16), 0.0, math.inf
    for i in range(n_grid):
        ratio = i / n_grid
        s = awq_scale(x_abs_mean, ratio)
        sf = s.float()
        if not (torch.isfinite(sf).all() and (sf > 0).all()):  # FP16 overflow/underflow: not representable
            continue
        candidate = quantize_uniform(w * sf[None, :], bits, group_size).dequantize() / sf[None, :]
        loss = output_error(candidate - w, hessian)
        if loss < best_loss:
            best_scale, best_ratio, best_loss = s, ratio, loss
    return best_scale, best_ratio


def _group_blocks(hessian: torch.Tensor, group: int, n_groups: int) -> torch.Tensor:
    """Diagonal blocks (n_groups, group, group) of a (in, in) matrix, zero-padded to whole groups."""
    pad = n_groups * group - hessian.shape[0]
    h = F.pad(hessian, (0, pad, 0, pad)).reshape(n_groups, group, n_groups, group)
    return h.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def group_errors(delta: torch.Tensor, hessian: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Output error of every (row, group) of a weight error dW (out, in): d_g H_gg d_g^T, float64
    (out, n_groups). A last partial group is padded with zeros, which contribute nothing."""
    out, cols = delta.shape
    group = cols if group_size is None else min(group_size, cols)
    n_groups = math.ceil(cols / group)
    blocks = _group_blocks(hessian.double(), group, n_groups)
    d = F.pad(delta.double(), (0, n_groups * group - cols)).reshape(out, n_groups, group)
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d)


def search_clip(scaled: torch.Tensor, scaled_hessian: torch.Tensor, bits: int, group_size: int | None,
                n_grid: int, max_shrink: float) -> torch.Tensor:
    """llm-awq's auto_clip: per (row, group) of the scaled weight, the bound max|w_g| * (1 - i / n_grid),
    i = 0..int(max_shrink * n_grid)-1, whose quantization has the lowest group output error under the
    scaled-basis Hessian. Returns the bounds (out, n_groups); i = 0 is no clipping, kept unless beaten."""
    out, cols = scaled.shape
    group = cols if group_size is None else min(group_size, cols)
    n_groups = math.ceil(cols / group)
    pad = n_groups * group - cols
    max_val = F.pad(scaled.abs(), (0, pad)).reshape(out, n_groups, group).amax(dim=-1)
    best_val = max_val.clone()
    steps = int(max_shrink * n_grid)
    if steps <= 1:  # only i = 0 (no clipping) or nothing to try
        return best_val
    blocks = _group_blocks(scaled_hessian.double(), group, n_groups)
    rows_per_chunk = max(1, _CLIP_CHUNK // (n_groups * group))
    for r0 in range(0, out, rows_per_chunk):  # rows are independent: chunk to bound memory
        w = scaled[r0:r0 + rows_per_chunk]
        top = max_val[r0:r0 + rows_per_chunk]
        best_err = torch.full_like(top, math.inf, dtype=torch.float64)
        for i in range(steps):
            bound = top * (1 - i / n_grid)
            cols_bound = bound.repeat_interleave(group, dim=1)[:, :cols]
            clipped = torch.clamp(w, -cols_bound, cols_bound)
            delta = quantize_uniform(clipped, bits, group_size).dequantize() - w
            d = F.pad(delta.double(), (0, pad)).reshape(w.shape[0], n_groups, group)
            err = torch.einsum("rgi,gij,rgj->rg", d, blocks, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_val[r0:r0 + rows_per_chunk] = torch.where(better, bound, best_val[r0:r0 + rows_per_chunk])
    return best_val


def awq_quantize(weight: torch.Tensor, hessian: torch.Tensor, x_abs_mean: torch.Tensor, name: str,
                 config: AWQConfig) -> AWQWeight:
    """AWQ on one weight (out, in), given its inputs' Hessian X^T X (in, in) and mean |x| per channel (in,);
    `name` decides whether clipping is skipped (`config.clip_skip`)."""
    c = config
    w = weight.float()
    scale, ratio = search_scale(w, hessian, x_abs_mean, c.bits, c.group_size, c.n_grid)
    sf = scale.float()
    scaled = w * sf[None, :]
    if c.clip and not any(key in name for key in c.clip_skip):
        # Error of the scaled weight's quantization on the inputs x / s: H' = diag(1/s) H diag(1/s)
        inv = 1.0 / sf.double()
        scaled_hessian = hessian.double() * inv[:, None] * inv[None, :]
        bound = search_clip(scaled, scaled_hessian, c.bits, c.group_size, c.n_grid, c.max_shrink)
        group = scaled.shape[1] if c.group_size is None else min(c.group_size, scaled.shape[1])
        cols_bound = bound.repeat_interleave(group, dim=1)[:, :scaled.shape[1]]
        scaled = torch.clamp(scaled, -cols_bound, cols_bound)
    inner = quantize_uniform(scaled, c.bits, c.group_size)
    return AWQWeight(inner=inner, input_scale=scale, ratio=ratio)


@register
class AWQ(Quantizer):
    name = "awq"
    Config = AWQConfig

    def needs(self) -> frozenset[str]:
        return frozenset({"hessian", "col_abs_sum"})

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> AWQWeight:
        x_abs_mean = stats["col_abs_sum"] / max(stats.tokens, 1)
        return awq_quantize(weight, stats["hessian"], x_abs_mean, name, self.config)


__all__ = ["AWQ", "AWQConfig", "AWQWeight", "awq_quantize", "awq_scale", "group_errors", "output_error"]
