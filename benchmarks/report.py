"""Render README.md and docs/*.md from their templates in docs/templates/, filling every table and plot from the
JSON records under benchmarks/results/ (`make report`). `--check` renders in memory and fails, naming the
files, when the committed documents or plots differ from what the records give (CI runs it).

A template is the document itself with lines `{{table NAME}}` or `{{plot NAME}}` where a generated table or plot
goes (the names are the keys of TABLES and PLOTS below). Every table ends with the machine, commit and command
that produced its records. A plot is a PNG under docs/img/ with its plotted points beside it as JSON: the check
compares the points, so it does not depend on the PNG encoder's version.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
import ablations  # noqa: E402
import compare_grid  # noqa: E402
from store import RESULTS  # noqa: E402

from cmpq import compare  # noqa: E402
from cmpq.atomic import atomic_write  # noqa: E402
from cmpq.eval.grid import record_key  # noqa: E402
from cmpq.eval.records import read_records  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent
TEMPLATES = CHECKOUT / "docs" / "templates"
IMAGES = CHECKOUT / "docs" / "img"
QUALITY = RESULTS / "quality" / "smollm2-quick"
SPEED = RESULTS / "speed"
DIRECTIVE = re.compile(r"^\{\{(table|plot) ([a-z0-9-]+)\}\}$")
DATASETS = (("wikitext2", "WikiText-2"), ("c4", "C4"))


# ---- provenance -------------------------------------------------------------------------------------------
def machine_label(record: dict[str, Any]) -> str:
    m = record.get("machine")
    if not isinstance(m, dict):
        return "an unrecorded machine"
    memory = f", {m['memory_gib']:g} GiB" if m.get("memory_gib") else ""
    return f"{m['cpu']} ({m['isa']}, {m['cores']} cores{memory})"


def provenance(records: list[dict[str, Any]], command: str) -> str:
    """One line: the machines and commits behind `records`, and the command that measures them."""
    machines = sorted({machine_label(r) for r in records})
    commits = sorted({(r.get("git_commit") or "unknown")[:7] + ("-dirty" if "dirty" in (r.get("git_commit") or "")
                                                                  else "") for r in records})
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    thread_text = f", {'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}" if threads else ""
    return (f"Measured on {'; '.join(machines)}{thread_text}, commit {', '.join(commits)}, by `{command}`.")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _load(path: Path) -> list[dict[str, Any]]:
    return read_records(path) if path.is_file() else []


# ---- quality ----------------------------------------------------------------------------------------------
def method_rows() -> list[tuple[compare.GridCell, dict[str, Any]]]:
    """The headline grid's measured cells, in the grid's order."""
    calib = compare.calibration("quick", "float32")
    rows = compare.results(compare_grid.cells(), compare_grid.MODEL, calib, "quick", compare_grid.STORE, [])
    return [(cell, record) for cell, record in rows if record is not None]


def llamacpp_rows() -> list[dict[str, Any]]:
    """llama.cpp's requantized types (the shipped Q4_1 file's own row is the float reference: left out)."""
    rows = [r for r in _load(QUALITY / "llamacpp.jsonl") if r.get("method") == "llama.cpp" and r.get("bpw")]
    return sorted(rows, key=lambda r: r["bpw"])


def _ppl(record: dict[str, Any], dataset: str) -> float | None:
    return ((record.get("ppl") or {}).get(dataset) or {}).get("ppl")


def _window_note(records: list[dict[str, Any]]) -> str:
    for record in records:
        result = (record.get("ppl") or {}).get("wikitext2")
        if result:
            return (f"Perplexity: quick protocol ({result['windows']} windows of 2048 tokens, "
                    f"{result['tokens']:,} predicted tokens per dataset).")
    return ""


def table_headline() -> str:
    """cmpq beside the baselines and llama.cpp's types near 3 and 4 bits per weight."""
    rows = method_rows()
    llama = llamacpp_rows()
    lines = ["| method | setting | honest bpw | WikiText-2 | C4 |", "|---|---|---|---|---|"]
    for cell, record in rows:
        if cell.name == "float" or cell.name in ("cmpq", "cmpq-nodistill", "gptq", "awq", "rtn", "squeezellm"):
            bpw = "16 (float32 here)" if cell.name == "float" else _fmt(record.get("bpw"), 3)
            name = {"cmpq": "**cmpq** (default)", "cmpq-nodistill": "cmpq, no distillation"}.get(cell.name, cell.name)
            if cell.name == "float":
                name, setting = "float", "reference"
            else:
                setting = cell.setting
            lines.append(f"| {name} | {setting} | {bpw} | {_fmt(_ppl(record, 'wikitext2'))} | "
                         f"{_fmt(_ppl(record, 'c4'))} |")
    for record in llama:
        lines.append(f"| llama.cpp | {record['setting']} | {_fmt(record['bpw'], 3)} | "
                     f"{_fmt(_ppl(record, 'wikitext2'))} | {_fmt(_ppl(record, 'c4'))} |")
    records = [r for _, r in rows] + llama
    return "\n".join(lines) + "\n\n" + _window_note(records) + " " + provenance(
        records, "python benchmarks/compare_grid.py; python benchmarks/llamacpp_quality.py") + "\n"


