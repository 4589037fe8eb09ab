"""Saving and loading whole quantized models: bit-identical round trip, transformers' from_pretrained after
`import cmpq`, file size = accounting + unquantized tensors, atomic writes, clear errors on damaged files."""

import json

import pytest
import torch

import cmpq
from cmpq.errors import CmpqError, FormatError
from cmpq.formats.cmpq import CMPQLinear
from cmpq.kernels import native
from cmpq.models.arch import find_arch
from cmpq.models.loaded import LoadedModel
from cmpq.models.tiny import TINY_VOCAB, tiny_model, tiny_tokenizer
from cmpq.packed.hf import FORMAT_VERSION
from cmpq.packed.model_io import WEIGHTS, load, save_quantized
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model = tiny_model("llama", seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=find_arch(model), spec="tiny", source="tiny")
    windows = torch.randint(3, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("cmpq", preset="best", bits=3.0, act_outliers=0.01)
    result = quantize_model(model, loaded.arch, quantizer, windows, progress=False)
    directory = save_quantized(loaded, result, quantizer, tmp_path_factory.mktemp("saved") / "tiny-3bit")
    return loaded, result, directory


def test_round_trip_is_bit_identical_and_gives_the_same_logits(quantized):
    loaded, result, directory = quantized
    reloaded = load(directory)
    for name, qw in result.layers.items():
        module = reloaded.model.get_submodule(name)
        assert isinstance(module, CMPQLinear)
        assert torch.equal(module.dequantize(), qw.dequantize()), name
    ids = torch.randint(3, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert reloaded.tokenizer is not None and reloaded.arch.name == loaded.arch.name


def test_transformers_from_pretrained_works_after_import_cmpq(quantized):
    from transformers import AutoModelForCausalLM

    loaded, result, directory = quantized
    assert cmpq.__version__
    model, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    name = next(iter(result.layers))
    assert torch.equal(model.get_submodule(name).dequantize(), result.layers[name].dequantize())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_file_size_equals_the_accounting_plus_unquantized_tensors(quantized):
    loaded, result, directory = quantized
    quantized_bytes = result.storage().total / 8
    state = loaded.model.state_dict()
    unquantized_bytes = sum(t.numel() * t.element_size() for name, t in state.items()
                            if name.rpartition(".")[0] not in result.layers and name != "lm_head.weight")
    size = (directory / WEIGHTS).stat().st_size
    # safetensors adds a JSON header; width maps round up to whole bytes
    assert abs(size - unquantized_bytes - quantized_bytes) <= 0.01 * quantized_bytes + 16_384
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "cmpq" and config["format_version"] == FORMAT_VERSION == 2
    assert config["bpw"] == pytest.approx(result.storage().bpw) and config["target_bits"] == 3.0


def test_an_existing_directory_is_not_overwritten_without_asking(quantized, tmp_path):
    loaded, result, directory = quantized
    quantizer = get_quantizer("cmpq", preset="best", bits=3.0)
    with pytest.raises(CmpqError, match="exists"):
        save_quantized(loaded, result, quantizer, directory)
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_quantized(loaded, result, quantizer, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / WEIGHTS).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary or backup directories left


def test_saved_files_get_the_umask_modes_not_the_temporary_directorys(quantized):
    from cmpq.atomic import ordinary_mode

    loaded, result, directory = quantized
    assert directory.stat().st_mode & 0o777 == ordinary_mode(directory=True)  # mkdtemp made it 0700
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == ordinary_mode(path.is_dir()), path.name


def copy_dir(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_truncated_corrupted_and_foreign_files_fail_clearly(quantized, tmp_path):
    _, _, directory = quantized
    truncated = copy_dir(directory, tmp_path / "truncated")
    data = (truncated / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="model.safetensors.*checksum"):
        load(truncated)
    with pytest.raises(FormatError, match="model.safetensors"):
        load(truncated, verify=False)

    flipped = copy_dir(directory, tmp_path / "flipped")
    data = bytearray((flipped / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF
    (flipped / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch"):
        load(flipped)

    future = copy_dir(directory, tmp_path / "future")
    config = json.loads((future / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (future / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="format version 99"):
        load(future)
    with pytest.raises(CmpqError, match="no config.json"):
        load(tmp_path)


def test_generation_from_a_saved_model_matches_the_in_memory_model(quantized):
    from cmpq.generate import generate_ids

    loaded, _, directory = quantized
    reloaded = load(directory)
    ids = torch.randint(3, TINY_VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    ours, _, _ = generate_ids(reloaded.model, ids, 12)
    reference, _, _ = generate_ids(loaded.model, ids, 12)
    assert ours.numel() == 12 and torch.equal(ours, reference)
    with torch.no_grad():  # the static-cache loop is plain greedy decoding
        greedy = ids
        for _ in range(12):
            greedy = torch.cat([greedy, loaded.model(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy[0, 8:], reference)


def test_cli_saves_and_generates(quantized, tmp_path, capsys, monkeypatch):
    from cmpq.cli import main
    from cmpq.models.tiny import save_tiny

    source = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(source), "--bits", "2.5", "--nsamples", "4", "--seqlen", "32",
                 "--eval", "none", "--out", str(out), "--no-progress", "--json", str(tmp_path / "r.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "saved to" in printed and "time by stage" in printed
    stages = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])["stages"]
    for name in ("load model", "calibration forwards", "statistics", "gradient pass", "width allocation",
                 "k-means, 2 bits", "error feedback", "outliers", "distillation", "save"):
        assert stages[name] > 0, name
    calibration = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert calibration["source"] == "c4" and (calibration["nsamples"], calibration["seqlen"]) == (4, 32)
    assert main(["quantize", "--model", str(source), "--bits", "2.5", "--out", str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err  # refused before loading or quantizing anything
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    if native.int8_supported():  # without --tables, $CMPQ_TABLES (float here, conftest) decides
        from cmpq.formats import cmpq as cmpq_layer

        seen, real = [], cmpq_layer.CMPQLinear.forward
        with monkeypatch.context() as patch:
            patch.setattr(cmpq_layer.CMPQLinear, "forward", lambda self, x: seen.append(self.tables) or real(self, x))
            assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "2",
                         "--engine", "torch"]) == 0
        assert seen and set(seen) == {None}
    assert main(["generate", "--model", str(source), "--prompt", "hello", "--tables", "int8", "--engine", "torch"]) == 2
    assert "no CMPQ layers" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--tables", "int8"]) == 2
    assert "--engine torch" in capsys.readouterr().err  # int8 tables are a PyTorch-path option
    if native.int8_supported():
        assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "5",
                     "--tables", "int8", "--engine", "torch"]) == 0
        assert "tokens/s decode (PyTorch path)" in capsys.readouterr().err


def test_chat_prompts_go_through_the_template(quantized):
    from cmpq.generate import prompt_ids

    tokenizer = quantized[0].tokenizer
    plain = prompt_ids(tokenizer, "hello", chat=False)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% endfor %} <assistant>"
    try:
        chat = prompt_ids(tokenizer, "hello", chat=True)
    finally:
        tokenizer.chat_template = None
    assert chat.dim() == 2 and chat.shape[1] > plain.shape[1]
    assert "hello" in tokenizer.decode(chat[0]) and "user" in tokenizer.decode(chat[0])


def test_decode_benchmark_compares_models_with_the_same_loop(quantized, tmp_path, monkeypatch):
    from cmpq.bench.decode import run
    from cmpq.models.tiny import save_tiny

    source = save_tiny(tmp_path / "tiny", "llama")
    _, _, directory = quantized
    monkeypatch.delenv("CMPQ_TABLES")  # the default
    records = run([str(source), str(directory), f"{directory}:int8", f"{directory}:float"], tmp_path / "out",
                  new_tokens=6, repeats=2)
    assert [r["speedup"] for r in records][0] == 1.0 and records[1]["tokens_per_second"] > 0
    # the packed model runs in the native engine (exact float tables); DIR:int8 / DIR:float on the PyTorch path
    assert records[1]["bpw"] is not None and records[1]["engine"] == "native" and records[1]["tables"] == "float"
    assert records[2]["model"].endswith(":int8") and records[2]["tokens_per_second"] > 0
    assert records[2]["tables"] == "int8" and records[3]["tables"] == "float"
    assert records[2]["engine"] == records[3]["engine"] == "torch" and records[3]["profile"]
    table = (tmp_path / "out" / "decode.md").read_text()
    assert "tokens/s" in table and "(int8 tables)" in table and "(float tables)" in table and "| native |" in table
    with pytest.raises(ValueError, match="int8 tables apply to CMPQ"):
        run([f"{source}:int8"], tmp_path / "out2", new_tokens=2, repeats=1)


def test_decode_benchmark_alternates_models_and_takes_the_median_of_per_round_ratios(monkeypatch):
    """Round r runs model A then model B; A's decode seconds drift (1, 2, 4 per round) and B is always twice as fast
    as A in the same round: the per-round ratio is 2 every time, although B's median speed is not twice A's."""
    from types import SimpleNamespace

    from cmpq.bench import decode

    calls = []
    seconds = {"A": iter([9.0, 1.0, 2.0, 4.0]), "B": iter([9.0, 0.5, 1.0, 2.0])}  # first: the warm-up

    def fake_generate(model, ids, new_tokens, engine=None):
        calls.append(model)
        return torch.zeros(new_tokens, dtype=torch.long), 0.1, next(seconds[model])

    class Tokenizer:
        def __call__(self, text, return_tensors):
            return SimpleNamespace(input_ids=torch.zeros(1, 3, dtype=torch.long))

        def decode(self, ids, skip_special_tokens):
            return "text"

    monkeypatch.setattr(decode, "generate_ids", fake_generate)
    models = [SimpleNamespace(model=name, tokenizer=Tokenizer(), engine=None) for name in "AB"]
    results = decode.interleaved_speeds(models, new_tokens=11, repeats=3)
    assert calls == ["A", "B", "A", "B", "A", "B", "A", "B"]
    assert [r["speedup"] for r in results] == [1.0, 2.0]
    assert results[0]["tokens_per_second"] == 10 / 2.0 and results[1]["tokens_per_second"] == 10 / 1.0


@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_models_save_and_load_through_the_same_format(tmp_path, group_size):
    from cmpq.formats.uniform import UniformLinear

    model = tiny_model("llama", seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=find_arch(model), spec="tiny", source="tiny")
    quantizer = get_quantizer("rtn", bits=3, group_size=group_size)
    result = quantize_model(model, loaded.arch, quantizer, None, progress=False)
    directory = save_quantized(loaded, result, quantizer, tmp_path / "rtn")
    reloaded = load(directory)
    for name, qw in result.layers.items():
        module = reloaded.model.get_submodule(name)
        assert isinstance(module, UniformLinear) and torch.equal(module.dequantize(), qw.dequantize())
    size = (directory / WEIGHTS).stat().st_size
    unquantized = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                      if n.rpartition(".")[0] not in result.layers and n != "lm_head.weight")
    assert abs(size - unquantized - result.storage().total / 8) <= 0.01 * result.storage().total / 8 + 16_384


def test_generation_needs_at_least_one_new_token(quantized):
    from cmpq.generate import generate_ids

    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(quantized[0].model, torch.tensor([[5, 6]]), 0)


def test_repetition_penalty_matches_transformers_processor_and_is_checked(quantized):
    from transformers import RepetitionPenaltyLogitsProcessor

    from cmpq.generate import _penalize, generate_ids

    logits = torch.randn(1, TINY_VOCAB, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([[3, 7, 7, 11]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(_penalize(logits, seen, 1.3), expected, rtol=0, atol=0)
    assert _penalize(logits, seen, 1.0) is logits

    model = quantized[0].model
    ids = torch.randint(3, TINY_VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    plain, _, _ = generate_ids(model, ids, 24)
    penalized, _, _ = generate_ids(model, ids, 24, repetition_penalty=50.0)
    # a huge penalty forbids any token already seen (while unseen ones remain), which greedy decoding of a random
    # tiny model does repeat
    assert len(set(penalized.tolist())) == 24 and len(set(plain.tolist())) < 24
    assert not set(penalized.tolist()) & set(ids[0].tolist())
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate_ids(model, ids, 4, repetition_penalty=0.0)
