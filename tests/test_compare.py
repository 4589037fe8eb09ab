"""`cmpq compare`: the grid's cells, resumability, and the rendered table and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cmpq import compare
from cmpq.errors import ConfigError
from cmpq.eval.grid import Cell
from cmpq.eval.records import read_records
from cmpq.models.tiny import save_tiny


def test_integer_methods_run_at_floor_widths_and_are_deduplicated():
    cells = compare.grid(["rtn", "quip", "cmpq", "smoothquant"], [2, 2.5, 3, 3.5, 4])
    rtn = [c.cell.options["bits"] for c in cells if c.name == "rtn"]
    assert rtn == [2, 3, 4]  # 2.5 runs as 2 and 3.5 as 3: the same cells, measured once
    assert all(c.cell.options["group_size"] == 128 for c in cells if c.name == "rtn")
    assert [c.cell.options["bits"] for c in cells if c.name == "quip"] == [2, 3, 4]
    assert [c.cell.options["bits"] for c in cells if c.name == "cmpq"] == [2, 2.5, 3, 3.5, 4]
    assert [c.setting for c in cells if c.name == "smoothquant"] == ["W8A8"]


def test_cells_carry_complete_configs_that_match_their_records():
    cells = {c.name: c.cell for c in compare.grid(["cmpq", "cmpq-noef", "cmpq-paper"], [3])}
    assert cells["cmpq"].options["error_feedback"] is True and cells["cmpq-noef"].options["error_feedback"] is False
    assert cells["cmpq-paper"].options["allocation"] == "activation"
    calib = compare.calibration("quick", "float32")
    assert (calib.nsamples, calib.seqlen) == (32, 512)
    assert cells["cmpq"].key("m", calib, "quick") != cells["cmpq-noef"].key("m", calib, "quick")
    # "cmpq" is what `cmpq quantize` runs (the preset's distillation included); the variants are the quantizer alone
    command = compare.command(cells["cmpq"], "m", calib, "quick", Path("s.jsonl"), None, False)
    assert command[command.index("--distill") + 1] == "3"
    command = compare.command(cells["cmpq-noef"], "m", calib, "quick", Path("s.jsonl"), None, False)
    assert command[command.index("--distill") + 1] == "0"


def test_distillation_is_part_of_a_cells_key():
    from cmpq.eval.grid import record_key

    cells = {c.name: c.cell for c in compare.grid(["cmpq", "cmpq-nodistill"], [3])}
    calib = compare.calibration("quick", "float32")
    assert cells["cmpq"].options == cells["cmpq-nodistill"].options
    assert cells["cmpq"].key("m", calib, "quick") != cells["cmpq-nodistill"].key("m", calib, "quick")
    record = {"model": "m", "method": "cmpq", "config": cells["cmpq"].options, "protocol": "quick",
              "calibration": {"used": True, "source": calib.source, "nsamples": calib.nsamples,
                              "seqlen": calib.seqlen, "seed": calib.seed, "resolved_dtype": "float32",
                              "distill": {"epochs": 3}}}
    assert record_key(record) == cells["cmpq"].key("m", calib, "quick")
    record["calibration"].pop("distill")
    assert record_key(record) == cells["cmpq-nodistill"].key("m", calib, "quick")


def test_bad_methods_and_targets_fail_before_any_work():
    with pytest.raises(ConfigError, match="unknown"):
        compare.grid(["gptqq"], [3])
    with pytest.raises(ConfigError, match="bits"):
        compare.grid(["rtn"], [0.5])


def _record(method, bpw, wt2, c4, options=None):
    return {"method": method, "bpw": bpw, "code_bpw": bpw, "quant_seconds": 1.0, "peak_rss_mb": 100.0,
            "ppl": {"wikitext2": {"ppl": wt2}, "c4": {"ppl": c4}}, "config": options}


def test_table_and_plot_render_measured_and_missing_cells(tmp_path):
    cells = compare.grid(["float", "rtn", "cmpq", "smoothquant"], [3, 4])
    records = {("float", "float32"): _record("float", None, 20.0, 30.0),
               ("rtn", "3-bit g128"): _record("rtn", 3.16, 100.0, 150.0),
               ("cmpq", "@ 3"): _record("cmpq", 2.99, 35.0, 50.0),
               ("cmpq", "@ 4"): _record("cmpq", 3.99, 24.0, 37.0),
               ("smoothquant", "W8A8"): _record("smoothquant", 8.03, 20.5, 30.4)}
    rows = [(c, records.get((c.name, c.setting))) for c in cells]
    table = compare.render_table(rows, "m", compare.calibration("quick", "float32"), "quick")
    assert "| cmpq | @ 3 | 2.990 | 2.990 | 35.00 | 50.00 | 1 | 100 |" in table
    assert "| rtn | 4-bit g128 | not measured |" in table
    png = compare.render_plot(rows, tmp_path / "plot.png", "m", "quick")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_runs_cells_in_their_own_processes_and_resumes(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "grid"
    command = [sys.executable, "-m", "cmpq", "compare", "--model", str(model), "--methods", "float,rtn",
               "--bits", "3,3.5", "--out", str(out), "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    records = read_records(out / "results.jsonl")
    assert [r["method"] for r in records] == ["float", "rtn"]  # rtn 3.5 runs as 3 bits: one cell
    assert records[1]["config"]["group_size"] == 128 and records[1]["config"]["bits"] == 3
    assert (out / "compare.png").exists() and "| rtn | 3-bit g128 |" in (out / "compare.md").read_text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "2 of 2 cells already measured; 0 to run" in second.stdout
    assert len(read_records(out / "results.jsonl")) == 2


def test_quantize_options_json_overrides_and_is_validated(tmp_path):
    from cmpq.cli import main

    model = save_tiny(tmp_path / "tiny")
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--bits", "3", "--options",
                 json.dumps({"group_size": 16}), "--eval", "none", "--no-progress", "--json",
                 str(tmp_path / "r.jsonl")]) == 0
    assert read_records(tmp_path / "r.jsonl")[0]["config"]["group_size"] == 16
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--bits", "3", "--options",
                 json.dumps({"nope": 1}), "--eval", "none", "--no-progress"]) == 2
    assert Cell("rtn", {"bits": 3}).full_options() == {"bits": 3, "group_size": None}


def test_integer_valued_targets_are_one_cell_and_a_quantized_head_is_another():
    from cmpq.eval.grid import record_key

    calib = compare.calibration("quick", "float32")
    three = compare.grid(["cmpq-nodistill"], [3])[0].cell
    record = {"model": "m", "method": "cmpq", "config": {**three.options, "bits": 3.0}, "protocol": "quick",
              "calibration": {"used": True, "source": "c4", "nsamples": 32, "seqlen": 512, "seed": 0,
                              "resolved_dtype": "float32"}}
    assert record_key(record) == three.key("m", calib, "quick")
    with_head = {**record, "head": {"config": {"bits": 6}}}
    assert record_key(with_head) != three.key("m", calib, "quick")
