"""`cmpq bench decode`: end-to-end decode tokens/s of packed models against the float model, with the same
generation loop (`cmpq.generate.generate_ids`: static KV cache, greedy) and the same prompt, in one process,
plus a profile of one decode step saying where the time goes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cmpq.generate import generate_ids
from cmpq.models.load import load_model
from cmpq.models.loaded import LoadedModel

PROMPT = "The history of the city begins with"


def interleaved_speeds(models: list[LoadedModel], new_tokens: int, repeats: int) -> list[dict]:
    """Decode tokens/s of each model, measured in rounds: each round generates `new_tokens` once with every model
    in turn (after one warm-up each), so that a drift of the machine's speed (this VM's moves by tens of percent
    within minutes) falls on all models alike. `speedup` is the median over rounds of each round's ratio to the
    first model, `tokens_per_second` the median over rounds."""
    prompts = [loaded.tokenizer(PROMPT, return_tensors="pt").input_ids for loaded in models]
    for loaded, ids in zip(models, prompts):
        generate_ids(loaded.model, ids, 4, engine=loaded.engine)
    speeds = [[] for _ in models]
    prefill = [[] for _ in models]
    last = [None] * len(models)
    for _ in range(repeats):
        for i, (loaded, ids) in enumerate(zip(models, prompts)):
            tokens, prefill_s, decode_s = generate_ids(loaded.model, ids, new_tokens, engine=loaded.engine)
            speeds[i].append((tokens.numel() - 1) / decode_s)
            prefill[i].append(prefill_s)
            last[i] = tokens
    results = []
    for i, loaded in enumerate(models):
        ratios = [mine / first for mine, first in zip(speeds[i], speeds[0])]
        results.append({"tokens_per_second": statistics.median(speeds[i]), "speedup": statistics.median(ratios),
                        "prefill_seconds": statistics.median(prefill[i]), "prompt_tokens": prompts[i].shape[1],
                        "new_tokens": new_tokens, "rounds": repeats,
                        "text": loaded.tokenizer.decode(last[i], skip_special_tokens=True)})
    return results


def profile_step(loaded: LoadedModel, top: int = 8) -> list[dict]:
    """Self time per operator over 8 decode steps (torch.profiler), largest first. Quantized layers show as
    `cmpq_linear` (their kernels run outside torch, so the profiler would not see them otherwise); `decode` is
    what is left: Python and transformers' own work between operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from cmpq.formats.base import PackedLinear

    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    hooks = []
    for module in loaded.model.modules():
        if isinstance(module, PackedLinear):
            hooks.append(module.register_forward_pre_hook(_enter))
            hooks.append(module.register_forward_hook(_exit))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("decode"):
                generate_ids(loaded.model, ids, 9)
    finally:
        for hook in hooks:
            hook.remove()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:top]]


_SPANS: list = []


def _enter(module, args) -> None:
    from torch.profiler import record_function

    span = record_function("cmpq_linear")
    span.__enter__()
    _SPANS.append(span)


def _exit(module, args, output) -> None:
    _SPANS.pop().__exit__(None, None, None)


TABLE_SUFFIXES = (":float", ":int8")


def split_spec(spec: str) -> tuple[str, str | None]:
    """A model spec DIR[:float|:int8] -> (DIR, forced one-token look-up tables or None)."""
    for suffix in TABLE_SUFFIXES:
        if spec.endswith(suffix):
            return spec.removesuffix(suffix), suffix[1:]
    return spec, None


def load_for_decode(spec: str, engine: str = "native") -> LoadedModel:
    """A model spec, where DIR:float / DIR:int8 loads DIR with those look-up tables in its CMPQ layers on the
    PyTorch path; otherwise it runs on `engine` ("native" where the engine covers it)."""
    from cmpq.engine import attach
    from cmpq.formats.cmpq import use_tables

    path, tables = split_spec(spec)
    loaded = load_model(path)
    if tables is not None and use_tables(loaded.model, tables) == 0:
        raise ValueError(f"{spec}: {tables} tables apply to CMPQ-quantized models, and {path} has none")
    return attach(loaded, "torch" if tables is not None else engine)


def auto_tables() -> str:
    """What the default one-token look-up tables are on this CPU."""
    from cmpq.kernels import native

    return "int8" if native.use_int8_tables("auto", native.isa_code()) else "float"


def run(models: list[str], out_dir: str | Path, new_tokens: int = 64, repeats: int = 5,
        engine: str = "native") -> list[dict]:
    """Decode speed of each model (the first is the reference the others are compared with); all models are loaded
    at once, so that their generations can alternate."""
    from cmpq.eval.records import environment

    loaded = [load_for_decode(spec, engine) for spec in models]
    records = []
    for spec, model, speed in zip(models, loaded, interleaved_speeds(loaded, new_tokens, repeats)):
        quant = getattr(model.model.config, "quantization_config", None)
        quant = quant if isinstance(quant, dict) or quant is None else quant.to_dict()
        head = (quant or {}).get("head") or {}
        path = "native" if model.engine is not None else "torch"
        tables = split_spec(spec)[1] or ("float" if model.engine is not None else auto_tables())
        records.append({"benchmark": "decode", "model": spec, "engine": path, "tables": tables, **speed,
                        "bpw": (quant or {}).get("bpw"), "head_bpw": head.get("bpw"), "profile": profile_step(model) if model.engine is None else [],
                        **environment()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = [f"Decode, same loop (static KV cache, greedy), prompt {records[0]['prompt_tokens']} tokens, "
             f"{new_tokens} new tokens; {repeats} rounds, each running every model once in turn; tokens/s and the "
             f"ratio to the first model are medians over the rounds; {records[0]['threads']} threads. The native "
             "engine uses exact float look-up tables; the PyTorch path its default unless the name says.", "",
             "| model | engine | blocks bpw | head bpw | tokens/s | x first | top ops, PyTorch path (share of self time) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        ops = ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in r["profile"][:4])
        bpw = "-" if r["bpw"] is None else f"{r['bpw']:.3f}"
        head = "float" if r.get("head_bpw") is None else f"{r['head_bpw']:.3f}"
        spec, tables = split_spec(r["model"])
        name = (Path(spec).name if Path(spec).is_dir() else spec) + (f" ({tables} tables)" if tables else "")
        lines.append(f"| {name} | {r['engine']} | {bpw} | {head} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f} "
                     f"| {ops or '-'} |")
    (out / "decode.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records

