"""Zero-shot tasks and 5-shot MMLU through lm-evaluation-harness, from the local data files.

The convention everybody compares with is lm-eval's built-in task definitions. Their prompts, choices,
targets and metrics are used verbatim: each task's config is read from the built-in YAML that ships with
lm-eval (includes and `!function` helpers resolved by lm-eval's own loader), and only where the documents come
from is replaced: `custom_dataset` returns the local files (`task_data.py`) in the hub datasets' schema, so
`doc_to_text` / `doc_to_choice` / `doc_to_target` render exactly what they render on the hub copies. Two
files are conversions (PROVENANCE): HellaSwag arrives already preprocessed (llama.cpp's text format), so the
built-in `process_docs` is skipped; BoolQ's passage and question are recovered from llm-foundry's format.

A model (quantized in memory, or loaded from a saved directory) is wrapped in lm-eval's `HFLM`, which
scores log-likelihoods with the model's own forward: whatever quantized modules the model holds are used.

Task protocols: `quick` = the first 200 documents of each task and the first 5 questions of each MMLU
subject (285), always labelled with the counts; `full` = everything. Quick is sized for this 2-core CPU: about 5
minutes for the seven zero-shot tasks and 9 for MMLU's 5-shot prompts with smollm2-135m in float32 (500 and 10
took about 12 and 18).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch.nn as nn

from cmpq.errors import CmpqError, ConfigError
from cmpq.progress import bar as progress_bar

# task -> the built-in YAML (relative to lm_eval/tasks) whose prompts and metrics are used
BUILTIN_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
ZERO_SHOT_TASKS = tuple(BUILTIN_YAML)
MMLU = "mmlu"
ALL_TASKS = (*ZERO_SHOT_TASKS, MMLU)
MMLU_SHOTS = 5
QUICK_ITEMS = 200           # documents per zero-shot task in the quick protocol
QUICK_MMLU_PER_SUBJECT = 5  # questions per MMLU subject in the quick protocol
TASK_PROTOCOLS = ("quick", "full")
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks, under which protocol (`limit` overrides the protocol's document count per task and per
    MMLU subject, for smoke runs), scored in batches of `batch_size` requests."""

    tasks: tuple[str, ...] = ALL_TASKS
    protocol: str = "quick"
    limit: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ConfigError(f"tasks: unknown {unknown}; choose from {', '.join(ALL_TASKS)}")
        if self.protocol not in TASK_PROTOCOLS:
            raise ConfigError(f"tasks.protocol: must be one of {TASK_PROTOCOLS} (got {self.protocol!r})")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"tasks.limit: must be an integer >= 1 (got {self.limit!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"tasks.batch_size: must be an integer >= 1 (got {self.batch_size!r})")

    def items(self, task: str) -> int | None:
        """Documents evaluated per task (per subject for MMLU); None = all."""
        if self.limit is not None:
            return self.limit
        if self.protocol == "full":
            return None
        return QUICK_MMLU_PER_SUBJECT if task == MMLU else QUICK_ITEMS

    def label(self) -> str:
        if self.limit is not None:
            return f"limit {self.limit}"
        return (f"quick (first {QUICK_ITEMS} per task, first {QUICK_MMLU_PER_SUBJECT} per MMLU subject)"
                if self.protocol == "quick" else "full")


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise CmpqError("task evaluation needs lm-evaluation-harness: pip install 'lm-eval>=0.4.9' (or install "
                        "cmpq with the [eval] extra)") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task INFO/WARNING chatter hides our output
    return lm_eval


@lru_cache(maxsize=None)
def builtin_config(relative: str) -> dict[str, Any]:
    """lm-eval's built-in task config from its YAML (includes and `!function` resolved by lm-eval)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.__file__).parent / "tasks" / relative
    if not path.is_file():
        raise CmpqError(f"lm-eval {getattr(lm_eval, '__version__', '?')} has no built-in task file {relative}; "
                        f"this cmpq was written against lm-eval 0.4.x")
    return load_yaml(str(path), resolve_func=True)


def check_task_data(config: TaskConfig) -> None:
    """Read every task file the config needs (cached), so a missing or malformed one fails before any model
    is loaded, naming the file (and line)."""
    from cmpq.eval.task_data import MMLU_SUBJECTS, load_mmlu, load_task_docs

    for task in config.tasks:
        if task == MMLU:
            for subject in MMLU_SUBJECTS:
                load_mmlu(subject, "test"), load_mmlu(subject, "dev")
        else:
            load_task_docs(task)


def _dataset(splits: dict[str, list[dict[str, Any]]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in splits.items()})


def local_task_config(task: str) -> dict[str, Any]:
    """The built-in config of a zero-shot task with the documents taken from the local file."""
    from cmpq.eval.task_data import load_task_docs

    config = {k: v for k, v in builtin_config(BUILTIN_YAML[task]).items() if k not in ("tag", "group")}
    split = config.get("test_split") or config["validation_split"]
    docs = load_task_docs(task)  # read now: a missing or malformed file fails before any model work
    config.update(custom_dataset=lambda **_: _dataset({split: docs}), dataset_path=None, dataset_name=None,
                  dataset_kwargs=None, training_split=None, fewshot_split=None,
                  test_split=split if config.get("test_split") else None,
                  validation_split=None if config.get("test_split") else split, num_fewshot=0)
    if task == "hellaswag":
        config["process_docs"] = None  # the local file is llama.cpp's preprocessed text (PROVENANCE)
    return config


def local_mmlu_config(subject: str) -> dict[str, Any]:
    """lm-eval's `mmlu_<subject>` config (5-shot from the dev split, first_n sampler) on the local CSVs."""
    from cmpq.eval.task_data import load_mmlu

    config = {k: v for k, v in builtin_config(f"mmlu/default/mmlu_{subject}.yaml").items()
              if k not in ("tag", "group")}
    test, dev = load_mmlu(subject, "test"), load_mmlu(subject, "dev")
    config.update(custom_dataset=lambda **_: _dataset({"test": test, "dev": dev}), dataset_path=None,
                  dataset_name=None, dataset_kwargs=None, num_fewshot=MMLU_SHOTS)
    return config


