"""AWQ: activation-aware scale search, per-group clipping, honest storage, config, and the engine."""

import math

import pytest
import torch

from cmpq.errors import ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import BitBreakdown, get_quantizer
from cmpq.quantizers.awq import AWQConfig, AWQWeight, awq_quantize, awq_scale
from cmpq.quantizers.rtn import quantize_uniform


def outlier_layer(out=48, cols=200, tokens=512, seed=0):
    """A weight and calibration inputs where a few input channels carry much larger activations (the case
    AWQ is for). 200 columns: with groups of 64 the last group is partial (8 columns)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g)
    x[:, [3, 70, 150, 197]] *= 25.0
    x = x.double()
    return w, x.T @ x, x.abs().mean(dim=0)


def error(w_hat, w, h):
    d = (w_hat - w).double()
    return float(((d @ h) * d).sum())


def per_group_error(w_hat, w, h, group):
    """(rows, groups) output errors by a plain loop over groups: d_g H_gg d_g^T."""
    d = (w_hat - w).double()
    cols = w.shape[1]
    return torch.stack([((d[:, c:c + group] @ h[c:c + group, c:c + group]) * d[:, c:c + group]).sum(1)
                        for c in range(0, cols, group)], dim=1)


def test_scale_search_picks_the_best_grid_point_and_beats_scale_one():
    w, h, xmean = outlier_layer()
    cfg = AWQConfig(bits=3, group_size=64, clip=False)
    qw = awq_quantize(w, h, xmean, "mlp.down_proj", cfg)
    chosen = error(qw.dequantize(), w, h)
    scale_one = error(quantize_uniform(w, 3, 64).dequantize(), w, h)
    assert chosen <= scale_one
    assert chosen < 0.9 * scale_one  # with outlier channels the search finds a clearly better scale
    # Independently: every candidate of the grid, and the chosen one is their minimum
    losses = []
    for i in range(cfg.n_grid):
        s = (xmean.pow(i / cfg.n_grid).clamp(min=1e-4))
        s = (s / (s.max() * s.min()).sqrt()).half().float()
        losses.append(error(quantize_uniform(w * s, 3, 64).dequantize() / s, w, h))
    assert losses[0] == pytest.approx(scale_one, rel=1e-12)  # ratio 0 is scale 1
    assert chosen == pytest.approx(min(losses), rel=1e-9)
    assert qw.ratio == pytest.approx(losses.index(min(losses)) / cfg.n_grid)
    assert qw.ratio > 0 and torch.equal(qw.input_scale, awq_scale(xmean, qw.ratio))
    assert qw.input_scale.dtype == torch.float16 and qw.input_scale.shape == (w.shape[1],)


def test_dequantize_is_inner_over_scale():
    w, h, xmean = outlier_layer()
    qw = awq_quantize(w, h, xmean, "mlp.up_proj", AWQConfig(bits=4, group_size=64))
    torch.testing.assert_close(qw.dequantize(), qw.inner.dequantize() / qw.input_scale.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 64), (4, None)])
def test_awq_output_error_is_below_rtn(bits, group):
    w, h, xmean = outlier_layer()
    awq = awq_quantize(w, h, xmean, "mlp.down_proj", AWQConfig(bits=bits, group_size=group))
    rtn = quantize_uniform(w, bits, group)
    assert error(awq.dequantize(), w, h) < 0.9 * error(rtn.dequantize(), w, h)


def test_clipping_never_increases_any_group_error():
    w, h, xmean = outlier_layer()
    clipped = awq_quantize(w, h, xmean, "mlp.down_proj", AWQConfig(bits=3, group_size=64))
    plain = awq_quantize(w, h, xmean, "mlp.down_proj", AWQConfig(bits=3, group_size=64, clip=False))
    assert torch.equal(clipped.input_scale, plain.input_scale)  # clipping comes after the scale search
    e_clip, e_plain = per_group_error(clipped.dequantize(), w, h, 64), per_group_error(plain.dequantize(), w, h, 64)
    assert e_clip.shape == (w.shape[0], math.ceil(w.shape[1] / 64))
    assert (e_clip <= e_plain * (1 + 1e-9) + 1e-12).all()
    assert (e_clip < 0.999 * e_plain).sum() > 0  # clipping does change some groups, for the better
    assert error(clipped.dequantize(), w, h) < error(plain.dequantize(), w, h)


def test_clip_skip_names_are_not_clipped():
    w, h, xmean = outlier_layer()
    cfg, off = AWQConfig(bits=3, group_size=64), AWQConfig(bits=3, group_size=64, clip=False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.k_proj"):
        assert torch.equal(awq_quantize(w, h, xmean, name, cfg).dequantize(),
                           awq_quantize(w, h, xmean, name, off).dequantize())
    name = "model.layers.0.self_attn.v_proj"
    assert not torch.equal(awq_quantize(w, h, xmean, name, cfg).dequantize(),
                           awq_quantize(w, h, xmean, name, off).dequantize())
    custom = AWQConfig(bits=3, group_size=64, clip_skip=("v_proj",))
    assert torch.equal(awq_quantize(w, h, xmean, name, custom).dequantize(),
                       awq_quantize(w, h, xmean, name, off).dequantize())


def test_storage_is_rtn_plus_one_fp16_scale_per_input_channel():
    out, cols = 64, 256
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(out, cols, generator=g), torch.randn(300, cols, generator=g).double()
    qw = awq_quantize(w, x.T @ x, x.abs().mean(0), "mlp.gate_proj", AWQConfig(bits=4, group_size=128))
    assert qw.storage() == quantize_uniform(torch.randn(out, cols), 4, 128).storage() + BitBreakdown(params=16 * cols)
    assert qw.storage().bpw == pytest.approx(4 + 20 / 128 + 16 / out)  # codes, scale+zero per group, s per column
    assert qw.storage().code_bpw == 4
    assert torch.equal(qw.column_widths(), torch.full((cols,), 4, dtype=torch.uint8))
    # partial groups and rows not a multiple of 16 are counted as stored
    w, h, xmean = outlier_layer(out=10, cols=200)
    qw = awq_quantize(w, h, xmean, "o_proj", AWQConfig(bits=3, group_size=64))
    assert qw.storage() == BitBreakdown(weights=10 * 200, codes=16 * 200 * 3, params=10 * 4 * (16 + 3) + 16 * 200)


@pytest.mark.parametrize("field,value", [("bits", 0), ("bits", 9), ("n_grid", 0), ("max_shrink", 1.5),
                                         ("max_shrink", -0.1), ("group_size", 0), ("clip_skip", "q_proj"),
                                         ("clip", 1)])
def test_config_validation(field, value):
    with pytest.raises(ConfigError, match=f"awq.{field}"):
        AWQConfig(**{field: value})


def test_config_defaults_are_llm_awq():
    c = AWQConfig()
    assert (c.bits, c.group_size, c.n_grid, c.clip, c.max_shrink, c.clip_skip) == (4, 128, 20, True, 0.5,
                                                                                    ("q_proj", "k_proj"))
    assert AWQConfig(clip_skip=["q_proj"]).clip_skip == ("q_proj",)


def test_awq_runs_through_the_engine():
    model = tiny_model("llama")
    calib = torch.randint(3, TINY_VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("awq", bits=4, group_size=16)
    assert quantizer.needs() == {"hessian", "col_abs_sum"}
    arch = find_arch(model)
    result = quantize_model(model, arch, quantizer, calib, progress=False)
    assert len(result.layers) == len(arch.blocks(model)) * len(arch.linear_names)
    modules = dict(model.named_modules())
    for name, qw in result.layers.items():
        assert isinstance(qw, AWQWeight)
        assert torch.equal(modules[name].weight, qw.dequantize())
    assert any(qw.ratio > 0 for qw in result.layers.values())  # the search moved off scale 1 somewhere
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