def table_methods() -> str:
    """Every cell of the headline grid, with its cost."""
    rows = method_rows()
    lines = ["| method | setting | honest bpw | code bpw | WikiText-2 | C4 | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for cell, record in rows:
        seconds = None if cell.name == "float" else record.get("quant_seconds")
        lines.append(f"| {cell.name} | {cell.setting} | {_fmt(record.get('bpw'), 3)} | "
                     f"{_fmt(record.get('code_bpw'), 3)} | {_fmt(_ppl(record, 'wikitext2'))} | "
                     f"{_fmt(_ppl(record, 'c4'))} | {_fmt(seconds, 0)} | {_fmt(record.get('peak_rss_mb'), 0)} |")
    records = [r for _, r in rows]
    return ("\n".join(lines) + "\n\n" + _window_note(records) + " Calibration: C4, 32 windows of 512 tokens, "
            "float32 forwards, the same tokens for every method. Each cell ran as its own process with one thread "
            "while other work shared the machine: the seconds compare cells of this table only roughly. "
            + provenance(records, "python benchmarks/compare_grid.py --threads 1") + "\n")


def table_llamacpp() -> str:
    """llama.cpp's types requantized from the shipped Q4_1 file, evaluated by cmpq's own perplexity code."""
    records = llamacpp_rows()
    lines = ["| type | honest bpw | tensor types of the block linears | WikiText-2 | C4 | file bytes |",
             "|---|---|---|---|---|---|"]
    for r in records:
        types = ", ".join(f"{name} x{count}" for name, count in sorted((r.get("tensor_types") or {}).items()))
        lines.append(f"| {r['setting']} | {_fmt(r['bpw'], 3)} | {types} | {_fmt(_ppl(r, 'wikitext2'))} | "
                     f"{_fmt(_ppl(r, 'c4'))} | {r.get('file_bytes', 0):,} |")
    version = records[0].get("llama_cpp_version", "?") if records else "?"
    return ("\n".join(lines) + f"\n\nllama.cpp {version}, no importance matrix. " + _window_note(records) + " "
            + provenance(records, "python benchmarks/llamacpp_quality.py") + "\n")


def table_ablations() -> str:
    """The paper's method, its ablations and the ladder to the best preset."""
    calib, eval_config = ablations.calibration()
    by_key = {record_key(r): r for r in _load(ablations.STORE)}
    lines = ["| configuration | honest bpw | code bpw | WikiText-2 | C4 |", "|---|---|---|---|---|"]
    used = []
    for label, cell in ablations.cells():
        record = by_key.get(cell.key(ablations.MODEL, calib, eval_config.protocol))
        if record is None:
            continue
        used.append(record)
        lines.append(f"| {label} | {_fmt(record.get('bpw'), 3)} | {_fmt(record.get('code_bpw'), 3)} | "
                     f"{_fmt(_ppl(record, 'wikitext2'))} | {_fmt(_ppl(record, 'c4'))} |")
    return ("\n".join(lines) + "\n\n" + _window_note(used) + " Calibration: C4, 32 x 512 tokens, float32 forwards. "
            + provenance(used, "python benchmarks/ablations.py") + "\n")


def plot_quality() -> dict[str, Any]:
    """Points of perplexity against honest bpw: each method a line, llama.cpp's types one line, float a level."""
    series: dict[str, Any] = {}
    for dataset, _ in DATASETS:
        lines: dict[str, list[list[float]]] = {}
        level = None
        for cell, record in method_rows():
            ppl = _ppl(record, dataset)
            if ppl is None:
                continue
            if cell.name == "float":
                level = round(ppl, 4)
            else:
                lines.setdefault(cell.name, []).append([round(record["bpw"], 4), round(ppl, 4)])
        llama = [[round(r["bpw"], 4), round(_ppl(r, dataset), 4)] for r in llamacpp_rows() if _ppl(r, dataset)]
        if llama:
            lines["llama.cpp (no imatrix)"] = llama
        series[dataset] = {"float": level, "lines": {k: sorted(v) for k, v in lines.items()}}
    return series


def draw_quality(series: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(12, 4.6), squeeze=False)
    for ax, (dataset, title) in zip(axes[0], DATASETS):
        data = series[dataset]
        for name, points in data["lines"].items():
            style = {"linewidth": 2.5} if name == "cmpq" else {"linewidth": 1.2}
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, **style)
        if data["float"]:
            ax.axhline(data["float"], color="black", linestyle="--", linewidth=1, label=f"float ({data['float']:.2f})")
        ax.set_yscale("log")
        ax.set_xlim(1.9, 8.7)
        ax.set_ylim(top=max(400.0, data["float"] or 0))
        ax.set_xlabel("honest bits per weight (every stored bit)")
        ax.set_ylabel(f"{title} perplexity (quick, lower is better)")
        ax.set_title(f"smollm2-135m: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100, metadata={"Software": None}))
    plt.close(fig)


# ---- speed ------------------------------------------------------------------------------------------------
def speed_folders() -> list[Path]:
    return sorted(p for p in SPEED.iterdir() if p.is_dir()) if SPEED.is_dir() else []


def table_kernels() -> str:
    """The LUT kernels against torch's F.linear on the same shapes and inputs, per machine."""
    out = []
    for folder in speed_folders():
        records = _load(folder / "kernels.jsonl")
        if not records:
            continue
        lines = ["| shape (out x in) | bpw | tokens | cmpq ms | x fp32 | x bf16 | % of copy | int8 tables ms | "
                 "int8 x fp32 | int8 % of copy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            int8 = r.get("int8_ms") is not None
            lines.append(f"| {r['rows']} x {r['cols']} | {r['bits']:g} | {r['batch']} | {r['ours_ms']:.3f} | "
                         f"{r['speedup_vs_fp32']:.1f} | {r['speedup_vs_bf16']:.1f} | {100 * r['copy_fraction']:.0f} | "
                         f"{_fmt(r['int8_ms'], 3) if int8 else '-'} | "
                         f"{format(r['int8_speedup_vs_fp32'], '.1f') if int8 else '-'} | "
                         f"{format(100 * r['int8_copy_fraction'], '.0f') if int8 else '-'} |")
        copies = [r["copy_gbps"] for r in records]
        out.append(f"**{folder.name}**\n\n" + "\n".join(lines) + "\n\ncmpq: exact float look-up tables; int8: one "
                   "token with the default int8 tables. x fp32 / x bf16: torch's F.linear time on a dense weight of "
                   "the same shape divided by ours. % of copy: our weight bytes per second over the bandwidth of a "
                   f"256 MB copy timed right after it ({min(copies):.1f}-{max(copies):.1f} GB/s). Medians of repeats. "
                   + provenance(records, "python benchmarks/speed.py"))
    return "\n\n".join(out) + "\n" if out else "No kernel records yet: run `python benchmarks/speed.py`.\n"


def table_vs_llamacpp() -> str:
    """Prefill and decode tokens/s of the native engine against llama.cpp, per machine, both thread counts."""
    out = []
    for folder in speed_folders():
        records = _load(folder / "vs_llamacpp.jsonl")
        if not records:
            continue
        lines = ["| system | model | threads | pp512 tok/s | x Q4_0 | tg128 tok/s | x Q4_0 | x F32 | MB read / token "
                 "| share of copy bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(records, key=lambda r: (-r["threads"], r["system"] != "llama.cpp")):
            lines.append(f"| {r['system']} | {r['model']} | {r['threads']} | {r['pp512']:.0f} | "
                         f"{_fmt(r.get('pp512_vs_Q4_0'))} | {r['tg128']:.1f} | {_fmt(r.get('tg128_vs_Q4_0'))} | "
                         f"{_fmt(r.get('tg128_vs_F32'))} | {r['bytes_per_token'] / 1e6:.1f} | "
                         f"{r['bandwidth_share']:.2f} |")
        first = records[0]
        out.append(f"**{folder.name}**\n\n" + "\n".join(lines) + f"\n\npp{first['prompt_tokens']}: one prompt of "
                   f"{first['prompt_tokens']} tokens; tg{first['new_tokens']}: {first['new_tokens']} tokens decoded one "
                   "at a time from an empty cache (as `llama-bench -p 512 -n 128`). cmpq models: 2.5 / 3 / 4 honest "
                   "bpw in the blocks, float head or head at 6 bits (head6). llama.cpp and cmpq alternate in "
                   f"{first['rounds']} rounds; tokens/s are medians, ratios medians of per-round ratios. MB read / "
                   "token: weight bytes one decoded token reads; share of copy bandwidth: those bytes per second of "
                   "decoding over the bytes per second (read + written) of a 256 MB copy in the same run. "
                   + provenance(records, "python benchmarks/vs_llamacpp.py"))
    return "\n\n".join(out) + "\n" if out else "No records yet: run `python benchmarks/vs_llamacpp.py`.\n"


# ---- quantization cost ------------------------------------------------------------------------------------
COST = RESULTS / "cost"


def cost_folders() -> list[Path]:
    return sorted(p for p in COST.iterdir() if p.is_dir()) if COST.is_dir() else []


def _per_machine(name: str, render: Callable[[list[dict[str, Any]]], str], script: str) -> str:
    """`render(records)` of results/cost/<machine>/`name`.jsonl for every machine, with its provenance."""
    out = []
    for folder in cost_folders():
        records = _load(folder / f"{name}.jsonl")
        if records:
            out.append(f"**{folder.name}**\n\n" + render(records).rstrip("\n") + " "
                       + provenance(records, f"python benchmarks/{script}"))
    return "\n\n".join(out) + "\n" if out else f"No records yet: run `python benchmarks/{script}`.\n"


def table_quality_time() -> str:
    """Settings of `cmpq quantize` against their minutes, peak RSS and perplexity, per machine."""
    import quality_time

    return _per_machine("quality_time", quality_time.markdown, "quality_time.py")


def table_stages() -> str:
    """Seconds per stage of each quality/time setting, side by side, per machine."""
    out = []
    for folder in cost_folders():
        records = _load(folder / "quality_time.jsonl")
        if not records:
            continue
        names: list[str] = []
        for r in records:
            names += [n for n in r["stages"] if n not in names and not n.startswith("k-means") and n != "other"]
        names += ["k-means, all widths", "other"]
        lines = ["| stage | " + " | ".join(f"({i + 1})" for i in range(len(records))) + " |",
                 "|---|" + "---|" * len(records)]
        for name in names:
            cells = []
            for r in records:
                seconds = (sum(v for k, v in r["stages"].items() if k.startswith("k-means"))
                           if name == "k-means, all widths" else r["stages"].get(name))
                cells.append(f"{seconds:.0f}" if seconds else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| **all** | " + " | ".join(f"**{sum(r['stages'].values()):.0f}**" for r in records) + " |")
        legend = "; ".join(f"({i + 1}) {r['label']}" for i, r in enumerate(records))
        out.append(f"**{folder.name}**\n\n" + "\n".join(lines) + f"\n\nSeconds per stage (`cmpq.progress`: each "
                   f"second is charged to one stage). {legend}. "
                   + provenance(records, "python benchmarks/quality_time.py"))
    return "\n\n".join(out) + "\n" if out else "No records yet: run `python benchmarks/quality_time.py`.\n"


def table_block_cost() -> str:
    """Seconds and peak RSS per block at 7B and 1.1B shapes, per machine."""
    import block_cost

    return _per_machine("block_cost", block_cost.markdown, "block_cost.py")


def table_busy_machine() -> str:
    """A quick quantization idle and beside a busy process, per machine."""
    import busy_machine

    return _per_machine("busy_machine", lambda records: busy_machine.markdown(records, records[0]["machine"]["cores"]),
                        "busy_machine.py")


def table_cli() -> str:
    """Every command's --help, at a fixed width, so the page is the same on any terminal."""
    import os

    from cmpq.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"
    try:
        parser = build_parser()
        commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parts = ["```text\n$ cmpq --help\n" + parser.format_help().rstrip() + "\n```"]
        for name, sub in commands.choices.items():
            parts.append(f"### cmpq {name}\n\n```text\n$ cmpq {name} --help\n" + sub.format_help().rstrip() + "\n```")
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n\n".join(parts) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "headline": table_headline, "methods": table_methods, "llamacpp": table_llamacpp,
    "ablations": table_ablations, "kernels": table_kernels, "vs-llamacpp": table_vs_llamacpp,
    "cli": table_cli, "quality-time": table_quality_time, "stages": table_stages, "block-cost": table_block_cost,
    "busy-machine": table_busy_machine,
}
PLOTS: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any], Path], None], str]] = {
    "quality": (plot_quality, draw_quality, "Perplexity against honest bits per weight on smollm2-135m"),
}


