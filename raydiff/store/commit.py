"""A run's commit: its units folded into one file per run, its totals per tensor.

:func:`compact` streams the per-unit files of a finished run into ``units.parquet`` (one
row group per tensor, masks included, written whole or not at all) and the spectra into
``spectra.parquet``, returning the unit rows less their masks; :func:`aggregate` turns
those into one :class:`~raydiff.records.TensorRecord` per tensor of the plan. Memory stays
bounded by one tensor's units, not by the model.
"""

from __future__ import annotations

import bisect
import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.dtypes import DTYPES
from raydiff.kernel.science import cv_of_counts, cv_random
from raydiff.records import STATUS_OK, PlanRecord, SpectrumRecord, TensorRecord, UnitRecord, to_table
from raydiff.store import layout
from raydiff.store.files import Files


def spectrum_keys(plan: list[PlanRecord]) -> list[tuple[int, int]]:
    """``(position in the plan, expert or -1)`` of every spectrum a run's plan asks for."""
    return [(i, e) for i, p in enumerate(plan) if p.has_spectrum
            for e in (range(p.experts) if p.experts else (-1,))]


def compact(files: Files, run_id: str, plan: list[PlanRecord],
            folding: Folding | None = None) -> tuple[pa.Table | None, pa.Table | None]:
    """Write a run's ``units.parquet`` and ``spectra.parquet`` from its per-unit files
    (``units.parquet`` from ``folding`` when it folded every tensor while the run went on).

    Returns:
        ``(units, spectra)``: every unit row less ``mask`` (``None`` for a run without
        units), and every spectrum row (``None`` without spectra).

    Raises:
        StoreError: a unit or spectrum file is missing or unreadable (nothing is replaced).
    """
    groups = [(p.tensor_index, range(p.first_unit, p.first_unit + p.n_units)) for p in plan if p.n_units]
    parts = []
    folded = folding.finish() if folding is not None else None
    if folded is not None:
        parts.append(folded)
    elif groups:
        with files.writer(layout.units_file(run_id), UnitRecord) as w:
            for _, ids in groups:
                parts.append(_fold_tensor(files, w, run_id, ids))
    spectra = files.read_many([layout.spectrum_file(run_id, plan[i].tensor_index, e if e >= 0 else None)
                               for i, e in spectrum_keys(plan)], SpectrumRecord)
    if spectra is not None:
        with files.writer(layout.spectra_file(run_id), SpectrumRecord) as w:
            w.write_table(spectra.sort_by([("tensor_index", "ascending"), ("expert", "ascending")]))
    return (pa.concat_tables(parts) if parts else None), spectra


def _fold_tensor(files: Files, w: pq.ParquetWriter, run_id: str, ids: range,
                 held: dict[int, UnitRecord] | None = None) -> pa.Table:
    """Append one tensor's units to ``w`` as one row group, in unit order; return its rows
    less ``mask``. Units in ``held`` (by id) are taken as they are, the others read from
    their files."""
    held = held or {}
    parts = [to_table([held[u] for u in sorted(held)], UnitRecord)] if held else []
    rest = [u for u in ids if u not in held]
    if rest:  # read_many keeps the order of its files
        parts.append(files.read_many([layout.unit_file(run_id, u) for u in rest], UnitRecord))
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts).sort_by("unit_id")
    w.write_table(table, row_group_size=max(1, table.num_rows))  # one row group per tensor
    return table.drop_columns(["mask"])


