"""`--quantize-head`: the output head quantized with CMPQ, untied from the embeddings, accounted apart from the
blocks, saved and loaded through the packed format."""

import json

import pytest
import torch

from cmpq.errors import ConfigError
from cmpq.formats.cmpq import CMPQLinear
from cmpq.head import head_quantizer, output_head
from cmpq.models.arch import find_arch
from cmpq.models.loaded import LoadedModel
from cmpq.models.tiny import TINY_VOCAB, tiny_model, tiny_tokenizer
from cmpq.packed.model_io import WEIGHTS, load, save_quantized
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.workflow import head_record

WINDOWS = torch.randint(3, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def loaded_tiny() -> LoadedModel:
    model = tiny_model("llama", seed=0)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=find_arch(model), spec="tiny", source="tiny")


@pytest.mark.parametrize("bits", [3.0, 6.0])
def test_head_is_untied_quantized_within_budget_and_accounted_apart(bits):
    loaded = loaded_tiny()
    model = loaded.model
    embeddings = model.get_input_embeddings().weight.detach().clone()
    float_head = model.get_output_embeddings().weight.detach().clone()
    body = get_quantizer("cmpq", preset="best", bits=3.0)
    result = quantize_model(model, loaded.arch, body, WINDOWS, progress=False, head=head_quantizer(bits))
    qw = result.layers["lm_head"]
    assert result.head == "lm_head" and model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # the embeddings keep their float values
    assert torch.equal(model.lm_head.weight, qw.dequantize())
    for recompute in (True, False):  # transformers must not tie the quantized head back to the embeddings
        model.tie_weights(recompute_mapping=recompute)
        assert torch.equal(model.lm_head.weight, qw.dequantize())
    assert bits - 0.02 <= qw.storage().bpw <= bits
    error = (qw.dequantize() - float_head).square().mean() / float_head.square().mean()
    assert error < (0.01 if bits == 6 else 0.15), error  # error feedback trades weight error for output error
    blocks_only = quantize_model(tiny_model("llama", seed=0), loaded.arch, body, WINDOWS, progress=False)
    assert result.storage() == blocks_only.storage() and result.head_storage() == qw.storage()


def test_head_statistics_are_its_inputs_and_need_windows():
    from cmpq.calibration.stats import StatsRecorder
    from cmpq.head import head_stats

    loaded = loaded_tiny()
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(loaded.model, loaded.arch, get_quantizer("rtn", bits=4), None, progress=False,
                       head=head_quantizer(4))
    for bad in (0.5, 9):
        with pytest.raises(ConfigError, match="between 1 and 8"):
            head_quantizer(bad)
    name, head = output_head(loaded.model)
    assert name == "lm_head" and head.out_features == TINY_VOCAB
    # the statistics from the last block's outputs equal those of a hook on the head in a full forward
    model = loaded.model
    outputs = []
    handle = loaded.arch.blocks(model)[-1].register_forward_hook(lambda m, a, out: outputs.append(
        (out[0] if isinstance(out, tuple) else out).detach()))
    recorder = StatsRecorder({name: head}, frozenset({"col_sq_sum", "hessian"}))
    with torch.no_grad():
        for row in WINDOWS:
            model(row[None])
            recorder.flush()
    handle.remove()
    expected = recorder.close()[name]
    got = head_stats(loaded.arch.final_modules(model), name, head, frozenset({"col_sq_sum", "hessian"}),
                     torch.cat(outputs), torch.float32)
    assert got.tokens == expected.tokens == WINDOWS.numel()
    for stat in ("col_sq_sum", "hessian"):
        torch.testing.assert_close(got[stat], expected[stat])


@pytest.mark.parametrize("method", ["cmpq", "rtn"])
def test_a_model_with_a_quantized_head_saves_and_loads(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from cmpq.config import CalibConfig
    from cmpq.workflow import quantize

    loaded = loaded_tiny()
    body = get_quantizer("cmpq", preset="best", bits=3.0) if method == "cmpq" else get_quantizer("rtn", bits=4)
    head = head_quantizer(4.0)
    calib = CalibConfig(source="c4", nsamples=4, seqlen=32, dtype="float32")
    result, calib_info = quantize(loaded, body, calib, progress=False, head=head)
    assert calib_info["used"]  # rtn needs no calibration, the head does
    assert result.head == "lm_head" and "lm_head" in result.layers
    body_only = quantize_model(tiny_model("llama", seed=0), loaded.arch, body, WINDOWS, progress=False)
    if method == "rtn":  # the blocks' accounting does not include the head
        assert result.storage() == body_only.storage()
    record = head_record(result, head)
    assert record["bpw"] == pytest.approx(result.layers["lm_head"].storage().bpw) and record["bpw"] <= 4.0

    directory = save_quantized(loaded, result, body, tmp_path / "q", head=head)
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["head"]["name"] == "lm_head"
    assert config["quantization_config"]["bpw"] == pytest.approx(result.storage().bpw)
    reloaded = load(directory)
    assert isinstance(reloaded.model.lm_head, CMPQLinear)
    for name, qw in result.layers.items():
        assert torch.equal(reloaded.model.get_submodule(name).dequantize(), qw.dequantize()), name
    assert torch.equal(reloaded.model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)
    ids = torch.randint(3, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)
        one = ids[:1, :1]  # a single token takes the LUT-GEMV path of the head
        torch.testing.assert_close(reloaded.model(one).logits, loaded.model(one).logits, rtol=1e-4, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    assert isinstance(model.lm_head, CMPQLinear)

    # file size: blocks + head accounting + the unquantized tensors (embeddings now stored on their own)
    state = loaded.model.state_dict()
    unquantized = sum(t.numel() * t.element_size() for n, t in state.items()
                      if n.rpartition(".")[0] not in result.layers)
    quantized_bytes = (result.storage().total + result.head_storage().total) / 8
    size = (directory / WEIGHTS).stat().st_size
    assert abs(size - unquantized - quantized_bytes) <= 0.01 * quantized_bytes + 16_384


def test_cli_quantize_head(tmp_path, capsys):
    from cmpq.cli import main
    from cmpq.models.tiny import save_tiny

    source = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(source), "--bits", "3", "--quantize-head", "6", "--nsamples", "4",
                 "--seqlen", "32", "--eval", "none", "--out", str(out), "--json", str(tmp_path / "r.jsonl"),
                 "--no-progress"]) == 0
    assert "head lm_head" in capsys.readouterr().out
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["head"]["bpw"] <= 6 and record["head"]["name"] == "lm_head"
    assert "lm_head.weight" not in json.dumps(record["unquantized"])
    assert main(["inspect", str(tmp_path / "r.jsonl")]) == 0
    shown = capsys.readouterr().out
    assert "in 14 layers" in shown and "head lm_head (reported apart" in shown
    assert main(["quantize", "--model", str(source), "--bits", "3", "--quantize-head", "12", "--eval", "none"]) == 2
    assert "between 1 and 8" in capsys.readouterr().err
