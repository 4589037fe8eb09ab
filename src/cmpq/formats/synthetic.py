"""Random CMPQ layers with a chosen width mix, for kernel tests and kernel benchmarks (no model needed)."""

from __future__ import annotations

import torch

from cmpq.formats.cmpq import CMPQWeight


def random_cmpq_layer(rows: int, cols: int, widths: torch.Tensor, nnz: int, seed: int = 0, codebook: str = "fp16",
                      scale: float = 1.0) -> CMPQWeight:
    """A CMPQ layer with the given per-column `widths` (cols,), random codes, sorted random codebooks (values
    exact in FP16, or on an int8 grid), and `nnz` FP16 outliers at random positions."""
    g = torch.Generator().manual_seed(seed)
    widths = widths.to(torch.uint8)
    codebooks = (torch.randn(cols, 256, generator=g).sort(dim=1).values * scale).half().float()
    grid = None
    if codebook == "int8":
        grid = (-2.0 * scale, 4.0 * scale / 255)
        codebooks = grid[0] + grid[1] * torch.randint(0, 256, (cols, 256), generator=g).sort(dim=1).values.float()
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for width in torch.unique(widths).tolist():
        columns = widths == width
        codes[:, columns] = torch.randint(0, 2**width, (rows, int(columns.sum())), generator=g, dtype=torch.uint8)
    flat = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    return CMPQWeight(widths=widths, codes=codes, codebooks=codebooks, outlier_rows=flat // cols,
                      outlier_cols=flat % cols, outlier_values=(torch.randn(nnz, generator=g) * scale * 4).half(),
                      codebook_format=codebook, int8_grid=grid)


def mixed_widths(cols: int, bits: float, seed: int = 0) -> torch.Tensor:
    """Widths averaging `bits` code bits: floor(bits) everywhere, one more on a random share of the columns."""
    g = torch.Generator().manual_seed(seed)
    low = int(bits)
    widths = torch.full((cols,), low, dtype=torch.uint8)
    if bits > low:
        widths[torch.randperm(cols, generator=g)[: round((bits - low) * cols)]] = low + 1
    return widths
