"""Zero-shot task and MMLU documents from the shared data directory, in the hub schema lm-eval's YAMLs read."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import pytest

from cmpq.data import sources
from cmpq.errors import ConfigError, DataNotFoundError
from cmpq.eval import task_data as td

EXPECTED_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
                   "lambada_openai": 5153, "hellaswag": 10042}


@pytest.fixture(autouse=True)
def _fresh_cache():
    td.clear_cache()
    yield
    td.clear_cache()


def _require_shared_data() -> None:
    needed = [f for spec in td.TASKS.values() for f in spec.files] + [td.mmlu_file("anatomy", "test")]
    absent = [f for f in needed if sources.find_data_file(f) is None]
    if absent:
        pytest.skip(f"shared data absent ({', '.join(absent)} not in any of {sources.data_dir_candidates()}); "
                    f"set {sources.DATA_DIR_ENV}")


@pytest.fixture
def shared_data() -> None:
    _require_shared_data()


# ------------------------------------------------------------------------------------------------- real files


def test_real_task_item_counts(shared_data):
    assert set(td.TASKS) == set(EXPECTED_COUNTS)
    for task, count in EXPECTED_COUNTS.items():
        assert len(td.load_task_docs(task)) == count, task
    assert {t: s.split for t, s in td.TASKS.items()} == {
        "arc_easy": "test", "arc_challenge": "test", "piqa": "validation", "hellaswag": "validation",
        "winogrande": "validation", "boolq": "validation", "lambada_openai": "test"}


def test_real_first_items_have_the_hub_schema(shared_data):
    arc = td.load_task_docs("arc_easy")
    assert arc[0] == {
        "id": "Mercury_417466",
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                             "Most ecosystems are found on land instead of in water.",
                             "Carbon dioxide is more available than other gases.",
                             "The producers in all ecosystems are plants."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "A"}
    # numeric labels are kept as in the file, so lm-eval's choices.label.index(answerKey) still works
    numeric = [d for d in arc if d["answerKey"] == "4"]
    assert numeric and all(d["choices"]["label"][d["choices"]["label"].index("4")] == "4" for d in numeric)
    assert sum(d["answerKey"] in "1234" for d in arc) == 97
    assert sum(d["answerKey"] in "1234" for d in td.load_task_docs("arc_challenge")) == 22

    piqa = td.load_task_docs("piqa")[0]
    assert set(piqa) == {"goal", "sol1", "sol2", "label"}
    assert piqa["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa["label"] == 0

    hellaswag = td.load_task_docs("hellaswag")[0]
    assert hellaswag == {"query": "Roof shingle removal: A man is sitting on a roof. he",
                         "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                         "label": "3", "gold": 3}

    assert td.load_task_docs("winogrande")[0] == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"}

    boolq = td.load_task_docs("boolq")
    assert set(boolq[0]) == {"passage", "question", "label"}
    assert boolq[0]["passage"].startswith("All biomass goes through at least some of these steps")
    assert boolq[0]["question"] == "does ethanol take more energy make that produces"
    assert boolq[0]["label"] == 0
    assert not any(d["passage"].startswith("Passage: ") or d["question"].endswith("?") for d in boolq)
    assert sum(d["label"] for d in boolq) == 2033  # PROVENANCE: 2,033 yes, 1,237 no
    # item 2418's passage itself contains "\nQuestion: "; the split is at the last one
    assert boolq[2417]["question"] == "is the sea snake the most venomous snake"
    assert "\nQuestion: The Smithsonian Answer Book" in boolq[2417]["passage"]

    lambada = td.load_task_docs("lambada_openai")[0]
    assert set(lambada) == {"text"}
    assert lambada["text"].endswith("I don't care about signs")


def test_real_mmlu(shared_data):
    assert len(td.MMLU_SUBJECTS) == 57
    assert set(td.MMLU_SUBJECTS.values()) == {"stem", "humanities", "social_sciences", "other"}
    assert td.MMLU_SUBJECTS["high_school_us_history"] == "humanities" and td.MMLU_SUBJECTS["virology"] == "other"
    test_rows = 0
    for subject in td.MMLU_SUBJECTS:
        test = td.load_mmlu(subject, "test")
        assert len(td.load_mmlu(subject, "dev")) == 5, subject
        assert all(d["subject"] == subject and len(d["choices"]) == 4 and d["answer"] in range(4) for d in test)
        test_rows += len(test)
    assert test_rows == 14042
    assert sum(len(td.load_mmlu(s, "val")) for s in td.MMLU_SUBJECTS) == 1531
    assert td.load_mmlu("abstract_algebra", "test")[0] == {
        "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1}
    # a quoted field with commas; "\r\n" inside a quoted field is kept, as the hub conversion read the bytes
    assert td.load_mmlu("abstract_algebra", "test")[2]["choices"] == ["0", "1", "0,1", "0,4"]
    assert any("?\r\nI. All of the entries" in d["question"] for d in td.load_mmlu("college_mathematics", "dev"))
    assert td.mmlu_description("high_school_us_history") == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n")


def test_builtin_templates_render_the_documents(shared_data):
    yaml = pytest.importorskip("yaml")
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    tasks_dir = Path(lm_eval_utils.__file__).parent / "tasks"

    def config(relative: str) -> dict:
        return yaml.safe_load((tasks_dir / relative).read_text(encoding="utf-8"))

    def render(template: str, doc: dict) -> str:
        return lm_eval_utils.apply_template(template, doc)

    arc = config("arc/arc_easy.yaml")
    doc = next(d for d in td.load_task_docs("arc_easy") if d["answerKey"] == "3")
    assert render(arc["doc_to_target"], doc) == "2"
    assert render(arc["doc_to_text"], doc) == f"Question: {doc['question']}\nAnswer:"
    boolq = config("super_glue/boolq/default.yaml")
    doc = td.load_task_docs("boolq")[0]
    assert render(boolq["doc_to_text"], doc).endswith("\nQuestion: does ethanol take more energy make that "
                                                      "produces?\nAnswer:")
    lambada = config("lambada/lambada_openai.yaml")
    doc = td.load_task_docs("lambada_openai")[0]
    assert render(lambada["doc_to_target"], doc) == " signs"
    assert render(lambada["doc_to_text"], doc).endswith("I don't care about")
    piqa = config("piqa/piqa.yaml")
    assert render(piqa["doc_to_text"], td.load_task_docs("piqa")[0]).startswith("Question: How do I ready")
    mmlu = config("mmlu/default/_default_template_yaml")
    assert render(mmlu["doc_to_text"], td.load_mmlu("abstract_algebra", "test")[0]).endswith(
        "over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


def test_callers_cannot_corrupt_the_cache(shared_data):
    first = td.load_task_docs("arc_easy")
    first[0]["choices"]["label"].append("Z")
    first[0]["question"] = "changed"
    first.pop()
    again = td.load_task_docs("arc_easy")
    assert len(again) == 2376 and again[0]["choices"]["label"] == ["A", "B", "C", "D"]
    assert again[0]["question"] != "changed"
    rows = td.load_mmlu("anatomy", "dev")
    rows[0]["choices"][0] = "changed"
    assert td.load_mmlu("anatomy", "dev")[0]["choices"][0] != "changed"


# -------------------------------------------------------------------------------------- synthetic bad records


def _write(root: Path, relative: str, lines: list[str]) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(bz2.compress(data) if relative.endswith(".bz2") else data)
    return path


def _arc_line(key: str = "A") -> str:
    return json.dumps({"id": "q", "question": {"stem": "Why?", "choices": [{"text": "a", "label": "A"},
                                                                           {"text": "b", "label": "B"}]},
                       "answerKey": key})


def _boolq_line(gold=1, query: str = "Passage: P1\nQuestion: is it?") -> str:
    return json.dumps({"query": query, "choices": ["no", "yes"], "gold": gold})


def _fails_at(task_or_call, path: Path, line: int, what: str = "") -> None:
    call = (lambda: td.load_task_docs(task_or_call)) if isinstance(task_or_call, str) else task_or_call
    with pytest.raises(DataNotFoundError, match=re.escape(f"{path}:{line}: ") + what):
        call()


@pytest.fixture
def data_dir(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    return tmp_path


def test_arc_bad_records(data_dir):
    relative = td.TASKS["arc_easy"].files[0]
    path = _write(data_dir, relative, [_arc_line(), _arc_line("B")])
    assert [d["answerKey"] for d in td.load_task_docs("arc_easy")] == ["A", "B"]
    for bad, what in [("{not json", "not valid JSON"), (_arc_line("C"), "answerKey 'C' is not one of"),
                      (json.dumps({"id": "q", "answerKey": "A"}), "missing field 'question'"),
                      (_arc_line().replace('"stem": "Why?"', '"stem": 3'), "field 'question.stem' must be a string")]:
        _write(data_dir, relative, [_arc_line(), _arc_line(), bad])
        td.clear_cache()
        _fails_at("arc_easy", path, 3, what)


def test_piqa_bad_records_and_label_count(data_dir):
    record = json.dumps({"id": "x", "goal": "g", "sol1": "a", "sol2": "b"})
    dev = _write(data_dir, "piqa/dev.jsonl", [record, record])
    labels = _write(data_dir, "piqa/dev-labels.lst", ["1", "0"])
    assert [d["label"] for d in td.load_task_docs("piqa")] == [1, 0]
    _write(data_dir, "piqa/dev-labels.lst", ["1", "2"])
    td.clear_cache()
    _fails_at("piqa", labels, 2, "label must be one of 0, 1")
    _write(data_dir, "piqa/dev-labels.lst", ["1"])
    td.clear_cache()
    with pytest.raises(DataNotFoundError, match=f"{re.escape(str(dev))} has 2 items but {re.escape(str(labels))} "
                                                f"has 1 labels"):
        td.load_task_docs("piqa")
    _write(data_dir, "piqa/dev-labels.lst", ["1", "0"])
    _write(data_dir, "piqa/dev.jsonl", [record, json.dumps({"goal": "g", "sol1": "a", "sol2": 5})])
    td.clear_cache()
    _fails_at("piqa", dev, 2, "field 'sol2' must be a string")
    labels.unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(str(labels)) + ".*CMPQ_DATA_DIR"):
        td.load_task_docs("piqa")


def test_winogrande_bad_records_and_labels(data_dir):
    def line(answer="1", sentence="A beat B so _ won."):
        return json.dumps({"qID": "q", "sentence": sentence, "option1": "A", "option2": "B", "answer": answer})

    dev = _write(data_dir, "winogrande/dev.jsonl", [line("1"), line("2")])
    assert [d["answer"] for d in td.load_task_docs("winogrande")] == ["1", "2"]  # no labels file: fine
    labels = _write(data_dir, "winogrande/dev-labels.lst", ["1", "1"])
    td.clear_cache()
    _fails_at("winogrande", labels, 2, "label '1' disagrees")
    _write(data_dir, "winogrande/dev-labels.lst", ["1", "2"])
    td.clear_cache()
    assert td.load_task_docs("winogrande")[1] == {"sentence": "A beat B so _ won.", "option1": "A", "option2": "B",
                                                  "answer": "2"}
    _write(data_dir, "winogrande/dev.jsonl", [line("1"), line(2)])
    td.clear_cache()
    _fails_at("winogrande", dev, 2, "field 'answer' must be a string")
    _write(data_dir, "winogrande/dev.jsonl", [line("1"), line("3")])
    td.clear_cache()
    _fails_at("winogrande", dev, 2, "answer must be")


def test_boolq_bad_records(data_dir):
    relative = td.TASKS["boolq"].files[0]
    path = _write(data_dir, relative, [_boolq_line(1), _boolq_line(0, "Passage: A\nQuestion: B\nQuestion: is C?")])
    assert td.load_task_docs("boolq") == [{"passage": "P1", "question": "is it", "label": 1},
                                          {"passage": "A\nQuestion: B", "question": "is C", "label": 0}]
    for bad, what in [(_boolq_line(2), "gold must be 0 or 1"), (_boolq_line(True), "field 'gold' must be an integer"),
                      (_boolq_line(1, "P\nQuestion: q?"), "query is not"),
                      (_boolq_line(1, "Passage: P\nQuestion: q"), "query is not"),
                      (json.dumps({"query": "Passage: P\nQuestion: q?", "gold": 1}), "missing field 'choices'")]:
        _write(data_dir, relative, [_boolq_line(), bad])
        td.clear_cache()
        _fails_at("boolq", path, 2, what)


def test_lambada_bad_records(data_dir):
    relative = td.TASKS["lambada_openai"].files[0]
    good = json.dumps({"context": "He said", "continuation": "hello"})
    path = _write(data_dir, relative, [good])
    assert td.load_task_docs("lambada_openai") == [{"text": "He said hello"}]
    for bad, what in [(json.dumps({"context": "He said"}), "missing field 'continuation'"),
                      (json.dumps({"context": "He said", "continuation": "two words"}), "continuation must be one"),
                      ("", "empty line")]:
        _write(data_dir, relative, [good, good, good, bad, good])
        td.clear_cache()
        _fails_at("lambada_openai", path, 4, what)


def test_hellaswag_bad_label_and_truncated_item(data_dir):
    relative = td.TASKS["hellaswag"].files[0]
    item = ["Act: a man. he", "2", "e0", "e1", "e2", "e3"]
    path = _write(data_dir, relative, item + item)
    assert td.load_task_docs("hellaswag")[1] == {"query": "Act: a man. he", "choices": ["e0", "e1", "e2", "e3"],
                                                 "label": "2", "gold": 2}
    _write(data_dir, relative, item + item[:1] + ["4"] + item[2:])
    td.clear_cache()
    _fails_at("hellaswag", path, 8, "label must be 0, 1, 2 or 3")
    _write(data_dir, relative, item + item + item[:4])
    td.clear_cache()
    _fails_at("hellaswag", path, 13, "truncated item 3: the file ends on line 16")


def test_mmlu_bad_records(data_dir):
    relative = td.mmlu_file("anatomy", "dev")
    good = ['"What, if ""anything""?",a,"b,c","multi\nline",d,C', "Q2,a,b,c,d,A"]
    path = _write(data_dir, relative, good)
    rows = td.load_mmlu("anatomy", "dev")
    assert rows[0] == {"question": 'What, if "anything"?', "subject": "anatomy",
                       "choices": ["a", "b,c", "multi\nline", "d"], "answer": 2}
    assert rows[1]["answer"] == 0
    # record 3 starts on line 4 because record 1 spans two lines
    _write(data_dir, relative, good + ["Q3,a,b,c,d,E"])
    td.clear_cache()
    _fails_at(lambda: td.load_mmlu("anatomy", "dev"), path, 4, r"record 3 \(starting on line 4\): answer must be")
    _write(data_dir, relative, good + ["Q3,a,b,c,A"])
    td.clear_cache()
    _fails_at(lambda: td.load_mmlu("anatomy", "dev"), path, 4, r"record 3 \(starting on line 4\) has 5 fields")


# ------------------------------------------------------------------------------------- missing and unknown


def test_missing_file_names_every_place_and_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(sources, "data_dir_candidates", lambda: [tmp_path, tmp_path / "second"])
    for task, spec in td.TASKS.items():
        with pytest.raises(DataNotFoundError) as info:
            td.load_task_docs(task)
        message = str(info.value)
        assert str(tmp_path / spec.files[0]) in message and str(tmp_path / "second" / spec.files[0]) in message
        assert "CMPQ_DATA_DIR" in message, task
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path / "mmlu/val/virology_val.csv")) +
                       "(.|\n)*CMPQ_DATA_DIR"):
        td.load_mmlu("virology", "validation")


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="arc_easy.*lambada_openai"):
        td.load_task_docs("arc_hard")
    with pytest.raises(ConfigError, match="abstract_algebra.*world_religions"):
        td.load_mmlu("astrology", "test")
    with pytest.raises(ConfigError, match="test, dev, val"):
        td.load_mmlu("anatomy", "train")
    with pytest.raises(ConfigError, match="abstract_algebra"):
        td.mmlu_description("astrology")
