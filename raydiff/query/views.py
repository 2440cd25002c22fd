"""DuckDB over a store: the catalog and the files of its runs as tables, the views on top.

Opening a store reads its catalog (:mod:`raydiff.store.catalog`: a listing and a few small
files) and registers each kind of record as an Arrow dataset whose files are named from the
catalog, each tagged with its run (``raw_plan``, ``raw_tensor``, ``raw_unit``,
``raw_spectrum``): nothing under ``runs/`` is opened until a query reads it, and a query that
names its runs (``WHERE run_id = …``, or ``run_ref('name')``, which DuckDB folds into a
constant) opens only their files. Those files are written once and never removed, so a
connection never finds one gone: results are those of complete runs, and an incomplete run
shows how far it got (``raw_progress``, from listing its unit files). The catalog
(``raw_run``, ``raw_commit``), ``raydiff watch``'s events (``raw_watch_event``) and the
steps of chains (``raw_chain_step``) are read when the store is opened.

The views (``runs``, ``tensors``, ``units``, ``masks``…) come from the ``.sql`` files shipped
in ``raydiff.queries``, run in file-name order. After setup the connection cannot touch
files: external access is disabled and the configuration locked, so ``raydiff sql`` is
read-only whatever the query says.
"""

from __future__ import annotations

import math
import re
from importlib.resources import files

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from raydiff.errors import QueryError, RaydiffError, RunNotFound
from raydiff.options import ATOL_LADDER, ladder_name
from raydiff.query.overlap import (CHAIN_TYPE, CONSENSUS_TYPE, OVERLAP_TYPE, PAIRS_TYPE, PROFILE_TYPE, chain_units,
                                   consensus_units, overlap_units, pairs_units, profile_units)
