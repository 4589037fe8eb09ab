"""`cmpq inspect`: per-layer bit-widths, outliers and honest bpw of a quantization record, and a heatmap.

Reads the per-layer summaries that `cmpq quantize --json FILE` stores in each record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmpq.atomic import atomic_write
from cmpq.errors import CmpqError
from cmpq.eval.records import read_records


def load_record(path: str | Path, index: int = -1) -> dict[str, Any]:
    """Record `index` (default: the last) of a .jsonl file written by `cmpq quantize --json`."""
    path = Path(path)
    if not path.is_file():
        raise CmpqError(f"{path}: no such file (expected a .jsonl written by `cmpq quantize --json`)")
    try:
        records = [r for r in read_records(path) if r.get("layers")]
    except ValueError as exc:
        raise CmpqError(str(exc)) from exc
    if not records:
        raise CmpqError(f"{path}: holds no quantization record with per-layer data")
    if not -len(records) <= index < len(records):
        raise CmpqError(f"{path}: record {index} does not exist ({len(records)} quantization records)")
    return records[index]


def layer_table(record: dict[str, Any]) -> str:
    """A fixed-width text table: one line per layer, then the totals."""
    widths = sorted({int(w) for layer in record["layers"].values() for w in layer["widths"]})
    header = f"{'layer':<42} {'shape':>11} {'bpw':>6} {'code':>6} {'outl':>6}  " + " ".join(f"{w:>5}b" for w in widths)
    lines = [header, "-" * len(header)]
    for name, layer in record["layers"].items():
        columns = layer["shape"][1]
        hist = " ".join(f"{layer['widths'].get(str(w), 0) / columns:>6.0%}" for w in widths)
        lines.append(f"{name:<42} {'x'.join(map(str, layer['shape'])):>11} {layer['bits']['bpw']:>6.3f} "
                     f"{layer['bits']['code_bpw']:>6.3f} {layer['outliers']:>6}  {hist}")
    bits = record["bits"]
    parts = ", ".join(f"{k} {bits[k] / bits['weights']:.4f}" for k in ("codes", "params", "outliers", "indices", "maps"))
    head = record.get("head")
    blocks = len(record["layers"]) - (head is not None)
    lines += ["", f"{record['method']} target {record['target_bits']}: honest {record['bpw']:.4f} bpw "
                  f"({parts}) over {record['quantized_weights']:,} weights in {blocks} layers"]
    if head:
        lines.append(f"head {head['name']} (reported apart, target {head['target_bits']}): honest {head['bpw']:.4f} "
                     f"bpw, {head['bytes']:,} bytes")
    return "\n".join(lines)


def write_heatmap(record: dict[str, Any], path: str | Path) -> Path:
    """PNG heatmap of the share of each layer's columns at each bit-width (layers x widths), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(record["layers"])
    widths = sorted({int(w) for layer in record["layers"].values() for w in layer["widths"]})
    share = np.array([[layer["widths"].get(str(w), 0) / layer["shape"][1] for w in widths]
                      for layer in record["layers"].values()])
    fig, ax = plt.subplots(figsize=(max(6.0, 2 + 0.8 * len(widths)), 2 + 0.12 * len(names)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(widths)), [f"{w}-bit" for w in widths])
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_title(f"{record['method']} {record['model']} @ {record['bpw']:.3f} bpw: share of columns per width",
                 fontsize=8)
    fig.colorbar(image, ax=ax, label="share of input channels")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=150))
    finally:
        plt.close(fig)
