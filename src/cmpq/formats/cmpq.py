"""The CMPQ format: the layer as quantized (`CMPQWeight`, with its honest bit accounting), as stored (the packed
tensors below, `pack_cmpq` / `parse_cmpq` / `unpack_cmpq`), and the module that computes from them
(`CMPQLinear`, through the native kernels). docs/format.md describes the bytes.

Per layer (all little-endian, names relative to the module):
- `levels` uint8 (n,): the distinct column widths, ascending;
- `width_map` uint8: each column's index into `levels`, ceil(log2 n) bits per column, in the layer's own
  column order (a bit stream, `bitpack.pack_stream`). Columns are stored sorted by width (a stable sort),
  so equal widths form contiguous segments; that permutation is derived from the map, never stored;
- `codes` uint16 (groups, sum of widths): row-packed 16-row groups, columns in stored order (`bitpack.py`);
- `codebooks`: each stored column's 2^b entries, concatenated: float16, or uint8 codes of the layer grid
  `grid` float16 (offset, scale), entry = offset + scale * code;
- `outlier_values` float16, `outlier_cols` (narrowest unsigned type for in_features - 1), `outlier_rowptr`
  (narrowest for their count): the FP16 outliers in CSR by row, in the original column order (all three
  empty when there are none).
Every stored bit is one the honest accounting counts (`CMPQWeight.storage`), so file size = accounting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpq.errors import FormatError
from cmpq.formats.base import FP16_BITS, BitBreakdown, PackedLinear, QuantizedWeight, index_bits, sparse_bits
from cmpq.formats.bitpack import check_codes, pack_codes, pack_stream, padded_rows, unpack_codes, unpack_stream
from cmpq.kernels import native

INDEX_DTYPES = {8: torch.uint8, 16: torch.uint16, 32: torch.int32, 64: torch.int64}
CODEBOOK_FORMATS = {"fp16": 16, "int8": 8}  # bits per stored codebook entry
# every tensor a layer stores; all but `grid` (int8 codebooks only) are required
LAYER_TENSORS = ("levels", "width_map", "codes", "codebooks", "grid", "outlier_values", "outlier_cols",
                 "outlier_rowptr")


def map_bits(columns: int, n_widths: int) -> int:
    """Bits of the per-column width map: an index into the layer's list of widths (one byte per width)."""
    return 8 * n_widths + columns * math.ceil(math.log2(n_widths)) if n_widths > 1 else 8


def fit_int8_grid(codebooks: torch.Tensor, used: torch.Tensor) -> tuple[float, float]:
    """One FP16 offset and scale per layer spanning every used codebook entry in 256 steps."""
    lo = codebooks[used].min().half().float()
    scale = ((codebooks[used].max() - lo) / 255).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    return float(lo), float(scale)


def round_to_grid(codebooks: torch.Tensor, grid: tuple[float, float]) -> torch.Tensor:
    """Entries rounded to the nearest of the grid's 256 values (monotone: sorted rows stay sorted)."""
    lo, scale = grid
    return lo + scale * torch.clamp(torch.round((codebooks - lo) / scale), 0, 255)


def lookup_index(codes: torch.Tensor, entries_per_column: int, outlier_rows: torch.Tensor,
                 outlier_cols: torch.Tensor) -> torch.Tensor:
    """(out, in) positions into theta = [codebooks (in, K) flattened, outlier values in the order given]."""
    columns = codes.shape[1]
    index = torch.arange(columns)[None, :] * entries_per_column + codes.long()
    index[outlier_rows, outlier_cols] = columns * entries_per_column + torch.arange(outlier_rows.numel())
    return index


def used_entries(widths: torch.Tensor, entries: int) -> torch.Tensor:
    """(in, entries) mask of the codebook entries each column's width uses."""
    return torch.arange(entries)[None, :] < (2 ** widths.long())[:, None]


