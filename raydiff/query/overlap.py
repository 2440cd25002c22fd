"""Intersections of stored change masks, read from the files of exactly the runs asked about.

:func:`overlap_units` and :func:`consensus_units` read the ``units.parquet`` of the complete
runs they are given, row group by row group (one tensor each), pair units by
``(tensor, start, stop)`` and count intersections in a thread pool — decompression and
popcounts release the GIL — so their cost is the masks of those runs, not the store's size.
:func:`raydiff.query.views.connect` registers them as the DuckDB functions behind the
``overlap``, ``overlap_total`` and ``consensus`` macros (``queries/30_overlap.sql``);
:func:`chain_units` combines the masks of a chain's runs (OR and AND NOT) for the
``chain_steps`` and ``chain_summary`` macros (``queries/55_chains.sql``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.errors import StoreError
from raydiff.kernel.masks import CODEC_EMPTY, decode_packed
from raydiff.store import Store, layout

#: Columns of the ``overlap`` / ``overlap_total`` macros after ``tensor``.
OVERLAP_COLUMNS = ("numel", "changed_a", "changed_b", "changed_both", "o1", "o2", "jaccard",
                   "o1_random", "o2_random", "jaccard_random")
_KEY = ("tensor", "start", "stop")
_COLS = ["tensor", "start", "stop", "changed", "mask_codec", "mask"]
OVERLAP_TYPE = duckdb.list_type(duckdb.struct_type(
    {"tensor": "VARCHAR", "numel": "BIGINT", "changed_a": "BIGINT", "changed_b": "BIGINT", "changed_both": "BIGINT"}))
CONSENSUS_TYPE = duckdb.list_type(duckdb.struct_type(
    {"tensor": "VARCHAR", "numel": "BIGINT", "histogram": "BIGINT[]"}))


def and_count(codec_a: str, mask_a: bytes, codec_b: str, mask_b: bytes, n: int) -> int:
    """Number of elements set in both of two stored masks of ``n`` elements.

    Example:
        >>> from raydiff.kernel.masks import encode_mask
        >>> a = encode_mask(np.array([1, 1, 0, 1], bool)); b = encode_mask(np.array([0, 1, 1, 1], bool))
        >>> and_count(*a, *b, 4)
        2
    """
    if codec_a == CODEC_EMPTY or codec_b == CODEC_EMPTY:
        return 0
    from raydiff.kernel._gaps import and_count as packed_and_count

    return int(packed_and_count(decode_packed(codec_a, mask_a, n), decode_packed(codec_b, mask_b, n)))


def count_histogram(packed: Sequence[np.ndarray | None], n: int) -> list[int]:
    """For R masks over the same ``n`` elements, packed (``None`` for one with nothing set):
    how many elements are set in exactly k of them, for k = 0 … R (the consensus histogram)."""
    counts = np.zeros(n, dtype=np.uint16)
    for bits in packed:
        if bits is not None:
            counts += np.unpackbits(bits, count=n, bitorder="little")
    return np.bincount(counts, minlength=len(packed) + 1).tolist()


class _Units:
    """One complete run's ``units.parquet``: where each unit is (row group, row), and its
    row groups read by whichever thread asks, each thread through a file of its own."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.run_id = run_id
        self.path, self.fs = store.path(layout.units_file(run_id)), store.fs
        self._local = threading.local()
        meta = self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.groups = len(sizes)
        keys = self.file.read(columns=list(_KEY))
        group_of = np.repeat(np.arange(len(sizes)), sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.keys = list(zip(*(keys.column(c).to_pylist() for c in _KEY)))
        self.where = {k: (int(g), i - int(offsets[g])) for i, (k, g) in enumerate(zip(self.keys, group_of))}

    @property
    def file(self) -> pq.ParquetFile:
        f = getattr(self._local, "file", None)
        if f is None:
            f = self._local.file = pq.ParquetFile(self.path, filesystem=self.fs)
        return f

    def group(self, g: int) -> pa.Table:
        cached = getattr(self._local, "cached", None)
        if cached is None or cached[0] != g:
            cached = self._local.cached = (g, self.file.read_row_group(g, columns=_COLS))
        return cached[1]


def stored_bits(codec: str, payload: pa.Buffer | bytes, changed: int, run_id: str, tensor: str, start: int,
                stop: int, path: str) -> np.ndarray:
    """The packed bits of one unit's stored mask (:func:`decode_packed`), checked against the
    unit's ``changed`` count. A payload that does not decode (a zstd frame with a flipped
    byte, a wrong length) or whose set bits are not that count (a flipped bit of a raw
    ``packbits`` mask) means the store's file is damaged: a :class:`StoreError` naming the
    run, the tensor, the unit and the file. Counting the bits is one pass over the packed
    bytes: 0.02 ms for a unit of 16 Mi elements, against 1 ms to decode a gaps+zstd one."""
    from raydiff.kernel._gaps import and_count as packed_and_count

    try:
        bits = decode_packed(codec, payload, stop - start)
    except (ValueError, OSError) as e:
        problem = str(e)
    else:
        ones = int(packed_and_count(bits, bits))
        if ones == changed:
            return bits
        problem = f"it holds {ones} changed entries where the run counted {changed}"
    raise StoreError(f"the stored mask of tensor {tensor!r} (elements {start}…{stop - 1}) of run {run_id} is "
                     f"corrupt ({problem}): the store's file {path} is damaged; restore it from a copy, or submit "
                     "the pair again into a new store")


def _bits(units: _Units, table: pa.Table, i: int, key: tuple) -> np.ndarray | None:
    """The packed bits of row ``i`` of one of ``units``' row groups (``key``: its
    ``(tensor, start, stop)``), checked (:func:`stored_bits`); ``None`` for a mask with
    nothing set."""
    codec, payload = _mask(table, i)
    changed = table.column("changed")[i].as_py()
    if codec == CODEC_EMPTY and changed == 0:
        return None
    return stored_bits(codec, payload, changed, units.run_id, *key, units.path)


def _mask(table: pa.Table, i: int) -> tuple[str, pa.Buffer | bytes]:
    codec = table.column("mask_codec")[i].as_py()
    value = table.column("mask")[i]
    return codec, (value.as_buffer() if value.is_valid else b"") or b""


def _aligned(runs: Sequence[_Units], g: int) -> Iterator[tuple[tuple, list[tuple[pa.Table, int]]]]:
    """The units of the first run's row group ``g`` that every run has: each unit's key
    ``(tensor, start, stop)`` and, per run, its row group and row."""
    t0 = runs[0].group(g)
    for i, key in enumerate(zip(*(t0.column(c).to_pylist() for c in _KEY))):
        places = [r.where.get(key) for r in runs[1:]]
        if all(p is not None for p in places):
            yield key, [(t0, i)] + [(r.group(p[0]), p[1]) for r, p in zip(runs[1:], places)]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def overlap_units(store: Store, run_a: str, run_b: str) -> list[dict]:
    """Per tensor compared in both complete runs: elements, changed in each, changed in both.

    Units pair by ``(tensor, start, stop)``. Each row group of the first run (a tensor) is
    one task of a thread pool: it reads that row group and the other run's row groups it
    pairs with, and intersects their masks — reading, decompressing and counting all run
    outside the GIL, so memory stays near a tensor's masks per thread.
    """
    from raydiff.kernel._gaps import and_count as packed_and_count

    a, b = _Units(store, run_a), _Units(store, run_b)

    def task(g: int) -> list[tuple[str, int, int, int, int]]:
        ta = a.group(g)
        out = []
        for i, key in enumerate(zip(*(ta.column(c).to_pylist() for c in _KEY))):
            at = b.where.get(key)
            if at is None:
                continue
            tb = b.group(at[0])
            bits_a = _bits(a, ta, i, key)
            bits_b = _bits(b, tb, at[1], key) if bits_a is not None else None
            out.append((key[0], key[2] - key[1], ta.column("changed")[i].as_py(), tb.column("changed")[at[1]].as_py(),
                        int(packed_and_count(bits_a, bits_b)) if bits_b is not None else 0))
        return out

    totals: dict[str, list[int]] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        for rows in pool.map(task, range(a.groups)):
            for tensor, n, ca, cb, both in rows:
                t = totals.setdefault(tensor, [0, 0, 0, 0])
                t[0] += n
                t[1] += ca
                t[2] += cb
                t[3] += both
    return [dict(tensor=k, numel=v[0], changed_a=v[1], changed_b=v[2], changed_both=v[3])
            for k, v in sorted(totals.items())]


def consensus_units(store: Store, run_ids: Sequence[str]) -> list[dict]:
    """Per tensor compared in every one of the complete runs: elements, and how many are
    changed in exactly k of them for k = 0 … N (``histogram``); one task per row group of the
    first run, as :func:`overlap_units`."""
    ids = list(dict.fromkeys(run_ids))  # a run named twice counts once
    runs = [_Units(store, r) for r in ids]
    first = runs[0]

    def task(g: int) -> list[tuple[str, int, list[int]]]:
        out = []
        for key, rows in _aligned(runs, g):
            n = key[2] - key[1]
            out.append((key[0], n, count_histogram([_bits(u, t, row, key) for u, (t, row) in zip(runs, rows)], n)))
        return out

    hist: dict[str, np.ndarray] = {}
    numel: dict[str, int] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        for rows in pool.map(task, range(first.groups)):
            for tensor, n, h in rows:
                numel[tensor] = numel.get(tensor, 0) + n
                hist[tensor] = hist.get(tensor, 0) + np.asarray(h, np.int64)
    return [dict(tensor=k, numel=numel[k], histogram=[int(x) for x in hist[k]]) for k in sorted(hist)]


def pairwise(con, runs: list[str]) -> pa.Table:
    """Global overlap of every pair of runs (names or ids) on a :func:`raydiff.query.views.connect`
    connection: one row per pair ``(run_a, run_b, numel, …, jaccard_random)``."""
    parts = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            parts.append(con.sql(f"SELECT ?::VARCHAR AS run_a, ?::VARCHAR AS run_b, {', '.join(OVERLAP_COLUMNS)} "
                                 "FROM overlap_total(?, ?)", params=[a, b, a, b]).to_arrow_table())
    return pa.concat_tables(parts)


#: What :func:`pairs_units` returns per tensor and pair of runs (``a`` < ``b``: positions in the list).
PAIRS_TYPE = duckdb.list_type(duckdb.struct_type(
    {"tensor": "VARCHAR", "a": "INTEGER", "b": "INTEGER", "numel": "BIGINT", "changed_a": "BIGINT",
     "changed_b": "BIGINT", "changed_both": "BIGINT"}))
PROFILE_TYPE = duckdb.list_type(duckdb.struct_type(
    {"axis": "VARCHAR", "index": "BIGINT", "changed": "BIGINT", "n": "BIGINT"}))


def pairs_units(store: Store, run_ids: Sequence[str]) -> list[dict]:
    """Per tensor compared in every one of the complete runs, and per pair of them: elements,
    changed in each, changed in both — every pair's intersection from one read of each run's
    masks (the ``jaccard_matrix`` macro), one task per row group of the first run."""
    from raydiff.kernel._gaps import and_count as packed_and_count

    ids = list(dict.fromkeys(run_ids))
    runs = [_Units(store, r) for r in ids]
    first = runs[0]
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]

    def task(g: int) -> list[tuple[str, int, list[int], list[int]]]:
        out = []
        for key, tables in _aligned(runs, g):
            n = key[2] - key[1]
            changed = [t.column("changed")[row].as_py() for t, row in tables]
            packed = [_bits(units, t, row, key) for units, (t, row) in zip(runs, tables)]
            both = [int(packed_and_count(packed[a], packed[b])) if packed[a] is not None and packed[b] is not None
                    else 0 for a, b in pairs]
            out.append((key[0], n, changed, both))
        return out

    numel: dict[str, int] = {}
    changed: dict[str, np.ndarray] = {}
    both: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        for rows in pool.map(task, range(first.groups)):
            for tensor, n, ch, bo in rows:
                numel[tensor] = numel.get(tensor, 0) + n
                changed[tensor] = changed.get(tensor, 0) + np.asarray(ch, np.int64)
                both[tensor] = both.get(tensor, 0) + np.asarray(bo, np.int64)
    return [dict(tensor=t, a=a, b=b, numel=numel[t], changed_a=int(changed[t][a]), changed_b=int(changed[t][b]),
                 changed_both=int(both[t][k]))
            for t in sorted(numel) for k, (a, b) in enumerate(pairs)]


