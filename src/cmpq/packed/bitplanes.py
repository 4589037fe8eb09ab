"""Bit-exact storage of b-bit codes: bit planes for the kernels, and plain bit streams for small maps.

Codes of a layer are stored as bit planes in groups of 16 rows: for each group of 16 rows and each column
(in the layer's stored column order) there are b uint16 words, word k holding bit k of the 16 rows' codes
(row 16g + i at bit i). A column of width b therefore costs exactly b bits per row, whatever b is, and a
SIMD kernel rebuilds 16 table indices with one masked add per plane (AVX-512 `kmov` + `vpaddd{k}`).
Rows are padded to a multiple of 16 with code 0; the padding is stored, so it is counted (`padded_rows`).

Layout of the packed array: shape (groups, sum of the columns' widths), uint16; column j's planes start at
offset sum(widths[:j]) in every group row.
"""

from __future__ import annotations

import torch

GROUP = 16
_LANES = 1 << torch.arange(GROUP, dtype=torch.int32)  # bit i <- row 16g + i


def padded_rows(rows: int) -> int:
    """Rows as stored: a whole number of 16-row groups."""
    return -(-rows // GROUP) * GROUP


def pack_planes(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """(rows, columns) integer codes, column j < 2**widths[j] -> (groups, widths.sum()) uint16 planes."""
    rows, columns = codes.shape
    widths = widths.long()
    if widths.numel() != columns:
        raise ValueError(f"{widths.numel()} widths for {columns} columns")
    if columns and bool((codes.long() >> widths[None, :]).any()):
        raise ValueError("a code does not fit its column's width")
    groups = padded_rows(rows) // GROUP
    padded = torch.zeros(groups * GROUP, columns, dtype=torch.int32)
    padded[:rows] = codes.to(torch.int32)
    lanes = padded.view(groups, GROUP, columns)
    offsets = torch.cumsum(widths, 0) - widths
    out = torch.zeros(groups, int(widths.sum()), dtype=torch.int32)
    for bit in range(int(widths.max()) if columns else 0):
        has = widths > bit                                     # columns that have this plane
        plane = (((lanes[:, :, has] >> bit) & 1) * _LANES[None, :, None]).sum(dim=1)   # (groups, n)
        out[:, offsets[has] + bit] = plane.to(torch.int32)
    return out.to(torch.uint16)


def check_planes(planes: torch.Tensor, widths: torch.Tensor, rows: int) -> None:
    """ValueError unless `planes` has the shape `pack_planes` gives for `rows` rows and these widths."""
    groups, total = planes.shape
    if total != int(widths.long().sum()) or groups != padded_rows(rows) // GROUP:
        raise ValueError(f"planes of shape {tuple(planes.shape)} do not match {rows} rows and widths summing to "
                         f"{int(widths.long().sum())}")


def codes_at(planes: torch.Tensor, widths: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The codes at positions (rows[i], columns[i]) only (int64), without unpacking the rest."""
    widths = widths.long()
    offsets = (torch.cumsum(widths, 0) - widths)[columns]
    width = widths[columns]
    words = planes.to(torch.int32) & 0xFFFF  # int16 storage sign-extends: keep the 16 bits
    group, lane = rows // GROUP, rows % GROUP
    codes = torch.zeros(rows.numel(), dtype=torch.int64)
    for bit in range(int(width.max()) if width.numel() else 0):
        has = width > bit
        word = words[group[has], offsets[has] + bit]
        codes[has] |= ((word >> lane[has]) & 1).long() << bit
    return codes


def unpack_planes(planes: torch.Tensor, widths: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_planes`: (rows, columns) int64 codes."""
    widths = widths.long()
    check_planes(planes, widths, rows)
    groups = planes.shape[0]
    words = planes.to(torch.int32)
    offsets = torch.cumsum(widths, 0) - widths
    codes = torch.zeros(groups, GROUP, widths.numel(), dtype=torch.int64)
    for bit in range(int(widths.max()) if widths.numel() else 0):
        has = widths > bit
        word = words[:, offsets[has] + bit]                    # (groups, n)
        bits = (word[:, None, :] >> torch.arange(GROUP)[None, :, None]) & 1
        codes[:, :, has] |= bits.long() << bit
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
