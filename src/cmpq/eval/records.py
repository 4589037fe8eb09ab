"""PROTOCOL's benchmark record: one JSON object per configuration, appended atomically to a .jsonl file."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cmpq.atomic import atomic_write
from cmpq.errors import CmpqError
from cmpq.paths import CHECKOUT
from cmpq.progress import peak_rss_mb  # noqa: F401 (re-exported: records name it)


def git_commit() -> str | None:
    """Commit of the checkout the package runs from, with '-dirty' if it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CHECKOUT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def unquantized_storage(model: nn.Module, quantized: set[str]) -> dict[str, Any]:
    """Parameters other than the quantized weights (embeddings, norms, lm_head, biases; tied weights once) and
    their size in 16-bit, reported apart from the quantized layers' bpw as PROTOCOL asks."""
    skip = {f"{name}.weight" for name in quantized}
    params = sum(p.numel() for name, p in model.named_parameters() if name not in skip)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"params": params, "bytes_16bit": params * 2, "evaluated_dtype": dtype}


# The commit of the code this process imported: taken once, at import, because records are often written long
# after the process started, when HEAD may have moved on.
_COMMIT_AT_IMPORT = git_commit()


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC 9R14"), else the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Physical memory of the machine in GiB (Linux), None where it cannot be read."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    """What a speed or cost number depends on: CPU model, the kernels' ISAs (supported, and the one in use),
    cores and memory. Every record carries it, so a table can say which machine produced it."""
    from cmpq.kernels import native

    isas = list(native.supported_isas())
    requested = os.environ.get("CMPQ_ISA", "auto")
    best = max(isas, key=lambda name: native.ISAS[name], default="reference")  # codes grow with the ISA's width
    in_use = best if requested == "auto" else requested
    return {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
            "isas": isas, "isa": in_use,
            "int8_tables": native.library() is not None and native.int8_supported()}


def environment() -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), "git_commit": _COMMIT_AT_IMPORT, "torch": torch.__version__,
            "python": platform.python_version(), "machine": machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_writable(path: str | Path) -> None:
    """Fail before a long run, not after it, when a results file cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise CmpqError(f"--json {path}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CmpqError(f"--json {path}: not writable")


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to `path` atomically: the file is either the old one or the old one plus a whole
    new line, never a half-written line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time (benchmark workers may share a results file): a lock on the directory itself
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        _append_locked(path, record)
    finally:
        os.close(directory)


def _append_locked(path: Path, record: dict[str, Any]) -> None:
    existing = path.read_bytes() if path.exists() else b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    atomic_write(path, lambda handle: handle.write(existing + (json.dumps(record, sort_keys=False) + "\n").encode()))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a .jsonl file, with the line number in any parse error."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return records
