"""DuckDB over a store: the raw Parquet files registered as tables, the views on top.

The store's files are registered as Arrow datasets (``raw_run``, ``raw_plan``, ``raw_unit``,
``raw_spectrum``, ``raw_tensor``, ``raw_commit``), which works for local and object-store
roots alike; the views (``runs``, ``tensors``, ``units``, ``masks``, ``spectra``, ``plan``…)
come from the ``.sql`` files shipped in ``raydiff.queries``, run in file-name order. After
setup the connection cannot touch files: external access is disabled and the
configuration locked, so ``raydiff sql`` is read-only whatever the query says.
"""

from __future__ import annotations

import re
from importlib.resources import files

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from raydiff.errors import QueryError
from raydiff.options import ATOL_LADDER, ladder_name
from raydiff.query.overlap import and_count_arrow, histogram_arrow
from raydiff.records import RECORD_KINDS, schema
from raydiff.store.base import EVENT_FILE, Store

#: raw table name → (record kind, pattern of its files relative to ``runs/``)
_RAW = {
    "raw_run": ("run", re.compile(r"^[0-9a-f]+/run\.parquet$")),
    "raw_plan": ("plan", re.compile(r"^[0-9a-f]+/plan\.parquet$")),
    "raw_unit": ("unit", re.compile(r"^[0-9a-f]+/units/u\d+\.parquet$")),
    "raw_spectrum": ("spectrum", re.compile(r"^[0-9a-f]+/spectra/s\d+\.parquet$")),
    "raw_tensor": ("tensor", re.compile(r"^[0-9a-f]+/tensors\.parquet$")),
    "raw_commit": ("commit", re.compile(r"^[0-9a-f]+/commit\.parquet$")),
}
#: raw tables whose files live outside ``runs/`` (``raw_watch_event``: ``raydiff watch``'s log):
#: name → (record kind, folder under the root, file-name pattern)
_RAW_ELSEWHERE = {
    "raw_watch_event": ("watch_event", "watch/events", EVENT_FILE),
}


def sql_files(ladder: tuple[float, ...] = ATOL_LADDER) -> list[tuple[str, str]]:
    """``(file name, SQL text)`` of every view definition shipped with raydiff, in order, with
    the ladder's lines expanded (:func:`expand_ladder`)."""
    root = files("raydiff.queries")
    return sorted((p.name, expand_ladder(p.read_text(encoding="utf-8"), ladder))
                  for p in root.iterdir() if p.name.endswith(".sql"))


_LADDER_LINE = "-- {ladder}"


def expand_ladder(sql: str, ladder: tuple[float, ...]) -> str:
    """A view definition with each line ending in ``-- {ladder}`` written once per step of
    ``ladder``: ``{name}`` is the step's column suffix (:func:`raydiff.options.ladder_name`),
    ``{t}`` its value, ``{label}`` its shortest text, ``{i}`` its position from 1;
    ``{steps}`` anywhere is the number of steps.

    Example:
        >>> expand_ladder("x_{name} AS y,  -- {ladder}", (1e-8, 1e-4))
        'x_1e8 AS y,\nx_1e4 AS y,'
    """
    out = []
    for line in sql.splitlines():
        if line.rstrip().endswith(_LADDER_LINE):
            body = line.rstrip()[: -len(_LADDER_LINE)].rstrip()
            for i, t in enumerate(ladder, 1):
                out.append(body.replace("{name}", ladder_name(t)).replace("{t}", repr(float(t)))
                           .replace("{label}", f"{t:g}").replace("{i}", str(i)))
        else:
            out.append(line)
    return "\n".join(out).replace("{steps}", str(len(ladder)))


def connect(store: Store | str, ladder: tuple[float, ...] = ATOL_LADDER) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's tables and views, read-only.

    ``ladder`` names the views' per-tolerance columns (``changed_1e8`` …): a run's counts are
    looked up by value in its own ladder, NULL for a step it did not count.

    Example:
        >>> con = connect("./raydiff-store")  # doctest: +SKIP
        >>> con.sql("SELECT name, sparsity FROM runs").fetchall()  # doctest: +SKIP
    """
    store = Store(store) if isinstance(store, str) else store
    fs = store.fs
    runs_dir = store.path("runs")
    sel = pafs.FileSelector(runs_dir, recursive=True, allow_not_found=True)
    found: dict[str, list[str]] = {name: [] for name in _RAW}
    for info in fs.get_file_info(sel):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(runs_dir):].lstrip("/")
        for name, (_, pattern) in _RAW.items():
            if pattern.match(rel):
                found[name].append(info.path)
    con = duckdb.connect(":memory:")
    for name, (kind, _) in _RAW.items():
        s = schema(RECORD_KINDS[kind])
        paths = sorted(found[name])
        source = pads.dataset(paths, schema=s, format="parquet", filesystem=fs) if paths else s.empty_table()
        con.register(name, source)
    for name, (kind, folder, pattern) in _RAW_ELSEWHERE.items():
        s = schema(RECORD_KINDS[kind])
        sel = pafs.FileSelector(store.path(folder), allow_not_found=True)
        paths = sorted(i.path for i in fs.get_file_info(sel)
                       if i.type == pafs.FileType.File and pattern.match(i.base_name))
        con.register(name, pads.dataset(paths, schema=s, format="parquet", filesystem=fs) if paths else s.empty_table())
    con.create_function("mask_and_count", and_count_arrow,
                        ["VARCHAR", "BLOB", "VARCHAR", "BLOB", "BIGINT"], "BIGINT", type="arrow")
    con.create_function("mask_histogram", histogram_arrow, ["VARCHAR[]", "BLOB[]", "BIGINT"], "BIGINT[]", type="arrow")
    for fname, text in sql_files(ladder):
        try:
            con.execute(text)
        except duckdb.Error as e:  # a broken shipped view is a bug, but say which file
            raise QueryError(f"view definition {fname} failed: {e}") from None
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def one_line(e: BaseException) -> str:
    """DuckDB's message without its ``LINE 1:`` excerpt and caret: errors stay one line."""
    text = str(e).strip()
    return " ".join(part.strip() for part in text.split("\n\n", 1)[0].splitlines() if part.strip())


def query(store: Store | str, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement over a store; returns ``(column names, rows)``.

    ``params`` are bound to the statement's ``?`` placeholders.

    Raises:
        QueryError: the SQL is invalid or fails (the message is DuckDB's).
    """
    con = connect(store)
    try:
        rel = con.execute(sql, params or [])
        cols = [d[0] for d in rel.description] if rel.description else []
        rows = rel.fetchall() if rel.description else []
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    finally:
        con.close()
    return cols, rows


def query_table(store: Store | str, sql: str, params: list | None = None) -> pa.Table:
    """:func:`query`, with the result as an Arrow table (types kept exactly, for export).

    Raises:
        QueryError: the SQL is invalid or fails (the message is DuckDB's).
    """
    con = connect(store)
    try:
        return arrow_result(con, sql, params)
    finally:
        con.close()


def arrow_result(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pa.Table:
    """One statement on an open connection as an Arrow table (empty for a statement without rows).

    Raises:
        QueryError: the SQL is invalid or fails (the message is DuckDB's).
    """
    try:
        rel = con.sql(sql, params=params or None)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
