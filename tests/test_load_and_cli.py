"""Model loading errors and the command line, on tiny models saved to temporary directories."""

import json
import subprocess
import sys
import time

import pytest

from cmpq.cli import main, run
from cmpq.errors import ModelNotFoundError, UnsupportedArchitectureError
from cmpq.eval.records import read_records
from cmpq.models.load import load_model
from cmpq.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


def test_load_a_local_hf_directory(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert loaded.arch.name == "llama" and loaded.source == str(tiny_dir)
    assert not loaded.model.training


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama"):
        load_model(str(tmp_path))


def test_missing_and_corrupt_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model at"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelNotFoundError, match="corrupt.gguf"):
        load_model(str(corrupt))


def test_unreachable_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="hub is unreachable"):
        load_model("cmpq-test-org/no-such-model")
    assert time.perf_counter() - start < 10


def test_cli_quantize_writes_a_protocol_record(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.jsonl"
    record = run(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--bits", "3", "--group-size", "16",
                  "--eval", "none", "--json", str(out), "--no-progress"])
    for field in ("model", "method", "target_bits", "bpw", "code_bpw", "file_bytes", "protocol", "ppl",
                  "quant_seconds", "peak_rss_mb", "threads", "git_commit"):
        assert field in record
    assert record["quantized_layers"] == 2 * 7
    assert record["bpw"] == pytest.approx(3 + 19 / 16)
    assert read_records(out) == [json.loads(json.dumps(record))]
    run(["quantize", "--model", str(tiny_dir), "--bits", "2", "--eval", "none", "--json", str(out), "--no-progress"])
    assert [r["target_bits"] for r in read_records(out)] == [3, 2]  # appended, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no stray files
    assert "bpw honest" in capsys.readouterr().out


def test_cli_eval_reports_windows_and_tokens(tiny_dir, capsys):
    record = run(["eval", "--model", str(tiny_dir), "--ppl", "wikitext2", "--no-progress"])
    r = record["ppl"]["wikitext2"]
    assert r["windows"] == 16 and r["tokens"] == 16 * 2047 and r["protocol"] == "quick"
    assert 1 < r["ppl"] < 1e4
    assert "16 windows, 32752 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--bits", "9"], "rtn.bits"),
    (["quantize", "--bits", "2.5"], "rtn.bits"),
    (["quantize", "--bits", "4", "--group-size", "0"], "rtn.group_size"),
    (["quantize", "--bits", "4", "--nsamples", "0"], "calib.nsamples"),
])
def test_cli_bad_options_exit_2_with_the_field(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_model_exits_2(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "no model at" in capsys.readouterr().err


@pytest.mark.parametrize("command,options", [
    ("quantize", ["--model", "--method", "--bits", "--group-size", "--calib", "--nsamples", "--seqlen", "--eval",
                  "--protocol", "--json", "--true-sequential"]),
    ("eval", ["--model", "--ppl", "--protocol", "--json"]),
])
def test_help_explains_every_option(command, options):
    out = subprocess.run([sys.executable, "-m", "cmpq", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in options:
        assert option in out
