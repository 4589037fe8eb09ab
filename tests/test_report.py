"""The documents agree with the records: README.md and docs/*.md are what `make report` renders from
docs/templates/ and benchmarks/results/, and the project speaks to its users only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def test_committed_documents_and_plots_match_their_records(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().err


def test_the_check_fails_when_a_table_differs(monkeypatch, capsys):
    monkeypatch.setitem(report.TABLES, "headline", lambda: "| a table the records do not give |\n")
    assert report.main(["--check"]) == 1
    assert "README.md" in capsys.readouterr().err


def test_tables_are_rendered_from_the_records(tmp_path, monkeypatch):
    import compare_grid

    store = tmp_path / "methods.jsonl"
    records = [json.loads(line) for line in compare_grid.STORE.read_text().splitlines() if line.strip()]
    for record in records:
        if record["method"] == "float":
            record["ppl"]["wikitext2"]["ppl"] = 12345.678
    store.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(compare_grid, "STORE", store)
    assert "12,345.68" in report.table_headline()
    assert report.plot_quality()["wikitext2"]["float"] == 12345.678


def test_every_table_names_its_machine_and_commit():
    for name, table in report.TABLES.items():
        if name == "cli":
            continue
        text = table()
        if "No " in text and "records yet" in text:
            continue
        assert "Measured on " in text and "commit " in text, name


def test_unknown_directive_is_a_clear_error(tmp_path):
    template = tmp_path / "x.md"
    template.write_text("text\n{{table nope}}\n")
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        report.render(template, tmp_path / "x.md", {})


def _tracked_text_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith((".md", ".py", ".c", ".h", ".toml", "Makefile", ".txt"))
            and not f.startswith("tests/") and (ROOT / f).is_file()]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_project_does_not_narrate_its_development():
    pattern = re.compile(r"\bsessions?\b|\bissue \d+|\bissue #\d+", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in _tracked_text_files()
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if pattern.search(line) and "requests.Session" not in line]
    assert not hits, "\n".join(hits[:20])


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
