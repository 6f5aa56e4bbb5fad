"""Reading uploaded tables: separators, and problems named by row and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from openmaas.datasets.parse import read_table
from openmaas.errors import InvalidRequest


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_comma_semicolon_and_tab_separated_files_read_alike(tmp_path: Path, sep: str) -> None:
    """Spreadsheets in locales with a decimal comma save CSV with semicolons: they read as columns, not as one
    column whose cells hold the whole row."""
    rows = ["size", "colour", "label"], ["1.5", "red", "a"], ["2.0", "blue", "b"], ["3.5", "red", "a"]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    table = read_table(path, "csv")
    assert table.columns == ["size", "colour", "label"]
    assert table.kinds["size"] == "number" and table.cells["colour"] == ["red", "blue", "red"]


def test_a_row_with_the_wrong_number_of_fields_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a;b\n1;2\n3;4;5\n")
    with pytest.raises(InvalidRequest, match="row 2 has 3 fields; the header has 2"):
        read_table(path, "csv")
