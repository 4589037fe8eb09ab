"""QuIP (Chee, Cai, Kuleshov, De Sa 2023): incoherence processing around GPTQ's error feedback (LDLQ).

Large weights and a Hessian concentrated on a few input channels are what make 2-bit grids fail: a per-channel
min-max grid spends its range on one outlier and rounds the rest to zero. QuIP multiplies the weight on both
sides by random orthogonal matrices, W' = U W V^T, and the Hessian by the same input-side one, H' = V H V^T,
which spreads every outlier over the whole matrix (incoherence) while leaving the layer's proxy loss
trace(dW H dW^T) unchanged. W' is quantized with LDLQ, which is exactly GPTQ's column-by-column update
(`gptq_quantize`, called here, with QuIP's default per-output-channel min-max grid and 1% damping), and the
inverse transform U^T Q V is applied at inference.

Transforms: "orthogonal" is a Haar-random orthogonal matrix (QR of a seeded Gaussian matrix, signs fixed by
R's diagonal); "hadamard" is QuIP#'s cheaper randomized Hadamard (Sylvester Hadamard of the largest
power-of-two factor times random signs, Kronecker-multiplied with a random orthogonal matrix of the remaining
odd factor). Both are regenerated from two seeds, derived from `seed` and the layer name with a stable hash,
so only the seeds are stored (two 64-bit integers per layer, counted as `maps`).

Out of scope: QuIP's optional diagonal rescaling of W and H before the rotations, and its greedy refinement
passes after LDLQ.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from cmpq.calibration.stats import LayerStats
from cmpq.config import check
from cmpq.formats.base import BitBreakdown, QuantizedWeight
from cmpq.formats.uniform import UniformQuantizedWeight
from cmpq.quantizers.base import Quantizer, register
from cmpq.quantizers.gptq import gptq_quantize

TRANSFORMS = ("orthogonal", "hadamard")
SEED_BITS = 64  # each stored transform is one seed, stored as a 64-bit integer


@dataclass(frozen=True)
class QuIPConfig:
    """bits: code width 1..8; group_size: input channels per grid (None = one grid per output channel, QuIP's
    default); damp: Hessian damping as a fraction of its mean diagonal; transform: orthogonal | hadamard;
    seed: base seed of the per-layer transforms."""

    bits: int = 2
    group_size: int | None = None
    damp: float = 0.01
    transform: str = "orthogonal"
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.bits, int) and 1 <= self.bits <= 8, "quip.bits", "must be an integer in 1..8", self.bits)
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "quip.group_size", "must be None (per output channel) or an integer >= 1", self.group_size)
        check(isinstance(self.damp, (int, float)) and 0 < self.damp < 1, "quip.damp", "must be in (0, 1)", self.damp)
        check(self.transform in TRANSFORMS, "quip.transform", f"must be one of {TRANSFORMS}", self.transform)
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "quip.seed",
              "must be an integer >= 0", self.seed)


def _haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Q of the QR of a standard Gaussian (n, n) float64 matrix, columns signed by R's diagonal: without the
    sign fix, QR's convention biases Q and it is not Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).contiguous()


def _sylvester_hadamard(n: int) -> torch.Tensor:
    """Normalised Hadamard matrix (n, n) float64 for n a power of two, by Sylvester's doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / h.shape[0] ** 0.5


def random_orthogonal(n: int, seed: int, kind: str = "orthogonal") -> torch.Tensor:
    """A random orthogonal (n, n) float64 matrix, the same for the same (n, seed, kind).

    kind "orthogonal": Haar-random. kind "hadamard": kron(Haar(m), H_p diag(s)) with n = m p, p the largest
    power of two dividing n, H_p the normalised Sylvester Hadamard matrix and s random signs.
    """
    check(kind in TRANSFORMS, "quip.transform", f"must be one of {TRANSFORMS}", kind)
    check(isinstance(n, int) and n >= 1, "quip.n", "must be an integer >= 1", n)
    generator = torch.Generator().manual_seed(seed)
    if kind == "orthogonal":
        return _haar_orthogonal(n, generator)
    power = n & -n  # largest power of two dividing n
    signs = torch.randint(0, 2, (power,), generator=generator).double() * 2 - 1
    odd = _haar_orthogonal(n // power, generator)
    return torch.kron(odd, _sylvester_hadamard(power) * signs)


def transform_seeds(name: str, seed: int = 0) -> tuple[int, int]:
    """(seed of U, seed of V) of layer `name`: a stable hash (crc32, not Python's salted `hash`), so that
    layers get different transforms and a rerun, or a reader of the stored seeds, gets the same ones."""
    return (zlib.crc32(f"quip/{seed}/{name}/U".encode()), zlib.crc32(f"quip/{seed}/{name}/V".encode()))


@dataclass
class QuIPWeight(QuantizedWeight):
    """GPTQ-quantized weight in the rotated basis (`inner`), plus the seeds of its two rotations."""

    inner: UniformQuantizedWeight
    seed_u: int
    seed_v: int
    transform: str

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return self.inner.shape

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (out, out), V (in, in)), float64, regenerated from the seeds at every call: not cached, because a
        model's worth of dense float64 rotations kept alive by `QuantizationResult.layers` would not fit."""
        out, cols = self.shape
        return (random_orthogonal(out, self.seed_u, self.transform),
                random_orthogonal(cols, self.seed_v, self.transform))

    def dequantize(self) -> torch.Tensor:
        u, v = self.transforms()
        return (u.T @ self.inner.dequantize().double() @ v).float()

    def storage(self) -> BitBreakdown:
        return self.inner.storage() + BitBreakdown(maps=2 * SEED_BITS)

    def column_widths(self) -> torch.Tensor:
        # Widths of the rotated basis' columns: every column has the inner code width, so they read the same.
        return self.inner.column_widths()


def quip_quantize(weight: torch.Tensor, hessian: torch.Tensor, name: str, config: QuIPConfig) -> QuIPWeight:
    """QuIP on one weight (out, in) with the Hessian X^T X (in, in) of its calibration inputs."""
    seed_u, seed_v = transform_seeds(name, config.seed)
    out, cols = weight.shape
    u = random_orthogonal(out, seed_u, config.transform)
    v = random_orthogonal(cols, seed_v, config.transform)
    rotated = u @ weight.double() @ v.T
    h = v @ hessian.double() @ v.T
    h = (h + h.T) / 2  # exactly symmetric again after the float64 products
    inner = gptq_quantize(rotated.float(), h, config.bits, config.group_size, config.damp, act_order=False)
    return QuIPWeight(inner=inner, seed_u=seed_u, seed_v=seed_v, transform=config.transform)


@register
class QuIP(Quantizer):
    name = "quip"
    Config = QuIPConfig

    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def quantize(self, weight: torch.Tensor, stats: LayerStats, name: str = "") -> QuIPWeight:
        return quip_quantize(weight, stats["hessian"], name, self.config)


__all__ = ["QuIP", "QuIPConfig", "QuIPWeight", "quip_quantize", "random_orthogonal", "transform_seeds"]
