"""The jobs the CLI runs, as library functions: quantize a model (and evaluate it), or evaluate a model.

`QuantizeJob` is everything `cmpq quantize` does as one value: the CLI builds it from its flags and library
callers build it directly, and `run_quantize` runs both the same way. Each job returns PROTOCOL's record (a
dict) so that the CLI, benchmarks and tests share one code path.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmpq.calibration.precision import resolve_dtype
from cmpq.config import CalibConfig, EvalConfig, config_to_dict
from cmpq.data.sampling import calibration_windows
from cmpq.errors import ConfigError
from cmpq.eval.harness import TaskConfig
from cmpq.eval.kld import KLDConfig, Reference
from cmpq.eval.perplexity import perplexity
from cmpq.eval.records import environment, peak_rss_mb, unquantized_storage
from cmpq.head import describe_head
from cmpq.models.loaded import LoadedModel
from cmpq.pipeline import QuantizationResult, quantize_model
from cmpq.progress import profiling, stage
from cmpq.quantizers import Quantizer, get_quantizer
from cmpq.quantizers.base import BUDGET_TOLERANCE_BPW
from cmpq.resume import RunState
from cmpq.training import distill as distillation
from cmpq.training.distill import DistillConfig
from cmpq.training.finetune import FinetuneConfig, enabled


def check_context(loaded: LoadedModel, seqlen: int, what: str) -> None:
    """A clear error instead of an index error deep in the model when windows exceed its context."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"{what}: windows of {seqlen} tokens exceed the model's context of {limit}")


def evaluate(loaded: LoadedModel, config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Perplexity on every dataset of `config`: {dataset: {ppl, windows, tokens, ...}}."""
    if not config.datasets:
        return {}
    check_context(loaded, config.seqlen, "eval.seqlen")
    with stage("evaluation"):
        return {name: perplexity(loaded.model, loaded.tokenizer, name, config, progress).as_dict()
                for name in config.datasets}


@dataclass
class QuantizeJob:
    """One `cmpq quantize` run. `options` are fields of the method's Config (`bits` among them), applied over
    `preset` (None: the method's default preset, e.g. cmpq's "best"); `distill.epochs` None takes the
    preset's distillation. `head_bits` quantizes the output head too; `out` saves the packed model, `json`
    appends the record; `resume` continues a stopped run of the same job from what it finished (`cmpq.resume`).
    Every check that can fail runs in `check`, before the model is loaded."""

    options: dict[str, Any]
    model: str = "smollm2-135m"
    method: str = "cmpq"
    preset: str | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    head_bits: float | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(epochs=None))
    eval: EvalConfig = field(default_factory=EvalConfig)
    tasks: TaskConfig | None = None
    kld: KLDConfig | None = None
    true_sequential: bool = False
    out: Path | None = None
    overwrite: bool = False
    json: Path | None = None
    progress: bool = True
    resume: bool = False

    def quantizer(self) -> Quantizer:
        from cmpq.quantizers import QUANTIZERS

        cls = QUANTIZERS.get(self.method)
        preset = self.preset or (cls.default_preset if cls is not None else None)
        return get_quantizer(self.method, preset=preset, **self.options)

    def head_quantizer(self) -> Quantizer | None:
        from cmpq.head import head_quantizer

        return None if self.head_bits is None else head_quantizer(self.head_bits)

    def distill_config(self, quantizer: Quantizer) -> DistillConfig:
        """The distillation this job runs: as given, the preset's epochs where it leaves them open."""
        return self.distill.resolve(quantizer.distill_epochs())

    def check(self) -> tuple[Quantizer, Quantizer | None, DistillConfig]:
        """Everything that can fail before any long work (options, data files, output paths): the body's and
        the head's quantizers and the resolved distillation."""
        from cmpq.data.sources import load_eval_text
        from cmpq.eval.harness import check_task_data
        from cmpq.eval.records import check_writable
        from cmpq.packed.model_io import check_saveable, check_target

        quantizer = self.quantizer()
        head = self.head_quantizer()
        distill = self.distill_config(quantizer)
        for what, epochs in (("--finetune", self.finetune.epochs), ("--distill", distill.epochs)):
            if epochs and self.method != "cmpq":
                raise ConfigError(f"{what} trains the values of lookup-quantized layers (cmpq), not {self.method}'s")
        if self.json:
            check_writable(self.json)
        for name in self.eval.datasets:
            load_eval_text(name)
        if self.tasks is not None and self.tasks.tasks:
            check_task_data(self.tasks)
        if self.out:
            check_saveable(self.method)
            check_target(Path(self.out), self.overwrite)
        return quantizer, head, distill


def run_state(job: QuantizeJob, quantizer: Quantizer, distill: DistillConfig) -> RunState:
    """Where `job` keeps its finished steps: named by everything that decides its output (`cmpq.resume`)."""
    from cmpq import __version__, threads
    from cmpq.eval.records import environment

    description = {
        "model": job.model, "model_files": model_identity(job.model), "method": quantizer.name,
        "config": config_to_dict(quantizer.config), "calib": config_to_dict(job.calib), "head_bits": job.head_bits,
        "finetune": config_to_dict(job.finetune), "distill": config_to_dict(distill),
        "true_sequential": job.true_sequential, "threads": threads.pinned(), "cmpq": __version__,
        "git_commit": environment()["git_commit"], "torch": torch.__version__}
    return RunState.for_run(description)


def model_identity(spec: str) -> list[list[Any]]:
    """(name, size, modification time) of the files a model spec reads, so that a state is not resumed on a
    model that changed; empty for hub ids."""
    from cmpq.models.load import DEFAULT_MODEL, bundled_smollm2_path

    path = bundled_smollm2_path() if spec == DEFAULT_MODEL else Path(spec).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()]


