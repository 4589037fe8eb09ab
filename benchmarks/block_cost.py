"""Cost per block at the shapes of larger models: time and peak RSS of `cmpq quantize` (default calibration, no
distillation or evaluation) on random-weight LLaMA models with blocks shaped like LLaMA-7B's (hidden 4096, MLP
11008, 32 heads) and TinyLlama-1.1B's (hidden 2048, MLP 5632, 32 heads, 4 KV heads), so that the time and memory
of a whole model on this machine can be read off.

Each shape is quantized twice, with 1 and with 2 blocks, in its own process: the difference between the two
runs is what one more block costs, in seconds and in peak RSS; what is left of the 1-block run is the fixed
cost (loading, the embeddings and head, the calibration activations). The vocabulary is smollm2's (its
tokenizer turns the calibration text into ids).

Writes benchmarks/results/cost/<machine>/block_cost.jsonl and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from store import machine_slug, publish  # noqa: E402

SHAPES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
    "1.1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
}
# the per-block stages of the block-by-block passes (the rest is paid once per model)
MODEL_STAGES = ("load model", "calibration data", "gradient pass", "save", "other")


def random_model(shape: dict, blocks: int, directory: Path) -> Path:
    """A LLaMA model of `shape` with `blocks` blocks and random weights, saved as safetensors with smollm2's
    tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cmpq.models.load import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=blocks, max_position_embeddings=4096,
                         tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def quantize_run(model: Path, work: Path, timeout: float, extra: list[str]) -> dict:
    record_path = work / f"run-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "cmpq", "quantize", "--model", str(model), "--bits", "3", "--eval", "none",
               "--distill", "0", "--json", str(record_path), "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = json.loads(record_path.read_text().splitlines()[-1])
    return {"wall_seconds": wall, "peak_rss_mb": record["peak_rss_mb"], "stages": record["stages"],
            "calibration": {k: record["calibration"].get(k) for k in ("nsamples", "seqlen", "resolved_dtype")},
            "threads": record["threads"], "git_commit": record["git_commit"], "machine": record["machine"],
            "time": record["time"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is stopped")
    parser.add_argument("--flags", default="", help="more `cmpq quantize` flags, e.g. '--nsamples 16'")
    args = parser.parse_args()
    records = []
    for name in args.shapes.split(","):
        runs = {}
        for blocks in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                model = random_model(SHAPES[name], blocks, Path(tmp) / "model")
                runs[str(blocks)] = quantize_run(model, Path(tmp), args.timeout, args.flags.split())
            run = runs[str(blocks)]
            print(f"{name}, {blocks} block(s): {run['wall_seconds']:.0f} s, {run['peak_rss_mb']:.0f} MB", flush=True)
        one, two = runs["1"], runs["2"]
        per_block = {stage: two["stages"].get(stage, 0.0) - one["stages"].get(stage, 0.0)
                     for stage in two["stages"] if stage not in MODEL_STAGES}
        records.append({"benchmark": "block_cost", "shape": name, **SHAPES[name], "runs": runs,
                        "seconds_per_block": two["wall_seconds"] - one["wall_seconds"],
                        "rss_mb_per_block": two["peak_rss_mb"] - one["peak_rss_mb"],
                        "stages_per_block": per_block, "threads": two["threads"],
                        "git_commit": two["git_commit"], "machine": two["machine"]})
    publish("block_cost", records, markdown(records), group=f"cost/{machine_slug()}")


def markdown(records: list[dict]) -> str:
    lines = ["| block shape | 1 block: s | 2 blocks: s | s per block | 1 block: peak RSS, GB | 2 blocks: peak RSS, GB "
             "| GB per block | largest per-block stages |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        one, two = r["runs"]["1"], r["runs"]["2"]
        top = sorted(r["stages_per_block"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {r['shape']} (hidden {r['hidden_size']}, MLP {r['intermediate_size']}) | "
                     f"{one['wall_seconds']:.0f} | {two['wall_seconds']:.0f} | {r['seconds_per_block']:.0f} | "
                     f"{one['peak_rss_mb'] / 1024:.2f} | {two['peak_rss_mb'] / 1024:.2f} | "
                     f"{r['rss_mb_per_block'] / 1024:.2f} | " + ", ".join(f"{k} {v:.0f} s" for k, v in top) + " |")
    calib = records[0]["runs"]["2"]["calibration"]
    return ("\n".join(lines) + f"\n\n`cmpq quantize --bits 3 --eval none --distill 0` on random-weight LLaMA models "
            f"of 1 and 2 blocks, calibration {calib['nsamples']} x {calib['seqlen']} tokens in "
            f"{calib['resolved_dtype']}; per block: the 2-block run less the 1-block run.\n")


if __name__ == "__main__":
    main()
