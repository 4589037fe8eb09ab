"""Speed of packed smollm2-135m on this machine in one command: models at 2.5 / 3 / 4 honest bpw (and 3 bpw with
the head at 6 bits) are saved under runs/speed/ (once; reused while the format version matches), then
`cmpq bench kernels` (the LUT kernels against torch's F.linear on the same shapes) and `cmpq bench decode`
(each packed model with exact float look-up tables and with the default ones, against the float model) write
their records and tables to benchmarks/results/speed/<machine>/, named after this CPU and the kernels' ISA,
with the saved models' file sizes in files.jsonl. `make report` renders the documentation from them.

Run it on an otherwise idle machine: every number is a ratio of two timings taken side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, machine_slug  # noqa: E402

from cmpq.packed.hf import FORMAT_VERSION  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent
MODELS = CHECKOUT / "runs" / "speed"
# name -> extra `cmpq quantize` options (quick calibration, CMPQ's best setting)
VARIANTS = {"cmpq-2.5": ["--bits", "2.5"], "cmpq-3": ["--bits", "3"], "cmpq-4": ["--bits", "4"],
            "cmpq-3-head6": ["--bits", "3", "--quantize-head", "6"],
            "cmpq-2.5-head6": ["--bits", "2.5", "--quantize-head", "6"],
            "cmpq-4-head6": ["--bits", "4", "--quantize-head", "6"]}


def cmpq(*args: str) -> None:
    command = [sys.executable, "-m", "cmpq", *args]
    print("+ cmpq " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=CHECKOUT)


def saved_version(path: Path) -> int | None:
    try:
        return json.loads((path / "config.json").read_text())["quantization_config"]["format_version"]
    except (OSError, KeyError, ValueError):
        return None


def ensure_models(names: list[str]) -> list[Path]:
    """Quantize and save each variant unless a complete saved model is already there."""
    paths = []
    for name in names:
        path = MODELS / name
        if not (path / "model.safetensors").is_file() or saved_version(path) != FORMAT_VERSION:
            # no distillation: it changes stored values, not the format or the speed, and would add minutes per model
            cmpq("quantize", *VARIANTS[name], "--nsamples", "32", "--seqlen", "512", "--eval", "none",
                 "--distill", "0", "--out", str(path), "--overwrite", "--no-progress")
        paths.append(path)
    return paths


def machine_folder() -> Path:
    """results/speed/<cpu>-<isa>: what the numbers depend on, in the folder's name."""
    return RESULTS / "speed" / machine_slug()


def file_records(paths: list[Path]) -> list[dict]:
    """Each saved model's weights file size and the bpw of its blocks and head, from its config."""
    records = []
    for path in paths:
        quant = json.loads((path / "config.json").read_text())["quantization_config"]
        head = quant.get("head")
        records.append({"benchmark": "files", "model": path.name, "file_bytes": (path / "model.safetensors").stat().st_size,
                        "bpw": quant["bpw"], "head_bpw": head["bpw"] if head else None})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(VARIANTS), help="variants to compare with float (default: all)")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--new-tokens", default="64")
    parser.add_argument("--repeats", default="5")
    args = parser.parse_args()
    paths = ensure_models([m for m in args.models.split(",") if m])
    results = machine_folder()
    results.mkdir(parents=True, exist_ok=True)
    (results / "files.jsonl").write_text("".join(json.dumps(r) + "\n" for r in file_records(paths)), encoding="utf-8")
    if not args.skip_kernels:
        cmpq("bench", "kernels", "--out", str(results))
    # each packed model twice: exact float look-up tables, then the default (int8 tables where the CPU has them)
    models = ["smollm2-135m", *(spec for path in paths for spec in (f"{path}:float", str(path)))]
    cmpq("bench", "decode", "--models", ",".join(models), "--out", str(results),
         "--new-tokens", args.new_tokens, "--repeats", args.repeats)
    print(f"results in {results}; `make report` renders the documentation from them")


if __name__ == "__main__":
    main()
