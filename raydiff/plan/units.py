"""The plan: paired tensors cut into work units, and the matrices whose spectrum is taken.

Units are cut at deterministic element offsets that depend only on the tensor's shape and
``chunk_elems``, so the masks of different runs over the same base line up unit for unit.
Units of tensors with two or more dimensions cover whole rows (last dimension), which
lets rows-touched counts be summed over units; those of a stack of experts stay inside one
expert, so counts per expert are sums of units.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydiff.dtypes import DTYPES
from raydiff.inputs.checkpoint import Checkpoint, TensorInfo
from raydiff.options import DiffOptions
from raydiff.plan.formats import BlockScale, expert_stack, matrix_of
from raydiff.plan.match import match_tensors
from raydiff.records import MATCH_EXACT, STATUS_OK


@dataclass(frozen=True)
class TensorPlan:
    """One tensor name of either side and what will be done with it.

    Attributes:
        index: position in the plan (tensors sorted by name).
        name: tensor name.
        status: ``ok`` (compared) or another status (see :mod:`raydiff.records`).
        base, tuned: locations on each side (``None`` where absent).
        compare_dtype: dtype the comparison is done in (``None`` unless ``ok``).
        unit_elems: elements per unit (the last unit of a tensor, or of an expert, may be shorter).
        row_len: last dimension for tensors with ≥ 2 dims, else 0.
        first_unit, n_units: the tensor's units are ``first_unit … first_unit+n_units-1``.
        spectrum: whether the rank/spectrum of ΔW is computed (per expert for a stack).
        note: human-readable detail of the status.
        match: how the pair was matched (``exact``, ``renamed``, ``fp8_block_scaled``…).
        experts: experts of a 3-D stack of experts, 0 for any other tensor.
        base_scale, tuned_scale: the block scales of an FP8 weight.
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
    match: str = MATCH_EXACT
    experts: int = 0
    base_scale: BlockScale | None = None
    tuned_scale: BlockScale | None = None

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
    base_scale: BlockScale | None = None
    tuned_scale: BlockScale | None = None

    @property
    def nbytes(self) -> int:
        """Input bytes this unit reads (base + tuned)."""
        return (self.stop - self.start) * (DTYPES[self.base.dtype].itemsize + DTYPES[self.tuned.dtype].itemsize)


@dataclass(frozen=True)
class SpectrumTask:
    """Rank/spectrum of ΔW for one matrix (reads it whole on both sides): a 2-D tensor, or
    one expert (``expert``) of a stack of experts."""

    tensor_index: int
    tensor: str
    base: TensorInfo
    tuned: TensorInfo
    compare_dtype: str
    expert: int | None = None
    base_scale: BlockScale | None = None
    tuned_scale: BlockScale | None = None

    @property
    def key(self) -> tuple[int, int]:
        """``(tensor_index, expert or -1)``: which spectrum of the run this is."""
        return self.tensor_index, -1 if self.expert is None else self.expert

    @property
    def flops(self) -> float:
        """Rough cost of an exact SVD of the matrix, for scheduling and estimates."""
        m, n = self.base.shape
        return 4.0 * m * n * min(m, n)


@dataclass(frozen=True)
class HashTask:
    """``--hash``: the SHA-256 of one tensor's bytes on each side it exists on, with its units,
    run in order on one actor so the bytes each unit reads are hashed in that same read.

    ``in_pass`` is whether the units tile both sides' bytes exactly (a plain pair); otherwise
    (a part compared, FP8 with scales, a tensor on one side only) the sides are hashed by a
    read of their own.
    """

    tensor_index: int
    tensor: str
    base: TensorInfo | None
    tuned: TensorInfo | None
    units: tuple[WorkUnit, ...]

    @property
    def in_pass(self) -> bool:
        if not self.units or self.base is None or self.tuned is None:
            return False
        covered = 0
        for u in self.units:
            if u.base != self.base or u.tuned != self.tuned or u.base_scale or u.tuned_scale or u.start != covered:
                return False
            covered = u.stop
        return covered == self.base.numel == self.tuned.numel

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in (self.base, self.tuned) if i is not None)


