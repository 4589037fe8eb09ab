"""`cmpq compare`: every method side by side on the same model, calibration tokens and evaluation windows.

Each cell (method x target bits) runs as its own `cmpq quantize` process, so its quantization time and peak
memory are its own, and appends PROTOCOL's record to the store; a cell whose record is already there is not
redone (resumable). The table (Markdown) and plot (PNG: perplexity against honest bpw, log scale, the float
model as a horizontal line) are rendered from the stored records of the grid's cells.

How a method meets a target B:
- fractional-target methods (cmpq, llmmq) get B as their honest-bpw target;
- integer-width methods (rtn, gptq, awq, quip, squeezellm) run at code width floor(B), the widest that fits
  the target's code bits, and are shown at the honest bpw they really store (2.5 runs as 2: never
  interpolated);
- smoothquant is W8A8 only: one cell, whatever the targets (a weight+activation reference point).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpq.atomic import atomic_write
from cmpq.config import CalibConfig
from cmpq.errors import ConfigError
from cmpq.eval.grid import Cell, jsonable, record_key
from cmpq.eval.records import read_records
from cmpq.quantizers import get_quantizer

# compare name -> (registered method, preset, fixed options, distillation epochs: None = the preset's default)
TARGET_METHODS: dict[str, tuple[str, str | None, dict[str, Any], int | None]] = {
    "cmpq": ("cmpq", "best", {}, None),              # exactly what `cmpq quantize --bits B` runs
    "cmpq-nodistill": ("cmpq", "best", {}, 0),       # the quantizer alone (`--distill 0`)
    "cmpq-layer": ("cmpq", "best", {"allocation_scope": "layer"}, 0),  # one budget per layer, not per model
    "cmpq-noef": ("cmpq", "best", {"allocation_scope": "layer", "error_feedback": False}, 0),  # what GPTQ's
    # error compensation adds
    "cmpq-paper": ("cmpq", "paper", {}, 0),          # the method as published
    "llmmq": ("llmmq", None, {}, 0),
}
INTEGER_METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"group_size": 128}, "gptq": {"group_size": 128}, "awq": {"group_size": 128}, "quip": {},
    "squeezellm": {},
}
FIXED_METHODS: dict[str, dict[str, Any]] = {"smoothquant": {"bits": 8, "act_bits": 8}}
GRID_DATASETS = ("wikitext2", "c4")  # every cell is evaluated on both (`cmpq quantize`'s default)
COMPARE_METHODS = ("float", *INTEGER_METHODS, *TARGET_METHODS, *FIXED_METHODS)


@dataclass(frozen=True)
class Extras:
    """Evaluations beyond perplexity asked of every cell (`--tasks`, `--kld`); a stored record counts as
    measured only if it holds them under the same protocol."""

    tasks: tuple[str, ...] = ()
    task_protocol: str = "quick"
    limit: int | None = None
    batch_size: int = 8
    kld_windows: int | None = None

    def args(self) -> list[str]:
        out: list[str] = []
        if self.tasks:
            out += ["--tasks", ",".join(self.tasks), "--task-protocol", self.task_protocol, "--batch-size",
                    str(self.batch_size)]
            if self.limit:
                out += ["--limit", str(self.limit)]
        if self.kld_windows:
            out += ["--kld", "--kld-windows", str(self.kld_windows)]
        return out

    def satisfied(self, record: dict[str, Any]) -> bool:
        from cmpq.eval.harness import TaskConfig

        if any(d not in (record.get("ppl") or {}) for d in GRID_DATASETS):
            return False  # e.g. a record of `cmpq eval --ppl wikitext2` in the store

        if self.tasks:
            tasks = record.get("tasks") or {}
            label = TaskConfig(self.tasks, self.task_protocol, self.limit).label()
            if tasks.get("protocol") != label or any(t not in tasks for t in self.tasks):
                return False
        if self.kld_windows:
            kld = record.get("kld") or {}
            if kld.get("windows") != self.kld_windows:
                return False
        return True


@dataclass(frozen=True)
class GridCell:
    """A cell of the grid: the compare name (a line of the plot), the setting's label and what to run."""

    name: str
    setting: str
    cell: Cell


