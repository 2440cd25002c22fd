"""The diff kernel: two arrays of stored bits in, one :class:`UnitDiff` record out.

Pure: no I/O, no Ray, no globals beyond constant lookup tables and which loop this CPU
can run. Same-dtype BF16, F16 and F32 pairs — nearly every tensor of a checkpoint — run in one
fused, vectorised pass that skips blocks whose bits are all equal: on CPUs with AVX-512,
one that compacts the changed entries before counting them (:mod:`raydiff.kernel._compact`), on
others a portable one (:mod:`raydiff.kernel._fused`); both give the same results. Other pairs take numpy:
one integer compare finds the entries whose stored bits differ, and only those are decoded
to floats.

Δ is taken *in the compared dtype*, as the paper's ``(tuned - base).abs() <= atol`` does
in torch: for a BF16 (or F16) pair, Δ and the tolerance are both rounded to BF16 (F16)
before comparing; F32, F64 and mixed pairs (compared in F32/F64) use that float type. fp8
pairs are decoded to F32. Integer and bool tensors are compared bitwise only: every
criterion counts the entries whose bits differ and the float statistics are NULL.
An entry whose bits differ and whose Δ is NaN (e.g. a NaN appeared) counts as changed under
every criterion; entries with identical bits are unchanged, NaN included.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from raydiff.dtypes import DTYPES
from raydiff.kernel.masks import encode_mask, encode_packed
from raydiff.options import ATOL_LADDER

_BASE_BLOCK = 1 << 16  # elements per block of the ‖W0‖F² pass, sized to stay in L2


@dataclass(frozen=True)
class Criteria:
    """The thresholds a unit is counted under.

    Attributes:
        atol: the run's main tolerance (its ``changed`` count and mask).
        rel_eta: η of the relative test ``|Δ| > η·max(|w|, |ŵ|)``.
        ladder: further absolute tolerances, counted but not masked.
    """

    atol: float = 1e-5
    rel_eta: float = 1e-3
    ladder: tuple[float, ...] = ATOL_LADDER


@dataclass(frozen=True)
class UnitDiff:
    """What changed in one work unit.

    Attributes:
        numel: elements in the unit.
        changed_bits: entries whose stored bits differ (after exact widening, for mixed dtypes).
        changed: entries with ``|Δ| > atol`` — the run's criterion and its mask.
        changed_ladder: counts of ``|Δ| > t`` for each ``t`` in ``Criteria.ladder``.
        changed_rel: entries with ``|Δ| > η·max(|w|, |ŵ|)``.
        changed_subprecision: mixed dtypes only (else NULL): entries whose values differ but
            whose wider side, rounded to the narrower dtype, equals the narrower side — the
            storage noise a re-save in the narrower dtype would erase (e.g. FSDP fp32 saves).
        nonfinite: entries whose bits differ and whose base or tuned value is NaN or ±Inf.
        max_abs_delta, sum_abs_delta, sum_sq_delta: over entries with finite values on both
            sides (NULL for int/bool).
        sum_sq_base: ``Σ w²`` over all base entries (NULL for int/bool). The three sums
            carry a relative error below 3e-5 (the fused loops add float32 partial sums of
            at most 512 entries, then float64); counts, masks and the max are exact.
        rows_touched: rows (last-dim slices) with a changed entry; NULL for < 2-D.
        cols_bitmap: packed LSB-first bitmap of columns with a changed entry; NULL for < 2-D,
            empty bytes when nothing changed.
        mask_codec, mask: the compressed ``changed`` mask (see :mod:`raydiff.kernel.masks`).
        row_changed_sq: Σ over the unit's rows of (changed entries in the row)²; with the
            ``changed`` count it gives the coefficient of variation of the row profile. NULL
            for < 2-D.
        col_changed: changed entries per column within the unit; NULL for < 2-D, empty
            when nothing changed.
    """

    numel: int
    changed_bits: int
    changed: int
    changed_ladder: tuple[int, ...]
    changed_rel: int
    changed_subprecision: int | None
    nonfinite: int
    max_abs_delta: float | None
    sum_abs_delta: float | None
    sum_sq_delta: float | None
    sum_sq_base: float | None
    rows_touched: int | None
    cols_bitmap: bytes | None
    mask_codec: str
    mask: bytes
    row_changed_sq: int | None = None
    col_changed: tuple[int, ...] | None = None


def profile(mask: np.ndarray, changed: int, row_len: int) -> tuple[int | None, tuple[int, ...] | None]:
    """``(Σ rows' changed², changed per column)`` of a unit's mask — packed LSB-first bytes
    or one bool per entry — covering whole rows of ``row_len``; ``(None, None)`` for < 2-D.

    Example:
        >>> profile(np.array([[1, 1, 0], [0, 1, 0]], bool).reshape(-1), 3, 3)
        (5, (1, 2, 0))
    """
    if not row_len:
        return None, None
    if changed == 0:
        return 0, ()
    if mask.dtype == np.bool_:
        grid = mask.reshape(-1, row_len)
        rows, cols = grid.sum(axis=1, dtype=np.int64), grid.sum(axis=0, dtype=np.int64)
    else:
        from raydiff.kernel._gaps import row_col_counts

        n = mask.size * 8 // row_len * row_len
        rows, cols = np.zeros(n // row_len, np.int64), np.zeros(row_len, np.int64)
        row_col_counts(mask, n, row_len, rows, cols)
    return int(np.dot(rows, rows)), tuple(cols.tolist())


@cache
def _fp8_table(code: str) -> np.ndarray:
    import torch

    tdt = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[code]
    return torch.arange(256, dtype=torch.uint8).view(tdt).float().numpy()


def decode(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits → float values (F32, or F64 for F64). Exact for every float dtype.

    Example:
        >>> decode(np.array([0x3F80], np.uint16), "BF16")
        array([1.], dtype=float32)
    """
    if dtype == "BF16":  # widened and shifted in one pass: 4× faster than astype, then <<
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return bits.view(np.float32)
    if dtype == "F64":
        return bits.view(np.float64)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return _fp8_table(dtype)[bits]
    raise ValueError(f"{dtype} is not a float dtype")


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to a 16-bit float's precision (nearest-even), as torch does."""
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        u = x.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)
        return np.where(np.isnan(x), x, r)
    return x


