"""Executing work: one unit or one spectrum task, read → compute → write to the store.

This is what an actor does, without Ray: the actors module wraps an :class:`Executor` and
adds only resources, placement and retries. Results go straight from here to the store;
only a few numbers go back to the driver for progress.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from raydiff.inputs.reader import TensorReader
from raydiff.errors import RaydiffError, WorkFailed
from raydiff.kernel.diff import Criteria, UnitDiff, decode, delta_of_bits, dequantize_blocks, diff_unit, round_to
from raydiff.inputs.safetensors import TensorInfo
from raydiff.plan import BlockScale, HashTask, SpectrumTask, WorkUnit
from raydiff.records import HashRecord, SpectrumRecord, UnitRecord
from raydiff.inputs.remote import HubAccess, HubFiles
from raydiff.kernel import science
from raydiff.kernel.masks import decode_mask, decode_packed
from raydiff.store import Store

if TYPE_CHECKING:  # torch is imported by the spectra that need it: a --rank off run never loads it (≈ 1.5 s)
    import torch


def _rss_anon() -> int:
    """Anonymous resident memory of this process (Linux ``RssAnon``; 0 where unavailable).

    File-backed pages of the memory-mapped checkpoints are not counted: they belong to the
    page cache and are dropped under pressure, so they do not size an actor.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class RunContext:
    """What every actor of a run needs to know, sent once when the actor starts."""

    run_id: str
    store_root: str
    criteria: Criteria
    rank_mode: str
    top_k: int
    sketch_rank: int
    hub: HubAccess | None = None  # set when a checkpoint is read from the Hub
    subspace_k: int = 0  # k of the subspace metrics of each matrix; 0: off


@dataclass(frozen=True)
class Done:
    """What goes back to the driver: which item finished, the bytes it read and how long it took."""

    kind: str  # "unit", "spectrum" or "hash" (a tensor's SHA-256 pair, after its units)
    key: int
    nbytes: int
    seconds: float
    #: a unit's record itself, masks included, from an executor that keeps them (the local
    #: backend's, in the driver's process): the run's fold takes it from memory instead of
    #: reading its file back. Never set by an actor, whose results would carry it through Ray.
    record: UnitRecord | None = None


T = TypeVar("T")

#: Entries of ΔW rounded at a time (whole rows): the rounding's temporaries stay this size,
#: small enough for the CPU's cache (a 4096×14336 ΔW in 0.3 s, against 0.75 s with 4 Mi).
DELTA_BLOCK_ELEMS = 1 << 16
#: The largest ΔW (entries) an executor keeps its float32 buffer for, to the next spectrum:
#: a fresh 235 MB array costs the kernel ≈ 0.1 s of page faults and zeroing per 4096×14336
#: matrix. 256 MiB covers every matrix of an 8 B model but its embeddings (allocated anew).
SCRATCH_ELEMS = 1 << 26

#: The spectrum record's columns that :meth:`Executor._science` fills (NULL when not computed).
_SCIENCE_FIELDS = ("subspace_k", "principal_cos_u", "principal_cos_v", "principal_angle_max_deg", "spectral_shift",
                   "spectral_shift_full", "low_mag_overlap_10", "low_mag_overlap_30", "low_mag_overlap_50",
                   "low_mag_frac_10", "low_mag_frac_30", "low_mag_frac_50", "science_seconds")


