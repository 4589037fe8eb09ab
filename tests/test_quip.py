"""QuIP: exact, seeded incoherence transforms; LDLQ (GPTQ) in the rotated basis; honest storage; the engine."""

import pytest
import torch

import cmpq.quantizers.quip  # noqa: F401  (registers "quip")
from cmpq.errors import ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import BitBreakdown, get_quantizer
from cmpq.quantizers.gptq import gptq_quantize
from cmpq.quantizers.quip import QuIPConfig, QuIPWeight, quip_quantize, random_orthogonal, transform_seeds
from cmpq.quantizers.rtn import quantize_uniform

KINDS = ("orthogonal", "hadamard")


def _outlier_layer(seed=0, out=64, cols=96, tokens=1024):
    """A weight with a dozen huge entries, and the Hessian of correlated inputs with a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    where = torch.randperm(out * cols, generator=g)[:12]
    w.view(-1)[where] = 15 * torch.randn(12, generator=g).sign() * (1 + torch.rand(12, generator=g))
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 8
    return w, x.double().T @ x.double()


def _proxy_loss(w, q, h):
    """trace(dW H dW^T): the summed squared error of the layer's outputs on the calibration inputs."""
    d = q.double() - w.double()
    return torch.trace(d @ h @ d.T).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [12, 48, 576, 96, 7, 1])
def test_transforms_are_orthogonal_to_float64_precision(kind, n):
    q = random_orthogonal(n, 1234, kind)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


def test_orthogonal_signs_are_fixed_by_r():
    """Householder QR alone returns Q with a negative first entry for every seed (not Haar); with R's
    diagonal signs folded in, Q[0, 0] is as often positive as negative."""
    signs = [random_orthogonal(6, s, "orthogonal")[0, 0].item() > 0 for s in range(40)]
    assert 10 <= sum(signs) <= 30


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(12, 48), (96, 7), (48, 576)])
def test_rotation_round_trip_recovers_the_weight(kind, shape):
    w = torch.randn(*shape, dtype=torch.float64)
    u, v = random_orthogonal(shape[0], 1, kind), random_orthogonal(shape[1], 2, kind)
    rotated = u @ w @ v.T
    assert not torch.allclose(rotated, w)
    assert (u.T @ rotated @ v - w).abs().max() < 1e-10


