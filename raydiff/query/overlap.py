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
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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
    pa_ = decode_packed(codec_a, mask_a, n)
    pb = decode_packed(codec_b, mask_b, n)
    whole = pa_.size // 8 * 8  # popcounts of 64-bit words: 8× fewer than of bytes
    both = int(np.bitwise_count(pa_[:whole].view(np.uint64) & pb[:whole].view(np.uint64)).sum(dtype=np.int64))
    return both + int(np.bitwise_count(pa_[whole:] & pb[whole:]).sum(dtype=np.int64))


def count_histogram(codecs: Sequence[str], masks: Sequence[bytes], n: int) -> list[int]:
    """For R masks over the same ``n`` elements: how many elements are set in exactly k of
    them, for k = 0 … R (the consensus histogram)."""
    counts = np.zeros(n, dtype=np.uint16)
    for codec, payload in zip(codecs, masks):
        if codec != CODEC_EMPTY:
            counts += np.unpackbits(decode_packed(codec, payload, n), count=n, bitorder="little")
    return np.bincount(counts, minlength=len(codecs) + 1).tolist()


class _Units:
    """One complete run's ``units.parquet``: its unit keys up front, its masks by row group."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.file = pq.ParquetFile(store.path(layout.units_file(run_id)), filesystem=store.fs)
        keys = self.file.read(columns=list(_KEY))
        groups = np.repeat(np.arange(self.file.num_row_groups),
                           [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)])
        offsets = np.concatenate([[0], np.cumsum([self.file.metadata.row_group(i).num_rows
                                                  for i in range(self.file.num_row_groups)])])
        self.where = {k: (int(g), i - int(offsets[g]))
                      for i, (k, g) in enumerate(zip(zip(*(keys.column(c).to_pylist() for c in _KEY)), groups))}
        self._cached: tuple[int, pa.Table] | None = None

    def group(self, g: int) -> pa.Table:
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self.file.read_row_group(g, columns=_COLS))
        return self._cached[1]


def _mask(table: pa.Table, i: int) -> tuple[str, pa.Buffer | bytes]:
    codec = table.column("mask_codec")[i].as_py()
    value = table.column("mask")[i]
    return codec, (value.as_buffer() if value.is_valid else b"") or b""


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def overlap_units(store: Store, run_a: str, run_b: str) -> list[dict]:
    """Per tensor compared in both complete runs: elements, changed in each, changed in both.

    Units pair by ``(tensor, start, stop)``; a run's file is read row group by row group and
    the other's row groups as the pairs need them, so memory stays near one tensor's masks.
    """
    a, b = _Units(store, run_a), _Units(store, run_b)
    totals: dict[str, list[int]] = {}
    pending: list[Future] = []
    with ThreadPoolExecutor(_workers()) as pool:
        for g in range(a.file.num_row_groups):
            ta = a.file.read_row_group(g, columns=_COLS)
            jobs = []
            for i, key in enumerate(zip(*(ta.column(c).to_pylist() for c in _KEY))):
                at = b.where.get(key)
                if at is None:
                    continue
                tb = b.group(at[0])
                n = key[2] - key[1]
                t = totals.setdefault(key[0], [0, 0, 0, 0])
                t[0] += n
                t[1] += ta.column("changed")[i].as_py()
                t[2] += tb.column("changed")[at[1]].as_py()
                jobs.append((key[0], *_mask(ta, i), *_mask(tb, at[1]), n))
            pending.append(pool.submit(lambda js: [(j[0], and_count(*j[1:])) for j in js], jobs))
            if len(pending) > 2 * _workers():  # keep the masks in flight bounded
                _collect(pending.pop(0), totals)
        for f in pending:
            _collect(f, totals)
    return [dict(tensor=k, numel=v[0], changed_a=v[1], changed_b=v[2], changed_both=v[3])
            for k, v in sorted(totals.items())]


def _collect(f: Future, totals: dict[str, list[int]]) -> None:
    for tensor, both in f.result():
        totals[tensor][3] += both


def consensus_units(store: Store, run_ids: Sequence[str]) -> list[dict]:
    """Per tensor compared in every one of the complete runs: elements, and how many are
    changed in exactly k of them for k = 0 … N (``histogram``)."""
    ids = list(dict.fromkeys(run_ids))  # a run named twice counts once
    runs = [_Units(store, r) for r in ids]
    first = runs[0]
    hist: dict[str, np.ndarray] = {}
    numel: dict[str, int] = {}
    pending: list[Future] = []
    with ThreadPoolExecutor(_workers()) as pool:
        for g in range(first.file.num_row_groups):
            t0 = first.file.read_row_group(g, columns=_COLS)
            jobs = []
            for i, key in enumerate(zip(*(t0.column(c).to_pylist() for c in _KEY))):
                places = [r.where.get(key) for r in runs[1:]]
                if any(p is None for p in places):
                    continue
                masks = [_mask(t0, i)] + [_mask(r.group(p[0]), p[1]) for r, p in zip(runs[1:], places)]
                n = key[2] - key[1]
                numel[key[0]] = numel.get(key[0], 0) + n
                jobs.append((key[0], [m[0] for m in masks], [m[1] for m in masks], n))
            pending.append(pool.submit(lambda js: [(j[0], count_histogram(*j[1:])) for j in js], jobs))
        for f in pending:
            for tensor, h in f.result():
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