class Executor:
    """Runs units and spectrum tasks of one run in the current process.

    Args:
        ctx: the run.
        node_id: recorded with each result.
        device: torch device of the spectra (and of the element kernel when ``torch_kernel``).
        torch_kernel: diff units with the torch kernel on ``device`` (GPU actors) instead of
            the CPU kernel; default: whenever ``device`` is not ``cpu``.
        keep_records: return each unit's record in its :class:`Done` (in-process callers).

    Example:
        >>> ex = Executor(ctx); ex.unit(plan.units[0])  # doctest: +SKIP
    """

    def __init__(self, ctx: RunContext, node_id: str = "local", device: str = "cpu",
                 torch_kernel: bool | None = None, keep_records: bool = False) -> None:
        self.ctx = ctx
        self.keep_records = keep_records
        self.node_id = node_id
        self.device = device
        self.torch_kernel = device != "cpu" if torch_kernel is None else torch_kernel
        self.store = Store(ctx.store_root)
        self.reader = TensorReader(HubFiles(ctx.hub) if ctx.hub else None)
        self._scratch = np.empty(0, np.float32)  # ΔW of the last spectrum, reused (SCRATCH_ELEMS)

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; an error raydiff did not foresee becomes one :class:`WorkFailed` naming
        the run and ``what`` (the tensor and the unit), with the traceback as its detail."""
        try:
            return fn()
        except RaydiffError:
            raise
        except Exception as e:
            raise WorkFailed(
                f"run {self.ctx.run_id}: {what} failed on {self.node_id}: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:500]}. This is a bug in raydiff: please report it with the traceback "
                "`raydiff --debug submit …` prints. Submitting again resumes the run",
                traceback.format_exc()) from None

    def unit(self, u: WorkUnit, seen: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Done:
        """Diff one unit and write its :class:`UnitRecord`."""
        return self._guard(f"unit {u.unit_id} (elements {u.start}…{u.stop - 1}) of tensor {u.tensor!r}",
                           lambda: self._unit(u, seen))

    def prefetch(self, item: WorkUnit | SpectrumTask) -> None:
        """Start reading the bytes of a unit, or of a spectrum's matrix, on both sides (see
        :meth:`TensorReader.prefetch`)."""
        if isinstance(item, SpectrumTask):
            for info in (item.base, item.tuned):
                self.reader.prefetch(info, 0, info.numel)
            return
        for info in (item.base, item.tuned):
            self.reader.prefetch(info, item.start, item.stop)

    def release(self, item: WorkUnit | SpectrumTask, tensor: bool = False, cache: bool = False) -> None:
        """Done with an item's bytes on both sides (:meth:`TensorReader.release`): they leave
        this executor's maps (with ``tensor``, the whole tensor's) and, with ``cache``, the
        page cache, which keeps what any map still holds: a page cache folio of up to 2 MiB
        straddles two units and is mapped whole by each thread that reads one of them."""
        for info in (item.base, item.tuned):
            if tensor or isinstance(item, SpectrumTask):
                self.reader.release(info, 0, info.numel, cache)
            else:
                self.reader.release(info, item.start, item.stop, cache)

    def spectrum(self, s: SpectrumTask) -> Done:
        """Rank/spectrum of ΔW for one matrix and write its :class:`SpectrumRecord`."""
        what = f"tensor {s.tensor!r}" + (f" (expert {s.expert})" if s.expert is not None else "")
        return self._guard(f"the spectrum of {what}", lambda: self._spectrum(s))

    def _values(self, info: TensorInfo, scale: BlockScale | None, start: int, stop: int, row_len: int) -> np.ndarray:
        """Values of elements ``[start, stop)`` (whole rows) as float32 (float64 for F64):
        FP8 codes times their block scales where the weight has them."""
        bits = self.reader.read(info, start, stop)
        if scale is None:
            return decode(bits, info.dtype)
        row0, row1 = start // row_len, stop // row_len
        first, last = row0 // scale.rows, max(row0, row1 - 1) // scale.rows
        per_row = scale.scale.shape[1]
        scales = decode(self.reader.read(scale.scale, first * per_row, (last + 1) * per_row),
                        scale.scale.dtype).reshape(-1, per_row)
        return dequantize_blocks(bits, info.dtype, scales, row0, row_len, (scale.rows, scale.cols), first)

    def _scaled(self, u: WorkUnit) -> tuple[UnitDiff, int | None, int | None]:
        """A unit of a block-scaled FP8 weight: its dequantized values diffed in the compared
        float type; and, when both sides are block-scaled, the codes and the scales (of the
        blocks whose first row is in the unit) that differ."""
        wide, bits = (np.float64, np.uint64) if u.compare_dtype == "F64" else (np.float32, np.uint32)
        b = self._values(u.base, u.base_scale, u.start, u.stop, u.row_len).astype(wide, copy=False)
        t = self._values(u.tuned, u.tuned_scale, u.start, u.stop, u.row_len).astype(wide, copy=False)
        cdt = u.compare_dtype
        r = diff_unit(np.ascontiguousarray(b).view(bits), np.ascontiguousarray(t).view(bits), cdt, cdt, cdt,
                      self.ctx.criteria, u.row_len)
        if not (u.base_scale and u.tuned_scale):
            return r, None, None
        codes = int(np.count_nonzero(self.reader.read(u.base, u.start, u.stop) != self.reader.read(u.tuned, u.start,
                                                                                                   u.stop)))
        sb, st = u.base_scale, u.tuned_scale
        row0, row1 = u.start // u.row_len, u.stop // u.row_len
        first, end = -(-row0 // sb.rows), -(-row1 // sb.rows)  # block rows that start in the unit
        if (sb.rows, sb.cols) != (st.rows, st.cols) or end <= first:
            return r, codes, 0 if end <= first else None
        per_row = sb.scale.shape[1]
        scale_b = self.reader.read(sb.scale, first * per_row, end * per_row)
        scale_t = self.reader.read(st.scale, first * per_row, end * per_row)
        return r, codes, int(np.count_nonzero(scale_b != scale_t))

    def _diff(self, u: WorkUnit, seen: Callable[[np.ndarray, np.ndarray], None] | None = None
              ) -> tuple[UnitDiff, int | None, int | None]:
        """The kernel on one unit: its :class:`UnitDiff`, and for block-scaled FP8 the codes
        and scale blocks that differ. ``seen`` gets the stored bits of both sides as read
        (``--hash`` hashes them in this same read)."""
        if u.base_scale or u.tuned_scale:
            return self._scaled(u)
        base, tuned = self.reader.read(u.base, u.start, u.stop), self.reader.read(u.tuned, u.start, u.stop)
        if seen is not None:
            seen(base, tuned)
        if self.torch_kernel:
            from raydiff.kernel.torch_diff import diff_unit_torch

            return diff_unit_torch(base, tuned, u.base.dtype, u.tuned.dtype, u.compare_dtype, self.ctx.criteria,
                                   u.row_len, device=self.device), None, None
        return diff_unit(base, tuned, u.base.dtype, u.tuned.dtype, u.compare_dtype, self.ctx.criteria,
                         u.row_len), None, None

    def hashed(self, h: HashTask) -> list[Done]:
        """``--hash``: a tensor's units in order, their bytes hashed as they are read, then its
        :class:`HashRecord` (sides the units do not tile exactly hashed by a read of their own)."""
        return self._guard(f"the SHA-256 of tensor {h.tensor!r}", lambda: self._hashed(h))

    def _hashed(self, h: HashTask) -> list[Done]:
        t0 = time.perf_counter()
        hb, ht = hashlib.sha256(), hashlib.sha256()
        in_pass = h.in_pass

        def seen(base: np.ndarray, tuned: np.ndarray) -> None:
            hb.update(np.ascontiguousarray(base))
            ht.update(np.ascontiguousarray(tuned))

        done = [self.unit(u, seen if in_pass else None) for u in h.units]
        digests = [hb.hexdigest(), ht.hexdigest()] if in_pass else [
            self._sha256(info) if info is not None else None for info in (h.base, h.tuned)]
        self.store.write_hash(HashRecord(run_id=self.ctx.run_id, tensor_index=h.tensor_index, tensor=h.tensor,
                                         base_sha256=digests[0], tuned_sha256=digests[1]))
        extra = 0 if in_pass else h.nbytes
        return done + [Done("hash", h.tensor_index, extra, time.perf_counter() - t0)]

    def _sha256(self, info: TensorInfo) -> str:
        """SHA-256 of a tensor's stored bytes, read in slices of ~64 MiB."""
        h = hashlib.sha256()
        step = max(1, (64 << 20) // max(1, info.nbytes // max(1, info.numel)))
        for start in range(0, info.numel, step):
            h.update(np.ascontiguousarray(self.reader.read(info, start, min(info.numel, start + step))))
        return h.hexdigest()

    def _unit(self, u: WorkUnit, seen: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Done:
        t0 = time.perf_counter()
        r, changed_code, changed_scales = self._diff(u, seen)
        rss_anon = _rss_anon()
        seconds = time.perf_counter() - t0
        rec = UnitRecord(
            run_id=self.ctx.run_id, unit_id=u.unit_id, tensor_index=u.tensor_index, tensor=u.tensor,
            start=u.start, stop=u.stop, numel=r.numel, changed=r.changed, changed_bits=r.changed_bits,
            changed_ladder=r.changed_ladder, changed_rel=r.changed_rel, changed_subprecision=r.changed_subprecision,
            changed_code=changed_code, changed_scale_blocks=changed_scales,
            nonfinite=r.nonfinite, max_abs_delta=r.max_abs_delta,
            sum_abs_delta=r.sum_abs_delta, sum_sq_delta=r.sum_sq_delta, sum_sq_base=r.sum_sq_base,
            rows_touched=r.rows_touched, cols_bitmap=r.cols_bitmap, row_changed_sq=r.row_changed_sq,
            col_changed=r.col_changed, mask_codec=r.mask_codec, mask=r.mask,
            node_id=self.node_id, worker_pid=os.getpid(), seconds=seconds, rss_anon_bytes=rss_anon,
            finished_at=dt.datetime.now(dt.timezone.utc),
        )
        self.store.write_unit(rec)
        return Done("unit", u.unit_id, u.nbytes, time.perf_counter() - t0, rec if self.keep_records else None)

    def matrices(self, s: SpectrumTask) -> tuple[np.ndarray, np.ndarray]:
        """``(W0, W1)`` of a 2-D tensor (or an expert's matrix) as float32 (float64 for F64)
        ``m × n`` arrays (block-scaled FP8 dequantized)."""
        m, n = s.base.shape
        b = self._values(s.base, s.base_scale, 0, m * n, n)
        t = self._values(s.tuned, s.tuned_scale, 0, m * n, n)
        return b.reshape(m, n), t.reshape(m, n)

    def delta_matrix(self, s: SpectrumTask, w: tuple[np.ndarray, np.ndarray] | None = None,
                     reuse: bool = False) -> torch.Tensor:
        """ΔW of a 2-D tensor (or an expert's matrix) as float32, taken in the compared dtype
        as the paper does (block-scaled FP8 dequantized first). A BF16 or F32 pair's comes
        straight from the stored bits in one pass (0.09 s for 4096×14336 BF16, against 0.6 s
        decoding both sides first); ``w``, both sides decoded, serves the others. With
        ``reuse``, ΔW is written into this executor's buffer, which the next call with
        ``reuse`` overwrites (:data:`SCRATCH_ELEMS`)."""
        import torch

        m, n = s.base.shape
        out = None
        if reuse and m * n <= SCRATCH_ELEMS:
            if self._scratch.size < m * n:
                self._scratch = np.empty(m * n, np.float32)
            out = self._scratch[:m * n].reshape(m, n)
        if _delta_from_bits(s):
            d = delta_of_bits(self.reader.read(s.base, 0, m * n), self.reader.read(s.tuned, 0, m * n), s.base.dtype,
                              out)
            return torch.from_numpy(d.reshape(m, n))
        b, t = w if w is not None else self.matrices(s)
        # a block of rows at a time: the rounding's temporaries stay a block's size, not a few
        # copies of the matrix (2.1 GB each for a 128256×4096 embedding)
        d = np.empty(b.shape, np.float32) if out is None else out
        rows = max(1, DELTA_BLOCK_ELEMS // max(1, b.shape[1]))
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(0, b.shape[0], rows):
                d[i:i + rows] = round_to((t[i:i + rows] - b[i:i + rows]).astype(np.float32, copy=False),
                                         s.compare_dtype)
        return torch.from_numpy(d)

    def _needs_values(self, s: SpectrumTask) -> bool:
        return needs_values(s, self.ctx)

    def _science(self, s: SpectrumTask, w: tuple[np.ndarray, np.ndarray] | None) -> dict[str, object]:
        """The follow-up papers' metrics of one matrix (:mod:`raydiff.kernel.science`): the
        subspace ones (``subspace_k`` > 0), the full spectral shift (``rank_mode`` exact)
        and the overlap of the changed mask with the smallest ``|W0|``. ``w`` is both sides
        decoded, ``None`` when none of these needs them (:meth:`_needs_values`)."""
        import torch

        t0 = time.perf_counter()
        m, n = s.base.shape
        out: dict[str, object] = {}
        if self.ctx.subspace_k or self.ctx.rank_mode == "exact":
            assert w is not None
            from raydiff.kernel.torch_diff import read_only_tensor  # F32 values are views of the memory map

            a, b = (read_only_tensor(np.ascontiguousarray(x, np.float32)).to(self.device) for x in w)
            if self.ctx.subspace_k:  # None for a matrix holding NaN or ±Inf
                sub = science.subspace(a, b, self.ctx.subspace_k)
                if sub is not None:
                    out.update(subspace_k=sub.k, principal_cos_u=sub.cos_u, principal_cos_v=sub.cos_v,
                               principal_angle_max_deg=sub.angle_max_deg, spectral_shift=sub.shift_topk)
            if self.ctx.rank_mode == "exact" and not (science.nonfinite(a) or science.nonfinite(b)):
                out["spectral_shift_full"] = science.spectral_shift(torch.linalg.svdvals(a),
                                                                    torch.linalg.svdvals(b))
            del a, b
        # the run's changed mask of the whole matrix, by the same kernel as its units
        whole = WorkUnit(-1, s.tensor_index, s.tensor, 0, m * n, n, s.base, s.tuned, s.compare_dtype,
                         s.base_scale, s.tuned_scale)
        r, _, _ = self._diff(whole)
        if _magnitude_from_bits(s):  # by counts of each magnitude: exact, fast
            low = science.low_magnitude_overlap_bits(self.reader.read(s.base, 0, m * n), s.base.dtype,
                                                     decode_packed(r.mask_codec, r.mask, m * n), packed_mask=True)
        else:
            assert w is not None
            low = science.low_magnitude_overlap(np.abs(w[0]).reshape(-1), decode_mask(r.mask_codec, r.mask, m * n))
        for alpha, (overlap, frac) in zip(science.LOW_MAG_ALPHAS, low):
            pct = round(alpha * 100)
            out[f"low_mag_overlap_{pct}"], out[f"low_mag_frac_{pct}"] = overlap, frac
        out["science_seconds"] = time.perf_counter() - t0
        return out

    def _spectrum(self, s: SpectrumTask) -> Done:
        from raydiff.kernel.spectrum import spectrum

        t0 = time.perf_counter()
        w = self.matrices(s) if self._needs_values(s) else None
        delta = self.delta_matrix(s, w, reuse=True).to(self.device)
        sp = spectrum(delta, self.ctx.rank_mode, self.ctx.top_k, self.ctx.sketch_rank)
        del delta
        extra = self._science(s, w)
        cut = sp.rank_cutoffs if len(sp.rank_cutoffs) == 3 else (None, None, None)
        self.store.write_spectrum(SpectrumRecord(
            run_id=self.ctx.run_id, tensor_index=s.tensor_index, tensor=s.tensor, expert=s.expert, method=sp.method,
            device=sp.device, rank=sp.rank, max_rank=sp.max_rank, top_sv=sp.top_sv if sp.computed else None,
            stable_rank=sp.stable_rank, effective_rank=sp.effective_rank, rank_1e1=cut[0],
            rank_1e2=cut[1], rank_1e3=cut[2], fro=sp.fro, energy_rank_99=sp.energy_rank_99 if sp.computed else None,
            seconds=sp.seconds, node_id=self.node_id, note=sp.note or None,
            **{k: extra.get(k) for k in _SCIENCE_FIELDS},
        ))
        return Done("spectrum", s.tensor_index, s.base.nbytes + s.tuned.nbytes, time.perf_counter() - t0)


def needs_values(s: SpectrumTask, ctx: RunContext) -> bool:
    """Whether a spectrum task decodes both sides to floats: for a ΔW the stored bits do
    not give, or for metrics of the weights themselves (the subspaces, the full spectral
    shift, magnitude masks of other dtypes than BF16 and F16). Skipping it spares two
    float32 copies of the matrix (4.2 GB for a 128256×4096 embedding)."""
    return (not _delta_from_bits(s) or bool(ctx.subspace_k) or ctx.rank_mode == "exact"
            or not _magnitude_from_bits(s))


def spectrum_memory(s: SpectrumTask, ctx: RunContext) -> int:
    """What a spectrum task holds at its peak, in bytes (the local backend runs spectra
    together only while these fit its budget). With both sides decoded, or an exact SVD:
    those, ΔW, and as much again for the decomposition's and the metrics' working copies
    (4 bytes an entry each; 8 for F64). A sketch on the stored bits alone holds ΔW, the
    whole-matrix masks (2 bits an entry) and its ``m × l`` and ``n × l`` factors with their
    copies: 3.1 GB for a 128256×4096 embedding, not 8.4."""
    m, n = s.base.shape[-2:]
    if needs_values(s, ctx) or ctx.rank_mode != "sketch":
        return 4 * m * n * (8 if "F64" in (s.base.dtype, s.tuned.dtype) else 4)
    return 5 * m * n + 24 * (ctx.sketch_rank + 8) * (m + n)


def _delta_from_bits(s: SpectrumTask) -> bool:
    """Whether ΔW of a spectrum task comes straight from the stored bits (:func:`delta_of_bits`):
    a BF16 or F32 pair of one dtype, compared in it, with no block scales."""
    return (s.base.dtype == s.tuned.dtype == s.compare_dtype and s.base.dtype in ("BF16", "F32")
            and s.base_scale is None and s.tuned_scale is None)


def _magnitude_from_bits(s: SpectrumTask) -> bool:
    """Whether the magnitude masks count the base's stored bits (BF16 and F16, unscaled)."""
    return s.base.dtype in ("BF16", "F16") and s.base_scale is None
