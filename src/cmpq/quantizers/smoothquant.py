"""SmoothQuant (Xiao et al. 2023), W8A8 simulated: the weight+activation reference point.

Activation outliers sit in a few input channels, which per-token 8-bit activation quantization handles badly.
SmoothQuant divides those channels by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (alpha = 0.5) and multiplies
the weight's columns by s_j, which leaves X W^T unchanged; then weights get per-output-channel symmetric
8-bit grids and, at inference, each token's (smoothed) input a symmetric 8-bit grid of its own (dynamic).
As in the paper, s is shared by the linears that read the same normalised input (q/k/v; gate/up), with
max|W_j| taken over all of them, so that it folds into the preceding norm's weight and costs nothing; the
linears fed by attention or the MLP's product (o_proj, down_proj: `smooth_skip`) are not smoothed (s = 1),
only quantized. Statistics come from the float model (a measuring pass), as the paper calibrates.
Simulated: the layer keeps the float weight Q(W s) / s and a forward pre-hook replaces its input x by
Q_token(x / s) * s, the same product in the original basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.errors import CmpqError
from cmpq.formats.base import FP16_BITS, BitBreakdown, QuantizedWeight
from cmpq.formats.bitpack import padded_rows
from cmpq.quantizers.base import Quantizer, register


@dataclass(frozen=True)
class SmoothQuantConfig:
    """bits: weight width (symmetric, per output channel); act_bits: per-token activation width; alpha:
    migration strength (0 = all difficulty on activations, 1 = all on weights)."""

    bits: int = 8
    act_bits: int = 8
    alpha: float = 0.5
    smooth_skip: tuple[str, ...] = ("o_proj", "down_proj", "out_proj", "fc2")

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and 2 <= self.bits <= 8, "smoothquant.bits", "must be an integer in 2..8",
              self.bits)
        check(isinstance(self.act_bits, int) and 2 <= self.act_bits <= 16, "smoothquant.act_bits",
              "must be an integer in 2..16", self.act_bits)
        check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "smoothquant.alpha", "must be in [0, 1]",
              self.alpha)
        check(isinstance(self.smooth_skip, (tuple, list)) and all(isinstance(k, str) for k in self.smooth_skip),
              "smoothquant.smooth_skip", "must be a list of layer-name substrings", self.smooth_skip)
        object.__setattr__(self, "smooth_skip", tuple(self.smooth_skip))


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to a symmetric grid of 2^(bits-1) - 1 levels per sign, one scale per token (last dim)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


@dataclass
class SmoothQuantWeight(QuantizedWeight):
    """Symmetric int codes of W * s (out, in), FP16 scale per output channel, FP16 smoothing factors (in,)."""

    codes: torch.Tensor    # (out, in) int8
    scale: torch.Tensor    # (out,) float16
    smooth: torch.Tensor   # (in,) float16
    bits: int
    act_bits: int

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None] / self.smooth.float()[None, :]

    def column_widths(self) -> torch.Tensor:
        return torch.full((self.codes.shape[1],), self.bits, dtype=torch.uint8)

    def storage(self) -> BitBreakdown:
        """Codes and the FP16 scale per output channel; s is folded into the preceding norm (or is 1)."""
        out, columns = self.codes.shape
        return BitBreakdown(weights=out * columns, codes=padded_rows(out) * columns * self.bits,
                            params=out * FP16_BITS)

    def activation_hook(self):
        smooth, bits = self.smooth.float(), self.act_bits

        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            quantized = fake_quantize_per_token(x.float() / smooth, bits) * smooth
            return (quantized.to(x.dtype), *args[1:])
        return hook


def smoothing_factors(act_abs_max: torch.Tensor, weight_abs_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), as the FP16 value that is stored (folded) and used."""
    s = act_abs_max.float().clamp(min=1e-5).pow(alpha) / weight_abs_max.float().clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5).half().float()


def smoothquant_quantize(weight: torch.Tensor, smooth: torch.Tensor, config: SmoothQuantConfig) -> SmoothQuantWeight:
    """Symmetric per-output-channel quantization of W diag(smooth), decoded back to the original basis."""
    scaled = weight.float() * smooth[None, :]
    qmax = 2 ** (config.bits - 1) - 1
    scale = (scaled.abs().amax(dim=1) / qmax).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(scaled / scale[:, None]), -qmax, qmax).to(torch.int8)
    return SmoothQuantWeight(codes=codes, scale=scale.half(), smooth=smooth.half(), bits=config.bits,
                             act_bits=config.act_bits)


@register
class SmoothQuant(Quantizer):
    name = "smoothquant"
    Config = SmoothQuantConfig

    def __init__(self, config: SmoothQuantConfig | None = None) -> None:
        super().__init__(config)
        self._measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._smooth: dict[str, torch.Tensor] = {}

    def measures_model(self) -> bool:
        return True

    def measure_needs(self) -> frozenset[str]:
        return frozenset({"col_abs_max"})

    def measure(self, name: str, weight: torch.Tensor, stats: LayerStats) -> None:
        self._measured[name] = (stats["col_abs_max"].float(), weight.float().abs().amax(dim=0))

    def plan(self) -> None:
        """One s per shared input: layers whose inputs had bit-identical statistics read the same tensor (q/k/v,
        gate/up of one block); max|W_j| is taken over all of them."""
        groups: dict[bytes, list[str]] = {}
        for name, (act, _) in self._measured.items():
            groups.setdefault(act.numpy().tobytes(), []).append(name)
        for names in groups.values():
            act = self._measured[names[0]][0]
            weight_max = torch.stack([self._measured[n][1] for n in names]).amax(dim=0)
            for name in names:
                skip = any(key in name for key in self.config.smooth_skip)
                self._smooth[name] = torch.ones_like(act) if skip else smoothing_factors(act, weight_max,
                                                                                          self.config.alpha)
        self._measured.clear()

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> SmoothQuantWeight:
        if name not in self._smooth:
            raise CmpqError(f"smoothquant: layer '{name}' was not measured (the engine measures every layer first)")
        return smoothquant_quantize(weight, self._smooth[name], self.config)


__all__ = ["SmoothQuant", "SmoothQuantConfig", "SmoothQuantWeight", "fake_quantize_per_token", "smoothing_factors",
           "smoothquant_quantize"]
