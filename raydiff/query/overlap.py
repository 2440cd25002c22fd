"""Intersections of stored change masks, read from the files of exactly the runs asked about.

:func:`overlap_units` and :func:`consensus_units` read the ``units.parquet`` of the complete
runs they are given, row group by row group (one tensor each), pair units by
``(tensor, start, stop)`` and count intersections in a thread pool — decompression and
popcounts release the GIL — so their cost is the masks of those runs, not the store's size.
:func:`raydiff.query.views.connect` registers them as the DuckDB functions behind the
``overlap``, ``overlap_total`` and ``consensus`` macros (``queries/30_overlap.sql``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def count_histogram(codecs: Sequence[str], masks: Sequence[bytes], n: int) -> list[int]:
    """For R masks over the same ``n`` elements: how many elements are set in exactly k of
    them, for k = 0 … R (the consensus histogram)."""
    counts = np.zeros(n, dtype=np.uint16)
    for codec, payload in zip(codecs, masks):
        if codec != CODEC_EMPTY:
            counts += np.unpackbits(decode_packed(codec, payload, n), count=n, bitorder="little")
    return np.bincount(counts, minlength=len(codecs) + 1).tolist()


class _Units:
    """One complete run's ``units.parquet``: where each unit is (row group, row), and its
    row groups read by whichever thread asks, each thread through a file of its own."""

    def __init__(self, store: Store, run_id: str) -> None:
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


def _mask(table: pa.Table, i: int) -> tuple[str, pa.Buffer | bytes]:
    codec = table.column("mask_codec")[i].as_py()
    value = table.column("mask")[i]
    return codec, (value.as_buffer() if value.is_valid else b"") or b""


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def overlap_units(store: Store, run_a: str, run_b: str) -> list[dict]:
    """Per tensor compared in both complete runs: elements, changed in each, changed in both.

    Units pair by ``(tensor, start, stop)``. Each row group of the first run (a tensor) is
    one task of a thread pool: it reads that row group and the other run's row groups it
    pairs with, and intersects their masks — reading, decompressing and counting all run
    outside the GIL, so memory stays near a tensor's masks per thread.
    """
    a, b = _Units(store, run_a), _Units(store, run_b)

    def task(g: int) -> list[tuple[str, int, int, int, int]]:
        ta = a.group(g)
        out = []
        for i, key in enumerate(zip(*(ta.column(c).to_pylist() for c in _KEY))):
            at = b.where.get(key)
            if at is None:
                continue
            tb = b.group(at[0])
            n = key[2] - key[1]
            out.append((key[0], n, ta.column("changed")[i].as_py(), tb.column("changed")[at[1]].as_py(),
                        and_count(*_mask(ta, i), *_mask(tb, at[1]), n)))
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
        t0 = first.group(g)
        out = []
        for i, key in enumerate(zip(*(t0.column(c).to_pylist() for c in _KEY))):
            places = [r.where.get(key) for r in runs[1:]]
            if any(p is None for p in places):
                continue
            masks = [_mask(t0, i)] + [_mask(r.group(p[0]), p[1]) for r, p in zip(runs[1:], places)]
            n = key[2] - key[1]
            out.append((key[0], n, count_histogram([m[0] for m in masks], [m[1] for m in masks], n)))
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
