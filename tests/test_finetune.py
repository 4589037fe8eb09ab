"""Block fine-tuning of the stored values (`cmpq.finetune`) and the value interface of CMPQ weights it trains."""

import pytest
import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError
from cmpq.finetune import FinetuneConfig
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.quantizers.cmpq.quantizer import CMPQ, CMPQConfig, lookup_index


def _layer(out: int = 48, inp: int = 40, tokens: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g) * (torch.rand(inp, generator=g) * 3 + 0.1)
    w = torch.randn(out, inp, generator=g) * 0.05
    return w, LayerStats(tokens=tokens, values={"col_sq_sum": x.square().sum(0).double()})


def _config(**options) -> CMPQConfig:
    return CMPQConfig(**{"bits": 2.5, "allocation": "error", "bit_set": (1, 2, 3, 4), **options})


def test_lookup_values_reproduce_the_weight():
    w, stats = _layer()
    for codebook in ("fp16", "int8"):
        qw = CMPQ(_config(codebook=codebook)).quantize(w, stats)
        theta, index = qw.lookup_values()
        assert torch.equal(theta[index], qw.dequantize())
        again = qw.with_values(theta)  # rounding values that are already stored changes nothing
        torch.testing.assert_close(again.dequantize(), qw.dequantize(), rtol=0, atol=1e-6)
        assert index.shape == w.shape and int(index.max()) < theta.numel()


def test_lookup_index_puts_outliers_after_the_codebooks_in_row_major_order():
    codes = torch.tensor([[0, 1], [1, 0]])
    outliers = torch.tensor([[False, True], [True, False]])
    assert lookup_index(codes, 2, outliers).tolist() == [[0, 4], [5, 2]]


def _quantize_tiny(epochs: int, target: str = "block"):
    model = tiny_model("llama", seed=0)
    windows = torch.randint(0, TINY_VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("cmpq", preset="best", bits=2.5)
    result = quantize_model(model, find_arch(model), quantizer, windows, progress=False,
                            finetune=FinetuneConfig(epochs=epochs, lr=1e-2, target=target))
    return model, result


@pytest.mark.parametrize("target", ["block", "model"])
def test_finetune_lowers_each_block_error_and_changes_only_the_values(target):
    _, plain = _quantize_tiny(0)
    model, tuned = _quantize_tiny(2, target)
    assert plain.finetune == [] and len(tuned.finetune) == len(find_arch(model).blocks(model))
    assert all(b["error_after"] < b["error_before"] for b in tuned.finetune)  # the tiny blocks all gain
    for name, qw in tuned.layers.items():
        assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize())  # the model holds the kept values
        if name.startswith("model.layers.0."):  # later blocks see other inputs, so their codes differ anyway
            before = plain.layers[name]
            for field in ("widths", "codes", "outlier_rows", "outlier_cols"):
                assert torch.equal(getattr(qw, field), getattr(before, field)), (name, field)
            assert qw.storage() == before.storage()
            assert not torch.equal(qw.codebooks, before.codebooks)
    assert all(p.requires_grad for p in model.parameters())  # training left the model's flags as they were


def test_finetune_needs_windows_and_valid_settings():
    model = tiny_model("llama", seed=0)
    with pytest.raises(ConfigError, match="calibration windows"):
        quantize_model(model, find_arch(model), get_quantizer("rtn", bits=3), None, progress=False,
                       finetune=FinetuneConfig(epochs=1))
    for bad in ({"epochs": -1}, {"lr": 0}, {"windows_per_step": 0}, {"target": "teacher"}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


def test_model_target_follows_the_float_model():
    """With target="model", block 1's target is the float model's state after block 1: its error before
    fine-tuning includes block 0's drift, so it is at least the block-target error of the same block."""
    _, by_block = _quantize_tiny(2, "block")
    _, by_model = _quantize_tiny(2, "model")
    assert by_model.finetune[0]["error_before"] == pytest.approx(by_block.finetune[0]["error_before"])
    assert by_model.finetune[1]["error_before"] > by_block.finetune[1]["error_before"]