from raydiff.records import STATUS_OK, PlanRecord, SpectrumRecord, TensorRecord, UnitRecord, from_table, schema
from raydiff.store import Store, layout


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

    Raises:
        StoreError: the store is unreadable, or of a layout to upgrade first.

    Example:
        >>> con = connect("./raydiff-store")  # doctest: +SKIP
        >>> con.sql("SELECT name, sparsity FROM runs").fetchall()  # doctest: +SKIP
    """
    store = Store(store) if isinstance(store, str) else store
    store.check_layout()
    cat = store.catalog()
    complete = cat.complete
    incomplete = [r for r in cat.run_ids if r not in complete]
    has_spectra = {r for r, n in zip(cat.commits.column("run_id").to_pylist(),
                                      cat.commits.column("n_spectra").to_pylist()) if n}
    con = duckdb.connect(":memory:")
    con.register("raw_run", cat.runs)
    con.register("raw_commit", cat.commits)
    con.register("raw_plan", _dataset(store, PlanRecord, [(r, layout.plan_file(r)) for r in cat.run_ids]))
    con.register("raw_tensor", _dataset(store, TensorRecord, [(r, layout.tensors_file(r)) for r in sorted(complete)]))
    con.register("raw_unit", _dataset(store, UnitRecord, [(r, layout.units_file(r)) for r in sorted(complete)]))
    con.register("raw_spectrum", _dataset(store, SpectrumRecord,
                                          [(r, layout.spectra_file(r)) for r in sorted(has_spectra)]))
    con.register("raw_progress", _progress(store, incomplete))
    con.register("raw_watch_event", store.events().read())
    con.register("raw_chain_step", store.chains().read())
    _functions(con, store, cat)
    for fname, text in sql_files(ladder):
        try:
            con.execute(text)
        except duckdb.Error as e:  # a broken shipped view is a bug, but say which file
            raise QueryError(f"view definition {fname} failed: {e}") from None
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _dataset(store: Store, kind: type, files_of: list[tuple[str, str]]) -> pads.Dataset | pa.Table:
    """Files of one record kind, each of one run, as a dataset that opens none of them until
    scanned. Each file is tagged with its run, and the files are grouped by run id into about
    √N datasets tagged with their id range, so a filter on ``run_id`` skips whole groups and
    then files, unread: its cost grows like √N in the runs stored, not N."""
    s = schema(kind)
    if not files_of:
        return s.empty_table()
    files_of = sorted(files_of)
    size = max(16, math.isqrt(len(files_of)) + 1)
    groups = []
    for i in range(0, len(files_of), size):
        part = files_of[i:i + size]
        run = pads.field("run_id")
        groups.append(pads.FileSystemDataset.from_paths(
            [store.path(rel) for _, rel in part], schema=s, format=pads.ParquetFileFormat(), filesystem=store.fs,
            partitions=[run == r for r, _ in part], root_partition=(run >= part[0][0]) & (run <= part[-1][0])))
    return groups[0] if len(groups) == 1 else pads.UnionDataset(s, groups)


def _progress(store: Store, run_ids: list[str]) -> pa.Table:
    """How far each incomplete run got: its unit and spectrum files, counted by listing them
    (one listing each, no file opened: a run committed meanwhile cannot fail a query)."""
    rows = [(r, len(store.done_units(r)), len(store.done_spectra(r))) for r in run_ids]
    return pa.table({"run_id": pa.array([r[0] for r in rows], pa.string()),
                     "units_done": pa.array([r[1] for r in rows], pa.int64()),
                     "spectra_done": pa.array([r[2] for r in rows], pa.int64())})


def _functions(con: duckdb.DuckDBPyConnection, store: Store, cat) -> None:
    """The store's Python functions: ``run_ref`` (folded into a constant by DuckDB, so a
    filter on it opens one run's files) and the mask intersections behind the macros."""
    complete = cat.complete
    latest = cat.latest_by_name()

    def run_ref(x: str) -> str:
        if x in complete:
            return x
        if x in latest:
            return latest[x]
        raise RunNotFound(f"no complete run has id or name {x!r}; see `raydiff runs`")

    runs = {r["run_id"]: r for r in cat.runs.select(["run_id", "base", "base_fingerprint", "chunk_elems"]).to_pylist()}

    def pair_problem(a: str, b: str) -> str | None:
        """Why two runs' masks do not line up element for element, or NULL when they do."""
        ra, rb = runs.get(a), runs.get(b)
        if ra is None or rb is None:
            return None
        if (ra["base"], ra["base_fingerprint"]) != (rb["base"], rb["base_fingerprint"]):
            return (f"runs {a} and {b} have different bases ({ra['base']} vs {rb['base']}); overlap is only "
                    "defined for finetunes of one base")
        if ra["chunk_elems"] != rb["chunk_elems"]:
            return (f"runs {a} and {b} were cut into units of {ra['chunk_elems']} and {rb['chunk_elems']} "
                    f"elements; resubmit one with --chunk-elems {ra['chunk_elems']}")
        return None

    memo: dict[tuple, list] = {}

    def mask_overlap(a: str, b: str) -> list:
        if (a, b) not in memo:
            memo[(a, b)] = overlap_units(store, a, b)
        return memo[(a, b)]

    def mask_consensus(ids: list[str]) -> list:
        key = tuple(ids)
        if key not in memo:
            memo[key] = consensus_units(store, ids)
        return memo[key]

    def mask_pairs(ids: list[str]) -> list:
        key = ("pairs", *ids)
        if key not in memo:
            memo[key] = pairs_units(store, ids)
        return memo[key]

    def mask_chain(vs_base: list[str], vs_prev: list[str]) -> list:
        key = ("chain", *vs_base, "|", *vs_prev)
        if key not in memo:
            missing = [r for r in (*vs_base, *vs_prev) if r not in complete]
            if missing:  # a chain step is recorded only once its runs are complete
                raise QueryError(f"run {missing[0]} of the chain is not complete in this store")
            memo[key] = chain_units(store, vs_base, vs_prev)
        return memo[key]

    def mask_profile(run_id: str, tensor: str) -> list:
        plan = {p.tensor: p for p in from_table(store.read(layout.plan_file(run_id), PlanRecord), PlanRecord)}
        p = plan.get(tensor)
        if p is None or p.status != STATUS_OK:
            why = "has no tensor" if p is None else f"did not compare (status {p.status})"
            raise QueryError(f"run {run_id} {why} {tensor!r}; the tensors view lists what it compared")
        if not p.row_len:
            raise QueryError(f"tensor {tensor!r} is 1-D: it has no rows and columns to profile")
        return profile_units(store, run_id, tensor, p.row_len)

    con.create_function("run_ref", run_ref, ["VARCHAR"], "VARCHAR", side_effects=False)
    con.create_function("mask_pairs", mask_pairs, ["VARCHAR[]"], PAIRS_TYPE, side_effects=False)
    con.create_function("mask_profile", mask_profile, ["VARCHAR", "VARCHAR"], PROFILE_TYPE, side_effects=False)
    con.create_function("_pair_problem", pair_problem, ["VARCHAR", "VARCHAR"], "VARCHAR", side_effects=False,
                        null_handling="special")
    con.create_function("mask_overlap", mask_overlap, ["VARCHAR", "VARCHAR"], OVERLAP_TYPE, side_effects=False)
    con.create_function("mask_consensus", mask_consensus, ["VARCHAR[]"], CONSENSUS_TYPE, side_effects=False)
    con.create_function("mask_chain", mask_chain, ["VARCHAR[]", "VARCHAR[]"], CHAIN_TYPE, side_effects=False)


_UDF_ERROR = re.compile(r"^.*?Python exception occurred while executing the UDF: (\w+): ")


def one_line(e: BaseException) -> str:
    """DuckDB's message without its ``LINE 1:`` excerpt and caret: errors stay one line. An
    error raised by raydiff inside one of its functions keeps its own message."""
    text = str(e).strip()
    text = " ".join(part.strip() for part in text.split("\n\n", 1)[0].splitlines() if part.strip())
    m = _UDF_ERROR.match(text)
    if m and m.group(1) in _RAYDIFF_ERRORS:
        text = text[m.end():]
    return text


_RAYDIFF_ERRORS = {c.__name__ for c in (RaydiffError, *RaydiffError.__subclasses__())}


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
        return cols, (rel.fetchall() if rel.description else [])
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    finally:
        con.close()


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
