"""The ``gaps`` mask layout (numba): a sparse mask as the run lengths between its set bits.

Called by :mod:`raydiff.masks`, which owns the format and picks it for sparse masks. The
layout is one byte stream: for each set bit, in order, the number of clear bits before it
(since the previous set bit, or the start), written as ``k`` bytes of 255 then one byte
``< 255`` (the gap is ``255·k + last byte``). A mask with ``m`` set bits among ``n`` takes
``m + n // 255`` bytes at most; zstd then brings it to ~1.0× the entropy of a random mask
of that density, in under half the time zstd takes on the packed bits themselves (see the
table in :mod:`raydiff.masks`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _ctz(typingctx, x):
    """Trailing zero bits of the (non-zero) uint64 ``x``: one ``tzcnt``."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
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


@njit(cache=True, nogil=True)
def encode(packed, out):
    """Write the gap bytes of an LSB-first packed mask into ``out`` and return how many
    were written. ``out`` must hold ``8·packed.size + 8·packed.size // 255 + 1`` bytes, the
    most any mask of that size needs (a caller's count of set bits is not trusted)."""
    k = 0
    last = -1
    words = packed.size // 8
    w64 = packed[:words * 8].view(np.uint64)
    one = np.uint64(1)
    for i in range(words):
        w = w64[i]
        base = i * 64
        while w:
            pos = base + np.int64(_ctz(w))
            w &= w - one
            k = _put(out, k, pos - last - 1)
            last = pos
    for i in range(words * 8, packed.size):
        b = packed[i]
        for bit in range(8):
            if (b >> bit) & 1:
                pos = i * 8 + bit
                k = _put(out, k, pos - last - 1)
                last = pos
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