@dataclass
class CMPQWeight(QuantizedWeight):
    """Per-column widths and codebooks, dense codes, and FP16 outliers (row-major, CSR when stored)."""

    widths: torch.Tensor         # (in,) uint8
    codes: torch.Tensor          # (out, in) uint8
    codebooks: torch.Tensor      # (in, 2^max_width) float32 holding the stored (rounded) values
    outlier_rows: torch.Tensor   # (nnz,) int64
    outlier_cols: torch.Tensor   # (nnz,) int64
    outlier_values: torch.Tensor  # (nnz,) float16
    codebook_format: str
    int8_grid: tuple[float, float] | None = None  # (offset, scale) of int8 codebooks: entry = offset + scale * code

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        w = self.codebooks.gather(1, self.codes.T.long()).T.contiguous()
        w[self.outlier_rows, self.outlier_cols] = self.outlier_values.float()
        return w

    def column_widths(self) -> torch.Tensor:
        return self.widths

    def lookup_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta, index): the stored values, [codebooks flattened, outlier values], and the (out, in) position
        of each weight in theta, so that dequantize() == theta[index]. Fine-tuning (`cmpq.training.finetune`) trains
        theta with the index fixed."""
        theta = self.stored_values()
        return theta, lookup_index(self.codes, self.codebooks.shape[1], self.outlier_rows, self.outlier_cols)

    def stored_values(self) -> torch.Tensor:
        """theta of `lookup_values`: the codebooks flattened, then the outlier values (float32)."""
        return torch.cat([self.codebooks.flatten(), self.outlier_values.float()])

    def weight_from_values(self, theta: torch.Tensor) -> torch.Tensor:
        """theta[index] of `lookup_values` (the dequantized weight holding the values `theta`), differentiable in
        theta, computed as a gather along each column's codebook: its backward is a scatter-add per column,
        several times faster on the CPU than the accumulating index of theta by a full (out, in) index, and no
        (out, in) int64 index is kept."""
        columns, entries = self.codebooks.shape
        books = theta[: columns * entries].view(columns, entries)
        weight = books.gather(1, self.codes.T.long()).T
        return weight.index_put((self.outlier_rows, self.outlier_cols), theta[columns * entries:])

    def with_values(self, theta: torch.Tensor) -> "CMPQWeight":
        """A copy holding the values `theta` (as `lookup_values` lays them out) rounded as they are stored:
        FP16, or int8 on the layer's grid (a new one spanning the new entries if some fall outside it)."""
        columns, entries = self.codebooks.shape
        used = used_entries(self.widths, entries)
        books = torch.where(used, theta[: columns * entries].reshape(columns, entries).float(), self.codebooks)
        grid = None
        if self.codebook_format == "int8":
            grid, values = self.int8_grid, books[used]
            outside = grid is None or (values.numel() > 0 and (values.min() < grid[0]
                                                               or values.max() > grid[0] + 255 * grid[1]))
            if outside:
                grid = fit_int8_grid(books, used)
            books = torch.where(used, round_to_grid(books, grid), books)
        else:
            books = books.half().float()
        return dataclasses.replace(self, codebooks=books, outlier_values=theta[columns * entries:].half(),
                                   int8_grid=grid)

    def outlier_count(self) -> int:
        return int(self.outlier_values.numel())

    def storage(self) -> BitBreakdown:
        rows, columns = self.shape
        widths = self.widths.long()
        entry_bits = CODEBOOK_FORMATS[self.codebook_format]
        params = int((2**widths).sum()) * entry_bits + (2 * FP16_BITS if self.codebook_format == "int8" else 0)
        values, indices = sparse_bits(rows, columns, self.outlier_values.numel())
        return BitBreakdown(weights=rows * columns, codes=padded_rows(rows) * int(widths.sum()), params=params,
                            outliers=values, indices=indices,
                            maps=map_bits(columns, int(torch.unique(widths).numel())))


def map_width(levels: int) -> int:
    """Bits per column of the width map when the layer uses `levels` distinct widths."""
    return math.ceil(math.log2(levels)) if levels > 1 else 0


