"""Prefill and decode speed of cmpq's native engine against llama.cpp on this CPU, in one run.

llama.cpp is built once into a cache outside the checkout (`llamacpp.py`: the source vendored in the
llama-cpp-python sdist, GGML_NATIVE=ON), and F32 / Q8_0 / Q4_0 / Q4_K_M / Q2_K GGUFs of smollm2-135m are made
from the shipped Q4_1 file. Then rounds alternate `llama-bench -t T -r 1 -p 512 -n 128` on every type with the same
work through the engine on float32 and on packed models (2.5, 3.0 and 4.0 bpw, float head and head at 6 bits,
saved under runs/speed/ by `speed.py`'s recipe): one prompt of 512 tokens (pp512), then 128 tokens decoded one at a
time from an empty cache (tg128, as llama-bench). Reported: medians over the rounds of tokens/s, each round's ratio
to llama.cpp Q4_0 (and F32) as a median, and per token the bytes of weights read, their time and the ratio to a
copy bandwidth measured in the same run.

    python benchmarks/vs_llamacpp.py [--rounds 5] [--threads 1,2]

Writes results/speed/<machine>/vs_llamacpp.jsonl and .md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402
from speed import VARIANTS, ensure_models  # noqa: E402
from store import machine_slug, publish  # noqa: E402

TYPES = ("F32", "Q8_0", "Q4_0", "Q4_K_M", "Q2_K")
MODELS = ("float", "cmpq-2.5-head6", "cmpq-3", "cmpq-3-head6", "cmpq-4-head6")
PROMPT, NEW = 512, 128


def copy_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second (each byte read once and written once: twice its size) by a torch copy with
    `threads` threads."""
    torch.set_num_threads(threads)
    src = torch.ones(megabytes << 18)  # float32: megabytes MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """Bytes of weights the engine reads per decoded token: every block linear and the head as the kernels read
    them (packed codes, float codebooks and table offsets, outliers; float32 matrices), the two norms of every
    block and the final norm (float32), one embedding row."""
    from cmpq.engine.native import BLOCK_LINEARS
    from cmpq.formats.cmpq import CMPQLinear

    def linear_bytes(module) -> int:
        if isinstance(module, CMPQLinear):
            prepared = module._native or module.prepare_native()
            return sum(t.numel() * t.element_size() for t in (prepared.codes, prepared.order, prepared.widths,
                       prepared.codebooks, prepared.cb_offset, prepared.table_offset, prepared.orow,
                       prepared.ocol, prepared.odelta))
        return module.weight.numel() * 4

    total = linear_bytes(model.lm_head) + model.model.norm.weight.numel() * 4 + model.config.hidden_size * 4
    for layer in model.model.layers:
        total += sum(linear_bytes(layer.get_submodule(name)) for name in BLOCK_LINEARS)
        total += (layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()) * 4
    return total


def engine_round(engine, threads: int, prompt: torch.Tensor) -> tuple[float, float]:
    """(pp512 tokens/s, tg128 tokens/s) of one engine."""
    engine.threads = threads
    pp = PROMPT / _timed(lambda: engine.forward(prompt, 0))
    token, start = 1, time.perf_counter()
    for position in range(NEW):
        token = int(engine.forward([token], position).argmax())
    return pp, NEW / (time.perf_counter() - start)


def llama_round(cache: Path, gguf: Path, threads: int) -> tuple[float, float, int]:
    """(pp512, tg128 tokens/s, model bytes) of one llama-bench run."""
    bench = llamacpp.binary(cache, "llama-bench")
    command = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-p", str(PROMPT), "-n", str(NEW),
               "-o", "jsonl"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed on {gguf.name}: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    speeds = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return speeds["pp"], speeds["tg"], int(rows[0]["model_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--cache", type=Path, default=None, help="llama.cpp cache (default: llamacpp.py's)")
    args = parser.parse_args()
    from cmpq.engine import engine_for
    from cmpq.eval.records import environment
    from cmpq.models.load import bundled_smollm2_path, load_model

    cache = args.cache or llamacpp.default_cache()
    llamacpp.ensure_built(cache, ("llama-quantize", "llama-bench"))
    source = bundled_smollm2_path()
    types = [t for t in args.types.split(",") if t]
    ggufs = {t: llamacpp.quantize(cache, source, t)[0] for t in types}
    names = [m for m in args.models.split(",") if m]
    packed = ensure_models([m for m in names if m in VARIANTS])
    specs = {name: ("smollm2-135m" if name == "float" else str(packed[[m for m in names if m in VARIANTS].index(name)]))
             for name in names}
    models = {name: load_model(spec).model for name, spec in specs.items()}
    engines = {name: engine_for(model, context=PROMPT + NEW) for name, model in models.items()}
    read = {name: weight_bytes(model) for name, model in models.items()}
    prompt = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0))
    thread_counts = [int(t) for t in args.threads.split(",")]
    raw: list[dict] = []
    bandwidth = {t: [] for t in thread_counts}
    for name, engine in engines.items():  # warm-up
        engine_round(engine, thread_counts[-1], prompt)
    for r in range(args.rounds):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            bandwidth[threads].append(copy_bandwidth(threads))
            for qtype, gguf in ggufs.items():
                pp, tg, size = llama_round(cache, gguf, threads)
                raw.append({"system": "llama.cpp", "model": qtype, "threads": threads, "round": r, "pp512": pp,
                            "tg128": tg, "bytes_per_token": size})
            torch.set_num_threads(threads)
            for name, engine in engines.items():
                pp, tg = engine_round(engine, threads, prompt)
                raw.append({"system": "cmpq", "model": name, "threads": threads, "round": r, "pp512": pp,
                            "tg128": tg, "bytes_per_token": read[name]})
            print(f"round {r + 1}/{args.rounds}, {threads} threads done", flush=True)
    env = environment()
    records = summarize(raw, bandwidth, args.rounds, env)
    publish("vs_llamacpp", records, markdown(records), group=f"speed/{machine_slug()}")


def summarize(raw: list[dict], bandwidth: dict[int, list[float]], rounds: int, env: dict) -> list[dict]:
    """One record per (system, model, threads): medians over rounds and per-round ratios to llama.cpp Q4_0 / F32."""
    out = []
    for key in dict.fromkeys((r["system"], r["model"], r["threads"]) for r in raw):
        system, model, threads = key
        mine = [r for r in raw if (r["system"], r["model"], r["threads"]) == key]
        record = {**env, "benchmark": "vs_llamacpp", "system": system, "model": model, "threads": threads,
                  "rounds": rounds, "prompt_tokens": PROMPT, "new_tokens": NEW,
                  "bytes_per_token": mine[0]["bytes_per_token"],
                  "copy_bytes_per_second": statistics.median(bandwidth[threads])}
        for test in ("pp512", "tg128"):
            record[test] = statistics.median(r[test] for r in mine)
            for base in ("Q4_0", "F32"):
                ref = {r["round"]: r[test] for r in raw
                       if (r["system"], r["model"], r["threads"]) == ("llama.cpp", base, threads)}
                if ref:
                    record[f"{test}_vs_{base}"] = statistics.median(r[test] / ref[r["round"]] for r in mine)
        seconds = 1 / record["tg128"]
        record["bandwidth_share"] = record["bytes_per_token"] / seconds / record["copy_bytes_per_second"]
        out.append(record)
    return out


def markdown(records: list[dict]) -> str:
    first = records[0]
    lines = [f"Prefill (pp{PROMPT}) and decode (tg{NEW}, from an empty cache) tokens/s, cmpq's native engine and "
             f"llama.cpp (`llama-bench -r 1 -p {PROMPT} -n {NEW}`) alternating in {first['rounds']} rounds; medians, "
             "ratios as medians of per-round ratios; bytes of weights read per token and their share of the copy "
             "bandwidth measured in the same run.", "",
             "| system | model | threads | pp512 tok/s | x Q4_0 | tg128 tok/s | x Q4_0 | x F32 | MB read / token "
             "| share of copy bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["threads"], r["system"] != "llama.cpp")):
        lines.append(f"| {r['system']} | {r['model']} | {r['threads']} | {r['pp512']:.0f} | "
                     f"{r.get('pp512_vs_Q4_0', float('nan')):.2f} | {r['tg128']:.1f} | "
                     f"{r.get('tg128_vs_Q4_0', float('nan')):.2f} | {r.get('tg128_vs_F32', float('nan')):.2f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['bandwidth_share']:.2f} |")
    machine = first["machine"]
    lines += ["", f"Measured on {machine['cpu']} ({machine['isa']}, {machine['cores']} cores, "
              f"{machine['memory_gib']} GiB), commit {first.get('git_commit', '?')}, by "
              "`python benchmarks/vs_llamacpp.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
