"""Fine-tuning of CMPQ's stored values on smollm2-135m (`cmpq quantize --finetune`, block by block, then
`--distill`, end to end): WikiText-2 (quick protocol) at a bpw target without and with fine-tuning, quick
calibration (32 x 512 C4 tokens unless a run says otherwise).

Each run is its own `cmpq quantize` process. Writes benchmarks/results/quality/smollm2-quick/finetune.jsonl (a run replaces the
stored record of the same name and target; others are kept) and finetune.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import QUALITY, publish  # noqa: E402

from cmpq.eval.records import read_records  # noqa: E402

# name -> extra `cmpq quantize` flags (CMPQ's best preset with a per-layer budget underneath, as every stored row
# was measured with a per-layer budget; a later --nsamples overrides the 32, a run's
# --distill the "0" that keeps the others as they were measured before distillation became the default)
RUNS: dict[str, list[str]] = {
    "none": [],
    "2 epochs, lr 1e-3": ["--finetune", "2", "--finetune-lr", "1e-3"],
    "3 epochs, lr 3e-3": ["--finetune", "3", "--finetune-lr", "3e-3"],
    "3 epochs, lr 3e-3, model target": ["--finetune", "3", "--finetune-lr", "3e-3", "--finetune-target", "model"],
    "4 epochs, lr 6e-3": ["--finetune", "4", "--finetune-lr", "6e-3"],
    "3 epochs, lr 3e-3, 64 windows": ["--finetune", "3", "--finetune-lr", "3e-3", "--nsamples", "64"],
    "3 epochs, lr 3e-3, then distill 2 epochs": ["--finetune", "3", "--finetune-lr", "3e-3", "--distill", "2"],
    "3 epochs, lr 3e-3, then distill 3 epochs, 64 windows": ["--finetune", "3", "--finetune-lr", "3e-3",
                                                             "--distill", "3", "--nsamples", "64"],
    "3 epochs, lr 3e-3, then distill 3 epochs, 128 windows": ["--finetune", "3", "--finetune-lr", "3e-3",
                                                              "--distill", "3", "--nsamples", "128"],
    "distill 3 epochs, 128 windows": ["--distill", "3", "--nsamples", "128"],
}


def run(name: str, bits: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        command = [sys.executable, "-m", "cmpq", "quantize", "--method", "cmpq", "--bits", str(bits),
                   "--nsamples", "32", "--seqlen", "512", "--allocation-scope", "layer", "--distill", "0",
                   *RUNS[name], "--eval", "wikitext2", "--protocol", "quick", "--json", str(out), "--no-progress"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        record = read_records(out)[-1]
    record.pop("layers", None)
    record["run"] = name
    return record


def _commit(commit: str) -> str:
    """Short hash; "+" marks a run of uncommitted changes on top of it."""
    return str(commit)[:12] + ("+" if str(commit).endswith("-dirty") else "")


def _distill(record: dict) -> str:
    """Held-out KL to the float model before distillation and for the epoch kept, or "-"."""
    d = record["calibration"].get("distill")
    if not d:
        return "-"
    kl = d["held_out_kl"]
    return f"{kl[0]:.4f} -> {kl[d['epoch_kept']]:.4f} ({d['epoch_kept']})"


def render(records: list[dict]) -> str:
    lines = ["CMPQ (best preset, per-layer budget) on smollm2-135m, WikiText-2 quick protocol.", "",
             "| run | calibration | target bpw | honest bpw | WikiText-2 | quant s | blocks kept | "
             "median block error after/before | distill: held-out KL before -> kept (epoch) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        blocks = (r["calibration"].get("finetune") or {}).get("blocks", [])
        ratios = sorted(b["error_after"] / b["error_before"] for b in blocks if b["error_before"] > 0)
        kept = sum(b["error_after"] < b["error_before"] for b in blocks)
        median = f"{ratios[len(ratios) // 2]:.3f}" if ratios else "-"
        c = r["calibration"]
        lines.append(f"| {r['run']} | {c['nsamples']} x {c['seqlen']} | {r['target_bits']} | {r['bpw']:.4f} | {r['ppl']['wikitext2']['ppl']:.2f} | "
                     f"{r['quant_seconds']:.0f} | {kept if blocks else '-'} | {median} | {_distill(r)} | "
                     f"{_commit(r['git_commit'])} |")
    lines += ["", "Command: `python benchmarks/finetune.py` (`--run NAME`, repeatable, re-measures some; names as in "
                  "RUNS). Quant seconds include fine-tuning; they are wall time on 2 cores, not a timing benchmark."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=2.5)
    parser.add_argument("--run", action="append", metavar="NAME",
                        help=f"a run to measure (repeatable; names hold commas); default: all of {list(RUNS)}")
    parser.add_argument("--render", action="store_true", help="only rebuild finetune.md from the stored records")
    args = parser.parse_args()
    jsonl = QUALITY / "finetune.jsonl"
    stored = read_records(jsonl) if jsonl.exists() else []
    if not args.render:
        names = args.run or list(RUNS)
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
        new = [run(name, args.bits) for name in names]
        done = {(r["run"], r["target_bits"]) for r in new}
        stored = [r for r in stored if (r["run"], r["target_bits"]) not in done] + new
    publish("finetune", None if args.render else stored, render(stored))


if __name__ == "__main__":
    main()
