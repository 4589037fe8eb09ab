"""The native engine (cmpq.engine, kernels/engine.c) against the PyTorch path on the same packed models: logits
token by token and of whole prompts, greedy tokens, every ISA, 1 and 2 threads, the families it covers, the ones it
does not, bad input, and transformers' generate routed through it."""

from __future__ import annotations

import pytest
import torch

import cmpq
from cmpq.engine import choose, engine_for, unsupported
from cmpq.errors import ConfigError
from cmpq.generate import generate_ids
from cmpq.kernels import native
from cmpq.models.arch import find_arch
from cmpq.models.loaded import LoadedModel
from cmpq.models.tiny import TINY_VOCAB, tiny_model

WINDOW = 5  # the tiny Mistral's sliding window: prompts cross it, and several KV blocks of 64 positions
LENGTH = 150


def _packed(family: str, tmp_path, quantize_head: bool = False):
    from cmpq.head import head_quantizer
    from cmpq.packed.model_io import save_quantized
    from cmpq.pipeline import quantize_model
    from cmpq.quantizers import get_quantizer

    model = tiny_model(family, seed=0)
    windows = torch.randint(3, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    quantizer, head = get_quantizer("cmpq", bits=3), head_quantizer(4) if quantize_head else None
    loaded = LoadedModel(model=model, tokenizer=None, arch=find_arch(model), spec="tiny", source="tiny")
    result = quantize_model(model, loaded.arch, quantizer, windows, progress=False, head=head)
    directory = save_quantized(loaded, result, quantizer, tmp_path / f"{family}-q", head=head)
    model = cmpq.load(directory, engine="torch").model
    if family == "mistral":
        model.config.sliding_window = WINDOW
    return model


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0].log_softmax(-1)


@pytest.mark.parametrize("family,quantize_head", [("llama", False), ("llama", True), ("mistral", False),
                                                  ("qwen2", False)])
def test_engine_logits_match_the_pytorch_path_token_by_token(family, quantize_head, tmp_path):
    model = _packed(family, tmp_path, quantize_head)
    ids = _ids(LENGTH)
    reference = _reference(model, ids)
    engine = engine_for(model, context=256)
    for threads in (1, 2):
        engine.threads = threads
        whole = engine.forward(ids[0], 0, all_logits=True).log_softmax(-1)  # prefill: tiles and dense products
        assert (whole - reference).abs().max() <= 1e-3
        engine.forward(ids[0, :80], 0)
        for t in range(80, 80 + 64):  # 64 decode steps after an 80-token prompt
            step = engine.forward(ids[0, t:t + 1], t).log_softmax(-1)
            assert (step - reference[t]).abs().max() <= 1e-3, t
    if family == "mistral":  # the window matters: without it the logits differ
        model.config.sliding_window = None
        assert (_reference(model, ids) - reference).abs().max() > 1e-2


def test_engine_greedy_tokens_equal_the_pytorch_path_and_every_isa_agrees(tmp_path):
    model = _packed("qwen2", tmp_path)
    prompt = _ids(20)
    expected, _, _ = generate_ids(model, prompt, 64)
    for isa in native.supported_isas():
        engine = engine_for(model, context=128, isa=isa)
        tokens, _, _ = generate_ids(model, prompt, 64, engine=engine)
        assert torch.equal(tokens, expected), isa


def test_float_models_run_in_the_engine_too():
    model = tiny_model("llama", seed=0)
    ids = _ids(40)
    reference = _reference(model, ids)
    engine = engine_for(model, context=64)
    assert (engine.forward(ids[0], 0, all_logits=True).log_softmax(-1) - reference).abs().max() <= 1e-3
    assert (engine.forward(ids[0, :3], 0).log_softmax(-1) - reference[2]).abs().max() <= 1e-3


def test_uncovered_models_keep_the_pytorch_path_with_one_notice(capsys):
    opt = tiny_model("opt", seed=0)
    assert "opt" in unsupported(opt)
    assert choose(opt, "native") is None
    assert "PyTorch path" in capsys.readouterr().err
    assert choose(tiny_model("llama"), "torch") is None
    with pytest.raises(ConfigError, match="unknown engine"):
        choose(opt, "fast")
    with pytest.raises(ConfigError, match="opt"):
        engine_for(opt)


def test_bad_input_is_one_clear_error():
    model = tiny_model("llama", seed=0)
    engine = engine_for(model, context=16)
    with pytest.raises(ConfigError, match="context"):
        engine.forward(_ids(17)[0], 0)
    with pytest.raises(ConfigError, match="vocabulary"):
        engine.forward([TINY_VOCAB], 0)
    with pytest.raises(ConfigError, match="exceed the model's context"):
        generate_ids(model, _ids(10), 7, engine=engine)
    with pytest.raises(ConfigError, match="empty"):
        generate_ids(model, _ids(10)[:, :0], 4, engine=engine)
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(model, _ids(4), 4, temperature=float("nan"), engine=engine)


def test_cli_generate_runs_the_engine_and_refuses_bad_input(tmp_path, capsys):
    from cmpq.cli import main
    from cmpq.models.tiny import save_tiny

    directory = save_tiny(tmp_path / "tiny", "llama")
    assert main(["generate", "--model", str(directory), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert "(native engine)" in capsys.readouterr().err
    assert main(["generate", "--model", str(directory), "--prompt", "hello", "--max-new-tokens", "5",
                 "--engine", "torch"]) == 0
    assert "(PyTorch path)" in capsys.readouterr().err
    code = main(["generate", "--model", str(directory), "--prompt", "x" * 3000, "--max-new-tokens", "5"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert code != 0 and len(lines) == 1 and "context" in lines[0] and "Traceback" not in lines[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(directory), "--prompt", "hello", "--engine", "fast"])
    assert exit_info.value.code == 2


def test_transformers_generate_is_routed_through_the_engine(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _packed("llama", tmp_path)
    directory = tmp_path / "llama-q"
    routed = AutoModelForCausalLM.from_pretrained(str(directory))
    prompt = _ids(12)
    for use_cache in (True, False):
        out = routed.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=use_cache)
        assert routed._cmpq_route.engine is not None
        routed._cmpq_route.enabled = False
        expected = routed.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=use_cache)
        routed._cmpq_route.enabled = True
        assert torch.equal(out, expected)
    del model
