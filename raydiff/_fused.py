"""The fused diff loop (numba): one pass over both sides for 16- and 32-bit float pairs.

Called by :func:`raydiff.kernel.diff_unit`, which owns the semantics; this module only
makes the common case — two BF16, F16 or F32 tensors of one dtype — a single memory pass
instead of the ~20 array passes numpy needs. Thresholds arrive pre-converted by the kernel
into float32 cut-offs on the exact |Δ| (see ``kernel.cutoff``), so the loop never rounds.

How it is fast: the unit is walked in cache-sized blocks (a row of a ≥ 2-D tensor, else
4096 entries). A block whose bits are all equal (one vectorised OR of ``a ^ b``) only adds
its Σw². Any other block goes through one branch-free loop that LLVM vectorises: each entry
is decoded in registers (a shift and a bit cast for BF16, a bit cast for F32, a table for
F16), then computes |Δ|, its six cut-off tests, the relative test, the Δ sums and the max
of |Δ| (as the integer bits of a non-negative float, which order as the floats do), all
masked by "bits differ" — so the cost does not depend on how many entries changed. Entries
whose |Δ| is NaN or ±Inf are rare; the loop only counts them, and a scalar pass over just
the blocks that have one tells non-finite weights (counted) from a Δ that overflowed float32
between finite weights (added to the sums exactly, in float64). Nothing is
compiled with ``nnan``/``ninf``, so NaN and Inf keep IEEE semantics: ``not (|Δ| <= c)``
counts a NaN Δ as changed.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: Number of cut-offs the loop takes: the run's atol (the mask) and the 5-step ladder.
N_CUTS = 6
# counts[] slots written at the end
C_BITS, C_NONFINITE, C_REL, C_CUTS = 0, 1, 2, 3
# stats[] slots
S_MAX, S_SUM, S_SQ, S_BASE = 0, 1, 2, 3

_FLAGS = {"reassoc", "contract", "nsz", "arcp"}  # vectorise reductions; NaN/Inf semantics kept
_BLOCK = 4096  # elements per block of a 1-D tensor (rows are blocks of ≥ 2-D tensors)
_FMAX = np.float32(3.4028234663852886e38)
_PACK = np.uint64(0x0102040810204080)  # 8 bytes of 0/1 → one LSB-first byte, by one multiply


@intrinsic
def _as_f32(typingctx, x):
    """The float32 whose bits are the uint32 ``x`` (an LLVM bit cast: no memory, no copy)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _as_i32(typingctx, x):
    """The int32 holding the bits of the float32 ``x``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


#: Decode tags, one per dtype :func:`diff` handles. The *type* of the tag picks the decode
#: when numba compiles (an ``overload``), so each dtype gets its own loop with no branch
#: left in it, and each is cached like any other signature.
TAGS = {"BF16": np.int8(0), "F16": np.int16(0), "F32": np.int32(0)}


def _value(u, tag, lut):  # noqa: ARG001 — a stub: numba uses the overload below
    """Stored bits → float32: BF16 by shift and bit cast, F32 by bit cast, F16 by ``lut``."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_value, inline="always")
