"""Intersections of stored change masks, vectorised per unit (never a Python loop per bit).

Registered with DuckDB as ``mask_and_count(codec_a, mask_a, codec_b, mask_b, numel)`` by
:mod:`raydiff.query.views`; the SQL macros in ``queries/30_overlap.sql`` build the paper's
overlap, Jaccard and random baselines on top of it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raydiff.kernel.masks import CODEC_EMPTY, decode_packed

#: Columns of the ``overlap`` / ``overlap_total`` macros after ``tensor``.
OVERLAP_COLUMNS = ("numel", "changed_a", "changed_b", "changed_both", "o1", "o2", "jaccard",
                   "o1_random", "o2_random", "jaccard_random")


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
    return int(np.bitwise_count(np.bitwise_and(pa_, pb)).sum(dtype=np.int64))


def and_count_arrow(codec_a: pa.Array, mask_a: pa.Array, codec_b: pa.Array, mask_b: pa.Array,
                    numel: pa.Array) -> pa.Array:
    """Arrow-vectorised :func:`and_count` over aligned columns (the DuckDB UDF)."""
    ca, ma, cb, mb, n = (x.to_pylist() for x in (codec_a, mask_a, codec_b, mask_b, numel))
    out = [None if None in (ca[i], cb[i], n[i]) else and_count(ca[i], ma[i] or b"", cb[i], mb[i] or b"", n[i])
           for i in range(len(n))]
    return pa.array(out, type=pa.int64())


def count_histogram(codecs: list[str], masks: list[bytes], n: int) -> list[int]:
    """For R masks over the same ``n`` elements: how many elements are set in exactly k of
    them, for k = 0 … R (the consensus histogram)."""
    counts = np.zeros(n, dtype=np.uint16)
    for codec, payload in zip(codecs, masks):
        if codec != CODEC_EMPTY:
            counts += np.unpackbits(decode_packed(codec, payload, n), count=n, bitorder="little")
    return np.bincount(counts, minlength=len(codecs) + 1).tolist()


def histogram_arrow(codecs: pa.Array, masks: pa.Array, numel: pa.Array) -> pa.Array:
    """Arrow-vectorised :func:`count_histogram` over rows of mask lists (the DuckDB UDF)."""
    cs, ms, ns = codecs.to_pylist(), masks.to_pylist(), numel.to_pylist()
    return pa.array([count_histogram(c, [m or b"" for m in mm], n) for c, mm, n in zip(cs, ms, ns)],
                    type=pa.list_(pa.int64()))


def pairwise(con, runs: list[str]) -> pa.Table:
    """Global overlap of every pair of runs (names or ids) on a :func:`raydiff.query.views.connect`
    connection: one row per pair ``(run_a, run_b, numel, …, jaccard_random)``."""
    parts = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            parts.append(con.sql(f"SELECT ?::VARCHAR AS run_a, ?::VARCHAR AS run_b, {', '.join(OVERLAP_COLUMNS)} "
                                 "FROM overlap_total(?, ?)", params=[a, b, a, b]).to_arrow_table())
    return pa.concat_tables(parts)