def delta_of_bits(base: np.ndarray, tuned: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """``tuned − base`` of the stored bits of a BF16 or F32 pair, as float32 and taken in that
    dtype (a BF16 Δ rounded to BF16, nearest-even, NaN kept): ``round_to(decode(tuned) −
    decode(base), dtype)`` in one pass, with no float copy of either side. Written into
    ``out`` (a C-contiguous float32 array of as many entries) when given.

    Example:
        >>> delta_of_bits(np.array([0x3F80], np.uint16), np.array([0x4000], np.uint16), "BF16")
        array([1.], dtype=float32)
    """
    from raydiff.kernel import _fused

    if dtype not in ("BF16", "F32"):
        raise ValueError(f"delta_of_bits takes BF16 or F32 bits, got {dtype}")
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {base.shape} and {tuned.shape}")
    if out is None:
        out = np.empty(base.shape, np.float32)
    elif out.dtype != np.float32 or out.size != base.size or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of {base.size} entries")
    _fused.delta(base.reshape(-1), tuned.reshape(-1), _fused.TAGS[dtype], _NO_LUT, out.reshape(-1))
    return out


@cache
def cutoff(t: float, dtype: str) -> np.floating:
    """The float32 (float64 for F64) cut-off ``c`` with: ``|Δ|`` rounded to ``dtype`` is
    ``<= t`` rounded to ``dtype`` exactly when the unrounded ``|Δ| <= c``.

    This is how torch compares ``(tuned - base).abs() <= t`` for a 16-bit pair (the
    difference and the scalar both rounded to the tensors' dtype); precomputing ``c`` lets
    the kernel compare the exact float32 ``|Δ|`` without rounding anything.

    Example:
        >>> float(cutoff(1e-5, "BF16")) > 1e-5
        True
    """
    if dtype == "F64":
        return np.float64(t)
    if dtype not in ("BF16", "F16"):
        return np.float32(t)
    target = round_to(np.array([t], np.float32), dtype)[0]
    if not np.isfinite(target):
        return np.float32(np.inf)
    lo = int(np.array([target], np.float32).view(np.uint32)[0])  # round(lo) <= target
    hi = 0x7F800000  # +inf: rounds above any finite target
    while hi - lo > 1:  # round_to is monotone in the bits of non-negative floats
        mid = (lo + hi) // 2
        x = np.array([mid], np.uint32).view(np.float32)
        if round_to(x, dtype)[0] <= target:
            lo = mid
        else:
            hi = mid
    return np.array([lo], np.uint32).view(np.float32)[0]


_NO_LUT = np.zeros(0, np.float32)


@cache
def _lut(dtype: str) -> np.ndarray:
    return decode(np.arange(1 << 16, dtype=np.uint16), dtype).astype(np.float32)


def diff_unit(
    base: np.ndarray,
    tuned: np.ndarray,
    base_dtype: str,
    tuned_dtype: str,
    compare_dtype: str,
    criteria: Criteria,
    row_len: int = 0,
    loop: str | None = None,
) -> UnitDiff:
    """Diff one unit: counts under every criterion, Δ statistics and the changed mask.

    Args:
        base, tuned: 1-D arrays of stored bits (unsigned ints of each dtype's width),
            same length.
        base_dtype, tuned_dtype: safetensors dtype codes of the two sides.
        compare_dtype: dtype to compare in (see :func:`raydiff.plan.compare_dtype`).
        criteria: thresholds.
        row_len: row length when the unit covers whole rows of a ≥ 2-D tensor, else 0.
        loop: the fused loop of same-dtype BF16/F16/F32 pairs: ``"compact"`` (AVX-512,
            :mod:`raydiff.kernel._compact`), ``"portable"`` (:mod:`raydiff.kernel._fused`),
            or ``None`` for :func:`best_loop` (the results are the same; tests and the
            benchmark run both).

    Returns:
        The unit's :class:`UnitDiff`.

    Example:
        >>> b = np.array([0x3F80, 0x4000], np.uint16); t = np.array([0x3F81, 0x4000], np.uint16)
        >>> diff_unit(b, t, "BF16", "BF16", "BF16", Criteria()).changed
        1
    """
    n = int(base.size)
    if tuned.size != n:
        raise ValueError(f"unit sizes differ: base {n}, tuned {tuned.size}")
    if row_len and n % row_len:
        raise ValueError(f"unit of {n} elements does not cover whole rows of {row_len}")
    kind = DTYPES[compare_dtype].kind
    mixed = base_dtype != tuned_dtype
    # The fused loop compares float bits as integers: it needs thresholds >= 0 (options ensure it).
    fusable = criteria.rel_eta > 0 and min((criteria.atol, *criteria.ladder)) >= 0
    if not mixed and compare_dtype in _FUSED and fusable and len(criteria.ladder) == _FUSED_LADDER:
        return _diff_fused(base, tuned, compare_dtype, criteria, row_len, loop or best_loop())
    if mixed:
        # Widen both sides exactly, then treat the widened values' bits as stored bits.
        wide = np.float64 if compare_dtype == "F64" else np.float32
        ubits = np.uint64 if compare_dtype == "F64" else np.uint32
        base = decode(base, base_dtype).astype(wide, copy=False).view(ubits)
        tuned = decode(tuned, tuned_dtype).astype(wide, copy=False).view(ubits)
        value_dtype = compare_dtype
    else:
        value_dtype = base_dtype

    neq = base != tuned
    idx = np.flatnonzero(neq)
    changed_bits = int(idx.size)

    if kind != "float":
        codec, payload = encode_mask(neq, changed_bits)
        rows, cols = _touched(neq, changed_bits, row_len)
        k = changed_bits
        return UnitDiff(n, k, k, (k,) * len(criteria.ladder), k, None, 0, None, None, None, None,
                        rows, cols, codec, payload, *profile(neq, k, row_len))

    wa = decode(base[idx], value_dtype)
    wb = decode(tuned[idx], value_dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        d = wb - wa
        ad = np.abs(d)
        # NaN compares False, so `~(|Δ| <= c)` counts NaN as changed.
        is_changed = ~(ad <= cutoff(criteria.atol, compare_dtype))
        ladder = tuple(int(np.count_nonzero(~(ad <= cutoff(t, compare_dtype)))) for t in criteria.ladder)
        rel = int(np.count_nonzero(~(ad <= criteria.rel_eta * np.maximum(np.abs(wa), np.abs(wb)))))
    fd = ad
    if not np.isfinite(d).all():
        # NaN/Inf inputs are counted, not summed; a Δ that only overflowed the compared float
        # type (two huge finite weights) is summed in float64, where it is finite.
        ok = np.isfinite(wa) & np.isfinite(wb)
        fd = np.abs(wb[ok].astype(np.float64) - wa[ok].astype(np.float64))
    nonfinite = changed_bits - int(fd.size)
    max_abs = float(fd.max()) if fd.size else 0.0
    fd64 = fd.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        sum_abs = float(fd64.sum())
        sum_sq = float(np.dot(fd64, fd64))

    changed = int(np.count_nonzero(is_changed))
    if changed == changed_bits:
        mask = neq
    else:
        mask = np.zeros(n, dtype=bool)
        mask[idx[is_changed]] = True
    codec, payload = encode_mask(mask, changed)
    rows, cols = _touched(mask, changed, row_len)
    sub = _subprecision(wa, wb, base_dtype, tuned_dtype) if mixed else None
    return UnitDiff(n, changed_bits, changed, ladder, rel, sub, nonfinite, max_abs, sum_abs, sum_sq,
                    _sum_sq(base, value_dtype), rows, cols, codec, payload, *profile(mask, changed, row_len))


def _subprecision(wa: np.ndarray, wb: np.ndarray, base_dtype: str, tuned_dtype: str) -> int | None:
    """Of entries whose (widened) values differ, how many vanish when the wider side is
    rounded to the narrower dtype. ``None`` when neither dtype is narrower (BF16 vs F16)."""
    wa_size, wb_size = DTYPES[base_dtype].itemsize, DTYPES[tuned_dtype].itemsize
    if wa_size == wb_size:
        return None
    narrow_dtype, narrow, wide = (base_dtype, wa, wb) if wa_size < wb_size else (tuned_dtype, wb, wa)
    with np.errstate(over="ignore", invalid="ignore"):
        if narrow_dtype in ("BF16", "F16"):
            rounded = round_to(wide.astype(np.float32), narrow_dtype)
        elif narrow_dtype == "F32":
            rounded = wide.astype(np.float32)
        else:  # fp8: no rounding mode worth claiming
            return None
        return int(np.count_nonzero(rounded == narrow.astype(rounded.dtype)))


_FUSED = ("BF16", "F16", "F32")
#: Ladder steps the fused loops are built for; another ladder runs the numpy path.
_FUSED_LADDER = 5
LOOPS = ("compact", "portable")


@cache
def best_loop() -> str:
    """The fused loop this CPU runs: ``"compact"`` where it has AVX-512 (and numba targets
    the host), else ``"portable"``."""
    from raydiff.kernel import _compact

    return "compact" if _compact.available() else "portable"


def _diff_fused(base: np.ndarray, tuned: np.ndarray, dtype: str, criteria: Criteria, row_len: int,
                loop: str) -> UnitDiff:
    """BF16/F16/F32 pairs of one dtype: a single fused pass, by the AVX-512 loop
    (:mod:`raydiff.kernel._compact`) or the portable one (:mod:`raydiff.kernel._fused`)."""
    from raydiff.kernel import _fused as f

    n = int(base.size)
    mask_cut = cutoff(criteria.atol, dtype)
    ladder = [cutoff(t, dtype) for t in criteria.ladder]
    assert len(ladder) + 1 == f.N_CUTS, "the fused loop takes the atol and a 5-step ladder"
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    compact = loop == "compact"
    # When the atol's cut-off is on the ladder (the default), the portable loop puts that
    # step first and lets its compare make the mask: one compare per entry fewer. (The
    # AVX-512 loop compares for the mask on every entry and for the ladder on changed ones.)
    shared = mask_cut in ladder and not compact
    order = list(range(len(ladder)))
    if shared:
        order.insert(0, order.pop(ladder.index(mask_cut)))
    cuts = np.array([mask_cut] + [ladder[i] for i in order], np.float32)
    counts = np.zeros(f.C_CUTS + cuts.size, np.int64)
    stats = np.zeros(4, np.float64)
    mask = np.zeros((n + 7) // 8, np.uint8)
    rows = np.zeros(n // row_len if row_len else 0, np.uint8)
    eta = np.float32(criteria.rel_eta)
    lut = _lut(dtype) if dtype == "F16" else _NO_LUT  # BF16 and F32 decode by bit cast
    if compact:
        from raydiff.kernel import _compact

        cols = np.zeros((row_len + 7) // 8, np.uint8)  # a bit per column, packed by the loop
        base, tuned = np.ascontiguousarray(base), np.ascontiguousarray(tuned)  # it reads by address
        _compact.diff(base, tuned, f.TAGS[dtype], lut, cuts, eta, row_len, counts, stats, mask, rows, cols)
    else:
        cols = np.zeros(row_len, np.uint8)  # a byte per column
        f.diff(base, tuned, f.TAGS[dtype], lut, cuts, eta, f.MASK_FROM["shared" if shared else "own"], row_len,
               counts, stats, mask, rows, cols)
        cols = np.packbits(cols, bitorder="little")
    steps = [0] * len(ladder)
    for pos, i in enumerate(order):
        steps[i] = int(counts[f.C_CUTS + 1 + pos])
    changed = steps[order[0]] if shared else int(counts[f.C_CUTS])
    row_sq, col_changed = profile(mask, changed, row_len)
    codec, payload = encode_packed(mask, changed)
    rows_touched = cols_bitmap = None
    if row_len:
        rows_touched = int(np.count_nonzero(rows))
        cols_bitmap = cols.tobytes() if changed else b""
    return UnitDiff(
        numel=n, changed_bits=int(counts[f.C_BITS]), changed=changed,
        changed_ladder=tuple(steps), changed_rel=int(counts[f.C_REL]),
        nonfinite=int(counts[f.C_NONFINITE]), max_abs_delta=float(stats[f.S_MAX]),
        changed_subprecision=None, sum_abs_delta=float(stats[f.S_SUM]), sum_sq_delta=float(stats[f.S_SQ]),
        sum_sq_base=float(stats[f.S_BASE]), rows_touched=rows_touched, cols_bitmap=cols_bitmap,
        mask_codec=codec, mask=payload, row_changed_sq=row_sq, col_changed=col_changed,
    )


def _sum_sq(bits: np.ndarray, dtype: str) -> float:
    """Σ w² over all entries, decoded block by block so temporaries stay in cache."""
    total = 0.0
    for i in range(0, bits.size, _BASE_BLOCK):
        w = decode(bits[i:i + _BASE_BLOCK], dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            w = w.astype(np.float64, copy=False)
            total += float(np.dot(w, w))
    return total


def _touched(mask: np.ndarray, changed: int, row_len: int) -> tuple[int | None, bytes | None]:
    """Rows with any change, and the packed bitmap of columns with any change."""
    if not row_len:
        return None, None
    if changed == 0:
        return 0, b""
    grid = mask.reshape(-1, row_len)
    rows = int(np.count_nonzero(grid.any(axis=1)))
    cols = np.packbits(grid.any(axis=0), bitorder="little").tobytes()
    return rows, cols


def dequantize_blocks(codes: np.ndarray, dtype: str, scales: np.ndarray, first_row: int, row_len: int,
                      block: tuple[int, int], first_block_row: int) -> np.ndarray:
    """Block-scaled FP8 codes as float32 values: ``code × scale[row // rows, col // cols]``,
    multiplied in float32 as DeepSeek-V3's ``weight_dequant`` does.

    Args:
        codes: the stored FP8 bits of whole rows ``first_row …`` of a weight, flat.
        dtype: ``F8_E4M3`` or ``F8_E5M2``.
        scales: float32 scales of the block rows those rows fall in, ``[block rows, blocks per row]``,
            the first of them being block row ``first_block_row``.
        row_len: the weight's row length.
        block: ``(rows, cols)`` of a block.

    Example:
        >>> c = np.array([0x38, 0x40], np.uint8)  # E4M3 codes of 1.0 and 2.0
        >>> dequantize_blocks(c, "F8_E4M3", np.array([[0.5]], np.float32), 0, 2, (128, 128), 0)
        array([0.5, 1. ], dtype=float32)
    """
    rows = codes.size // row_len
    values = decode(codes, dtype).reshape(rows, row_len)
    block_rows = (np.arange(first_row, first_row + rows) // block[0]) - first_block_row
    per_col = scales[block_rows][:, np.arange(row_len) // block[1]]
    return (values * per_col.astype(np.float32, copy=False)).reshape(-1)
