"""End-to-end cost of int8 look-up tables: the same saved model reads the same WikiText-2 test tokens one token at
a time (KV cache, the decode path, where the tables apply), once with exact float tables and once with int8
tables; reports both perplexities on those tokens, the mean KL divergence of the int8 run's next-token
distribution from the float-table run's, and how often their top tokens agree.

Run: `python benchmarks/int8_tables_ppl.py DIR [DIR ...] [--windows 4] [--seqlen 256]`; writes
`benchmarks/results/quality/smollm2-quick/int8_tables_ppl.{jsonl,md}`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cmpq
from cmpq.data.sources import WIKITEXT2_TEST, find_data_file, wikitext2_rows
from cmpq.formats.cmpq import use_tables
from cmpq.kernels import native

sys.path.insert(0, str(Path(__file__).parent))
from store import publish  # noqa: E402


def token_by_token_logprobs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """(len - 1, vocab) log-probabilities of each next token, feeding `window` (1, len) one token per step."""
    from transformers import DynamicCache

    cache, out = DynamicCache(), []
    with torch.inference_mode():
        for t in range(window.shape[1] - 1):
            logits = model(window[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.stack(out)


def compare(directory: str, windows: int, seqlen: int) -> dict:
    loaded = cmpq.load(directory)
    text = "\n\n".join(wikitext2_rows(find_data_file(WIKITEXT2_TEST)))
    ids = loaded.tokenizer(text[:200000], return_tensors="pt").input_ids
    chunks = [ids[:, i * seqlen:(i + 1) * seqlen] for i in range(windows)]
    logprobs, seconds = {}, {}
    for mode in ("float", "int8"):
        use_tables(loaded.model, mode)
        start = time.perf_counter()
        logprobs[mode] = [token_by_token_logprobs(loaded.model, chunk) for chunk in chunks]
        seconds[mode] = time.perf_counter() - start
    targets = torch.cat([chunk[0, 1:] for chunk in chunks])
    lp = {mode: torch.cat(parts) for mode, parts in logprobs.items()}
    nll = {mode: -lp[mode].gather(1, targets.unsqueeze(1)).mean().item() for mode in lp}
    kl = (lp["float"].exp() * (lp["float"] - lp["int8"])).sum(1).mean().item()
    agree = (lp["float"].argmax(1) == lp["int8"].argmax(1)).float().mean().item()
    quant = loaded.model.config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return {"benchmark": "int8_tables_ppl", "model": directory, "bpw": quant.get("bpw"), "windows": windows,
            "seqlen": seqlen, "tokens": int(targets.numel()), "ppl_float_tables": math.exp(nll["float"]),
            "ppl_int8_tables": math.exp(nll["int8"]), "kl_int8_vs_float": kl, "top1_agreement": agree,
            "seconds_float": seconds["float"], "seconds_int8": seconds["int8"],  # first use prepares the layers
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="directories saved by `cmpq quantize --out`")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows (default 4)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    args = parser.parse_args()
    if not native.int8_supported():
        raise SystemExit("int8 look-up tables need AVX2 or AVX-512 and the native kernels")
    records = [compare(m, args.windows, args.seqlen) for m in args.models]
    lines = [f"The same tokens read one at a time (KV cache: the decode path), float then int8 look-up tables; "
             f"the first {args.windows} WikiText-2 test windows of {args.seqlen} tokens; {records[0]['threads']} "
             f"threads. Perplexities are of these tokens, not PROTOCOL's windows.", "",
             "| model | blocks bpw | tokens | ppl, float tables | ppl, int8 tables | KL int8 vs float | same top token |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {Path(r['model']).name} | {r['bpw']:.3f} | {r['tokens']} | {r['ppl_float_tables']:.3f} | "
                     f"{r['ppl_int8_tables']:.3f} | {r['kl_int8_vs_float']:.5f} | {100 * r['top1_agreement']:.1f}% |")
    publish("int8_tables_ppl", records, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