def test_hadamard_has_the_stated_structure():
    """576 = 9 * 64: kron(orthogonal(9), H64 diag(signs)), so every entry of the 64-block is +-1/8 times an
    entry of the 9 x 9 factor; a plain Haar matrix has no such structure."""
    q = random_orthogonal(576, 5, "hadamard")
    block = q[:64, :64]
    magnitudes = block.abs() / block.abs()[0, 0]
    torch.testing.assert_close(magnitudes, torch.ones_like(magnitudes), rtol=0, atol=1e-12)
    assert not torch.allclose(random_orthogonal(576, 5, "orthogonal")[:64, :64].abs(), block.abs())
    assert torch.equal(random_orthogonal(64, 5, "hadamard").abs() * 8, torch.ones(64, 64, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_and_name_give_the_same_transforms(kind):
    assert torch.equal(random_orthogonal(48, 7, kind), random_orthogonal(48, 7, kind))
    assert not torch.allclose(random_orthogonal(48, 7, kind), random_orthogonal(48, 8, kind))
    assert transform_seeds("model.layers.0.mlp.up_proj") == transform_seeds("model.layers.0.mlp.up_proj")
    a, b = transform_seeds("model.layers.0.mlp.up_proj"), transform_seeds("model.layers.1.mlp.up_proj")
    assert a[0] != a[1] and set(a).isdisjoint(b)
    assert transform_seeds("x", seed=1) != transform_seeds("x", seed=0)

    w, h = _outlier_layer()
    config = QuIPConfig(bits=2, transform=kind)
    first, again = quip_quantize(w, h, "layer.a", config), quip_quantize(w, h, "layer.a", config)
    other = quip_quantize(w, h, "layer.b", config)
    assert (first.seed_u, first.seed_v) == (again.seed_u, again.seed_v)
    assert torch.equal(first.dequantize(), again.dequantize())
    assert (first.seed_u, first.seed_v) != (other.seed_u, other.seed_v)
    for mine, theirs in zip(first.transforms(), other.transforms()):
        assert not torch.allclose(mine, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_makes_the_weight_incoherent(kind):
    w, _ = _outlier_layer()
    w = w.double()
    u, v = random_orthogonal(w.shape[0], 3, kind), random_orthogonal(w.shape[1], 4, kind)
    rotated = u @ w @ v.T

    def peak_to_rms(m):
        return (m.abs().max() / m.square().mean().sqrt()).item()

    before, after = peak_to_rms(w), peak_to_rms(rotated)
    assert before > 10 and after < before / 3, (before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_two_bit_quip_beats_gptq_and_rtn_on_outliers(kind):
    w, h = _outlier_layer()
    quip = _proxy_loss(w, quip_quantize(w, h, "layer", QuIPConfig(bits=2, transform=kind)).dequantize(), h)
    gptq = _proxy_loss(w, gptq_quantize(w, h, 2, None, 0.01).dequantize(), h)
    rtn = _proxy_loss(w, quantize_uniform(w, 2, None).dequantize(), h)
    assert quip < 0.75 * gptq < 0.75 * rtn, (quip, gptq, rtn)


def test_dequantize_is_the_inverse_rotation_of_the_inner_weight():
    w, h = _outlier_layer()
    qw = quip_quantize(w, h, "layer", QuIPConfig(bits=3))
    u, v = qw.transforms()
    expected = (u.T @ qw.inner.dequantize().double() @ v).float()
    assert qw.dequantize().dtype == torch.float32 and torch.equal(qw.dequantize(), expected)
    # the inner codes approximate the rotated weight, not the original one
    rotated = (u @ w.double() @ v.T).float()
    assert (qw.inner.dequantize() - rotated).abs().mean() < 0.5 * (qw.inner.dequantize() - w).abs().mean()


def test_storage_is_the_inner_codes_plus_two_seeds():
    w, h = _outlier_layer()
    qw = quip_quantize(w, h, "layer", QuIPConfig(bits=2, group_size=32))
    inner = qw.inner.storage()
    assert qw.storage() == inner + BitBreakdown(maps=128)
    assert qw.storage().total == inner.total + 128 and qw.storage().weights == w.numel()
    assert qw.storage().bpw > inner.bpw
    assert torch.equal(qw.column_widths(), torch.full((w.shape[1],), 2, dtype=torch.uint8))
    assert qw.shape == tuple(w.shape)


def test_config_is_validated():
    for bad in ({"bits": 9}, {"bits": 0}, {"transform": "foo"}, {"damp": 0}, {"group_size": 0}, {"seed": -1}):
        with pytest.raises(ConfigError, match="quip"):
            QuIPConfig(**bad)
    with pytest.raises(ConfigError, match="quip.bits"):
        get_quantizer("quip", bits=9)
    with pytest.raises(ConfigError, match="quip.transform"):
        get_quantizer("quip", transform="foo")
    assert get_quantizer("quip").config == QuIPConfig(bits=2, group_size=None, damp=0.01, transform="orthogonal")


@pytest.mark.parametrize("kind", KINDS)
def test_quip_runs_through_the_engine(kind):
    model = tiny_model("llama")
    calib = torch.randint(3, TINY_VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(calib).logits
    quantizer = get_quantizer("quip", bits=3, transform=kind)
    assert quantizer.needs() == frozenset({"hessian"})
    result = quantize_model(model, find_arch(model), quantizer, calib, progress=False)
    modules = dict(model.named_modules())
    assert result.layers and all(isinstance(qw, QuIPWeight) for qw in result.layers.values())
    for name, qw in result.layers.items():
        assert torch.equal(modules[name].weight, qw.dequantize())
    with torch.no_grad():
        after = model(calib).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    seeds = {(qw.seed_u, qw.seed_v) for qw in result.layers.values()}
    assert len(seeds) == len(result.layers)  # every layer its own transforms
