"""Evaluation beyond perplexity: float, RTN 3-bit g128, GPTQ 3-bit g128 and CMPQ at 2.5 / 3.0 / 4.0 honest bpw on smollm2-135m,
each with KL divergence to float, top-1 agreement, the zero-shot tasks and 5-shot MMLU (quick task protocol) and
WikiText-2 / C4 perplexity (quick), with the time every evaluation took.

The cells run through `cmpq compare`'s machinery (one process each, resumable) into
benchmarks/results/quality/smollm2-quick/tasks/results.jsonl; `--render` only rebuilds eval_table.md there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS  # noqa: E402

from cmpq import compare  # noqa: E402
from cmpq.eval.harness import ALL_TASKS, TaskConfig  # noqa: E402

MODEL = "smollm2-135m"
OUT = RESULTS / "quality" / "smollm2-quick" / "tasks"
GRIDS = ((["float", "rtn", "gptq"], [3.0]), (["cmpq"], [2.5, 3.0, 4.0]))
TASK_COLUMNS = (("arc_easy", "acc"), ("arc_challenge", "acc"), ("piqa", "acc"), ("hellaswag", "acc_norm"),
                ("winogrande", "acc"), ("boolq", "acc"), ("lambada_openai", "acc"), ("mmlu", "average"))


def cells() -> list[compare.GridCell]:
    return [c for methods, bits in GRIDS for c in compare.grid(methods, bits)]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def render(rows, extras: compare.Extras) -> str:
    label = TaskConfig(extras.tasks, extras.task_protocol, extras.limit).label()
    head = ["model", "honest bpw", "WikiText-2", "KLD", "KLD p99", "top-1 %"] + [
        f"{task} {metric}" for task, metric in TASK_COLUMNS] + ["eval s (ppl / KLD / tasks)"]
    lines = [f"{MODEL}; tasks: {label}; KLD: first {extras.kld_windows} WikiText-2 windows of 2048 tokens; "
             f"perplexity: quick protocol. Accuracies in %. KLD is shown clamped at 0: the float reference is stored in "
             f"float16, so the float model's own KLD is a rounding residue of either sign (raw values in the "
             f"records).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for cell, record in rows:
        name = f"{cell.name} {cell.setting}"
        if record is None:
            lines.append(f"| {name} | not measured |" + " |" * (len(head) - 2))
            continue
        kld, tasks = record.get("kld") or {}, record.get("tasks") or {}
        ppl = record["ppl"]
        ppl_seconds = sum(r.get("seconds", 0.0) for r in ppl.values())
        task_seconds = sum(r.get("seconds", 0.0) for r in tasks.values() if isinstance(r, dict))
        values = [name, "-" if record.get("bpw") is None else f"{record['bpw']:.3f}",
                  f"{ppl['wikitext2']['ppl']:.2f}" if "wikitext2" in ppl else "-",
                  # the float reference is stored in float16: the float model's own KLD is within 1e-5 of 0, either sign
                  "-" if not kld else f"{max(kld['mean_kld'], 0.0):.4f}",
                  "-" if not kld else f"{max(kld['p99_kld'], 0.0):.3f}",
                  _pct(kld.get("top1_agreement"))]
        values += [_pct((tasks.get(task) or {}).get(metric)) for task, metric in TASK_COLUMNS]
        values.append(f"{ppl_seconds:.0f} / {kld.get('seconds', 0):.0f} / {task_seconds:.0f}")
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", "Command: `python benchmarks/eval_table.py` (each cell: `cmpq quantize ... --tasks all "
                  "--task-protocol quick --kld` or `cmpq eval ...` for float, one process per cell)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only rebuild the table from stored records")
    parser.add_argument("--limit", type=int, help="documents per task (smoke runs)")
    args = parser.parse_args()
    extras = compare.Extras(tasks=ALL_TASKS, task_protocol="quick", limit=args.limit, kld_windows=4)
    calib = compare.calibration("quick", "float32")
    store = OUT / "results.jsonl"
    if not args.render:
        OUT.mkdir(parents=True, exist_ok=True)
        failed = compare.run(cells(), MODEL, calib, "quick", store, [], extras=extras)
        if failed:
            print(f"{len(failed)} cell(s) failed", file=sys.stderr)
    rows = compare.results(cells(), MODEL, calib, "quick", store, [])
    markdown = render(rows, extras)
    (OUT / "eval_table.md").write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
