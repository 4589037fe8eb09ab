"""Text samples: the same chat prompts answered by the float model and by saved quantized models, greedy and with
CTRL's repetition penalty, through `cmpq.generate` (the loop `cmpq generate` runs), so fluency can be read side by
side, with each model's decode tokens/s.

Usage: python benchmarks/samples.py MODEL [MODEL ...] (smollm2-135m or directories saved by `cmpq quantize
--out`). Writes benchmarks/results/quality/smollm2-quick/samples.jsonl (a model's rows replace its earlier ones) and
samples.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import QUALITY, publish  # noqa: E402

from cmpq.eval.records import read_records  # noqa: E402
from cmpq.generate import generate  # noqa: E402
from cmpq.models.load import load_model  # noqa: E402

PROMPTS = ("Write two sentences about the ocean.", "What is the capital of France?",
           "Give me three tips for staying healthy.")
PENALTIES = (1.0, 1.2)


def _distilled(distill: dict) -> str:
    """'distill 3 ep' plus the token cap when the run set one (`--distill-tokens`)."""
    cap = f", {distill['tokens']} tokens" if distill.get("tokens") else ""
    return f"distill {distill['epochs']} ep{cap}"


def describe(path: str) -> str:
    """The model's name with its honest bpw and how its values were trained, from a saved config."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return f"{path} (float)"
    quant = json.loads(config.read_text())["quantization_config"]
    method = quant.get("config") or {}
    extras = ["model-wide Fisher-scaled budget" if (method.get("allocation_scope"), method.get("scope_error"))
              == ("model", "fisher") else "",
              f"finetune {quant['finetune']['epochs']} ep" if quant.get("finetune") else "",
              _distilled(quant["distill"]) if quant.get("distill") else "",
              f"head {quant['head']['bpw']:.2f} bpw" if quant.get("head") else "",
              f"{quant['calibration']['source']} calibration"
              if (quant.get("calibration") or {}).get("source", "c4") != "c4" else ""]
    return f"{Path(path).name} ({quant['bpw']:.3f} bpw{''.join(', ' + e for e in extras if e)})"


def sample(path: str, max_new_tokens: int) -> list[dict]:
    loaded = load_model(path)
    rows = []
    for prompt in PROMPTS:
        for penalty in PENALTIES:
            g = generate(loaded, prompt, max_new_tokens=max_new_tokens, chat=True, repetition_penalty=penalty)
            rows.append({"model": path, "description": describe(path), "prompt": prompt, "repetition_penalty": penalty,
                         "text": g.text, "new_tokens": g.new_tokens,
                         "tokens_per_s": (g.new_tokens - 1) / g.decode_seconds if g.decode_seconds > 0 else None})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["Chat prompts, greedy decoding (`cmpq generate --chat`), without and with `--repetition-penalty 1.2`.", ""]
    for prompt in PROMPTS:
        lines += [f"**{prompt}**", "", "| model | penalty | text |", "|---|---|---|"]
        for r in rows:
            if r["prompt"] == prompt:
                text = r["text"].replace("\n", " ").replace("|", "\\|").strip()
                lines.append(f"| {r['description']} | {r['repetition_penalty']:g} | {text} |")
        lines.append("")
    lines.append("Command: `python benchmarks/samples.py MODEL ...`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="smollm2-135m or directories saved by cmpq quantize --out")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    jsonl = QUALITY / "samples.jsonl"
    stored = read_records(jsonl) if jsonl.exists() else []
    new = [row for model in args.models for row in sample(model, args.max_new_tokens)]
    order = list(dict.fromkeys([r["model"] for r in stored] + args.models))  # a re-measured model keeps its place
    rows = {model: [r for r in stored if r["model"] == model] for model in order}
    rows.update({model: [r for r in new if r["model"] == model] for model in args.models})
    stored = [r for model in order for r in rows[model]]
    publish("samples", stored, render(stored))


if __name__ == "__main__":
    main()
