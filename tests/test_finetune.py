"""Block fine-tuning of the stored values (`cmpq.training.finetune`) and the value interface of CMPQ weights it trains."""

import pytest
import torch

from cmpq.calibration.stats import LayerStats
from cmpq.errors import ConfigError
from cmpq.formats.cmpq import lookup_index
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.quantizers.cmpq.quantizer import CMPQ, CMPQConfig
from cmpq.training.finetune import FinetuneConfig


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
        again = qw.with_values(theta)  # values already on the grid stay where they are
        torch.testing.assert_close(again.dequantize(), qw.dequantize(), rtol=0, atol=1e-6)
        assert index.shape == w.shape and int(index.max()) < theta.numel()


def test_weight_from_values_is_theta_at_the_index_with_the_same_gradient():
    """The gather used in training (`weight_from_values`) against the plain reference theta[index]."""
    from cmpq.formats.synthetic import random_cmpq_layer

    layer = random_cmpq_layer(32, 24, torch.tensor([1, 2, 3] * 8), nnz=10, codebook="fp16")
    theta, index = layer.lookup_values()
    assert torch.equal(layer.stored_values(), theta)
    upstream = torch.randn(32, 24, generator=torch.Generator().manual_seed(1))
    fast, plain = theta.clone().requires_grad_(True), theta.clone().requires_grad_(True)
    weight = layer.weight_from_values(fast)
    assert torch.equal(weight, plain[index]) and torch.equal(weight, layer.dequantize())
    (weight * upstream).sum().backward()
    (plain[index] * upstream).sum().backward()
    torch.testing.assert_close(fast.grad, plain.grad, rtol=1e-6, atol=1e-6)
    assert fast.grad[-10:].abs().sum() > 0  # the outlier values get their gradient too


def test_lookup_index_puts_outliers_after_the_codebooks_in_their_order():
    codes = torch.tensor([[0, 1], [1, 0]])
    assert lookup_index(codes, 2, torch.tensor([0, 1]), torch.tensor([1, 0])).tolist() == [[0, 4], [5, 2]]
    assert lookup_index(codes, 2, torch.tensor([1, 0]), torch.tensor([0, 1])).tolist() == [[0, 5], [4, 2]]


def test_with_values_keeps_the_int8_grid_unless_values_leave_it():
    from cmpq.formats.synthetic import random_cmpq_layer

    layer = random_cmpq_layer(32, 24, torch.tensor([1, 2, 3] * 8), nnz=10, codebook="int8")
    theta, _ = layer.lookup_values()
    same = layer.with_values(theta)
    assert same.int8_grid == layer.int8_grid and torch.equal(same.dequantize(), layer.dequantize())
    lo, scale = layer.int8_grid
    moved = theta.clone()
    moved[0] = lo + 300 * scale  # past the grid's top
    wider = layer.with_values(moved)
    assert wider.int8_grid != layer.int8_grid
    assert wider.codebooks[0, 0] == pytest.approx(lo + 300 * scale, abs=wider.int8_grid[1])


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


def test_targets_are_the_float_blocks_or_the_float_models_states(monkeypatch):
    """target="block": the float block on the quantized model's inputs; target="model": the float model's own
    hidden state after that block (read by a hook on an untouched copy of the model)."""
    import copy

    import cmpq.pipeline as pipeline

    model = tiny_model("llama", seed=0)
    windows = torch.randint(0, TINY_VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    reference, states, seen = copy.deepcopy(model), [], []
    hooks = [block.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for block in find_arch(reference).blocks(reference)]
    with torch.no_grad():
        for window in windows:
            reference(window[None])
    for hook in hooks:
        hook.remove()
    float_states = [torch.cat(states[b::2]) for b in range(2)]  # per block: (windows, seqlen, hidden)
    original = pipeline.finetune_block

    def spy(block, layers, inputs, hidden, target, config, seed=0):
        seen.append((hidden.clone(), target.clone()))
        return original(block, layers, inputs, hidden, target, config, seed)

    monkeypatch.setattr(pipeline, "finetune_block", spy)
    for target in ("block", "model"):
        seen.clear()
        quantize_model(copy.deepcopy(model), find_arch(model), get_quantizer("cmpq", preset="best", bits=2.5),
                       windows, progress=False, finetune=FinetuneConfig(epochs=1, lr=1e-2, target=target))
        torch.testing.assert_close(seen[0][1], float_states[0])  # block 0: both are the float block on float inputs
        if target == "model":
            torch.testing.assert_close(seen[1][1], float_states[1])
        else:  # the float block 1 on what the quantized block 0 produced, not the float model's state
            assert not torch.allclose(seen[1][1], float_states[1], atol=1e-3)
            assert not torch.allclose(seen[1][0], float_states[0], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finetune_runs_under_no_grad_and_in_the_models_precision(dtype):
    model = tiny_model("llama", seed=0).to(dtype)
    windows = torch.randint(0, TINY_VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # library callers often quantize inside no_grad
        result = quantize_model(model, find_arch(model), get_quantizer("cmpq", preset="best", bits=2.5), windows,
                                progress=False, finetune=FinetuneConfig(epochs=1, lr=1e-2))
    assert len(result.finetune) == 2 and any(b["kept"] for b in result.finetune)
    assert all(p.dtype == dtype for p in model.parameters())


def test_a_fine_tuned_model_saves_says_so_and_round_trips(tmp_path):
    import json

    from cmpq.models.loaded import LoadedModel
    from cmpq.models.tiny import tiny_tokenizer
    from cmpq.packed.model_io import load, save_quantized

    model = tiny_model("llama", seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=find_arch(model), spec="tiny", source="tiny")
    windows = torch.randint(3, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("cmpq", preset="best", bits=2.5)
    result = quantize_model(model, loaded.arch, quantizer, windows, progress=False,
                            finetune=FinetuneConfig(epochs=2, lr=1e-2))
    directory = save_quantized(loaded, result, quantizer, tmp_path / "tuned")
    saved = json.loads((directory / "config.json").read_text())["quantization_config"]["finetune"]
    assert saved["epochs"] == 2 and saved["lr"] == 1e-2 and saved["target"] == "block"
    assert saved["blocks_kept"] == sum(b["kept"] for b in result.finetune) > 0
    reloaded = load(directory)
    for name, qw in result.layers.items():
        assert torch.equal(reloaded.model.get_submodule(name).dequantize(), qw.dequantize()), name