def _value_impl(u, tag, lut):
    if tag == types.int8:
        return lambda u, tag, lut: _as_f32(np.uint32(u) << np.uint32(16))
    if tag == types.int32:
        return lambda u, tag, lut: _as_f32(np.uint32(u))
    return lambda u, tag, lut: lut[u]


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _any_differ(ua, ub):
    acc = 0
    for j in range(ua.size):
        acc |= ua[j] ^ ub[j]
    return acc != 0


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _sum_sq(ua, tag, lut):
    s = 0.0
    for j in range(ua.size):
        x = np.float64(_value(ua[j], tag, lut))
        s += x * x
    return s


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _core(ua, ub, tag, lut, c, eta, hits, counts, stats):
    """The branch-free loop over one block. Returns how many entries differ with a NaN or
    ±Inf |Δ| — non-finite weights, or a Δ that overflowed float32 — which it leaves out of
    the Δ sums and the non-finite count for :func:`_nonfinite` to sort out."""
    c0, c1, c2, c3, c4, c5 = c[0], c[1], c[2], c[3], c[4], c[5]
    n0 = n1 = n2 = n3 = n4 = n5 = 0
    nb = nr = nbad = 0
    mx = np.int32(0)
    sa = 0.0
    sq = 0.0
    sbase = 0.0
    fmax = _FMAX
    for j in range(ua.size):
        x = _value(ua[j], tag, lut)
        y = _value(ub[j], tag, lut)
        ne = np.int32(ua[j] != ub[j])
        ad = abs(y - x)
        fin = ne & np.int32(ad <= fmax)  # differ, Δ finite (so both weights are)
        adm = ad if fin else np.float32(0.0)
        bits = _as_i32(adm)
        mx = bits if bits > mx else mx
        w = np.float64(adm)
        sa += w
        sq += w * w
        xb = np.float64(x)
        sbase += xb * xb
        nbad += ne - fin
        nb += ne
        nr += ne & np.int32(not (ad <= eta * max(abs(x), abs(y))))
        h0 = ne & np.int32(not (ad <= c0))
        n0 += h0
        n1 += ne & np.int32(not (ad <= c1))
        n2 += ne & np.int32(not (ad <= c2))
        n3 += ne & np.int32(not (ad <= c3))
        n4 += ne & np.int32(not (ad <= c4))
        n5 += ne & np.int32(not (ad <= c5))
        hits[j] = h0
    counts[C_BITS] += nb
    counts[C_REL] += nr
    counts[C_CUTS + 0] += n0
    counts[C_CUTS + 1] += n1
    counts[C_CUTS + 2] += n2
    counts[C_CUTS + 3] += n3
    counts[C_CUTS + 4] += n4
    counts[C_CUTS + 5] += n5
    stats[S_MAX] = max(stats[S_MAX], np.float64(_as_f32(np.uint32(mx))))
    stats[S_SUM] += sa
    stats[S_SQ] += sq
    stats[S_BASE] += sbase
    return nbad


@njit(cache=True, nogil=True)
def _nonfinite(ua, ub, tag, lut, counts, stats):
    """For a block with entries whose |Δ| is NaN or ±Inf: count those with a non-finite
    weight, and add the others — a Δ that overflowed float32 between finite weights — to
    the Δ sums exactly, in float64."""
    fmax = _FMAX
    for j in range(ua.size):
        x = _value(ua[j], tag, lut)
        y = _value(ub[j], tag, lut)
        if ua[j] == ub[j] or abs(y - x) <= fmax:
            continue
        if abs(x) <= fmax and abs(y) <= fmax:
            d = abs(np.float64(y) - np.float64(x))
            stats[S_MAX] = max(stats[S_MAX], d)
            stats[S_SUM] += d
            stats[S_SQ] += d * d
        else:
            counts[C_NONFINITE] += 1


@njit(cache=True, nogil=True)
def _emit(hits, m, start, row_len, mask, rows, cols):
    """OR a block's changed flags into the packed mask, and the row/column bitmaps."""
    if start % 8 == 0:
        q = (m + 7) // 8
        hits[m:q * 8] = 0
        w = hits[:q * 8].view(np.uint64)
        first = start // 8
        for k in range(q):
            mask[first + k] |= np.uint8((w[k] * _PACK) >> np.uint64(56))
    else:  # rows of a length that is not a multiple of 8
        for j in range(m):
            if hits[j]:
                i = start + j
                mask[i >> 3] |= np.uint8(1) << np.uint8(i & 7)
    if row_len:
        t = np.uint8(0)
        for j in range(m):
            cols[j] |= hits[j]
            t |= hits[j]
        rows[start // row_len] = t


@njit(cache=True, nogil=True)
def diff(a, b, tag, lut, cuts, eta, row_len, counts, stats, mask, rows, cols):
    """Same-dtype pair of raw bits ``a``, ``b`` of the dtype ``tag`` names (see :data:`TAGS`;
    ``lut`` holds the F16 table); accumulates into ``counts``, ``stats``, ``mask``, ``rows``
    and ``cols``."""
    n = a.size
    block = row_len if row_len else _BLOCK
    hits = np.zeros(block + 8, np.uint8)
    for start in range(0, n, block):
        stop = min(n, start + block)
        ua = a[start:stop]
        ub = b[start:stop]
        if not _any_differ(ua, ub):  # mask, rows and cols stay as they are: zero
            stats[S_BASE] += _sum_sq(ua, tag, lut)
            continue
        if _core(ua, ub, tag, lut, cuts, eta, hits, counts, stats):
            _nonfinite(ua, ub, tag, lut, counts, stats)
        _emit(hits, stop - start, start, row_len, mask, rows, cols)

