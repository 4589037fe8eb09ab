"""The headline comparison on smollm2-135m (quick protocol): cmpq as `cmpq quantize` runs it (distillation
included) and the quantizer alone, beside RTN, GPTQ, AWQ and SqueezeLLM at the widths they store, on the same
calibration tokens and evaluation windows.

Runs the cells `cmpq compare` would (one process each, resumable) into
benchmarks/results/quality/smollm2-quick/methods.jsonl; `make report` renders the tables and the plot from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cmpq import compare

MODEL = "smollm2-135m"
STORE = Path(__file__).parent / "results" / "quality" / "smollm2-quick" / "methods.jsonl"
# (methods, bit targets), in the order they are measured: the cheapest telling cells first, distillation last
GRIDS = (("float,cmpq,cmpq-nodistill,gptq,awq,rtn", (3,)),
         ("cmpq-nodistill,gptq,awq,rtn", (4,)),
         ("cmpq-nodistill", (2.5,)),
         ("squeezellm", (3, 4)),
         ("cmpq", (4, 2.5)),
         ("cmpq-nodistill", (2, 3.5)))


def cells() -> list[compare.GridCell]:
    seen: set[str] = set()
    out = []
    for methods, bits in GRIDS:
        for cell in compare.grid(methods.split(","), list(bits)):
            key = f"{cell.name} {cell.setting}"
            if key not in seen:
                seen.add(key)
                out.append(cell)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads per cell (default: torch's choice)")
    args = parser.parse_args()
    calib = compare.calibration("quick", "float32")
    STORE.parent.mkdir(parents=True, exist_ok=True)
    failed = compare.run(cells(), MODEL, calib, "quick", STORE, [], threads=args.threads, progress=False)
    rows = compare.results(cells(), MODEL, calib, "quick", STORE, [])
    print(compare.render_table(rows, MODEL, calib, "quick"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
