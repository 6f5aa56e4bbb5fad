"""Reading and checking tabular data (CSV, JSONL): every problem names the row and column it is in."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import orjson

from openmaas.entities.tables import Table
from openmaas.errors import InvalidRequest

TABULAR_FORMATS = ("csv", "jsonl", "parquet")
# A column this numeric is meant to be numeric: a few text cells in it are errors, not categories.
_NUMERIC_SHARE = 0.9
_MAX_CATEGORIES = 1000


def _is_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value)


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file")


def read_table(path: Path, fmt: str) -> Table:
    """Parse and check a CSV (with a header row) or JSONL (one object per line) file."""
    raw = path.read_bytes()
    if not raw.strip():
        raise _fail("the file is empty")
    if fmt == "csv":
        columns, rows = _read_csv(raw)
    elif fmt == "jsonl":
        columns, rows = _read_jsonl(raw)
    elif fmt == "parquet":
        columns, rows = _read_parquet(raw)
    else:
        raise _fail(f"unsupported dataset format '{fmt}'; use one of {', '.join(TABULAR_FORMATS)} or an image zip")
    if not rows:
        raise _fail("the file has a header but no data rows")
    cells = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    kinds: dict[str, str] = {}
    for c in columns:
        values = cells[c]
        for i, v in enumerate(values):
            if v == "":
                raise _fail(f"row {i + 1}, column '{c}': the value is missing")
        numeric = [_is_number(v) for v in values]
        share = sum(numeric) / len(values)
        if share == 1.0:
            kinds[c] = "number"
        elif share >= _NUMERIC_SHARE:
            bad = numeric.index(False)
            raise _fail(f"row {bad + 1}, column '{c}': '{values[bad][:40]}' is not a number (the column is numeric)")
        else:
            kinds[c] = "category"
            distinct = len(set(values))
            if distinct > _MAX_CATEGORIES and distinct > len(values) // 2:
                kinds[c] = "text"
    return Table(columns, cells, kinds)


def _delimiter(text: str) -> str:
    """The header row's separator: a comma, or a semicolon or tab where the header has no comma (spreadsheets in
    locales with a decimal comma write semicolons)."""
    header = text.split("\n", 1)[0]
    if "," in header:
        return ","
    return max((";", "\t"), key=header.count) if (";" in header or "\t" in header) else ","


def _read_csv(raw: bytes) -> tuple[list[str], list[list[str]]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(f"the file is not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text), delimiter=_delimiter(text))
    try:
        header = next(reader)
    except StopIteration:
        raise _fail("the file is empty") from None
    columns = [h.strip() for h in header]
    if not all(columns):
        raise _fail("the header row has an empty column name")
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise _fail(f"the header names column '{dup}' twice")
    rows: list[list[str]] = []
    for n, row in enumerate(reader, start=1):
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) != len(columns):
            raise _fail(f"row {n} has {len(row)} fields; the header has {len(columns)}")
        rows.append([v.strip() for v in row])
    return columns, rows


def _read_parquet(raw: bytes) -> tuple[list[str], list[list[str]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowInvalid, OSError) as e:
        raise _fail(f"the file is not a readable Parquet file: {e}") from None
    columns = [str(c) for c in table.column_names]
    data = table.to_pydict()
    rows = [["" if data[c][i] is None else str(data[c][i]) for c in columns] for i in range(table.num_rows)]
    return columns, rows


def _read_jsonl(raw: bytes) -> tuple[list[str], list[list[str]]]:
    columns: list[str] | None = None
    rows: list[list[str]] = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _fail(f"line {n} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise _fail(f"line {n} is not a JSON object")
        if columns is None:
            columns = list(obj)
        missing = [c for c in columns if c not in obj]
        if missing:
            raise _fail(f"line {n} lacks column '{missing[0]}'")
        extra = [k for k in obj if k not in columns]
        if extra:
            raise _fail(f"line {n} has column '{extra[0]}' that line 1 does not")
        rows.append(["" if obj[c] is None else str(obj[c]) for c in columns])
    return columns or [], rows
