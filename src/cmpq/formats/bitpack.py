"""Bit-exact storage of b-bit codes: row-packed 16-row groups for the kernels, plain bit streams for small maps.

Codes of a layer are stored in groups of 16 rows: for each group and each column (in the layer's stored column
order) there are b uint16 words holding the 16 codes as one little-endian bit string, row 16g + r at bits
[r*b, r*b + b). A column of width b therefore costs exactly b bits per row, whatever b is, and a SIMD kernel
turns the 16 codes into 16 table indices with one `vpmultishiftqb` (AVX-512 VBMI): each index is an 8-bit
field at a fixed bit offset of one 64-bit load (two loads for b > 4: rows 8..15 start at byte b).
Rows are padded to a multiple of 16 with code 0; the padding is stored, so it is counted (`padded_rows`).

Layout of the packed array: shape (groups, sum of the columns' widths), uint16; column j's words start at
offset sum(widths[:j]) in every group row.
"""

from __future__ import annotations

import torch

GROUP = 16


def padded_rows(rows: int) -> int:
    """Rows as stored: a whole number of 16-row groups."""
    return -(-rows // GROUP) * GROUP


def pack_codes(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """(rows, columns) integer codes, column j < 2**widths[j] -> (groups, widths.sum()) uint16 words."""
    rows, columns = codes.shape
    widths = widths.long()
    if widths.numel() != columns:
        raise ValueError(f"{widths.numel()} widths for {columns} columns")
    if columns and bool((codes.long() >> widths[None, :]).any()):
        raise ValueError("a code does not fit its column's width")
    groups = padded_rows(rows) // GROUP
    padded = torch.zeros(groups * GROUP, columns, dtype=torch.int64)
    padded[:rows] = codes.long()
    lanes = padded.view(groups, GROUP, columns)
    offsets = torch.cumsum(widths, 0) - widths
    out = torch.zeros(groups, int(widths.sum()), dtype=torch.int32)
    for width in torch.unique(widths).tolist():
        cols = (widths == width).nonzero()[:, 0]
        targets = (offsets[cols][:, None] + torch.arange(width)).reshape(-1)
        for g0, g1 in _chunks(groups, cols.numel() * GROUP * width):
            # bit r*w + k of the column's string is bit k of row r's code
            bits = (lanes[g0:g1, :, cols].permute(0, 2, 1)[..., None] >> torch.arange(width)) & 1  # (g, n, 16, w)
            words = (bits.reshape(g1 - g0, cols.numel(), width, GROUP) << torch.arange(GROUP)).sum(dim=-1)
            out[g0:g1, targets] = words.reshape(g1 - g0, -1).to(torch.int32)
    return out.to(torch.uint16)


def _chunks(groups: int, per_group: int, budget: int = 1 << 22) -> list[tuple[int, int]]:
    """Ranges of groups whose temporaries hold at most about `budget` elements (bounded memory for big layers)."""
    step = max(1, budget // max(per_group, 1))
    return [(g, min(g + step, groups)) for g in range(0, groups, step)]


def check_codes(packed: torch.Tensor, widths: torch.Tensor, rows: int) -> None:
    """ValueError unless `packed` has the shape `pack_codes` gives for `rows` rows and these widths."""
    groups, total = packed.shape
    if total != int(widths.long().sum()) or groups != padded_rows(rows) // GROUP:
        raise ValueError(f"codes of shape {tuple(packed.shape)} do not match {rows} rows and widths summing to "
                         f"{int(widths.long().sum())}")


def codes_at(packed: torch.Tensor, widths: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The codes at positions (rows[i], columns[i]) only (int64), without unpacking the rest."""
    widths = widths.long()
    offsets = (torch.cumsum(widths, 0) - widths)[columns]
    width = widths[columns]
    words = packed.to(torch.int32) & 0xFFFF  # int16 storage sign-extends: keep the 16 bits
    group, start = rows // GROUP, (rows % GROUP) * width
    codes = torch.zeros(rows.numel(), dtype=torch.int64)
    for bit in range(int(width.max()) if width.numel() else 0):
        has = width > bit
        position = start[has] + bit
        word = words[group[has], offsets[has] + position // GROUP]
        codes[has] |= ((word >> (position % GROUP)) & 1).long() << bit
    return codes


def unpack_codes(packed: torch.Tensor, widths: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (rows, columns) int64 codes."""
    widths = widths.long()
    check_codes(packed, widths, rows)
    groups = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFF
    offsets = torch.cumsum(widths, 0) - widths
    codes = torch.zeros(groups, GROUP, widths.numel(), dtype=torch.int64)
    for width in torch.unique(widths).tolist():
        cols = (widths == width).nonzero()[:, 0]
        sources = (offsets[cols][:, None] + torch.arange(width)).reshape(-1)
        for g0, g1 in _chunks(groups, cols.numel() * GROUP * width):
            w = words[g0:g1, sources].view(g1 - g0, cols.numel(), width)
            bits = (w[..., None] >> torch.arange(GROUP)) & 1                      # (g, n, w, 16)
            per_row = bits.reshape(g1 - g0, cols.numel(), GROUP, width)          # (g, n, 16, w)
            codes[g0:g1, :, cols] = (per_row << torch.arange(width)).sum(dim=-1).permute(0, 2, 1)
    return codes.view(groups * GROUP, -1)[:rows]


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits as a little-endian bit stream, uint8 of ceil(n * bits / 8) bytes."""
    values = values.long().flatten()
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if bool((values >> bits).any()) or bool((values < 0).any()):
        raise ValueError(f"a value does not fit in {bits} bits")
    stream = ((values[:, None] >> torch.arange(bits)) & 1).flatten()
    stream = torch.cat([stream, torch.zeros(-stream.numel() % 8, dtype=torch.long)]).view(-1, 8)
    return (stream << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_stream(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_stream`: `count` int64 values."""
    if bits == 0:
        return torch.zeros(count, dtype=torch.long)
    if data.numel() * 8 < count * bits:
        raise ValueError(f"a stream of {data.numel()} bytes cannot hold {count} values of {bits} bits")
    stream = ((data.long()[:, None] >> torch.arange(8)) & 1).flatten()[: count * bits].view(count, bits)
    return (stream << torch.arange(bits)).sum(dim=1)
