"""Query results as text: a table for people, CSV and JSON for programs.

``csv`` and ``json`` are lossless: a double is written as the shortest text that reads back
as the same double, integers of any size as integers, DECIMAL values with their exact
digits, timestamps as ISO 8601 (with the zone when the column has one), lists as lists. The
two spellings a value needs beyond that are documented in ``raydiff sql --help`` and the
README:

- JSON has no NaN or infinity: they are the strings ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"``; CSV writes ``nan``, ``inf`` and ``-inf`` (what Python's ``float`` and
  pandas read).
- BLOBs (the ``mask`` column) are standard base64 with padding in both; a list or struct
  in a CSV cell is its JSON text.

CSV cells are quoted only where needed.

``table`` is for the eye: floats are rounded to 6 significant digits and BLOBs shown as
``<N bytes>``; pipe ``--format csv`` or ``json`` into programs.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

FORMATS = ("table", "csv", "json")


def render(table: pa.Table, fmt: str) -> str:
    """A result table as text in ``fmt`` (``table``, ``csv`` or ``json``).

    Example:
        >>> render(pa.table({"x": [1 / 3]}), "json")
        '[\\n{"x": 0.3333333333333333}\\n]'
    """
    if fmt == "json":
        return to_json(table)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "table":
        return to_text(table)
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# -- JSON ----------------------------------------------------------------------------------


def to_json(table: pa.Table) -> str:
    """A JSON array with one object per row, one row per line. A column name that repeats
    an earlier one (``SELECT 1 AS a, 2 AS a``) gets a suffix (``a_1``), as DuckDB gives it
    when it makes a table of such a result, so no value is lost to a duplicate key."""
    names = _unique(table.column_names)
    rows = [dict(zip(names, r)) for r in _tuples(table)]
    return "[\n" + ",\n".join(json_value(r) for r in rows) + "\n]" if rows else "[]"


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for n in names:
        k, i = n, 0
        while k in seen:
            i += 1
            k = f"{n}_{i}"
        seen.add(k)
        out.append(k)
    return out


def _tuples(table: pa.Table) -> list[tuple]:
    cols = [c.to_pylist() for c in table.columns]
    return list(zip(*cols))


def json_value(v: Any) -> str:
    """One value as JSON text, losslessly (see the module docstring for the spellings)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return '"NaN"'
        if math.isinf(v):
            return '"Infinity"' if v > 0 else '"-Infinity"'
        return repr(v)  # the shortest text that reads back as this double
    if isinstance(v, decimal.Decimal):
        return _decimal(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return json.dumps(base64.b64encode(bytes(v)).decode("ascii"))
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {json_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(json_value(x) for x in v) + "]"
    return json.dumps(_scalar_text(v), ensure_ascii=False)


def _decimal(d: decimal.Decimal) -> str:
    if not d.is_finite():
        return '"NaN"' if d.is_nan() else ('"Infinity"' if d > 0 else '"-Infinity"')
    return format(d, "f")  # every digit of the DECIMAL, no exponent


def _scalar_text(v: Any) -> str:
    """ISO 8601 for times, durations and dates; ``str`` for the rest (UUIDs…)."""
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return _iso_duration(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    return str(v)


def _iso_duration(d: dt.timedelta) -> str:
    sign = "-" if d < dt.timedelta(0) else ""
    d = abs(d)
    secs = d.seconds + d.microseconds / 1e6
    return f"{sign}P{d.days}DT{secs:g}S"


# -- CSV -----------------------------------------------------------------------------------


def to_csv(table: pa.Table) -> str:
    """CSV with a header row, quoted only where a cell needs it (Python's ``csv``, as pandas
    and DuckDB write it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    w.writerows([[_csv_cell(v) for v in row] for row in _tuples(table)])
    return buf.getvalue().rstrip("\n")


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # floats: the shortest text that reads back as this double; nan, inf, -inf
    if isinstance(v, decimal.Decimal):
        return format(v, "f")
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, (list, tuple, Mapping)):
        return json_value(v)
    return _scalar_text(v)


# -- table ---------------------------------------------------------------------------------


def to_text(table: pa.Table, width: int | None = None) -> str:
    """An aligned table for the eye (floats to 6 significant digits), drawn by rich."""
    from rich.box import SIMPLE_HEAD
    from rich.console import Console
    from rich.table import Table

    out = Table(box=SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in table.column_names:
        out.add_column(name, overflow="fold")
    for row in _tuples(table):
        out.add_row(*(_eye(v) for v in row))
    console = Console(file=io.StringIO(), width=width or 100_000, color_system=None, highlight=False,
                      soft_wrap=False)
    console.print(out)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines() if line.strip())


def _eye(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_eye(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_eye(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (dt.datetime, dt.date, dt.time, dt.timedelta, uuid.UUID)):
        return _scalar_text(v)
    return str(v)
