"""The plan: every tensor of either checkpoint paired by name and cut into work units.

Units are cut at deterministic element offsets that depend only on the tensor's shape and
``chunk_elems``, so the masks of different runs over the same base line up unit for unit.
Units of tensors with two or more dimensions cover whole rows (last dimension), which
lets rows-touched counts be summed over units.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydiff.checkpoint import DTYPES, Checkpoint, TensorInfo
from raydiff.options import DiffOptions

#: Tensor statuses, as stored in the ``status`` column of the ``tensors`` view.
STATUS_OK = "ok"
STATUS_ONLY_BASE = "only_in_base"
STATUS_ONLY_TUNED = "only_in_tuned"
STATUS_SHAPE = "shape_mismatch"
STATUS_DTYPE = "dtype_mismatch"

_FLOAT_WIDTH = {"F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def compare_dtype(a: str, b: str) -> str | None:
    """The dtype two tensors are compared in: their own if equal, else the narrowest float
    type holding both exactly; ``None`` when they cannot be compared (int vs float).

    Example:
        >>> compare_dtype("BF16", "F32"), compare_dtype("BF16", "F16"), compare_dtype("I8", "F32")
        ('F32', 'F32', None)
    """
    if a == b:
        return a
    if a in _FLOAT_WIDTH and b in _FLOAT_WIDTH:
        width = max(_FLOAT_WIDTH[a], _FLOAT_WIDTH[b])
        return "F64" if width == 8 else "F32"
    return None


@dataclass(frozen=True)
class TensorPlan:
    """One tensor name of either side and what will be done with it.

    Attributes:
        index: position in the plan (tensors sorted by name).
        name: tensor name.
        status: ``ok`` (compared) or a mismatch status.
        base, tuned: locations on each side (``None`` where absent).
        compare_dtype: dtype the comparison is done in (``None`` unless ``ok``).
        unit_elems: elements per unit (the last unit may be shorter).
        row_len: last dimension for tensors with ≥ 2 dims, else 0.
        first_unit, n_units: the tensor's units are ``first_unit … first_unit+n_units-1``.
        spectrum: whether the rank/spectrum of ΔW is computed.
        note: human-readable detail of the status.
    """

    index: int
    name: str
    status: str
    base: TensorInfo | None
    tuned: TensorInfo | None
    compare_dtype: str | None
    unit_elems: int
    row_len: int
    first_unit: int
    n_units: int
    spectrum: bool
    note: str

    @property
    def numel(self) -> int:
        info = self.base or self.tuned
        assert info is not None
        return info.numel


@dataclass(frozen=True)
class WorkUnit:
    """A slice ``[start, stop)`` of one tensor's flattened elements, on both sides."""

    unit_id: int
    tensor_index: int
    tensor: str
    start: int
    stop: int
    row_len: int
    base: TensorInfo
    tuned: TensorInfo
    compare_dtype: str

    @property
    def nbytes(self) -> int:
        """Input bytes this unit reads (base + tuned)."""
        return (self.stop - self.start) * (DTYPES[self.base.dtype].itemsize + DTYPES[self.tuned.dtype].itemsize)


@dataclass(frozen=True)
class SpectrumTask:
    """Rank/spectrum of ΔW for one 2-D tensor (reads the whole matrix on both sides)."""

    tensor_index: int
    tensor: str
    base: TensorInfo
    tuned: TensorInfo
    compare_dtype: str

    @property
    def flops(self) -> float:
        """Rough cost of an exact SVD of the matrix, for scheduling and estimates."""
        m, n = self.base.shape
        return 4.0 * m * n * min(m, n)


@dataclass(frozen=True)
class Plan:
    """Every tensor of both sides, the element work units and the spectrum tasks."""

    tensors: tuple[TensorPlan, ...]
    units: tuple[WorkUnit, ...]
    spectra: tuple[SpectrumTask, ...]

    @property
    def input_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def unit_elems_for(shape: tuple[int, ...], chunk_elems: int) -> tuple[int, int]:
    """``(unit_elems, row_len)`` for a tensor shape: whole rows for ≥ 2-D tensors."""
    if len(shape) >= 2 and shape[-1] > 0:
        row = shape[-1]
        return max(1, chunk_elems // row) * row, row
    return chunk_elems, 0


def make_plan(base: Checkpoint, tuned: Checkpoint, options: DiffOptions) -> Plan:
    """Pair the tensors of two checkpoints by name and cut them into work units.

    Every tensor of either side appears exactly once in ``Plan.tensors``; those that
    cannot be compared carry a status saying why (never silently dropped).

    Example:
        >>> plan = make_plan(resolve(a), resolve(b), DiffOptions())  # doctest: +SKIP
    """
    names = sorted(set(base.tensors) | set(tuned.tensors))
    tensors: list[TensorPlan] = []
    units: list[WorkUnit] = []
    spectra: list[SpectrumTask] = []
    for index, name in enumerate(names):
        b, t = base.tensors.get(name), tuned.tensors.get(name)
        cdt = None
        note = ""
        if b is None:
            status, note = STATUS_ONLY_TUNED, "absent from base"
        elif t is None:
            status, note = STATUS_ONLY_BASE, "absent from tuned"
        elif b.shape != t.shape:
            status = STATUS_SHAPE
            note = f"shape {list(b.shape)} in base, {list(t.shape)} in tuned"
        else:
            cdt = compare_dtype(b.dtype, t.dtype)
            if cdt is None:
                status, note = STATUS_DTYPE, f"dtype {b.dtype} in base, {t.dtype} in tuned cannot be compared"
            else:
                status = STATUS_OK
                if b.dtype != t.dtype:
                    note = f"{b.dtype} vs {t.dtype}, compared in {cdt}"
        shape = (b or t).shape  # type: ignore[union-attr]
        unit_elems, row_len = unit_elems_for(shape, options.chunk_elems)
        first = len(units)
        if status == STATUS_OK:
            assert b is not None and t is not None and cdt is not None
            numel = b.numel
            for start in range(0, numel, unit_elems):
                units.append(WorkUnit(len(units), index, name, start, min(numel, start + unit_elems),
                                      row_len, b, t, cdt))
        spectrum = (
            status == STATUS_OK
            and options.rank != "off"
            and len(shape) == 2
            and min(shape) >= 1
            and DTYPES[cdt].is_float  # type: ignore[index]
        )
        if spectrum:
            spectra.append(SpectrumTask(index, name, b, t, cdt))  # type: ignore[arg-type]
        tensors.append(TensorPlan(index, name, status, b, t, cdt, unit_elems, row_len, first,
                                  len(units) - first, spectrum, note))
    return Plan(tuple(tensors), tuple(units), tuple(spectra))