def start_state(job: QuantizeJob, quantizer: Quantizer, distill: DistillConfig) -> RunState:
    """The job's state, emptied unless it resumes; says what a resumed run takes over."""
    state = run_state(job, quantizer, distill)
    finished = state.finished()
    if job.resume and finished:
        print(f"resuming: {len(finished)} finished steps of a stopped run ({', '.join(_steps(finished))})")
    elif job.resume:
        print("resuming: no stopped run of this command was found; starting from the beginning")
    elif finished:
        print(f"a stopped run of this command had finished {len(finished)} steps; starting over "
              f"(--resume continues such a run)")
    state.start(job.resume)
    return state


def _steps(keys: list[str]) -> list[str]:
    blocks = [k for k in keys if k.startswith("block-")]
    rest = [k for k in keys if not k.startswith("block-")]
    return rest + ([f"{len(blocks)} blocks"] if blocks else [])


def run_quantize(job: QuantizeJob) -> dict[str, Any]:
    """Run `job` end to end: quantize, evaluate, save and record; returns the record (the CLI prints it). The
    record's `stages` holds the seconds of every stage of the run (`cmpq.progress`). Finished steps are kept
    on disk until the output is saved, for `resume`."""
    from cmpq.eval.records import append_record
    from cmpq.models.load import load_model
    from cmpq.packed.model_io import WEIGHTS, save_quantized

    quantizer, head, distill = job.check()
    state = start_state(job, quantizer, distill)
    resumed = state.finished()  # the steps a stopped run finished, taken over (empty unless job.resume)
    with profiling() as profile:
        with stage("load model"):
            loaded = load_model(job.model)
        reference = None
        if job.kld:
            with stage("KL divergence reference"):  # while the model is still float
                reference = kld_reference(loaded, job.kld, progress=job.progress)
        result, calib_info = quantize(loaded, quantizer, job.calib, true_sequential=job.true_sequential,
                                      progress=job.progress, head=head, finetune=job.finetune, distill=distill,
                                      state=state)
        ppl = evaluate(loaded, job.eval, job.progress)
        with stage("tasks and KL divergence") if job.tasks or reference else contextlib.nullcontext():
            extra = extra_evaluations(loaded, job.tasks, reference, job.progress)
        if job.out:
            with stage("save"):
                directory = save_quantized(loaded, result, quantizer, Path(job.out), overwrite=job.overwrite,
                                           head=head)
    record = quantization_record(loaded, quantizer, result, calib_info, ppl, job.eval.protocol if ppl else None,
                                 head)
    record.update(extra)
    record["stages"] = profile.as_dict()
    record["stage_rss_rise_mb"] = profile.rss_dict()
    record["resumed_steps"] = _steps(resumed) if resumed else None
    if job.out:
        record["file_bytes"] = (directory / WEIGHTS).stat().st_size
        record["saved_to"] = str(directory)
        print(f"saved to {directory} ({record['file_bytes']:,} bytes in {WEIGHTS})")
    if job.json:
        append_record(job.json, record)
    state.clear()
    return record


