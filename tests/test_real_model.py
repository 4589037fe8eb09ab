"""Checks on the bundled smollm2-135m (marked `real_model`; about 3 minutes on 2 cores)."""

import copy
import math

import pytest
import torch

from cmpq.config import CalibConfig, EvalConfig
from cmpq.data.sampling import calibration_windows
from cmpq.eval.perplexity import perplexity
from cmpq.models.load import bundled_smollm2_path
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer

pytestmark = pytest.mark.real_model

PROTOCOL_FLOAT_QUICK = {"wikitext2": 20.71, "c4": 33.39}  # ../shared/PROTOCOL.md, float32, quick


def test_bundled_model_is_found_and_has_protocol_shape(smollm2):
    assert bundled_smollm2_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    blocks = smollm2.arch.blocks(smollm2.model)
    linears = [lin for block in blocks for lin in smollm2.arch.block_linears(block).values()]
    assert len(blocks) == 30 and len(linears) == 210
    assert round(sum(lin.weight.numel() for lin in linears) / 1e6, 1) == 106.2


@pytest.mark.parametrize("dataset", ["wikitext2", "c4"])
def test_float_perplexity_reproduces_protocol(smollm2, dataset):
    result = perplexity(smollm2.model, smollm2.tokenizer, dataset, EvalConfig(protocol="quick"), progress=False)
    assert result.windows == 16 and result.tokens == 16 * 2047
    assert result.ppl == pytest.approx(PROTOCOL_FLOAT_QUICK[dataset], rel=0.005)


def test_engine_quantizes_the_real_model_with_calibration(smollm2):
    model = copy.deepcopy(smollm2.model)
    windows, source = calibration_windows(smollm2.tokenizer, CalibConfig(nsamples=2, seqlen=128))
    assert "docs 1000..1999" in source

    class NeedsStats(type(get_quantizer("rtn"))):
        def needs(self):
            return frozenset({"col_sq_sum"})

    quantizer = NeedsStats(get_quantizer("rtn", bits=4, group_size=128).config)
    result = quantize_model(model, smollm2.arch, quantizer, windows, progress=False)
    storage = result.storage()
    rows_groups = sum(qw.shape[0] * math.ceil(qw.shape[1] / 128) for qw in result.layers.values())
    assert storage.weights == sum(qw.shape[0] * qw.shape[1] for qw in result.layers.values())
    assert storage.total == 4 * storage.weights + 20 * rows_groups
    ids = windows[:1]
    with torch.no_grad():
        loss_q = model(ids, labels=ids).loss.item()
        loss_f = smollm2.model(ids, labels=ids).loss.item()
    assert abs(loss_q - loss_f) < 0.5  # 4-bit g128 barely moves the loss


def test_cmpq_meets_its_budget_and_beats_rtn_on_the_real_model(smollm2):
    """CMPQ at 3.0 honest bpw (paper rule, 8 x 256 calibration tokens) against RTN 3-bit g128 (3.16 bpw)."""
    windows, _ = calibration_windows(smollm2.tokenizer, CalibConfig(nsamples=8, seqlen=256))
    from cmpq.data.sampling import eval_token_ids

    held_out = eval_token_ids(smollm2.tokenizer, "wikitext2")[0][:, :512]
    losses = {}
    for method, options in (("cmpq", {"bits": 3.0}), ("rtn", {"bits": 3, "group_size": 128})):
        model = copy.deepcopy(smollm2.model)
        result = quantize_model(model, smollm2.arch, get_quantizer(method, **options), windows, progress=False)
        if method == "cmpq":
            assert 2.98 <= result.storage().bpw <= 3.0
            assert all(qw.storage().bpw <= 3.0 for qw in result.layers.values())
        with torch.no_grad():
            losses[method] = model(held_out, labels=held_out).loss.item()
        del model
    assert losses["cmpq"] < losses["rtn"]


