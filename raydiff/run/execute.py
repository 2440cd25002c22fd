"""Executing work: one unit or one spectrum task, read → compute → write to the store.

This is what an actor does, without Ray: the actors module wraps an :class:`Executor` and
adds only resources, placement and retries. Results go straight from here to the store;
only a few numbers go back to the driver for progress.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from raydiff.inputs.reader import TensorReader
from raydiff.errors import RaydiffError, WorkFailed
from raydiff.kernel.diff import Criteria, decode, diff_unit, round_to
from raydiff.plan import SpectrumTask, WorkUnit
from raydiff.records import SpectrumRecord, UnitRecord
from raydiff.inputs.remote import HubAccess, HubFiles
from raydiff.kernel.spectrum import spectrum
from raydiff.store import Store


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


@dataclass(frozen=True)
class Done:
    """What goes back to the driver: which item finished, the bytes it read and how long it took."""

    kind: str  # "unit" or "spectrum"
    key: int
    nbytes: int
    seconds: float


T = TypeVar("T")


class Executor:
    """Runs units and spectrum tasks of one run in the current process.

    Args:
        ctx: the run.
        node_id: recorded with each result.
        device: torch device of the spectra (and of the element kernel when ``torch_kernel``).
        torch_kernel: diff units with the torch kernel on ``device`` (GPU actors) instead of
            the CPU kernel; default: whenever ``device`` is not ``cpu``.

    Example:
        >>> ex = Executor(ctx); ex.unit(plan.units[0])  # doctest: +SKIP
    """

    def __init__(self, ctx: RunContext, node_id: str = "local", device: str = "cpu",
                 torch_kernel: bool | None = None) -> None:
        self.ctx = ctx
        self.node_id = node_id
        self.device = device
        self.torch_kernel = device != "cpu" if torch_kernel is None else torch_kernel
        self.store = Store(ctx.store_root)
        self.reader = TensorReader(HubFiles(ctx.hub) if ctx.hub else None)

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

    def unit(self, u: WorkUnit) -> Done:
        """Diff one unit and write its :class:`UnitRecord`."""
        return self._guard(f"unit {u.unit_id} (elements {u.start}…{u.stop - 1}) of tensor {u.tensor!r}",
                           lambda: self._unit(u))

    def spectrum(self, s: SpectrumTask) -> Done:
        """Rank/spectrum of ΔW for one matrix and write its :class:`SpectrumRecord`."""
        return self._guard(f"the spectrum of tensor {s.tensor!r}", lambda: self._spectrum(s))

    def _unit(self, u: WorkUnit) -> Done:
        t0 = time.perf_counter()
        base = self.reader.read(u.base, u.start, u.stop)
        tuned = self.reader.read(u.tuned, u.start, u.stop)
        if self.torch_kernel:
            from raydiff.kernel.torch_diff import diff_unit_torch

            r = diff_unit_torch(base, tuned, u.base.dtype, u.tuned.dtype, u.compare_dtype, self.ctx.criteria,
                                u.row_len, device=self.device)
        else:
            r = diff_unit(base, tuned, u.base.dtype, u.tuned.dtype, u.compare_dtype, self.ctx.criteria, u.row_len)
        rss_anon = _rss_anon()
        seconds = time.perf_counter() - t0
        rec = UnitRecord(
            run_id=self.ctx.run_id, unit_id=u.unit_id, tensor_index=u.tensor_index, tensor=u.tensor,
            start=u.start, stop=u.stop, numel=r.numel, changed=r.changed, changed_bits=r.changed_bits,
            changed_ladder=r.changed_ladder, changed_rel=r.changed_rel, changed_subprecision=r.changed_subprecision,
            nonfinite=r.nonfinite, max_abs_delta=r.max_abs_delta,
            sum_abs_delta=r.sum_abs_delta, sum_sq_delta=r.sum_sq_delta, sum_sq_base=r.sum_sq_base,
            rows_touched=r.rows_touched, cols_bitmap=r.cols_bitmap, mask_codec=r.mask_codec, mask=r.mask,
            node_id=self.node_id, worker_pid=os.getpid(), seconds=seconds, rss_anon_bytes=rss_anon,
            finished_at=dt.datetime.now(dt.timezone.utc),
        )
        self.store.write_unit(rec)
        return Done("unit", u.unit_id, u.nbytes, time.perf_counter() - t0)

    def delta_matrix(self, s: SpectrumTask) -> torch.Tensor:
        """ΔW of a 2-D tensor as float32, taken in the compared dtype as the paper does."""
        m, n = s.base.shape
        b = decode(self.reader.read(s.base, 0, m * n), s.base.dtype)
        t = decode(self.reader.read(s.tuned, 0, m * n), s.tuned.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            d = round_to((t - b).astype(np.float32, copy=False), s.compare_dtype)
        return torch.from_numpy(np.ascontiguousarray(d).reshape(m, n))

    def _spectrum(self, s: SpectrumTask) -> Done:
        t0 = time.perf_counter()
        delta = self.delta_matrix(s).to(self.device)
        sp = spectrum(delta, self.ctx.rank_mode, self.ctx.top_k, self.ctx.sketch_rank)
        cut = sp.rank_cutoffs if len(sp.rank_cutoffs) == 3 else (None, None, None)
        self.store.write_spectrum(SpectrumRecord(
            run_id=self.ctx.run_id, tensor_index=s.tensor_index, tensor=s.tensor, method=sp.method,
            device=sp.device, rank=sp.rank, max_rank=sp.max_rank, top_sv=sp.top_sv if sp.computed else None,
            stable_rank=sp.stable_rank, effective_rank=sp.effective_rank, rank_1e1=cut[0],
            rank_1e2=cut[1], rank_1e3=cut[2], fro=sp.fro, seconds=sp.seconds, node_id=self.node_id,
            note=sp.note or None,
        ))
        return Done("spectrum", s.tensor_index, s.base.nbytes + s.tuned.nbytes, time.perf_counter() - t0)
