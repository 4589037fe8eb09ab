"""End-to-end distillation of the stored values (`cmpq.training.distill`)."""

import json

import pytest
import torch
import torch.nn.functional as F

from cmpq.errors import ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import get_quantizer
from cmpq.training.distill import DistillConfig, distill_model, fused_sparse_kl, sparse_kl, split, teacher_topk


def test_sparse_kl_is_the_full_kl_when_the_top_k_hold_every_token():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    lp = torch.log_softmax(teacher, -1)
    full = F.kl_div(torch.log_softmax(student, -1), lp, log_target=True, reduction="none").sum(-1).mean()
    top = lp.topk(11, dim=-1)
    torch.testing.assert_close(sparse_kl(student, top.indices, top.values), full)
    top3 = lp.topk(3, dim=-1)
    assert float(sparse_kl(teacher, top3.indices, top3.values)) == pytest.approx(0, abs=1e-6)  # same distribution
    assert 0 < float(sparse_kl(student, top3.indices, top3.values)) <= float(full) + 1e-6  # coarser: never above


@pytest.mark.parametrize("k, rows", [(3, 2), (7, 64), (11, 4)])
def test_fused_sparse_kl_matches_the_plain_reference_in_value_and_gradient(k, rows):
    g = torch.Generator().manual_seed(k)
    vocab = 11
    teacher = torch.randn(9, vocab, generator=g) * 3
    teacher[0, 0] = 40.0  # a position whose top k hold nearly all the mass: no rest term, as in the reference
    lp = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    student = torch.randn(9, vocab, generator=g) * 3
    student[1, :] = -30.0
    student[1, 0] = 30.0  # the student's rest underflows far below the teacher's
    plain, fused = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    reference = sparse_kl(plain, lp.indices.int(), lp.values)
    value = fused_sparse_kl(fused, lp.indices.int(), lp.values, rows=rows)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    reference.backward()
    value.backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient asked: the same value
        torch.testing.assert_close(fused_sparse_kl(student, lp.indices.int(), lp.values, rows=rows), reference.detach())


def test_split_holds_out_the_last_windows():
    assert split(8, 0.125) == ([0, 1, 2, 3, 4, 5, 6], [7])
    assert split(32, 0.125) == (list(range(28)), [28, 29, 30, 31])
    assert split(3, 0.01) == ([0, 1], [2])  # at least one
    assert split(1, 0.125) == ([0], [0])  # a single window trains and is measured
    assert split(2, 0.9) == ([0], [1])  # one window always trains


def test_config_is_checked():
    for bad in ({"epochs": -1}, {"lr": 0}, {"topk": 0}, {"holdout": 1.0}, {"holdout": 0}, {"tokens": 0},
                {"tokens": 2.5}):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)


def test_token_cap_takes_the_first_windows_and_at_least_two():
    windows = torch.arange(10 * 4).reshape(10, 4)
    assert torch.equal(DistillConfig(tokens=None).windows(windows), windows)  # no cap: all
    assert torch.equal(DistillConfig(tokens=9).windows(windows), windows[:3])  # ceil(9 / 4)
    assert torch.equal(DistillConfig(tokens=8).windows(windows), windows[:2])
    assert torch.equal(DistillConfig(tokens=1).windows(windows), windows[:2])  # one trains, one is held out
    assert torch.equal(DistillConfig(tokens=10**6).windows(windows), windows)


def _quantized_tiny(windows):
    model = tiny_model("llama", seed=0)
    teacher = teacher_topk(model, windows, topk=16, progress=False)
    result = quantize_model(model, find_arch(model), get_quantizer("cmpq", preset="best", bits=2.5), windows,
                            progress=False)
    return model, result, teacher


def test_distillation_lowers_the_held_out_kl_and_changes_only_values_and_norms():
    windows = torch.randint(0, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    model, result, teacher = _quantized_tiny(windows)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 1}
    kept, record = distill_model(model, result.layers, windows, teacher, DistillConfig(epochs=3, lr=1e-2),
                                 progress=False)
    assert record["train_windows"] == 7 and record["held_out_windows"] == 1
    assert len(record["held_out_kl"]) == 4 and len(record["train_kl"]) == 3
    best = min(range(4), key=lambda e: record["held_out_kl"][e])
    assert record["epoch_kept"] == best > 0  # the tiny model gains
    assert record["held_out_kl"][best] < record["held_out_kl"][0]
    for name, qw in kept.items():
        before = result.layers[name]
        for field in ("widths", "codes", "outlier_rows", "outlier_cols"):
            assert torch.equal(getattr(qw, field), getattr(before, field)), (name, field)
        assert qw.storage() == before.storage()
        assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize())  # the model holds them
    assert any(not torch.equal(kept[n].codebooks, result.layers[n].codebooks) for n in kept)
    assert any(not torch.equal(p, norms[n]) for n, p in model.named_parameters() if p.ndim == 1)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # the recorded held-out KL is that of the model as left
    with torch.no_grad():
        logits = model(windows[7:8]).logits[0]
    assert float(sparse_kl(logits, teacher.indices[7], teacher.logprobs[7])) == pytest.approx(
        record["held_out_kl"][best], rel=1e-4)


