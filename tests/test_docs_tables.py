"""The tables in README.md and docs/ are the ones benchmarks/docs_tables.py writes from benchmarks/results/."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tables)

# Column headings that only a measurement fills; such a table must come from the results.
MEASURED = re.compile(r"\bppl\b|perplexity|\bKL\b|\bms\b|tok/s|GB/s|speed-up|peak", re.I)


def test_every_doc_table_is_current_with_the_results(capsys):
    assert docs_tables.main(["--check"]) == 0, capsys.readouterr().err


def test_a_table_edited_by_hand_is_found():
    text = "intro\n<!-- table: allocate -->\n| linears | median ms |\n|---|---|\n| 500 | 1 |\n<!-- /table -->\nafter\n"
    new, changed = docs_tables.regenerate(text, "doc.md")
    assert changed == ["allocate"]
    assert new.startswith("intro\n<!-- table: allocate -->\nFrom ") and new.endswith("<!-- /table -->\nafter\n")
    assert docs_tables.regenerate(new, "doc.md") == (new, [])


def test_an_unknown_table_name_is_refused():
    with pytest.raises(SystemExit, match="no table named 'nonesuch'"):
        docs_tables.regenerate("<!-- table: nonesuch -->\n<!-- /table -->\n", "doc.md")


def test_every_doc_names_only_known_tables_and_every_table_is_shown():
    used = [m.group("name") for path in docs_tables.doc_files() for m in docs_tables.MARKER.finditer(path.read_text())]
    assert set(used) <= set(docs_tables.TABLES)
    assert set(docs_tables.TABLES) <= set(used), "a table nobody shows: drop it or place it in a doc"


def test_measured_tables_appear_only_between_markers():
    for path in docs_tables.doc_files():
        outside = docs_tables.MARKER.sub("", path.read_text())
        heads = [line for i, line in enumerate(outside.splitlines()) if line.lstrip().startswith("|")
                 and i + 1 < len(outside.splitlines()) and outside.splitlines()[i + 1].lstrip().startswith("|--")]
        assert not [h for h in heads if MEASURED.search(h)], f"{path.name}: a measured table written by hand"


def test_every_result_names_its_machine_and_command():
    results = sorted((ROOT / "benchmarks" / "results").glob("*/*.json"))
    assert results
    for path in results:
        data = json.loads(path.read_text())
        assert "machine" in data, path
        assert "command" in data or "commands" in data or "command" in data["machine"], path


def test_results_live_in_one_folder_per_benchmark():
    assert not [p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file()]
