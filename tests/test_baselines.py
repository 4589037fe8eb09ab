"""GPTQ, LLM-MQ, SmoothQuant and the gradient pass: each checked against its paper's qualitative behaviour."""

import pytest
import torch

from cmpq.calibration.gradients import gradient_statistics
from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.quantizers.error_feedback import quantize_with_feedback
from cmpq.quantizers.gptq import gptq_quantize
from cmpq.quantizers.llmmq import quantize_with_outliers
from cmpq.quantizers.rtn import quantize_uniform
from cmpq.quantizers.smoothquant import (
    SmoothQuantConfig,
    fake_quantize_per_token,
    smoothing_factors,
    smoothquant_quantize,
)


def correlated_layer(out=40, columns=96, tokens=2048, seed=0):
    """A weight and the Hessian of correlated inputs with a few large channels (where GPTQ helps most)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 8, generator=g)
    x = base @ torch.randn(8, columns, generator=g) + 0.3 * torch.randn(tokens, columns, generator=g)
    x[:, :4] *= 6.0
    return torch.randn(out, columns, generator=g), (x.T @ x).double(), x


def output_error(w, wq, h):
    d = (wq - w).double()
    return float(((d @ h) * d).sum())


def windows(n=3, seqlen=24):
    return torch.randint(3, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("group_size,act_order", [(None, False), (32, False), (48, True), (None, True)])
def test_gptq_layer_output_error_is_below_rtn(group_size, act_order):
    w, h, _ = correlated_layer()
    for bits in (2, 3, 4):
        gptq = gptq_quantize(w, h, bits, group_size, act_order=act_order)
        rtn = quantize_uniform(w, bits, group_size)
        assert output_error(w, gptq.dequantize(), h) < 0.8 * output_error(w, rtn.dequantize(), h)
        assert gptq.storage() == rtn.storage()  # the same stored layout: codes, FP16 scales, integer zeros


def test_gptq_grids_are_fitted_on_the_updated_group_weights():
    """Without act-order each group's grid comes from the weights as updated when the group is reached."""
    w, h, _ = correlated_layer()
    q = gptq_quantize(w, h, 3, 32)
    codes = q.codes.float()
    assert int(codes.min()) == 0 and int(codes.max()) == 7
    # every dequantized value lies on its group's grid
    scale = q.scale.float().repeat_interleave(32, dim=1)
    zero = q.zero.float().repeat_interleave(32, dim=1)
    assert torch.equal(q.dequantize(), scale * (codes - zero))


def test_error_feedback_groups_see_current_values():
    """begin_group receives each group's columns once, in order, with the values updated by earlier ones."""
    w, h, _ = correlated_layer(columns=70)
    seen = []

    def begin(cols, values):
        seen.append((cols.tolist(), values.clone()))

    quantize_with_feedback(w, h, lambda j, c: torch.round(c), begin_group=begin, group_size=32, block_size=48)
    assert [c for c, _ in seen] == [list(range(0, 32)), list(range(32, 64)), list(range(64, 70))]
    assert torch.equal(seen[0][1], w[:, :32])          # nothing quantized yet
    assert not torch.allclose(seen[1][1], w[:, 32:64])  # updated by the first group's errors


def test_gptq_config_and_cli_defaults():
    with pytest.raises(ConfigError, match="gptq.bits"):
        get_quantizer("gptq", bits=9)
    with pytest.raises(ConfigError, match="gptq.damp"):
        get_quantizer("gptq", bits=3, damp=0)
    assert get_quantizer("gptq", bits=3).config.group_size == 128


def test_llmmq_meets_fractional_targets_with_mixed_layer_widths():
    results = {}
    for target in (4.3, 5.0):  # tiny layers (48 columns, groups of 16): 2 bits already cost 3.6 honest bpw
        model = tiny_model("llama")
        quantizer = get_quantizer("llmmq", bits=target, group_size=16, outliers=0.01, bit_set=(2, 3, 4, 5, 6))
        result = quantize_model(model, find_arch(model), quantizer, windows(), progress=False)
        bpw = result.storage().bpw
        assert target - 0.2 <= bpw <= target, (target, bpw)  # 14 layers: steps of about 1/14 bit
        widths = set(quantizer.planned_bits().values())
        assert len(widths) >= 2
        results[target] = quantizer.planned_bits()
    assert sum(results[5.0].values()) > sum(results[4.3].values())


def test_llmmq_unreachable_target_runs_at_the_nearest_extreme():
    model = tiny_model("llama")
    quantizer = get_quantizer("llmmq", bits=1.5, group_size=16)
    with pytest.warns(UserWarning, match="unreachable"):
        quantize_model(model, find_arch(model), quantizer, windows(), progress=False)
    assert set(quantizer.planned_bits().values()) == {2}


