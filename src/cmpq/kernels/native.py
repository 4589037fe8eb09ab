"""ctypes bindings of the native LUT kernels (the C files beside this one), and the per-layer data they read.

The library is built by the package install (setup.py); when it is missing, `library()` returns None and warns
once, and quantized layers use the PyTorch reference path. The kernels take each layer as one struct,
`cmpq_layer_t` in cmpq_kernels.h, mirrored here by `CMPQLayer`; `library()` checks that both have the same layout
and raises if not (a stale build, or a field changed on one side only). `CMPQ_KERNEL=reference|native|auto`
forces a path; `CMPQ_ISA=avx512|avx2|portable|auto` forces an instruction set (tests run every one this CPU has).
One-token calls can use int8 look-up tables (a kernel for AVX-512 with VBMI and VNNI, one for AVX2): faster
layers, each product rounded to 8 bits of its block's largest (`int8_reference` is the exact definition of what
they compute). `CMPQ_TABLES=int8` (or a layer's `tables = "int8"`) chooses them wherever the ISA has a kernel
(and warns where none does); `float` and `auto` (the default) keep the exact float tables.
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
from cmpq.formats.bitpack import codes_at, unpack_codes

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


class CMPQLayer(ctypes.Structure):
    """`cmpq_layer_t` of cmpq_kernels.h, field for field (same names, order and types): one packed layer as the
    kernels read it, passed by pointer. Pointers are raw addresses of tensors that the owner keeps alive; the int8
    fields are set only in an int8 kernel's copy (`Int8Layer.layer`)."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("codes", ctypes.c_void_p),         # (groups, words) uint16, + 8 bytes of padding
        ("order", ctypes.c_void_p),         # (cols) int32: stored column -> original column
        ("widths", ctypes.c_void_p),        # (cols) uint8, stored order
        ("codebooks", ctypes.c_void_p),     # flat float32, stored order, padded
        ("cb_offset", ctypes.c_void_p),     # (cols) int64
        ("table_offset", ctypes.c_void_p),  # (cols) int64: LUT-GEMV table slots, max(16, 2^w) per column
        ("table_size", ctypes.c_int64),
        ("orow", ctypes.c_void_p),          # (rows + 1) int32: outliers CSR
        ("ocol", ctypes.c_void_p),          # (nnz) int32: original columns (LUT-GEMV)
        ("odelta", ctypes.c_void_p),        # (nnz) float32: value - the codebook value it replaces (LUT-GEMV)
        ("opos", ctypes.c_void_p),          # (nnz) int32: stored columns (tiles)
        ("ovalue", ctypes.c_void_p),        # (nnz) float32: values (tiles)
        ("codes8", ctypes.c_void_p),        # int8 kernels: the narrow columns' codes in that kernel's layout
        ("stride8", ctypes.c_int64),        # int8 kernels: bytes of codes8 per 16-row group
        ("amax", ctypes.c_void_p),          # int8 kernels: (cols) float32, each column's largest |entry|
    ]


