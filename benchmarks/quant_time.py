"""Quantization time and peak memory of CMPQ on smollm2-135m, quick (32 x 512) and default (128 x 2048)
calibration. Each run is its own `cmpq quantize --eval none` process, so peak RSS is that run's alone.

Writes benchmarks/results/cost/<machine>/quant_time.jsonl (a run replaces the stored record of the same
setting and calibration; others are kept) and quant_time.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cmpq_table import BEST, BEST_FISHER, PAPER  # noqa: E402
from store import RESULTS, machine_slug  # noqa: E402

from cmpq.eval.records import read_records  # noqa: E402

CALIBRATIONS = {"quick": (32, 512), "default": (128, 2048)}


def cli_options(options: dict) -> list[str]:
    """The `cmpq quantize` flags that set these config fields."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "act_order":
            args += [] if value else ["--no-act-order"]
        elif isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--runs", default="paper:quick,best:quick,best:default",
                        help="comma-separated SETTING:CALIBRATION pairs; SETTING: paper, best (per-layer budget), "
                             "best-fisher (the preset)")
    parser.add_argument("--calib-dtype", default="auto", help="precision of the calibration forwards (auto = "
                        "bfloat16 where the CPU has native bfloat16 dot products, else float32)")
    args = parser.parse_args()
    settings = {"paper": PAPER, "best": BEST, "best-fisher": BEST_FISHER}
    records = []
    for run in args.runs.split(","):
        setting, calib = run.split(":")
        nsamples, seqlen = CALIBRATIONS[calib]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.jsonl"
            # on top of the paper preset: a False boolean has no flag of its own
            command = [sys.executable, "-m", "cmpq", "quantize", "--method", "cmpq", "--bits", str(args.bits),
                       "--preset", "paper", *cli_options(settings[setting]), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                       "--eval", "none", "--json", str(out), "--no-progress",
                       "--calib-dtype", args.calib_dtype]
            print(" ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
            record = read_records(out)[-1]
        record.pop("layers", None)
        record["setting"], record["calibration_protocol"] = setting, calib
        records.append(record)
    jsonl = RESULTS / "cost" / machine_slug() / "quant_time.jsonl"
    done = {(r["setting"], r["calibration_protocol"]) for r in records}
    kept = [r for r in (read_records(jsonl) if jsonl.exists() else [])
            if (r.get("setting"), r.get("calibration_protocol")) not in done]
    records = kept + records
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = [f"CMPQ quantization of smollm2-135m at {args.bits} bpw (no evaluation), one process per run.", "",
             "| setting | calibration | forwards | quant s | peak RSS MB | honest bpw | threads | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["calibration"]
        lines.append(f"| {r['setting']} | {r['calibration_protocol']} ({c['nsamples']} x {c['seqlen']}) | "
                     f"{c.get('resolved_dtype', 'float32')} | {r['quant_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['bpw']:.3f} | {r['threads']} | {str(r['git_commit'])[:12]} |")
    lines += ["", "Command: `python benchmarks/quant_time.py` (`--runs SETTING:CALIBRATION,...` re-measures some)."]
    (jsonl.parent / "quant_time.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
