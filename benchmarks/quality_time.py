"""Quality against time for `cmpq quantize`: each setting one `cmpq quantize` process on smollm2-135m, with
its wall time, peak RSS, stage profile and WikiText-2 / C4 perplexity (quick protocol).

Settings are flags added to `cmpq quantize --bits B`, spelled out in full so that a row keeps its meaning when
defaults change; the row marked "(default)" is what the flags' defaults give. Each run is
stored as it finishes (resumable: a setting already stored for this machine and bits is skipped; --force
runs it again; each record names the code revision it ran). Runs are sequential and nothing else should run beside them: the times are
the point.

Writes benchmarks/results/cost/<machine>/quality_time.jsonl and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, machine_slug, publish  # noqa: E402

# (label, flags): what each setting changes against the default
SETTINGS: list[tuple[str, list[str]]] = [
    ("128 x 2048 calibration, 3 distillation epochs (the former default)",
     ["--nsamples", "128", "--distill", "3", "--distill-tokens", "65536", "--options", '{"fisher_tokens": 32768}']),
    ("32 x 2048 calibration, 3 distillation epochs (default)", ["--nsamples", "32", "--distill", "3",
                                                                "--distill-tokens", "65536"]),
    ("32 x 2048 calibration, 2 distillation epochs", ["--nsamples", "32", "--distill", "2",
                                                      "--distill-tokens", "65536"]),
    ("32 x 2048 calibration, 1 distillation epoch", ["--nsamples", "32", "--distill", "1",
                                                     "--distill-tokens", "65536"]),
    ("32 x 2048 calibration, no distillation", ["--nsamples", "32", "--distill", "0"]),
]


def run_setting(bits: float, flags: list[str], work: Path, timeout: float) -> dict:
    """One `cmpq quantize` process: its record with the wall time the user waits for."""
    record_path = work / f"run-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "cmpq", "quantize", "--bits", str(bits), *flags, "--json", str(record_path),
               "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = json.loads(record_path.read_text().splitlines()[-1])
    return {"wall_seconds": wall, "record": record}


def summary(label: str, bits: float, flags: list[str], run: dict) -> dict:
    record = run["record"]
    return {"benchmark": "quality_time", "label": label, "bits": bits, "flags": flags,
            "command": " ".join(["cmpq quantize --bits", str(bits), *flags]),
            "wall_seconds": run["wall_seconds"], "peak_rss_mb": record["peak_rss_mb"],
            "ppl": {name: r["ppl"] for name, r in record["ppl"].items()}, "bpw": record["bpw"],
            "stages": record["stages"], "calibration": {k: record["calibration"].get(k) for k in
                                                        ("nsamples", "seqlen", "resolved_dtype")},
            "distill": (record["calibration"].get("distill") or {}).get("epochs"),
            "threads": record["threads"], "git_commit": record["git_commit"], "machine": record["machine"],
            "time": record["time"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | minutes | peak RSS, GB | WikiText-2 | C4 | commit |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['label']}**" if r["label"].endswith("(default)") else r["label"]
        lines.append(f"| {name} | {r['wall_seconds'] / 60:.1f} | {r['peak_rss_mb'] / 1024:.2f} | "
                     f"{r['ppl'].get('wikitext2', float('nan')):.2f} | {r['ppl'].get('c4', float('nan')):.2f} | "
                     f"{(r['git_commit'] or 'unknown')[:7]} |")
    first = rows[0]
    return ("\n".join(lines) + f"\n\n`cmpq quantize --bits {first['bits']:g}` plus each setting's flags on smollm2-135m, "
            f"{first['machine']['cpu']}, {first['threads']} threads; minutes: the whole command (load, quantization, "
            "distillation, evaluation); perplexity: the quick protocol (16 windows of 2048 tokens).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=2.5, help="target bits per weight (default: %(default)s)")
    parser.add_argument("--only", metavar="LABEL", action="append", help="run only these settings (repeatable)")
    parser.add_argument("--force", action="store_true", help="run settings already stored again")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds before a run is stopped")
    args = parser.parse_args()
    group = f"cost/{machine_slug()}"
    path = RESULTS / group / "quality_time.jsonl"
    stored = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in SETTINGS:
            if args.only and label not in args.only:
                continue
            same = [r for r in stored if r["label"] == label and r["bits"] == args.bits]
            if same and not args.force:
                continue
            print(f"{label}: running", flush=True)
            row = summary(label, args.bits, flags, run_setting(args.bits, flags, Path(tmp), args.timeout))
            stored = [r for r in stored if not (r["label"] == label and r["bits"] == args.bits)] + [row]
            order = {name: i for i, (name, _) in enumerate(SETTINGS)}
            stored.sort(key=lambda r: (r["bits"], order.get(r["label"], len(order))))
            publish("quality_time", stored, markdown([r for r in stored if r["bits"] == args.bits]), group=group)
            print(f"{label}: {row['wall_seconds'] / 60:.1f} min, {row['ppl']}", flush=True)


if __name__ == "__main__":
    main()
