"""Perplexity of llama.cpp's quantization types on smollm2-135m, by PROTOCOL, for the same plots as our methods.

Steps (each skipped when its output is already there, so an interrupted run continues where it stopped):
  1. build llama.cpp (the source vendored in the llama-cpp-python==0.3.36 sdist; `llamacpp.py`) into a cache
     outside the checkout: `~/.cache/cmpq/llama.cpp-0.3.36`, or $CMPQ_LLAMACPP_CACHE, or --cache DIR;
  2. make one GGUF per type with `llama-quantize --allow-requantize` from the shipped Q4_1 file (the GGUFs go
     into the cache too). No importance matrix: the IQ types (IQ2_XS, IQ3_XXS, IQ4_XS...) need one to give
     sane results, so they are left out, and so are the K-quants' imatrix variants;
  3. read the GGUF with `gguf.GGUFReader`: honest bpw = bytes of the tensors of the blocks' linear layers
     (attn_q/k/v/output, ffn_gate/up/down of every block) * 8 / their number of weights, the ggml types those
     tensors actually got (smollm2's rows of 576 are not a multiple of 256, so llama.cpp falls back from the
     K-quants to 32-block types for every layer but ffn_down), the file size and the type of token_embd
     (the model's tied output head: llama.cpp quantizes it, our methods keep it in 16-bit);
  4. load the GGUF with transformers (dequantized to float32) and its own tokenizer, and measure perplexity
     with cmpq's code (`cmpq.workflow.evaluate`, PROTOCOL's quick protocol by default);
  5. append one JSON record per type to benchmarks/results/quality/smollm2-<protocol>/llamacpp.jsonl
     (atomically; types already recorded are skipped).

The shipped Q4_1 file itself is evaluated the same way first, as the `float` reference (record with method
"float", setting "Q4_1-shipped"): under the quick protocol it must give PROTOCOL's WikiText-2 20.71 and C4
33.39, else the run stops (a protocol bug).

  python benchmarks/llamacpp_quality.py                      # all types
  python benchmarks/llamacpp_quality.py --types Q4_0,Q8_0    # a subset
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp

RESULTS = Path(__file__).parent / "results" / "quality"
TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
REFERENCE = "Q4_1-shipped"   # setting of the float reference record
MODEL = "smollm2-135m"
# PROTOCOL's float reference, quick protocol, float32 (a different result means a protocol bug)
EXPECTED_QUICK = {"wikitext2": 20.71, "c4": 33.39}
BLOCK_LINEAR = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


class Failure(Exception):
    """A one-line error for the user."""


def gguf_stats(path: Path) -> dict[str, Any]:
    """Storage of a GGUF's tensors as stored: the blocks' linear layers (honest bpw, ggml types) and the rest."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    linear_bytes = linear_weights = layers = 0
    types: Counter[str] = Counter()
    per_kind: dict[str, Counter[str]] = {}
    other: dict[str, dict[str, Any]] = {}
    other_bytes = 0
    for tensor in reader.tensors:
        match = BLOCK_LINEAR.match(tensor.name)
        nbytes, nweights, kind = int(tensor.n_bytes), int(tensor.n_elements), tensor.tensor_type.name
        if match:
            layers += 1
            linear_bytes += nbytes
            linear_weights += nweights
            types[kind] += 1
            per_kind.setdefault(match.group(2), Counter())[kind] += 1
        else:
            other_bytes += nbytes
            if not tensor.name.startswith("blk."):  # token_embd, output_norm, output (when not tied)
                other[tensor.name] = {"type": kind, "bytes": nbytes, "weights": nweights}
    if layers == 0:
        raise Failure(f"{path}: no tensors of the blocks' linear layers (blk.N.attn_q.weight ...) found")
    return {
        "bpw": linear_bytes * 8 / linear_weights,
        "tensor_types": dict(sorted(types.items())),
        "tensor_types_by_layer": {k: dict(sorted(v.items())) for k, v in sorted(per_kind.items())},
        "quantized_layers": layers,
        "quantized_weights": linear_weights,
        "quantized_bytes": linear_bytes,
        "token_embd_type": other.get("token_embd.weight", {}).get("type"),
        "output_type": other["output.weight"]["type"] if "output.weight" in other else "tied to token_embd",
        "other_tensors": other,           # outside the blocks, as stored
        "other_bytes": other_bytes,       # every tensor not a block linear (norms included), as stored
        "file_bytes": path.stat().st_size,
    }


