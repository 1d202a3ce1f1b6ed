"""scripts.bench.instructions --edit: the edit function read from a file (the rest needs valgrind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.bench import instructions


def test_load_edit_returns_the_files_edit_function(tmp_path: Path) -> None:
    source = tmp_path / "edit.py"
    source.write_text(
        'def edit(files):\n    return {**files, "http.conf": files["http.conf"] + "# edited\\n"}\n'
    )
    edit = instructions.load_edit(source)
    assert edit({"http.conf": "x;\n", "servers.conf": "y;\n"}) == {
        "http.conf": "x;\n# edited\n",
        "servers.conf": "y;\n",
    }


def test_load_edit_refuses_a_file_without_edit(tmp_path: Path) -> None:
    source = tmp_path / "edit.py"
    source.write_text("EDIT = 1\n")
    with pytest.raises(RuntimeError, match="defines no edit"):
        instructions.load_edit(source)
