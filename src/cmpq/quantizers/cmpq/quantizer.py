"""CMPQ (Chen, Xie, Li, Shen 2024): a bit-width per input channel, a k-means codebook per column, and two
kinds of FP16 outliers kept in a sparse matrix.

For a layer W (out x in) with channel norms s_j = ||X_j||_2:
1. O_act: the round(act_outliers * out * in) weights with the largest |W_ij| * s_j are set aside (FP16).
2. Each column gets a width from the bit set (`allocate.py`) so that all stored bits fit the target.
3. Each column is fitted with its own 2^b-entry codebook by 1-D k-means (`kmeans.py`), outliers excluded.
4. O_q: the round(q_outliers * out * in) weights with the largest |W_ij - Q(W)_ij| * s_j are set aside too,
   and the columns that lost weights are refitted.
Dequantized weight = codebook lookup, with the outlier positions replaced by their stored FP16 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.errors import CmpqError
from cmpq.formats.base import FP16_BITS, sparse_bits
from cmpq.formats.bitpack import padded_rows
from cmpq.formats.cmpq import (
    CODEBOOK_FORMATS,
    CMPQWeight,
    fit_int8_grid,
    map_bits,
    round_to_grid,
    used_entries,
)
from cmpq.quantizers.base import BUDGET_TOLERANCE_BPW, Preset, Quantizer, register
from cmpq.quantizers.cmpq.allocate import UnreachableTargetError, allocate_greedy, allocate_ranked
from cmpq.quantizers.cmpq.kmeans import SortedRows, assign, fit
from cmpq.quantizers.error_feedback import quantize_with_feedback
from cmpq.progress import stage
from cmpq.quantizers.outliers import top_k_mask

ALLOCATIONS = ("activation", "error", "magnitude", "random")
SCOPES = ("layer", "model")
SCOPE_ERRORS = ("absolute", "relative", "fisher")
GRIDS = ("kmeans", "minmax")
BITS_MODES = ("honest", "code")


@dataclass(frozen=True)
class CMPQConfig:
    """bits: target bits per weight (any real), counted as every stored bit (`bits_mode="honest"`) or as code
    bits only (`"code"`, the paper's convention); bit_set: widths a column may get; allocation: how columns
    are ranked (activation = the paper, error = greedy on weighted k-means error, magnitude / random =
    ablations); allocation_scope: one budget per layer (the paper) or one for the whole model (bits flow to the
    layers whose weighted error they reduce most; needs allocation="error"); scope_error: with a model-wide
    budget, compare layers by absolute weighted error, relative to the layer's output energy
    sum_j s_j^2 ||W_:,j||^2, or scaled to the loss increase the Fisher diagonal F predicts (summed squared
    gradients of the calibration loss over the first `fisher_tokens` calibration tokens; `_fisher_scale`); act_outliers / q_outliers: fractions of the layer's weights kept in FP16; codebook: storage of
    codebook entries (fp16, or int8 codes of a per-layer FP16 scale and offset); grid: kmeans, or the
    min-max uniform grid per column (ablation); error_feedback: GPTQ's column-by-column error compensation
    with the per-column codebooks (Hessian X^T X, damping `damp`, columns by decreasing Hessian diagonal if
    `act_order`), codebooks refitted on the updated weights for every block of 128 columns."""

    bits: float = 3.0
    bits_mode: str = "honest"
    bit_set: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    allocation: str = "activation"
    allocation_scope: str = "layer"
    scope_error: str = "absolute"
    act_outliers: float = 0.0045
    q_outliers: float = 0.0005
    codebook: str = "fp16"
    grid: str = "kmeans"
    error_feedback: bool = False
    damp: float = 0.01
    act_order: bool = True
    kmeans_iters: int = 100
    fisher_tokens: int = 32768
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_set", tuple(sorted(set(self.bit_set))))
        if self.allocation_scope == "layer":  # scope_error only compares layers: one value, so records match
            object.__setattr__(self, "scope_error", "absolute")
        check(isinstance(self.bits, (int, float)) and 0 < self.bits <= 16, "cmpq.bits", "must be a number in (0, 16]",
              self.bits)
        check(len(self.bit_set) > 0 and all(isinstance(b, int) and 1 <= b <= 8 for b in self.bit_set),
              "cmpq.bit_set", "must be a non-empty set of integers in 1..8", self.bit_set)
        check(self.bits >= self.bit_set[0], "cmpq.bits",
              f"is unreachable: below the narrowest width of bit_set {list(self.bit_set)}", self.bits)
        check(self.bits_mode in BITS_MODES, "cmpq.bits_mode", f"must be one of {BITS_MODES}", self.bits_mode)
        check(self.allocation in ALLOCATIONS, "cmpq.allocation", f"must be one of {ALLOCATIONS}", self.allocation)
        check(self.allocation_scope in SCOPES, "cmpq.allocation_scope", f"must be one of {SCOPES}",
              self.allocation_scope)
        check(self.scope_error in SCOPE_ERRORS, "cmpq.scope_error", f"must be one of {SCOPE_ERRORS}",
              self.scope_error)
        check(self.allocation_scope == "layer" or self.allocation == "error", "cmpq.allocation_scope",
              "'model' compares columns of different layers by weighted error: it needs allocation='error' "
              "(or allocation_scope='layer', --allocation-scope layer, with other allocations)",
              self.allocation_scope)
        for name in ("act_outliers", "q_outliers"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and 0 <= value < 0.5, f"cmpq.{name}",
                  "must be a fraction in [0, 0.5)", value)
        check(self.codebook in CODEBOOK_FORMATS, "cmpq.codebook", f"must be one of {tuple(CODEBOOK_FORMATS)}",
              self.codebook)
        check(self.grid in GRIDS, "cmpq.grid", f"must be one of {GRIDS}", self.grid)
        check(isinstance(self.damp, (int, float)) and 0 < self.damp < 1, "cmpq.damp", "must be in (0, 1)", self.damp)
        check(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 1, "cmpq.kmeans_iters",
              "must be an integer >= 1", self.kmeans_iters)
        check(isinstance(self.fisher_tokens, int) and self.fisher_tokens >= 1, "cmpq.fisher_tokens",
              "must be an integer >= 1", self.fisher_tokens)


# The method as published, and the best setting measured on smollm2-135m (docs/method.md): error-driven widths
# up to 6 bits, int8 codebooks, GPTQ-style error feedback, one bit budget for the whole model with each layer's
# errors scaled by its Fisher-weighted loss increase, then 3 epochs of end-to-end distillation of the stored
# values. `cmpq quantize` uses "best" unless --preset says otherwise.
PAPER = {"bit_set": (1, 2, 3, 4, 5, 6, 7, 8), "allocation": "activation", "allocation_scope": "layer",
         "act_outliers": 0.0045, "q_outliers": 0.0005, "codebook": "fp16", "grid": "kmeans", "error_feedback": False}
PRESETS: dict[str, Preset] = {
    "paper": Preset(PAPER),
    "best": Preset({**PAPER, "allocation": "error", "bit_set": (1, 2, 3, 4, 5, 6), "codebook": "int8",
                    "error_feedback": True, "allocation_scope": "model", "scope_error": "fisher"},
                   distill_epochs=3),
}


@register
class CMPQ(Quantizer):
    name = "cmpq"
    Config = CMPQConfig
    presets = PRESETS
    default_preset = "best"

    @classmethod
    def merge_options(cls, preset, fields):
        """A model-wide budget compares layers by weighted error: an allocation other than "error" asked over a
        preset that budgets per model gets a per-layer budget, unless the caller set the scope too."""
        merged = super().merge_options(preset, fields)
        if merged.get("allocation") != "error" and "allocation_scope" not in fields:
            merged["allocation_scope"] = "layer"
        return merged

    def __init__(self, config: CMPQConfig | None = None) -> None:
        super().__init__(config)
        self._measured: dict[str, tuple[torch.Tensor, torch.Tensor, float, int]] = {}
        self._plan: dict[str, torch.Tensor] = {}

    def target_bits(self) -> float | None:
        return float(self.config.bits) if self.config.bits_mode == "honest" else None

    def needs(self) -> frozenset[str]:
        return frozenset({"col_sq_sum", "hessian"} if self.config.error_feedback else {"col_sq_sum"})

    # --- storage helpers -------------------------------------------------------------------------------------
    def _round_codebooks(self, centroids: torch.Tensor) -> torch.Tensor:
        """Centroids as stored: FP16 values (int8 codebooks are then rounded per layer in `_fit_columns`)."""
        return centroids.half().float()

    def _column_cost(self, rows: int) -> torch.Tensor:
        """Bits one column costs at each width of the bit set (codes, stored in whole 16-row groups, plus its
        codebook in honest mode)."""
        widths = torch.tensor(self.config.bit_set, dtype=torch.float64)
        cost = padded_rows(rows) * widths
        if self.config.bits_mode == "honest":
            cost = cost + (2**widths) * CODEBOOK_FORMATS[self.config.codebook]
        return cost

    def _budget(self, rows: int, columns: int, n_outliers: int, n_widths: int) -> float:
        """Bits available for the columns' codes (and codebooks, in honest mode) after the fixed costs, if the
        width map has to distinguish `n_widths` widths."""
        total = self.config.bits * rows * columns
        if self.config.bits_mode == "code":
            return total
        values, indices = sparse_bits(rows, columns, n_outliers)
        fixed = values + indices + map_bits(columns, n_widths)
        if self.config.codebook == "int8":
            fixed += 2 * FP16_BITS
        return total - fixed

    def _allocate(self, allocate, score, rows: int, columns: int, n_outliers: int) -> torch.Tensor:
        """Width indices from `allocate(budget)`, where the budget depends on how many widths the map must tell
        apart: try each map size (1, 2, up to 4, up to 8 widths), keep the results that stay within their size,
        and return the one with the lowest `score`."""
        limit = len(self.config.bit_set) if self.config.allocation == "error" else min(2, len(self.config.bit_set))
        best, best_score, error = None, float("inf"), None
        for size in sorted({min(n, limit) for n in (1, 2, 4, 8)}):
            try:
                index = allocate(self._budget(rows, columns, n_outliers, size))
            except UnreachableTargetError as exc:
                error = exc
                continue
            if int(torch.unique(index).numel()) <= size and score(index) < best_score:
                best, best_score = index, score(index)
        if best is None:
            raise error if error is not None else UnreachableTargetError("no allocation fits the budget")
        return best

    # --- fitting ---------------------------------------------------------------------------------------------
    def _fit(self, rows: SortedRows, width: int, start: torch.Tensor | None = None) -> torch.Tensor:
        """Stored codebooks for sorted rows; `start` warm-starts Lloyd from existing codebooks (refits)."""
        if self.config.grid == "minmax":
            init: str | torch.Tensor = "minmax"
        else:
            init = "best" if start is None else start
        with stage(f"k-means, {width} bits"):
            return self._round_codebooks(fit(rows, 2**width, self.config.kmeans_iters, init=init))

    def _prepare(self, weight: torch.Tensor, stats: LayerStats):
        """Channel norms, O_act mask, the columns as rows (in, out), and those rows sorted once (outliers out)."""
        w = weight.float()
        s = stats.col_norm() if "col_sq_sum" in stats.values else torch.ones(w.shape[1])
        with stage("outliers"):
            act_mask = top_k_mask(w.abs() * s[None, :], round(self.config.act_outliers * w.numel()))
        values = w.T.contiguous()
        return w, s, act_mask, values, SortedRows(values, ~act_mask.T)

    def _n_outliers(self, numel: int) -> int:
        return round(self.config.act_outliers * numel) + round(self.config.q_outliers * numel)

    def _measure(self, sorted_cols: SortedRows, s: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Codebooks at every width of the bit set and the weighted errors s_j^2 * SSE_j, (in, n_widths)."""
        fits = {width: self._fit(sorted_cols, width) for width in self.config.bit_set}
        with stage("width allocation"):
            errors = torch.stack([sorted_cols.sse(fits[b]) for b in self.config.bit_set], dim=1)
            return fits, errors * s[:, None].double() ** 2

    def measures_model(self) -> bool:
        return self.config.allocation_scope == "model"

    def measure_needs(self) -> frozenset[str]:
        return frozenset({"col_sq_sum", "grad_sq_sum"} if self.config.scope_error == "fisher" else {"col_sq_sum"})

    def gradient_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The first windows holding `fisher_tokens` tokens: one scale per layer needs far fewer than the
        full calibration set, and the backward pass costs about three forward passes."""
        return windows[: max(1, math.ceil(self.config.fisher_tokens / windows.shape[1]))]

    def _fisher_scale(self, name: str, stats: LayerStats, values: torch.Tensor, act_mask: torch.Tensor,
                      fits: dict[int, torch.Tensor], weighted: torch.Tensor) -> float:
        """Loss increase per unit of activation-weighted error for one layer: the Fisher-weighted squared error
        sum_ij F_ij (W_ij - Q(W)_ij)^2 of its columns' codebooks at every width over their activation-weighted
        error. Scaling by it puts every layer's errors in the same units (predicted loss) while columns within
        a layer stay ranked by the activation-weighted error, which is less noisy than a per-weight Fisher
        estimated from a few windows. The sums run over
        every width of the bit set, so the narrowest widths, whose errors are largest, weigh most."""
        fisher = stats["grad_sq_sum"].float().T
        if not bool(torch.isfinite(fisher).all()):
            raise CmpqError(f"{name}: the Fisher diagonal (grad_sq_sum) has non-finite entries; if the "
                            "calibration ran in bfloat16, try --calib-dtype float32")
        by_fisher = SortedRows(values, ~act_mask.T, fisher.clamp(min=0))
        loss = sum(float(by_fisher.sse(fits[b]).sum()) for b in self.config.bit_set)
        return loss / max(float(weighted.sum()), 1e-30)

    def measure(self, name: str, weight: torch.Tensor, stats: LayerStats) -> None:
        w, s, act_mask, values, sorted_cols = self._prepare(weight, stats)
        fits, weighted = self._measure(sorted_cols, s)
        if self.config.scope_error == "fisher":
            with stage("width allocation"):
                weighted = weighted * self._fisher_scale(name, stats, values, act_mask, fits, weighted)
        elif self.config.scope_error == "relative":
            weighted = weighted / (w.double().square().sum(dim=0) * s.double() ** 2).sum().clamp(min=1e-30)
        rows, columns = weight.shape
        fixed = 0.0
        if self.config.bits_mode == "honest":  # outliers, indices, int8 grid: everything but codes, codebooks, map
            no_map = self._budget(rows, columns, self._n_outliers(rows * columns), 1) + map_bits(columns, 1)
            fixed = self.config.bits * rows * columns - no_map
        self._measured[name] = (weighted, self._column_cost(rows), fixed, rows * columns)

    def plan(self) -> None:
        """One greedy allocation over the columns of every layer, within the model's total budget.

        Each layer's width map costs depend on how many widths it ends up using: plan first as if every layer
        used the whole bit set, then re-plan with the maps the plan actually needs while the total still fits.
        """
        names = list(self._measured)
        sizes = [self._measured[n][0].shape[0] for n in names]
        weighted = torch.cat([self._measured[n][0] for n in names])
        cost = torch.cat([self._measured[n][1].expand(size, -1) for n, size in zip(names, sizes)])
        numel = sum(self._measured[n][3] for n in names)
        target = self.config.bits * numel
        fixed = sum(self._measured[n][2] for n in names)

        def maps(index: torch.Tensor | None) -> int:
            if self.config.bits_mode == "code":
                return 0
            parts = index.split(sizes) if index is not None else [None] * len(sizes)
            return sum(map_bits(size, len(self.config.bit_set) if part is None else int(torch.unique(part).numel()))
                       for size, part in zip(sizes, parts))

        def total(index: torch.Tensor) -> float:
            return cost.gather(1, index[:, None]).sum().item() + fixed + maps(index)

        index = allocate_greedy(weighted, cost, target - fixed - maps(None), BUDGET_TOLERANCE_BPW * numel)
        for _ in range(3):
            retry = allocate_greedy(weighted, cost, target - fixed - maps(index), BUDGET_TOLERANCE_BPW * numel)
            if total(retry) > target or torch.equal(retry, index):
                break
            index = retry
        self._plan = dict(zip(names, index.split(sizes)))
        self._measured.clear()

    def plan_state(self) -> dict[str, torch.Tensor] | None:
        """The width index of every column of every layer, by layer name."""
        return dict(self._plan) if self.measures_model() else None

    def restore_plan(self, state: dict[str, torch.Tensor]) -> None:
        self._plan = dict(state)

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> CMPQWeight:
        config = self.config
        w, s, act_mask, values, sorted_cols = self._prepare(weight, stats)
        rows, columns = w.shape
        numel = rows * columns
        n_outliers, n_q = self._n_outliers(numel), round(config.q_outliers * numel)
        cost = self._column_cost(rows)
        tolerance = BUDGET_TOLERANCE_BPW * numel
        fits: dict[int, torch.Tensor] = {}
        if self.measures_model():
            if name not in self._plan:
                raise CmpqError(f"no model-wide allocation for layer '{name}': was it measured?")
            index = self._plan[name]
        elif config.allocation == "error":
            fits, weighted = self._measure(sorted_cols, s)
            with stage("width allocation"):
                index = self._allocate(lambda budget: allocate_greedy(weighted, cost, budget, tolerance),
                                       lambda index: weighted.gather(1, index[:, None]).sum().item(),
                                       rows, columns, n_outliers)
        else:
            with stage("width allocation"):
                order = self._order(w, s)
                index = self._allocate(lambda budget: allocate_ranked(order, cost, budget, tolerance),
                                       lambda index: -cost[index].sum().item(),  # the paper's rule: spend all
                                       rows, columns, n_outliers)
        widths = torch.tensor(config.bit_set)[index]

        codebooks = torch.zeros(columns, 2 ** max(config.bit_set))
        grid = self._fit_columns(sorted_cols, widths, codebooks, fits, torch.ones(columns, dtype=torch.bool))
        codes = self._codes(values, widths, codebooks)
        outliers = act_mask
        if n_q:
            with stage("outliers"):
                deq = codebooks.gather(1, codes.long()).T
                error = (w - deq).abs() * s[None, :]
                q_mask = top_k_mask(error.masked_fill(act_mask, -1.0), n_q)
            outliers = act_mask | q_mask
            refit = q_mask.any(dim=0)
            self._fit_columns(SortedRows(values[refit], ~outliers.T[refit]), widths, codebooks, {}, refit, warm=True,
                              int8_grid=grid)  # one int8 grid per layer: the refit rounds onto the first one
            codes = self._codes(values, widths, codebooks)
        final = w
        if config.error_feedback:
            with stage("error feedback"):
                final = self._feedback(w, stats["hessian"], widths, codebooks, outliers, grid)
            codes = self._codes(final.T.contiguous(), widths, codebooks)
        rows_idx, cols_idx = outliers.nonzero(as_tuple=True)   # row-major order, as CSR stores them
        return CMPQWeight(widths=widths.to(torch.uint8), codes=codes.T.contiguous().to(torch.uint8),
                          codebooks=codebooks, outlier_rows=rows_idx, outlier_cols=cols_idx,
                          outlier_values=final[rows_idx, cols_idx].half(), codebook_format=config.codebook,
                          int8_grid=grid)

    def _feedback(self, w: torch.Tensor, hessian: torch.Tensor, widths: torch.Tensor, codebooks: torch.Tensor,
                  outliers: torch.Tensor, int8_grid: tuple[float, float] | None) -> torch.Tensor:
        """GPTQ error feedback with the per-column codebooks (refitted per block on the updated weights);
        outlier positions keep their updated value in FP16. Returns the quantized weight (out, in)."""
        maxk = codebooks.shape[1]
        unused = torch.arange(maxk - 1)[None, :] >= (2 ** widths.long() - 1)[:, None]
        mids = torch.zeros(codebooks.shape[0], maxk - 1)

        def refresh(columns: torch.Tensor) -> None:
            mids[columns] = ((codebooks[columns, 1:] + codebooks[columns, :-1]) * 0.5).masked_fill(unused[columns],
                                                                                                  float("inf"))

        def begin_block(columns: torch.Tensor, current: torch.Tensor) -> None:
            block = torch.zeros(codebooks.shape[0], dtype=torch.bool)
            block[columns] = True
            order = torch.argsort(columns)  # `current` follows `columns`; sort both to match the mask order
            values = current[:, order].T.contiguous()
            self._fit_columns(SortedRows(values, ~outliers[:, columns[order]].T), widths, codebooks, {}, block,
                              warm=True, int8_grid=int8_grid)
            refresh(columns)

        outlier_rows = outliers.T.contiguous()  # column j's outlier mask as a contiguous row

        def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
            quantized = codebooks[j].gather(0, torch.bucketize(column, mids[j]))  # = searchsorted, 4x faster
            return torch.where(outlier_rows[j], column.half().float(), quantized)

        refresh(torch.arange(codebooks.shape[0]))
        return quantize_with_feedback(w, hessian, quantize_column, damp=self.config.damp,
                                      act_order=self.config.act_order, begin_group=begin_block)

    def _order(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Columns from most to least deserving of the higher width."""
        if self.config.allocation == "activation":
            score = s
        elif self.config.allocation == "magnitude":
            score = w.norm(dim=0)
        else:
            score = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(self.config.seed))
        return torch.sort(score, descending=True, stable=True).indices

    def _fit_columns(self, rows: SortedRows, widths, codebooks, fits, refit: torch.Tensor, warm: bool = False,
                     int8_grid: tuple[float, float] | None = None) -> tuple[float, float] | None:
        """Fill `codebooks` rows where `refit` is True, by width. `rows` holds the sorted columns selected by
        `refit`; `fits` are codebooks already fitted on them; with `warm`, Lloyd restarts from the current
        codebooks, which converges in a few steps. With int8 codebooks the entries are rounded to the layer's
        grid: `int8_grid` (offset, scale) if fixed already, else one derived from all codebooks; the grid used
        is returned (None for fp16 codebooks)."""
        for width in torch.unique(widths[refit]).tolist():
            cols = (widths == width) & refit
            if width in fits:
                centroids = fits[width][cols[refit]]
            else:
                start = codebooks[cols, : 2**width] if warm else None
                centroids = self._fit(rows.subset(cols[refit]), width, start)
            codebooks[cols, : 2**width] = centroids
        if self.config.codebook == "int8":
            used = used_entries(widths, codebooks.shape[1])
            grid = int8_grid or fit_int8_grid(codebooks, used)
            codebooks.copy_(torch.where(used & refit[:, None], round_to_grid(codebooks, grid), codebooks))
            return grid
        return None

    @staticmethod
    def _codes(values: torch.Tensor, widths: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """Nearest stored codebook entry for every weight, (in, out) int64."""
        codes = torch.zeros(values.shape, dtype=torch.long)
        for width in torch.unique(widths).tolist():
            cols = widths == width
            codes[cols] = assign(values[cols], codebooks[cols, : 2**width])
        return codes