def check_layout(lib: ctypes.CDLL, layer_type: type[ctypes.Structure] | None = None) -> None:
    """Raise RuntimeError unless the library's `cmpq_layer_t` has the size of `layer_type` (default: CMPQLayer)
    and its last field at the same offset: ctypes cannot see the C struct, and a mismatch would make the kernels
    read wrong pointers."""
    layer_type = layer_type or CMPQLayer
    name = getattr(lib, "_name", lib)
    try:
        size, last_offset = lib.cmpq_layer_size, lib.cmpq_layer_last_offset
    except AttributeError:
        raise RuntimeError(f"the native kernels {name} predate the layer struct that cmpq.kernels.native passes "
                           "(no cmpq_layer_size): rebuild them (pip install -e . or python setup.py build_ext "
                           "--inplace)") from None
    size.argtypes = last_offset.argtypes = []
    size.restype = last_offset.restype = ctypes.c_int64
    last = layer_type._fields_[-1][0]
    c_layout = (int(size()), int(last_offset()))
    py_layout = (ctypes.sizeof(layer_type), getattr(layer_type, last).offset)
    if c_layout != py_layout:
        raise RuntimeError(
            f"the native kernels {name} disagree with cmpq.kernels.native on the layer struct: cmpq_layer_t is "
            f"{c_layout[0]} bytes with its last field at offset {c_layout[1]}, {layer_type.__name__} is "
            f"{py_layout[0]} bytes with '{last}' at {py_layout[1]}. Keep the fields of cmpq_kernels.h and "
            f"{layer_type.__name__} equal, and rebuild the kernels (pip install -e . or python setup.py build_ext "
            "--inplace).")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) if they were not built. Raises RuntimeError if they were
    built from a different layer struct (`check_layout`)."""
    candidates = sorted(Path(__file__).parent.glob("_lut*.so")) + sorted(Path(__file__).parent.glob("_lut*.pyd"))
    if not candidates:
        warnings.warn("cmpq native kernels are not built (no C compiler with OpenMP at install time?); using the "
                      "PyTorch reference path. Reinstall with a compiler to get them.", stacklevel=2)
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    check_layout(lib)
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of the exported functions (dispatch.c)."""
    p, i64, i32, layer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(CMPQLayer)
    # (layer, x, batch, y, tables, bias, isa, threads)
    lib.cmpq_lut_gemv.argtypes = [layer, p, i64, p, p, p, i32, i32]
    lib.cmpq_lut_gemv.restype = i32
    # (layer, out, ld, g0, g1, bf16, isa, threads)
    lib.cmpq_dequant_tile.argtypes = [layer, p, i64, i64, i64, i32, i32, i32]
    lib.cmpq_dequant_tile.restype = i32
    lib.cmpq_isa_supported.argtypes = [i32]
    lib.cmpq_isa_supported.restype = i32
    lib.cmpq_best_isa.restype = i32
    lib.cmpq_int8_isa.argtypes = [i32]
    lib.cmpq_int8_isa.restype = i32
    lib.cmpq_int8_sizes.argtypes = [p, i64, i32, p]
    lib.cmpq_int8_sizes.restype = None
    # (layer, x, y, tables, tables8, tables8 bytes, scales, scales count, bias, isa, threads)
    lib.cmpq_lut_gemv_int8.argtypes = [layer, p, p, p, p, i64, p, i64, p, i32, i32]
    lib.cmpq_lut_gemv_int8.restype = i32


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


@functools.cache
def int8_isa(isa: int = -1) -> int:
    """ISA code of the int8-table kernel that a call with ISA code `isa` (-1: the best) gets here: avx512 (with
    VBMI and VNNI), avx2 (also on AVX-512 CPUs without VNNI), or 0 for none (portable code: float tables)."""
    lib = library()
    return 0 if lib is None else int(lib.cmpq_int8_isa(isa))


def int8_supported() -> bool:
    """Whether an int8-table kernel can run here (AVX2, or AVX-512 with VBMI and VNNI)."""
    return int8_isa() > 0


TABLE_MODES = ("auto", "float", "int8")


def table_mode(requested: str | None = None) -> str:
    """Look-up tables of one-token calls: `requested`, else $CMPQ_TABLES, else auto."""
    mode = requested or os.environ.get("CMPQ_TABLES", "auto")
    if mode not in TABLE_MODES:
        raise ValueError(f"look-up tables must be auto, float or int8 (CMPQ_TABLES / tables), not '{mode}'")
    return mode


def use_int8_tables(requested: str | None, isa: int) -> int:
    """The int8-table kernel (an ISA code; 0: exact float tables) of a one-token call with ISA code `isa` (-1: the
    best): under "int8" the one that ISA has (none on the portable path, which then warns once), under "float"
    and "auto" none (measured end to end, the int8 tables decoded no faster than the exact ones)."""
    mode = table_mode(requested)
    if mode in ("float", "auto"):  # auto: exact tables, the int8 ones measured no faster end to end
        return 0
    kernel = int8_isa(isa)
    if kernel == 0 and mode == "int8":
        warn_int8_unsupported()
    return kernel