def hash_tasks(plan: Plan, done: set[int]) -> list[HashTask]:
    """One :class:`HashTask` per tensor of the plan not in ``done`` (tensor indexes already hashed)."""
    by_tensor: dict[int, list[WorkUnit]] = {}
    for u in plan.units:
        by_tensor.setdefault(u.tensor_index, []).append(u)
    return [HashTask(t.index, t.name, t.base, t.tuned, tuple(sorted(by_tensor.get(t.index, []), key=lambda u: u.start)))
            for t in plan.tensors if t.index not in done and (t.base is not None or t.tuned is not None)]


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


def _starts(numel: int, unit_elems: int, experts: int) -> list[tuple[int, int]]:
    """Unit spans of a tensor; those of a stack restart at every expert."""
    if not experts:
        return [(s, min(numel, s + unit_elems)) for s in range(0, numel, unit_elems)]
    per = numel // experts
    return [(e * per + s, e * per + min(per, s + unit_elems)) for e in range(experts) for s in range(0, per, unit_elems)]


def make_plan(base: Checkpoint, tuned: Checkpoint, options: DiffOptions) -> Plan:
    """Pair the tensors of two checkpoints (:func:`~raydiff.plan.match.match_tensors`) and cut
    them into units.

    Every tensor of either side appears in ``Plan.tensors``; those that cannot be compared
    carry a status saying why (never silently dropped).

    Example:
        >>> plan = make_plan(resolve(a), resolve(b), DiffOptions())  # doctest: +SKIP
    """
    tensors: list[TensorPlan] = []
    units: list[WorkUnit] = []
    spectra: list[SpectrumTask] = []
    for index, p in enumerate(match_tensors(base, tuned, options)):
        b, t, cdt = p.base, p.tuned, p.compare_dtype
        shape = (b or t).shape  # type: ignore[union-attr]
        unit_elems, row_len = unit_elems_for(shape, options.chunk_elems)
        experts = expert_stack(p.name, shape) if p.status == STATUS_OK else 0
        first = len(units)
        if p.status == STATUS_OK:
            assert b is not None and t is not None and cdt is not None
            for start, stop in _starts(b.numel, unit_elems, experts):
                units.append(WorkUnit(len(units), index, p.name, start, stop, row_len, b, t, cdt,
                                      p.base_scale, p.tuned_scale))
        matrix = (len(shape) == 2 or experts) and min(shape) >= 1
        spectrum = bool(p.status == STATUS_OK and options.rank != "off" and matrix
                        and DTYPES[cdt].is_float)  # type: ignore[index]
        if spectrum and experts:
            spectra += [SpectrumTask(index, p.name, matrix_of(b, e), matrix_of(t, e), cdt, e)  # type: ignore[arg-type]
                        for e in range(experts)]
        elif spectrum:
            spectra.append(SpectrumTask(index, p.name, b, t, cdt, None, p.base_scale, p.tuned_scale))  # type: ignore[arg-type]
        note = p.note
        if experts:
            note = "; ".join(x for x in (note, f"a stack of {experts} experts: counted and ranked per expert "
                                         "(the experts and spectra views)") if x)
        tensors.append(TensorPlan(index, p.name, p.status, b, t, cdt, unit_elems, row_len, first,
                                  len(units) - first, spectrum, note, p.match, experts, p.base_scale,
                                  p.tuned_scale))
    return Plan(tuple(tensors), tuple(units), tuple(spectra))


def summarize(plan: Plan, limit: int = 5) -> str:
    """One line saying how tensors were matched and listing the ones not compared.

    Example:
        >>> summarize(plan)  # doctest: +SKIP
        '290 tensors: 288 exact, 1 tied_in_base, 1 resized_rows; not compared: only_in_tuned 1 (a.b)'
    """
    counts: dict[str, int] = {}
    unmatched: dict[str, list[str]] = {}
    for t in plan.tensors:
        if t.status == STATUS_OK:
            for m in t.match.split("+"):
                counts[m] = counts.get(m, 0) + 1
        else:
            unmatched.setdefault(t.status, []).append(t.name)
    ok = sum(1 for t in plan.tensors if t.status == STATUS_OK)
    line = f"{ok} tensors compared: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items(), key=lambda x: -x[1]))
    if unmatched:
        parts = []
        for status, names in unmatched.items():
            shown = ", ".join(names[:limit]) + (f", … {len(names) - limit} more" if len(names) > limit else "")
            parts.append(f"{status} {len(names)} ({shown})")
        line += "; not compared: " + "; ".join(parts)
    return line
