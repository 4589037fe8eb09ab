"""What would int8 look-up tables cost in accuracy? Layer by layer, on a saved CMPQ model and real activations.

The batch-1 LUT-GEMV builds, per token, tables T_j[c] = C_j[c] * x_j. `experiments/int8_tables.c`
shows that tables rounded to int8 (one scale per block of stored columns of one width: the block's largest
|T| / 127) run the loop about 2x faster. This script applies the kernel's definition (`native.int8_reference`:
columns of up to 4 bits, blocks of 32, wider columns exact) to the inputs each linear
layer sees when the saved model reads the first tokens of WikiText-2 test, and reports per layer:

  int8 err  ||y_int8 - y|| / ||y||   the rounding's error against the exact packed layer y
  quant err ||y - y_float|| / ||y_float||   the quantization's own error against the float model's layer

Run: `python benchmarks/int8_tables_error.py runs/smollm2-3bit [--tokens 64]`; writes
`benchmarks/results/quality/smollm2-quick/int8_tables_error.{jsonl,md}`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import cmpq
from cmpq.data.sources import WIKITEXT2_TEST, find_data_file, wikitext2_rows
from cmpq.formats.cmpq import CMPQLinear
from cmpq.kernels import native
from cmpq.models.load import load_model

sys.path.insert(0, str(Path(__file__).parent))
from store import publish  # noqa: E402


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input of every CMPQLinear on one forward of `ids` (tokens, in) float32."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:  # returns None: a value would replace the layer's output
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    hooks = [module.register_forward_hook(keep(name))
             for name, module in model.named_modules() if isinstance(module, CMPQLinear)]
    with torch.inference_mode():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="directory saved by `cmpq quantize --out`")
    parser.add_argument("--float-model", default="smollm2-135m", help="the float model it was quantized from")
    parser.add_argument("--tokens", type=int, default=64, help="WikiText-2 test tokens read (default 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = cmpq.load(args.model)
    reference = load_model(args.float_model)
    text = "\n\n".join(wikitext2_rows(find_data_file(WIKITEXT2_TEST)))
    ids = loaded.tokenizer(text[:20000], return_tensors="pt").input_ids[:, : args.tokens]
    inputs = layer_inputs(loaded.model, ids)
    float_modules = dict(reference.model.named_modules())
    rows = []
    with torch.inference_mode():
        for name, module in loaded.model.named_modules():
            if not isinstance(module, CMPQLinear):
                continue
            x = inputs[name]
            exact = module.quantized_weight().dequantize()
            y = x @ exact.T + (0 if module.bias is None else module.bias.float())
            y8 = native.int8_reference(module.prepare_native(), x, module.bias)
            row = {"layer": name, "shape": list(exact.shape),
                   "int8_err": ((y8 - y).norm() / y.norm()).item()}
            if name in float_modules and hasattr(float_modules[name], "weight"):
                yf = torch.nn.functional.linear(x, float_modules[name].weight.float(), float_modules[name].bias)
                row["quant_err"] = ((y - yf).norm() / yf.norm()).item()
            rows.append(row)
            print(f"{name:40s} int8 err {row['int8_err']:.5f}  quant err {row.get('quant_err', float('nan')):.5f}")
    ratio = [r["int8_err"] / r["quant_err"] for r in rows if r.get("quant_err")]
    summary = (f"{args.model}, {ids.shape[1]} WikiText-2 test tokens, int8 scale per {native.INT8_BLOCK} stored columns of "
               f"one width (columns up to {native.INT8_MAX_WIDTH} bits): int8 err median {statistics.median(r['int8_err'] for r in rows):.5f}, "
               f"max {max(r['int8_err'] for r in rows):.5f}; int8 err / quant err median {statistics.median(ratio):.4f}, "
               f"max {max(ratio):.4f} over {len(rows)} layers")
    worst = sorted(rows, key=lambda r: -r["int8_err"])[:10]
    lines = [summary, "", "| layer (10 largest int8 err) | shape | int8 err | quant err |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['int8_err']:.5f} | {r.get('quant_err', float('nan')):.5f} |"
              for r in worst]
    records = [{"benchmark": "int8_tables_error", "model": args.model, "tokens": int(ids.shape[1]),
                "block": native.INT8_BLOCK, **row} for row in rows]
    publish("int8_tables_error", records, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