def load_gguf(path: Path, spec: str):
    """The GGUF dequantized to float32 by transformers, with its own tokenizer, as a cmpq LoadedModel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmpq.models.arch import find_arch
    from cmpq.models.load import LoadedModel

    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, arch=find_arch(model), spec=spec, source=str(path))


def measure(path: Path, eval_config, progress: bool) -> tuple[dict[str, Any], dict[str, float]]:
    from cmpq import workflow

    start = time.perf_counter()
    loaded = load_gguf(path, MODEL)
    load_seconds = time.perf_counter() - start
    ppl, eval_seconds = workflow.timed(workflow.evaluate, loaded, eval_config, progress)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    del loaded
    gc.collect()
    return ppl, {"load_seconds": round(load_seconds, 2), "eval_seconds": round(eval_seconds, 2), "dtype": dtype}


def record_key(record: dict[str, Any]) -> tuple:
    return record.get("method"), record.get("setting"), record.get("protocol"), record.get("base_sha256")


def summary(records: list[dict[str, Any]]) -> str:
    rows = ["| type | honest bpw | block-linear tensor types | token_embd | WikiText-2 | C4 | file bytes |",
            "|---|---:|---|---|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["method"] != "float", r["bpw"] or 0)):
        types = ", ".join(f"{k} x{v}" for k, v in r["tensor_types"].items())
        name = f"{r['setting']} (float ref.)" if r["method"] == "float" else r["setting"]
        bpw = f"{r['bpw']:.3f}" if r["bpw"] is not None else f"({r['stored_bpw']:.3f})"
        rows.append(f"| {name} | {bpw} | {types} | {r['token_embd_type']} | {r['ppl']['wikitext2']['ppl']:.2f} "
                    f"| {r['ppl']['c4']['ppl']:.2f} | {r['file_bytes']:,} |")
    return "\n".join(rows)


def parse_types(text: str) -> list[str]:
    types = [t.strip().upper() for t in text.replace(" ", ",").split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        hint = " (IQ types need an importance matrix: not supported here)" if any(t.startswith("IQ") for t in unknown) \
            else ""
        raise argparse.ArgumentTypeError(f"unknown type(s) {', '.join(unknown)}{hint}; choose from {', '.join(TYPES)}")
    return types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Builds llama.cpp once, quantizes the shipped Q4_1 GGUF to each "
        "type with llama-quantize, and records honest bpw (block linears only) and perplexity measured by cmpq.",
        epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", type=parse_types, default=list(TYPES),
                        help=f"comma-separated subset of {','.join(TYPES)} (default: all)")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"llama.cpp build and GGUF cache (default: ${llamacpp.CACHE_ENV} or "
                             f"~/.cache/cmpq/llama.cpp-{llamacpp.VERSION})")
    parser.add_argument("--protocol", choices=("quick", "full"), default="quick",
                        help="PROTOCOL's perplexity protocol (default quick: the first 16 windows of 2048)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/quality/smollm2-<protocol>/llamacpp.jsonl)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the build (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for llama-quantize and torch (default: torch's default)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the float reference (the shipped Q4_1 file) and its check against PROTOCOL")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (Failure, llamacpp.LlamaCppError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the records written so far are kept; run again to continue", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    try:
        import gguf  # noqa: F401
        import torch

        from cmpq.config import EvalConfig
        from cmpq.errors import CmpqError
        from cmpq.eval.records import (
            append_record,
            check_writable,
            environment,
            peak_rss_mb,
            read_records,
        )
        from cmpq.models.load import bundled_smollm2_path
    except ImportError as exc:
        raise Failure(f"{exc} (run from the project's venv: .venv/bin/python benchmarks/llamacpp_quality.py)") \
            from exc

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    out = args.out or RESULTS / f"smollm2-{args.protocol}" / "llamacpp.jsonl"
    try:
        check_writable(out)
        source = bundled_smollm2_path()
    except CmpqError as exc:
        raise Failure(str(exc)) from exc
    cache = (args.cache.expanduser() if args.cache else llamacpp.default_cache()).resolve()
    eval_config = EvalConfig(protocol=args.protocol)
    progress = not args.no_progress
    if not progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bars too

    base_sha = llamacpp.sha256(source)
    done = {record_key(r) for r in (read_records(out) if out.exists() else [])}
    todo = ([] if args.no_reference else [REFERENCE]) + list(args.types)
    key_of = {t: ("float" if t == REFERENCE else "llama.cpp", t, args.protocol, base_sha) for t in todo}
    pending = [t for t in todo if key_of[t] not in done]
    print(f"results: {out} ({len(todo) - len(pending)} of {len(todo)} already recorded)", flush=True)
    print(f"source: {source} (sha256 {base_sha[:16]}...)", flush=True)

    timings: dict[str, float] = {}
    if any(t != REFERENCE for t in pending):
        start = time.perf_counter()
        llamacpp.ensure_built(cache, llamacpp.DEFAULT_TARGETS, jobs=args.jobs)
        timings["build (or cache check)"] = time.perf_counter() - start
    version = llamacpp.version_info(cache) if llamacpp.llama_cpp_dir(cache).is_dir() else \
        {"sdist": f"llama-cpp-python=={llamacpp.VERSION}", "commit": None}
    build = llamacpp.build_info(cache)

    for number, qtype in enumerate(pending, start=1):
        print(f"\n[{number}/{len(pending)}] {qtype}", flush=True)
        if qtype == REFERENCE:
            path, quant = source, None
        else:
            start = time.perf_counter()
            path, quant = llamacpp.quantize(cache, source, qtype, threads=threads)
            timings[f"{qtype} quantize"] = time.perf_counter() - start
        stats = gguf_stats(path)
        print(f"  honest bpw {stats['bpw']:.4f} over {stats['quantized_layers']} block linears "
              f"({stats['quantized_weights']:,} weights); types {stats['tensor_types']}; "
              f"token_embd {stats['token_embd_type']}; file {stats['file_bytes']:,} bytes", flush=True)
        try:
            ppl, seconds = measure(path, eval_config, progress)
        except CmpqError as exc:
            raise Failure(str(exc)) from exc
        timings[f"{qtype} load + eval"] = seconds["load_seconds"] + seconds["eval_seconds"]
        print("  " + ", ".join(f"{name} {v['ppl']:.3f} ({v['windows']} windows, {v['tokens']} tokens)"
                               for name, v in ppl.items())
              + f"; load {seconds['load_seconds']:.0f} s, eval {seconds['eval_seconds']:.0f} s", flush=True)
        if qtype == REFERENCE and args.protocol == "quick" and eval_config.seqlen == 2048:
            off = {name: (ppl[name]["ppl"], want) for name, want in EXPECTED_QUICK.items()
                   if name in ppl and abs(ppl[name]["ppl"] - want) > 0.01}
            if off:
                raise Failure("float reference disagrees with PROTOCOL (a protocol bug): " + ", ".join(
                    f"{name} {got:.3f} vs {want}" for name, (got, want) in off.items()))
            print("  float reference matches PROTOCOL (WikiText-2 20.71, C4 33.39)", flush=True)
        reference = qtype == REFERENCE
        record = {
            "benchmark": "llamacpp_quality",
            "model": MODEL,
            "model_source": str(path),
            "method": "float" if reference else "llama.cpp",
            "setting": qtype,
            "base_model": MODEL,
            "base_source": str(source),
            "base_sha256": base_sha,
            "dtype": seconds["dtype"],  # what transformers dequantized the GGUF to for the evaluation
            # the float reference has no quantization of its own: its stored Q4_1 bpw is under stored_bpw
            "bpw": None if reference else stats["bpw"],
            "stored_bpw": stats["bpw"],
            "code_bpw": None,  # ggml blocks interleave codes and scales; only the honest total is meaningful
            **{k: v for k, v in stats.items() if k != "bpw"},
            "protocol": args.protocol,
            "ppl": ppl,
            "quantize": None if reference else {k: v for k, v in quant.items() if k != "cached"},
            "quant_seconds": None if reference else quant.get("seconds"),
            "load_seconds": seconds["load_seconds"],
            "eval_seconds": seconds["eval_seconds"],
            "peak_rss_mb": peak_rss_mb(),
            "llama_cpp_version": version,
            "llama_cpp_build": None if reference else {"cmake_options": build.get("cmake_options"),
                                                      "cpu": build.get("cpu"), "compiler": build.get("compiler")},
            **environment(),
        }
        append_record(out, record)
        print(f"  recorded in {out}", flush=True)

    if timings:
        print("\ntimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    records = [r for r in read_records(out) if r.get("protocol") == args.protocol
               and r.get("base_sha256") == base_sha and r.get("benchmark") == "llamacpp_quality"]
    print(f"\n{args.protocol} protocol, {MODEL} (honest bpw of the 210 block linears; the float reference's "
          f"stored Q4_1 bpw in parentheses)\n")
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
