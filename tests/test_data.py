import json
import random

import pytest
import torch

from cmpq.config import CalibConfig
from cmpq.data import sources
from cmpq.data.sampling import calibration_windows, sample_windows
from cmpq.errors import DataNotFoundError
from cmpq.models.tiny import tiny_tokenizer


def test_wikitext2_rows_follow_the_hf_loader():
    path = sources.find_data_file(sources.WIKITEXT2_TEST)
    assert path is not None, f"shared data not found in {sources.data_dir_candidates()}"
    rows = sources.wikitext2_rows(path)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(r == "" for r in rows) == 1467
    text, _ = sources.load_eval_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n" + "\n\n" + "" + "\n\n" + " Robert Boulter is")


def test_c4_eval_and_calibration_use_disjoint_documents():
    with open(sources.find_data_file(sources.C4_SAMPLE), encoding="utf-8") as handle:
        docs = [json.loads(line)["text"] for line in handle]  # read independently of the loader
    assert len(docs) == 2000
    eval_text, eval_source = sources.load_eval_text("c4")
    calib_text, calib_source = sources.load_calibration_text("c4")
    assert eval_text == " ".join(docs[:1000]) and calib_text == " ".join(docs[1000:])
    assert "docs 0..999" in eval_source and "docs 1000..1999" in calib_source


def test_missing_data_lists_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(sources, "data_dir_candidates", lambda: [tmp_path])
    monkeypatch.setattr(sources, "_hub_available", lambda: False)
    sources._c4_docs.cache_clear()
    try:
        with pytest.raises(DataNotFoundError, match=str(tmp_path / sources.WIKITEXT2_TEST)):
            sources.load_eval_text("wikitext2")
        with pytest.raises(DataNotFoundError, match="CMPQ_DATA_DIR"):
            sources.load_eval_text("c4")
    finally:
        sources._c4_docs.cache_clear()


def test_data_dir_env_var_is_searched_first(monkeypatch, tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / sources.WIKITEXT2_TEST).write_text(" \n = A = \n", encoding="utf-8")
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    text, source = sources.load_eval_text("wikitext2")
    assert text == "\n\n = A = \n" and source == str(tmp_path / sources.WIKITEXT2_TEST)


def test_c4_parquet_is_read_when_the_json_lines_are_absent(monkeypatch, tmp_path):
    pytest.importorskip("pyarrow")
    parquet = sources.find_data_file(sources.C4_SAMPLE_PARQUET)
    (tmp_path / "c4").mkdir()
    (tmp_path / sources.C4_SAMPLE_PARQUET).symlink_to(parquet)
    monkeypatch.setattr(sources, "data_dir_candidates", lambda: [tmp_path])
    sources._c4_docs.cache_clear()
    try:
        text, source = sources.load_eval_text("c4")
        assert source.endswith(".parquet docs 0..999")
    finally:
        sources._c4_docs.cache_clear()
    assert text == sources.load_eval_text("c4")[0]


def test_malformed_c4_line_names_file_and_line(tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataNotFoundError, match=r"c4.jsonl:2"):
        sources.read_c4_docs(path)


def test_windows_follow_gptq_sampler():
    ids = torch.arange(1000)[None]
    got = sample_windows(ids, nsamples=5, seqlen=64, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 64 - 1) for _ in range(5)]
    assert torch.equal(got, torch.stack([ids[0, s:s + 64] for s in starts]))
    assert torch.equal(got, sample_windows(ids, 5, 64, 0))
    assert not torch.equal(got, sample_windows(ids, 5, 64, 1))
    with pytest.raises(DataNotFoundError, match="too few"):
        sample_windows(ids, 1, 1000, 0)
    assert sample_windows(ids, 3, 999, 0).shape == (3, 999)  # seqlen + 1 tokens suffice, as in GPTQ


def test_calibration_from_a_text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    windows, source = calibration_windows(tiny_tokenizer(), CalibConfig(source=str(path), nsamples=4, seqlen=32))
    assert windows.shape == (4, 32) and source == str(path)
    with pytest.raises(DataNotFoundError, match="neither c4, c4-chat, wikitext2 nor an existing text file"):
        calibration_windows(tiny_tokenizer(), CalibConfig(source=str(tmp_path / "nope.txt")))


def test_chat_turns_split_first_line_then_first_sentence():
    from cmpq.data.chat import split_turns

    assert split_turns("Title line\nFirst answer.\nSecond.") == ("Title line", "First answer.\nSecond.")
    assert split_turns("  One line. Then more? Yes.  ") == ("One line.", "Then more? Yes.")
    assert split_turns("no sentence end") == ("no sentence end", "")


def test_c4_chat_calibration_renders_protocol_documents_in_the_template():
    from cmpq.data.chat import render_conversations, split_turns

    tokenizer = tiny_tokenizer()
    with pytest.raises(DataNotFoundError, match="c4-chat.*has none"):
        calibration_windows(tokenizer, CalibConfig(source="c4-chat", nsamples=2, seqlen=16))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
                               "{% endfor %}")
    windows, source = calibration_windows(tokenizer, CalibConfig(source="c4-chat", nsamples=3, seqlen=64))
    assert windows.shape == (3, 64) and "docs 1000..1999 as chat conversations" in source
    plain, _ = calibration_windows(tokenizer, CalibConfig(source="c4", nsamples=3, seqlen=64))
    assert not torch.equal(windows, plain)
    docs, _ = sources.c4_calibration_docs()
    user, assistant = split_turns(docs[0])
    text = render_conversations(tokenizer, docs[:2], "c4-chat")
    assert text.startswith(f"<|user|>{user}<|end|>\n<|assistant|>{assistant}<|end|>\n<|user|>")
