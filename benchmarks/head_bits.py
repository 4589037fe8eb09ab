"""What quantizing the output head costs in perplexity, alone: smollm2-135m with float blocks and only lm_head
quantized (`--quantize-head BITS`: CMPQ's best setting), per head width, WikiText-2 quick protocol, calibration
C4 32 x 512. Writes benchmarks/results/quality/smollm2-quick/head_bits.jsonl (one line per width, replaced) and
head_bits.md.

    python benchmarks/head_bits.py --bits 4,5,6,8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cmpq.calibration.capture import capture_block_inputs, run_block
from cmpq.calibration.precision import resolve_dtype
from cmpq.config import CalibConfig, EvalConfig
from cmpq.data.sampling import calibration_windows
from cmpq.eval.records import environment
from cmpq.head import head_quantizer, quantize_head
from cmpq.models.load import load_model
from cmpq.workflow import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from store import QUALITY  # noqa: E402


def final_hidden(loaded, windows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float blocks' outputs over the calibration windows (the head's input before the final norm)."""
    blocks = loaded.arch.blocks(loaded.model)
    inputs = capture_block_inputs(loaded.model, blocks[0], windows, dtype)
    hidden, spare = inputs.hidden, torch.empty_like(inputs.hidden)
    for block in blocks:
        run_block(block, inputs, hidden, spare)
        hidden, spare = spare, hidden
    return hidden


def measure(bits: float, calib: CalibConfig) -> dict:
    loaded = load_model("smollm2-135m")
    dtype = resolve_dtype(calib.dtype)
    windows, _ = calibration_windows(loaded.tokenizer, calib)
    start = time.perf_counter()
    hidden = final_hidden(loaded, windows, dtype)
    name, qw = quantize_head(loaded.model, loaded.arch.final_modules(loaded.model), head_quantizer(bits), hidden,
                             dtype)
    seconds = time.perf_counter() - start
    ppl = evaluate(loaded, EvalConfig(datasets=("wikitext2",), protocol="quick"), progress=False)
    widths, counts = torch.unique(qw.column_widths(), return_counts=True)
    return {"benchmark": "head_bits", "head_bits": bits, "head_bpw": qw.storage().bpw, "head_seconds": seconds,
            "wikitext2": ppl["wikitext2"]["ppl"], "widths": {str(int(w)): int(c) for w, c in zip(widths, counts)},
            "calib_dtype": str(dtype).removeprefix("torch."), **environment()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,5,6,8", help="head widths to measure (default: %(default)s)")
    parser.add_argument("--calib-dtype", default="auto")
    args = parser.parse_args()
    calib = CalibConfig(nsamples=32, seqlen=512, dtype=args.calib_dtype)
    records = []
    for bits in [float(b) for b in args.bits.split(",")]:
        records.append(measure(bits, calib))
        print(json.dumps({k: records[-1][k] for k in ("head_bits", "head_bpw", "head_seconds", "wikitext2")}),
              flush=True)
    QUALITY.mkdir(parents=True, exist_ok=True)
    (QUALITY / "head_bits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = ["Only lm_head quantized (float blocks), WikiText-2 quick; calibration C4 32 x 512, "
             f"{records[0]['calib_dtype']} forwards; {records[0]['threads']} threads.", "",
             "| head bits | head bpw | WikiText-2 | s (float block forwards + head) | widths (columns) |", "|---|---|---|---|---|"]
    for r in records:
        widths = ", ".join(f"{w}: {c}" for w, c in r["widths"].items())
        lines.append(f"| {r['head_bits']:g} | {r['head_bpw']:.3f} | {r['wikitext2']:.2f} | {r['head_seconds']:.0f} | "
                     f"{widths} |")
    (QUALITY / "head_bits.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
