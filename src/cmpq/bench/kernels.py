"""`cmpq bench kernels`: our LUT kernels against torch's F.linear (float32 and bfloat16) on the same shapes,
in the same process, with a memory-copy bandwidth measured in the same run (PROTOCOL's "Speed").

Layers are random CMPQ layers in the packed format at 2.5 / 3 / 4 code bits per weight (2.5: half the columns
at 2 bits, half at 3), with 0.5% FP16 outliers as CMPQ's defaults store. Times are medians over repeats after
a warm-up; the achieved weight bandwidth counts the bytes of the packed weights (row-packed codes, codebooks,
outliers as stored), and its fraction of the copy bandwidth pairs each timed run with a copy timed right after
it (`paired_copy_fraction`). "Ours" uses the exact float look-up tables; one-token cells also time the int8
look-up tables (`tables = "int8"`, approximate; the default for one token) where the CPU has them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cmpq.formats.cmpq import CMPQLinear
from cmpq.formats.synthetic import mixed_widths, random_cmpq_layer
from cmpq.kernels import native

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BITS = (2.5, 3.0, 4.0)
OUTLIER_RATIO = 0.005


def _loops(fn: Callable[[], object], min_seconds: float) -> int:
    """Calls of `fn` that take at least `min_seconds` (after one warm-up call)."""
    fn()
    start, loops = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds or loops == 0:
        fn()
        loops += 1
    return loops


def _timed(fn: Callable[[], object], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops


def median_seconds(fn: Callable[[], object], repeats: int, min_seconds: float = 0.05) -> float:
    """Median wall time of `fn` over `repeats` timed runs (each run loops until `min_seconds` have passed
    when the call is short), after one warm-up call."""
    loops = _loops(fn, min_seconds)
    return statistics.median(_timed(fn, loops) for _ in range(repeats))


class CopyReference:
    """A large tensor copy (read + write counted), timed right after each timed run of a kernel: this VM's
    copy bandwidth drifts by tens of percent within minutes, so a fraction of it is only meaningful against a
    copy measured at the same moment."""

    def __init__(self, megabytes: int = 256) -> None:
        self.source = torch.empty(megabytes * 2**20 // 4)
        self.target = torch.empty_like(self.source)
        self.target.copy_(self.source)  # pages touched before the first timing

    def gbps(self) -> float:
        return 2 * self.source.numel() * 4 / _timed(lambda: self.target.copy_(self.source), 1) / 1e9


def paired_copy_fraction(fn: Callable[[], object], weight_bytes: int, reference: CopyReference, repeats: int,
                         min_seconds: float = 0.05) -> tuple[float, float, float]:
    """(median seconds of `fn`, median copy GB/s, median over rounds of the fraction of copy bandwidth): each
    round times `fn`, then one copy, and divides the weight bytes read per second by that copy's rate."""
    loops = _loops(fn, min_seconds)
    seconds, copies = [], []
    for _ in range(repeats):
        seconds.append(_timed(fn, loops))
        copies.append(reference.gbps())
    fractions = [weight_bytes / t / 1e9 / c for t, c in zip(seconds, copies)]
    return statistics.median(seconds), statistics.median(copies), statistics.median(fractions)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), the machine's practical limit."""
    reference = CopyReference(megabytes)
    return statistics.median(reference.gbps() for _ in range(repeats)) * 1e9


@dataclass
class KernelResult:
    shape: tuple[int, int]
    bits: float
    batch: int
    ours_s: float
    ours_bf16_s: float  # our module with a bfloat16 input (bfloat16 tiles and matmul above the LUT-GEMV's batch)
    fp32_s: float
    bf16_s: float
    weight_bytes: int
    copy_gbps: float      # median of the copies timed right after each timed run of ours_s
    copy_fraction: float  # median over those rounds of (weight bytes / our time) / copy bandwidth
    int8_s: float | None = None              # one token with int8 look-up tables (where the CPU has them)
    int8_copy_fraction: float | None = None

    def as_dict(self) -> dict:
        return {"rows": self.shape[0], "cols": self.shape[1], "bits": self.bits, "batch": self.batch,
                "ours_ms": self.ours_s * 1e3, "ours_bf16_ms": self.ours_bf16_s * 1e3, "fp32_ms": self.fp32_s * 1e3,
                "bf16_ms": self.bf16_s * 1e3, "speedup_vs_fp32": self.fp32_s / self.ours_s,
                "speedup_vs_bf16": self.bf16_s / self.ours_s, "bf16_speedup_vs_bf16": self.bf16_s / self.ours_bf16_s,
                "weight_bytes": self.weight_bytes, "weight_gbps": self.weight_bytes / self.ours_s / 1e9,
                "copy_gbps": self.copy_gbps, "copy_fraction": self.copy_fraction,
                "int8_ms": None if self.int8_s is None else self.int8_s * 1e3,
                "int8_speedup_vs_fp32": None if self.int8_s is None else self.fp32_s / self.int8_s,
                "int8_copy_fraction": self.int8_copy_fraction}


