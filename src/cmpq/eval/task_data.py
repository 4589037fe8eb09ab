"""Zero-shot task and MMLU documents read from the shared data directory, in the schema of the hub datasets.

Why this module exists:
- Local files: the evaluation machines have no network, so the documents come from the files under the shared
  data directory (found through $CMPQ_DATA_DIR, then ../shared/data next to the checkout; see
  `cmpq.data.sources`). `/work/shared/data/PROVENANCE.md` describes every file; BoolQ, LAMBADA and HellaSwag
  are *converted* copies (other projects' formats), which `TaskFiles.converted` flags so reports can say so.
- Hub schema: every document is a dict with exactly the fields of the Hugging Face dataset that
  lm-evaluation-harness's built-in task YAML reads (`dataset_path` / `dataset_name`), in file order.
- Built-in prompts: so the built-in `doc_to_text` / `doc_to_target` / `doc_to_choice` templates apply unchanged.
  HellaSwag is the one exception to "raw hub fields": llama.cpp's text format has lost the `ctx_a` / `ctx_b`
  split, so its documents are the fields lm-eval's `hellaswag/utils.py:process_docs` would produce
  (`query`, `choices`, `gold`) plus the hub's string `label`; its preprocessing differs slightly from lm-eval's
  (PROVENANCE.md; e.g. lm-eval capitalizes the first letter of `ctx_b`, the file keeps it as written).

Every malformed record raises `DataNotFoundError("<path>:<line>: <what is wrong>")` (1-based lines); a missing
file names every path looked at and $CMPQ_DATA_DIR; an unknown task, subject or split raises `ConfigError`.
Parsed files are cached per path (`clear_cache()` empties the cache); callers always get fresh lists of dicts.
"""

from __future__ import annotations

import bz2
import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from cmpq.data import sources as _sources
from cmpq.data.sources import DATA_DIR_ENV
from cmpq.errors import ConfigError, DataNotFoundError


@dataclass(frozen=True)
class TaskFiles:
    """Where a task's documents are and which lm-eval split and hub dataset they stand for."""

    files: tuple[str, ...]  # required, relative to the data directory; files[0] holds the documents
    split: str  # the split lm-eval's built-in task evaluates
    hub_dataset: str  # the built-in YAML's dataset_path (and dataset_name) whose schema the documents follow
    optional_files: tuple[str, ...] = ()  # read from the same data directory when present
    converted: bool = False  # another project's format (PROVENANCE.md): say so when reporting numbers


TASKS: dict[str, TaskFiles] = {
    "arc_easy": TaskFiles(("arc/ARC-Easy-Test.jsonl",), "test", "allenai/ai2_arc ARC-Easy"),
    "arc_challenge": TaskFiles(("arc/ARC-Challenge-Test.jsonl",), "test", "allenai/ai2_arc ARC-Challenge"),
    "piqa": TaskFiles(("piqa/dev.jsonl", "piqa/dev-labels.lst"), "validation", "baber/piqa"),
    "hellaswag": TaskFiles(("hellaswag/hellaswag_val_full.txt.bz2",), "validation",
                           "Rowan/hellaswag (after lm-eval's process_docs)", converted=True),
    "winogrande": TaskFiles(("winogrande/dev.jsonl",), "validation", "allenai/winogrande winogrande_xl",
                            optional_files=("winogrande/dev-labels.lst",)),
    "boolq": TaskFiles(("boolq/boolq_dev_llmfoundry.jsonl",), "validation", "aps/super_glue boolq", converted=True),
    "lambada_openai": TaskFiles(("lambada/lambada_openai_test_llmfoundry.jsonl",), "test",
                                "EleutherAI/lambada_openai default", converted=True),
}

# lm-eval 0.4's mmlu/_generate_configs.py SUBJECTS, copied as data.
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_CATEGORIES: tuple[str, ...] = ("stem", "humanities", "social_sciences", "other")
MMLU_SPLITS: tuple[str, ...] = ("test", "dev", "val")  # lm-eval: test_split test, fewshot_split dev
_MMLU_SPLIT_ALIASES = {"validation": "val"}  # cais/mmlu's name for val
_MMLU_LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------- errors, files


def _bad(path: Path, line: int, what: str) -> DataNotFoundError:
    return DataNotFoundError(f"{path}:{line}: {what}")


