"""Model loading errors and the command line, on tiny models saved to temporary directories."""

import json
import os
import subprocess
import sys
import time

import pytest

from cmpq.cli import main, run
from cmpq.errors import ModelNotFoundError, UnsupportedArchitectureError
from cmpq.eval.records import read_records
from cmpq.models.load import load_model


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


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://10.255.255.1:9"}])  # unroutable
def test_unreachable_hub_id_fails_fast(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
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
    assert record["target_bits"] is None and record["config"]["bits"] == 3  # RTN's bits are a code width
    assert record["budget_met"] is None
    # 3-bit codes in whole 16-row groups (k/v have 24 rows: 32 stored) + FP16 scale and 3-bit zero per 16 columns
    shapes = [(48, 48), (24, 48), (24, 48), (48, 48), (80, 48), (80, 48), (48, 80)]
    stored = sum(-(-rows // 16) * 16 * cols * 3 + rows * (cols // 16) * 19 for rows, cols in shapes)
    assert record["bpw"] == pytest.approx(stored / sum(rows * cols for rows, cols in shapes))
    assert read_records(out) == [json.loads(json.dumps(record))]
    run(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--bits", "2", "--eval", "none", "--json", str(out),
         "--no-progress"])
    assert [r["config"]["bits"] for r in read_records(out)] == [3, 2]  # appended, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no stray files
    assert "bpw honest" in capsys.readouterr().out


def test_cli_finetune_records_each_block_and_keeps_the_bits(tiny_dir, tmp_path):
    common = ["quantize", "--model", str(tiny_dir), "--bits", "2.5", "--nsamples", "4", "--seqlen", "32",
              "--calib-dtype", "float32", "--eval", "none", "--no-progress"]
    plain = run(common)
    tuned = run(common + ["--finetune", "1", "--finetune-lr", "1e-2", "--finetune-target", "model"])
    finetune = tuned["calibration"]["finetune"]
    assert finetune["epochs"] == 1 and finetune["lr"] == 1e-2 and finetune["target"] == "model"
    assert [b["block"] for b in finetune["blocks"]] == [0, 1]
    assert any(b["kept"] for b in finetune["blocks"])
    assert all(b["kept"] == (b["error_after"] < b["error_before"]) for b in finetune["blocks"])
    assert "finetune" not in plain["calibration"]


def test_cli_eval_reports_windows_and_tokens(tiny_dir, capsys):
    record = run(["eval", "--model", str(tiny_dir), "--ppl", "wikitext2", "--no-progress"])
    r = record["ppl"]["wikitext2"]
    assert r["windows"] == 16 and r["tokens"] == 16 * 2047 and r["protocol"] == "quick"
    assert 1 < r["ppl"] < 1e4
    assert "16 windows, 32752 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--method", "rtn", "--bits", "9"], "rtn.bits"),
    (["quantize", "--method", "rtn", "--bits", "2.5"], "rtn.bits"),
    (["quantize", "--method", "rtn", "--bits", "4", "--group-size", "0"], "rtn.group_size"),
    (["quantize", "--bits", "4", "--nsamples", "0"], "calib.nsamples"),
    (["quantize", "--bits", "3", "--finetune", "-1"], "finetune.epochs"),
    (["quantize", "--bits", "3", "--finetune", "1", "--finetune-lr", "0"], "finetune.lr"),
    (["quantize", "--method", "rtn", "--bits", "3", "--finetune", "1"], "not rtn's"),
    (["quantize", "--bits", "1.0", "--bit-set", "2,3,4"], "cmpq.bits"),
    (["quantize", "--bits", "3", "--act-outliers", "0.6"], "cmpq.act_outliers"),
    (["quantize", "--bits", "3", "--group-size", "128"], "cmpq: unknown option"),
    (["quantize", "--method", "awq", "--bits", "3", "--out", "x"], "packed format stores"),
    (["quantize", "--method", "quip", "--bits", "3", "--options", "{\"transform\": \"x\"}"], "quip.transform"),
])
def test_cli_bad_options_exit_2_with_the_field(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_options_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--method", "llmmq", "--bits", "3", "--options", "[1]"])
    assert exit_info.value.code == 2 and "JSON object" in capsys.readouterr().err


def test_cli_bad_model_exits_2(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "no model at" in capsys.readouterr().err


def test_help_explains_every_option():
    from cmpq.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(subparsers) == {"quantize", "eval", "generate", "bench", "inspect", "compare"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, f"cmpq {name} {action.option_strings}: no help"
    out = subprocess.run([sys.executable, "-m", "cmpq", "quantize", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "paper" in out and "honest" in out


def test_opt_biases_are_reported_with_the_unquantized_parameters():
    from cmpq.eval.records import unquantized_storage
    from cmpq.models.arch import find_arch
    from cmpq.models.tiny import tiny_model
    from cmpq.pipeline import quantize_model
    from cmpq.quantizers import get_quantizer

    model = tiny_model("opt")
    result = quantize_model(model, find_arch(model), get_quantizer("rtn", bits=4), None, progress=False)
    weights = sum(qw.storage().weights for qw in result.layers.values())
    total = sum(p.numel() for p in model.parameters())
    assert weights + unquantized_storage(model, set(result.layers))["params"] == total


def test_windows_longer_than_the_context_fail_clearly(tiny_dir, capsys):
    assert main(["quantize", "--model", str(tiny_dir), "--method", "cmpq", "--bits", "4", "--seqlen", "4096",
                 "--eval", "none", "--no-progress"]) == 2
    assert "calib.seqlen: windows of 4096 tokens exceed the model's context of 2048" in capsys.readouterr().err


def test_unwritable_json_fails_before_loading(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_preset_for_a_method_without_presets_is_refused(capsys):
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--preset", "paper"]) == 2
    assert "rtn: no preset 'paper'" in capsys.readouterr().err


def test_cli_cmpq_then_inspect(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmpq.jsonl"
    record = run(["quantize", "--model", str(tiny_dir), "--method", "cmpq", "--bits", "4", "--allocation", "error",
                  "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--json", str(out), "--no-progress"])
    assert 3.98 <= record["bpw"] <= 4.0
    assert record["calibration"]["used"] and record["calibration"]["nsamples"] == 4
    assert record["config"]["error_feedback"] and record["config"]["codebook"] == "int8"  # the "best" preset
    assert record["budget_met"] is True
    paper = run(["quantize", "--model", str(tiny_dir), "--bits", "4", "--preset", "paper", "--nsamples", "4",
                 "--seqlen", "32", "--eval", "none", "--no-progress"])
    from cmpq.quantizers.cmpq.quantizer import PRESETS

    assert {k: paper["config"][k] for k in PRESETS["paper"].options} == PRESETS["paper"].options
    layer = record["layers"]["model.layers.0.mlp.down_proj"]
    assert sum(layer["widths"].values()) == 80 and layer["outliers"] == round(0.005 * 48 * 80)
    capsys.readouterr()
    run(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "honest" in text
    png = tmp_path / "cmpq.widths.png"
    assert png.stat().st_size > 1000 and png.read_bytes().startswith(b"\x89PNG")
    umask = os.umask(0)
    os.umask(umask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_inspect_rejects_a_record_without_layers(tmp_path, capsys):
    path = tmp_path / "float.jsonl"
    path.write_text(json.dumps({"method": "float"}) + "\n")
    assert main(["inspect", str(path)]) == 2
    assert "no quantization record" in capsys.readouterr().err


def test_cli_eval_on_a_plain_text_file(tiny_dir, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a small model. " * 200, encoding="utf-8")
    record = run(["eval", "--model", str(tiny_dir), "--ppl", str(text), "--no-progress"])
    result = record["ppl"][str(text)]
    assert result["windows"] == (len(text.read_text()) // 2048) and result["source"] == str(text)