def measure(shape: tuple[int, int], bits: float, batches: tuple[int, ...], repeats: int,
            reference: CopyReference) -> list[KernelResult]:
    rows, cols = shape
    layer = random_cmpq_layer(rows, cols, mixed_widths(cols, bits), nnz=round(OUTLIER_RATIO * rows * cols),
                              scale=0.05)
    module = CMPQLinear.from_weight(layer)
    module.kernel = "native"
    weight_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    dense = torch.randn(rows, cols) * 0.05
    dense_bf16 = dense.bfloat16()
    results = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, cols)
            x_bf16 = x.bfloat16()
            module.tables = "float"  # exact tables in "ours"; the int8 ones get their own columns
            ours_s, copy_gbps, fraction = paired_copy_fraction(lambda: module(x), weight_bytes, reference, repeats)
            int8_s = int8_fraction = None
            if batch == 1 and native.int8_supported():
                module.tables = "int8"
                int8_s, _, int8_fraction = paired_copy_fraction(lambda: module(x), weight_bytes, reference, repeats)
            module.tables = "float"
            results.append(KernelResult(int8_s=int8_s, int8_copy_fraction=int8_fraction,
                shape=shape, bits=bits, batch=batch, weight_bytes=weight_bytes, copy_gbps=copy_gbps,
                copy_fraction=fraction, ours_s=ours_s,
                ours_bf16_s=median_seconds(lambda: module(x_bf16), repeats),
                fp32_s=median_seconds(lambda: F.linear(x, dense), repeats),
                bf16_s=median_seconds(lambda: F.linear(x_bf16, dense_bf16), repeats)))
    return results


def render(records: list[dict], threads: int, isa: str) -> str:
    copies = [r["copy_gbps"] for r in records]
    lines = [f"Kernel vs torch F.linear on the same shapes, same process; median of repeats; {threads} threads; "
             f"ISA {isa}. % copy: the median over rounds of our weight bytes per second over a 256 MB tensor copy "
             f"timed right after it in the same round (copy medians {min(copies):.1f}-{max(copies):.1f} GB/s in "
             f"this run). ours: exact float look-up tables; int8: one token with int8 look-up tables (each product "
             f"rounded to 8 bits of its block's largest: the default for one token where the CPU has them), timed "
             f"and paired the same way; '-' where not measured.", "",
             "| shape (out x in) | bits | batch | ours ms | fp32 ms | bf16 ms | x fp32 | x bf16 | ours, bf16 in: ms | "
             "its x bf16 | weight GB/s | % copy | int8 ms | int8 x fp32 | int8 % copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        int8 = ("- | - | -" if r.get("int8_ms") is None else
                f"{r['int8_ms']:.3f} | {r['int8_speedup_vs_fp32']:.2f} | {100 * r['int8_copy_fraction']:.0f}%")
        lines.append(f"| {r['rows']}x{r['cols']} | {r['bits']:g} | {r['batch']} | {r['ours_ms']:.3f} | "
                     f"{r['fp32_ms']:.3f} | {r['bf16_ms']:.3f} | {r['speedup_vs_fp32']:.2f} | "
                     f"{r['speedup_vs_bf16']:.2f} | {r['ours_bf16_ms']:.3f} | {r['bf16_speedup_vs_bf16']:.2f} | "
                     f"{r['weight_gbps']:.1f} | "
                     f"{100 * r['copy_fraction']:.0f}% | {int8} |")
    return "\n".join(lines) + "\n"


def run(out_dir, shapes: list[tuple[int, int]], bits: tuple[float, ...], batches: tuple[int, ...],
        repeats: int = 7, progress: bool = True) -> list[dict]:
    """Measure every (shape, bits, batch), write `kernels.jsonl` (replaced) and `kernels.md` in `out_dir`."""
    import json
    from pathlib import Path

    from cmpq.progress import bar

    from cmpq.eval.records import environment

    if not native.supported_isas():
        raise RuntimeError("the native kernels are not built: nothing to benchmark")
    code = native.isa_code()
    isa = native.supported_isas()[-1] if code < 0 else next(n for n, c in native.ISAS.items() if c == code)
    env = environment()
    records, reference = [], CopyReference()
    for shape in bar(shapes, desc="bench kernels", unit="shape", disable=not progress):
        for b in bits:
            for result in measure(shape, b, batches, repeats, reference):
                records.append({"benchmark": "kernels", **result.as_dict(), "isa": isa, **env})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "kernels.jsonl", out / "kernels.md"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(jsonl)
    md.write_text(render(records, env["threads"], isa), encoding="utf-8")
    return records