def test_llmmq_spends_bits_where_the_loss_is_sensitive():
    """Two identical layers, one with 100x the Fisher weight: that one gets the wider width."""
    quantizer = get_quantizer("llmmq", bits=4.2, group_size=16, sensitivity="fisher", outliers=0.0)
    w = torch.randn(32, 64)
    for name, scale in (("a", 1.0), ("b", 100.0)):
        quantizer.measure(name, w, LayerStats(values={"grad_sq_sum": torch.full_like(w, scale)}))
    quantizer.plan()
    assert quantizer.planned_bits() == {"a": 2, "b": 4}


def test_outliers_are_exact_and_counted():
    w = torch.randn(32, 64)
    w[3, 5] = 40.0
    qw = quantize_with_outliers(w, 2, 16, 0.01)
    assert qw.outlier_count() == round(0.01 * w.numel())
    deq = qw.dequantize()
    assert deq[3, 5] == torch.tensor(40.0).half().float()
    inner = quantize_uniform(w.masked_fill(w.abs() >= w.abs().flatten().topk(20).values[-1], 0), 2, 16).storage()
    nnz = qw.outlier_count()
    assert qw.storage().total == inner.total + nnz * 16 + nnz * 8 + 33 * 8 + 8  # FP16 values, uint8 cols, rowptr, width


def test_smoothquant_migrates_activation_outliers():
    w, _, x = correlated_layer()
    x[:, 7] *= 30.0  # an activation outlier channel
    smooth = smoothing_factors(x.abs().amax(dim=0), w.abs().amax(dim=0), 0.5)
    qw = smoothquant_quantize(w, smooth, SmoothQuantConfig())
    s = qw.smooth.float()
    assert s[7] > 3 * s[8:].median()  # the outlier channel is divided down the most
    hook = qw.activation_hook()
    y = torch.nn.functional.linear(hook(None, (x,))[0], qw.dequantize())
    y_naive = torch.nn.functional.linear(fake_quantize_per_token(x, 8),
                                         smoothquant_quantize(w, torch.ones(96), SmoothQuantConfig()).dequantize())
    exact = x @ w.T
    assert (y - exact).square().mean() < 0.5 * (y_naive - exact).square().mean()
    assert qw.storage().bpw == pytest.approx(8 * 48 / 40 + 16 * 40 / (40 * 96))  # s is folded into the norm


def test_smoothquant_shares_factors_across_layers_reading_one_input():
    model = tiny_model("llama")
    quantizer = get_quantizer("smoothquant")
    result = quantize_model(model, find_arch(model), quantizer, windows(), progress=False)
    layers = result.layers
    for block in (0, 1):
        prefix = f"model.layers.{block}."
        q, k, v = (layers[prefix + f"self_attn.{n}_proj"].smooth for n in "qkv")
        assert torch.equal(q, k) and torch.equal(k, v)
        assert torch.equal(layers[prefix + "mlp.gate_proj"].smooth, layers[prefix + "mlp.up_proj"].smooth)
        assert not torch.equal(q, layers[prefix + "mlp.gate_proj"].smooth)
        for skipped in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.all(layers[prefix + skipped].smooth == 1)


def test_smoothquant_installs_and_removes_activation_quantizers():
    model = tiny_model("llama")
    result = quantize_model(model, find_arch(model), get_quantizer("smoothquant"), windows(), progress=False)
    assert len(result.hooks) == len(result.layers) == 14
    ids = windows(1, 16)
    with torch.no_grad():
        quantized = model(ids).logits
        result.remove_hooks()
        weight_only = model(ids).logits
    assert not torch.equal(quantized, weight_only) and torch.isfinite(quantized).all()


def test_gradient_pass_matches_autograd_and_restores_flags():
    model = tiny_model("llama")
    arch = find_arch(model)
    linears = {f"{i}.{n}": m for i, b in enumerate(arch.blocks(model)) for n, m in arch.block_linears(b).items()}
    ids = windows(2, 12)
    stats = gradient_statistics(model, linears, ids, frozenset({"grad_sum", "grad_sq_sum"}), progress=False)
    name = "1.mlp.down_proj"
    expected_sum, expected_sq = 0, 0
    for i in range(2):
        model.zero_grad()
        model(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        grad = linears[name].weight.grad.clone()
        expected_sum, expected_sq = expected_sum + grad, expected_sq + grad.square()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(stats[name]["grad_sum"], expected_sum, atol=1e-6)
    assert torch.allclose(stats[name]["grad_sq_sum"], expected_sq, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # as found (tiny models require grad)


def test_methods_needing_gradients_without_windows_fail_clearly():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(model, find_arch(model), get_quantizer("llmmq", bits=3), None, progress=False)