class Folding:
    """A run's ``units.parquet`` written while the run goes on: each tensor's row group as
    soon as its last unit is stored, so that the commit only moves the finished file into
    place. On a 32 GB pair that is ≈ 1 GB of masks written again, ≈ 6 s the commit no longer
    spends after the last unit.

    The file grows under a temporary name in the run's ``units/`` folder, which the commit
    removes, so a killed run leaves nothing behind once it completes. Units whose records
    come with :meth:`unit_done` (the local backend's, masks included) are held in memory
    until their tensor is folded, and not read back from their files: at most the tensors
    in progress, one or two for a run in file order. Its row groups (one
    per tensor) are in the order the tensors finished, not the plan's; every reader finds a
    tensor's rows by their values. Folding is only a
    head start: any failure (another process committed the run and removed its unit files,
    a store error) stops it, and the commit folds what is left the usual way.

    Example:
        >>> f = Folding(store, run_id, plan, done); f.unit_done(7); units = f.finish()  # doctest: +SKIP
    """

    def __init__(self, files: Files, run_id: str, plan: list[PlanRecord], done: set[int]) -> None:
        self._files, self._run_id = files, run_id
        self._left: dict[int, set[int]] = {}
        self._ids: dict[int, range] = {}
        self._first: list[tuple[int, int]] = []  # (first unit, tensor index), for finding a unit's tensor
        for p in plan:
            if p.n_units:
                ids = range(p.first_unit, p.first_unit + p.n_units)
                self._ids[p.tensor_index] = ids
                self._left[p.tensor_index] = set(ids) - done
                self._first.append((p.first_unit, p.tensor_index))
        self._first.sort()
        self._parts: dict[int, pa.Table] = {}
        self._held: dict[int, dict[int, UnitRecord]] = {}  # records of the tensors in progress, by unit
        self._cm = files.writer(layout.units_file(run_id), UnitRecord, staging=layout.units_dir(run_id))
        self._w: pq.ParquetWriter | None = self._cm.__enter__()
        for ti, left in list(self._left.items()):
            if not left:
                self._fold(ti)

    def unit_done(self, unit_id: int, record: UnitRecord | None = None) -> None:
        """A unit is stored (``record``: its record, when the caller has it): fold its
        tensor when it was the last one."""
        if self._w is None:
            return
        k = bisect.bisect_right(self._first, (unit_id, 1 << 62)) - 1
        if k < 0:
            return
        ti = self._first[k][1]
        left = self._left.get(ti)
        if left is None or unit_id not in left:
            return
        left.discard(unit_id)
        if record is not None:
            self._held.setdefault(ti, {})[unit_id] = record
        if not left:
            self._fold(ti)

    def _fold(self, ti: int) -> None:
        assert self._w is not None
        try:
            self._parts[ti] = _fold_tensor(self._files, self._w, self._run_id, self._ids[ti], self._held.pop(ti, None))
        except Exception as e:  # a head start only: the commit folds the usual way
            self.abandon(e)

    def finish(self) -> pa.Table | None:
        """Move the file into place and return every unit row less ``mask`` (plan order);
        ``None`` when folding stopped or some tensor is not folded."""
        if self._w is None or len(self._parts) != len(self._ids):
            self.abandon()
            return None
        self._w = None
        try:
            self._cm.__exit__(None, None, None)
        except Exception:
            return None
        return pa.concat_tables([self._parts[ti] for ti in sorted(self._parts)]) if self._parts else None

    def abandon(self, why: BaseException | None = None) -> None:
        """Stop folding and remove the temporary file."""
        if self._w is None:
            return
        self._w = None
        self._parts.clear()
        self._held.clear()
        err = why or RuntimeError("folding abandoned")
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(err), err, None)


#: Columns a tensor takes from its matrix's spectrum row as they are.
_FROM_SPECTRUM = ("energy_rank_99", "subspace_k", "principal_cos_u", "principal_cos_v", "principal_angle_max_deg",
                  "spectral_shift", "spectral_shift_full", "low_mag_overlap_10", "low_mag_overlap_30",
                  "low_mag_overlap_50", "low_mag_frac_10", "low_mag_frac_30", "low_mag_frac_50")
_SUMMED = ("changed", "changed_bits", "changed_rel", "nonfinite")
_SUMMED_OPTIONAL = ("changed_subprecision", "changed_code", "changed_scale_blocks")  # NULL unless some unit has one