def wrap_model(model: nn.Module, tokenizer, batch_size: int = 8):
    """lm-eval's HFLM around an in-memory model (its forward, with any quantized modules it holds)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise CmpqError("task evaluation needs the model's tokenizer")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def _simple_evaluate(lm, configs: list[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # An empty manager: the configs are complete, and scanning lm-eval's thousands of YAMLs takes seconds.
    manager = TaskManager(include_defaults=False)
    return simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=0, log_samples=True,
                           task_manager=manager)


def _metrics(result: dict[str, Any], task: str) -> dict[str, float]:
    values = result["results"][task]
    return {name.split(",")[0]: float(value) for name, value in values.items()
            if "," in name and not name.split(",")[0].endswith("_stderr") and isinstance(value, (int, float))}


def evaluate_tasks(model: nn.Module, tokenizer, config: TaskConfig, progress: bool = True,
                   show: int = 0) -> dict[str, Any]:
    """{task: {metric: value, "items": n, "seconds": s}, "mmlu": {category: acc, "average": acc, ...},
    "protocol": label}. With `show`, the first `show` documents of each task are printed: the exact context,
    the choices and the model's log-likelihood of each (to check the prompts against the built-in tasks)."""
    lm = wrap_model(model, tokenizer, config.batch_size)
    out: dict[str, Any] = {"protocol": config.label()}
    bar = progress_bar(config.tasks, desc="tasks", unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task)
        start = time.perf_counter()
        if task == MMLU:
            out[MMLU] = _evaluate_mmlu(lm, config, show)
        else:
            from cmpq.eval.task_data import TASKS

            result = _simple_evaluate(lm, [local_task_config(task)], config.items(task))
            # "converted": the local file is another project's format (PROVENANCE), e.g. HellaSwag's queries are
            # llama.cpp's preprocessing, not lm-eval's: numbers may differ slightly from hub-based ones
            out[task] = {**_metrics(result, task), "items": len(result["samples"][task]),
                         "converted": TASKS[task].converted}
            if show:
                print_samples(task, result["samples"][task][:show])
        out[task]["seconds"] = time.perf_counter() - start
    return out


def _evaluate_mmlu(lm, config: TaskConfig, show: int) -> dict[str, Any]:
    """Accuracy per category and over all questions (weighted by questions, as lm-eval's mmlu group)."""
    from cmpq.eval.task_data import MMLU_SUBJECTS

    configs = [local_mmlu_config(subject) for subject in MMLU_SUBJECTS]
    result = _simple_evaluate(lm, configs, config.items(MMLU))
    correct = {c: 0.0 for c in MMLU_CATEGORIES}
    counts = {c: 0 for c in MMLU_CATEGORIES}
    for subject, category in MMLU_SUBJECTS.items():
        name = f"mmlu_{subject}"
        n = len(result["samples"][name])
        correct[category] += _metrics(result, name)["acc"] * n
        counts[category] += n
        if show and subject == next(iter(MMLU_SUBJECTS)):
            print_samples(name, result["samples"][name][:show])
    total = sum(counts.values())
    return {**{c: correct[c] / counts[c] for c in MMLU_CATEGORIES if counts[c]},
            "average": sum(correct.values()) / total, "items": total, "shots": MMLU_SHOTS}


def print_samples(task: str, samples: list[dict[str, Any]]) -> None:
    """Context, choices and per-choice log-likelihoods of logged samples, as lm-eval scored them."""
    for sample in samples:
        requests = sample["arguments"]
        context = requests[0][0] if isinstance(requests[0], (list, tuple)) else requests[0]["arg_0"]
        print(f"--- {task} doc {sample['doc_id']} (target {sample['target']!r})")
        print(f"context: {context!r}")
        for request, response in zip(requests, sample["resps"]):
            ctx, continuation = (request[0], request[1]) if isinstance(request, (list, tuple)) else \
                (request["arg_0"], request["arg_1"])
            loglik = response[0][0] if isinstance(response[0], (list, tuple)) else response[0]
            note = "" if ctx == context else f" (context {ctx!r})"
            print(f"  choice {continuation!r}: loglik {float(loglik):.4f}{note}")