def grid(methods: list[str], targets: list[float]) -> list[GridCell]:
    """The distinct cells for `methods` at `targets` (a method's settings that coincide are run once)."""
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(COMPARE_METHODS)}")
    bad = [b for b in targets if not 1 <= b <= 8]
    if bad:
        raise ConfigError(f"--bits: targets must be in [1, 8] bits per weight, got {bad}")
    cells: list[GridCell] = []
    for name in methods:
        if name == "float":
            settings = [("float32", Cell("float"))]
        elif name in FIXED_METHODS:
            settings = [("W8A8", _cell(name, None, FIXED_METHODS[name]))]
        elif name in INTEGER_METHODS:
            widths = sorted({math.floor(b) for b in targets})
            settings = [(f"{w}-bit" + (f" g{INTEGER_METHODS[name]['group_size']}" if "group_size" in
                                       INTEGER_METHODS[name] else ""),
                         _cell(name, None, {**INTEGER_METHODS[name], "bits": w})) for w in widths]
        else:
            method, preset, fixed, epochs = TARGET_METHODS[name]
            distill = get_quantizer(method, preset=preset).distill_epochs() if epochs is None else epochs
            settings = [(f"@ {b:g}", _cell(method, preset, {**fixed, "bits": _number(b)}, distill))
                        for b in sorted(set(targets))]
        seen: set[str] = set()
        for setting, cell in settings:
            key = json.dumps([cell.method, cell.options, cell.distill], sort_keys=True)
            if key not in seen:
                seen.add(key)
                cells.append(GridCell(name, setting, cell))
    return cells


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _cell(method: str, preset: str | None, options: dict[str, Any], distill: int = 0) -> Cell:
    """A cell with the method's complete config, so that the record and the cell agree field by field."""
    return Cell(method, jsonable(get_quantizer(method, preset=preset, **options).config), distill)


def calibration(protocol: str, dtype: str) -> CalibConfig:
    """PROTOCOL's calibration for a perplexity protocol: quick 32 x 512, full 128 x 2048 (C4 documents)."""
    base = CalibConfig.quick() if protocol == "quick" else CalibConfig()
    return CalibConfig(source=base.source, nsamples=base.nsamples, seqlen=base.seqlen, seed=base.seed, dtype=dtype)


def command(cell: Cell, model: str, calib: CalibConfig, protocol: str, store: Path, threads: int | None,
            progress: bool, extras: Extras = Extras()) -> list[str]:
    """The `cmpq` command line that measures `cell` and appends its record to `store`."""
    cmd = [sys.executable, "-m", "cmpq"]
    if cell.method == "float":
        cmd += ["eval", "--model", model, "--protocol", protocol, "--json", str(store)]
    else:
        cmd += ["quantize", "--model", model, "--method", cell.method, "--bits", str(cell.options["bits"]),
                "--options", json.dumps(cell.options), "--calib", calib.source, "--nsamples", str(calib.nsamples),
                "--seqlen", str(calib.seqlen), "--seed", str(calib.seed), "--calib-dtype", calib.dtype,
                "--protocol", protocol, "--json", str(store)]
        if cell.method == "cmpq":
            cmd += ["--distill", str(cell.distill)]
    cmd += extras.args()
    if threads:
        cmd += ["--threads", str(threads)]
    if not progress:
        cmd.append("--no-progress")
    return cmd


def stored(store: Path, extra: list[Path]) -> dict[str, dict[str, Any]]:
    """Records by key from the store and any `--reuse` files (the store's own records win)."""
    by_key: dict[str, dict[str, Any]] = {}
    for path in [*extra, store]:
        if path.exists():
            for record in read_records(path):
                by_key[record_key(record)] = record
    return by_key


def run(cells: list[GridCell], model: str, calib: CalibConfig, protocol: str, store: Path, reuse: list[Path],
        threads: int | None = None, progress: bool = True, extras: Extras = Extras()) -> list[GridCell]:
    """Measure every cell not stored yet, one process each; returns the cells that failed."""
    done = stored(store, reuse)
    records = [done.get(c.cell.key(model, calib, protocol)) for c in cells]
    todo = [c for c, r in zip(cells, records) if r is None or not extras.satisfied(r)]
    print(f"compare: {len(cells) - len(todo)} of {len(cells)} cells already measured; {len(todo)} to run",
          flush=True)
    failed = []
    for number, item in enumerate(todo, start=1):
        print(f"[{number}/{len(todo)}] {item.name} {item.setting}", flush=True)
        process = subprocess.run(command(item.cell, model, calib, protocol, store, threads, progress, extras))
        if process.returncode != 0:
            print(f"compare: {item.name} {item.setting} failed (exit {process.returncode}); continuing", flush=True)
            failed.append(item)
    return failed


