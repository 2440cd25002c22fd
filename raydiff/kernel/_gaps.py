"""The ``gaps`` mask layout (numba): a sparse mask as the run lengths between its set bits.

Called by :mod:`raydiff.kernel.masks`, which owns the format and picks it for sparse masks. The
layout is one byte stream: for each set bit, in order, the number of clear bits before it
(since the previous set bit, or the start), written as ``k`` bytes of 255 then one byte
``< 255`` (the gap is ``255·k + last byte``). A mask with ``m`` set bits among ``n`` takes
``m + n // 255`` bytes at most; zstd then brings it to ~1.0× the entropy of a random mask
of that density, in a third of the time zstd takes on the packed bits themselves or less
(see the table in :mod:`raydiff.kernel.masks`).

The module also holds the other small numba loops over a mask or a matrix that the kernel's
callers need: row and column counts, the magnitude histograms of the magnitude masks, and
Σx² of a spectrum's ΔW.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _ctz(typingctx, x):
    """Trailing zero bits of the uint64 ``x`` (64 for 0): one ``tzcnt``."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))
    return types.uint64(types.uint64), codegen


@intrinsic
def _popcount(typingctx, x):
    """Set bits of the uint64 ``x``: one ``popcnt``."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@njit(cache=True, nogil=True, inline="always")
def _put(out, k, gap):
    """Append one gap at ``out[k]``; returns the new length."""
    if gap < 255:  # nearly always, for a mask sparse enough to be stored this way
        out[k] = gap
        return k + 1
    while gap >= 255:
        out[k] = 255
        k += 1
        gap -= 255
    out[k] = gap
    return k + 1


#: Packed words whose set-bit positions :func:`encode` gathers before writing their gaps.
_CHUNK = 512
#: Positions taken per step from a word, whether it holds that many set bits or not.
_STEP = 6


@njit(cache=True, nogil=True)
def encode(packed, out):
    """Write the gap bytes of an LSB-first packed mask into ``out`` and return how many
    were written. ``out`` must hold ``8·packed.size + 8·packed.size // 255 + 1`` bytes, the
    most any mask of that size needs (a caller's count of set bits is not trusted).

    Two passes per chunk of words, each with few branches to mispredict: the positions of
    a word's set bits are taken :data:`_STEP` at a time with no test per bit (a cleared
    word gives 64s, left past the word's count and overwritten), then the gaps between
    positions are written. 1.4–1.7× faster than testing each bit's loop exit at 1–8 %.
    """
    k = 0
    last = -1
    words = packed.size // 8
    w64 = packed[:words * 8].view(np.uint64)
    pos = np.empty(_CHUNK * 64 + _STEP, np.int64)
    one = np.uint64(1)
    for c0 in range(0, words, _CHUNK):
        m = 0
        for i in range(c0, min(words, c0 + _CHUNK)):
            w = w64[i]
            cnt = np.int64(_popcount(w))
            base = i * 64
            j = 0
            while True:
                for t in range(_STEP):
                    pos[m + j + t] = base + np.int64(_ctz(w))
                    w &= w - one
                j += _STEP
                if j >= cnt:
                    break
            m += cnt
        for t in range(m):
            p = pos[t]
            k = _put(out, k, p - last - 1)
            last = p
    for i in range(words * 8, packed.size):
        b = packed[i]
        for bit in range(8):
            if (b >> bit) & 1:
                p = i * 8 + bit
                k = _put(out, k, p - last - 1)
                last = p
    return k


@njit(cache=True, nogil=True)
def decode(data, n, packed):
    """OR the set bits of gap bytes ``data`` into ``packed`` (``ceil(n/8)`` zeroed bytes).

    Returns the number of set bits, or −1 when the stream is malformed: a position at or
    past ``n``, or a trailing run of 255s with no final byte.
    """
    pos = -1
    acc = 0
    m = 0
    for i in range(data.size):
        b = np.int64(data[i])
        if b == 255:
            acc += 255
            continue
        pos += acc + b + 1
        acc = 0
        if pos >= n:
            return -1
        packed[pos >> 3] |= np.uint8(1) << np.uint8(pos & 7)
        m += 1
    return -1 if acc else m


@njit(cache=True, nogil=True)
def and_count(a, b):
    """Bits set in both of two packed masks of one length: one pass over 64-bit words with
    ``popcnt``, without the temporaries numpy's ``bitwise_count(a & b).sum()`` makes."""
    words = a.size // 8
    wa, wb = a[:words * 8].view(np.uint64), b[:words * 8].view(np.uint64)
    total = np.uint64(0)
    for i in range(words):
        total += _popcount(wa[i] & wb[i])
    for i in range(words * 8, a.size):
        total += _popcount(np.uint64(a[i] & b[i]))
    return np.int64(total)


def _spread_table() -> np.ndarray:
    """For each byte value: a uint64 whose byte k is bit k of it (0 or 1)."""
    b = np.arange(256, dtype=np.uint64)
    return sum(((b >> np.uint64(k)) & np.uint64(1)) << np.uint64(8 * k) for k in range(8)).astype(np.uint64)


_SPREAD = _spread_table()
_POP8 = np.array([bin(i).count("1") for i in range(256)], np.int64)


@njit(cache=True, nogil=True)
def _counts_aligned(packed, n_rows, row_len, rows, cols, spread, pop8):
    """Rows of a whole number of bytes: column counts by SWAR — byte k of ``acc[j]`` counts
    column ``8j + k``, one 64-bit add per mask byte, folded out every 255 rows before a byte
    could overflow."""
    width = row_len // 8
    acc = np.zeros(width, np.uint64)
    for r in range(n_rows):
        total = 0
        at = r * width
        for j in range(width):
            b = packed[at + j]
            acc[j] += spread[b]
            total += pop8[b]
        rows[r] += total
        if (r + 1) % 255 == 0 or r == n_rows - 1:
            for j in range(width):
                v = acc[j]
                if v:
                    for k in range(8):
                        cols[8 * j + k] += np.int64((v >> np.uint64(8 * k)) & np.uint64(0xFF))
                    acc[j] = 0


@njit(cache=True, nogil=True)
def _counts_any(packed, n, row_len, rows, cols):
    """Any row length: a step per set bit."""
    words = packed.size // 8
    w = packed[:words * 8].view(np.uint64)
    for i in range(words + (1 if packed.size % 8 else 0)):
        if i < words:
            v = w[i]
        else:  # the last, partial word
            v = np.uint64(0)
            for j in range(packed.size - words * 8):
                v |= np.uint64(packed[words * 8 + j]) << np.uint64(8 * j)
        while v:
            pos = i * 64 + np.int64(_ctz(v))
            if pos < n:
                rows[pos // row_len] += 1
                cols[pos % row_len] += 1
            v &= v - np.uint64(1)


def row_col_counts(packed: np.ndarray, n: int, row_len: int, rows: np.ndarray, cols: np.ndarray) -> None:
    """Add the set bits of an LSB-first packed mask of ``n`` bits (whole rows of ``row_len``)
    into the int64 per-row counts ``rows`` and per-column counts ``cols``. Rows of a whole
    number of bytes (nearly every weight) take ~n/8 operations whatever the density."""
    if row_len % 8 == 0:
        _counts_aligned(packed, n // row_len, row_len, rows, cols, _SPREAD, _POP8)
    else:
        _counts_any(packed, n, row_len, rows, cols)


@njit(cache=True, nogil=True)
def magnitude_counts(bits, packed, hist):
    """For 16-bit float bits: both histograms of ``|w|`` in one pass, with no branch:
    ``hist[i & 1, 2·(bits & 0x7FFF) + m]`` counts the entries of magnitude key ``bits & 0x7FFF``
    whose bit ``m`` in the LSB-first packed mask is 0 or 1. Two interleaved copies (``i & 1``)
    so that neighbours of one magnitude do not wait on each other's increment: 35 ms for
    58.7 M entries, against 159 ms with a branch on the mask and one histogram per kind."""
    n8 = bits.size // 8
    for j in range(n8):
        p = np.uint32(packed[j])
        at = j * 8
        for t in range(8):
            hist[t & 1, ((np.uint32(bits[at + t]) & 0x7FFF) << 1) | ((p >> t) & 1)] += 1
    for i in range(n8 * 8, bits.size):
        hist[0, ((np.uint32(bits[i]) & 0x7FFF) << 1) | ((np.uint32(packed[i >> 3]) >> (i & 7)) & 1)] += 1


#: entries per block of :func:`sum_squares`: a block's float64 partial sum is then rounded ~1/8
#: as often as one sequential sum's, and blocks are added in order
_SQ_BLOCK = 4096


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _block_sum_sq(x, start, stop):
    s = 0.0
    for i in range(start, stop):
        v = np.float64(x[i])
        s += v * v
    return s


@njit(cache=True, nogil=True)
def sum_squares(x):
    """Σ x² of a 1-D float32 or float64 array, in float64: a vectorised sum per block of
    :data:`_SQ_BLOCK` entries (reassociated, so LLVM keeps several accumulators; NaN and ±Inf
    keep IEEE semantics), the blocks added in order. 30 ms for a 4096×14336 float32 ΔW on
    one core. A NaN or ±Inf entry makes it NaN or +Inf; finite float32 entries cannot
    overflow it."""
    total = 0.0
    for start in range(0, x.size, _SQ_BLOCK):
        total += _block_sum_sq(x, start, min(start + _SQ_BLOCK, x.size))
    return total