def profile_units(store: Store, run_id: str, tensor: str, row_len: int) -> list[dict]:
    """Changed entries of every row and every column of one tensor of a complete run, from
    its stored masks: ``{axis: 'row' | 'col', index, changed, n}`` (the ``profile`` macro)."""
    from raydiff.kernel._gaps import row_col_counts

    u = _Units(store, run_id)
    keys = sorted(k for k in u.where if k[0] == tensor)
    numel = keys[-1][2] if keys else 0
    n_rows = numel // row_len if row_len else 0
    rows = np.zeros(n_rows, np.int64)
    cols = np.zeros(row_len, np.int64)
    for key in keys:
        g, i = u.where[key]
        bits = _bits(u, u.group(g), i, key)
        if bits is None:
            continue
        n = key[2] - key[1]
        unit_rows = np.zeros(n // row_len, np.int64)
        row_col_counts(bits, n, row_len, unit_rows, cols)
        rows[key[1] // row_len: key[2] // row_len] += unit_rows
    return ([dict(axis="row", index=i, changed=int(c), n=row_len) for i, c in enumerate(rows.tolist())]
            + [dict(axis="col", index=j, changed=int(c), n=n_rows) for j, c in enumerate(cols.tolist())])


#: What :func:`chain_units` returns per step of a chain and tensor.
CHAIN_TYPE = duckdb.list_type(duckdb.struct_type(
    {"step": "INTEGER", "tensor": "VARCHAR", "numel": "BIGINT", "changed_vs_base": "BIGINT",
     "changed_since_prev": "BIGINT", "changed_ever": "BIGINT", "cancelled": "BIGINT"}))


def _popcount(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum(dtype=np.int64))


def chain_units(store: Store, vs_base: Sequence[str], vs_prev: Sequence[str]) -> list[dict]:
    """Per step t = 1 … T of a chain and per tensor compared in all its runs, from the stored
    masks (the ``chain_steps`` and ``chain_summary`` macros): elements; ``changed_vs_base``
    (set in the mask of ``vs_base[t]``, base → Cₜ); ``changed_since_prev`` (set in the mask
    of ``vs_prev[t]``, Cₜ₋₁ → Cₜ); ``changed_ever`` (the OR of the step masks up to t);
    ``cancelled`` (``changed_ever`` AND NOT the mask of base → Cₜ).

    Each run's ``units.parquet`` is read once, row group by row group; units pair by
    ``(tensor, start, stop)``; one task per row group of the first run, as :func:`consensus_units`.
    """
    if not vs_base or len(vs_base) != len(vs_prev):
        raise ValueError("a chain needs one run against the base and one against the previous step per step")
    units = {r: _Units(store, r) for r in dict.fromkeys([*vs_base, *vs_prev])}
    first = units[vs_base[0]]
    steps = len(vs_base)

    def task(g: int) -> list[tuple[str, int, list[tuple[int, int, int, int]]]]:
        t0 = first.group(g)
        out = []
        for key in zip(*(t0.column(c).to_pylist() for c in _KEY)):
            places = {r: u.where.get(key) for r, u in units.items()}
            if any(p is None for p in places.values()):
                continue
            n = key[2] - key[1]
            packed: dict[str, np.ndarray] = {}

            def bits(r: str) -> np.ndarray:
                if r not in packed:
                    at = places[r]
                    got = _bits(units[r], units[r].group(at[0]), at[1], key)
                    packed[r] = got if got is not None else np.zeros((n + 7) // 8, np.uint8)
                return packed[r]

            ever = np.zeros((n + 7) // 8, np.uint8)
            counts = []
            for t in range(steps):
                step, now = bits(vs_prev[t]), bits(vs_base[t])
                ever |= step
                counts.append((_popcount(now), _popcount(step), _popcount(ever), _popcount(ever & ~now)))
            out.append((key[0], n, counts))
        return out

    numel: dict[str, int] = {}
    totals: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        for rows in pool.map(task, range(first.groups)):
            for tensor, n, counts in rows:
                numel[tensor] = numel.get(tensor, 0) + n
                totals[tensor] = totals.get(tensor, 0) + np.asarray(counts, np.int64)
    return [dict(step=t + 1, tensor=k, numel=numel[k], changed_vs_base=int(totals[k][t, 0]),
                 changed_since_prev=int(totals[k][t, 1]), changed_ever=int(totals[k][t, 2]),
                 cancelled=int(totals[k][t, 3]))
            for t in range(steps) for k in sorted(numel)]
