"""A quick quantization with and without another process keeping one core busy, threads pinned or following
the load: how much a competing process slows cmpq down.

The model is smollm2-135m cut to its first `--blocks` blocks (saved once in a temporary directory), quantized
at 3.0 bpw with quick calibration and no distillation or evaluation, each run in its own `cmpq quantize`
process. The competitor is a plain Python busy loop. Runs: idle and busy, each with the default thread count
(the free cores, `cmpq.threads`) and with `--threads <all cores>` pinned. A run that exceeds `--timeout`
seconds is stopped and reported as such.

Writes benchmarks/results/cost/<machine>/busy_machine.jsonl and .md.
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

from cmpq.threads import available_cores  # noqa: E402


def cut_model(blocks: int, directory: Path) -> Path:
    """smollm2-135m with only its first `blocks` blocks, saved as a Hugging Face directory."""
    from cmpq.models.load import load_model

    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = load_model("smollm2-135m")
    config = AutoConfig.for_model(**{k: v for k, v in loaded.model.config.to_dict().items()
                                     if k not in ("quantization_config", "layer_types")})
    config.num_hidden_layers = blocks
    model = AutoModelForCausalLM.from_config(config)  # a plain float model: the loaded one is marked as GGUF
    state = {k: v for k, v in loaded.model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def quantize_run(model: Path, threads: int | None, timeout: float, work: Path) -> dict:
    """One `cmpq quantize` process: its record's quantization seconds and stages, or a timeout."""
    record_path = work / f"run-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "cmpq", "quantize", "--model", str(model), "--bits", "3", "--nsamples", "32",
               "--seqlen", "512", "--eval", "none", "--distill", "0", "--json", str(record_path), "--no-progress"]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    try:
        subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "wall_seconds": time.perf_counter() - start}
    record = json.loads(record_path.read_text().splitlines()[-1])
    return {"timed_out": False, "wall_seconds": time.perf_counter() - start,
            "quant_seconds": record["quant_seconds"], "stages": record["stages"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="blocks of smollm2-135m kept (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is stopped")
    args = parser.parse_args()
    from cmpq.eval.records import environment

    cores = available_cores()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = cut_model(args.blocks, work / "model")
        for load in ("idle", "busy"):
            for threads in (None, cores):
                competitor = busy_loop() if load == "busy" else None
                try:
                    time.sleep(1.0 if competitor else 0.0)
                    run = quantize_run(model, threads, args.timeout, work)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                label = "free cores (default)" if threads is None else f"--threads {threads}"
                records.append({**environment(), "benchmark": "busy_machine", "load": load, "threads": label,
                                "blocks": args.blocks, **run})
                shown = "timed out" if run["timed_out"] else f"{run['quant_seconds']:.1f} s"
                print(f"{load}, {label}: {shown}", flush=True)
    idle = {r["threads"]: r for r in records if r["load"] == "idle"}
    for r in records:
        base = idle[r["threads"]]
        if not r["timed_out"] and not base["timed_out"]:
            r["slowdown"] = r["quant_seconds"] / base["quant_seconds"]
    publish("busy_machine", records, markdown(records, cores), group=f"cost/{machine_slug()}")


def markdown(records: list[dict], cores: int) -> str:
    lines = ["| load | threads | quantization s | s per block | slowdown vs idle |", "|---|---|---|---|---|"]
    for r in records:
        if r["timed_out"]:
            lines.append(f"| {r['load']} | {r['threads']} | > {r['wall_seconds']:.0f} (stopped) | - | - |")
            continue
        slowdown = f"{r['slowdown']:.2f}x" if "slowdown" in r else "-"
        lines.append(f"| {r['load']} | {r['threads']} | {r['quant_seconds']:.1f} | "
                     f"{r['quant_seconds'] / r['blocks']:.1f} | {slowdown} |")
    first = records[0]
    return ("\n".join(lines) + f"\n\nsmollm2-135m cut to {first['blocks']} blocks, `cmpq quantize --bits 3 --nsamples "
            f"32 --seqlen 512 --eval none --distill 0`, on {cores} cores; busy: a Python busy loop runs beside it. "
            "Quantization seconds include the gradient pass over the cut model.\n")


if __name__ == "__main__":
    main()
