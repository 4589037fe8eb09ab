"""The packed format: row-packed codes and bit streams, CMPQ layer packing (bit-identical, bits = accounting), clear errors."""

import pytest
import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import FormatError
from cmpq.formats.bitpack import pack_codes, pack_stream, padded_rows, unpack_codes, unpack_stream
from cmpq.formats.cmpq import CMPQLinear, unpack_cmpq
from cmpq.quantizers import get_quantizer


def random_codes(rows, widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 2 ** int(b), (rows,), generator=g) for b in widths], dim=1)


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 50, 64])
def test_packed_codes_round_trip_every_width(rows):
    widths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 3, 3, 1, 8])
    codes = random_codes(rows, widths)
    planes = pack_codes(codes, widths)
    assert planes.dtype == torch.uint16 and planes.shape == (padded_rows(rows) // 16, int(widths.sum()))
    assert torch.equal(unpack_codes(planes, widths, rows), codes)


def test_codes_are_row_packed_little_endian_in_16_row_groups():
    codes = torch.zeros(16, 1, dtype=torch.long)
    codes[3, 0] = 0b101  # row 3 of a 3-bit column: bits 9..11 of the group's 48-bit string
    codes[5, 0] = 0b011  # row 5: bits 15..17, across the first and second word
    packed = pack_codes(codes, torch.tensor([3]))
    string = 0b101 << 9 | 0b011 << 15
    assert packed.int().tolist() == [[string & 0xFFFF, (string >> 16) & 0xFFFF, 0]]


def test_codes_that_do_not_fit_their_width_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([[4]]), torch.tensor([2]))


@pytest.mark.parametrize("bits", [1, 3, 7])
def test_bit_stream_round_trip(bits):
    values = torch.randint(0, 2**bits, (101,), generator=torch.Generator().manual_seed(bits))
    data = pack_stream(values, bits)
    assert data.numel() == -(-101 * bits // 8)
    assert torch.equal(unpack_stream(data, bits, 101), values)


def quantized_layer(codebook="fp16", rows=40, cols=56, act=0.0045, q=0.0005, bits=3.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    stats = LayerStats(tokens=10, values={"col_sq_sum": (torch.rand(cols, generator=g) * 3 + 0.1).double()})
    return get_quantizer("cmpq", bits=bits, allocation="error", codebook=codebook, act_outliers=act,
                         q_outliers=q).quantize(w, stats)


@pytest.mark.parametrize("codebook", ["fp16", "int8"])
@pytest.mark.parametrize("outliers", [(0.0, 0.0), (0.01, 0.005)])
@pytest.mark.parametrize("rows", [40, 48])
def test_packed_layer_is_bit_identical_and_stores_exactly_the_accounted_bits(codebook, outliers, rows):
    qw = quantized_layer(codebook, rows=rows, act=outliers[0], q=outliers[1])
    module = CMPQLinear.from_weight(qw)
    assert torch.equal(module.dequantize(), qw.dequantize())
    stored = sum(b.numel() * b.element_size() * 8 for b in module.buffers())
    assert 0 <= stored - qw.storage().total < 8  # the width map's last byte is the only rounding


def test_packed_layer_forward_matches_the_dequantized_linear():
    qw = quantized_layer()
    bias = torch.randn(40)
    module = CMPQLinear.from_weight(qw, bias)
    x = torch.randn(3, 5, 56)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, qw.dequantize(), bias))


def corrupt(tensors, name, value):
    return {**tensors, name: value}


@pytest.mark.parametrize("name,make,message", [
    ("codebooks", lambda t: t["codebooks"][:-1], "codebooks hold"),
    ("codes", lambda t: t["codes"][:, :-1], "codes"),
    ("levels", lambda t: torch.tensor([3, 2], dtype=torch.uint8), "invalid width levels"),
    ("outlier_rowptr", lambda t: t["outlier_rowptr"].flip(0), "row pointer"),
    ("outlier_cols", lambda t: torch.full_like(t["outlier_cols"], 200), "outside the layer"),
    ("width_map", lambda t: t["width_map"][:1], "width_map"),
])
def test_corrupt_layers_fail_with_a_clear_message(name, make, message):
    tensors = dict(CMPQLinear.from_weight(quantized_layer(act=0.01)).named_buffers())
    with pytest.raises(FormatError, match=f"blocks.0.q: .*{message}"):
        unpack_cmpq(corrupt(tensors, name, make(tensors)), 40, 56, where="blocks.0.q")
    with pytest.raises(FormatError, match="missing tensors"):
        unpack_cmpq({k: v for k, v in tensors.items() if k != name}, 40, 56)


def test_codes_of_another_dtype_and_duplicate_outliers_are_refused():
    tensors = dict(CMPQLinear.from_weight(quantized_layer(act=0.01)).named_buffers())
    with pytest.raises(FormatError, match="16-bit words"):
        unpack_cmpq({**tensors, "codes": tensors["codes"].view(torch.uint8)}, 40, 56)
    cols = tensors["outlier_cols"].clone()
    rowptr = tensors["outlier_rowptr"].long()
    row = int(torch.nonzero(rowptr[1:] - rowptr[:-1] >= 2)[0])  # a row with two outliers
    cols[int(rowptr[row]) + 1] = cols[int(rowptr[row])]
    with pytest.raises(FormatError, match="strictly increasing"):
        unpack_cmpq({**tensors, "outlier_cols": cols}, 40, 56)


def test_dtype_casts_leave_the_packed_tensors_alone_and_empty_inputs_work():
    qw = quantized_layer(act=0.01)
    module = CMPQLinear.from_weight(qw, torch.randn(40))
    before = {name: buffer.clone() for name, buffer in module.named_buffers()}
    module.to(torch.bfloat16)
    for name, buffer in module.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    assert torch.equal(module.dequantize(), qw.dequantize())
    assert module.bias.dtype == torch.bfloat16
    assert module(torch.randn(0, 56, dtype=torch.bfloat16)).shape == (0, 40)
