"""Quantization time and peak memory of every method of the comparison on smollm2-135m at 3 bits (integer-width
methods at 3-bit, CMPQ and LLM-MQ at 3.0 honest bpw, SmoothQuant W8A8), with the comparison's calibration (C4
32 x 512, float32 forwards), one `cmpq quantize --eval none` process per method on an otherwise idle machine.

The comparison grid's own "quant s" column is measured too, but while other work may share the 2 cores; this
table is the dedicated measurement. Writes benchmarks/results/cost/<machine>/method_time.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, machine_slug  # noqa: E402

from cmpq import compare  # noqa: E402
from cmpq.eval.records import append_record, read_records  # noqa: E402

METHODS = ["rtn", "gptq", "awq", "quip", "squeezellm", "llmmq", "cmpq", "cmpq-noef", "smoothquant"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--render", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    jsonl = RESULTS / "cost" / machine_slug() / "method_time.jsonl"
    calib = compare.calibration("quick", "float32")
    if not args.render:
        for cell in compare.grid(args.methods.split(","), [3.0]):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.jsonl"
                command = compare.command(cell.cell, "smollm2-135m", calib, "quick", out, None, False)
                command += ["--eval", "none"]
                print(f"{cell.name} {cell.setting}", flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                record = read_records(out)[-1]
            record.pop("layers", None)
            record["compare_name"], record["setting"] = cell.name, cell.setting
            append_record(jsonl, record)
    latest = {r["compare_name"]: r for r in read_records(jsonl)} if jsonl.exists() else {}
    lines = ["smollm2-135m, one `cmpq quantize --eval none` process per method, calibration C4 32 x 512 (float32 "
             "forwards), nothing else running.", "",
             "| method | setting | honest bpw | quant s | peak RSS MB | threads | commit |", "|---|---|---|---|---|---|---|"]
    for name in METHODS:
        if name in latest:
            r = latest[name]
            lines.append(f"| {name} | {r['setting']} | {r['bpw']:.3f} | {r['quant_seconds']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['threads']} | {str(r['git_commit'])[:12]} |")
    lines += ["", "Command: `python benchmarks/method_time.py`."]
    markdown = "\n".join(lines) + "\n"
    (jsonl.parent / "method_time.md").write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
