"""The fused diff loop for AVX-512 CPUs: decode, compare and compact in one pass, then count.

A drop-in for :func:`raydiff._fused.diff` — the same counts, mask, rows, columns and max,
and sums equal to within float32 rounding — that :func:`raydiff.kernel.diff.diff_unit` takes
where :func:`available` says the CPU can run it. The portable loop evaluates the ladder's
five cut-offs, the Δ sums and the max on every entry of a block with any change, the
unchanged ones too, masked out. Here a loop written in LLVM IR (:func:`_front`, 32 entries
per step in two vectors of 16 lanes) does per entry only what every entry needs: compare
the stored bits, decode, Σw², |Δ| as bits, the mask's cut-off (its bits stored packed, as
the mask wants them), the relative test (counted by popcount) — and then *compacts* the
|Δ| bits of the entries whose bits differ into a small buffer (``vpcompressd``).
:func:`_ladder` runs the ladder, the max and the Δ sums over that buffer alone, so their
cost follows the number of changed entries, not the tensor's size.

Semantics are the portable loop's, entry for entry: |Δ| is compared as the integer bits of
a non-negative float (NaN and +Inf above every finite cut-off, so a NaN Δ counts as
changed); the relative test is the ordered float compare ``|Δ| > η·max(|x|, |y|)`` with the
max taken by magnitude and NaN kept (``vrangeps``), which leaves out exactly the entries
with a non-finite weight for :func:`raydiff._fused._nonfinite`; sums are float32 per lane
within runs of :data:`_CRUN` entries and float64 across runs, and a run whose float32 sums
overflowed or hold a NaN is summed again in float64 (:func:`raydiff._fused._sums64`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from raydiff.kernel._fused import (
    _BLOCK, _FLAGS, _INF_BITS, _as_f32, _as_i32, _fold_block, _fold_run, _nonfinite, _skip_quiet, _value,
)

_LANES = 16
#: Entries per run: the float64 redo's unit and the compact buffer's size (8 KiB, in L1).
#: The float32 sums keep two accumulators of 16 lanes, so each partial sum adds at most
#: ``_CRUN / 32`` = 64 entries (the portable loop's add 512).
_CRUN = 2048
_I1, _I16, _I32, _I64, _F32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V = {t: ir.VectorType(t, _LANES) for t in (_I1, _I16, _I32, _F32, ir.HalfType())}


#: What the loop's instructions need: compress (F), word unpacks and masks (BW), ``vrangeps``
#: (DQ), ``pdep`` (BMI2). Intel since Skylake-SP and AMD since Zen 4 have them all.
FEATURES = ("avx512f", "avx512bw", "avx512dq", "bmi2")


def available() -> bool:
    """Whether this process compiles for a CPU with :data:`FEATURES`: the host has them, and
    numba was not told to target another CPU (``NUMBA_CPU_NAME``)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in FEATURES)


def _declare(module: ir.Module, name: str, ret: ir.Type, *args: ir.Type) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, list(args)), name)


def _splat(builder: ir.IRBuilder, value: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES))


#: Entries per step of :func:`_front`: two vectors of 16 lanes.
_STEP = 32
#: BF16 decodes by interleaving zero words with the stored ones (``vpunpck[lh]wd``), one
#: instruction per 16 entries instead of a widen and a shift: per 128-bit lane, the low
#: vector gets entries 0–3 of each 8 and the high vector entries 4–7. Counts, sums and the
#: compacted |Δ| do not care about order; the mask bits are put back in order by ``pdep``.
_UNPACK = ([i for q in range(4) for j in range(4) for i in (0, 32 + 8 * q + j)],
           [i for q in range(4) for j in range(4, 8) for i in (0, 32 + 8 * q + j)])
_NIBBLES = (0x0F0F0F0F, 0xF0F0F0F0)


