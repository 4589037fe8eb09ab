"""Native LUT kernels against the PyTorch reference: every bit mix 1..8, odd shapes, with and without
outliers, batch 1..64, every instruction set this CPU can run."""

import pytest
import torch

from cmpq.formats.cmpq import CMPQLinear
from cmpq.formats.synthetic import random_cmpq_layer
from cmpq.kernels import native

ISAS = native.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="native kernels not built")


def random_layer(rows, cols, widths, nnz, seed=0, codebook="fp16"):
    """Columns drawn at random from the width mix `widths`."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor(widths)[torch.randint(0, len(widths), (cols,), generator=g)]
    return random_cmpq_layer(rows, cols, mix, nnz, seed, codebook)


MIXES = [[1], [2], [3], [4], [5], [6], [7], [8], [2, 3], [3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
SHAPES = [(37, 29), (16, 64), (100, 77), (203, 130), (120, 45)]  # 120: partial passes of 2 and 4 groups


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "w" + "".join(map(str, m)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_reference(isa, mix, shape):
    rows, cols = shape
    layer = random_layer(rows, cols, mix, nnz=(rows * cols) // 50, seed=rows + len(mix))
    module = CMPQLinear.from_weight(layer, torch.randn(rows, generator=torch.Generator().manual_seed(1)))
    for batch in (1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 33, 64):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        module.kernel = "reference"
        expected = module(x)
        module.kernel, module.isa = "native", isa
        got = module(x)
        scale = expected.abs().max().item() + 1.0
        assert (got - expected).abs().max().item() <= 1e-5 * scale * cols ** 0.5, (isa, batch)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("groups, threads", [(69, 1), (69, 2), (131, 2)])
def test_tall_layers_take_passes_of_eight_groups_and_agree(isa, groups, threads):
    """At least 64 groups per thread switch one token to passes of 8 groups (69 at one thread, 131 at two); 69
    groups end on a pass of 4 and a single group, 131 on a chunk of 3; the last group is partial. At two threads 69
    groups take passes of 4."""
    rows, cols = groups * 16 - 5, 70
    layer = random_layer(rows, cols, [1, 2, 3, 4, 5, 6, 7, 8], nnz=rows * cols // 50, seed=3)
    module = CMPQLinear.from_weight(layer, torch.randn(rows, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.linear(x, module.dequantize(), module.bias)
    prepared = module.prepare_native()
    got = prepared.gemv(x, module.bias.float().contiguous(), native.ISAS[isa], threads)
    assert (got - expected).abs().max().item() <= 1e-5 * (expected.abs().max().item() + 1.0) * cols ** 0.5


@pytest.mark.parametrize("isa", ISAS)
def test_table_scratch_reused_across_layers_and_more_threads_than_columns(isa):
    """The tables live in one per-thread buffer that grows: a large layer, a small one, the large one again must
    each stay exact; a layer of 3 columns on 4 threads leaves some threads no columns to build."""
    layers = [random_layer(rows, cols, [2, 3, 4, 6], nnz=rows * cols // 50, seed=cols)
              for rows, cols in ((300, 900), (40, 3), (300, 900))]
    for threads in (1, 4):
        for layer in layers:
            module = CMPQLinear.from_weight(layer)
            for batch in (1, 3):
                x = torch.randn(batch, layer.widths.numel(), generator=torch.Generator().manual_seed(batch))
                expected = torch.nn.functional.linear(x, module.dequantize())
                got = module.prepare_native().gemv(x, None, native.ISAS[isa], threads)
                scale = expected.abs().max().item() + 1.0
                assert (got - expected).abs().max().item() <= 1e-5 * scale * x.shape[1] ** 0.5, (threads, batch)


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_without_outliers_int8_codebooks_and_3d_input(isa):
    layer = random_layer(48, 40, [2, 3, 4], nnz=0, codebook="int8")
    module = CMPQLinear.from_weight(layer)
    x = torch.randn(2, 3, 40)
    module.kernel = "reference"
    expected = module(x)
    module.kernel, module.isa = "native", isa
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_tiles_are_the_dequantized_weight_exactly(isa, dtype, monkeypatch):
    """Tiles of every size, the last one partial, with outliers: float32 tiles equal the dequantized weight bit
    for bit, bfloat16 tiles equal it rounded to bfloat16 (the rounding torch uses)."""
    rows, cols = 203, 77
    layer = random_layer(rows, cols, [1, 2, 3, 4, 5, 8], nnz=300, seed=3)
    module = CMPQLinear.from_weight(layer, torch.randn(rows))
    prepared = module.prepare_native()
    expected = module.dequantize()[:, prepared.order.long()].t().to(dtype)  # (cols, rows), stored order
    groups = -(-rows // 16)
    buffer = torch.empty(cols * 16 * groups, dtype=dtype)
    for per_tile in (1, 3, groups):
        got = torch.cat([prepared.tile(g0, min(groups, g0 + per_tile), buffer, native.ISAS[isa]).clone()
                         for g0 in range(0, groups, per_tile)], dim=1)
        assert torch.equal(got, expected), (isa, per_tile)
    monkeypatch.setattr(native, "TILE_BYTES", 16 * cols * 4 * 2)  # two groups per tile in the module's matmul
    for tokens in (5, 20, 40):  # LUT for both dtypes; LUT or tiles by ISA and dtype; tiles for both
        x = torch.randn(tokens, cols).to(dtype)
        module.kernel = "reference"
        reference = module(x)
        module.kernel, module.isa = "native", isa
        got = module(x)
        assert got.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), reference.float(), rtol=tolerance,
                                   atol=tolerance * reference.abs().max().item())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        prepared.tile(0, 1, torch.empty(cols * 16, dtype=torch.float16))


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def test_bfloat16_prefill_multiplies_in_bfloat16_only_where_the_cpu_does_it_natively(native_bf16, monkeypatch):
    """A bfloat16 input of 40 tokens goes to bfloat16 tiles where the CPU has bfloat16 dot products, to float32 tiles
    elsewhere (emulated bfloat16 matmuls measured up to 100x slower); 20 tokens take the LUT-GEMV on a CPU without
    them. The output is bfloat16 and agrees with the reference either way."""
    rows, cols = 203, 77
    module = CMPQLinear.from_weight(random_layer(rows, cols, [2, 3, 4], nnz=300, seed=5), torch.randn(rows))
    module.kernel = "native"
    monkeypatch.setattr(native, "bfloat16_tiles", lambda: native_bf16)
    monkeypatch.setattr(native, "lut_tokens", lambda code: 32)  # as on AVX-512
    prepared = module._native = module.prepare_native()
    tiles, gemvs = [], []
    tile, gemv = prepared.tile, prepared.gemv
    monkeypatch.setattr(prepared, "tile", lambda g0, g1, out, *a: tiles.append(out.dtype) or tile(g0, g1, out, *a))
    monkeypatch.setattr(prepared, "gemv", lambda x, *a: gemvs.append(x.dtype) or gemv(x, *a))
    for tokens in (20, 40):
        x = torch.randn(tokens, cols).bfloat16()
        got = module(x)
        assert got.dtype == torch.bfloat16
        reference = torch.nn.functional.linear(x.float(), module.dequantize(), module.bias)
        torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    assert set(tiles) == {torch.bfloat16 if native_bf16 else torch.float32}
    assert gemvs == ([] if native_bf16 else [torch.float32])


def test_auto_falls_back_to_reference_with_a_warning_when_the_kernels_are_missing(monkeypatch):
    module = CMPQLinear.from_weight(random_layer(32, 24, [3], nnz=5))
    x = torch.randn(1, 24)
    expected = torch.nn.functional.linear(x, module.dequantize())
    monkeypatch.setattr(native, "library", lambda: None)
    torch.testing.assert_close(module(x), expected)  # auto: reference
    module.kernel = "native"
    with pytest.raises(RuntimeError, match="not built"):
        module(x)


@pytest.mark.parametrize("isa", ISAS)
def test_float32_batches_above_the_isa_threshold_take_tiles(isa, monkeypatch):
    """The LUT-GEMV takes float32 batches up to the ISA's threshold (8 tokens on AVX2, 32 on AVX-512), dequantized
    tiles the rest; both agree with the reference."""
    rows, cols = 100, 77
    module = CMPQLinear.from_weight(random_layer(rows, cols, [2, 3, 4], nnz=50, seed=6))
    module.kernel, module.isa = "native", isa
    prepared = module._native = module.prepare_native()
    paths = []
    gemv, matmul = prepared.gemv, prepared.matmul
    monkeypatch.setattr(prepared, "gemv", lambda x, *a: paths.append(("lut", x.shape[0])) or gemv(x, *a))
    monkeypatch.setattr(prepared, "matmul", lambda x, *a: paths.append(("tiles", x.shape[0])) or matmul(x, *a))
    limit = native.LUT_TOKENS[isa]
    for tokens in (limit, limit + 1):
        x = torch.randn(tokens, cols)
        torch.testing.assert_close(module(x), torch.nn.functional.linear(x, module.dequantize()), rtol=1e-5, atol=1e-4)
    assert paths == [("lut", limit), ("tiles", limit + 1)]


def test_forcing_an_unknown_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("CMPQ_ISA", "sse9")
    module = CMPQLinear.from_weight(random_layer(32, 24, [3], nnz=5))
    module.kernel = "native"
    with pytest.raises(ValueError, match="unknown ISA"):
        module(torch.randn(1, 24))


def test_kernel_benchmark_writes_ratios_and_bandwidth(tmp_path):
    from cmpq.bench import kernels
    from cmpq.formats.synthetic import mixed_widths

    widths = mixed_widths(100, 2.5)
    assert widths.float().mean().item() == 2.5 and set(widths.tolist()) == {2, 3}
    records = kernels.run(tmp_path, [(64, 100)], (2.5, 3.0), (1, 9), repeats=2, progress=False)
    assert [(r["bits"], r["batch"]) for r in records] == [(2.5, 1), (2.5, 9), (3.0, 1), (3.0, 9)]
    for r in records:
        assert r["ours_ms"] > 0 and r["speedup_vs_fp32"] > 0 and r["copy_gbps"] > 0 and r["weight_gbps"] > 0
    assert (tmp_path / "kernels.jsonl").read_text().count("\n") == 4
    assert "% copy" in (tmp_path / "kernels.md").read_text()
    assert all(0 < r["copy_fraction"] for r in records)
    one_token = [r for r in records if r["batch"] == 1]
    if native.int8_supported():  # the int8 tables are timed for one token only
        assert all(r["int8_ms"] > 0 and r["int8_copy_fraction"] > 0 for r in one_token)
    assert all(r["int8_ms"] is None for r in records if r["batch"] != 1)


def test_copy_fraction_pairs_each_timed_run_with_the_copy_after_it(monkeypatch):
    """Rounds (kernel seconds, copy GB/s): (1e-3, 10), (2e-3, 40), (4e-3, 5) for 1e7 weight bytes give
    fractions 10/10, 5/40, 2.5/5: median 0.5, where the medians' ratio would be 5/10 = 0.5 only by chance."""
    from cmpq.bench import kernels

    times, copies = iter([1e-3, 2e-3, 4e-3]), iter([10.0, 40.0, 5.0])
    monkeypatch.setattr(kernels, "_timed", lambda fn, loops: next(times))

    class Reference:
        def gbps(self):
            return next(copies)

    seconds, copy, fraction = kernels.paired_copy_fraction(lambda: None, 10**7, Reference(), repeats=3,
                                                           min_seconds=0)
    assert (seconds, copy, fraction) == (2e-3, 10.0, pytest.approx(0.5))
    monkeypatch.undo()
    assert kernels.CopyReference(megabytes=4).gbps() > 0