def _missing(name: str, relative: str) -> DataNotFoundError:
    looked = "\n  ".join(str(d / relative) for d in _sources.data_dir_candidates())
    return DataNotFoundError(f"{name} not found. Looked in:\n  {looked}\nSet {DATA_DIR_ENV} to the directory that "
                             f"holds '{relative}' (see PROVENANCE.md there; these tasks are read only from local "
                             f"files).")


def _task(task: str) -> TaskFiles:
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)} (MMLU: load_mmlu)")
    return TASKS[task]


def resolve_task_files(task: str) -> tuple[Path, ...]:
    """The task's files found on disk: the required ones (in `TASKS[task].files` order), then any optional
    ones present. All come from the first data directory that holds the documents file, so a documents file is
    never paired with another copy's labels."""
    spec = _task(task)
    main = _sources.find_data_file(spec.files[0])
    if main is None:
        raise _missing(f"{task} documents ({spec.files[0]})", spec.files[0])
    base = main.parents[len(Path(spec.files[0]).parts) - 1]
    paths = [main]
    for relative in spec.files[1:]:
        if not (base / relative).is_file():
            raise DataNotFoundError(f"{task} needs {base / relative} next to {main} (both from the same data "
                                    f"directory). Set {DATA_DIR_ENV} to a directory that holds "
                                    f"'{spec.files[0]}' and '{relative}'.")
        paths.append(base / relative)
    paths.extend(base / relative for relative in spec.optional_files if (base / relative).is_file())
    return tuple(paths)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line end) of a UTF-8 file, bz2-compressed if it ends in .bz2."""
    opener = bz2.open if path.suffix == ".bz2" else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _bad(path, number, f"not UTF-8 text ({exc})") from exc
                yield number, text.rstrip("\r\n")
    except (OSError, EOFError) as exc:  # a corrupt or truncated bz2 stream, an unreadable file
        raise _bad(path, number + 1, f"cannot read the file ({exc})") from exc


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _lines(path):
        if not line.strip():
            raise _bad(path, number, "empty line; expected one JSON object per line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(path, number, f"not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise _bad(path, number, f"expected a JSON object, got {type(record).__name__}")
        yield number, record


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _get(path: Path, line: int, record: dict, key: str, kind: type, where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in record:
        raise _bad(path, line, f"missing field '{name}'")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(path, line, f"field '{name}' must be {_KIND_NAMES[kind]}, got {type(value).__name__} "
                               f"{value!r:.60}")
    return value


def _fresh(docs: tuple[dict, ...]) -> list[dict]:
    """Copies of the cached documents (nested dicts and lists copied too; strings and ints are immutable)."""

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return [copy(doc) for doc in docs]


# ------------------------------------------------------------------------------------------------------ parsers


@lru_cache(maxsize=None)
def _arc(path: Path) -> tuple[dict, ...]:
    docs = []
    for number, record in _jsonl(path):
        question = _get(path, number, record, "question", dict)
        stem = _get(path, number, question, "stem", str, "question.")
        choices = _get(path, number, question, "choices", list, "question.")
        texts, labels = [], []
        for index, choice in enumerate(choices):
            where = f"question.choices[{index}]."
            if not isinstance(choice, dict):
                raise _bad(path, number, f"'question.choices[{index}]' must be an object")
            texts.append(_get(path, number, choice, "text", str, where))
            labels.append(_get(path, number, choice, "label", str, where))
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise _bad(path, number, f"choice labels {labels} must be at least 2 distinct labels")
        answer = _get(path, number, record, "answerKey", str)
        if answer not in labels:
            raise _bad(path, number, f"answerKey {answer!r} is not one of the choice labels {labels}")
        docs.append({"id": _get(path, number, record, "id", str), "question": stem,
                     "choices": {"text": texts, "label": labels}, "answerKey": answer})
    return tuple(docs)


def _label_lines(path: Path, allowed: tuple[str, ...]) -> list[str]:
    labels = []
    for number, line in _lines(path):
        if line.strip() not in allowed:
            raise _bad(path, number, f"label must be one of {', '.join(allowed)}, got {line!r:.60}")
        labels.append(line.strip())
    return labels


@lru_cache(maxsize=None)
def _piqa(path: Path, labels_path: Path) -> tuple[dict, ...]:
    labels = _label_lines(labels_path, ("0", "1"))
    docs = []
    for number, record in _jsonl(path):
        docs.append({key: _get(path, number, record, key, str) for key in ("goal", "sol1", "sol2")})
    if len(docs) != len(labels):
        raise DataNotFoundError(f"{path} has {len(docs)} items but {labels_path} has {len(labels)} labels; "
                                f"line i of the labels file is the label of item i, so the counts must match")
    for doc, label in zip(docs, labels):
        doc["label"] = int(label)
    return tuple(docs)


@lru_cache(maxsize=None)
def _winogrande(path: Path, labels_path: Path | None) -> tuple[dict, ...]:
    docs = []
    for number, record in _jsonl(path):
        doc = {key: _get(path, number, record, key, str) for key in ("sentence", "option1", "option2", "answer")}
        if doc["answer"] not in ("1", "2"):
            raise _bad(path, number, f"answer must be \"1\" or \"2\", got {doc['answer']!r:.60}")
        if "_" not in doc["sentence"]:
            raise _bad(path, number, "sentence has no '_' blank to fill with an option")
        docs.append(doc)
    if labels_path is not None:
        labels = _label_lines(labels_path, ("1", "2"))
        if len(labels) != len(docs):
            raise DataNotFoundError(f"{path} has {len(docs)} items but {labels_path} has {len(labels)} labels; "
                                    f"the counts must match")
        for number, (doc, label) in enumerate(zip(docs, labels), start=1):
            if doc["answer"] != label:
                raise _bad(labels_path, number, f"label {label!r} disagrees with the answer {doc['answer']!r} "
                                                f"on line {number} of {path}")
    return tuple(docs)


_BOOLQ_PASSAGE = "Passage: "
_BOOLQ_QUESTION = "\nQuestion: "


@lru_cache(maxsize=None)
def _boolq(path: Path) -> tuple[dict, ...]:
    docs = []
    for number, record in _jsonl(path):
        query = _get(path, number, record, "query", str)
        choices = _get(path, number, record, "choices", list)
        gold = _get(path, number, record, "gold", int)
        if choices != ["no", "yes"]:
            raise _bad(path, number, f"choices must be [\"no\", \"yes\"] (label 0 = no, 1 = yes), got {choices!r:.60}")
        if gold not in (0, 1):
            raise _bad(path, number, f"gold must be 0 or 1, got {gold}")
        if not query.startswith(_BOOLQ_PASSAGE) or _BOOLQ_QUESTION not in query or not query.endswith("?"):
            raise _bad(path, number, "query is not 'Passage: <passage>\\nQuestion: <question>?'")
        passage, question = query[len(_BOOLQ_PASSAGE):].rsplit(_BOOLQ_QUESTION, 1)
        docs.append({"passage": passage, "question": question[:-1], "label": gold})
    return tuple(docs)


@lru_cache(maxsize=None)
def _lambada(path: Path) -> tuple[dict, ...]:
    docs = []
    for number, record in _jsonl(path):
        context = _get(path, number, record, "context", str)
        continuation = _get(path, number, record, "continuation", str)
        if not continuation or " " in continuation or context.endswith(" "):
            raise _bad(path, number, "continuation must be one word without spaces and context must not end in a "
                                     "space (so that text.split(' ')[-1] gives the continuation back)")
        docs.append({"text": context + " " + continuation})
    return tuple(docs)


_HELLASWAG_LINES = 6  # activity_label + ": " + ctx, label 0-3, 4 endings


@lru_cache(maxsize=None)
def _hellaswag(path: Path) -> tuple[dict, ...]:
    docs: list[dict] = []
    item: list[str] = []
    start = last = 0
    for number, line in _lines(path):
        if not item:
            start = number
        item.append(line)
        last = number
        if len(item) == _HELLASWAG_LINES:
            label = item[1].strip()
            if label not in ("0", "1", "2", "3"):
                raise _bad(path, start + 1, f"label must be 0, 1, 2 or 3, got {item[1]!r:.60} (item {len(docs) + 1}"
                                            f" starting on line {start})")
            docs.append({"query": item[0], "choices": item[2:], "label": label, "gold": int(label)})
            item = []
    if item:
        raise _bad(path, start, f"truncated item {len(docs) + 1}: the file ends on line {last} after "
                                f"{len(item)} of its {_HELLASWAG_LINES} lines (query, label, 4 endings)")
    return tuple(docs)


_PARSERS = {"arc_easy": _arc, "arc_challenge": _arc, "piqa": _piqa, "hellaswag": _hellaswag,
            "winogrande": _winogrande, "boolq": _boolq, "lambada_openai": _lambada}


def load_task_docs(task: str) -> list[dict]:
    """The documents of `task` (a key of `TASKS`) in file order, in the hub schema its built-in YAML reads:

    - arc_easy / arc_challenge: {"id", "question", "choices": {"text", "label"}, "answerKey"} (allenai/ai2_arc)
    - piqa: {"goal", "sol1", "sol2", "label": 0|1}
    - winogrande: {"sentence", "option1", "option2", "answer": "1"|"2"}
    - boolq: {"passage", "question" (no trailing "?"), "label": 0|1}
    - lambada_openai: {"text"}
    - hellaswag: {"query", "choices": [4 endings], "label": "0".."3", "gold": 0..3} (process_docs output)
    """
    paths = resolve_task_files(task)
    if task == "winogrande":
        docs = _winogrande(paths[0], paths[1] if len(paths) > 1 else None)
    else:
        docs = _PARSERS[task](*paths)
    return _fresh(docs)


# --------------------------------------------------------------------------------------------------------- MMLU


def _mmlu_subject(subject: str) -> str:
    if subject not in MMLU_SUBJECTS:
        raise ConfigError(f"unknown MMLU subject '{subject}'; choose one of: {', '.join(MMLU_SUBJECTS)}")
    return subject


def mmlu_file(subject: str, split: str) -> str:
    """The relative path of an MMLU CSV: mmlu/{split}/{subject}_{split}.csv (split: test, dev or val)."""
    split = _MMLU_SPLIT_ALIASES.get(split, split)
    if split not in MMLU_SPLITS:
        raise ConfigError(f"unknown MMLU split '{split}'; choose one of: {', '.join(MMLU_SPLITS)}")
    return f"mmlu/{split}/{_mmlu_subject(subject)}_{split}.csv"


def mmlu_description(subject: str) -> str:
    """lm-eval's MMLU task description (prepended once before the few-shot examples and the question)."""
    words = " ".join(_mmlu_subject(subject).split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


@lru_cache(maxsize=None)
def _mmlu(path: Path, subject: str) -> tuple[dict, ...]:
    docs = []
    start = 1
    index = 0
    try:
        # newline="" keeps a "\r\n" inside a quoted field, as the hub's conversion did (it read the bytes)
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            for index, row in enumerate(reader, start=1):
                where = f"record {index} (starting on line {start})"
                if len(row) != 6:
                    raise _bad(path, start, f"{where} has {len(row)} fields; MMLU rows have 6 (question, A, B, C, "
                                            f"D, answer letter)")
                if row[5] not in _MMLU_LETTERS or len(row[5]) != 1:
                    raise _bad(path, start, f"{where}: answer must be one of A, B, C, D, got {row[5]!r:.60}")
                docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                             "answer": _MMLU_LETTERS.index(row[5])})
                start = reader.line_num + 1
    except csv.Error as exc:
        raise _bad(path, start, f"record {index + 1} (starting on line {start}) is not valid CSV ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise _bad(path, start, f"record {index + 1} (starting on line {start}) is not UTF-8 text ({exc})") from exc
    return tuple(docs)


def load_mmlu(subject: str, split: str) -> list[dict]:
    """MMLU rows of `subject` (a key of `MMLU_SUBJECTS`) for split test, dev or val ("validation" is accepted
    for val), in file order, as cais/mmlu: {"question", "subject", "choices": [A, B, C, D], "answer": 0..3}."""
    relative = mmlu_file(subject, split)
    path = _sources.find_data_file(relative)
    if path is None:
        raise _missing(f"MMLU {subject} {split} ({relative})", relative)
    return _fresh(_mmlu(path, subject))


def clear_cache() -> None:
    """Forget every parsed file (for tests that rewrite files in place)."""
    for parser in (_arc, _piqa, _winogrande, _boolq, _lambada, _hellaswag, _mmlu):
        parser.cache_clear()
