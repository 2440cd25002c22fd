"""The portable fused diff loop (numba): one pass over both sides for 16- and 32-bit float pairs.

Called by :func:`raydiff.kernel.diff.diff_unit`, which owns the semantics, on CPUs that cannot
run the AVX-512 loop of :mod:`raydiff.kernel._compact` (which borrows this module's helpers for
quiet blocks and non-finite values); this module only makes the common case — two BF16,
F16 or F32 tensors of one dtype — a single memory pass instead of the ~20 array passes
numpy needs. Thresholds arrive pre-converted by the kernel into float32 cut-offs on the
exact |Δ| (see ``kernel.cutoff``), so the loop never rounds.

How it is fast: the unit is walked in cache-sized blocks (a row of a ≥ 2-D tensor, else
4096 entries). A block whose bits are all equal only adds its Σw², in the same vectorised
pass that ORs ``a ^ b`` to find that out (not needed when one of its first 64 entries
differs). Any other block goes through one branch-free loop that LLVM vectorises in 32-bit
lanes: each entry is decoded in registers (a shift and a bit cast for BF16, a bit cast for
F32, a table for F16), and |Δ| is kept as the integer bits of a non-negative float, which
order as the floats do — so its cut-off tests (the ladder's five, and the atol's unless it
is on the ladder), the relative test and the max are integer subtractions and shifts, and
all of it is masked by "bits differ": the cost does not depend on how many entries changed.
The Δ sums and Σw² are float32 within runs of :data:`_RUN` entries and float64 across runs
(a run that overflows float32 is summed again in float64). Entries whose |Δ| is NaN or ±Inf
are rare; the loop only flags them, and a scalar pass over just the blocks that have one
tells non-finite weights (counted) from a Δ that overflowed float32 between finite weights
(added to the sums exactly, in float64). Nothing is compiled with ``nnan``/``ninf``, so NaN
and Inf keep IEEE semantics: a NaN Δ counts as changed.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: Number of cut-offs the loop takes: the run's atol (the mask) and the 5-step ladder.
N_CUTS = 6
#: Where the mask's cut-off comes from, a compile-time choice like :data:`TAGS`: ``own`` is a
#: seventh compare; ``shared`` means the atol's cut-off is also the ladder's first (``c[1]``,
#: the kernel orders it so), whose compare then makes the mask — the default, atol 1e-5 being
#: on the ladder — and ``counts[C_CUTS]`` is left for the kernel to copy.
MASK_FROM = {"own": np.uint16(0), "shared": np.uint8(0)}
# counts[] slots written at the end
C_BITS, C_NONFINITE, C_REL, C_CUTS = 0, 1, 2, 3
# stats[] slots
S_MAX, S_SUM, S_SQ, S_BASE = 0, 1, 2, 3

_FLAGS = {"reassoc", "contract", "nsz", "arcp"}  # vectorise reductions; NaN/Inf semantics kept
_BLOCK = 4096  # elements per block of a 1-D tensor (rows are blocks of ≥ 2-D tensors)
#: Entries per float32 partial sum: a block's Δ sums and Σw² are float32 within runs of this
#: many entries and float64 across them, so a sum's relative error stays below 512·2⁻²⁴ ≈ 3e-5
#: (typically ~1e-7), and a run whose float32 sums overflow is summed again in float64.
_RUN = 512
_FMAX = np.float32(3.4028234663852886e38)
_INF_BITS = np.int32(0x7F800000)
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


def _mask_cut(h, ci0, a, shared):  # noqa: ARG001 — a stub: numba uses the overload below
    """The mask's compare and what it adds to its own count: ``(ci0 - a) >> 31`` twice, or,
    when ``shared`` (see :data:`MASK_FROM`), ``h`` (the ladder's compare) and 0."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_mask_cut, inline="always")
def _mask_cut_impl(h, ci0, a, shared):
    if shared == types.uint8:
        return lambda h, ci0, a, shared: (h, np.int32(0))

    def own(h, ci0, a, shared):
        h0 = np.int32(np.int32(ci0 - a) >> np.int32(31))
        return h0, h0
    return own


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _any_differ(ua, ub):
    acc = 0
    for j in range(ua.size):
        acc |= ua[j] ^ ub[j]
    return acc != 0


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _quiet(ua, ub, tag, lut):
    """``(any bits differ, Σw²)`` of a block in one pass, stopping at the first
    :data:`_RUN` entries with a change (Σw² is then partial, and unused)."""
    s = 0.0
    n = ua.size
    for lo in range(0, n, _RUN):
        a = ua[lo:min(n, lo + _RUN)]
        b = ub[lo:min(n, lo + _RUN)]
        acc = 0
        for j in range(a.size):
            acc |= a[j] ^ b[j]
            x = np.float64(_value(a[j], tag, lut))
            s += x * x
        if acc:
            return True, s
    return False, s


@njit(cache=True, nogil=True, inline="always")
def _skip_quiet(ua, ub, tag, lut, stats):
    """Whether a block has no change, adding its Σw² to ``stats`` if so (its mask, rows and
    columns stay zero). A change among the first 64 entries — nearly every block of a dense
    update — answers at once; otherwise one pass over the block tells. Shared by both loops."""
    if _any_differ(ua[:64], ub[:64]):
        return False
    differ, s = _quiet(ua, ub, tag, lut)
    if differ:
        return False
    stats[S_BASE] += s
    return True


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _sum_sq(ua, tag, lut):
    s = 0.0
    for j in range(ua.size):
        x = np.float64(_value(ua[j], tag, lut))
        s += x * x
    return s


@njit(cache=True, nogil=True, fastmath=_FLAGS, inline="always")
def _run(ua, ub, tag, lut, ci0, ci1, ci2, ci3, ci4, ci5, eta, shared, hits):
    """One run of at most :data:`_RUN` entries: the branch-free loop, in 32-bit lanes.

    |Δ| is handled as the int32 bits ``a`` of a non-negative float (0 where the bits are
    equal): such bits order as the floats do, NaN and +Inf above every finite cut-off, so
    ``|Δ| > c`` is ``(c_bits - a) >> 31`` (−1 or 0, no overflow) with no float compare, and
    it counts NaN as changed. Sums, the max and the relative test take ``af``, ``a`` clamped
    to +Inf: a run with a non-finite |Δ| ends with an infinite max and Σ|Δ|², which send it
    to :func:`_sums64`, and its relative count leaves out every such entry whose weights are
    not both finite (``r`` is then +Inf or NaN, never below ``af``) for :func:`_nonfinite`.
    """
    s31 = np.int32(31)
    n0 = n1 = n2 = n3 = n4 = n5 = np.int32(0)
    nb = nr = np.int32(0)
    mx = np.int32(0)
    sa = sq = sbase = np.float32(0.0)
    for j in range(ua.size):
        x = _value(ua[j], tag, lut)
        y = _value(ub[j], tag, lut)
        ne = np.int32(-np.int32(ua[j] != ub[j]))  # −1 where the stored bits differ
        a = np.int32(_as_i32(abs(y - x)) & ne)
        af = min(a, _INF_BITS)
        mx = max(mx, af)
        w = _as_f32(af)
        sa += w
        sq += w * w
        sbase += x * x
        nb = np.int32(nb - ne)
        # η·max(|x|, |y|), the max taken on the bits: a NaN weight makes r NaN (never the
        # other weight, as a float max may), so the loop's decision depends on values only
        r = _as_i32(eta * _as_f32(max(_as_i32(abs(x)), _as_i32(abs(y)))))
        nr = np.int32(nr - np.int32(np.int32(r - af) >> s31))
        h1 = np.int32(np.int32(ci1 - a) >> s31)
        n1 = np.int32(n1 - h1)
        h0, d0 = _mask_cut(h1, ci0, a, shared)
        n0 = np.int32(n0 - d0)
        n2 = np.int32(n2 - np.int32(np.int32(ci2 - a) >> s31))
        n3 = np.int32(n3 - np.int32(np.int32(ci3 - a) >> s31))
        n4 = np.int32(n4 - np.int32(np.int32(ci4 - a) >> s31))
        n5 = np.int32(n5 - np.int32(np.int32(ci5 - a) >> s31))
        hits[j] = np.uint8(-h0)
    return n0, n1, n2, n3, n4, n5, nb, nr, mx, sa, sq, sbase


@njit(cache=True, nogil=True)
def _sums64(ua, ub, tag, lut):
    """A run's three sums in float64 and its max finite |Δ| (as float32 bits), for the rare
    run whose float32 sums overflowed (weights or |Δ| above ~1.8e19) or that holds a NaN or
    ±Inf |Δ|: what the float64 path gives."""
    sa = sq = 0.0
    mx = np.float32(0.0)
    fmax = _FMAX
    for j in range(ua.size):
        if ua[j] != ub[j]:
            ad = abs(_value(ub[j], tag, lut) - _value(ua[j], tag, lut))
            if ad <= fmax:
                mx = max(mx, ad)
                w = np.float64(ad)
                sa += w
                sq += w * w
    return sa, sq, _sum_sq(ua, tag, lut), _as_i32(mx)


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _core(ua, ub, tag, lut, c, eta, shared, hits, counts, stats):
    """A block with some change, run by run (see :func:`_run`). Returns whether any entry
    differs with a NaN or ±Inf |Δ| — a non-finite weight, or a Δ that overflowed float32 —
    which it leaves out of the Δ sums and the max (and, for a non-finite weight, the relative
    count) for :func:`_nonfinite` to sort out."""
    ci0, ci1, ci2 = _as_i32(c[0]), _as_i32(c[1]), _as_i32(c[2])
    ci3, ci4, ci5 = _as_i32(c[3]), _as_i32(c[4]), _as_i32(c[5])
    n = ua.size
    mx = np.int32(0)
    sa = sq = sbase = 0.0
    bad = False
    for lo in range(0, n, _RUN):
        hi = min(n, lo + _RUN)
        n0, n1, n2, n3, n4, n5, nb, nr, m, pa, pq, pb = _run(
            ua[lo:hi], ub[lo:hi], tag, lut, ci0, ci1, ci2, ci3, ci4, ci5, eta, shared, hits[lo:hi])
        bad |= m >= _INF_BITS
        pa, pq, pb, m = _fold_run(ua[lo:hi], ub[lo:hi], tag, lut, counts, nb, nr, n0, n1, n2, n3, n4, n5,
                                  m, pa, pq, pb)
        sa += pa
        sq += pq
        sbase += pb
        mx = max(mx, m)
    _fold_block(stats, mx, sa, sq, sbase)
    return bad


@njit(cache=True, nogil=True, inline="always")
def _fold_run(ua, ub, tag, lut, counts, nb, nr, n0, n1, n2, n3, n4, n5, m, pa, pq, pb):
    """Add a run's counts (bits, relative, the mask's, the ladder's) to ``counts`` and return
    its Δ sums, Σw² and max |Δ| (as bits): the loop's float32 ones, or :func:`_sums64`'s in
    float64 where those overflowed or hold a NaN/Inf |Δ| or weight. Shared by both loops."""
    counts[C_BITS] += nb
    counts[C_REL] += nr
    counts[C_CUTS + 0] += n0
    counts[C_CUTS + 1] += n1
    counts[C_CUTS + 2] += n2
    counts[C_CUTS + 3] += n3
    counts[C_CUTS + 4] += n4
    counts[C_CUTS + 5] += n5
    if not (pq < _FMAX and pb < _FMAX):
        return _sums64(ua, ub, tag, lut)
    return np.float64(pa), np.float64(pq), np.float64(pb), m


@njit(cache=True, nogil=True, inline="always")
def _fold_block(stats, mx, sa, sq, sbase):
    """Add a block's max |Δ| (as float32 bits) and sums to ``stats``. Shared by both loops."""
    stats[S_MAX] = max(stats[S_MAX], np.float64(_as_f32(np.uint32(mx))))
    stats[S_SUM] += sa
    stats[S_SQ] += sq
    stats[S_BASE] += sbase


@njit(cache=True, nogil=True)
def _nonfinite(ua, ub, tag, lut, eta, counts, stats):
    """For a block with entries whose |Δ| is NaN or ±Inf: count those with a non-finite
    weight, and apply the relative test to them; add the others — a Δ that overflowed
    float32 between finite weights, which the loop counted as relatively changed — to the Δ
    sums and the max exactly, in float64."""
    fmax = _FMAX
    for j in range(ua.size):
        x = _value(ua[j], tag, lut)
        y = _value(ub[j], tag, lut)
        ad = abs(y - x)
        if ua[j] == ub[j] or ad <= fmax:
            continue
        if abs(x) <= fmax and abs(y) <= fmax:
            d = abs(np.float64(y) - np.float64(x))
            stats[S_MAX] = max(stats[S_MAX], d)
            stats[S_SUM] += d
            stats[S_SQ] += d * d
        else:
            counts[C_NONFINITE] += 1
            if not (ad <= eta * max(abs(x), abs(y))):
                counts[C_REL] += 1


@njit(cache=True, nogil=True)
def _emit(hits, m, start, row_len, mask, rows, cols):
    """Write a block's changed flags into the packed mask (blocks are emitted in order into a
    zeroed mask), and OR them into the row/column bitmaps."""
    if start % 8 == 0:
        # Stores, not ORs, so LLVM vectorises the packing (7× faster): no byte here holds
        # an earlier block's bits, and a later block that shares the last byte ORs into it.
        q = (m + 7) // 8
        hits[m:q * 8] = 0
        w = hits[:q * 8].view(np.uint64)
        out = mask[start // 8:start // 8 + q]
        for k in range(q):
            out[k] = np.uint8((w[k] * _PACK) >> np.uint64(56))
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
def diff(a, b, tag, lut, cuts, eta, shared, row_len, counts, stats, mask, rows, cols):
    """Same-dtype pair of raw bits ``a``, ``b`` of the dtype ``tag`` names (see :data:`TAGS`;
    ``lut`` holds the F16 table) under cut-offs ``cuts`` (the mask's, then the ladder's;
    ``shared`` from :data:`MASK_FROM`); accumulates into ``counts``, ``stats``, ``rows`` and
    ``cols``, and fills ``mask``, which must arrive zeroed."""
    n = a.size
    block = row_len if row_len else _BLOCK
    hits = np.zeros(block + 8, np.uint8)
    for start in range(0, n, block):
        stop = min(n, start + block)
        ua = a[start:stop]
        ub = b[start:stop]
        if _skip_quiet(ua, ub, tag, lut, stats):
            continue
        if _core(ua, ub, tag, lut, cuts, eta, shared, hits, counts, stats):
            _nonfinite(ua, ub, tag, lut, eta, counts, stats)
        _emit(hits, stop - start, start, row_len, mask, rows, cols)


@njit(cache=True, nogil=True)
def delta(a, b, tag, lut, out):
    """``out = b − a`` of the stored bits of a BF16 (``tag`` int8) or F32 (int32) pair, in
    float32, rounded to BF16 (nearest-even, NaN kept) for BF16: what ``round_to(decode(b) −
    decode(a))`` gives, in one pass instead of several over whole-matrix temporaries."""
    for i in range(a.size):
        out[i] = _rounded(_value(b[i], tag, lut) - _value(a[i], tag, lut), tag)


def _rounded(x, tag):  # noqa: ARG001 — a stub: numba uses the overload below
    """float32 ``x`` rounded to the dtype ``tag`` names (BF16: nearest-even)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_rounded, inline="always")
def _rounded_impl(x, tag):
    if tag == types.int8:
        # No NaN case, unlike round_to: a NaN difference of two BF16 values is one operand's
        # NaN, quieted, or the default NaN, and either has its low 16 bits zero, which the
        # rounding keeps (only a NaN with payload there could round to ±Inf).
        return lambda x, tag: _as_f32((np.uint32(_as_i32(x)) + np.uint32(0x7FFF) + (
            (np.uint32(_as_i32(x)) >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return lambda x, tag: x
