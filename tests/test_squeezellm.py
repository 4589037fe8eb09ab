"""SqueezeLLM: weighted k-means, dense-and-sparse outliers, storage accounting, validation, the engine."""

import pytest
import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import CmpqError, ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.quantizers.cmpq.kmeans import SortedRows, fit, lloyd
from cmpq.quantizers.squeezellm import SqueezeLLMConfig, SqueezeLLMWeight, squeezellm_quantize


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def heavy_weights(rows, cols, seed=0):
    """Weights where a few entries per row carry most of the mass (like a Fisher diagonal)."""
    g = gen(seed)
    w = torch.rand(rows, cols, generator=g) * 0.01
    heavy = torch.rand(rows, cols, generator=g).argsort(dim=1)[:, :3]
    w.scatter_(1, heavy, 100.0)
    return w


def layer(rows=40, cols=56, seed=0):
    g = gen(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.randint(0, rows, (4,), generator=g), torch.randint(0, cols, (4,), generator=g)] = 0.9
    fisher = torch.exp(torch.randn(rows, cols, generator=g) * 2.5)  # spans orders of magnitude, as Fisher does
    return w, fisher


# --- (a) weighted k-means ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", (2, 4, 8))
def test_weighted_kmeans_lowers_the_weighted_error(k):
    values = torch.randn(64, 48, generator=gen(1)) ** 3
    weights = heavy_weights(64, 48, seed=2)
    weighted_rows = SortedRows(values, weights=weights)
    weighted_fit = fit(weighted_rows, k)
    plain_fit = fit(SortedRows(values), k)
    weighted_err, plain_err = weighted_rows.sse(weighted_fit), weighted_rows.sse(plain_fit)
    assert weighted_err.sum() < 0.5 * plain_err.sum()


def test_weighted_sse_matches_a_direct_sum():
    values = torch.randn(16, 24, generator=gen(3))
    weights = torch.rand(16, 24, generator=gen(4))
    mask = torch.rand(16, 24, generator=gen(5)) > 0.2
    rows = SortedRows(values, mask, weights)
    centroids = fit(rows, 4)
    nearest = centroids.gather(1, (values[:, :, None] - centroids[:, None, :]).abs().argmin(dim=2))
    direct = (weights.double() * mask * (values - nearest).double() ** 2).sum(dim=1)
    torch.testing.assert_close(rows.sse(centroids), direct, rtol=1e-6, atol=1e-9)


def test_equal_weights_give_the_unweighted_fit():
    values = torch.randn(50, 40, generator=gen(6)) ** 3
    mask = torch.rand(50, 40, generator=gen(7)) > 0.1
    for k in (2, 4, 16):
        weighted = fit(SortedRows(values, mask, torch.full_like(values, 3.0)), k)
        torch.testing.assert_close(weighted, fit(SortedRows(values, mask), k), rtol=1e-5, atol=1e-6)


def test_zero_weight_clusters_keep_their_centroid_and_stay_in_range():
    values = torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0, 12.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    start = torch.tensor([[1.0, 11.0]])
    centroids = lloyd(SortedRows(values, weights=weights), start, 10)
    assert torch.equal(centroids, start)  # cluster {10, 11, 12} weighs nothing: it does not move to 0


# --- (b) the unweighted path is unchanged -----------------------------------------------------------------

def _reference_sorted_rows(values, mask):
    """SortedRows.__init__ as it was before weights were added."""
    values = values.float()
    if mask is not None:
        values = torch.where(mask, values, torch.full_like(values, float("inf")))
    s = values.sort(dim=1).values.contiguous()
    finite = torch.isfinite(s)
    count = finite.sum(dim=1, keepdim=True)
    x = torch.where(finite, s, torch.zeros_like(s)).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64)
    return s, count, torch.cat([zero, x.cumsum(dim=1)], dim=1), torch.cat([zero, (x * x).cumsum(dim=1)], dim=1)


def _reference_lloyd(rows, centroids, max_iter):
    previous = None
    for _ in range(max_iter):
        bounds = rows.bounds(centroids)
        if previous is not None and torch.equal(bounds, previous):
            break
        previous = bounds
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        counts = (hi - lo).double()
        sums = rows.prefix.gather(1, hi) - rows.prefix.gather(1, lo)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
        centroids = centroids.sort(dim=1).values
    return centroids