# ---- rendering --------------------------------------------------------------------------------------------
def outputs() -> dict[Path, Path]:
    """template -> document: docs/templates/README.md is the README, the others are docs/<name>."""
    return {t: (CHECKOUT / "README.md" if t.name == "README.md" else CHECKOUT / "docs" / t.name)
            for t in sorted(TEMPLATES.glob("*.md"))}


def render(template: Path, document: Path, plots: dict[str, dict[str, Any]]) -> str:
    out = []
    for number, line in enumerate(template.read_text(encoding="utf-8").splitlines(), start=1):
        match = DIRECTIVE.match(line.strip())
        if not match:
            out.append(line)
            continue
        kind, name = match.groups()
        if kind == "table":
            if name not in TABLES:
                raise SystemExit(f"{template}:{number}: unknown table '{name}' (known: {', '.join(TABLES)})")
            out.append(TABLES[name]().rstrip("\n"))
        else:
            if name not in PLOTS:
                raise SystemExit(f"{template}:{number}: unknown plot '{name}' (known: {', '.join(PLOTS)})")
            plots.setdefault(name, PLOTS[name][0]())
            relative = Path("img" if document.parent.name == "docs" else "docs/img") / f"{name}.png"
            out.append(f"![{PLOTS[name][2]}]({relative.as_posix()})")
    return "\n".join(out) + "\n"


