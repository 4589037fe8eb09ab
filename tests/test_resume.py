"""Resumable and deterministic quantization (`cmpq.resume`): a run killed with SIGKILL and continued with
--resume writes the same bytes as a run never stopped, and the same command twice writes the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cmpq.errors import CmpqError
from cmpq.formats.cmpq import CMPQWeight
from cmpq.quantizers.outliers import SparseOutliers, WithOutliers
from cmpq.formats.uniform import UniformQuantizedWeight
from cmpq.resume import RunState, fingerprint

# 4 blocks so that a run can stop with some blocks done and some not; the default method (cmpq, best preset:
# Fisher gradient pass, model-wide plan, error feedback, distillation) with a quantized head
COMMAND = ["quantize", "--bits", "2.5", "--quantize-head", "4", "--nsamples", "6", "--seqlen", "32",
           "--distill-tokens", "192", "--eval", "none", "--no-progress", "--threads", "1"]

# Run the CLI in a fresh interpreter, SIGKILLing itself at a chosen point: inside the atomic write of a state
# file (before its rename), or at the n-th optimizer step of the distillation.
RUNNER = textwrap.dedent("""
    import os, signal, sys
    kill_in_write, kill_at_step = os.environ.get("KILL_IN_WRITE"), int(os.environ.get("KILL_AT_STEP", "0"))
    import cmpq.atomic as atomic, cmpq.resume as resume, torch
    real_write = atomic.atomic_write
    def write(path, fn):
        if kill_in_write and str(path).endswith(kill_in_write):
            def partial(handle):
                fn(handle)
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, partial)
        return real_write(path, fn)
    resume.atomic_write = write
    steps = [0]
    real_step = torch.optim.Adam.step
    def step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args, **kwargs)
    torch.optim.Adam.step = step
    from cmpq.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CMPQ_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-c", RUNNER, *args], env=environment, capture_output=True, text=True,
                          timeout=300)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from cmpq.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model") / "tiny4", "llama", blocks=4)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    """The output of the command run once, never stopped."""
    root = tmp_path_factory.mktemp("reference")
    done = _run([*COMMAND, "--model", str(source), "--out", str(root / "q")], root / "cache")
    assert done.returncode == 0, done.stderr
    assert not any((root / "cache" / "resume").iterdir())  # the state is gone once the output is saved
    return _files(root / "q")


def test_the_same_command_twice_writes_the_same_bytes(source, reference, tmp_path):
    done = _run([*COMMAND, "--model", str(source), "--out", str(tmp_path / "q")], tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "q") == reference


def test_a_killed_run_resumes_to_the_same_bytes(source, reference, tmp_path):
    args = [*COMMAND, "--model", str(source), "--out", str(tmp_path / "q")]
    cache = tmp_path / "cache"
    # killed while writing block 2's state: blocks 0 and 1 (and the teacher and plan) are finished
    first = _run(args, cache, KILL_IN_WRITE="block-2.safetensors")
    assert first.returncode == -signal.SIGKILL
    (state,) = (cache / "resume").iterdir()
    assert any(p.name.endswith(".tmp") for p in state.iterdir())  # the half-written file is left, never named
    assert not (tmp_path / "q").exists()
    # resumed, then killed again in the middle of the distillation (after every block and the head)
    second = _run([*args, "--resume"], cache, KILL_AT_STEP="3")
    assert second.returncode == -signal.SIGKILL
    assert "resuming: 4 finished steps" in second.stdout and "2 blocks" in second.stdout
    third = _run([*args, "--resume"], cache)
    assert third.returncode == 0, third.stderr
    assert "4 blocks" in third.stdout and "head" in third.stdout
    assert _files(tmp_path / "q") == reference
    assert not state.exists()


def test_without_resume_a_stopped_run_starts_over(source, reference, tmp_path):
    args = [*COMMAND, "--model", str(source), "--out", str(tmp_path / "q")]
    cache = tmp_path / "cache"
    assert _run(args, cache, KILL_IN_WRITE="block-1.safetensors").returncode == -signal.SIGKILL
    again = _run(args, cache)
    assert again.returncode == 0, again.stderr
    assert "starting over" in again.stdout
    assert _files(tmp_path / "q") == reference


def test_a_state_belongs_to_one_command():
    base = {"model": "m", "config": {"bits": 2.5}, "threads": 1}
    assert fingerprint(base) == fingerprint(dict(reversed(list(base.items()))))
    assert fingerprint(base) != fingerprint({**base, "threads": 2})
    assert fingerprint(base) != fingerprint({**base, "config": {"bits": 3.0}})


def test_quantized_weights_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    cmpq = CMPQWeight(widths=torch.tensor([2, 3], dtype=torch.uint8), codes=torch.randint(0, 4, (5, 2)).to(torch.uint8),
                      codebooks=torch.randn(2, 8), outlier_rows=torch.tensor([1]), outlier_cols=torch.tensor([0]),
                      outlier_values=torch.randn(1).half(), codebook_format="int8", int8_grid=(-0.123456789, 1e-3))
    uniform = UniformQuantizedWeight(codes=torch.randint(0, 8, (5, 4)).to(torch.uint8), scale=torch.rand(5, 1).half(),
                                     zero=torch.zeros(5, 1, dtype=torch.uint8), bits=3, group_size=4)
    nested = WithOutliers(inner=uniform, outliers=SparseOutliers.empty(), map_bits=8)
    state = RunState(tmp_path / "state", {"job": 1})
    state.start(resume=False)
    value = {"layers": {"a.b": cmpq, "c": nested}, "record": {"kl": [0.5, float("inf")], "kept": None}}
    state.save("step", value)
    back = state.load("step")
    assert state.finished() == ["step"]
    for name in ("a.b", "c"):
        assert type(back["layers"][name]) is type(value["layers"][name])
        assert torch.equal(back["layers"][name].dequantize(), value["layers"][name].dequantize())
    assert back["layers"]["a.b"].int8_grid == cmpq.int8_grid and back["layers"]["c"].map_bits == 8
    assert back["record"] == value["record"]


def test_only_this_packages_dataclasses_are_rebuilt(tmp_path):
    import json

    from safetensors.torch import save_file

    state = RunState(tmp_path / "state", {})
    state.start(resume=False)
    state.save("step", {"x": 1})
    path = state.directory / "step.safetensors"
    save_file({}, str(path), metadata={"__meta__": json.dumps({"class": "os:system", "fields": {}})})
    with pytest.raises(CmpqError, match="foreign class"):
        state.load("step")