@pytest.mark.parametrize("masked", (False, True))
def test_unweighted_sorted_rows_are_bit_identical_to_before(masked):
    values = torch.randn(30, 70, generator=gen(8)) ** 3
    mask = torch.rand(30, 70, generator=gen(9)) > 0.1 if masked else None
    rows = SortedRows(values, mask)
    assert rows.prefix_w is None and not rows.weighted
    for got, expected in zip((rows.sorted, rows.count, rows.prefix, rows.prefix_sq),
                             _reference_sorted_rows(values, mask)):
        assert torch.equal(got, expected)
    sub = rows.subset(torch.arange(30) % 3 == 0)
    assert sub.prefix_w is None and torch.equal(sub.prefix, rows.prefix[::3])
    start = rows.quantiles(8)
    assert torch.equal(lloyd(rows, start, 100), _reference_lloyd(rows, start, 100))
    counts, _, _ = rows.cluster_sums(rows.bounds(start))
    assert torch.equal(counts, torch.diff(rows.bounds(start), dim=1).double())


# --- (c) dense-and-sparse outliers ------------------------------------------------------------------------

def test_outliers_are_the_largest_weights_then_the_most_sensitive():
    w, fisher = layer(rows=48, cols=64)
    n = w.numel()
    qw = squeezellm_quantize(w, fisher, SqueezeLLMConfig(bits=3))
    expected = round(0.0045 * n) + round(0.0005 * n)
    assert expected > 2 and qw.outlier_count() == expected == len(qw.outliers)
    deq = qw.dequantize()
    rows, cols = qw.outliers.rows, qw.outliers.cols
    assert torch.equal(deq[rows, cols], w[rows, cols].half().float())
    positions = set(zip(rows.tolist(), cols.tolist()))
    top = int(w.abs().argmax())
    assert divmod(top, w.shape[1]) in positions
    magnitude = set(divmod(i, w.shape[1]) for i in w.abs().flatten().topk(round(0.0045 * n)).indices.tolist())
    assert magnitude <= positions
    rest = fisher.masked_fill(w.abs() >= w.abs().flatten().topk(round(0.0045 * n)).values[-1], -1.0)
    assert divmod(int(rest.argmax()), w.shape[1]) in positions  # the most sensitive non-magnitude weight


def test_codes_and_codebooks_are_consistent():
    w, fisher = layer()
    qw = squeezellm_quantize(w, fisher, SqueezeLLMConfig(bits=3))
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape and int(qw.codes.max()) < 8
    assert qw.codebooks.shape == (w.shape[0], 8)
    assert torch.equal(qw.codebooks, qw.codebooks.half().float())  # FP16-representable entries
    assert torch.all(qw.codebooks[:, 1:] >= qw.codebooks[:, :-1])
    # every code is the nearest stored entry, outlier positions included
    dist = (w[:, :, None] - qw.codebooks[:, None, :]).abs()
    chosen = dist.gather(2, qw.codes.long()[:, :, None])[..., 0]
    assert torch.all(chosen <= dist.min(dim=2).values + 1e-7)
    assert torch.equal(qw.column_widths(), torch.full((w.shape[1],), 3, dtype=torch.uint8))
    assert isinstance(qw, SqueezeLLMWeight) and qw.shape == tuple(w.shape)


def test_rows_without_fisher_fall_back_to_the_unweighted_fit():
    w, fisher = layer()
    fisher[5] = 0.0
    config = SqueezeLLMConfig(bits=2, outliers=0.0, sensitive=0.0)
    qw = squeezellm_quantize(w, fisher, config)
    plain = squeezellm_quantize(w, torch.ones_like(fisher), config)
    assert torch.equal(qw.codebooks[5], plain.codebooks[5])
    assert not torch.equal(qw.codebooks[4], plain.codebooks[4])  # the other rows are weighted


def test_invalid_fisher_is_an_error():
    w, fisher = layer()
    fisher[0, 0] = float("nan")
    with pytest.raises(CmpqError, match="Fisher"):
        squeezellm_quantize(w, fisher)
    with pytest.raises(ValueError, match="shape"):
        squeezellm_quantize(w, fisher[:, :-1])