def test_the_best_epoch_is_kept_when_a_later_one_diverges(monkeypatch):
    """Epoch 1 trains normally; in epoch 2 the optimizer writes NaN: training stops, epoch 1's values stay, the
    model's held-out KL is the one recorded for epoch 1, and flags set before (a frozen norm) are kept."""
    windows = torch.randint(0, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    model, result, teacher = _quantized_tiny(windows)
    frozen = "model.norm.weight"
    model.get_parameter(frozen).requires_grad_(False)
    steps, real_step = [0], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps[0] += 1
        out = real_step(self, *args, **kwargs)
        if steps[0] > 7:  # epoch 2 (7 training windows per epoch)
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    kept, record = distill_model(model, result.layers, windows, teacher, DistillConfig(epochs=3, lr=1e-2),
                                 progress=False)
    assert record["diverged_at_epoch"] == 2 and record["epoch_kept"] == 1 and len(record["held_out_kl"]) == 2
    assert record["held_out_kl"][1] < record["held_out_kl"][0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits = model(windows[7:8]).logits[0]
    assert float(sparse_kl(logits, teacher.indices[7], teacher.logprobs[7])) == pytest.approx(
        record["held_out_kl"][1], rel=1e-4)
    assert not model.get_parameter(frozen).requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != frozen)


def test_an_interrupted_distillation_leaves_the_model_as_it_was(monkeypatch):
    windows = torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model, result, teacher = _quantized_tiny(windows)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    steps, real_step = [0], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(KeyboardInterrupt):
        distill_model(model, result.layers, windows, teacher, DistillConfig(epochs=2, lr=1e-2), progress=False)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_no_epoch_kept_leaves_the_model_as_quantized():
    windows = torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model, result, teacher = _quantized_tiny(windows)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    kept, record = distill_model(model, result.layers, windows, teacher, DistillConfig(epochs=1, lr=1e3),
                                 progress=False)  # a step this large only makes things worse
    assert record["epoch_kept"] == 0
    assert record.get("diverged_at_epoch") == 1 or record["held_out_kl"][1] > record["held_out_kl"][0]
    assert all(kept[n] is result.layers[n] for n in kept)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def test_distillation_runs_under_no_grad_and_in_the_models_precision():
    windows = torch.randint(0, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    teacher = teacher_topk(model, windows, topk=8, progress=False)
    with torch.no_grad():  # library callers often quantize inside no_grad
        result = quantize_model(model, find_arch(model), get_quantizer("cmpq", preset="best", bits=2.5), windows,
                                progress=False)
        kept, record = distill_model(model, result.layers, windows, teacher, DistillConfig(epochs=2, lr=1e-2),
                                     progress=False)
    assert len(record["train_kl"]) == 2 and record["epoch_kept"] > 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_cli_distill_records_saves_and_round_trips(tiny_dir, tmp_path):
    from cmpq.cli import main
    from cmpq.eval.records import read_records
    from cmpq.models.load import load_model
    from cmpq.packed.model_io import load

    out, directory = tmp_path / "r.jsonl", tmp_path / "model"
    argv = ["quantize", "--model", str(tiny_dir), "--bits", "2.5", "--nsamples", "8", "--seqlen", "32",
            "--calib-dtype", "float32", "--eval", "none", "--no-progress", "--distill", "2", "--distill-lr", "1e-2",
            "--distill-topk", "8", "--distill-tokens", "all", "--json", str(out), "--out", str(directory)]
    assert main(argv) == 0
    record = read_records(out)[-1]
    distill = record["calibration"]["distill"]
    assert distill["epochs"] == 2 and distill["topk"] == 8 and len(distill["held_out_kl"]) == 3
    saved = json.loads((directory / "config.json").read_text())["quantization_config"]["distill"]
    assert saved["epoch_kept"] == distill["epoch_kept"]
    assert distill["tokens"] is None and distill["train_windows"] == 7  # no cap: all 8 windows, one held out
    assert {k: saved[k] for k in ("tokens", "train_windows", "held_out_windows")} == {
        "tokens": None, "train_windows": 7, "held_out_windows": 1}
    assert saved["held_out_kl_kept"] == distill["held_out_kl"][distill["epoch_kept"]]
    reloaded = load(directory)
    # the saved values are the distilled ones: the reloaded model scores the recorded held-out KL
    from cmpq.config import CalibConfig
    from cmpq.data.sampling import calibration_windows
    from cmpq.training.distill import teacher_topk as topk

    windows, _ = calibration_windows(reloaded.tokenizer, CalibConfig(nsamples=8, seqlen=32))
    teacher = topk(load_model(str(tiny_dir)).model, windows[7:8], 8, progress=False)
    with torch.no_grad():
        logits = reloaded.model(windows[7:8]).logits[0].float()
    assert float(sparse_kl(logits, teacher.indices[0], teacher.logprobs[0])) == pytest.approx(
        saved["held_out_kl_kept"], rel=1e-3)
    norms = {n: p for n, p in reloaded.model.named_parameters() if p.ndim == 1}
    assert norms and distill["epoch_kept"] > 0
    original = load_model(str(tiny_dir)).model  # the distilled norms were saved, not the original ones
    assert any(not torch.equal(p, original.get_parameter(n)) for n, p in norms.items())
    assert record["bpw"] == pytest.approx(json.loads((directory / "config.json").read_text())
                                          ["quantization_config"]["bpw"])


def test_cli_distill_tokens_caps_the_windows(tiny_dir, tmp_path):
    from cmpq.cli import main
    from cmpq.eval.records import read_records

    out = tmp_path / "r.jsonl"
    argv = ["quantize", "--model", str(tiny_dir), "--bits", "2.5", "--nsamples", "8", "--seqlen", "32",
            "--calib-dtype", "float32", "--eval", "none", "--no-progress", "--distill", "1", "--distill-topk", "8",
            "--distill-tokens", "128", "--json", str(out), "--out", str(tmp_path / "model")]
    assert main(argv) == 0
    distill = read_records(out)[-1]["calibration"]["distill"]
    assert distill["tokens"] == 128 and distill["train_windows"] + distill["held_out_windows"] == 4
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["distill"]
    assert saved["tokens"] == 128 and saved["train_windows"] == distill["train_windows"]


@pytest.mark.parametrize("flags, epochs, tokens", [
    ([], 3, 65536),  # cmpq's best preset distils by default
    (["--preset", "paper"], 0, 65536),  # the paper's method exactly
    (["--method", "rtn", "--bits", "3"], 0, 65536),
    (["--distill", "0"], 0, 65536),
    (["--preset", "paper", "--distill", "2", "--distill-tokens", "all"], 2, None),
])
def test_cli_distillation_defaults_follow_the_method_and_preset(flags, epochs, tokens):
    from cmpq.cli import _quantize_job, build_parser

    job = _quantize_job(build_parser().parse_args(["quantize", "--bits", "2.5", *flags]))
    config = job.distill_config(job.quantizer())
    assert (config.epochs, config.tokens) == (epochs, tokens)


def test_the_best_preset_is_what_cmpq_quantize_runs():
    """One definition: the library's preset, the CLI's job and `cmpq compare`'s cell agree, distillation too."""
    from cmpq import compare
    from cmpq.cli import _quantize_job, build_parser
    from cmpq.workflow import QuantizeJob

    job = _quantize_job(build_parser().parse_args(["quantize", "--bits", "2.5"]))
    library = get_quantizer("cmpq", preset="best", bits=2.5)
    assert job.quantizer().config == library.config == QuantizeJob(options={"bits": 2.5}).quantizer().config
    assert job.distill_config(job.quantizer()).epochs == library.distill_epochs() == 3
    cell = compare.grid(["cmpq"], [2.5])[0].cell
    assert cell.distill == 3 and cell.options["allocation_scope"] == library.config.allocation_scope == "model"


def test_cli_refuses_distill_for_other_methods(capsys):
    from cmpq.cli import main

    assert main(["quantize", "--method", "rtn", "--bits", "3", "--distill", "1"]) == 2
    assert "not rtn's" in capsys.readouterr().err
