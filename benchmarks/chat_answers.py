"""Answers in numbers: the first ARC-Easy test questions asked as chat prompts (no answer choices; `--prompts
arc-chat`, the default), or the openings of C4 evaluation documents continued as plain text (`--prompts c4-plain`,
what `cmpq generate --prompt` does without --chat); greedy answers from the float model and from saved quantized
models, scored by `cmpq.eval.chat_answers` (repeated 4-grams, answers that end, perplexity of the float model's
answers under each model and of each model's answers under the float model).

Usage: python benchmarks/chat_answers.py [--prompts arc-chat|c4-plain] MODEL [MODEL ...] (directories saved by
`cmpq quantize --out`; the float smollm2-135m is always the reference). Writes
benchmarks/results/quality/smollm2-quick/chat_answers.* (arc-chat) or plain_continuations.* (c4-plain): a .jsonl
(a model's row replaces its earlier one) and a .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from samples import describe  # noqa: E402
from store import QUALITY, publish  # noqa: E402

from cmpq.data.sources import c4_eval_docs  # noqa: E402
from cmpq.eval.chat_answers import chat_prompts, greedy_answers, plain_prompts, score_answers  # noqa: E402
from cmpq.eval.records import read_records  # noqa: E402
from cmpq.eval.task_data import load_task_docs  # noqa: E402
from cmpq.models.load import load_model  # noqa: E402

REFERENCE = "smollm2-135m"
PLAIN_PROMPT_TOKENS = 16  # the opening of each document that the models continue
RESULT_NAMES = {"arc-chat": "chat_answers", "c4-plain": "plain_continuations"}


def calibration_of(path: str) -> str:
    """The calibration source and size a saved model records (its config's quantization_config)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return "-"
    calib = json.loads(config.read_text()).get("quantization_config", {}).get("calibration")
    if not calib:
        return "not recorded"
    return f"{Path(calib['source']).name}, {calib['nsamples']} x {calib['seqlen']}"


def render(rows: list[dict], prompt_set: str) -> str:
    first = rows[0]
    what = (f"The first {first['prompts']} ARC-Easy test questions as chat prompts" if prompt_set == "arc-chat" else
            f"The first {PLAIN_PROMPT_TOKENS} tokens of C4 evaluation documents 0..{first['prompts'] - 1} as plain "
            f"prompts")
    lines = [f"{what}, greedy answers of up to {first['max_new_tokens']} tokens. Lower is better for all but "
             f"\"ended\".", "",
             "| model | calibration | repeated 4-grams | ended | ppl of float's answers | float's ppl of its answers "
             "| mean tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['calibration']} | {r['repeat4']:.3f} | {r['ended']:.2f} | "
                     f"{r['teacher_ppl']:.2f} | {r['judge_ppl']:.2f} | {r['mean_tokens']:.1f} |")
    flag = "" if prompt_set == "arc-chat" else " --prompts c4-plain"
    lines += ["", f"Command: `python benchmarks/chat_answers.py{flag} MODEL ...`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="directories saved by cmpq quantize --out")
    parser.add_argument("--prompts", choices=sorted(RESULT_NAMES), default="arc-chat",
                        help="ARC-Easy questions as chat prompts, or openings of C4 evaluation documents continued "
                             "as plain text (default: arc-chat)")
    parser.add_argument("--questions", type=int, default=32, help="how many prompts (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = load_model(REFERENCE)
    if args.prompts == "arc-chat":
        prompts = chat_prompts(reference, [doc["question"] for doc in load_task_docs("arc_easy")[:args.questions]])
    else:
        prompts = plain_prompts(reference, c4_eval_docs()[0][:args.questions], PLAIN_PROMPT_TOKENS)
    answers = greedy_answers(reference, prompts, args.max_new_tokens)
    new = []
    for path in tqdm([REFERENCE, *args.models], desc="models"):
        model = reference if path == REFERENCE else load_model(path)
        scores = score_answers(model, reference, prompts, answers, args.max_new_tokens)
        new.append({"model": path, "description": describe(path), "calibration": calibration_of(path),
                    **scores.as_dict()})
    name = RESULT_NAMES[args.prompts]
    jsonl = QUALITY / f"{name}.jsonl"
    stored = read_records(jsonl) if jsonl.exists() else []
    if any(r["prompts"] != args.questions or r["max_new_tokens"] != args.max_new_tokens for r in stored):
        stored = []  # another prompt set: the old rows do not compare
    measured = {r["model"] for r in new}
    rows = [r for r in stored if r["model"] not in measured] + new
    order = list(dict.fromkeys([r["model"] for r in stored] + [r["model"] for r in new]))
    rows = sorted(rows, key=lambda r: order.index(r["model"]))
    publish(name, rows, render(rows, args.prompts))


if __name__ == "__main__":
    main()