def test_packed_real_model_round_trips_and_its_file_matches_the_accounting(smollm2, tmp_path):
    """CMPQ at 2.5 bpw (paper rule, 4 x 256 calibration tokens), saved, loaded by transformers after
    `import cmpq`: weights bit-identical, file size = honest accounting + unquantized tensors (within 1%),
    and the native kernels give the reference logits."""
    from transformers import AutoModelForCausalLM

    from cmpq.models.loaded import LoadedModel
    from cmpq.packed.model_io import WEIGHTS, save_quantized

    model = copy.deepcopy(smollm2.model)
    windows, _ = calibration_windows(smollm2.tokenizer, CalibConfig(nsamples=4, seqlen=256))
    quantizer = get_quantizer("cmpq", preset="paper", bits=2.5)
    result = quantize_model(model, smollm2.arch, quantizer, windows, progress=False)
    loaded = LoadedModel(model=model, tokenizer=smollm2.tokenizer, arch=smollm2.arch, spec="smollm2-135m",
                         source=smollm2.source)
    directory = save_quantized(loaded, result, quantizer, tmp_path / "smollm2-2.5")
    unquantized = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                      if name.rpartition(".")[0] not in result.layers and name != "lm_head.weight")
    accounted = result.storage().total / 8
    size = (directory / WEIGHTS).stat().st_size
    assert abs(size - unquantized - accounted) <= 0.01 * accounted
    reloaded = AutoModelForCausalLM.from_pretrained(str(directory))
    for name in list(result.layers)[::37]:
        assert torch.equal(reloaded.get_submodule(name).dequantize(), result.layers[name].dequantize()), name
    for length in (4, 16):  # LUT-GEMV (up to 8 tokens) and dequantized-tile matmul
        ids = windows[:1, :length]
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)
    # the native engine on the same packed model: 64 decode steps after a 64-token prompt, log-softmax within
    # 1e-3 of the PyTorch path at every step, and the same greedy tokens
    from cmpq.engine import engine_for
    from cmpq.generate import generate_ids

    reloaded._cmpq_route.enabled = False
    ids = windows[:1, :128]
    with torch.inference_mode():
        reference = reloaded(ids).logits[0].log_softmax(-1)
    engine = engine_for(reloaded, context=256)
    engine.forward(ids[0, :64], 0)
    worst = max((engine.forward(ids[0, t:t + 1], t).log_softmax(-1) - reference[t]).abs().max().item()
                for t in range(64, 128))
    assert worst <= 1e-3
    expected, _, _ = generate_ids(reloaded, ids[:, :32], 64)
    assert torch.equal(generate_ids(reloaded, ids[:, :32], 64, engine=engine)[0], expected)


def test_gptq_and_llmmq_beat_rtn_on_the_real_model(smollm2):
    """GPTQ 3-bit g128 below RTN 3-bit g128 on a held-out window (GPTQ paper's claim), and LLM-MQ meets a
    fractional honest target with mixed layer widths (8 x 256 calibration tokens)."""
    windows, _ = calibration_windows(smollm2.tokenizer, CalibConfig(nsamples=8, seqlen=256))
    from cmpq.data.sampling import eval_token_ids

    held_out = eval_token_ids(smollm2.tokenizer, "wikitext2")[0][:, :512]
    losses = {}
    for method, options in (("gptq", {"bits": 3, "group_size": 128}), ("rtn", {"bits": 3, "group_size": 128}),
                            ("llmmq", {"bits": 3.3})):
        model = copy.deepcopy(smollm2.model)
        quantizer = get_quantizer(method, **options)
        result = quantize_model(model, smollm2.arch, quantizer, windows, progress=False)
        if method == "llmmq":
            assert 3.28 <= result.storage().bpw <= 3.3
            assert len(set(quantizer.planned_bits().values())) >= 2
        with torch.no_grad():
            losses[method] = model(held_out, labels=held_out).loss.item()
        del model
    assert losses["gptq"] < losses["rtn"]
    assert math.isfinite(losses["llmmq"])