@functools.cache
def warn_int8_unsupported() -> None:
    warnings.warn("int8 look-up tables need AVX2 or AVX-512 (and the native kernels); using float tables",
                  stacklevel=4)


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
        # tensors belong to this object; a copy of the module drops it, `PackedLinear.__getstate__`, and a copy of
        # this object takes its own, `__setstate__`).
        self._order64 = self.order.long()
        self._layer = CMPQLayer(
            rows=self.rows, cols=self.cols, codes=_ptr(self.codes), order=_ptr(self.order), widths=_ptr(self.widths),
            codebooks=_ptr(self.codebooks), cb_offset=_ptr(self.cb_offset), table_offset=_ptr(self.table_offset),
            table_size=self.table_size, orow=_ptr(self.orow), ocol=_ptr(self.ocol), odelta=_ptr(self.odelta),
            opos=_ptr(self.outlier_pos), ovalue=_ptr(self.outlier_values))

    def __getstate__(self) -> dict:
        # the struct and the int8 views hold raw pointers into this object's tensors: a copy makes its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_order64", "_layer", "_int8")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def dense_codes(self) -> torch.Tensor:
        """(rows, cols) int64 codes in stored column order, unpacked from the kernel's copy."""
        widths = self.widths.long()
        groups, words = -(-self.rows // 16), int(widths.sum())
        return unpack_codes(self.codes[: groups * words].view(groups, words), widths, self.rows)

    def int8_view(self, kernel: int) -> "Int8Layer":
        """Int8-table kernel `kernel`'s extra data, made on first use (a second copy of the narrow columns' codes,
        in that kernel's layout)."""
        views = self.__dict__.setdefault("_int8", {})
        if kernel not in views:
            views[kernel] = int8_layer(self, kernel)
        return views[kernel]

    def gemv_int8(self, x: torch.Tensor, bias: torch.Tensor | None, threads: int = 0,
                  kernel: int | None = None) -> torch.Tensor:
        """x (1, cols) float32 contiguous -> (1, rows) with int8 tables for the columns of up to 4 bits, by int8
        kernel `kernel` (an ISA code; default: the best here)."""
        kernel = int8_isa() if kernel is None else kernel
        if kernel not in (ISAS["avx2"], ISAS["avx512"]) or int8_isa(kernel) != kernel:
            raise RuntimeError(f"no int8-table kernel for ISA code {kernel} on this CPU")
        v = self.int8_view(kernel)
        if v.blocks == 0:  # no column of up to 4 bits: the float kernel computes the same, with its own passes
            return self.gemv(x, bias, kernel, threads)
        y = torch.empty(1, self.rows, dtype=torch.float32)
        tables = _tables(self.table_size + _PAD)
        scratch8, scales = _int8_scratch(v.table_bytes + 64, v.blocks + 1)
        status = library().cmpq_lut_gemv_int8(v.layer, x.data_ptr(), y.data_ptr(), tables.data_ptr(),
                                              scratch8.data_ptr(), scratch8.numel(), scales.data_ptr(),
                                              scales.numel(), _ptr(bias), kernel, threads)
        if status != 0:
            raise RuntimeError(f"cmpq_lut_gemv_int8 failed ({status})")
        return y

    def gemv(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int = -1, threads: int = 0) -> torch.Tensor:
        """x (batch, cols) float32 contiguous -> (batch, rows), in LUT-GEMV calls of up to MAX_BATCH tokens."""
        batch = x.shape[0]
        y = torch.empty(batch, self.rows, dtype=torch.float32)
        chunk = min(batch, MAX_BATCH)
        tables = _tables(chunk * self.table_size + _PAD)
        lib = library()
        for start in range(0, batch, MAX_BATCH):
            n = min(MAX_BATCH, batch - start)
            status = lib.cmpq_lut_gemv(self._layer, x[start].data_ptr(), n, y[start].data_ptr(), tables.data_ptr(),
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
        status = library().cmpq_dequant_tile(self._layer, view.data_ptr(), ld, g0, g1,
                                             int(out.dtype == torch.bfloat16), isa, threads)
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


INT8_BLOCK = 32   # stored columns per int8 scale (cmpq_kernels.h)
INT8_MAX_WIDTH = 4


@dataclass
class Int8Layer:
    """An int8-table kernel's view of a layer: the codes of its columns of up to 4 bits in that kernel's layout
    (see int8_avx512.c and int8_avx2.c), and each stored column's largest |codebook entry|."""

    codes8: torch.Tensor   # (groups * stride8 + 64,) uint8
    stride8: int
    amax: torch.Tensor     # (cols,) float32
    table_bytes: int
    blocks: int
    layer: CMPQLayer       # the prepared layer's struct with codes8, stride8 and amax set, made once


def width_runs(widths: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first, end, width) of each run of equal width in stored order."""
    runs, w = [], widths.tolist()
    start = 0
    for i in range(1, len(w) + 1):
        if i == len(w) or w[i] != w[start]:
            runs.append((start, i, w[start]))
            start = i
    return runs


def _quad_padded(codes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(groups * 16, n) codes -> (codes with zero columns up to a multiple of 4, groups, quads)."""
    rows, n = codes.shape
    groups, quads = rows // 16, -(-n // 4)
    padded = torch.zeros(rows, quads * 4, dtype=torch.int64)
    padded[:, :n] = codes
    return padded, groups, quads


def pack_quads(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(groups * 16, n) codes of one width -> (groups, quads * 8 * width) uint8: per 16-row group, quads of 4
    columns, row r and column c of a quad at bits (4 r + c) * width (rows 2q, 2q + 1 in bytes q*w .. q*w + w - 1)."""
    padded, groups, quads = _quad_padded(codes)
    pairs = padded.view(groups, 8, 2, quads, 4)
    shifts = ((torch.arange(2).view(2, 1) * 4 + torch.arange(4).view(1, 4)) * width).view(1, 1, 2, 1, 4)
    value = (pairs << shifts).sum(dim=(2, 4))                                   # (groups, 8, quads): 8w bits
    data = torch.stack([(value >> (8 * b)) & 0xFF for b in range(width)], -1)   # (groups, 8, quads, w)
    return data.permute(0, 2, 1, 3).reshape(groups, quads * 8 * width).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(groups * 16, n) codes of one width -> (groups, quads * 32) uint8, the AVX2 int8 kernel's layout: per
    16-row group, quads of 4 columns in 32 bytes; byte k holds row 8 (k // 16) + (k % 16) // 2, the quad's column
    k % 2 in its low nibble and column 2 + k % 2 in its high one; below 4 bits the odd column of each pair adds 8
    (it looks up the upper half of the pair's 16-byte table)."""
    padded, groups, quads = _quad_padded(codes)
    nib = padded.view(groups, 2, 8, quads, 2, 2)           # group, lane, row in lane, quad, nibble, column of pair
    if width < 4:
        nib = nib + 8 * torch.arange(2)
    byte = nib[:, :, :, :, 0, :] | (nib[:, :, :, :, 1, :] << 4)   # (groups, lane, row, quad, column of pair)
    return byte.permute(0, 3, 1, 2, 4).reshape(groups, quads * 32).to(torch.uint8)


def int8_layer(prepared: "PreparedLayer", kernel: int) -> Int8Layer:
    """Int8-table kernel `kernel`'s view of `prepared` (its codes in quads for AVX-512, nibbles for AVX2)."""
    widths = prepared.widths.long()
    groups = -(-prepared.rows // 16)
    dense = torch.zeros(groups * 16, prepared.cols, dtype=torch.int64)
    if prepared.rows and prepared.cols:
        dense[: prepared.rows] = prepared.dense_codes()
    pack = pack_quads if kernel == ISAS["avx512"] else pack_nibbles
    parts = [pack(dense[:, a:b], w) for a, b, w in width_runs(widths) if w <= INT8_MAX_WIDTH]
    codes8 = torch.cat(parts, 1) if parts else torch.zeros(groups, 0, dtype=torch.uint8)
    amax = torch.zeros(prepared.cols, dtype=torch.float32)
    for w in torch.unique(widths).tolist():
        cols = (widths == w).nonzero()[:, 0]
        index = prepared.cb_offset[cols].unsqueeze(1) + torch.arange(2 ** w)
        amax[cols] = prepared.codebooks[index].abs().amax(1)
    sizes = torch.zeros(2, dtype=torch.int64)
    library().cmpq_int8_sizes(_ptr(prepared.widths), prepared.cols, kernel, sizes.data_ptr())
    flat = torch.cat([codes8.reshape(-1), torch.zeros(64, dtype=torch.uint8)])
    stride8 = codes8.shape[1]
    layer = CMPQLayer.from_buffer_copy(prepared._layer)
    layer.codes8, layer.stride8, layer.amax = _ptr(flat), stride8, _ptr(amax)
    return Int8Layer(codes8=flat, stride8=stride8, amax=amax, table_bytes=int(sizes[0]), blocks=int(sizes[1]),
                     layer=layer)


def _int8_scratch(nbytes: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int8 tables and block scales, kept between calls like the float tables."""
    pair = getattr(_scratch, "int8", None)
    if pair is None or pair[0].numel() < nbytes or pair[1].numel() < blocks:
        pair = _scratch.int8 = (torch.empty(max(nbytes, 64), dtype=torch.int8), torch.empty(max(blocks, 1)))
    return pair


def int8_reference(prepared: "PreparedLayer", x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the int8-table kernel computes, in plain PyTorch (the definition its test checks): per token, each
    column of up to 4 bits looks up round(codebook * x * 127 / m) * m / 127, m the largest |codebook * x| of its
    block of 32 stored columns of one width; wider columns, outliers (value minus the entry they replace, times x)
    and bias are exact. x (tokens, cols) -> (tokens, rows)."""
    widths = prepared.widths.long()
    codes = prepared.dense_codes()
    xs = x.float()[:, prepared.order.long()]
    y = torch.zeros(x.shape[0], prepared.rows)
    for a, b, w in width_runs(widths):
        index = prepared.cb_offset[a:b].unsqueeze(1) + torch.arange(2 ** w)
        entries = prepared.codebooks[index]                                    # (n, 2^w)
        for start in range(a, b, INT8_BLOCK if w <= INT8_MAX_WIDTH else b - a):
            end = min(b, start + INT8_BLOCK) if w <= INT8_MAX_WIDTH else b
            tables = entries[start - a:end - a].unsqueeze(0) * xs[:, start:end].unsqueeze(-1)  # (tokens, m, 2^w)
            if w <= INT8_MAX_WIDTH:
                top = tables.abs().amax(dim=(1, 2), keepdim=True)
                # a true division, as the kernels do (torch's `127.0 / top` multiplies by a reciprocal)
                inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
                q = torch.round(tables * inv).clamp(-127, 127)
                y += (q.gather(2, codes[:, start:end].T.unsqueeze(0).expand(x.shape[0], -1, -1)).sum(1)) * (top / 127).view(-1, 1)
            else:
                y += tables.gather(2, codes[:, start:end].T.unsqueeze(0).expand(x.shape[0], -1, -1)).sum(1)
    rows = torch.repeat_interleave(torch.arange(prepared.rows), (prepared.orow[1:] - prepared.orow[:-1]).long())
    y.index_add_(1, rows, x.float()[:, prepared.ocol.long()] * prepared.odelta)
    return y if bias is None else y + bias.float()


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