# --- (d) storage ------------------------------------------------------------------------------------------

def test_storage_is_counted_by_hand():
    w, fisher = layer(rows=20, cols=30)
    qw = squeezellm_quantize(w, fisher, SqueezeLLMConfig(bits=3, outliers=0.01, sensitive=0.005))
    # 600 weights: round(6.0) + round(3.0) = 9 outliers
    assert qw.outlier_count() == 9
    s = qw.storage()
    assert s.weights == 600
    assert s.codes == 32 * 30 * 3          # 20 rows padded to 32
    assert s.params == 20 * 8 * 16         # one FP16 table of 8 entries per row
    assert s.outliers == 9 * 16            # FP16 values
    assert s.indices == 9 * 8 + 21 * 8     # uint8 column indices (< 30), 21 uint8 row pointers (<= 9)
    assert s.maps == 0
    assert s.total == 2880 + 2560 + 144 + 240
    assert s.bpw == pytest.approx(5824 / 600)


# --- (e) the Fisher weighting pays off --------------------------------------------------------------------

@pytest.mark.parametrize("bits", (2, 3))
def test_fisher_weighting_lowers_the_fisher_weighted_error(bits):
    w, _ = layer(rows=64, cols=96, seed=3)
    fisher = heavy_weights(64, 96, seed=4)
    config = SqueezeLLMConfig(bits=bits, sensitive=0.0)  # same outliers in both runs: only the weighting differs
    weighted = squeezellm_quantize(w, fisher, config)
    plain = squeezellm_quantize(w, torch.ones_like(fisher), config)
    assert torch.equal(weighted.outliers.rows, plain.outliers.rows)

    def error(qw):
        return float((fisher * (qw.dequantize() - w) ** 2).sum())

    assert error(weighted) < 0.5 * error(plain)


# --- (f) configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("bits", 0), ("bits", 9), ("bits", 2.5), ("outliers", 0.7),
                                         ("sensitive", -0.1), ("kmeans_iters", 0)])
def test_invalid_config_is_rejected(field, value):
    with pytest.raises(ConfigError, match=f"squeezellm.{field}"):
        SqueezeLLMConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"squeezellm.{field}"):
        get_quantizer("squeezellm", **{field: value})


def test_defaults_are_the_paper_s():
    quantizer = get_quantizer("squeezellm")
    assert quantizer.config == SqueezeLLMConfig(bits=4, outliers=0.0045, sensitive=0.0005, kmeans_iters=100)
    assert quantizer.needs() == frozenset({"grad_sq_sum"})
    w, fisher = layer()
    qw = quantizer.quantize(w, LayerStats(values={"grad_sq_sum": fisher}))
    assert int(qw.codes.max()) < 16 and qw.codebooks.shape[1] == 16


# --- (g) through the engine -------------------------------------------------------------------------------

def test_squeezellm_through_the_engine_on_a_tiny_model():
    model = tiny_model("llama")
    calib = torch.randint(3, TINY_VOCAB, (3, 24), generator=gen(0))
    quantizer = get_quantizer("squeezellm", bits=3)
    seen = {}
    quantize = quantizer.quantize

    def recording(weight, stats, name=""):
        seen[name] = stats["grad_sq_sum"].clone()
        return quantize(weight, stats, name)

    quantizer.quantize = recording
    arch = find_arch(model)
    result = quantize_model(model, arch, quantizer, calib, progress=False)
    assert len(result.layers) == len(arch.blocks(model)) * len(arch.linear_names) == len(seen)
    modules = dict(model.named_modules())
    for name, qw in result.layers.items():
        assert isinstance(qw, SqueezeLLMWeight) and qw.bits == 3
        fisher = seen[name]
        assert fisher.shape == qw.shape and bool((fisher > 0).any())  # the gradient pass ran
        assert torch.equal(modules[name].weight, qw.dequantize())
        n = fisher.numel()
        assert qw.outlier_count() == round(0.0045 * n) + round(0.0005 * n)
    storage = result.storage()
    assert storage.code_bpw >= 3.0  # 3-bit codes, rows padded to 16
    assert storage.bpw > storage.code_bpw
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
