"""End-to-end distillation of the stored values against the float model's next-token distribution.

Block fine-tuning (`cmpq.training.finetune`) matches each block's outputs on its own; errors that only show in the
tokens the model predicts, and the drift that quantized blocks pass to later ones, are left. This pass comes
after every block is quantized: the whole quantized model is trained, the codes fixed, to predict the float
model's next-token distribution on the calibration windows. What trains is what the packed file stores as
values anyway: the lookup layers' codebook entries and FP16 outlier values (theta[index],
`CMPQWeight.lookup_values`), and the model's 1-D float parameters (RMSNorm weights, biases). Codes, widths,
format and the honest bpw do not change.

The teacher is the float model's top-k log-probabilities per token, computed once before quantization (a few
MB instead of a vocabulary-wide distribution per token); the loss is the KL divergence from it, with the
teacher's mass outside its top k as one more outcome. Some calibration windows are held out: the values of the
epoch with the lowest held-out KL (measured with the values rounded as stored) are kept, or none if no epoch
beats the model as quantized.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from cmpq.calibration.precision import compute_context
from cmpq.config import check
from cmpq.formats.base import QuantizedWeight
from cmpq.progress import bar as progress_bar
from cmpq.threads import adapt
from cmpq.training.finetune import StoredValues, rms, tunable


@dataclass(frozen=True)
class DistillConfig:
    """epochs: passes over the training windows (0 = off; None = what the quantizer's preset asks for, see
    `resolve`); lr: Adam's step size, in units of each layer's
    weight RMS for the stored values and of each vector's RMS for the 1-D parameters; topk: teacher
    log-probabilities kept per token; holdout: fraction of the calibration windows (at least one) held out
    to choose the epoch kept; tokens: distil on the first calibration windows holding this many tokens (None =
    all of them), since a backward pass through the whole model costs several forwards per window and the
    calibration of 128 x 2048 would take an hour; 65536 tokens (32 windows of 2048) were enough to turn
    the loops of smollm2 at 2.5 bpw into sentences."""

    epochs: int | None = 0
    lr: float = 1e-3
    topk: int = 128
    holdout: float = 0.125
    tokens: int | None = 65536

    def __post_init__(self) -> None:
        check(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 0), "distill.epochs",
              "must be an integer >= 0, or None for the preset's default", self.epochs)
        check(isinstance(self.lr, (int, float)) and self.lr > 0, "distill.lr", "must be a positive number", self.lr)
        check(isinstance(self.topk, int) and self.topk >= 1, "distill.topk", "must be an integer >= 1", self.topk)
        check(isinstance(self.holdout, (int, float)) and 0 < self.holdout < 1, "distill.holdout",
              "must be a fraction in (0, 1)", self.holdout)
        check(self.tokens is None or (isinstance(self.tokens, int) and self.tokens >= 1), "distill.tokens",
              "must be an integer >= 1 or None (all calibration windows)", self.tokens)

    def resolve(self, preset_epochs: int) -> "DistillConfig":
        """This config with `epochs` decided: the preset's `preset_epochs` where it says None."""
        return self if self.epochs is not None else dataclasses.replace(self, epochs=preset_epochs)

    def windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The calibration windows (n, seqlen) that distillation uses: the first ones holding `tokens` tokens,
        at least two so that one trains and one is held out when there are two."""
        if self.tokens is None:
            return windows
        return windows[: max(2, math.ceil(self.tokens / windows.shape[1]))]


def enabled(config: DistillConfig | None) -> bool:
    """Whether `config` asks for distillation."""
    return config is not None and bool(config.epochs)


@dataclass
class Teacher:
    """The float model's top-k next-token log-probabilities on each calibration window: (n, seqlen, k)."""

    indices: torch.Tensor  # int32 (vocabulary ids; half the memory of int64)
    logprobs: torch.Tensor  # float32


