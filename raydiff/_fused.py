"""The fused diff loop (numba): one pass over both sides for 16- and 32-bit float pairs.

Called by :func:`raydiff.kernel.diff_unit`, which owns the semantics; this module only
makes the common case — two BF16, F16 or F32 tensors of one dtype — a single memory pass
instead of the ~20 array passes numpy needs. Thresholds arrive pre-converted by the kernel
into float32 cut-offs on the exact |Δ| (see ``kernel.cutoff``), so the loop never rounds.
Accumulators are locals (registers), not array slots, which is what makes the loop fast.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Number of cut-offs the loop takes: the run's atol (the mask) and the 5-step ladder.
N_CUTS = 6
# counts[] slots written at the end
C_BITS, C_NONFINITE, C_REL, C_CUTS = 0, 1, 2, 3
# stats[] slots
S_MAX, S_SUM, S_SQ, S_BASE = 0, 1, 2, 3

_FLAGS = {"reassoc", "contract"}  # vectorise the Σw² reduction; NaN/Inf semantics kept


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _base_sq16(a, lut):
    s = 0.0
    for i in range(a.size):
        w = np.float64(lut[a[i]])
        s += w * w
    return s


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _base_sq32(af):
    s = 0.0
    for i in range(af.size):
        w = np.float64(af[i])
        s += w * w
    return s


_BLOCK = 4096  # elements per block of a 1-D tensor (rows are blocks of ≥ 2-D tensors)


@njit(cache=True, nogil=True)
def _loop(a, b, is16, lut, af, bf, cuts, eta, row_len, counts, stats, mask, rows, cols):
    c0, c1, c2, c3, c4, c5 = cuts[0], cuts[1], cuts[2], cuts[3], cuts[4], cuts[5]
    n0 = n1 = n2 = n3 = n4 = n5 = 0
    nbits = nonfinite = nrel = 0
    mx = 0.0
    sabs = 0.0
    ssq = 0.0
    n = a.size
    block = row_len if row_len else _BLOCK
    idx = np.empty(block, np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        # phase 1, branch-free: compact the positions whose bits differ
        k = 0
        for i in range(start, stop):
            idx[k] = i
            k += a[i] != b[i]
        nbits += k
        touched = 0
        # phase 2: only the entries that differ
        for j in range(k):
            i = idx[j]
            wa = lut[a[i]] if is16 else af[i]
            wb = lut[b[i]] if is16 else bf[i]
            d = wb - wa
            ad = abs(d)
            if np.isfinite(d):
                adf = np.float64(ad)
                mx = max(mx, adf)
                sabs += adf
                ssq += adf * adf
            elif np.isfinite(wa) and np.isfinite(wb):  # only the float32 difference overflowed
                d64 = abs(np.float64(wb) - np.float64(wa))
                mx = max(mx, d64)
                sabs += d64
                ssq += d64 * d64
            else:
                nonfinite += 1
            nrel += not (ad <= eta * max(abs(wa), abs(wb)))
            n1 += not (ad <= c1)
            n2 += not (ad <= c2)
            n3 += not (ad <= c3)
            n4 += not (ad <= c4)
            n5 += not (ad <= c5)
            hit = not (ad <= c0)
            n0 += hit
            touched |= hit
            mask[i >> 3] |= np.uint8(hit) << np.uint8(i & 7)
            if row_len:
                cols[i - start] |= hit
        if row_len:
            rows[start // row_len] = touched
    counts[C_BITS] = nbits
    counts[C_NONFINITE] = nonfinite
    counts[C_REL] = nrel
    counts[C_CUTS + 0] = n0
    counts[C_CUTS + 1] = n1
    counts[C_CUTS + 2] = n2
    counts[C_CUTS + 3] = n3
    counts[C_CUTS + 4] = n4
    counts[C_CUTS + 5] = n5
    stats[S_MAX] = mx
    stats[S_SUM] = sabs
    stats[S_SQ] = ssq


@njit(cache=True, nogil=True)
def diff16(a, b, lut, cuts, eta, row_len, counts, stats, mask, rows, cols):
    """Same-dtype 16-bit float pair, decoded through a 65536-entry float32 table."""
    empty = np.empty(0, np.float32)
    _loop(a, b, True, lut, empty, empty, cuts, eta, row_len, counts, stats, mask, rows, cols)
    stats[S_BASE] = _base_sq16(a, lut)


@njit(cache=True, nogil=True)
def diff32(a, b, cuts, eta, row_len, counts, stats, mask, rows, cols):
    """Same-dtype float32 pair (``a``, ``b`` are the uint32 bits)."""
    af = a.view(np.float32)
    bf = b.view(np.float32)
    _loop(a, b, False, np.empty(0, np.float32), af, bf, cuts, eta, row_len, counts, stats, mask, rows, cols)
    stats[S_BASE] = _base_sq32(af)
