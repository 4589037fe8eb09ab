"""A resumable store of benchmark records: one JSON line per (model, method, config, calibration, protocol).

Benchmark scripts declare their cells, skip those already stored, and render tables from the store, so an
interrupted grid continues where it stopped and cells shared by several tables are measured once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmpq import workflow
from cmpq.config import CalibConfig, EvalConfig
from cmpq.eval.grid import Cell, record_key
from cmpq.eval.records import append_record, read_records
from cmpq.models.load import load_model
from cmpq.models.loaded import LoadedModel
from cmpq.quantizers import get_quantizer

RESULTS = Path(__file__).parent / "results"


def publish(name: str, records: list[dict[str, Any]] | None, markdown: str, group: str = "quality/smollm2-quick") -> None:
    """Write results/`group`/`name`.jsonl (atomically: a temporary file, then rename; skipped when `records` is
    None) and results/`group`/`name`.md, and print the table. Documentation is rendered from the records by
    `make report`, never edited here."""
    import json

    folder = RESULTS / group
    folder.mkdir(parents=True, exist_ok=True)
    if records is not None:
        jsonl = folder / f"{name}.jsonl"
        tmp = jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(jsonl)
    (folder / f"{name}.md").write_text(markdown, encoding="utf-8")
    print(markdown)


QUALITY = RESULTS / "quality" / "smollm2-quick"  # quality on the bundled model (quick protocol): any machine


def machine_slug() -> str:
    """This CPU and the kernels' ISA as a folder name (e.g. intel-xeon-avx512): where speed and cost results go."""
    import re

    from cmpq.eval.records import machine

    info = machine()
    words = re.sub(r"\(r\)|\(tm\)|\bprocessor\b|\bcpu\b|@.*", " ", info["cpu"].lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", words)[:4]) or info["arch"]
    return f"{slug}-{info['isa']}"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path) if self.path.exists() else []

    def keys(self) -> set[str]:
        return {record_key(r) for r in self.records()}

    def run(self, cells: list[Cell], model: str, calib: CalibConfig, eval_config: EvalConfig) -> None:
        """Measure every cell not yet stored, loading the model once and restoring float weights between cells."""
        done = self.keys()
        todo = [c for c in cells if c.key(model, calib, eval_config.protocol) not in done]
        print(f"{len(cells) - len(todo)} of {len(cells)} cells already stored in {self.path}")
        if not todo:
            return
        loaded = load_model(model)
        originals = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
        for number, cell in enumerate(todo, start=1):
            print(f"[{number}/{len(todo)}] {cell.method} {cell.options}", flush=True)
            append_record(self.path, measure(loaded, cell, calib, eval_config))
            with torch.no_grad():
                for name, p in loaded.model.named_parameters():
                    p.copy_(originals[name])


def measure(loaded: LoadedModel, cell: Cell, calib: CalibConfig, eval_config: EvalConfig) -> dict[str, Any]:
    if cell.method == "float":
        ppl, seconds = workflow.timed(workflow.evaluate, loaded, eval_config)
        return workflow.float_record(loaded, ppl, eval_config.protocol, seconds)
    quantizer = get_quantizer(cell.method, **cell.options)
    result, calib_info = workflow.quantize(loaded, quantizer, calib)
    try:
        ppl = workflow.evaluate(loaded, eval_config)
    finally:
        result.remove_hooks()  # activation quantizers (SmoothQuant) must not outlive their cell
    return workflow.quantization_record(loaded, quantizer, result, calib_info, ppl, eval_config.protocol)
