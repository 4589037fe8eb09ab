"""Issue 6's grid on smollm2-135m (quick protocol): every method at 2 / 2.5 / 3 / 3.5 / 4 bits, and CMPQ without
error feedback at 2.5 / 3 / 4 (what GPTQ's compensation adds). Runs the cells `cmpq compare` would (one
process each, resumable) into benchmarks/results/compare/results.jsonl, renders compare.md / compare.png there and
the README block `compare`. `--reuse FILE` counts matching records of another store as measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, update_readme  # noqa: E402

from cmpq import compare  # noqa: E402

MODEL = "smollm2-135m"
OUT = RESULTS / "compare"
GRIDS = (("float,rtn,gptq,awq,quip,squeezellm,llmmq,cmpq,smoothquant", (2, 2.5, 3, 3.5, 4)),
         ("cmpq-noef", (2.5, 3, 4)))


def cells() -> list[compare.GridCell]:
    return [c for methods, bits in GRIDS for c in compare.grid(methods.split(","), list(bits))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render from stored records")
    parser.add_argument("--reuse", action="append", default=[], type=Path)
    args = parser.parse_args()
    calib = compare.calibration("quick", "float32")
    store = OUT / "results.jsonl"
    if not args.render:
        OUT.mkdir(parents=True, exist_ok=True)
        compare.run(cells(), MODEL, calib, "quick", store, args.reuse, progress=False)
    rows = compare.results(cells(), MODEL, calib, "quick", store, args.reuse)
    table = compare.render_table(rows, MODEL, calib, "quick")
    (OUT / "compare.md").write_text(table, encoding="utf-8")
    compare.render_plot(rows, OUT / "compare.png", MODEL, "quick")
    update_readme("compare", table)
    print(table)


if __name__ == "__main__":
    main()