def quantize(loaded: LoadedModel, quantizer: Quantizer, calib: CalibConfig, *, true_sequential: bool = False,
             progress: bool = True, head: Quantizer | None = None, finetune: FinetuneConfig | None = None,
             distill: DistillConfig | None = None,
             state: RunState | None = None) -> tuple[QuantizationResult, dict[str, Any]]:
    """Quantize `loaded.model` in place (and its output head with `head`, after the blocks), then distill its
    stored values end to end if `distill` asks (`cmpq.training.distill`); returns the result and the calibration
    description for the record. `state`: finished steps are saved there and taken from there (`cmpq.resume`)."""
    calib_info: dict[str, Any] = {"used": False}
    windows = None
    tune = enabled(finetune)
    if distill is not None:
        distill = distill.resolve(quantizer.distill_epochs())
    distilling = distillation.enabled(distill)
    if quantizer.calibration_needs() or (head is not None and head.needs()) or tune or distilling:
        check_context(loaded, calib.seqlen, "calib.seqlen")
        with stage("calibration data"):
            windows, source = calibration_windows(loaded.tokenizer, calib)
        calib_info = {"used": True, **config_to_dict(calib), "resolved_source": source,
                      "resolved_dtype": str(resolve_dtype(calib.dtype)).removeprefix("torch.")}
    dtype = resolve_dtype(calib.dtype)
    start = time.perf_counter()
    distill_windows = distill.windows(windows) if distilling else None
    teacher = None
    distilled = distilling and state is not None and state.has("distillation")
    if distilling and not distilled:
        if state is not None and state.has("teacher"):
            teacher = distillation.Teacher(**state.load("teacher"))
        else:
            with stage("distillation teacher"):
                teacher = distillation.teacher_topk(loaded.model, distill_windows, distill.topk, dtype, progress)
            if state is not None:
                state.save("teacher", {"indices": teacher.indices, "logprobs": teacher.logprobs})
    teacher_seconds = time.perf_counter() - start
    result = quantize_model(loaded.model, loaded.arch, quantizer, windows, true_sequential=true_sequential,
                            progress=progress, dtype=dtype, head=head, finetune=finetune, state=state)
    if windows is not None:
        result.calibration = {**config_to_dict(calib), "dtype": calib_info["resolved_dtype"]}
    if tune:
        calib_info["finetune"] = {**config_to_dict(finetune), "blocks": result.finetune}
    if distilling:
        start = time.perf_counter()
        blocks = {name: qw for name, qw in result.layers.items() if name != result.head}
        if distilled:
            kept, record = distillation.install(loaded.model, state.load("distillation"))
        else:
            with stage("distillation"):
                kept, record = distillation.distill_model(loaded.model, blocks, distill_windows, teacher, distill,
                                                          dtype, seed=calib.seed, progress=progress)
            if state is not None:
                state.save("distillation", distillation.saved(loaded.model, kept, record))
        result.layers.update(kept)
        result.distill = {**config_to_dict(distill), **record}
        result.seconds += teacher_seconds + time.perf_counter() - start
        calib_info["distill"] = result.distill
    return result, calib_info


def head_record(result: QuantizationResult, head: Quantizer | None) -> dict[str, Any] | None:
    """The quantized head's own accounting (PROTOCOL: reported apart from the blocks' bpw)."""
    if result.head is None or head is None:
        return None
    return describe_head(result.head, result.layers[result.head], head)