def _logits(model: nn.Module, window: torch.Tensor, dtype: torch.dtype,
            weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(seqlen, vocab) float32 logits of one window, `weights` (name -> tensor) replacing parameters."""
    with compute_context(dtype):
        if weights is None:
            logits = model(window[None], use_cache=False).logits
        else:
            logits = functional_call(model, weights, (window[None],), {"use_cache": False}, strict=False).logits
    return logits[0].float()


def teacher_topk(model: nn.Module, windows: torch.Tensor, topk: int, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> Teacher:
    """The model's top-`topk` log-probabilities at every position of `windows` (nsamples, seqlen)."""
    indices, logprobs = [], []
    with torch.no_grad():
        for i in progress_bar(range(windows.shape[0]), desc="distill: teacher", unit="window",
                              disable=not progress):
            adapt()
            lp = torch.log_softmax(_logits(model, windows[i], dtype), dim=-1)
            top = lp.topk(min(topk, lp.shape[-1]), dim=-1)
            indices.append(top.indices.int())
            logprobs.append(top.values)
    return Teacher(torch.stack(indices), torch.stack(logprobs))


def sparse_kl(logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one outcome for all
    other tokens (exact when the top k hold all the teacher's mass). logits: (L, V); indices, logprobs: (L, k).
    The student's mass outside the top k comes from a logsumexp over those logits, not from 1 - sum(top k),
    which loses every digit when the top k hold nearly all of it."""
    indices = indices.long()
    total = torch.logsumexp(logits, dim=-1)
    student = logits.gather(1, indices) - total[:, None]
    log_q_rest = torch.logsumexp(logits.scatter(1, indices, float("-inf")), dim=-1) - total
    p = teacher_logprobs.exp()
    p_rest = 1 - p.sum(dim=-1)
    # below 1e-6 the teacher's rest is the rounding of its top-k sum (k = vocabulary: none at all)
    rest = torch.where(p_rest > 1e-6, p_rest.clamp(min=1e-6) * (p_rest.clamp(min=1e-6).log() - log_q_rest.clamp(min=-1e4)),
                       torch.zeros_like(p_rest))
    kl = (p * (teacher_logprobs - student)).sum(dim=-1) + rest
    return kl.mean()


class _FusedSparseKL(torch.autograd.Function):
    """`sparse_kl` with its gradient computed in the forward, a block of positions at a time: a handful of passes
    over the (L, V) logits instead of the dozen that autograd's logsumexp, scatter and their backwards make, and
    no (L, V) intermediates kept but the gradient itself. d KL / d z_j over one position, with q = softmax(z),
    q' = the softmax of the logits outside the top k, p the teacher's top-k probabilities and r its rest mass
    (when it counts): q_j (sum p + r) - p_j [j in top k] - r q'_j [j not in top k]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                rows: int) -> torch.Tensor:
        positions = logits.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(logits.shape, dtype=torch.float32) if want_grad else None
        total_kl = torch.zeros((), dtype=torch.float32)
        for start in range(0, positions, rows):
            part = slice(start, min(start + rows, positions))
            z, index, lp = logits[part].float(), indices[part].long(), teacher_logprobs[part]
            total = torch.logsumexp(z, dim=-1)
            student = z.gather(1, index) - total[:, None]
            rest_logits = z.scatter(1, index, float("-inf"))
            rest_total = torch.logsumexp(rest_logits, dim=-1)
            log_q_rest = rest_total - total
            p = lp.exp()
            p_rest = 1 - p.sum(dim=-1)
            counts = p_rest > 1e-6  # as in `sparse_kl`: below, the rest is the rounding of the top-k sum
            p_rest_c = p_rest.clamp(min=1e-6)
            rest = torch.where(counts, p_rest_c * (p_rest_c.log() - log_q_rest.clamp(min=-1e4)),
                               torch.zeros_like(p_rest))
            total_kl += ((p * (lp - student)).sum(dim=-1) + rest).sum()
            if want_grad:
                r = torch.where(counts & (log_q_rest > -1e4), p_rest, torch.zeros_like(p_rest))  # clamp: no gradient
                g = grad[part]
                torch.sub(z, total[:, None], out=g)
                g.exp_().mul_((p.sum(dim=-1) + r)[:, None])
                finite = torch.where(torch.isfinite(rest_total), rest_total, torch.zeros_like(rest_total))
                g.sub_(rest_logits.sub_(finite[:, None]).exp_().mul_(r[:, None]))  # k = vocabulary: no rest
                g.scatter_add_(1, index, -p)
        if want_grad:
            ctx.save_for_backward(grad.div_(positions))
        return total_kl / positions

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def fused_sparse_kl(logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                    rows: int = 256) -> torch.Tensor:
    """`sparse_kl` (its plain reference) computed `rows` positions at a time, with its gradient ready: what
    distillation trains on."""
    return _FusedSparseKL.apply(logits, indices, teacher_logprobs, rows)


def split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """Training and held-out window indices: the last max(1, round(holdout * n)) windows are held out, at most
    n - 1 so that one trains (a single window both trains and is measured)."""
    held = min(n - 1, max(1, round(holdout * n)))
    return list(range(n - held)), list(range(n - held, n)) or list(range(n))


def distill_model(model: nn.Module, layers: dict[str, QuantizedWeight], windows: torch.Tensor, teacher: Teacher,
                  config: DistillConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                  progress: bool = True) -> tuple[dict[str, QuantizedWeight], dict]:
    """Train the stored values of the lookup-quantized `layers` (full module name -> weight, as in the model)
    and the model's 1-D parameters so that the model's next-token distribution on `windows` matches `teacher`.
    Everything trains as float32 copies passed to the forwards (`functional_call`); the model itself changes
    only at the end, to the kept values (its linears dequantized), so an interruption leaves it as it was.
    Returns the layers to keep (rounded as stored) and a record: held-out KL before and after each epoch, and
    the epoch kept (0 = none). A loss that becomes NaN or infinite ends training there (`diverged_at_epoch`),
    keeping the best epoch before."""
    layers = {name: qw for name, qw in layers.items() if tunable(qw)}
    train, held = split(windows.shape[0], config.holdout)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}  # forwards in the model's precision
    vectors = {name: nn.Parameter(p.detach().float().clone()) for name, p in model.named_parameters() if p.ndim == 1}
    values = StoredValues(layers)
    groups = values.param_groups(config.lr) + [{"params": [p], "lr": config.lr * rms(p)} for p in vectors.values()]

    def vector_weights() -> dict[str, torch.Tensor]:
        return {name: p.to(dtypes[name]) for name, p in vectors.items()}

    def snapshot() -> dict[str, torch.Tensor]:  # .to() of a float32 copy is the copy itself: clone
        return {name: t.detach().clone() for name, t in vector_weights().items()}

    def held_out_kl(current: dict[str, QuantizedWeight], kept_vectors: dict[str, torch.Tensor]) -> float:
        weights = {f"{n}.weight": qw.dequantize().to(dtypes[f"{n}.weight"]) for n, qw in current.items()}
        with torch.no_grad():
            return sum(float(fused_sparse_kl(_logits(model, windows[i], dtype, {**weights, **kept_vectors}),
                                             teacher.indices[i], teacher.logprobs[i])) for i in held) / len(held)

    best = (layers, snapshot())
    best_kl, best_epoch = held_out_kl(*best), 0
    record = {"train_windows": len(train), "held_out_windows": len(held), "held_out_kl": [best_kl], "train_kl": []}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(groups)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    bar = progress_bar(total=config.epochs * len(train), desc="distill", unit="window", disable=not progress)
    try:
        for p in model.parameters():  # gradients flow to the copies only
            p.requires_grad_(False)
        for epoch in range(1, config.epochs + 1):
            losses = []
            with torch.enable_grad():
                for i in torch.randperm(len(train), generator=generator).tolist():
                    adapt()
                    optimizer.zero_grad(set_to_none=True)
                    weights = {n: w.to(dtypes[n]) for n, w in values.weights().items()}
                    loss = fused_sparse_kl(_logits(model, windows[train[i]], dtype,
                                                   {**weights, **vector_weights()}),
                                           teacher.indices[train[i]], teacher.logprobs[train[i]])
                    losses.append(float(loss.detach()))
                    if not math.isfinite(losses[-1]):
                        break
                    loss.backward()
                    optimizer.step()
                    bar.update()
                    bar.set_postfix_str(f"kl {losses[-1]:.4f}")
            current = (values.rounded(), snapshot())
            kl = held_out_kl(*current) if math.isfinite(losses[-1]) else math.nan
            if not math.isfinite(kl):  # diverged (the step size is too large): keep the best so far
                record["diverged_at_epoch"] = epoch
                break
            record["train_kl"].append(sum(losses) / len(losses))
            record["held_out_kl"].append(kl)
            if kl < best_kl:
                best, best_kl, best_epoch = current, kl, epoch
    finally:
        bar.close()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    kept, kept_vectors = best
    _put(model, kept, kept_vectors)
    record["epoch_kept"] = best_epoch
    return kept, record


def _put(model: nn.Module, layers: dict[str, QuantizedWeight], vectors: dict[str, torch.Tensor]) -> None:
    """The distilled values in the model: 1-D parameters by name, lookup layers dequantized."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in vectors:
                p.copy_(vectors[name])
        for name, qw in layers.items():
            weight = model.get_submodule(name).weight
            weight.copy_(qw.dequantize().to(weight.dtype))


def saved(model: nn.Module, layers: dict[str, QuantizedWeight], record: dict) -> dict:
    """What `distill_model` left (its kept layers, the model's 1-D parameters after it, its record), for a
    stopped run to take over (`cmpq.resume`)."""
    vectors = {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim == 1}
    return {"layers": layers, "vectors": vectors, "record": record}


def install(model: nn.Module, state: dict) -> tuple[dict[str, QuantizedWeight], dict]:
    """Put what `saved` kept back in the model; returns the layers and the record as `distill_model` did."""
    _put(model, state["layers"], state["vectors"])
    return state["layers"], state["record"]
