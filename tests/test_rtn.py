import math

import pytest
import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError
from cmpq.quantizers import RTNConfig, get_quantizer
from cmpq.quantizers.rtn import quantize_uniform


def rtn_reference(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Loop-per-group reference of asymmetric min-max RTN with an FP16 scale and an integer zero in range."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0:c0 + group]
            lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
            scale = float(torch.tensor((hi - lo) / maxq).half()) or 1.0
            zero = min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            out[r, c0:c0 + group] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape,group", [((7, 100), 32), ((5, 64), None), ((3, 50), 128)])
def test_rtn_matches_loop_reference(bits, shape, group):
    w = torch.randn(shape)
    qw = quantize_uniform(w, bits, group)
    ref = rtn_reference(w, bits, group or shape[1])
    torch.testing.assert_close(qw.dequantize(), ref, rtol=0, atol=1e-6)
    assert int(qw.codes.max()) <= 2**bits - 1


def test_rtn_honest_bits_match_protocol_example():
    qw = quantize_uniform(torch.randn(64, 256), 4, 128)
    assert qw.storage().bpw == pytest.approx(4 + 20 / 128)
    assert qw.storage().code_bpw == 4


def test_rtn_storage_counts_partial_groups():
    qw = quantize_uniform(torch.randn(10, 100), 3, 32)  # 4 groups per row, the last of 4 columns
    bits = qw.storage()
    assert bits.codes == 16 * 100 * 3  # codes are stored in whole 16-row groups
    assert bits.params == 10 * math.ceil(100 / 32) * (16 + 3)


def test_rtn_error_falls_with_bits():
    w = torch.randn(32, 96)
    errors = [(quantize_uniform(w, b, 32).dequantize() - w).pow(2).mean().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4


def test_rtn_zero_row_is_exact():
    w = torch.zeros(2, 16)
    assert torch.equal(quantize_uniform(w, 2, None).dequantize(), w)


@pytest.mark.parametrize("fields,field", [({"bits": 0}, "rtn.bits"), ({"bits": 9}, "rtn.bits"),
                                          ({"bits": 2.5}, "rtn.bits"), ({"group_size": 0}, "rtn.group_size")])
def test_rtn_config_names_the_bad_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        RTNConfig(**fields)


def test_registry_rejects_unknown_method_and_option():
    with pytest.raises(ConfigError, match="unknown quantization method 'nope'.*rtn"):
        get_quantizer("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        get_quantizer("rtn", bits=4, act_outliers=0.1)


def test_registered_rtn_quantizes_through_the_interface():
    quantizer = get_quantizer("rtn", bits=3, group_size=16)
    w = torch.randn(8, 48)
    qw = quantizer.quantize(w, LayerStats())
    assert qw.shape == (8, 48)
    torch.testing.assert_close(qw.dequantize(), quantize_uniform(w, 3, 16).dequantize())