def test_copies_and_pickles_of_a_used_layer_do_not_share_its_kernel_view():
    import copy
    import io

    module = CMPQLinear.from_weight(random_layer(64, 40, [2, 3], nnz=20))
    module.kernel = "native"
    x = torch.randn(1, 40)
    expected = module(x)  # builds the kernels' view (raw pointers into this module's tensors)
    clone = copy.deepcopy(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    module.codes.zero_()  # the original changes; the copies must not see it
    module._native = None
    torch.testing.assert_close(clone(x), expected)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected)


INT8_KERNELS = [name for name in ("avx2", "avx512") if native.int8_isa(native.ISAS[name]) == native.ISAS[name]]
INT8 = pytest.mark.skipif(not native.int8_supported(), reason="int8 tables need AVX2 or AVX-512")


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "w" + "".join(map(str, m)))
@pytest.mark.parametrize("shape", SHAPES + [(1100, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_table_kernel_matches_its_reference(kernel, mix, shape):
    """Every int8 kernel this CPU has, every width mix (wide columns stay float), odd shapes, runs not multiples
    of a quad or a block, with and without outliers, 1 and 2 threads: the same integers as the reference, so
    only the float sums' order differs."""
    rows, cols = shape
    for nnz in ((rows * cols) // 50, 0):
        layer = random_layer(rows, cols, mix, nnz=nnz, seed=rows + len(mix))
        module = CMPQLinear.from_weight(layer, torch.randn(rows, generator=torch.Generator().manual_seed(1)))
        prepared = module.prepare_native()
        for seed in range(3):
            x = torch.randn(1, cols, generator=torch.Generator().manual_seed(cols + seed))
            expected = native.int8_reference(prepared, x, module.bias)
            for threads in (1, 2):
                got = prepared.gemv_int8(x, module.bias.float().contiguous(), threads, native.ISAS[kernel])
                scale = expected.abs().max().item() + 1.0
                assert (got - expected).abs().max().item() <= 2e-6 * scale, (nnz, seed, threads)


def test_int8_kernels_this_cpu_lacks_are_refused():
    prepared = CMPQLinear.from_weight(random_layer(16, 8, [3], nnz=0)).prepare_native()
    with pytest.raises(RuntimeError, match="no int8-table kernel"):
        prepared.gemv_int8(torch.randn(1, 8), None, 1, native.ISAS["portable"])


def test_int8_reference_rounds_each_blocks_products_to_8_bits_and_leaves_wide_columns_exact():
    """Against the exact layer: within half a step (the block's largest product / 127) per narrow column, and
    equal when every column is wider than 4 bits."""
    rows, cols = 70, 100
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(5))
    for mix, exact_expected in (([1, 2, 3, 4], False), ([5, 6], True)):
        module = CMPQLinear.from_weight(random_layer(rows, cols, mix, nnz=rows * cols // 50, seed=2))
        prepared = module.prepare_native()
        exact = torch.nn.functional.linear(x, module.dequantize())
        got = native.int8_reference(prepared, x)
        if exact_expected:
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
            continue
        qw = module.quantized_weight()
        largest = (qw.codebooks.abs().amax(1) * x.abs()).amax(1)  # a bound on every block's largest product
        bound = 0.5 * largest / 127 * cols
        assert ((got - exact).abs().amax(1) <= bound).all()
        assert (got - exact).abs().max() > 0  # it does round


def test_pack_quads_puts_row_r_column_c_at_bits_4r_plus_c_times_w():
    codes = torch.randint(0, 8, (32, 6), generator=torch.Generator().manual_seed(0))
    packed = native.pack_quads(codes, 3)
    assert packed.shape == (2, 2 * 8 * 3)  # 2 groups, 2 quads (6 columns padded to 8) of 24 bytes
    for g in range(2):
        for quad in range(2):
            data = packed[g, quad * 24:(quad + 1) * 24].tolist()
            bits = sum(b << (8 * i) for i, b in enumerate(data))
            for r in range(16):
                for c in range(4):
                    col = quad * 4 + c
                    want = int(codes[16 * g + r, col]) if col < 6 else 0
                    assert (bits >> ((4 * r + c) * 3)) & 7 == want


@pytest.mark.parametrize("width", [3, 4])
def test_pack_nibbles_puts_row_and_column_where_the_avx2_kernel_reads_them(width):
    codes = torch.randint(0, 2 ** width, (32, 6), generator=torch.Generator().manual_seed(width))
    packed = native.pack_nibbles(codes, width)
    assert packed.shape == (2, 2 * 32)  # 2 groups, 2 quads (6 columns padded to 8) of 32 bytes
    for g in range(2):
        for quad in range(2):
            data = packed[g, quad * 32:(quad + 1) * 32].tolist()
            for k, byte in enumerate(data):
                row = 16 * g + 8 * (k // 16) + (k % 16) // 2
                for nibble, value in enumerate((byte & 15, byte >> 4)):
                    col = quad * 4 + 2 * nibble + k % 2
                    want = int(codes[row, col]) if col < 6 else 0
                    assert value == want + (8 * (k % 2) if width < 4 else 0)


@INT8
def test_layer_int8_tables_apply_to_one_token_only_and_bad_modes_are_errors(monkeypatch):
    layer = random_layer(64, 96, [2, 3, 4], nnz=60)
    module = CMPQLinear.from_weight(layer)
    module.kernel = "native"
    one, two = torch.randn(1, 96), torch.randn(2, 96)
    exact_one, exact_two = module(one), module(two)  # CMPQ_TABLES=float (conftest)
    module.tables = "int8"
    torch.testing.assert_close(module(one), native.int8_reference(module.prepare_native(), one), rtol=1e-5, atol=1e-5)
    assert not torch.equal(module(one), exact_one)
    assert torch.equal(module(two), exact_two)  # batches keep exact float tables
    int8_one = module(one)
    module.tables = None
    monkeypatch.setenv("CMPQ_TABLES", "int8")
    assert torch.equal(module(one), int8_one)
    monkeypatch.delenv("CMPQ_TABLES")  # the default, auto: the exact float tables
    assert torch.equal(module(one), exact_one)
    monkeypatch.setenv("CMPQ_TABLES", "int8")
    for isa in INT8_KERNELS:  # a forced ISA gets its own int8 kernel: the same integers
        module.isa = isa
        torch.testing.assert_close(module(one), int8_one, rtol=1e-5, atol=1e-5)
    module.isa = "portable"  # no int8 kernel: exact float tables
    monkeypatch.setenv("CMPQ_TABLES", "auto")
    torch.testing.assert_close(module(one), torch.nn.functional.linear(one, module.dequantize()), rtol=1e-5, atol=1e-5)
    module.isa = None
    monkeypatch.setenv("CMPQ_TABLES", "int4")
    with pytest.raises(ValueError, match="auto, float or int8"):
        module(one)
    monkeypatch.setenv("CMPQ_TABLES", "int8")
    monkeypatch.setattr(native, "int8_isa", lambda isa=-1: 0)
    native.warn_int8_unsupported.cache_clear()
    with pytest.warns(UserWarning, match="AVX2 or AVX-512"):
        assert torch.equal(module(one), exact_one)

def test_the_layer_struct_has_the_same_layout_in_c_and_python():
    """The library's cmpq_layer_t and native.CMPQLayer: the same size and last field offset (checked at load),
    and the same field names, order and kinds as cmpq_kernels.h declares them (which the sizes alone would miss
    for two swapped fields of one size)."""
    import ctypes
    import re
    from pathlib import Path

    lib = native.library()
    native.check_layout(lib)
    assert lib.cmpq_layer_size() == ctypes.sizeof(native.CMPQLayer)
    assert lib.cmpq_layer_last_offset() == getattr(native.CMPQLayer, native.CMPQLayer._fields_[-1][0]).offset
    header = Path(native.__file__).with_name("cmpq_kernels.h")
    if not header.exists():
        pytest.skip("the C sources are not beside native.py")
    body = re.search(r"typedef struct cmpq_layer \{(.*?)\} cmpq_layer_t;", header.read_text(), re.S).group(1)
    declared = []
    for line in re.sub(r"/\*.*?\*/", "", body, flags=re.S).splitlines():
        if line.strip():
            kind, name = re.fullmatch(r"\s*(.+?)\s*(\w+);\s*", line).groups()
            declared.append((name, ctypes.c_void_p if "*" in kind else {"int64_t": ctypes.c_int64}[kind]))
    assert declared == [(name, kind) for name, kind in native.CMPQLayer._fields_]


def test_a_layer_struct_of_another_layout_or_a_stale_library_is_refused(monkeypatch):
    import ctypes
    import types

    lib = native.library()

    class Shorter(ctypes.Structure):
        _fields_ = native.CMPQLayer._fields_[:-1]

    class Longer(ctypes.Structure):
        _fields_ = native.CMPQLayer._fields_ + [("extra", ctypes.c_int32)]

    for wrong in (Shorter, Longer):
        with pytest.raises(RuntimeError, match="disagree .* layer struct"):
            native.check_layout(lib, wrong)
    with pytest.raises(RuntimeError, match="predate the layer struct"):
        native.check_layout(types.SimpleNamespace(_name="old_lut.so"))
    monkeypatch.setattr(native, "CMPQLayer", Shorter)  # what loading the library checks
    with pytest.raises(RuntimeError, match="disagree"):
        native.library.__wrapped__()


@INT8
def test_the_int8_kernel_refuses_a_layer_struct_without_int8_codes():
    """The prepared layer's own struct has no codes8 (only an int8 view's copy has): an error, not a crash."""
    prepared = CMPQLinear.from_weight(random_layer(32, 40, [3], nnz=5)).prepare_native()
    kernel = native.int8_isa()
    view = prepared.int8_view(kernel)
    assert view.layer.codes8 == view.codes8.data_ptr() and view.layer.rows == 32 and prepared._layer.codes8 is None
    x, y = torch.randn(1, 40), torch.empty(1, 32)
    tables = torch.empty(prepared.table_size + 16)
    tables8, scales = torch.empty(view.table_bytes + 64, dtype=torch.int8), torch.empty(view.blocks + 1)
    args = (x.data_ptr(), y.data_ptr(), tables.data_ptr(), tables8.data_ptr(), tables8.numel(), scales.data_ptr(),
            scales.numel(), None, kernel, 1)
    lib = native.library()
    assert lib.cmpq_lut_gemv_int8(prepared._layer, *args) == -1
    assert lib.cmpq_lut_gemv_int8(view.layer, *args) == 0
    torch.testing.assert_close(y, native.int8_reference(prepared, x), rtol=1e-5, atol=1e-5)


def test_a_copied_prepared_layer_points_at_its_own_tensors():
    import copy
    import pickle

    module = CMPQLinear.from_weight(random_layer(64, 40, [2, 3, 5], nnz=20))
    prepared = module.prepare_native()
    x = torch.randn(3, 40)
    expected = prepared.gemv(x, None)
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        assert clone._layer.codes == clone.codes.data_ptr() != prepared._layer.codes
        assert torch.equal(clone.gemv(x, None), expected)
        if native.int8_supported():
            torch.testing.assert_close(clone.gemv_int8(x[:1], None), prepared.gemv_int8(x[:1], None))