def results(cells: list[GridCell], model: str, calib: CalibConfig, protocol: str, store: Path,
            reuse: list[Path]) -> list[tuple[GridCell, dict[str, Any] | None]]:
    done = stored(store, reuse)
    return [(c, done.get(c.cell.key(model, calib, protocol))) for c in cells]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(rows: list[tuple[GridCell, dict[str, Any] | None]], model: str, calib: CalibConfig,
                 protocol: str) -> str:
    datasets = sorted({d for _, r in rows if r for d in r["ppl"]}, key=lambda d: (d != "wikitext2", d))
    kld = any(r and r.get("kld") for _, r in rows)
    tasks = [t for t in _TASK_ORDER if any(r and (r.get("tasks") or {}).get(t) for _, r in rows)]
    extra_head = (" KLD | top-1 % |" if kld else "") + "".join(f" {t} |" for t in tasks)
    lines = [f"{model}, perplexity protocol `{protocol}`, calibration {calib.source} {calib.nsamples} x "
             f"{calib.seqlen} ({calib.dtype} forwards), every method on the same tokens. Honest bpw counts every "
             f"stored bit of the blocks' linear layers (PROTOCOL). quant s and peak RSS are the cell's process "
             f"(peak RSS includes the evaluation's); cells may have shared the machine with other work.", "",
             "| method | setting | honest bpw | code bpw | " + " | ".join(_DATASET_NAMES.get(d, d) for d in datasets)
             + " |" + extra_head + " quant s | peak RSS MB |",
             "|---|---|---|---|" + "---|" * (len(datasets) + 2 * kld + len(tasks)) + "---|---|"]
    for cell, record in rows:
        if record is None:
            lines.append(f"| {cell.name} | {cell.setting} | not measured |" + " |" * (len(datasets) + 3 + 2 * kld
                                                                                       + len(tasks)))
            continue
        ppl = " | ".join(_fmt(record["ppl"].get(d, {}).get("ppl")) for d in datasets) + " |"
        if kld:
            k = record.get("kld") or {}
            ppl += f" {_fmt(k.get('mean_kld'), 4)} | {_fmt(100 * k['top1_agreement'] if k else None, 1)} |"
        for task in tasks:
            result = (record.get("tasks") or {}).get(task) or {}
            value = result.get("average" if task == "mmlu" else "acc")
            ppl += f" {_fmt(None if value is None else 100 * value, 1)} |"
        ppl = ppl[:-2]
        seconds = record.get("quant_seconds", record.get("eval_seconds") if cell.name != "float" else None)
        lines.append(f"| {cell.name} | {cell.setting} | {_fmt(record.get('bpw'), 3)} | "
                     f"{_fmt(record.get('code_bpw'), 3)} | {ppl} | "
                     f"{'-' if cell.name == 'float' else _fmt(seconds, 0)} | {record['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


_DATASET_NAMES = {"wikitext2": "WikiText-2", "c4": "C4"}
_TASK_ORDER = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "lambada_openai", "mmlu")


def render_plot(rows: list[tuple[GridCell, dict[str, Any] | None]], path: Path, model: str, protocol: str) -> Path | None:
    """Perplexity against honest bpw per dataset; weight-only methods as lines, float as a horizontal line.
    (SmoothQuant, a W8A8 reference at 8 bits, is in the table only: it would stretch the bpw axis fourfold.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [(c, r) for c, r in rows if r is not None]
    datasets = sorted({d for _, r in measured for d in r["ppl"]}, key=lambda d: (d != "wikitext2", d))
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        lines: dict[str, list[tuple[float, float]]] = {}
        for cell, record in measured:
            ppl = record["ppl"].get(dataset, {}).get("ppl")
            if ppl is None or cell.name in FIXED_METHODS:
                continue
            if cell.name == "float":
                ax.axhline(ppl, color="black", linestyle="--", linewidth=1, label=f"float32 ({ppl:.2f})")
                continue
            lines.setdefault(cell.name, []).append((record["bpw"], ppl))
        for name, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("honest bits per weight")
        ax.set_ylabel(f"{_DATASET_NAMES.get(dataset, dataset)} perplexity ({protocol})")
        ax.set_title(f"{model}: {_DATASET_NAMES.get(dataset, dataset)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return path