def stored_order(widths: torch.Tensor) -> torch.Tensor:
    """Column permutation that groups equal widths (ascending, stable): stored column i is column order[i]."""
    return torch.sort(widths.long(), stable=True).indices


def pack_cmpq(qw: CMPQWeight) -> dict[str, torch.Tensor]:
    """The packed tensors of one CMPQ layer (see the module docstring)."""
    rows, columns = qw.shape
    widths = qw.widths.long()
    levels = torch.unique(widths)
    by_position = torch.argsort(qw.outlier_rows * columns + qw.outlier_cols)  # CSR order: by row, then column
    outlier_rows, outlier_cols = qw.outlier_rows[by_position], qw.outlier_cols[by_position]
    order = stored_order(widths)
    stored_widths = widths[order]
    entries = torch.cat([qw.codebooks[j, : 2 ** int(widths[j])] for j in order.tolist()])
    tensors = {
        "levels": levels.to(torch.uint8),
        "width_map": pack_stream(torch.searchsorted(levels, widths), map_width(levels.numel())),
        "codes": pack_codes(qw.codes[:, order], stored_widths),
    }
    if qw.codebook_format == "int8":
        lo, scale = qw.int8_grid
        tensors["codebooks"] = torch.round((entries - lo) / scale).clamp(0, 255).to(torch.uint8)
        tensors["grid"] = torch.tensor([lo, scale], dtype=torch.float16)
    else:
        tensors["codebooks"] = entries.half()
    nnz = qw.outlier_values.numel()
    rowptr = torch.zeros(rows + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(outlier_rows, minlength=rows), 0)
    tensors["outlier_values"] = qw.outlier_values.half()[by_position]
    tensors["outlier_cols"] = outlier_cols.to(INDEX_DTYPES[index_bits(max(columns - 1, 0))])
    # no outliers: no row pointer either (the accounting counts none)
    tensors["outlier_rowptr"] = rowptr.to(INDEX_DTYPES[index_bits(nnz)]) if nnz else torch.zeros(0, dtype=torch.uint8)
    return tensors


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise FormatError(f"{where}: {message}")


@dataclass
class ParsedCMPQ:
    """A layer's packed tensors checked and decoded, except the codes (which stay packed)."""

    widths: torch.Tensor          # (in,) int64, original column order
    order: torch.Tensor           # (in,) int64: stored column i is original column order[i]
    codes: torch.Tensor          # (groups, sum of widths) uint16 row-packed codes, stored column order
    entries: torch.Tensor         # flat float32 codebook entries, stored column order
    codebook_format: str
    grid: tuple[float, float] | None
    outlier_rows: torch.Tensor    # (nnz,) int64, CSR order
    outlier_cols: torch.Tensor    # (nnz,) int64, original column order
    outlier_values: torch.Tensor  # (nnz,) float16

    @property
    def stored_widths(self) -> torch.Tensor:
        return self.widths[self.order]