def plot_data(series: dict[str, Any]) -> str:
    return json.dumps(series, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming every document or plot that differs from its records")
    args = parser.parse_args(argv)
    plots: dict[str, dict[str, Any]] = {}
    rendered = {document: render(template, document, plots) for template, document in outputs().items()}
    stale = [str(d.relative_to(CHECKOUT)) for d, text in rendered.items()
             if not d.is_file() or d.read_text(encoding="utf-8") != text]
    for name, series in plots.items():
        data = IMAGES / f"{name}.json"
        if not data.is_file() or data.read_text(encoding="utf-8") != plot_data(series):
            stale.append(str(data.relative_to(CHECKOUT)))
    if args.check:
        if stale:
            print("out of date with the records (run `make report`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{len(rendered)} documents and {len(plots)} plots match their records")
        return 0
    for document, text in rendered.items():
        document.parent.mkdir(parents=True, exist_ok=True)
        tmp = document.with_name(f".{document.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(document)
    for name, series in plots.items():
        IMAGES.mkdir(parents=True, exist_ok=True)
        (IMAGES / f"{name}.json").write_text(plot_data(series), encoding="utf-8")
        PLOTS[name][1](series, IMAGES / f"{name}.png")
    print(f"rendered {len(rendered)} documents and {len(plots)} plots"
          + (f"; changed: {', '.join(stale)}" if stale else "; nothing changed"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
