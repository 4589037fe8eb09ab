"""Issue 5's speed numbers in one command: packed smollm2-135m models at 2.5 / 3 / 4 honest bpw (and 3 bpw with a
quantized head) are saved under runs/speed/ (once; reused when present in the current format version), then
`cmpq bench kernels` and `cmpq bench decode` (each packed model with exact float look-up tables and with the
default ones) write benchmarks/results/{kernels,decode}.{jsonl,md}, and the file sizes of the saved models with
their bpw go to benchmarks/results/files.md. On a CPU without AVX-512 the kernel and decode results go to
benchmarks/results/<isa>/ and the README blocks `kernels-<isa>` and `decode-<isa>` instead, so the numbers of
both kinds of machine stay side by side.

Run it on an otherwise idle machine: every number is a ratio of two timings taken side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, update_readme  # noqa: E402

from cmpq.kernels import native  # noqa: E402
from cmpq.packed.hf import FORMAT_VERSION  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent
MODELS = CHECKOUT / "runs" / "speed"
# name -> extra `cmpq quantize` options (quick calibration, CMPQ's best setting)
VARIANTS = {"cmpq-2.5": ["--bits", "2.5"], "cmpq-3": ["--bits", "3"], "cmpq-4": ["--bits", "4"],
            "cmpq-3-head6": ["--bits", "3", "--quantize-head", "6"]}


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


def file_table(paths: list[Path]) -> str:
    """Each saved model's weights file: bytes, the blocks' honest bpw and the head's, from its config."""
    lines = ["| model | model.safetensors bytes | blocks bpw | head |", "|---|---|---|---|"]
    for path in paths:
        quant = json.loads((path / "config.json").read_text())["quantization_config"]
        head = quant.get("head")
        lines.append(f"| {path.name} | {(path / 'model.safetensors').stat().st_size:,} | {quant['bpw']:.3f} | "
                     f"{'float (tied to the embeddings)' if not head else format(head['bpw'], '.3f') + ' bpw'} |")
    return "\n".join(lines) + "\n"


def speed_results() -> tuple[Path, str]:
    """Where this CPU's kernel and decode results go, and the suffix of their README blocks: the best ISA the
    kernels use here (AVX-512 machines keep the unsuffixed files and blocks)."""
    isas = native.supported_isas()
    isa = isas[-1] if isas else "reference"
    return (RESULTS, "") if isa == "avx512" else (RESULTS / isa, f"-{isa}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only copy the stored tables into the README")
    parser.add_argument("--models", default=",".join(VARIANTS), help="variants to compare with float (default: all)")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--new-tokens", default="64")
    parser.add_argument("--repeats", default="5")
    args = parser.parse_args()
    if args.render:
        return render_readme()
    paths = ensure_models([m for m in args.models.split(",") if m])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "files.md").write_text(file_table(paths), encoding="utf-8")
    results, _ = speed_results()
    if not args.skip_kernels:
        cmpq("bench", "kernels", "--out", str(results))
    # each packed model twice: exact float look-up tables, then the default (int8 tables where the CPU has them)
    models = ["smollm2-135m", *(spec for path in paths for spec in (f"{path}:float", str(path)))]
    cmpq("bench", "decode", "--models", ",".join(models), "--out", str(results),
         "--new-tokens", args.new_tokens, "--repeats", args.repeats)
    render_readme()


def render_readme() -> None:
    """Copy the result tables into the README's marked blocks."""
    results, suffix = speed_results()
    for block, path in (("kernels" + suffix, results / "kernels.md"), ("decode" + suffix, results / "decode.md"),
                        ("files", RESULTS / "files.md")):
        if path.is_file():
            update_readme(block, path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
