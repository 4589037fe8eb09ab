"""ctypes bindings of the native LUT kernels (`lut_kernels.c`), and the per-layer data they read.

The library is built by the package install (setup.py); when it is missing, `library()` returns None and warns
once, and quantized layers use the PyTorch reference path. `CMPQ_KERNEL=reference|native|auto` forces a
path; `CMPQ_ISA=avx512|avx2|portable|auto` forces an instruction set (tests run every one this CPU has).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cmpq.calibration.precision import native_bfloat16
from cmpq.packed.codes import codes_at

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
MAX_BATCH = 8  # tokens per LUT-GEMV call (the kernel's register blocking)
# Path choice, measured with `cmpq bench kernels` on 2-core machines: float32 inputs go through the LUT-GEMV in
# calls of 8 up to LUT_TOKENS[isa] tokens, larger batches (and bfloat16 inputs above MAX_BATCH) through dequantized
# tiles and a dense matmul. AVX-512 (Zen 4): the LUT-GEMV at 16 tokens 2x faster than tiles on 11008x4096, level at
# 64 on smollm2's shapes. AVX2 (Zen 3): one vpermps per 8 weights and token bounds it, and tiles win from 16 tokens
# (11008x4096: 37 against 47 ms; 1536x576: 0.61 against 0.75 ms).
LUT_TOKENS = {"avx512": 32, "avx2": MAX_BATCH, "portable": MAX_BATCH}
TILE_BYTES = 4 << 20  # one dequantized tile: small enough to stay in cache while the matmul reads it
_PAD = 16      # kernels load whole 16-float registers from tables and codebooks


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) if they were not built."""
    candidates = sorted(Path(__file__).parent.glob("_lut*.so")) + sorted(Path(__file__).parent.glob("_lut*.pyd"))
    if not candidates:
        warnings.warn("cmpq native kernels are not built (no C compiler with OpenMP at install time?); using the "
                      "PyTorch reference path. Reinstall with a compiler to get them.", stacklevel=2)
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.cmpq_lut_gemv.argtypes = [p, i64, p, p, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i32, i32]
    lib.cmpq_lut_gemv.restype = i32
    lib.cmpq_dequant_tile.argtypes = [p, i64, i64, i64, i32, i64, i64, p, p, p, p, p, p, p, i32, i32]
    lib.cmpq_dequant_tile.restype = i32
    lib.cmpq_isa_supported.argtypes = [i32]
    lib.cmpq_isa_supported.restype = i32
    lib.cmpq_best_isa.restype = i32
    return lib


@functools.cache
def bfloat16_tiles() -> bool:
    """Whether prefill of a bfloat16 input dequantizes to bfloat16 tiles and multiplies in bfloat16: only where the
    CPU has bfloat16 dot products. Elsewhere torch emulates them, and a bfloat16 matmul measured 4-100x slower than
    float32 (AVX2 Zen 3, 11008x4096, 16 tokens: 1.4 s against 15 ms), so tiles and matmul stay float32 there."""
    return native_bfloat16()


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """Instruction sets the kernels can use on this CPU (empty if the library is missing)."""
    lib = library()
    return tuple(name for name, code in ISAS.items() if lib is not None and lib.cmpq_isa_supported(code))


def kernel_mode() -> str:
    mode = os.environ.get("CMPQ_KERNEL", "auto")
    if mode not in ("auto", "native", "reference"):
        raise ValueError(f"CMPQ_KERNEL must be auto, native or reference, not '{mode}'")
    return mode


def isa_code(isa: str | None = None) -> int:
    """Code of the requested instruction set (-1 = the best available); called on every forward, so the
    answer per name is cached."""
    return _isa_code(isa or os.environ.get("CMPQ_ISA", "auto"))


@functools.cache
def lut_tokens(code: int) -> int:
    """Most float32 tokens that the LUT-GEMV takes for instruction set `code` (-1: the best available)."""
    lib = library()
    if code < 0:
        code = lib.cmpq_best_isa() if lib is not None else ISAS["portable"]
    return LUT_TOKENS[next(name for name, value in ISAS.items() if value == code)]