@intrinsic
def _front(typingctx, pa, pb, groups, pbuf, pbits, tag, eta, c0):
    """``groups`` × 32 entries of the pairs at addresses ``pa``, ``pb`` (stored bits of the
    dtype ``tag`` names): writes the packed bits of ``|Δ| > c0`` (``c0`` as float bits) as
    one uint32 per 32 entries at ``pbits``, appends the |Δ| bits of every entry whose stored
    bits differ at ``pbuf`` (which needs 16 entries of slack) and returns ``(appended,
    relative count, mask count, float32 Σw²)``."""
    width = {types.int8: 16, types.int16: 16, types.int32: 32}[tag]
    ret = types.Tuple((types.int64, types.int64, types.int64, types.float32))
    sig = ret(types.uintp, types.uintp, types.int64, types.uintp, types.uintp, tag, types.float32, types.int32)

    def codegen(context, builder, signature, args):
        pa, pb, groups, pbuf, pbits, _, eta, c0 = args
        module = builder.module
        vin = ir.VectorType(ir.IntType(width), _STEP)
        vi1, vi32, vf32 = _V[_I1], _V[_I32], _V[_F32]
        compress = _declare(module, "llvm.x86.avx512.mask.compress.v16i32", vi32, vi32, vi32, vi1)
        pdep = _declare(module, "llvm.x86.bmi.pdep.32", _I32, _I32, _I32)
        vrange = _declare(module, "llvm.x86.avx512.mask.range.ps.512", vf32, vf32, vf32, _I32, vf32, _I16, _I32)
        ctpop = _declare(module, "llvm.ctpop.i16", _I16, _I16)
        fmuladd = _declare(module, "llvm.fmuladd.v16f32", vf32, vf32, vf32, vf32)
        reduce = _declare(module, "llvm.vector.reduce.fadd.v16f32", _F32, _F32, vf32)
        a_ptr = builder.inttoptr(pa, ir.PointerType(vin))
        b_ptr = builder.inttoptr(pb, ir.PointerType(vin))
        buf_ptr = builder.inttoptr(pbuf, ir.PointerType(_I32))
        bits_ptr = builder.inttoptr(pbits, ir.PointerType(_I32))
        absmask = ir.Constant(vi32, [0x7FFFFFFF] * _LANES)
        eta_v = _splat(builder, eta, vf32)
        c0_v = _splat(builder, c0, vi32)
        zero_i64, zero_acc = ir.Constant(_I64, 0), ir.Constant(vf32, [0.0] * _LANES)

        def halves(u):
            """The two 16-lane halves of a step's stored bits: (bits to compare, float32 bits)."""
            if tag == types.int8:  # BF16: stored bits in the top half of a zero word, exact
                zero = ir.Constant(vin, [0] * _STEP)
                wide = [builder.bitcast(builder.shuffle_vector(zero, u, ir.Constant(ir.VectorType(_I32, _STEP), m)),
                                        vi32) for m in _UNPACK]
                return [(w, w) for w in wide]
            parts = [builder.shuffle_vector(u, u, ir.Constant(ir.VectorType(_I32, _LANES), list(range(h, h + 16))))
                     for h in (0, 16)]
            if tag == types.int16:  # F16: widened by vcvtph2ps, which quiets a signalling NaN: compare stored bits
                return [(v, builder.bitcast(builder.fpext(builder.bitcast(v, _V[ir.HalfType()]), vf32), vi32))
                        for v in parts]
            return [(v, v) for v in parts]  # F32

        def count(mask):
            return builder.zext(builder.call(ctpop, [builder.bitcast(mask, _I16)]), _I64)

        entry = builder.block
        loop = builder.append_basic_block("front.loop")
        done = builder.append_basic_block("front.done")
        builder.cbranch(builder.icmp_signed(">", groups, zero_i64), loop, done)

        builder.position_at_end(loop)
        i, k, nrel, nhit = (builder.phi(_I64) for _ in range(4))
        accs = [builder.phi(vf32), builder.phi(vf32)]  # one per half: two FMA chains, not one twice as long
        ua = builder.load(builder.gep(a_ptr, [i]), align=width // 8)
        ub = builder.load(builder.gep(b_ptr, [i]), align=width // 8)
        k_next, nrel_next, nhit_next, words, accs_next = k, nrel, nhit, [], []
        for acc, (ra, xb), (rb, yb) in zip(accs, halves(ua), halves(ub)):
            ne = builder.icmp_unsigned("!=", ra, rb)  # the stored bits differ
            x, y = builder.bitcast(xb, vf32), builder.bitcast(yb, vf32)
            a = builder.and_(builder.bitcast(builder.fsub(y, x), vi32), absmask)  # |Δ| as bits
            accs_next.append(builder.call(fmuladd, [x, x, acc]))
            # η·max(|x|, |y|): vrangeps takes the larger magnitude, sign cleared, and keeps a NaN
            # weight's NaN, so the ordered compare is false for it, as for an infinite weight
            # (η·Inf = Inf ≥ |Δ|): both are left to _nonfinite, as the portable loop does
            m = builder.call(vrange, [x, y, ir.Constant(_I32, 0b1011), zero_acc, ir.Constant(_I16, -1),
                                      ir.Constant(_I32, 4)])
            rel = builder.fcmp_ordered(">", builder.bitcast(a, vf32), builder.fmul(eta_v, m))
            hit = builder.bitcast(builder.and_(ne, builder.icmp_signed(">", a, c0_v)), _I16)
            words.append(builder.zext(hit, _I32))
            packed = builder.call(compress, [a, ir.Constant(vi32, [0] * _LANES), ne])
            builder.store(packed, builder.bitcast(builder.gep(buf_ptr, [k_next]), ir.PointerType(vi32)), align=4)
            k_next = builder.add(k_next, count(ne))
            nrel_next = builder.add(nrel_next, count(rel))
            nhit_next = builder.add(nhit_next, builder.zext(builder.call(ctpop, [hit]), _I64))
        if tag == types.int8:  # back in order: nibbles of the low and high vectors alternate
            lo, hi = (builder.call(pdep, [w, ir.Constant(_I32, m)]) for w, m in zip(words, _NIBBLES))
        else:
            lo, hi = words[0], builder.shl(words[1], ir.Constant(_I32, 16))
        builder.store(builder.or_(lo, hi), builder.gep(bits_ptr, [i]), align=4)
        i_next = builder.add(i, ir.Constant(_I64, 1))
        carried = ((i, zero_i64, i_next), (k, zero_i64, k_next), (nrel, zero_i64, nrel_next),
                   (nhit, zero_i64, nhit_next), (accs[0], zero_acc, accs_next[0]), (accs[1], zero_acc, accs_next[1]))
        for phi, start, nxt in carried:
            phi.add_incoming(start, entry)
            phi.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", i_next, groups), loop, done)

        builder.position_at_end(done)
        outs = []
        for _, start, nxt in carried[1:]:
            phi = builder.phi(nxt.type)
            phi.add_incoming(start, entry)
            phi.add_incoming(nxt, loop)
            outs.append(phi)
        acc = builder.fadd(outs.pop(), outs.pop())
        outs.append(builder.call(reduce, [ir.Constant(_F32, 0.0), acc], fastmath=("reassoc",)))
        return context.make_tuple(builder, signature.return_type, outs)

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=_FLAGS, inline="always")
def _tail(ua, ub, lo, hi, tag, lut, eta, c0, buf, k, hbits):
    """The last ``hi - lo`` (< :data:`_STEP`) entries of a block, one by one, as
    :func:`_front` does them, appending to its ``k`` compacted entries."""
    nrel = nhit = 0
    sb = np.float32(0.0)
    hbits[lo >> 3:(lo >> 3) + 4] = 0
    for j in range(lo, hi):
        x = _value(ua[j], tag, lut)
        y = _value(ub[j], tag, lut)
        sb += x * x
        a = _as_i32(abs(y - x))
        if _as_f32(np.uint32(a)) > eta * _as_f32(np.uint32(max(_as_i32(abs(x)), _as_i32(abs(y))))):
            nrel += 1
        if ua[j] != ub[j]:
            buf[k] = a
            k += 1
            if a > c0:
                nhit += 1
                hbits[j >> 3] |= np.uint8(1) << np.uint8(j & 7)
    return k, nrel, nhit, sb


@intrinsic
def _ladder(typingctx, pbuf, groups, c1, c2, c3, c4, c5):
    """Over ``groups`` × 32 compacted |Δ| bits at ``pbuf`` (zeros pad the last group; a zero
    adds nothing): the counts above the ladder's five cut-offs, the max (as bits: at or above
    +Inf's when any |Δ| is not finite, and the run's sums are then not finite either) and the
    float32 Σ|Δ| and Σ|Δ|². Each cut-off costs two vector compares per 32 entries, counted by
    one popcount; the sums keep two accumulators each, so no add waits on the one before."""
    ret = types.Tuple((types.int64,) * 5 + (types.int32, types.float32, types.float32))
    sig = ret(types.uintp, types.int64, *(types.int32,) * 5)

    def codegen(context, builder, signature, args):
        pbuf, groups, *cuts = args
        module = builder.module
        vi32, vf32 = _V[_I32], _V[_F32]
        ctpop = _declare(module, "llvm.ctpop.i32", _I32, _I32)
        smax = _declare(module, "llvm.smax.v16i32", vi32, vi32, vi32)
        fmuladd = _declare(module, "llvm.fmuladd.v16f32", vf32, vf32, vf32, vf32)
        fsum = _declare(module, "llvm.vector.reduce.fadd.v16f32", _F32, _F32, vf32)
        imax = _declare(module, "llvm.vector.reduce.smax.v16i32", _I32, vi32)
        ptr = builder.inttoptr(pbuf, ir.PointerType(vi32))
        cut_v = [_splat(builder, c, vi32) for c in cuts]
        concat = ir.Constant(ir.VectorType(_I32, 2 * _LANES), list(range(2 * _LANES)))
        zero_i64, zero_f = ir.Constant(_I64, 0), ir.Constant(vf32, [0.0] * _LANES)
        entry = builder.block
        loop = builder.append_basic_block("ladder.loop")
        done = builder.append_basic_block("ladder.done")
        builder.cbranch(builder.icmp_signed(">", groups, zero_i64), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(_I64)
        ns = [builder.phi(_I64) for _ in cuts]
        mx = builder.phi(vi32)
        sums = [builder.phi(vf32) for _ in range(4)]  # Σ|Δ| and Σ|Δ|², two accumulators each
        at = builder.shl(i, ir.Constant(_I64, 1))
        a0 = builder.load(builder.gep(ptr, [at]), align=4)
        a1 = builder.load(builder.gep(ptr, [builder.add(at, ir.Constant(_I64, 1))]), align=4)
        w0, w1 = builder.bitcast(a0, vf32), builder.bitcast(a1, vf32)
        nxt = [builder.add(i, ir.Constant(_I64, 1))]
        for n, c in zip(ns, cut_v):
            above = builder.shuffle_vector(builder.icmp_signed(">", a0, c), builder.icmp_signed(">", a1, c), concat)
            nxt.append(builder.add(n, builder.zext(builder.call(ctpop, [builder.bitcast(above, _I32)]), _I64)))
        nxt.append(builder.call(smax, [builder.call(smax, [mx, a0]), a1]))
        nxt += [builder.fadd(sums[0], w0), builder.fadd(sums[1], w1),
                builder.call(fmuladd, [w0, w0, sums[2]]), builder.call(fmuladd, [w1, w1, sums[3]])]
        phis = [i, *ns, mx, *sums]
        starts = [zero_i64] * 6 + [ir.Constant(vi32, [0] * _LANES)] + [zero_f] * 4
        for phi, st, nx in zip(phis, starts, nxt):
            phi.add_incoming(st, entry)
            phi.add_incoming(nx, loop)
        builder.cbranch(builder.icmp_signed("<", nxt[0], groups), loop, done)
        builder.position_at_end(done)
        outs = []
        for st, nx in zip(starts[1:], nxt[1:]):
            phi = builder.phi(nx.type)
            phi.add_incoming(st, entry)
            phi.add_incoming(nx, loop)
            outs.append(phi)
        counts, (mxv, sa0, sa1, sq0, sq1) = outs[:5], outs[5:]
        sa, sq = (builder.call(fsum, [ir.Constant(_F32, 0.0), builder.fadd(p, q)], fastmath=("reassoc",))
                  for p, q in ((sa0, sa1), (sq0, sq1)))
        return context.make_tuple(builder, signature.return_type, [*counts, builder.call(imax, [mxv]), sa, sq])

    return sig, codegen


@njit(cache=True, nogil=True)
def _emit_bits(hbits, m, start, row_len, mask, rows, colbits):
    """OR a block's packed changed bits (``m`` of them, from bit 0 of ``hbits``) into the mask
    at bit ``start``, and into the row and (packed) column bitmaps."""
    nbytes = (m + 7) >> 3
    src = hbits[:nbytes]
    sh = start & 7
    if sh == 0:  # slices indexed from 0, so LLVM vectorises these loops
        dst = mask[start >> 3:(start >> 3) + nbytes]
        for i in range(nbytes):
            dst[i] |= src[i]
    else:  # rows of a length that is not a multiple of 8
        dst = mask[start >> 3:]
        for i in range(nbytes):
            v = np.uint16(src[i]) << np.uint16(sh)
            dst[i] |= np.uint8(v & np.uint16(0xFF))
            if i + 1 < dst.size:
                dst[i + 1] |= np.uint8(v >> np.uint16(8))
    if row_len:
        cols = colbits[:nbytes]
        t = np.uint8(0)
        for i in range(nbytes):
            cols[i] |= src[i]
            t |= src[i]
        rows[start // row_len] = t


@njit(cache=True, nogil=True)
def diff(a, b, tag, lut, cuts, eta, row_len, counts, stats, mask, rows, colbits):
    """:func:`raydiff._fused.diff`'s contract, except that the columns come back packed
    (``colbits``, LSB first, one bit per column) and the mask's count is always
    ``counts[C_CUTS]`` (no ``shared`` cut-off: the mask has its own compare in the front)."""
    n = a.size
    block = row_len if row_len else _BLOCK
    item = a.itemsize
    buf = np.empty(_CRUN + 2 * _LANES, np.int32)
    hbits = np.zeros((block + _STEP - 1) // _STEP * 4 + 4, np.uint8)
    c0 = _as_i32(cuts[0])
    ci1, ci2, ci3 = _as_i32(cuts[1]), _as_i32(cuts[2]), _as_i32(cuts[3])
    ci4, ci5 = _as_i32(cuts[4]), _as_i32(cuts[5])
    pa, pb, pbits, pbuf = a.ctypes.data, b.ctypes.data, hbits.ctypes.data, buf.ctypes.data
    for start in range(0, n, block):
        stop = min(n, start + block)
        ua = a[start:stop]
        ub = b[start:stop]
        if _skip_quiet(ua, ub, tag, lut, stats):
            continue
        m = stop - start
        mx = np.int32(0)
        sa = sq = sbase = 0.0
        bad = False
        for lo in range(0, m, _CRUN):
            hi = min(m, lo + _CRUN)
            groups = (hi - lo) // _STEP
            k, nrel, nhit, pb_ = _front(pa + (start + lo) * item, pb + (start + lo) * item, groups, pbuf,
                                        pbits + (lo >> 3), tag, eta, c0)
            if lo + groups * _STEP < hi:
                k, tr, th, ts = _tail(ua, ub, lo + groups * _STEP, hi, tag, lut, eta, c0, buf, k, hbits)
                nrel += tr
                nhit += th
                pb_ += ts
            padded = (k + 31) & ~31
            buf[k:padded] = 0
            n1, n2, n3, n4, n5, m_, pa_, pq = _ladder(pbuf, padded >> 5, ci1, ci2, ci3, ci4, ci5)
            bad |= m_ >= _INF_BITS
            pa_, pq, pb_, m_ = _fold_run(ua[lo:hi], ub[lo:hi], tag, lut, counts, k, nrel, nhit, n1, n2, n3, n4, n5,
                                         m_, pa_, pq, pb_)
            sa += pa_
            sq += pq
            sbase += pb_
            mx = max(mx, m_)
        _fold_block(stats, mx, sa, sq, sbase)
        if bad:
            _nonfinite(ua, ub, tag, lut, eta, counts, stats)
        _emit_bits(hbits, m, start, row_len, mask, rows, colbits)
