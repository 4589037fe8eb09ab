"""RTN baseline on smollm2-135m: honest bpw and perplexity (quick protocol) beside the float reference.

Writes one PROTOCOL record per configuration to benchmarks/results/rtn_baseline.jsonl (replacing the file)
and a Markdown table to benchmarks/results/rtn_baseline.md. Loads the model once and restores the float
weights between configurations.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from cmpq.config import CalibConfig, EvalConfig
from cmpq.eval.records import append_record, read_records
from cmpq.models.load import load_model
from cmpq.quantizers import get_quantizer
from cmpq import workflow

RESULTS = Path(__file__).parent / "results"
# (bits, group size); never 4-bit g32, which reproduces the model's own Q4_1 grid (PROTOCOL).
CONFIGS = [(8, None), (4, None), (4, 128), (3, None), (3, 128), (2, 128)]


def render(records: list[dict], protocol: str) -> str:
    lines = [f"RTN on smollm2-135m, perplexity protocol `{protocol}` (16 windows x 2048 tokens = 32,752 predicted "
             "tokens per dataset).", "",
             "| method | bits | group | honest bpw | code bpw | WikiText-2 | C4 | quant s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ppl = r["ppl"]
        if r["method"] == "float":
            lines.append(f"| float32 | 32 | - | - | - | {ppl['wikitext2']['ppl']:.2f} | {ppl['c4']['ppl']:.2f} | - | "
                         f"{r['peak_rss_mb']:.0f} |")
            continue
        group = r["config"]["group_size"] or "per-channel"
        lines.append(f"| rtn | {r['config']['bits']} | {group} | {r['bpw']:.3f} | {r['code_bpw']:.3f} | "
                     f"{ppl['wikitext2']['ppl']:.2f} | {ppl['c4']['ppl']:.2f} | {r['quant_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    commit = records[-1].get("git_commit") if records else None
    lines += ["", f"Threads: {records[-1]['threads'] if records else '?'}; commit {commit}. "
              "Command: `python benchmarks/rtn_baseline.py`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", default=str(RESULTS / "rtn_baseline.jsonl"))
    args = parser.parse_args()
    out = Path(args.out)
    tmp = out.with_suffix(".partial.jsonl")
    tmp.unlink(missing_ok=True)
    loaded = load_model("smollm2-135m")
    eval_config = EvalConfig(protocol=args.protocol)
    ppl, seconds = workflow.timed(workflow.evaluate, loaded, eval_config)
    append_record(tmp, workflow.float_record(loaded, ppl, args.protocol, seconds))
    originals = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    for bits, group in CONFIGS:
        quantizer = get_quantizer("rtn", bits=bits, group_size=group)
        result, calib = workflow.quantize(loaded, quantizer, CalibConfig())
        ppl = workflow.evaluate(loaded, eval_config)
        append_record(tmp, workflow.quantization_record(loaded, quantizer, result, calib, ppl, args.protocol))
        with torch.no_grad():
            for name, p in loaded.model.named_parameters():
                p.copy_(originals[name])
    os.replace(tmp, out)
    markdown = render(read_records(out), args.protocol)
    out.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