def parse_cmpq(tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
               where: str = "layer") -> ParsedCMPQ:
    """Check every shape and range of a layer's packed tensors, so that a corrupt file fails here, naming
    `where`, instead of deep inside a kernel; decodes everything but the codes (cheap: no pass over weights)."""
    required = tuple(name for name in LAYER_TENSORS if name != "grid")
    missing = [name for name in required if name not in tensors]
    _check(not missing, where, f"missing tensors {missing}")
    levels = tensors["levels"].long()
    _check(levels.dim() == 1 and 0 < levels.numel() <= 8 and bool((levels >= 1).all()) and bool((levels <= 8).all())
           and bool((levels[1:] > levels[:-1]).all()), where, f"invalid width levels {levels.tolist()}")
    bits = map_width(levels.numel())
    try:
        index = unpack_stream(tensors["width_map"], bits, in_features)
    except ValueError as exc:
        raise FormatError(f"{where}: width_map: {exc}") from None
    _check(bool((index < levels.numel()).all()), where, "width_map points past the width levels")
    widths = levels[index]
    order = stored_order(widths)
    codes = tensors["codes"]
    _check(codes.dtype in (torch.uint16, torch.int16) and codes.dim() == 2, where,
           f"codes must be 16-bit words (groups, sum of widths), got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.view(torch.uint16) if codes.dtype == torch.int16 else codes
    try:
        check_codes(codes, widths, out_features)
    except ValueError as exc:
        raise FormatError(f"{where}: codes: {exc}") from None
    sizes = 2 ** widths[order]
    raw = tensors["codebooks"]
    _check(raw.dim() == 1 and raw.numel() == int(sizes.sum()), where,
           f"codebooks hold {raw.numel()} entries, the widths need {int(sizes.sum())}")
    grid = None
    if raw.dtype == torch.uint8:
        _check("grid" in tensors and tensors["grid"].numel() == 2, where, "int8 codebooks without their grid")
        lo, scale = (float(v) for v in tensors["grid"].float())
        grid = (lo, scale)
        entries = lo + scale * raw.float()
        codebook_format = "int8"
    else:
        _check(raw.dtype == torch.float16, where, f"codebooks of dtype {raw.dtype}, expected float16 or uint8")
        entries = raw.float()
        codebook_format = "fp16"
    values, cols, rowptr = tensors["outlier_values"], tensors["outlier_cols"].long(), tensors["outlier_rowptr"].long()
    if rowptr.numel() == 0 and values.numel() == 0:
        rowptr = torch.zeros(out_features + 1, dtype=torch.long)
    _check(values.dtype == torch.float16 and values.dim() == 1, where, "outlier_values must be float16 (nnz,)")
    _check(rowptr.numel() == out_features + 1 and int(rowptr[0]) == 0 and int(rowptr[-1]) == values.numel()
           and bool((rowptr[1:] >= rowptr[:-1]).all()), where, "outlier_rowptr is not a valid CSR row pointer")
    _check(cols.numel() == values.numel() and bool((cols >= 0).all()) and bool((cols < in_features).all()), where,
           "outlier_cols do not match the values or point outside the layer")
    rows = torch.repeat_interleave(torch.arange(out_features), rowptr[1:] - rowptr[:-1])
    same_row = rows[1:] == rows[:-1]
    _check(bool((cols[1:][same_row] > cols[:-1][same_row]).all()), where,
           "outlier_cols are not strictly increasing within a row (duplicates or unsorted)")
    return ParsedCMPQ(widths=widths, order=order, codes=codes, entries=entries, codebook_format=codebook_format,
                      grid=grid, outlier_rows=rows, outlier_cols=cols, outlier_values=values)


def unpack_cmpq(tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                where: str = "layer") -> CMPQWeight:
    """Rebuild the `CMPQWeight` (bit-identical dequantization) from packed tensors (checked by `parse_cmpq`)."""
    parsed = parse_cmpq(tensors, out_features, in_features, where)
    widths, order = parsed.widths, parsed.order
    stored_codes = unpack_codes(parsed.codes, widths[order], out_features)
    sizes = 2 ** widths[order]
    codebooks = torch.zeros(in_features, 2 ** int(widths.max()))
    starts = torch.cumsum(sizes, 0) - sizes
    for position, column in enumerate(order.tolist()):
        size = int(sizes[position])
        codebooks[column, :size] = parsed.entries[int(starts[position]): int(starts[position]) + size]
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    codes[:, order] = stored_codes.to(torch.uint8)
    return CMPQWeight(widths=widths.to(torch.uint8), codes=codes, codebooks=codebooks,
                      outlier_rows=parsed.outlier_rows, outlier_cols=parsed.outlier_cols,
                      outlier_values=parsed.outlier_values, codebook_format=parsed.codebook_format,
                      int8_grid=parsed.grid)


def use_tables(model: nn.Module, mode: str) -> int:
    """Set the one-token look-up tables ("auto", "float" or "int8") of every CMPQ layer of `model`; returns how
    many layers."""
    native.table_mode(mode)  # validates
    layers = [m for m in model.modules() if isinstance(m, CMPQLinear)]
    for layer in layers:
        layer.tables = mode
    return len(layers)


class CMPQLinear(PackedLinear):
    """nn.Linear's drop-in from packed CMPQ tensors (buffers named as in the file).

    Two paths: the native kernels (`cmpq.kernels.native`: a LUT-GEMV for few tokens, dequantized tiles and
    dense matmuls for more, in bfloat16 for a bfloat16 input where the CPU multiplies bfloat16 natively) and the
    PyTorch reference (dequantize, then F.linear). `kernel` ("auto", "native", "reference"; default: $CMPQ_KERNEL
    or auto) and `isa` force either. `tables` ("auto", "float", "int8"; default: $CMPQ_TABLES or auto) chooses
    the one-token look-up tables: int8 (faster; each product rounded to 8 bits of its block's largest) where the
    CPU has them, or exact float (docs/kernels.md)."""

    def __init__(self, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.kernel: str | None = None  # None: $CMPQ_KERNEL, else "auto"
        self.isa: str | None = None     # None: $CMPQ_ISA, else the best this CPU has
        self.tables: str | None = None  # None: $CMPQ_TABLES, else auto
        self._native = None

    @classmethod
    def from_weight(cls, qw: CMPQWeight, bias: torch.Tensor | None = None) -> "CMPQLinear":
        rows, columns = qw.shape
        return cls(columns, rows, pack_cmpq(qw), bias)

    def quantized_weight(self, where: str = "layer") -> CMPQWeight:
        return unpack_cmpq(dict(self.named_buffers(recurse=False)), self.out_features, self.in_features, where)

    def dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.kernel or native.kernel_mode()
        if mode == "reference" or (mode == "auto" and native.library() is None):
            weight = self.dequantize().to(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        if native.library() is None:
            raise RuntimeError("the native kernels were forced but are not built")
        prepared = self._native
        if prepared is None:
            prepared = self._native = self.prepare_native()
        x2 = x.reshape(-1, self.in_features)
        tokens = x2.shape[0]
        if tokens == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        # LUT tables are float32; above MAX_BATCH a bfloat16 input gets bfloat16 tiles and a bfloat16 matmul where
        # the CPU multiplies bfloat16 natively, float32 ones elsewhere
        isa, threads = native.isa_code(self.isa), torch.get_num_threads()
        bf16_tiles = x2.dtype == torch.bfloat16 and native.bfloat16_tiles()
        lut = tokens <= native.MAX_BATCH or (not bf16_tiles and tokens <= native.lut_tokens(isa))
        dtype = torch.bfloat16 if bf16_tiles and not lut else torch.float32
        if x2.dtype != dtype or not x2.is_contiguous():
            x2 = x2.to(dtype).contiguous()
        bias = None if self.bias is None else self.bias.float().contiguous()
        int8 = native.use_int8_tables(self.tables, isa) if tokens == 1 else 0
        if int8:
            y = prepared.gemv_int8(x2, bias, threads, int8)
        else:
            y = prepared.gemv(x2, bias, isa, threads) if lut else prepared.matmul(x2, bias, isa, threads)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == y.dtype else y.to(x.dtype)

    def validate(self, where: str = "layer") -> None:
        """Raise FormatError on any inconsistency of the stored tensors (cheap: the codes are not unpacked)."""
        parse_cmpq(dict(self.named_buffers(recurse=False)), self.out_features, self.in_features, where)

    def prepare_native(self):
        """The kernels' view of this layer: stored-order codebooks in float32 and outlier deltas (value minus
        the codebook entry it replaces, read from the packed codes at the outlier positions only)."""
        parsed = parse_cmpq(dict(self.named_buffers(recurse=False)), self.out_features, self.in_features)
        return native.prepare(parsed.codes, parsed.stored_widths, parsed.order, parsed.entries, self.out_features,
                              self.in_features, parsed.outlier_rows, parsed.outlier_cols, parsed.outlier_values)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"levels={self.levels.tolist()}, outliers={self.outlier_values.numel()}"