def aggregate(run_id: str, plan: list[PlanRecord], units: pa.Table | None,
               spectra: pa.Table | None, steps: int, hashes: dict[int, dict] | None = None) -> list[TensorRecord]:
    """Per-tensor totals from unit rows (``steps``: the run's ladder length; ``hashes``: the
    ``--hash`` rows by tensor index)."""
    by_tensor: dict[int, list[dict]] = {}
    if units is not None:
        for row in units.to_pylist():
            by_tensor.setdefault(row["tensor_index"], []).append(row)
    # the spectrum of a 2-D tensor (a stack's experts have theirs in the spectra view)
    spec = {row["tensor_index"]: row for row in (spectra.to_pylist() if spectra is not None else [])
            if row.get("expert") is None}
    out = []
    for tp in plan:
        shape = tp.base_shape if tp.base_shape is not None else tp.tuned_shape
        dtype = tp.base_dtype or tp.tuned_dtype
        assert shape is not None and dtype is not None
        rows = cols = None
        if len(shape) >= 2:
            cols = shape[-1]
            rows = tp.numel // cols if cols else 0
        agg: dict[str, object] = {k: None for k in _SUMMED + _SUMMED_OPTIONAL + ("changed_ladder",)}
        stats: dict[str, object] = dict(max_abs_delta=None, mean_abs_delta=None, delta_fro=None,
                                        base_fro=None, rows_touched=None, cols_touched=None, row_cv=None,
                                        col_cv=None, row_cv_random=None, col_cv_random=None)
        if tp.status == STATUS_OK:
            rs = sorted(by_tensor.get(tp.tensor_index, []), key=lambda r: r["unit_id"])
            for k in _SUMMED:
                agg[k] = sum(r[k] for r in rs)
            agg["changed_ladder"] = tuple(int(x) for x in np.sum(
                [r["changed_ladder"] for r in rs] or [(0,) * steps], axis=0, dtype=np.int64))
            for k in _SUMMED_OPTIONAL:
                vals = [r[k] for r in rs if r[k] is not None]
                agg[k] = sum(vals) if vals else None
            if tp.compare_dtype and DTYPES[tp.compare_dtype].is_float:
                stats["max_abs_delta"] = max((r["max_abs_delta"] for r in rs), default=0.0)
                sum_abs = sum(r["sum_abs_delta"] for r in rs)
                stats["mean_abs_delta"] = sum_abs / tp.numel if tp.numel else None
                stats["delta_fro"] = float(np.sqrt(sum(r["sum_sq_delta"] for r in rs)))
                stats["base_fro"] = float(np.sqrt(sum(r["sum_sq_base"] for r in rs)))
            if rows is not None:
                stats["rows_touched"] = sum(r["rows_touched"] for r in rs)
                acc = np.zeros((cols + 7) // 8, np.uint8)
                for r in rs:
                    if r["cols_bitmap"]:
                        acc |= np.frombuffer(r["cols_bitmap"], np.uint8)
                stats["cols_touched"] = int(np.bitwise_count(acc).sum())
                stats.update(_profile_cv(rs, rows, cols, agg["changed"]))  # type: ignore[arg-type]
        s = spec.get(tp.tensor_index)
        science = {k: (s.get(k) if s else None) for k in _FROM_SPECTRUM}
        h = (hashes or {}).get(tp.tensor_index) or {}
        science.update(base_sha256=h.get("base_sha256"), tuned_sha256=h.get("tuned_sha256"))
        for k in ("principal_cos_u", "principal_cos_v"):
            science[k] = tuple(science[k]) if science[k] is not None else None
        note = tp.note
        if s and s.get("note"):  # recorded, not computed: the rank columns stay NULL
            note = "; ".join(x for x in (note, f"spectrum not computed: {s['note']}") if x)
            s = None
        out.append(TensorRecord(
            run_id=run_id, tensor_index=tp.tensor_index, tensor=tp.tensor, status=tp.status, match=tp.match,
            note=note, dtype=dtype, compare_dtype=tp.compare_dtype, shape=shape, base_shape=tp.base_shape,
            tuned_shape=tp.tuned_shape, numel=tp.numel, **agg, **stats, rows=rows, cols=cols,  # type: ignore[arg-type]
            rank=s["rank"] if s else None, max_rank=s["max_rank"] if s else (min(shape) if len(shape) == 2 else None),
            rank_method=s["method"] if s else None, stable_rank=s["stable_rank"] if s else None,
            effective_rank=s["effective_rank"] if s else None, rank_1e1=s["rank_1e1"] if s else None,
            rank_1e2=s["rank_1e2"] if s else None, rank_1e3=s["rank_1e3"] if s else None,
            top_sv=tuple(s["top_sv"]) if s else None, **science,  # type: ignore[arg-type]
        ))
    return out


def _profile_cv(units: list[dict], rows: int, cols: int, changed: int) -> dict[str, float | None]:
    """Coefficients of variation of the row and column profiles of a tensor's mask from its
    units' per-row sums of squares and per-column counts, beside those of a random mask of
    the same density. NULL where a unit lacks them (stored by an older release)."""
    if any(u.get("row_changed_sq") is None or u.get("col_changed") is None for u in units):
        return {}
    numel = rows * cols
    per_col = np.zeros(cols, np.int64)
    for u in units:
        if u["col_changed"]:
            per_col += np.asarray(u["col_changed"], np.int64)
    col_sq = int(np.dot(per_col, per_col))
    return dict(row_cv=cv_of_counts(changed, sum(u["row_changed_sq"] for u in units), rows),
                col_cv=cv_of_counts(changed, col_sq, cols),
                row_cv_random=cv_random(changed, numel, cols), col_cv_random=cv_random(changed, numel, rows))
