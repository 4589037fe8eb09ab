"""What each of CMPQ's choices is worth on smollm2-135m (quick protocol, quick calibration, float32 forwards):
the paper's method at several targets, its ablations (allocation order, outlier kinds, grid), and the ladder
from the paper's method to the best preset at 3.0 bpw, one option at a time.

Resumable: records go to benchmarks/results/quality/smollm2-quick/ablations.jsonl, a cell already there is
skipped. `make report` renders the table (docs/method.md) from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import RESULTS, Cell, Store  # noqa: E402

from cmpq.config import CalibConfig, EvalConfig  # noqa: E402
from cmpq.quantizers.cmpq.quantizer import PRESETS  # noqa: E402

MODEL = "smollm2-135m"
STORE = RESULTS / "quality" / "smollm2-quick" / "ablations.jsonl"
PAPER = dict(PRESETS["paper"].options)
PAPER_TARGETS = (2.5, 3.0, 4.0)
ABLATION_TARGET = 3.0
ABLATIONS = {
    "allocation by random order": {"allocation": "random"},
    "allocation by weight magnitude": {"allocation": "magnitude"},
    "no outliers": {"act_outliers": 0.0, "q_outliers": 0.0},
    "only O_act (activation outliers)": {"q_outliers": 0.0},
    "only O_q (quantization outliers)": {"act_outliers": 0.0},
    "min-max grid per column instead of k-means": {"grid": "minmax"},
}
# From the paper's method to the best preset, one option at a time (the preset adds distillation on top:
# the headline table's "cmpq" rows).
LADDER = {
    "+ error-driven allocation, widths 1..6": {"allocation": "error", "bit_set": (1, 2, 3, 4, 5, 6)},
    "+ int8 codebooks": {"allocation": "error", "bit_set": (1, 2, 3, 4, 5, 6), "codebook": "int8"},
    "+ error feedback": {"allocation": "error", "bit_set": (1, 2, 3, 4, 5, 6), "codebook": "int8",
                         "error_feedback": True},
    "+ one model-wide budget, Fisher-scaled (the best preset)": dict(PRESETS["best"].options),
}


def cells() -> list[tuple[str, Cell]]:
    """(label, cell) of every row, in table order."""
    rows: list[tuple[str, Cell]] = [("float32", Cell("float"))]
    rows += [(f"paper @ {t}", Cell("cmpq", {**PAPER, "bits": t})) for t in PAPER_TARGETS]
    rows += [(f"paper @ {ABLATION_TARGET}, {name}", Cell("cmpq", {**PAPER, **opts, "bits": ABLATION_TARGET}))
             for name, opts in ABLATIONS.items()]
    rows += [(f"paper @ {ABLATION_TARGET} {name}", Cell("cmpq", {**PAPER, **opts, "bits": ABLATION_TARGET}))
             for name, opts in LADDER.items()]
    return rows


def calibration() -> tuple[CalibConfig, EvalConfig]:
    """Quick calibration with float32 forwards, so the numbers do not depend on the CPU's bfloat16 support."""
    return CalibConfig(nsamples=32, seqlen=512, dtype="float32"), EvalConfig(protocol="quick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="measure only the rows whose label contains this text")
    args = parser.parse_args()
    calib, eval_config = calibration()
    chosen = [cell for label, cell in cells() if args.only is None or args.only in label]
    Store(STORE).run(chosen, MODEL, calib, eval_config)


if __name__ == "__main__":
    main()