def quantization_record(loaded: LoadedModel, quantizer: Quantizer, result: QuantizationResult,
                        calib_info: dict[str, Any], ppl: dict[str, Any], protocol: str | None,
                        head: Quantizer | None = None) -> dict[str, Any]:
    """PROTOCOL's benchmark record for one quantized configuration (`bpw` covers the blocks' linears; a
    quantized head is under `head`, and excluded from `unquantized`)."""
    storage = result.storage()
    unquantized = unquantized_storage(loaded.model, set(result.layers))
    target = quantizer.target_bits()
    return {
        "model": loaded.spec,
        "model_source": loaded.source,
        "method": quantizer.name,
        "config": config_to_dict(quantizer.config),
        "target_bits": target,
        "bpw": storage.bpw,
        # PROTOCOL: a target means honest bpw at most the target and within 0.02 of it, for the whole model
        "budget_met": None if target is None else target - BUDGET_TOLERANCE_BPW <= storage.bpw <= target,
        "code_bpw": storage.code_bpw,
        "bits": storage.as_dict(),
        "quantized_layers": len(result.layers) - (result.head is not None),
        "quantized_weights": storage.weights,
        "quantized_bytes": -(-storage.total // 8),
        "unquantized": unquantized,
        "head": head_record(result, head),
        "file_bytes": None,  # no packed file is written yet; the byte counts above are from the accounting
        "protocol": protocol,
        "ppl": ppl,
        "calibration": calib_info,
        "quant_seconds": result.seconds,
        "peak_rss_mb": peak_rss_mb(),
        **environment(),
        "layers": {name: qw.summary() for name, qw in result.layers.items()},
    }


def float_record(loaded: LoadedModel, ppl: dict[str, Any], protocol: str, seconds: float) -> dict[str, Any]:
    """PROTOCOL's record for an unquantized model (the float reference)."""
    return {
        "model": loaded.spec,
        "model_source": loaded.source,
        "method": "float" if base_model(loaded) == loaded.spec else "saved",  # "saved": a quantized directory
        "base_model": base_model(loaded),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "config": None,
        "target_bits": None,
        "bpw": None,
        "code_bpw": None,
        "file_bytes": None,
        "protocol": protocol,
        "ppl": ppl,
        "eval_seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        **environment(),
    }


def base_model(loaded: LoadedModel) -> str:
    """The float model a saved quantized model came from (its `quantization_config.base_model`), else the
    model itself: the reference of KL divergence."""
    config = getattr(loaded.model.config, "quantization_config", None)
    base = config.get("base_model") if isinstance(config, dict) else getattr(config, "base_model", None)
    return base or loaded.spec


def kld_reference(loaded: LoadedModel, config: KLDConfig, reference_model: str | None = None,
                  progress: bool = True) -> Reference:
    """The float log-probabilities KL divergence is measured against, built once per (model, windows) and
    reused. `reference_model`: the float model's spec; None = `loaded` itself, which must then still be float
    (call this before quantizing it)."""
    from cmpq.eval.kld import ensure_reference
    from cmpq.models.load import load_model

    if config.seqlen:
        check_context(loaded, config.seqlen, "kld.seqlen")
    if reference_model is None or reference_model == loaded.spec:
        return ensure_reference(loaded.tokenizer, loaded.spec, lambda: loaded.model, config, progress=progress)
    return ensure_reference(loaded.tokenizer, reference_model, lambda: load_model(reference_model).model, config,
                            progress=progress)


def extra_evaluations(loaded: LoadedModel, tasks: TaskConfig | None, reference: Reference | None,
                      progress: bool = True, show: int = 0) -> dict[str, Any]:
    """Zero-shot tasks / MMLU (`eval/harness.py`) and KL divergence to float (`eval/kld.py`) for the record:
    {"tasks": ..., "kld": ...}, each None when not asked for."""
    from cmpq.eval.harness import evaluate_tasks
    from cmpq.eval.kld import kl_divergence

    out: dict[str, Any] = {"tasks": None, "kld": None}
    if reference is not None:
        out["kld"] = kl_divergence(loaded.model, reference, progress=progress).as_dict()
    if tasks is not None and tasks.tasks:
        out["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, progress=progress, show=show)
    return out


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def set_threads(threads: int | None) -> None:
    """`--threads N`: exactly N threads; without it, as many as the cores other processes leave free
    (`cmpq.threads`)."""
    from cmpq import threads as thread_count

    thread_count.configure(threads)
