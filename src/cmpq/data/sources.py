"""Where the text comes from: the shared data directory, the Hugging Face hub, or a plain text file.

PROTOCOL fixes the text exactly:
- WikiText-2 test: rows are the lines of `wiki.test.raw` with their trailing newline, whitespace-only lines
  becoming "" (as the `datasets` loader yields them), joined with "\\n\\n".
- C4: documents 0..999 of the 2k validation sample joined with " " for evaluation; documents 1000..1999,
  joined the same way, for calibration. The two ranges never overlap.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from cmpq.errors import DataNotFoundError
from cmpq.paths import CHECKOUT

DATA_DIR_ENV = "CMPQ_DATA_DIR"
WIKITEXT2_TEST = "wikitext2/wiki.test.raw"
C4_SAMPLE = "c4/c4_validation_2k.jsonl"          # the parquet converted to JSON lines (same rows, PROVENANCE)
C4_SAMPLE_PARQUET = "c4/c4_validation_2k.parquet"  # the file PROTOCOL names; read when the JSON lines are absent
C4_EVAL_DOCS = range(0, 1000)
C4_CALIB_DOCS = range(1000, 2000)
_C4_HUB_SHARD = "en/c4-validation.00000-of-00008.json.gz"


def data_dir_candidates() -> list[Path]:
    """Directories searched for the shared data, in order: $CMPQ_DATA_DIR, then ../shared/data next to the
    checkout this package runs from, then ../shared/data next to the working directory."""
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    candidates.append(CHECKOUT.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def find_data_file(relative: str) -> Path | None:
    """The first existing `relative` file under the candidate data directories, or None."""
    for directory in data_dir_candidates():
        if (directory / relative).is_file():
            return directory / relative
    return None


def _missing(name: str, relative: str, hub_note: str) -> DataNotFoundError:
    looked = "\n  ".join(str(d / relative) for d in data_dir_candidates())
    return DataNotFoundError(f"{name} not found. Looked in:\n  {looked}\nSet {DATA_DIR_ENV} to the directory that "
                             f"holds '{relative}'{hub_note}.")


def wikitext2_rows(path: Path) -> list[str]:
    """Rows of the raw WikiText-2 file as the Hugging Face loader yields them."""
    with open(path, encoding="utf-8", newline="") as handle:
        return ["" if line.strip() == "" else line for line in handle]


def read_c4_docs(path: Path) -> list[str]:
    """The `text` field of every line of the C4 sample (JSON lines), with the line number in any error."""
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataNotFoundError(f"{path}:{number}: not a C4 JSON line with a 'text' field ({exc})") from exc
    return docs


def _hub_available() -> bool:
    from cmpq.models.load import hub_reachable

    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return hub_reachable()


def _wikitext2_hub(split: str) -> list[str]:
    import datasets

    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _c4_hub_docs() -> list[str]:
    """First 2000 documents of the C4 validation shard GPTQ uses (the local sample's position in it is
    unverified, see PROVENANCE.md, so hub and local C4 numbers are labelled by source)."""
    import datasets

    data = datasets.load_dataset("allenai/c4", data_files={"validation": _C4_HUB_SHARD}, split="validation")
    return list(data.select(range(2000))["text"])


def read_c4_parquet(path: Path) -> list[str]:
    """The `text` column of the parquet C4 sample (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataNotFoundError(f"{path} needs pyarrow to read (pip install pyarrow), or provide "
                                f"{C4_SAMPLE}") from None
    return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]


@lru_cache(maxsize=4)
def _c4_docs() -> tuple[tuple[str, ...], str]:
    docs: list[str] | None = None
    if (path := find_data_file(C4_SAMPLE)) is not None:
        docs, source = read_c4_docs(path), str(path)
    elif (path := find_data_file(C4_SAMPLE_PARQUET)) is not None:
        docs, source = read_c4_parquet(path), str(path)
    elif _hub_available():
        docs, source = _c4_hub_docs(), f"hub:allenai/c4/{_C4_HUB_SHARD}[0:2000]"
    else:
        raise _missing("C4 sample", C4_SAMPLE, ", or install 'datasets' and run where the hub is reachable")
    if len(docs) < C4_CALIB_DOCS.stop:
        raise DataNotFoundError(f"{source} has {len(docs)} documents; PROTOCOL needs {C4_CALIB_DOCS.stop} "
                                f"(0..999 evaluation, 1000..1999 calibration)")
    return tuple(docs), source


def load_eval_text(name: str) -> tuple[str, str]:
    """(evaluation text, source description) for `wikitext2` or `c4`, per PROTOCOL."""
    if name == "wikitext2":
        path = find_data_file(WIKITEXT2_TEST)
        if path is not None:
            return "\n\n".join(wikitext2_rows(path)), str(path)
        if _hub_available():
            return "\n\n".join(_wikitext2_hub("test")), "hub:wikitext/wikitext-2-raw-v1/test"
        raise _missing("WikiText-2 test", WIKITEXT2_TEST, ", or install 'datasets' and run where the hub is reachable")
    if name == "c4":
        docs, source = _c4_docs()
        return " ".join(docs[C4_EVAL_DOCS.start:C4_EVAL_DOCS.stop]), f"{source} docs 0..999"
    if Path(name).expanduser().is_file():
        return read_text_file(Path(name).expanduser()), str(Path(name).expanduser())
    raise DataNotFoundError(f"unknown evaluation dataset '{name}'; choose wikitext2, c4 or a UTF-8 text file")


def c4_eval_docs() -> tuple[list[str], str]:
    """(C4 documents 0..999, source description): PROTOCOL's evaluation documents, never calibrated on."""
    docs, where = _c4_docs()
    return list(docs[C4_EVAL_DOCS.start:C4_EVAL_DOCS.stop]), f"{where} docs 0..999"


def c4_calibration_docs() -> tuple[list[str], str]:
    """(C4 documents 1000..1999, source description): PROTOCOL's calibration documents."""
    docs, where = _c4_docs()
    return list(docs[C4_CALIB_DOCS.start:C4_CALIB_DOCS.stop]), f"{where} docs 1000..1999"


def load_calibration_text(source: str) -> tuple[str, str]:
    """(calibration text, source description) for `c4` (docs 1000..1999), `wikitext2` (train, hub only) or a
    path to a plain UTF-8 text file."""
    if source == "c4":
        docs, where = c4_calibration_docs()
        return " ".join(docs), where
    if source == "wikitext2":
        if _hub_available():
            return "\n\n".join(_wikitext2_hub("train")), "hub:wikitext/wikitext-2-raw-v1/train"
        raise DataNotFoundError("WikiText-2 train is only available from the Hugging Face hub, which is unreachable "
                                "here; use --calib c4 (the default) or a text file")
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"calibration source '{source}' is neither c4, c4-chat, wikitext2 nor an existing text file")
    return read_text_file(path), str(path)


def read_text_file(path: Path) -> str:
    """A whole UTF-8 text file, used as one document (tokenized once, like the named datasets)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataNotFoundError(f"{path}: not UTF-8 text ({exc})") from exc