@functools.cache
def _isa_code(name: str) -> int:
    if name == "auto":
        return -1
    if name not in ISAS:
        raise ValueError(f"unknown ISA '{name}'; choose from auto, {', '.join(ISAS)}")
    if name not in supported_isas():
        raise RuntimeError(f"ISA '{name}' is not supported on this CPU (supported: {supported_isas()})")
    return ISAS[name]


_scratch = threading.local()


def _tables(floats: int) -> torch.Tensor:
    """This thread's LUT scratch of at least `floats` floats, kept between calls: a fresh allocation of a few
    hundred KB is a fresh mmap, and its page faults measured 10-20% of a batch-1 call on 11008x4096."""
    buffer = getattr(_scratch, "tables", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _scratch.tables = torch.empty(floats, dtype=torch.float32)
    return buffer


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass
class PreparedLayer:
    """What the kernels read for one layer, derived once from its packed tensors."""

    rows: int
    cols: int
    codes: torch.Tensor       # (groups * words + 4,) int16 storage of the uint16 words, zero-padded
    order: torch.Tensor        # (cols,) int32
    widths: torch.Tensor       # (cols,) uint8, stored order
    codebooks: torch.Tensor    # flat float32, stored order, padded
    cb_offset: torch.Tensor    # (cols,) int64
    table_offset: torch.Tensor  # (cols,) int64: LUT-GEMV table slots, max(16, 2^w) per column
    orow: torch.Tensor         # (rows + 1,) int32
    ocol: torch.Tensor         # (nnz,) int32
    odelta: torch.Tensor       # (nnz,) float32
    outlier_values: torch.Tensor  # (nnz,) float32, for the dense path
    outlier_pos: torch.Tensor     # (nnz,) int32: each outlier's stored column, for the dense path
    table_size: int

    def __post_init__(self) -> None:
        # Decode calls this layer once per token: the pointers of its fixed tensors are taken once here (the
        # tensors belong to this object; a copy of the module drops it, `PackedLinear.__getstate__`).
        self._order64 = self.order.long()
        self._fixed = (self.table_size, self.rows, self.cols, _ptr(self.codes), _ptr(self.order), _ptr(self.widths),
                       _ptr(self.codebooks), _ptr(self.cb_offset), _ptr(self.table_offset), _ptr(self.orow),
                       _ptr(self.ocol), _ptr(self.odelta))

    def gemv(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int = -1, threads: int = 0) -> torch.Tensor:
        """x (batch, cols) float32 contiguous -> (batch, rows), in LUT-GEMV calls of up to MAX_BATCH tokens."""
        batch = x.shape[0]
        y = torch.empty(batch, self.rows, dtype=torch.float32)
        chunk = min(batch, MAX_BATCH)
        tables = _tables(chunk * self.table_size + _PAD)
        lib = library()
        for start in range(0, batch, MAX_BATCH):
            n = min(MAX_BATCH, batch - start)
            status = lib.cmpq_lut_gemv(x[start].data_ptr(), n, y[start].data_ptr(), tables.data_ptr(), *self._fixed,
                                       _ptr(bias), isa, threads)
            if status != 0:
                raise RuntimeError(f"cmpq_lut_gemv failed (isa {isa}, batch {n})")
        return y

    def tile(self, g0: int, g1: int, out: torch.Tensor, isa: int = -1, threads: int = 0) -> torch.Tensor:
        """Rows [16 g0, 16 g1) of the dequantized weight, outliers applied, transposed with columns in stored
        order: (cols, rows of the tile), in `out`'s dtype (float32 or bfloat16), written into `out`."""
        if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
            raise ValueError(f"tile buffers are contiguous float32 or bfloat16, not {out.dtype}")
        width = min(self.rows, 16 * g1) - 16 * g0
        ld = 16 * (g1 - g0)
        view = out.view(-1)[: self.cols * ld].view(self.cols, ld)
        status = library().cmpq_dequant_tile(view.data_ptr(), ld, g0, g1, int(out.dtype == torch.bfloat16),
                                             self.rows, self.cols, _ptr(self.codes), _ptr(self.widths),
                                             _ptr(self.codebooks), _ptr(self.cb_offset), _ptr(self.orow),
                                             _ptr(self.outlier_pos), _ptr(self.outlier_values), isa, threads)
        if status != 0:
            raise RuntimeError(f"cmpq_dequant_tile failed (isa {isa}, groups {g0}..{g1})")
        return view[:, :width]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int = -1, threads: int = 0) -> torch.Tensor:
        """x (n, cols) float32 or bfloat16 -> (n, rows) in x's dtype (prefill): tiles of rows are dequantized in
        x's dtype into one cache-sized buffer, each followed by a dense matmul."""
        if self.rows == 0 or self.cols == 0:
            y = x.new_zeros(x.shape[0], self.rows)
            return y if bias is None else y + bias.to(y.dtype)
        x = x[:, self._order64]
        groups = -(-self.rows // 16)
        per_tile = max(1, min(groups, TILE_BYTES // (16 * self.cols * x.element_size())))
        buffer = torch.empty(self.cols * 16 * per_tile, dtype=x.dtype)
        parts = [x @ self.tile(g0, min(groups, g0 + per_tile), buffer, isa, threads)
                 for g0 in range(0, groups, per_tile)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y if bias is None else y + bias.to(y.dtype)


def prepare(codes: torch.Tensor, widths: torch.Tensor, order: torch.Tensor, entries: torch.Tensor,
            rows: int, cols: int, outlier_rows: torch.Tensor, outlier_cols: torch.Tensor,
            outlier_values: torch.Tensor) -> PreparedLayer:
    """Kernel data from a layer's stored columns (`codes`, `widths`, `entries` in stored order; stored column i
    is original column order[i]) and its outliers (original columns). The kernels add each outlier as
    value - the codebook entry it replaces, read from the packed codes at the outlier positions only."""
    if codes.element_size() != 2 or codes.dim() != 2 or codes.shape[1] != int(widths.long().sum()):
        raise ValueError(f"packed codes must be 16-bit (groups, sum of widths), got {codes.dtype} {tuple(codes.shape)}")
    sizes = 2 ** widths.long()
    offsets = torch.cumsum(sizes, 0) - sizes
    # AVX2's batch-1 LUT-GEMV tables repeat narrow columns' entries to 16, so its look-up needs no index mask
    slots = sizes.clamp(min=16)
    position = torch.empty(cols, dtype=torch.int64)  # stored position of each original column
    position[order.long()] = torch.arange(cols)
    stored_col = position[outlier_cols.long()]
    replaced = entries[offsets[stored_col] + codes_at(codes, widths, outlier_rows, stored_col)]
    rowptr = torch.zeros(rows + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(torch.bincount(outlier_rows, minlength=rows), 0).to(torch.int32)
    values = outlier_values.float()
    return PreparedLayer(
        rows=rows, cols=cols, order=order.to(torch.int32).contiguous(),
        # flat, plus 8 bytes: the SIMD paths read whole 64-bit windows, past the end for the last columns
        codes=torch.cat([codes.reshape(-1).view(torch.int16), torch.zeros(4, dtype=torch.int16)]),
        widths=widths.to(torch.uint8).contiguous(),
        codebooks=torch.cat([entries.float(), torch.zeros(_PAD, dtype=torch.float32)]).contiguous(),
        cb_offset=offsets.to(torch.int64).contiguous(),
        table_offset=(torch.cumsum(slots, 0) - slots).to(torch.int64).contiguous(), orow=rowptr,
        ocol=outlier_cols.to(torch.int32).contiguous(),
        odelta=(values - replaced.float()).contiguous(), outlier_values=values.contiguous(),
        outlier_pos=stored_col.to(torch.int32).contiguous(), table_size=int(slots.sum()))
